"""The real executor against the simulator, and ``moesim-validate``.

* Same scenario, same policy, same routing: per pass, the executor's hits, misses, demand and
  prefetch bytes equal the simulator's (LRU, and the prefetching ``lookahead`` and ``pregated``);
  only times differ. Copies here are tiny (24 KB experts, no cap) so every prefetch lands before
  the next layer routes in both engines, which keeps even prefetching policies deterministic.
* Forced routing: the experts the model ran, per pass and layer, are the trace's.
* Copies are bandwidth-capped: the copy stall grows when the cap is lowered.
* Outputs: ``sim.cli.write_outputs`` files load with pandas with the simulator's columns.
* ``moesim-validate`` on a tiny scenario writes comparison.csv (the metric rows) and scatter.png; a
  sweep writes accuracy.csv; a bad override is a one-line error with exit status 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from real_backend import validate as V  # noqa: E402
from real_backend.executor import RealExecutor, build_model_and_store  # noqa: E402
from sim.cli import write_outputs  # noqa: E402
from sim.config import compose_scenario  # noqa: E402
from sim.engine import REQUEST_COLUMNS, STEP_COLUMNS, Engine, simulate  # noqa: E402
from workloads.requests import build_requests  # noqa: E402

# mini_qwen's layout (shared expert, top-4) at toy width: passes take ~1 ms on this CPU.
TINY = ["hw=this_cpu", "hw.cost_model=roofline", "model=mini_qwen", "model.hidden_size=64",
        "model.expert_intermediate_size=32", "model.shared_expert_intermediate_size=64",
        "model.num_attention_heads=2", "model.num_kv_heads=2", "model.head_dim=32", "model.vocab_size=128",
        "model.num_layers=3", "model.num_experts=8", "workload.num_requests=3", "workload.prompt_len=8",
        "workload.output_len=6", "workload.batch_size=2", "policy.prefetch.capacity_per_layer=3",
        "sim.progress=false"]
COUNT_COLUMNS = ["step", "phase", "batch_size", "tokens", "hits", "misses", "demand_bytes", "prefetch_bytes",
                 "demand_loads", "prefetches", "h2d_bytes", "active_experts_mean"]


@pytest.fixture(scope="module")
def shared():
    sc = compose_scenario(TINY)
    return build_model_and_store(sc, "cpu")


def _real(overrides, shared, **kw):
    sc = compose_scenario(TINY + list(overrides))
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    model, store = shared
    return sc, reqs, RealExecutor(sc, reqs, model=model, store=store, **kw)


@pytest.mark.parametrize("policy", ["lru", "lookahead", "pregated"])
def test_counters_equal_the_simulators(shared, policy):
    sc, reqs, ex = _real([f"policy/prefetch={policy}"], shared)
    real = ex.run()
    sim = simulate(sc, reqs)
    r, s = real.steps[COUNT_COLUMNS], sim.steps[COUNT_COLUMNS]
    pd.testing.assert_frame_equal(r.reset_index(drop=True), s.reset_index(drop=True), check_dtype=False)
    assert real.steps["misses"].sum() > 0
    if policy != "lru":
        assert real.steps["prefetches"].sum() > 0
    assert (real.steps["duration_s"] > 0).all()
    # measured parts fit inside the pass
    parts = real.steps[["attention_s", "expert_compute_s", "other_compute_s", "copy_stall_s"]].sum(axis=1)
    assert (parts <= real.steps["duration_s"] * 1.0001).all()
    assert (real.steps["attention_s"] > 0).all() and (real.steps["expert_compute_s"] > 0).all()
    assert real.summary["decode_tokens"] == sim.summary["decode_tokens"]
    assert real.requests["request_id"].tolist() == sim.requests["request_id"].tolist()


def test_forced_routing_is_honoured(shared):
    sc, reqs, ex = _real(["policy/prefetch=lru"], shared, record_routing=True)
    ex.run()
    eng = Engine(sc, reqs, record_routing=True, progress=False)
    eng.run()
    assert len(ex.recorded_passes) == len(eng.recorded_passes) > 0
    for real_pass, sim_pass in zip(ex.recorded_passes, eng.recorded_passes):
        assert real_pass == {layer: sorted(ids) for layer, ids in sim_pass.items()}
    # and the simulator's routing is the trace's: pass 0 is the first request's prompt
    first = reqs[0]
    for m, layer in enumerate(sc.model.moe_layers):
        assert set(np.unique(first.experts[: first.prompt_len, m, :]).tolist()) <= set(ex.recorded_passes[0][layer])


def test_free_running_records_the_routers_choices_and_the_simulator_replays_them(shared):
    """The model's own router decides; what it chose, forced back in, gives the same passes (same
    experts run, same greedy tokens), and the simulator replaying it makes the same cache decisions."""
    sc, reqs, free = _real(["policy/prefetch=lru"], shared, record_routing=True, free_running=True)
    res = free.run()
    routed = free.routed_requests()
    E, K, M = sc.model.num_experts, sc.model.top_k, sc.model.num_moe_layers
    assert [r.request_id for r in routed] == [r.request_id for r in reqs]
    for r, orig in zip(routed, reqs):
        assert r.experts.shape == orig.experts.shape == (r.prompt_len + r.output_len - 1, M, K)
        assert ((r.experts >= 0) & (r.experts < E)).all()
        assert all(len(set(row)) == K for row in r.experts.reshape(-1, K).tolist())  # top-k: distinct
    assert not all(np.array_equal(a.experts, b.experts) for a, b in zip(routed, reqs))  # not the synthetic ones
    forced = RealExecutor(sc, routed, model=shared[0], store=shared[1], record_routing=True)
    forced_res = forced.run()
    assert forced.recorded_passes == free.recorded_passes
    sim = simulate(sc, routed)
    pd.testing.assert_frame_equal(res.steps[COUNT_COLUMNS].reset_index(drop=True),
                                  sim.steps[COUNT_COLUMNS].reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(forced_res.steps[COUNT_COLUMNS], res.steps[COUNT_COLUMNS])


@pytest.mark.parametrize("policy", ["oracle", "pregated", "lookahead"])
def test_free_running_refuses_policies_that_need_routing_ahead(shared, policy):
    from workloads.validation import ConfigError

    with pytest.raises(ConfigError, match=f"policy/prefetch={policy} needs") as e:
        _real([f"policy/prefetch={policy}"], shared, free_running=True)
    assert "\n" not in str(e.value)


def test_copies_are_bandwidth_capped(shared):
    _, _, ex = _real(["policy.prefetch.capacity_per_layer=1", "hw.host_link.bandwidth_bps=2e7"], shared)
    res = ex.run()
    n = res.steps["demand_loads"].sum()
    assert n > 0
    # 24 KB at 20 MB/s = 1.2 ms a copy (uncapped: microseconds), at least that long on the link:
    # the shaper's lower bound, which a busy machine can only exceed. A pass issues its demand
    # loads and waits for them, and the link copies one at a time, so a pass lasts at least its
    # demand loads' link time. (Only lower bounds: what a run takes beyond them, stalls included,
    # depends on how busy the machine is.)
    ideal = 24576 / 2e7
    assert all(r.end_s - r.start_s >= ideal - 1e-9 for r in ex.copy_records)
    assert (res.steps["duration_s"] >= res.steps["demand_loads"] * ideal - 1e-9).all()
    assert res.summary["copy_stall_s"] > 0


def test_outputs_load_with_the_simulators_columns(shared, tmp_path):
    _, _, ex = _real([], shared, timeline=True)
    res = ex.run()
    write_outputs(res, tmp_path)
    steps = pd.read_parquet(tmp_path / "steps.parquet")
    reqs = pd.read_parquet(tmp_path / "requests.parquet")
    assert list(steps.columns) == STEP_COLUMNS
    assert list(reqs.columns) == REQUEST_COLUMNS
    summary = json.loads((tmp_path / "summary.json").read_text())
    for k in ("tpot_s", "ttft_s", "throughput_tok_s", "decode_tokens", "sim_wall_s", "events", "expert_hit_rate",
              "h2d_bytes", "mean_active_experts", "model", "prefetch"):
        assert k in summary
    trace = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    cats = {e["cat"] for e in trace}
    assert {"compute", "copy", "attention", "expert"} <= cats
    # Each expert span names its token count: a layer's spans sum to the pass's tokens x top_k.
    sc, checked = compose_scenario(TINY), 0
    for step in trace:
        m = re.fullmatch(r"(?:prefill|decode) step (\d+) \(B=\d+\)", step["name"])
        if not m:
            continue
        per_layer: dict[str, int] = {}
        for e in trace:
            x = re.fullmatch(r"expert (L\d+) E\d+ \((\d+) tok\)", e["name"])
            if x and step["ts"] <= e["ts"] <= step["ts"] + step["dur"]:
                per_layer[x.group(1)] = per_layer.get(x.group(1), 0) + int(x.group(2))
        tokens = int(res.steps.loc[res.steps["step"] == int(m.group(1)), "tokens"].iloc[0])
        assert per_layer == {f"L{l}": tokens * sc.model.top_k for l in sc.model.moe_layer_index}
        checked += 1
    assert checked == len(res.steps)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    from real_backend.profile import run_profile

    d = tmp_path_factory.mktemp("profile")
    run_profile([compose_scenario(TINY).model], "cpu", d, quick=True)
    return d


def test_validate_writes_comparison_and_scatter(tiny_profile, tmp_path, capsys):
    out = tmp_path / "val"
    args = [o for o in TINY if o != "hw.cost_model=roofline"]
    rc = V.main(args + ["--repeats", "2", "--profile-dir", str(tiny_profile), "-o", str(out)])
    assert rc == 0
    table = pd.read_csv(out / "comparison.csv")
    metrics = set(table["metric"])
    assert {"tpot_s", "ttft_s", "throughput_tok_s", "copy_stall_s", "h2d_bytes", "iter_abs_err_mean",
            "iter_abs_err_p50", "iter_abs_err_p99"} <= metrics
    row = table.set_index("metric").loc["h2d_bytes"]
    assert row["error_pct"] == 0.0   # same routing, same cache decisions
    assert (out / "scatter.png").stat().st_size > 1000
    for f in ("sim_timeline.json", "real_timeline.json", "sim/steps.parquet", "real/steps.parquet",
              "sim/requests.parquet", "real/requests.parquet"):
        assert (out / f).is_file(), f
    assert list(pd.read_parquet(out / "real/steps.parquet").columns) == STEP_COLUMNS
    assert "tpot_s" in capsys.readouterr().out


def test_validate_recalibrate_remeasures_only_the_executor_overheads(tiny_profile, tmp_path):
    """``--recalibrate``: OUT/profile is the given profile with the validated model's
    layer/copy/host-run overhead rows measured again (one per token count the calibration runs,
    the same as the profile's), every other row kept as it was; the simulator used that copy, and
    the given profile is not touched."""
    from real_backend.profile import EXECUTOR_OVERHEAD_OPS

    before = {f.name: f.read_bytes() for f in tiny_profile.iterdir()}
    out = tmp_path / "val"
    args = [o for o in TINY if o != "hw.cost_model=roofline"]
    rc = V.main(args + ["--repeats", "1", "--profile-dir", str(tiny_profile), "--recalibrate", "-o", str(out)])
    assert rc == 0
    assert {f.name: f.read_bytes() for f in tiny_profile.iterdir()} == before
    header = json.loads((out / "profile" / "profile.json").read_text())
    model = compose_scenario(TINY).model.name
    assert header["recalibrated"]["models"] == [model]
    old, new = pd.read_parquet(tiny_profile / "profile.parquet"), pd.read_parquet(out / "profile" / "profile.parquet")
    remeasured = lambda d: (d["model"] == model) & d["op"].isin(EXECUTOR_OVERHEAD_OPS)  # noqa: E731
    key = ["model", "op", "phase", "tokens", "batch", "context", "bytes"]
    kept_old = old[~remeasured(old)].sort_values(key, na_position="first").reset_index(drop=True)
    kept_new = new[~remeasured(new)].sort_values(key, na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept_old, kept_new, check_dtype=False)
    assert sorted(map(tuple, old[remeasured(old)][["op", "tokens"]].astype(str).values)) == \
        sorted(map(tuple, new[remeasured(new)][["op", "tokens"]].astype(str).values))
    assert json.loads((out / "validation.json").read_text())["profile_dir"] == str((out / "profile").resolve())


def test_validate_sweep_writes_accuracy(tiny_profile, tmp_path):
    out = tmp_path / "sweep"
    args = [o for o in TINY if o not in ("hw.cost_model=roofline", "workload.batch_size=2")]
    rc = V.main(args + ["workload.num_requests=2", "--repeats", "1", "--profile-dir", str(tiny_profile), "-o",
                        str(out), "--sweep", "policy/prefetch=lru,lfu", "workload.batch_size=1,2", "--recalibrate"])
    assert rc == 0
    acc = pd.read_csv(out / "accuracy.csv")
    assert len(acc) == 4
    # --recalibrate: one recalibrated copy of the profile for the whole sweep, which every cell used
    assert "recalibrated" in json.loads((out / "profile" / "profile.json").read_text())
    # ... with the decision time of lfu beyond LRU's (LRU's own is in the overhead rows)
    rows = pd.read_parquet(out / "profile" / "profile.parquet")
    decisions = rows[rows["op"] == "policy_overhead"]
    assert decisions["phase"].tolist() == ["lfu"] and decisions["median_s"].map(np.isfinite).all()
    for d in acc["dir"]:
        assert json.loads((Path(d) / "validation.json").read_text())["profile_dir"] == str((out / "profile").resolve())
    assert {"policy/prefetch", "workload.batch_size", "sim_tpot_s", "real_tpot_s", "tpot_err_pct", "sim_rank",
            "real_rank", "ranking_agrees"} <= set(acc.columns)
    assert sorted(acc.groupby("group")["sim_rank"].apply(sorted).tolist()) == [[1, 2], [1, 2]]


def test_validate_sweep_runs_the_real_repeats_round_robin(tiny_profile, tmp_path):
    """Every cell is simulated first, then repeat 1 of every cell, then repeat 2: load on the machine
    during one stretch moves one repeat of several cells, not all repeats of one."""
    lines = []
    fixed = [o for o in TINY if o != "hw.cost_model=roofline"] + ["workload.num_requests=2"]
    acc = V.run_sweep(fixed, ["policy/prefetch=lru,lfu"], 2, tiny_profile, tmp_path / "rr", "cpu", lines.append)
    order = [ln for ln in lines if ln.startswith(("simulated", "round"))]
    assert [ln.startswith("simulated in") for ln in order[:2]] == [True, True]   # both cells, first
    assert order[2:] == ["round 1/2, cell 1/2", "round 1/2, cell 2/2", "round 2/2, cell 1/2", "round 2/2, cell 2/2"]
    for d, spread in zip(acc["dir"], acc["real_tpot_spread_pct"]):
        tpot = pd.read_csv(Path(d) / "real_repeats.csv")["tpot_s"]
        assert len(tpot) == 2
        assert json.loads((Path(d) / "validation.json").read_text())["repeats"] == 2
        # how far the real repeats spread, against their median (of two: their mean)
        assert spread == pytest.approx((tpot.max() - tpot.min()) / tpot.mean() * 100, rel=1e-9)


def test_validate_free_running_writes_the_chosen_routing_as_a_trace(tiny_profile, tmp_path):
    from workloads.trace import load_trace_requests

    out = tmp_path / "free"
    args = [o for o in TINY if o != "hw.cost_model=roofline"]
    assert V.main(args + ["--repeats", "1", "--free-running", "--profile-dir", str(tiny_profile), "-o", str(out)]) == 0
    table = pd.read_csv(out / "comparison.csv").set_index("metric")
    assert table.loc["h2d_bytes", "error_pct"] == 0.0 and table.loc["expert_hit_rate", "error_pct"] == 0.0
    sc = compose_scenario(TINY)
    replayed = load_trace_requests(out / "free_running_trace.parquet", sc.model)
    assert len(replayed) == sc.workload.num_requests


def test_checkpoint_weights_reach_the_executor_and_validate(tiny_profile, tmp_path):
    """A local safetensors checkpoint (written by another seed's model) is what the executor runs:
    non-expert weights in the model, experts in the host store; free-running routing follows them."""
    from real_backend.model import MoEModel

    sc = compose_scenario(TINY)
    src = MoEModel(sc.model, "cpu", seed=123)
    ckpt = src.save_checkpoint(tmp_path / "ckpt")
    model, store = build_model_and_store(sc, "cpu", checkpoint=ckpt)
    assert torch.equal(model.embed_w, src.embed_w) and torch.equal(model.lm_head_w, src.lm_head_w)
    key = (sc.model.moe_layers[-1], 5)
    for a, b in zip(store.tensors(key), src.experts[key].tensors):
        assert torch.equal(a, b)
    out = tmp_path / "val"
    args = [o for o in TINY if o != "hw.cost_model=roofline"]
    assert V.main(args + ["--repeats", "1", "--free-running", "--checkpoint", str(ckpt), "--profile-dir",
                          str(tiny_profile), "-o", str(out)]) == 0
    assert pd.read_csv(out / "comparison.csv").set_index("metric").loc["h2d_bytes", "error_pct"] == 0.0


@pytest.mark.parametrize("argv, needle", [
    (["--checkpoint", "/no/such/dir"], "--checkpoint=/no/such/dir"),
    (["--free-running", "policy/prefetch=oracle"], "--free-running"),
    (["foo=1"], "foo"),
    (["model=nope"], "model=nope"),
    (["--repeats", "0", "--profile-dir", "x"], "repeats"),
    (["--sweep", "workload.batch_size"], "--sweep"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    rc = V.main(argv + ["-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("moesim-validate: error:") and "\n" not in err and needle in err
    assert not (tmp_path / "o").exists()


def test_tensor_parallelism_is_refused_by_moesim_validate_in_one_line(tmp_path, capsys):
    """The cost tables are one device's ops on the whole model: a TP scenario has no measured costs to
    compare with, so moesim-validate refuses it before anything runs or is written (the executor
    itself runs it: tests/test_tensor_parallel.py, tests/test_counter_contract.py)."""
    tp = ["hw.num_gpus=2", "hw.tensor_parallel=2", "+hw/link@hw.gpu_link=nvlink4"]
    args = [o for o in TINY if o != "hw.cost_model=roofline"] + tp
    assert V.main(args + ["-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim-validate: error: hw.tensor_parallel=2 is not validated") and "\n" not in err
    assert not (tmp_path / "o").exists()
