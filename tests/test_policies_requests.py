"""LRU over one global pool by hand; request arrivals and lengths."""

from __future__ import annotations

import numpy as np
import pytest

from sim.config import compose_scenario
from sim.memory import ExpertCache, MemoryBudget
from sim.policies.base import PolicyContext, PrefetchConfig
from sim.policies.prefetch import LRU
from workloads.requests import WorkloadConfig, arrival_times_s, build_requests


def _global_cache(slots: int, layers=(0, 1)) -> ExpertCache:
    budget = MemoryBudget(80e9, 0, 0, 0, 0, 1e9, "global", None, slots)
    return ExpertCache(budget, layers)


def _access(policy: LRU, cache: ExpertCache, layer: int, expert: int) -> tuple | None:
    """What the engine does for one access: tell the policy, load on a miss (evicting its victim)."""
    policy.on_routed(0, layer, [expert], None, cache)
    key = (layer, expert)
    evicted = None
    if key not in cache.resident:
        cache.pinned = {key}
        if cache.free_slots(layer) == 0:
            evicted = policy.victim(layer, expert, cache)
            cache.evict(evicted)
        cache.reserve(key)
        cache.land(key)
        policy.on_copy_done(layer, expert, cache)
        cache.pinned = set()
    return evicted


def test_global_lru_evicts_across_layers_in_hand_computed_order():
    model = compose_scenario([]).model
    cache = _global_cache(3)
    initial = ((0, 0), (1, 0), (0, 1))     # loaded in this order: (0,0) is least recent
    for key in initial:
        cache.place(key)
    lru = LRU(PrefetchConfig(cache_scope="global"))
    lru.reset(PolicyContext(model, "global", None, 3, initial))
    # recency (least recent first): (0,0) (1,0) (0,1)
    assert _access(lru, cache, 0, 0) is None      # hit -> (1,0) (0,1) (0,0)
    assert _access(lru, cache, 1, 5) == (1, 0)    # miss, evict (1,0) -> (0,1) (0,0) (1,5)
    assert _access(lru, cache, 0, 1) is None      # hit -> (0,0) (1,5) (0,1)
    assert _access(lru, cache, 1, 6) == (0, 0)    # a layer-1 miss evicts a layer-0 expert
    assert _access(lru, cache, 0, 0) == (1, 5)
    assert cache.resident == {(0, 1), (1, 6), (0, 0)}


def test_victim_is_never_an_expert_the_running_layer_needs():
    model = compose_scenario([]).model
    cache = _global_cache(2)
    for key in ((0, 0), (0, 1)):
        cache.place(key)
    lru = LRU(PrefetchConfig(cache_scope="global"))
    lru.reset(PolicyContext(model, "global", None, 2, ((0, 0), (0, 1))))
    cache.pinned = {(0, 0), (0, 1), (0, 2)}
    assert lru.victim(0, 2, cache) is None         # both residents are needed now: stage, do not cache
    cache.pinned = {(0, 0), (0, 2)}
    assert lru.victim(0, 2, cache) == (0, 1)


def test_poisson_arrivals_have_the_configured_rate():
    cfg = WorkloadConfig(arrival="poisson", arrival_rate_per_s=20.0)
    t = arrival_times_s(20000, cfg, np.random.default_rng(0))
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(1 / 20.0, rel=0.03)


def test_uniform_lengths_stay_in_range_and_routing_has_the_right_shape():
    sc = compose_scenario(["model=olmoe_1b_7b", "workload.num_requests=50", "workload.length_dist=uniform",
                           "workload.prompt_len=100", "workload.output_len=20", "workload.length_spread=0.5"])
    reqs = build_requests(sc.workload, sc.model, 0)
    prompts = np.array([r.prompt_len for r in reqs])
    outputs = np.array([r.output_len for r in reqs])
    assert prompts.min() >= 50 and prompts.max() <= 150 and len(set(prompts)) > 10
    assert outputs.min() >= 10 and outputs.max() <= 30
    for r in reqs:
        assert r.experts.shape == (r.prompt_len + r.output_len - 1, 16, 8)
        assert r.experts.min() >= 0 and r.experts.max() < 64


def test_poisson_workload_runs_with_idle_gaps():
    from sim.engine import simulate

    sc = compose_scenario(["model=olmoe_1b_7b", "hw=h100_sxm", "workload.arrival=poisson",
                           "workload.arrival_rate_per_s=0.5", "workload.num_requests=4", "workload.batch_size=4",
                           "workload.prompt_len=16", "workload.output_len=4", "sim.progress=false"])
    res = simulate(sc)
    # Requests arrive about 2 s apart on average and each is served in milliseconds, so the GPU
    # idles between them and nobody queues behind a long prefill.
    assert (res.requests.first_token_s >= res.requests.arrival_s).all()
    assert res.requests.ttft_s.max() < 0.1
    busy = res.steps.duration_s.sum()
    assert res.summary["simulated_time_s"] >= res.requests.arrival_s.max() > 10 * busy


def test_requests_are_served_in_the_order_given_when_they_arrive_together():
    from sim.schedulers import BatchScheduler
    from workloads.requests import Request

    reqs = [Request(rid, 0.0, 2, 2, np.zeros((3, 1, 1), dtype=np.int16)) for rid in (9, 2, 5)]
    sched = BatchScheduler(reqs, batch_size=1, max_prefill_tokens=8)
    order = []
    while not sched.done():
        p = sched.next_pass(0.0)
        if p.phase == "prefill":
            order.append(p.batch[0].req.request_id)
        sched.complete(p, 0.0)
    assert order == [9, 2, 5]  # a trace's file order, not sorted ids


def test_a_fruitless_victim_scan_is_remembered_until_a_copy_lands_or_the_pins_change():
    model = compose_scenario([]).model
    cache = _global_cache(3)
    for key in ((0, 0), (0, 1)):
        cache.place(key)
    cache.reserve((0, 2))                      # a copy in flight holds the third slot
    lru = LRU(PrefetchConfig(cache_scope="global"))
    lru.reset(PolicyContext(model, "global", None, 3, ((0, 0), (0, 1))))
    cache.pinned = [(0, 0), (0, 1), (0, 3)]
    calls = []
    real_can_evict = cache.can_evict
    cache.can_evict = lambda layer, e: calls.append((layer, e)) or real_can_evict(layer, e)
    assert lru.victim(0, 3, cache) is None and len(calls) == 2     # scanned both residents
    assert lru.victim(0, 4, cache) is None and len(calls) == 2     # remembered: no rescan
    cache.land((0, 2))                                             # the copy lands ...
    lru.on_copy_done(0, 2, cache)
    assert lru.victim(0, 4, cache) == (0, 2)                       # ... and is evictable at once
    cache.evict((0, 2))
    assert lru.victim(0, 4, cache) is None                         # pins unchanged: nothing else
    cache.pinned = [(0, 1)]                                         # the next layer needs less
    assert lru.victim(0, 4, cache) == (0, 0)


def test_synthetic_predictions_are_built_only_when_read_and_the_same_in_any_order():
    from workloads.synthetic import lookahead_predictions

    sc = compose_scenario(["model=olmoe_1b_7b", "workload.num_requests=4", "workload.prompt_len=6",
                           "workload.output_len=5"])
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    assert all(r.has_predictions and r.predicted is None for r in reqs)   # nothing built yet
    late_first = reqs[3].predictions()                                    # read the last one first
    assert all(r.predicted is not None for r in reqs)                     # one stream: all built
    rng = np.random.default_rng([sc.seed, 0x10A4])
    eager = [lookahead_predictions(r.experts, 0.85, sc.model.num_experts, rng) for r in reqs]
    assert np.array_equal(late_first, eager[3])
    assert all(np.array_equal(r.predictions(), p) for r, p in zip(reqs, eager))
    from sim.engine import simulate

    lru_reqs = build_requests(sc.workload, sc.model, sc.seed)
    simulate(sc, lru_reqs, progress=False)                                # LRU never reads them
    assert all(r.predicted is None for r in lru_reqs)
