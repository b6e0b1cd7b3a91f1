"""Tensor parallelism in the real backend (``real_backend.tensor_parallel``): the shards compute the
full model's function, and what cannot run is refused in one line.

Known answer: ``p`` ranks, each holding ``ModelSpec.tensor_shard(p)``'s slice of the full model's
weights and joined by gloo all-reduces and a logits all-gather, give the logits of the unsplit
model (float32; different summation order, so close, not bit-equal). The geometry makes every
split uneven somewhere: an expert intermediate size (33), a shared-expert width (41) and a
vocabulary (127) that 2 and 4 do not divide (zero-padded shards), a dense layer (width 45), and at ``p = 4``
more ranks than KV heads (replicated KV heads). Prefill and a decode pass over the cache.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")

from real_backend import tensor_parallel as tpm  # noqa: E402
from real_backend.executor import RealExecutor  # noqa: E402
from real_backend.model import MoEModel  # noqa: E402
from sim.config import compose_scenario  # noqa: E402
from workloads.validation import ConfigError  # noqa: E402

UNEVEN = ["hw=this_cpu", "hw.cost_model=roofline", "model=mini_qwen", "model.hidden_size=64",
          "model.num_attention_heads=4", "model.num_kv_heads=2", "model.head_dim=16", "model.vocab_size=127",
          "model.num_layers=3", "model.dense_layers=[0]", "model.dense_intermediate_size=45",
          "model.expert_intermediate_size=33",
          "model.num_experts=8", "model.shared_expert_intermediate_size=41", "sim.progress=false"]
TP2 = ["hw.num_gpus=2", "hw.tensor_parallel=2", "+hw/link@hw.gpu_link=nvlink4"]


def _routing(model: MoEModel, tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    E, K = model.spec.num_experts, model.spec.top_k
    return {layer: np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]) for layer in model.moe_layers}


def _passes(model: MoEModel) -> list[torch.Tensor]:
    """Prefill of 7 tokens (every position's logits), then one decode token."""
    cache = model.new_cache(1, 16)
    slot = cache.allocate()
    with torch.inference_mode():
        a = model.forward([list(range(1, 8))], cache, [slot], routing=_routing(model, 7, 0), all_logits=True)
        b = model.forward([[126]], cache, [slot], routing=_routing(model, 1, 1))
    return [a.logits, b.logits]


def _rank(rank: int, p: int, init_file: str, out_file: str) -> None:
    sc = compose_scenario(UNEVEN)
    tpm._init(rank, p, init_file, "cpu")
    try:
        shard = tpm._rank_model(sc, rank, p, torch.device("cpu"), None)
        logits = _passes(shard)
        if rank == 0:
            torch.save(logits, out_file)
    finally:
        tpm.dist.destroy_process_group()


@pytest.mark.parametrize("p", [2, 4])
def test_shards_compute_the_full_models_logits(p, tmp_path):
    sc = compose_scenario(UNEVEN)
    full = MoEModel(sc.model, "cpu", seed=sc.seed)
    want = _passes(full)
    out = tmp_path / "logits.pt"
    mp.spawn(_rank, args=(p, tempfile.mktemp(dir=tmp_path), str(out)), nprocs=p)
    got = torch.load(out)
    assert [tuple(g.shape) for g in got] == [(7, 127), (1, 127)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert float(want[0].abs().max()) > 1e-2     # the comparison is not between zeros


def _session(new_cache, forward) -> list[torch.Tensor]:
    """What the executor does to the target over a run: two sequences of different lengths in one
    cache (that has to grow), prefill, decode, a verify pass with every position's logits, a
    roll-back, a released slot reused by a new sequence."""
    rng = np.random.default_rng(5)
    cache = new_cache(3, 4)
    a, b = cache.allocate(), cache.allocate()
    M = [1, 2]   # the MoE layers of UNEVEN (layer 0 is dense)

    def fwd(tokens, slots, **kw):
        T = sum(len(t) for t in tokens)
        routing = {layer: np.stack([rng.choice(8, 4, replace=False) for _ in range(T)]) for layer in M}
        return forward(tokens, cache, slots, routing=routing, **kw).logits

    out = [fwd([[3, 5, 7, 9, 11], [2, 4, 6]], [a, b]), fwd([[13], [15]], [a, b])]
    out.append(fwd([[17, 19, 21]], [b], all_logits=True))          # verify: 3 positions of b
    cache.truncate(b, cache.lengths[b] - 2)                         # 2 drafts rejected
    out.append(fwd([[23], [25]], [a, b]))
    cache.release(a)
    c = cache.allocate()
    out.append(fwd([[27, 29], [31]], [c, b]))
    return out


def test_worker_ranks_follow_rank_0s_passes():
    """Through the executor's path (``TPGroup``: rank 0 announces, the worker follows) two ranks give
    the unsplit model's logits over a whole session, tied embeddings included."""
    sc = compose_scenario(UNEVEN + ["model.tie_word_embeddings=true"])
    full = MoEModel(sc.model, "cpu", seed=sc.seed)
    assert full.lm_head_w is full.embed_w
    want = _session(full.new_cache, full.forward)
    group = tpm.TPGroup.start(sc, 2, torch.device("cpu"), None, 1)
    try:
        with torch.inference_mode():
            got = _session(group.new_cache, group.forward)
    finally:
        group.close()
    assert not mp.active_children()
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want] == [(2, 127), (2, 127), (3, 127),
                                                                                 (2, 127), (2, 127)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_worker_that_fails_to_start_is_reported_not_waited_for():
    """The worker fails while rank 0 is fine (torch refuses -1 threads, which only the worker sets):
    rank 0 says which rank died instead of waiting for it at the rendezvous."""
    sc = compose_scenario(UNEVEN)
    with pytest.raises(RuntimeError, match=r"^tensor-parallel rank 1 exited with status 1 before joining"):
        tpm.TPGroup.start(sc, 2, torch.device("cpu"), None, -1)
    assert not tpm.dist.is_initialized() and not mp.active_children()


def test_shard_slices_partition_the_split_weights():
    """Bytes: the ranks' expert slices hold every intermediate unit once (padding rows are zeros)."""
    sc = compose_scenario(UNEVEN)
    full = MoEModel(sc.model, "cpu", seed=sc.seed)
    shards = [tpm.shard_model(full, r, 2) for r in range(2)]
    key = (1, 3)
    gate, up = full.experts[key].gate_up.chunk(2)
    parts = [s.experts[key] for s in shards]
    assert all(tuple(w.gate_up.shape) == (34, 64) and tuple(w.down.shape) == (64, 17) for w in parts)
    got_gate = torch.cat([w.gate_up.chunk(2)[0] for w in parts])
    assert torch.equal(got_gate[:33], gate) and torch.count_nonzero(got_gate[33:]) == 0
    assert torch.equal(torch.cat([w.gate_up.chunk(2)[1] for w in parts])[:33], up)
    assert torch.equal(torch.cat([w.down for w in parts], dim=1)[:, :33], full.experts[key].down)
    assert shards[1].embed_w.shape == (64, 64) and torch.count_nonzero(shards[1].embed_w[63]) == 0


def test_what_tensor_parallelism_cannot_run_is_refused_in_one_line():
    sc = compose_scenario(UNEVEN + TP2)
    with pytest.raises(ConfigError, match=r"^hw\.tensor_parallel=2 cannot run free-running"):
        RealExecutor(sc, free_running=True)
    model = MoEModel(sc.model, "cpu", seed=sc.seed)
    with pytest.raises(ConfigError, match=r"^hw\.tensor_parallel=2: every rank builds its shard from the seed"):
        RealExecutor(sc, model=model)
    with pytest.raises(ConfigError, match=r"^hw\.tensor_parallel=2 runs rank r on cuda:r, so rank 0 needs cuda:0"):
        tpm.check_tensor_parallel(2, torch.device("cuda", 1), False)


def test_an_error_mid_pass_stops_the_workers_and_the_next_run_works():
    """Rank 0 fails inside a pass the worker is still in: run() raises that error (no hang, no
    stray process), and a second tensor-parallel run in the same process starts a fresh group."""
    sc = compose_scenario(UNEVEN + TP2 + ["workload.num_requests=2", "workload.prompt_len=6",
                                          "workload.output_len=3"])
    ex = RealExecutor(sc)
    routed, calls = ex._on_routed, []

    def fail_in_the_second_pass(*args):
        calls.append(args)
        if len(calls) == 4:   # 2 MoE layers per pass: the second layer of the second pass
            raise RuntimeError("injected")
        return routed(*args)

    ex._on_routed = fail_in_the_second_pass
    with pytest.raises(RuntimeError, match="injected"):
        ex.run()
    assert not tpm.dist.is_initialized() and not mp.active_children()
    res = RealExecutor(sc).run()
    assert res.summary["tensor_parallel"] == 2 and res.summary["decode_tokens"] == 2 * 2
    assert not mp.active_children()
