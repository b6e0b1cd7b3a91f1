"""Trace statistics (workloads/trace_stats.py, ``moesim-trace stats``): expert-cache replay worked
out by hand, the fast replay against a slow literal reading of the rules on random traces, MIN as
the upper bound of LRU and LFU, known answers for uniform routing (MoESD N(t), reuse K/E), brute
force for the other statistics, the real DeepSeek trace, scale, and the command line."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.trace_cli import main
from workloads.model import expected_active_experts
from workloads.synthetic import RoutingConfig, generate_routing
from workloads.trace import RoutedRequest, TraceMeta, requests_to_frame, write_trace
from workloads.trace_stats import (Routed, affinity, distinct_experts, hit_rates, model_for_trace,
                                   passes_per_layer, popularity, reuse, trace_statistics)
from workloads.validation import ConfigError

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEEPSEEK_DIR = TRACES / "moelens" / "DeepSeek" / "deepseek_routing_trace"


def req(rows, prompt_len=1):
    """A one-layer request from a list of token rows (each the top-k ids of one position)."""
    return Routed(np.asarray(rows, dtype=np.int16)[:, None, :], prompt_len)


def hits_of(requests, E, c):
    h = hit_rates(requests, E, [c])
    return {p: int(h.hits[p].sum()) for p in ("lru", "lfu", "min")}, int(h.accesses.sum())


# ------------------------------------------------------------------ replay worked out by hand

def test_policies_by_hand_single_token_passes():
    # E=4, K=1, one layer, c=2. One request, prompt_len=1, so every position is its own pass:
    #   pass:    0  1  2  3  4  5  6  7
    #   expert:  0  1  0  2  1  0  3  0
    # LRU: p0 miss [0]; p1 miss [0,1]; p2 HIT 0 -> [1,0]; p3 miss 2 evicts 1 -> [0,2];
    #      p4 miss 1 evicts 0 -> [2,1]; p5 miss 0 evicts 2 -> [1,0]; p6 miss 3 evicts 1 -> [0,3];
    #      p7 HIT 0.                                                            -> 2 hits
    # LFU (frequency counts the current pass): p0 0:f1; p1 1:f1; p2 HIT 0 (f2);
    #      p3 2 (f1) evicts 1 (f1 < 0's f2) -> {0,2}; p4 1 (f2) evicts 2 (f1) -> {0,1};
    #      p5 HIT 0 (f3); p6 3 evicts 1 (f2 < f3) -> {0,3}; p7 HIT 0.            -> 3 hits
    # MIN (next uses: 0 -> p2, p5, p7; 1 -> p4; 2, 3 never again after p3, p6):
    #      p0, p1 fill {0(next p2), 1(next p4)}; p2 HIT 0 (next p5);
    #      p3: 2 is never needed again, the farthest resident 0 is needed at p5: BYPASS;
    #      p4 HIT 1 (next never); p5 HIT 0 (next p7);
    #      p6: 3 (never) vs victim 1 (never): not strictly later, so 1 is evicted -> {0,3};
    #      p7 HIT 0.                                                            -> 4 hits
    trace = [req([[0], [1], [0], [2], [1], [0], [3], [0]])]
    hits, accesses = hits_of(trace, 4, 2)
    assert accesses == 8
    assert hits == {"lru": 2, "lfu": 3, "min": 4}


def test_policies_by_hand_prefill_no_evictable_resident_and_bypass():
    # E=6, K=2, one layer, c=2; the cache is kept across requests.
    # request A, prompt_len=2: positions [1,0] [3,2] (prefill) then [2,3], [0,2] (decode)
    # request B, prompt_len=1: position [3,0]
    # passes: P0 = {0,1,2,3} (A's prefill), P1 = {2,3}, P2 = {0,2}, P3 = {0,3} (B's prefill)
    # LRU: P0: 0, 1 fill the free slots; 2 and 3 find only residents this pass needs (0, 1):
    #          NOT cached (staging) -> cache [0,1], 0 hits
    #      P1: 2 evicts 0, 3 evicts 1 -> [2,3], 0 hits
    #      P2: HIT 2 -> [3,2]; 0 evicts 3 -> [2,0], 1 hit
    #      P3: HIT 0 -> [2,0]; 3 evicts 2 -> [0,3], 1 hit                    -> 2 hits of 10
    # LFU: P0 as LRU (0, 1 cached with frequency 1); P1: 2 (f2) evicts 0 (f1, least recent of
    #      the f1 tie), 3 evicts 1; P2: HIT 2, 0 evicts 3; P3: HIT 0, 3 evicts 2  -> 2 hits
    # MIN (next uses: 0: P0->P2->P3; 1: P0->never; 2: P0->P1->P2->never; 3: P0->P1->P3->never):
    #      P0: 0, 1 fill; 2, 3 not cached (no evictable resident) -> {0(P2), 1(never)}
    #      P1: 2 (next P2) evicts 1 (never); 3 (next P3): the only evictable resident is 0
    #          (next P2) and P3 is later than P2: BYPASS -> {0(P2), 2(P2)}, 0 hits
    #      P2: HIT 0, HIT 2 -> 2 hits; P3: HIT 0; 3 (never) vs 2 (never): evict 2 -> 1 hit
    #                                                                            -> 3 hits
    trace = [req([[1, 0], [3, 2], [2, 3], [0, 2]], prompt_len=2), req([[3, 0]], prompt_len=1)]
    assert passes_per_layer(trace, 6) == [[[0, 1, 2, 3], [2, 3], [0, 2], [0, 3]]]
    hits, accesses = hits_of(trace, 6, 2)
    assert accesses == 10
    assert hits == {"lru": 2, "lfu": 2, "min": 3}
    # with 4 slots nothing is ever evicted: only the 4 cold misses
    hits4, _ = hits_of(trace, 6, 4)
    assert hits4 == {"lru": 6, "lfu": 6, "min": 6}


def test_lfu_keeps_frequent_expert_lru_does_not():
    # E=3, K=1, c=2, passes 0 0 0 1 2 0: LRU: p1, p2 HIT; p3 1 fills; p4 2 evicts 0 (LRU) -> p5 miss -> 2 hits.
    # LFU: 0 has frequency 3; p4 2 evicts 1 (f1) -> p5 HIT 0 -> 3 hits. MIN: 2 never again,
    # victim 1 (never) -> evict 1 (not strictly later) -> p5 HIT -> 3 hits.
    hits, _ = hits_of([req([[0], [0], [0], [1], [2], [0]])], 3, 2)
    assert hits == {"lru": 2, "lfu": 3, "min": 3}


def test_layers_have_independent_caches():
    # two layers, E=4, K=1, c=1: layer 0 sees 0 0 0 (2 hits whatever the policy); layer 1 sees
    # 1 2 1: LRU and LFU evict 1 for 2 (0 hits), MIN bypasses 2 (never needed again) and hits 1
    ex = np.array([[[0], [1]], [[0], [2]], [[0], [1]]], dtype=np.int16)
    h = hit_rates([Routed(ex, 1)], 4, [1])
    assert h.hits["lru"][0].tolist() == h.hits["lfu"][0].tolist() == [2, 0]
    assert h.hits["min"][0].tolist() == [2, 1]
    assert h.accesses.tolist() == [3, 3] and h.cold.tolist() == [1, 2]


# ------------------------------------------------------------------ a literal reading of the rules

def reference_hits(passes, cap, policy):
    """Slow, literal replay of one layer (the rules in hit_rates' docstring)."""
    resident: list[int] = []
    recency: dict[int, int] = {}
    freq: dict[int, int] = {}
    clock = hits = 0

    def next_access(e, p):
        return next((q for q in range(p + 1, len(passes)) if e in passes[q]), float("inf"))

    for p, S in enumerate(passes):
        for e in S:
            freq[e] = freq.get(e, 0) + 1
        present = [e for e in S if e in resident]
        hits += len(present)
        for e in present:
            clock += 1
            recency[e] = clock
        for e in S:
            if e in present:
                continue
            if len(resident) < cap:
                resident.append(e)
            else:
                candidates = [r for r in resident if r not in S]
                if not candidates:
                    continue  # streamed through staging, not cached
                if policy == "lru":
                    victim = min(candidates, key=lambda r: recency[r])
                elif policy == "lfu":
                    victim = min(candidates, key=lambda r: (freq[r], recency[r]))
                else:
                    victim = max(candidates, key=lambda r: (next_access(r, p), -r))
                    if next_access(e, p) > next_access(victim, p):
                        continue  # bypass
                resident.remove(victim)
                resident.append(e)
            clock += 1
            recency[e] = clock
    return hits


@st.composite
def random_traces(draw):
    E = draw(st.integers(2, 7))
    K = draw(st.integers(1, min(3, E)))
    M = draw(st.integers(1, 2))
    hot = draw(st.integers(K, E))  # experts drawn from a smaller hot set make repeats likely
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    reqs = []
    for _ in range(draw(st.integers(1, 4))):
        T = draw(st.integers(1, 7))
        P = draw(st.integers(1, T))
        ex = np.stack([[rng.permutation(hot if rng.random() < 0.7 else E)[:K] for _ in range(M)]
                       for _ in range(T)]).astype(np.int16)
        reqs.append(Routed(ex, P))
    return E, reqs


@settings(max_examples=150, deadline=None)
@given(random_traces())
def test_fast_replay_matches_literal_rules(case):
    E, reqs = case
    h = hit_rates(reqs, E)
    layers = passes_per_layer(reqs, E)
    for i, c in enumerate(h.capacities):
        for m, passes in enumerate(layers):
            for p in ("lru", "lfu", "min"):
                assert h.hits[p][i, m] == reference_hits(passes, int(c), p), (p, int(c), m)


def assert_min_bounds(reqs, E):
    """MIN >= LRU and MIN >= LFU on every layer at every capacity that holds the largest pass."""
    h = hit_rates(reqs, E)
    for m, passes in enumerate(passes_per_layer(reqs, E)):
        largest = max(len(S) for S in passes)
        for i, c in enumerate(h.capacities):
            if c >= largest:
                assert h.hits["min"][i, m] >= h.hits["lru"][i, m], (int(c), m)
                assert h.hits["min"][i, m] >= h.hits["lfu"][i, m], (int(c), m)
    return h


@settings(max_examples=300, deadline=None)
@given(random_traces())
def test_min_is_an_upper_bound_when_every_pass_fits(case):
    # Belady's farthest-next-use rule is optimal when every pass's experts fit in the cache.
    # (When a pass needs more experts than there are slots, the staging rule and the in-order
    # greedy choices can make MIN lose a hit: see the next test.)
    E, reqs = case
    assert_min_bounds(reqs, E)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 8))
def test_min_is_an_upper_bound_for_single_expert_decode(seed, E):
    # top-1 decode passes: classic demand paging with bypass, where MIN is optimal at every c
    rng = np.random.default_rng(seed)
    reqs = [Routed(rng.integers(0, E, size=(int(rng.integers(1, 15)), 2, 1)).astype(np.int16), 1)
            for _ in range(3)]
    h = hit_rates(reqs, E)
    for p in ("lru", "lfu"):
        assert (h.hits["min"] >= h.hits[p]).all()


def test_min_can_lose_when_a_pass_overflows_the_cache():
    # E=6, K=2, c=3; passes {3,5} {0,3} {3,4} {0,1,2,4,5} {1,2}
    # (requests: [3,5] | [3,0] then [3,4] | prompt [0,2] [1,2] [4,5] then [2,1]).
    # LRU: P0 [3,5]; P1 HIT 3, 0 fills -> [5,3,0]; P2 HIT 3, 4 evicts 5 -> [0,3,4];
    #      P3 HIT 0, 4 -> [3,0,4]; 1 evicts 3; 2 and 5 find only needed residents: not cached
    #      -> [0,4,1]; P4 HIT 1.                                           -> 1+1+2+1 = 5 hits
    # MIN: P0 {3(P1), 5(P3)}; P1 HIT 3, 0 fills {0(P3), 3(P2), 5(P3)}; P2 HIT 3 (now never
    #      needed), 4 (P3) vs victim 0 (P3, tie -> lowest id): evict 0 -> {3, 4, 5};
    #      P3 HIT 4, 5; 0 (never again) vs 3 (never again): not strictly later, evict 3 and
    #      cache 0; 1 and 2 find no evictable resident: not cached; P4 misses 1, 2. -> 4 hits
    # The greedy rule caches 0 (never needed again) in the one free-able slot that 1 needed.
    reqs = [req([[3, 5]]), req([[3, 0], [3, 4]]), req([[0, 2], [1, 2], [4, 5], [2, 1]], prompt_len=3)]
    hits, accesses = hits_of(reqs, 6, 3)
    assert accesses == 13 and hits == {"lru": 5, "lfu": 5, "min": 4}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(8, 2), (16, 4), (64, 6)]))
def test_min_bounds_lru_and_lfu_on_generated_traces(seed, shape):
    E, K = shape
    model = model_for_trace("t", E, K, 3, range(3))
    rng = np.random.default_rng(seed)
    routing = generate_routing(model, RoutingConfig("realistic", 1.5, None, 1.0),
                               rng.integers(2, 12, size=5).tolist(), rng)
    reqs = [Routed(x, int(rng.integers(1, x.shape[0] + 1))) for x in routing]
    assert_min_bounds(reqs, E)


def test_full_capacity_only_cold_misses():
    model = model_for_trace("t", 16, 2, 4, range(4))
    routing = generate_routing(model, RoutingConfig(), [20, 5, 30], np.random.default_rng(1))
    reqs = [Routed(x, p) for x, p in zip(routing, [7, 5, 1])]
    h = hit_rates(reqs, 16, [16])
    distinct = np.array([[len(np.unique(np.concatenate([x[:, m].ravel() for x in routing])))
                          for m in range(4)]])
    for p in ("lru", "lfu", "min"):
        misses = h.accesses - h.hits[p][0]
        assert (misses == distinct[0]).all() and (h.cold == distinct[0]).all()
        # after the cold misses every access hits
        assert h.hits[p][0].sum() / (h.accesses.sum() - h.cold.sum()) == 1.0


# ------------------------------------------------------------------ the other statistics

def uniform_trace(E=64, K=6, M=4, requests=16, tokens=256, seed=3):
    model = model_for_trace("u", E, K, M, range(M))
    routing = generate_routing(model, RoutingConfig("uniform"), [tokens] * requests,
                               np.random.default_rng(seed))
    return [Routed(x, 1) for x in routing]


@pytest.fixture(scope="module")
def uniform():
    return uniform_trace()


def test_uniform_distinct_experts_follow_moesd(uniform):
    # 16 requests x 256 tokens x 4 layers: the mean over ~16k windows (or the exact expectation
    # over the pool) has a relative error far below 1%; 2% is the stated tolerance
    ts = [1, 2, 3, 4, 8, 16, 32, 64]
    d = distinct_experts(uniform, 64, ts)
    for i, t in enumerate(ts):
        n = expected_active_experts(t, 64, 6)
        assert d.moesd[i] == pytest.approx(n)
        assert d.consecutive[i] == pytest.approx(n, rel=0.02), t
        assert d.random[i] == pytest.approx(n, rel=0.02), t


def test_uniform_reuse_is_chance_and_affinity_has_no_excess(uniform):
    r = reuse(uniform, 64)
    assert r.chance == 6 / 64 and r.pairs == 16 * 255
    # binomial standard error of the pooled value: sqrt(p(1-p) / (pairs*K*M)) ~ 0.0009
    assert r.overall == pytest.approx(6 / 64, abs=0.004)
    assert np.allclose(r.per_layer, 6 / 64, atol=0.008)
    a = affinity(uniform, 64)
    # independent layers: the top-successor probability is its shifted-token baseline
    assert abs(a.excess) < 0.01 and abs(a.lift - 1) < 0.03


def test_statistics_by_brute_force():
    rng = np.random.default_rng(5)
    E, K, M = 6, 2, 3
    reqs = []
    for T, P in [(5, 2), (1, 1), (4, 4)]:
        ex = np.stack([[rng.permutation(E)[:K] for _ in range(M)] for _ in range(T)]).astype(np.int16)
        reqs.append(Routed(ex, P))
    X = np.concatenate([r.experts for r in reqs])
    n = X.shape[0]
    # popularity
    loads = np.array([[np.count_nonzero(X[:, m] == e) for e in range(E)] for m in range(M)])
    assert np.allclose(popularity(reqs, E).per_layer, loads.max(axis=1) / (n * K / E))
    # reuse: consecutive positions inside a request only
    inter = [len(set(r.experts[t, m]) & set(r.experts[t - 1, m]))
             for r in reqs for t in range(1, r.experts.shape[0]) for m in range(M)]
    assert reuse(reqs, E).overall == pytest.approx(sum(inter) / (len(inter) * K))
    # affinity: top-successor counts
    top = 0
    for m in range(M - 1):
        c = np.zeros((E, E))
        for x in range(n):
            for e in X[x, m]:
                for f in X[x, m + 1]:
                    c[e, f] += 1
        top += c.max(axis=1).sum()
    assert affinity(reqs, E).overall == pytest.approx(top / (n * K * (M - 1)))
    # distinct experts: windows inside requests, and every t-subset of the pool
    for t in (1, 2, 3, 4, 5):
        wins = [len(set(r.experts[s:s + t, m].ravel())) for r in reqs
                for s in range(r.experts.shape[0] - t + 1) for m in range(M)]
        subsets = [len(set(X[list(idx), m].ravel()))
                   for idx in itertools.combinations(range(n), t) for m in range(M)]
        d = distinct_experts(reqs, E, [t])
        if wins:
            assert d.consecutive[0] == pytest.approx(np.mean(wins)) and d.windows[0] * M == len(wins)
        else:
            assert np.isnan(d.consecutive[0])
        assert d.random[0] == pytest.approx(np.mean(subsets))


def test_affinity_by_hand():
    # E=4, K=1, two layers; tokens (layer 0 -> layer 1): 0->1, 0->1, 1->2, 2->3, 0->2.
    # successors: 0 -> {1: 2, 2: 1}, 1 -> {2: 1}, 2 -> {3: 1}; top counts 2 + 1 + 1 = 4 of 5 = 0.8
    ex = np.array([[[0], [1]], [[0], [1]], [[1], [2]], [[2], [3]], [[0], [2]]], dtype=np.int16)
    reqs = [Routed(ex[i:i + 1], 1) for i in range(5)]  # one-token requests
    a = affinity(reqs, 4, shifts=[1])
    # shift 1 pairs token x's layer 0 with token x+1's layer 1: 0->1, 0->2, 1->3, 2->2, 0->1
    # -> 0: {1: 2, 2: 1}, 1: {3: 1}, 2: {2: 1}: 4 of 5 again
    assert a.overall == pytest.approx(0.8) and a.baseline == pytest.approx(0.8)
    assert popularity(reqs, 4).per_layer.tolist() == [3 / (5 / 4), 2 / (5 / 4)]


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError, match="expert ids"):
        hit_rates([req([[5]])], 4)
    with pytest.raises(ConfigError, match="capacities"):
        hit_rates([req([[1]])], 4, [0])
    with pytest.raises(ConfigError, match="prompt_len"):
        reuse([Routed(np.zeros((2, 1, 1), np.int16), 3)], 4)
    with pytest.raises(ConfigError, match="no requests"):
        popularity([], 4)


# ------------------------------------------------------------------ the real DeepSeek trace

def load_deepseek():
    """MoELens DeepSeek-MoE-16B prompts -> RoutedRequests (MoE layers 1..27), prompt order."""
    files = sorted(DEEPSEEK_DIR.glob("prompt-*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    out = []
    for i, path in enumerate(files):
        data = json.loads(path.read_text())
        layers = [layer for layer in data["layers"] if not layer["is_dense"]]
        rows = [[tok["top_experts"] for tok in sorted(layer["tokens"], key=lambda t: t["token_index"])]
                for layer in layers]
        ex = np.asarray(rows, dtype=np.int16).transpose(1, 0, 2)  # [T, 27, 6]
        out.append(RoutedRequest(i, ex.shape[0], 1, np.ascontiguousarray(ex)))
    return out


@pytest.fixture(scope="module")
def deepseek():
    if not DEEPSEEK_DIR.is_dir():
        pytest.skip(f"{DEEPSEEK_DIR} is absent")
    return load_deepseek()


def test_deepseek_statistics(deepseek):
    assert len(deepseek) == 10 and sum(r.experts.shape[0] for r in deepseek) == 87
    assert all(r.experts.shape[1:] == (27, 6) for r in deepseek)
    s = trace_statistics(deepseek, 64)
    # the figures quoted in README.md (87 prefill tokens: reuse 0.26 = 2.8x chance, busiest 3.3x)
    assert s["popularity"]["median"] == pytest.approx(3.310, abs=1e-3)
    assert s["reuse"]["overall"] == pytest.approx(0.262, abs=1e-3)
    assert s["reuse"]["lift"] == pytest.approx(2.80, abs=0.01)
    # strong cross-layer affinity: 0.70 against 0.47 with the layer pairing broken
    assert s["affinity"]["overall"] == pytest.approx(0.699, abs=1e-3)
    assert 0.2 < s["affinity"]["excess"] < 0.26
    # 10 prefill passes; every hit-rate curve is monotone in c, and MIN bounds the others
    hr = pd.DataFrame(s["hit_rate"]).pivot(index="capacity", columns="policy", values="hit_rate")
    assert list(hr.index) == list(range(1, 65))
    assert (hr.diff().iloc[1:] >= -1e-12).all().all()
    assert (hr["min"] >= hr["lru"] - 1e-12).all() and (hr["min"] >= hr["lfu"] - 1e-12).all()
    cold = sum(r["cold_misses"] for r in s["cache"]["per_layer"])
    assert hr.loc[64, "lru"] == pytest.approx(1 - cold / s["cache"]["accesses"])


def test_deepseek_all_capacities_at_once_equal_one_at_a_time(deepseek):
    """The default (every capacity 1..64 in one call) gives each capacity's own replay.
    (How fast: ``python benchmarks/data_speed.py``.)"""
    h = hit_rates(deepseek, 64)  # 64 capacities x LRU, LFU, MIN
    assert h.capacities.tolist() == list(range(1, 65))
    for c in (1, 6, 17, 64):
        one = hit_rates(deepseek, 64, [c])
        assert np.array_equal(one.accesses, h.accesses) and np.array_equal(one.cold, h.cold)
        for p in ("lru", "lfu", "min"):
            assert np.array_equal(one.hits[p][0], h.hits[p][c - 1]), (p, c)


def test_half_a_million_accesses():
    E, K, M = 64, 6, 27
    model = model_for_trace("t", E, K, M + 1, range(1, M + 1))
    routing = generate_routing(model, RoutingConfig(), [400] * 8, np.random.default_rng(0))
    reqs = [Routed(x, 16) for x in routing]  # 8 prefills + 3,072 decode passes
    h = hit_rates(reqs, E, [16])  # all three policies
    assert h.accesses.sum() > 490_000 and h.passes == 8 + 8 * 384
    assert (h.hits["min"] >= h.hits["lru"]).all() and (h.hits["min"] >= h.hits["lfu"]).all()
    assert (h.hits["lru"] > 0).all() and (h.hits["min"] <= h.accesses - h.cold).all()


# ------------------------------------------------------------------ command line

@pytest.fixture
def small_trace(tmp_path):
    model = model_for_trace("tiny", 8, 2, 4, (1, 2, 3))
    routing = generate_routing(model, RoutingConfig(), [6, 9, 4], np.random.default_rng(2))
    reqs = [RoutedRequest(i, p, x.shape[0] - p + 1, x) for i, (x, p) in enumerate(zip(routing, [3, 1, 4]))]
    path = tmp_path / "t.parquet"
    write_trace(path, requests_to_frame(reqs, model), TraceMeta.for_model(model, "test"))
    return path, reqs


def test_cli_stats_prints_and_writes_json(small_trace, tmp_path, capsys):
    path, reqs = small_trace
    out = tmp_path / "stats.json"
    assert main(["stats", str(path), "--json", str(out), "--capacities", "1,2,4,8",
                 "--batch-tokens", "1,2,4"]) == 0
    text = capsys.readouterr().out
    assert "popularity skew" in text and "LRU" in text and "N(t)" in text
    stats = json.loads(out.read_text())
    hr = pd.DataFrame(stats["hit_rate"])
    assert sorted(hr.policy.unique()) == ["lfu", "lru", "min"] and sorted(hr.capacity.unique()) == [1, 2, 4, 8]
    lib = hit_rates(reqs, 8, [1, 2, 4, 8])
    assert hr[hr.policy == "lru"].hits.tolist() == lib.hits["lru"].sum(axis=1).tolist()
    assert [r["layer"] for r in stats["popularity"]["per_layer"]] == [1, 2, 3]
    assert pd.DataFrame(stats["distinct"]).tokens.tolist() == [1, 2, 4]
    assert set(pd.read_json(out, typ="series").index) >= {"trace", "popularity", "reuse", "affinity",
                                                         "distinct", "hit_rate", "cache"}


@pytest.mark.parametrize("args, message", [
    (["--capacities", "0,2"], "capacities"),
    (["--capacities", "a,b"], "--capacities"),
    (["--batch-tokens", "0"], "batch tokens"),
    (["--policies", "fifo"], "--policies"),
])
def test_cli_stats_bad_input_exits_2(small_trace, capsys, args, message):
    path, _ = small_trace
    assert main(["stats", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim-trace: error:") and message in err and "\n" not in err


def test_cli_stats_missing_trace_exits_2(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nope.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
