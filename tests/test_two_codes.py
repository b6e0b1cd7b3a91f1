"""Two codes, one answer: the engine's cache against ``moesim-trace stats``'s replay of the same trace.

``workloads.trace_stats.hit_rates`` replays a trace pass by pass in plain Python; the SimPy engine
runs the same trace through its copy engine, slot accounting and the LRU/LFU policy objects. At
batch 1 with an empty cache at the start they must count exactly the same hits, and the oracle
(Belady + perfect prefetch) must do at least as well as Belady's MIN alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.config import compose_scenario
from sim.engine import simulate
from sim.trace_cli import main as trace_cli
from workloads.requests import build_requests
from workloads.trace import TraceMeta, load_trace_requests, requests_to_frame, write_trace
from workloads.trace_stats import hit_rates

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEEPSEEK = SHARED / "moelens" / "DeepSeek" / "deepseek_routing_trace"


def _engine_hits(model: str, path: Path, policy: str, capacity: int) -> tuple[int, int]:
    sc = compose_scenario([f"model={model}", "workload=trace", f"workload.path={path}", "workload.batch_size=1",
                           f"policy/prefetch={policy}", f"policy.prefetch.capacity_per_layer={capacity}",
                           "sim.initial_residency=empty", "sim.progress=false"])
    res = simulate(sc)
    return int(res.steps.hits.sum()), int(res.steps.hits.sum() + res.steps.misses.sum())


def _check(model: str, path: Path, capacities: list[int]) -> None:
    spec = compose_scenario([f"model={model}"]).model
    requests = load_trace_requests(path, spec)
    stats = hit_rates(requests, spec.num_experts, capacities=capacities)
    for policy in ("lru", "lfu"):
        for i, c in enumerate(capacities):
            hits, accesses = _engine_hits(model, path, policy, c)
            assert accesses == int(stats.accesses.sum())
            assert hits == int(stats.hits[policy][i].sum()), (policy, c)
    for i, c in enumerate(capacities):
        hits, accesses = _engine_hits(model, path, "oracle", c)
        assert hits >= int(stats.hits["min"][i].sum()), c


@pytest.fixture(scope="module")
def deepseek_trace(tmp_path_factory) -> Path:
    """The MoELens DeepSeek trace imported once (``moesim-trace import``) for this module's tests."""
    if not DEEPSEEK.is_dir():
        pytest.skip("../shared/traces is not present")
    dest = tmp_path_factory.mktemp("deepseek") / "deepseek.parquet"
    assert trace_cli(["import", str(DEEPSEEK), str(dest), "--model", "deepseek_moe_16b"]) == 0
    return dest


def test_deepseek_trace_engine_and_stats_agree(deepseek_trace):
    _check("deepseek_moe_16b", deepseek_trace, [2, 6, 12, 24, 40])


def test_synthetic_decode_trace_engine_and_stats_agree(tmp_path):
    # 4 requests x (one 6-token prefill + 15 decode passes) at 16 MoE layers of 64 experts, top-8:
    # every capacity below is filled within a few passes and then evicts on most of them.
    sc = compose_scenario(["model=olmoe_1b_7b", "workload.num_requests=4", "workload.prompt_len=6",
                           "workload.output_len=16"])
    reqs = build_requests(sc.workload, sc.model, 11)
    path = tmp_path / "olmoe.parquet"
    write_trace(path, requests_to_frame(reqs, sc.model), TraceMeta.for_model(sc.model, "test"))
    _check("olmoe_1b_7b", path, [1, 4, 8, 16, 30])


@pytest.mark.parametrize("capacity", [6, 24])
def test_no_policy_beats_the_oracle_on_the_deepseek_trace(deepseek_trace, capacity):
    dest = deepseek_trace
    results = {}
    # lookahead needs predicted_experts, which MoELens did not record.
    for policy in ("lru", "lfu", "speculating", "transition", "moe_infinity", "pregated", "fiddler", "oracle"):
        sc = compose_scenario(["model=deepseek_moe_16b", "workload=trace", f"workload.path={dest}",
                               f"policy/prefetch={policy}", f"policy.prefetch.capacity_per_layer={capacity}",
                               "sim.progress=false"])
        results[policy] = simulate(sc).summary
    oracle = results.pop("oracle")
    for name, s in results.items():
        assert s["expert_hit_rate"] <= oracle["expert_hit_rate"], name
        # The trace is prefill only: compare the time to serve it all. Fiddler moves work to the
        # host CPU instead of caching, so it is not bounded by a cache oracle.
        if name != "fiddler":
            assert s["simulated_time_s"] >= oracle["simulated_time_s"], name
