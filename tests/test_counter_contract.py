"""The counter contract: the simulator and the real executor count the same things the same way.

Every registered prefetch policy (read from the ``sim.policies.base`` registry, so a policy
registered later is covered without editing this file; it needs its
``conf/policy/prefetch/NAME.yaml``, as every policy does), with and without ``static`` speculation,
runs through both engines on a tiny forced-routing scenario (mini_mixtral's and mini_qwen's
layouts at toy width, 3 requests of a few tokens, 3 expert slots per layer). Per pass, hits,
misses, demand loads, late and useful prefetches, prefetches, host runs, demand / prefetch /
wasted / host-to-device bytes and the speculation columns agree exactly, and on both engines:

* precision and recall in [0, 1];
* ``prefetch_bytes == prefetches x expert bytes`` and ``demand_bytes == demand_loads x expert bytes``;
* ``h2d_bytes == demand + prefetch + activation bytes``, the activation bytes counted independently
  here (a spy on the policy's ``on_miss`` answers: each host-run expert's output, tokens x hidden x
  bytes per element, comes back to the device);
* ``misses == demand_loads + late_prefetches + host_runs``;
* time: in the simulator the parts of a pass (attention, expert, other compute, copy stall, host
  stall, draft, reject) add up to its duration. In the real executor they cannot (the rest is
  Python and policy overhead, ``summary["overhead_s"]``); what holds by construction on CPU is that
  every part is timed around its own stretch of the pass with ``perf_counter``, the stretches never
  overlap and all lie inside the stretch ``duration_s`` is timed around, so the parts add up to at
  most ``duration_s`` (up to float rounding) and ``overhead_s >= 0``. Host-run experts run on the
  computing thread (``hw=this_cpu``: the host is the device), so in both engines their time is the
  stream's ``host_stall_s`` and equals ``host_expert_s`` (exactly in the executor, which books one
  measurement twice); ``draft_s``/``reject_s`` are 0 without speculation, ``host_expert_s`` is 0
  without host runs.

The invariants are checked by ``check_invariants`` (shared with the property test of the simulator,
``tests/test_counter_properties.py``).

Determinism. With its copy thread, the real executor's cache decisions can depend on timing: a
prefetch still copying when its layer routes is a late prefetch instead of a hit, and copies that
land in another order leave another LRU recency order. So the real engine runs here with
``synchronous_copies=True``: copies are carried out on the main thread at the next point the
runtime lands copies, in the copy engine's queue order (priority, then FIFO), i.e. every copy has
landed by the next policy decision, in the simulator's order. The simulated link
(``hw=this_cpu``, no cap, roofline) moves an expert in nanoseconds against microseconds of compute,
so there too every copy lands before the next decision. Both engines then see no late prefetch
(asserted as a precondition); the late-prefetch invariants are exercised on the simulator with
slow links by ``tests/test_counter_properties.py``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from real_backend.executor import RealExecutor, build_model_and_store  # noqa: E402
from sim.config import compose_scenario  # noqa: E402
from sim.engine import simulate  # noqa: E402
from test_counter_properties import POLICIES, TIME_PARTS, Spy, check_invariants, check_sim_time  # noqa: E402
from workloads.requests import build_requests  # noqa: E402

TOY = ["hw=this_cpu", "hw.cost_model=roofline", "model.hidden_size=64", "model.num_attention_heads=2",
       "model.head_dim=32", "model.vocab_size=128", "model.num_layers=3", "model.expert_intermediate_size=32",
       "workload.num_requests=3", "workload.prompt_len=6", "workload.output_len=5", "workload.batch_size=2",
       "policy.prefetch.capacity_per_layer=3", "sim.progress=false"]
MODELS = {
    "mini_mixtral": ["model=mini_mixtral", "model.num_kv_heads=1"],                       # 8 experts, top-2
    "mini_qwen": ["model=mini_qwen", "model.num_kv_heads=2", "model.num_experts=8",      # top-4, shared expert
                  "model.shared_expert_intermediate_size=64"],
}
SPEC = {"none": [], "static": ["policy/speculation=static", "policy.speculation.drafter=ngram",
                               "policy.speculation.k=2"]}
# Policy knobs that make the tiny scenario exercise the policy's path (hw=this_cpu's roofline
# crossover is 1 token: fiddler would never run an expert on the host).
EXTRA = {"fiddler": ["policy.prefetch.crossover_tokens=2"]}

COUNT_COLUMNS = ["step", "phase", "batch_size", "tokens", "hits", "misses", "demand_loads", "late_prefetches",
                 "host_runs", "prefetches", "useful_prefetches", "demand_bytes", "prefetch_bytes",
                 "wasted_prefetch_bytes", "h2d_bytes", "active_experts_per_layer", "spec_k", "drafting_requests",
                 "draft_tokens", "accepted_tokens", "committed_tokens"]
SUMMARY_KEYS = ["prefetches", "prefetch_precision", "prefetch_recall", "expert_hit_rate", "h2d_bytes",
                "demand_bytes", "prefetch_bytes", "wasted_prefetch_bytes", "host_runs", "decode_tokens", "iterations"]


def check_real_time(res, speculating: bool) -> None:
    """What holds by construction in the real executor on CPU (module docstring)."""
    st = res.steps
    # Each part is a sum of perf_counter differences, each off by at most one ulp of the clock's
    # value; a tiny pass has well under a thousand of them.
    slack = 1000 * math.ulp(time.perf_counter())
    assert (st[TIME_PARTS].sum(axis=1) <= st["duration_s"] + slack).all()
    assert res.summary["overhead_s"] >= -slack * len(st)
    assert (st["host_stall_s"] == st["host_expert_s"]).all()   # host-run experts ran inline: the device's time
    if not speculating:
        assert (st["draft_s"] == 0).all() and (st["reject_s"] == 0).all()


@pytest.fixture(scope="module")
def models():
    """Model and host store per layout, built once (random weights; reusable across runs)."""
    return {name: build_model_and_store(compose_scenario(TOY + ov), "cpu") for name, ov in MODELS.items()}


@pytest.mark.parametrize("spec", list(SPEC))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_both_engines_count_alike(models, model_name, policy, spec):
    sc = compose_scenario(TOY + MODELS[model_name] + [f"policy/prefetch={policy}"] + EXTRA.get(policy, [])
                          + SPEC[spec])
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    model, store = models[model_name]
    sim_spy, real_spy = Spy.for_scenario(sc), Spy.for_scenario(sc)
    sim = simulate(sc, reqs, policy=sim_spy.policy)
    real = RealExecutor(sc, reqs, model=model, store=store, policy=real_spy.policy, synchronous_copies=True).run()

    expert_bytes = sim.memory.expert_slot_bytes
    assert expert_bytes == sc.model.expert_bytes == store.expert_bytes   # what both engines count per copy
    # Deterministic copies (module docstring): nothing is still in flight when its layer routes.
    assert sim.steps["late_prefetches"].sum() == 0 and real.steps["late_prefetches"].sum() == 0

    check_invariants(sim, expert_bytes, sim_spy.activation_bytes(sim.steps["step"], sc.model), "sim")
    check_invariants(real, expert_bytes, real_spy.activation_bytes(real.steps["step"], sc.model), "real")
    check_sim_time(sim)
    check_real_time(real, spec != "none")
    # hw=this_cpu: the host is the device, so host-run experts are the stream's own time in both
    np.testing.assert_allclose(sim.steps["host_stall_s"], sim.steps["host_expert_s"], rtol=1e-9, atol=0)

    # The contract: per pass, every counter agrees exactly (integers, and bytes that are integer
    # multiples of the expert's or a token's size).
    a, b = sim.steps[COUNT_COLUMNS].reset_index(drop=True), real.steps[COUNT_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    for k in SUMMARY_KEYS:
        assert sim.summary[k] == real.summary[k], k
    assert sim_spy.host_tokens == real_spy.host_tokens
    assert sim_spy.step_begin_prefetches == real_spy.step_begin_prefetches
    if sim_spy.policy.needs_future:   # both got the same recorded future, and it was exact
        assert sim.summary["future_passes_overridden"] == real.summary["future_passes_overridden"] == 0

    # The scenario exercises what the policy does: misses always; host runs for fiddler; for the
    # oracle, prefetches planned at step begin (the ones the simulator used to leave out of
    # ``prefetches`` while counting their bytes and uses).
    assert sim.steps["misses"].sum() > 0
    if policy == "fiddler":
        assert sim.summary["host_runs"] > 0
    if policy == "oracle":
        assert sim_spy.step_begin_prefetches > 0 and sim.summary["prefetches"] > 0
    if spec != "none":
        assert sim.steps["draft_tokens"].sum() > 0


def test_synchronous_copies_run_in_queue_order_when_landed():
    """What makes the real engine deterministic here: with ``synchronous=True`` no worker thread
    exists, a submitted copy waits in the queue, and the next ``take_completed`` carries out every
    queued copy on the caller's thread in the simulator's copy-engine order (priority, then FIFO)."""
    from real_backend.offload import CopyEngine, CopyJob

    eng = CopyEngine("cpu", synchronous=True)
    try:
        assert eng.sched == "inline" and eng._thread is None
        srcs = [torch.full((64,), i + 1, dtype=torch.uint8) for i in range(4)]
        dsts = [torch.zeros(64, dtype=torch.uint8) for _ in range(4)]
        jobs = [eng.submit(CopyJob((0, i), "prefetch", prio, 64, src=srcs[i], dst=dsts[i]))
                for i, prio in enumerate([3, 0, 1, 0])]
        assert not any(j.done.is_set() for j in jobs) and eng.outstanding == 4
        assert all(int(d.sum()) == 0 for d in dsts)
        done = eng.take_completed()
        assert [j.key[1] for j in done] == [1, 3, 2, 0]
        assert all(j.done.is_set() and j.error is None for j in jobs) and eng.outstanding == 0
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
        assert eng.take_completed() == [] and eng.wait_idle()
    finally:
        eng.close()


# Tensor parallelism: the same tiny scenario split two ways. The real executor runs two processes
# (gloo); rank 0 carries out the offload protocol for its half of every expert, so both engines
# count copies of the shard's expert bytes (half of the full expert's).
TP = ["hw.num_gpus=2", "hw.tensor_parallel=2", "+hw/link@hw.gpu_link=nvlink4"]
TP_CASES = {
    "lru": ["policy/prefetch=lru"],
    "oracle": ["policy/prefetch=oracle"],
    "fiddler": ["policy/prefetch=fiddler"] + EXTRA["fiddler"],
    "lookahead+static": ["policy/prefetch=lookahead"] + SPEC["static"],
}


@pytest.mark.parametrize("case", list(TP_CASES))
def test_both_engines_count_alike_under_tensor_parallelism(case):
    sc = compose_scenario(TOY + MODELS["mini_qwen"] + TP + TP_CASES[case])
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    sim_spy, real_spy = Spy.for_scenario(sc), Spy.for_scenario(sc)
    sim = simulate(sc, reqs, policy=sim_spy.policy)
    ex = RealExecutor(sc, reqs, policy=real_spy.policy, synchronous_copies=True)
    real = ex.run()

    shard_bytes = sc.model.tensor_shard(2).expert_bytes
    assert sim.memory.expert_slot_bytes == shard_bytes == ex.store.expert_bytes == sc.model.expert_bytes / 2
    assert sim.summary["tensor_parallel"] == real.summary["tensor_parallel"] == 2
    assert sim.steps["late_prefetches"].sum() == 0 and real.steps["late_prefetches"].sum() == 0
    check_invariants(sim, shard_bytes, sim_spy.activation_bytes(sim.steps["step"], sc.model), "sim")
    check_invariants(real, shard_bytes, real_spy.activation_bytes(real.steps["step"], sc.model), "real")
    check_sim_time(sim)
    check_real_time(real, "static" in case)
    a, b = sim.steps[COUNT_COLUMNS].reset_index(drop=True), real.steps[COUNT_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    for k in SUMMARY_KEYS:
        assert sim.summary[k] == real.summary[k], k
    assert sim_spy.host_tokens == real_spy.host_tokens
    assert sim.steps["misses"].sum() > 0 and sim.summary["demand_bytes"] > 0
    if case == "fiddler":
        assert sim.summary["host_runs"] > 0
    if case == "oracle":
        assert sim_spy.step_begin_prefetches > 0
