"""Speculative decoding on the real executor, against the simulator (``sim/speculation.py``).

* KV rollback is exact: a verify pass of k+1 tokens rolled back to the committed ones leaves the
  cache as if only those had been fed (same next logits as a fresh cache; lengths per sequence).
* In the executor, at every decode pass the target's cache holds exactly the committed context
  (``pos`` tokens) and the draft's lags it by at most one token (the last draft of a fully accepted
  round); and every generated token is the argmax of the model that chose it (target or draft)
  recomputed from scratch over the committed prefix -- which holds only if both caches were rolled
  back exactly, round after round.
* Same scenario, same rounds: per pass the executor's drafted, accepted and committed tokens and
  its expert hits, misses and bytes equal the simulator's (offloading on, both drafters, both
  rejected-routing modes).
* The time columns: draft and rejection sampling are timed apart from the target's ops (no op span
  inside a draft span), and all parts fit inside the pass; in the simulator they add up exactly.
* ``ops.rejection_sampling`` returns valid distributions and the speculative-sampling accept rule.
* ``moesim-validate`` runs a static speculation scenario end to end (tokens and bytes agree exactly).
* Bad input (EAGLE drafter, a draft model of another vocabulary, free-running) is a one-line error.
* Dense models: the executor runs a dense target; cascade runs unchanged on the real executor.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from real_backend import ops  # noqa: E402
from real_backend import validate as V  # noqa: E402
from real_backend.executor import RealExecutor, build_draft_model, build_model_and_store, ngram_propose  # noqa: E402
from real_backend.model import MoEModel  # noqa: E402
from sim.config import compose_scenario  # noqa: E402
from sim.engine import simulate  # noqa: E402
from workloads.requests import build_requests  # noqa: E402
from workloads.validation import ConfigError  # noqa: E402

# mini_qwen's layout at toy width (as tests/test_executor.py) with mini_draft's vocabulary, so
# that mini_draft drafts for it; small expert cache: offloading matters.
TINY = ["hw=this_cpu", "hw.cost_model=roofline", "model=mini_qwen", "model.hidden_size=64",
        "model.expert_intermediate_size=32", "model.shared_expert_intermediate_size=64",
        "model.num_attention_heads=2", "model.num_kv_heads=2", "model.head_dim=32", "model.vocab_size=1024",
        "model.num_layers=3", "model.num_experts=8", "workload.num_requests=3", "workload.prompt_len=8",
        "workload.output_len=14", "workload.batch_size=2", "policy.prefetch.capacity_per_layer=3",
        "sim.progress=false"]
SPEC = ["policy/speculation=static", "policy.speculation.drafter=model", "policy.speculation.draft_model=mini_draft",
        "policy.speculation.k=3", "policy.speculation.alpha=0.6"]
COUNT_COLUMNS = ["step", "phase", "batch_size", "tokens", "hits", "misses", "demand_bytes", "prefetch_bytes",
                 "demand_loads", "h2d_bytes", "active_experts_mean", "spec_k", "drafting_requests", "draft_tokens",
                 "accepted_tokens", "committed_tokens"]


@pytest.fixture(scope="module")
def shared():
    sc = compose_scenario(TINY + SPEC)
    model, store = build_model_and_store(sc, "cpu")
    return model, store, build_draft_model(sc, "cpu")


def _real(overrides, shared, executor=RealExecutor, **kw):
    sc = compose_scenario(TINY + SPEC + list(overrides))
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    model, store, draft = shared
    return sc, reqs, executor(sc, reqs, model=model, store=store, draft=draft, **kw)


# ------------------------------------------------------------------------------------------ ops
def test_kv_rollback_is_exact():
    """Verify k+1 tokens, keep a+1 of them: the next pass sees what a cache fed only the committed
    tokens gives (free routing: the experts chosen follow the cached context too)."""
    spec = compose_scenario(TINY).model
    model = MoEModel(spec, "cpu", seed=3)
    prompt, verify, a = [5, 17, 99, 3, 250, 7], [11, 42, 8, 600], 1
    cache = model.new_cache(2, 4)                       # also grows past its capacity
    s0, s1 = cache.allocate(), cache.allocate()
    with torch.inference_mode():
        model.forward([prompt, prompt[:3]], cache, [s0, s1])
        out = model.forward([verify, [1]], cache, [s0, s1], all_logits=True)
        assert out.logits.shape == (len(verify) + 1, spec.vocab_size)
        assert cache.lengths[s0] == len(prompt) + len(verify)
        cache.truncate(s0, len(prompt) + a + 1)
        assert cache.lengths[s0] == len(prompt) + a + 1 and cache.lengths[s1] == 4
        nxt = model.forward([[77, 78], [2]], cache, [s0, s1], all_logits=True).logits
        fresh = model.new_cache(1, 16)
        f = fresh.allocate()
        ref = model.forward([prompt + verify[:a + 1] + [77, 78]], fresh, [f], all_logits=True).logits
    torch.testing.assert_close(nxt[:2], ref[-2:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot roll slot"):
        cache.truncate(s1, 9)


def test_rejection_sampling_is_a_valid_distribution_and_the_accept_rule():
    g = torch.Generator().manual_seed(0)
    T, V = 7, 50
    logits = torch.randn(T, V, generator=g) * 3
    q = torch.randn(T, V, generator=g).softmax(-1)
    q[3] = 0.0                                          # a bonus row: no draft there
    drafted = torch.randint(0, V, (T,), generator=g)
    drafted[3] = -1
    u = torch.rand(T, generator=g)
    rej = ops.rejection_sampling(logits, q, drafted, u)
    p = logits.softmax(-1)
    torch.testing.assert_close(rej.target_probs, p)
    assert (rej.residual >= 0).all()
    torch.testing.assert_close(rej.residual.sum(-1), torch.ones(T))
    torch.testing.assert_close(rej.residual[3], p[3])   # bonus row: sample from the target itself
    idx = drafted.clamp(min=0)
    expect = (u * q[torch.arange(T), idx] <= p[torch.arange(T), idx]) & (drafted >= 0)
    assert torch.equal(rej.accept, expect) and not rej.accept[3]
    # A drafter that is the target is always accepted; its residual falls back to the target.
    same = ops.rejection_sampling(logits, p, p.argmax(-1))
    assert same.accept.all() and same.accepted([2, 3]) == [2, 3]
    torch.testing.assert_close(same.residual, p)
    assert ops.Rejection(p, torch.tensor([1, 0, 1, 1, 1, 1, 0], dtype=torch.bool), p).accepted([2, 3]) == [1, 3]


def test_ngram_prompt_lookup():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]          # the 3-gram 1 2 3 occurred before
    assert ngram_propose([4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]
    assert ngram_propose([1, 2, 3], 2) == [3, 3]                      # no match: the last token
    assert ngram_propose([7, 8, 7], 4) == [8, 7, 7, 7]                # fewer follow: padded


# ------------------------------------------------------------------------------------------ executor
class _Checked(RealExecutor):
    """Checks the KV caches against the committed context at the start of every decode pass."""

    def _forward(self, s):
        if s.phase == "decode":
            for r in s.batch:
                seq = self._seqs[r.req.request_id]
                assert self.kv.lengths[seq.slot] == r.pos == r.req.prompt_len + r.generated - 1
                assert len(seq.ids) == r.pos + 1 and seq.ids[-1] == seq.next_token
                if self.dkv is not None:
                    assert r.pos - 1 <= self.dkv.lengths[seq.dslot] <= r.pos
        return super()._forward(s)


@pytest.mark.parametrize("extra", [[], ["policy.speculation.rejected_routing=random", "policy.speculation.alpha=0.3"],
                                   ["policy.speculation.alpha=1.0", "policy.speculation.k=4"]])
def test_kv_caches_hold_the_committed_context_and_tokens_recompute(shared, extra):
    sc, reqs, ex = _real(extra, shared, _Checked)
    res = ex.run()
    model, store, draft = shared
    assert res.steps["accepted_tokens"].sum() > 0
    get = lambda layer, e: store.tensors((layer, e))  # noqa: E731
    for r in reqs:
        ids, origins = ex.token_ids[r.request_id], ex.token_origins[r.request_id]
        P = r.prompt_len
        assert len(ids) == P + r.output_len and len(origins) == r.output_len and origins[0] == "T"
        n = len(ids) - 1
        rows = r.experts[:n].astype(np.int64)
        with torch.inference_mode():
            c = model.new_cache(1, n)
            tgt = model.forward([ids[:n]], c, [c.allocate()], all_logits=True, get_expert=get,
                                routing={layer: rows[:, m, :] for m, layer in enumerate(model.moe_layers)}).logits
            d = draft.new_cache(1, n)
            dft = draft.forward([ids[:n]], d, [d.allocate()], all_logits=True).logits
        for i, who in enumerate(origins):
            p = P + i                                    # ids[p] was chosen from the logits at p - 1
            logits = tgt if who == "T" else dft
            assert int(logits[p - 1].argmax()) == ids[p], (r.request_id, i, who)
    if "policy.speculation.alpha=1.0" in extra:          # full acceptance: drafts dominate
        origins = "".join("".join(o) for o in ex.token_origins.values())
        assert origins.count("D") > origins.count("T")


@pytest.mark.parametrize("extra", [
    [],
    ["policy.speculation.rejected_routing=random"],
    ["policy.speculation.drafter=ngram"],
    ["policy.speculation.draft_keeps_running=false", "workload.batch_size=3", "policy.prefetch.capacity_per_layer=2"],
])
def test_same_rounds_tokens_and_bytes_as_the_simulator(shared, extra):
    sc, reqs, ex = _real(extra, shared)
    real = ex.run()
    sim = simulate(sc, reqs)
    r, s = real.steps[COUNT_COLUMNS], sim.steps[COUNT_COLUMNS]
    pd.testing.assert_frame_equal(r.reset_index(drop=True), s.reset_index(drop=True), check_dtype=False)
    assert real.steps["misses"].sum() > 0 and real.steps["draft_tokens"].sum() > 0
    assert (real.steps["draft_tokens"] > real.steps["accepted_tokens"]).any()    # some drafts rejected
    for k in ("decode_tokens", "h2d_bytes", "acceptance_rate", "committed_tokens_per_round", "spec_rounds"):
        assert real.summary[k] == sim.summary[k], k
    assert real.requests["request_id"].tolist() == sim.requests["request_id"].tolist()


def test_draft_verify_and_reject_columns_add_up(shared):
    _, _, ex = _real([], shared, timeline=True)
    res = ex.run()
    st = res.steps
    dec = st[st["phase"] == "decode"]
    drafting = dec["draft_tokens"] > 0
    assert (dec.loc[drafting, "draft_s"] > 0).all() and (dec.loc[drafting, "reject_s"] > 0).all()
    assert (dec.loc[~drafting, "reject_s"] == 0).all()
    assert (st.loc[st["phase"] == "prefill", "draft_s"] > 0).all()             # the draft model prefills
    parts = st[["attention_s", "expert_compute_s", "other_compute_s", "copy_stall_s", "draft_s", "reject_s"]]
    assert (parts.sum(axis=1) <= st["duration_s"] * 1.0001).all()
    assert res.summary["overhead_s"] >= 0
    # No target op is timed inside a draft or rejection-sampling span (no double counting).
    ops_spans = [e for e in res.timeline if e.get("tid") == "ops"]
    apart = [e for e in ops_spans if e["cat"] in ("draft", "reject")]
    assert {e["cat"] for e in apart} == {"draft", "reject"}
    for a in apart:
        inside = [e for e in ops_spans if e["cat"] not in ("draft", "reject")
                  and e["ts"] >= a["ts"] and e["ts"] + e["dur"] <= a["ts"] + a["dur"]]
        assert not inside
    # The simulator's columns add up to the pass exactly.
    sim = simulate(compose_scenario(TINY + SPEC))
    sparts = sim.steps[["attention_s", "expert_compute_s", "other_compute_s", "copy_stall_s", "host_stall_s",
                        "draft_s", "reject_s"]].sum(axis=1)
    np.testing.assert_allclose(sparts, sim.steps["duration_s"], rtol=1e-9, atol=1e-12)


def test_cascade_runs_unchanged_on_the_real_executor(shared):
    _, reqs, ex = _real(["policy/speculation=cascade", "policy.speculation.drafter=model",
                         "policy.speculation.draft_model=mini_draft", "policy.speculation.k=3"], shared)
    res = ex.run()
    ks = res.steps.loc[res.steps["phase"] == "decode", "spec_k"]
    assert ks.iloc[0] == 0 and ks.max() >= 1               # baseline pass, then it tests K >= 1
    assert res.summary["decode_tokens"] == sum(r.output_len - 1 for r in reqs)
    assert res.summary["policy_mean_k"] is not None


def test_dense_target_runs_and_matches_the_simulator():
    sc = compose_scenario(["hw=this_cpu", "hw.cost_model=roofline", "model=mini_draft", "workload.num_requests=2",
                           "workload.prompt_len=8", "workload.output_len=5", "workload.batch_size=2",
                           "sim.progress=false"])
    model, store = build_model_and_store(sc, "cpu")
    assert store is None and model.parameter_count()["expert"] == 0
    res = RealExecutor(sc, model=model, store=store).run()
    sim = simulate(sc)
    cols = ["step", "phase", "batch_size", "tokens", "h2d_bytes", "hits", "misses", "committed_tokens"]
    pd.testing.assert_frame_equal(res.steps[cols], sim.steps[cols], check_dtype=False)
    assert res.summary["h2d_bytes"] == 0


# ------------------------------------------------------------------------------------------ validate
@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    from real_backend.profile import run_profile

    d = tmp_path_factory.mktemp("profile")
    run_profile([compose_scenario(TINY).model, "mini_draft"], "cpu", d, quick=True)
    return d


def test_validate_runs_a_static_speculation_scenario(tiny_profile, tmp_path, capsys):
    out = tmp_path / "val"
    args = [o for o in TINY if o != "hw.cost_model=roofline"] + SPEC
    assert V.main(args + ["--repeats", "1", "--profile-dir", str(tiny_profile), "-o", str(out)]) == 0
    t = pd.read_csv(out / "comparison.csv").set_index("metric")
    for m in ("h2d_bytes", "decode_tokens", "draft_tokens", "accepted_tokens", "spec_rounds", "acceptance_rate",
              "committed_tokens_per_round", "expert_hit_rate"):
        assert t.loc[m, "error_pct"] == 0.0, m
    for m in ("verify_step_s", "draft_round_s", "reject_round_s"):
        assert t.loc[m, "sim"] > 0 and t.loc[m, "real_median"] > 0
    assert "draft_round_s" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["policy.speculation.drafter=eagle"], "policy.speculation.drafter=eagle"),
    (["policy.speculation.draft_model=qwen2_0_5b"], "vocab_size"),
])
def test_bad_speculation_input_is_one_line(shared, extra, needle, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        _real(extra, shared)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="free-running") as e:
        _real([], shared, free_running=True)
    assert "\n" not in str(e.value)
    args = [o for o in TINY if o != "hw.cost_model=roofline"] + SPEC + extra
    assert V.main(args + ["-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim-validate: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_draft_model_shapes_can_be_overridden_but_vocab_must_match(shared):
    sc = compose_scenario(TINY + SPEC)
    bad = replace(sc, draft_model=replace(sc.draft_model, vocab_size=512))
    with pytest.raises(ConfigError, match="must share its target's vocabulary"):
        RealExecutor(bad, model=shared[0], store=shared[1])
