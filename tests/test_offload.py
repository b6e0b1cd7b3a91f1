"""The real offload runtime (real_backend.offload) against the simulator's cache, and its physics.

* Same calls, same cache: a hand-made access sequence driven through ``sim.memory.ExpertCache`` +
  a policy (the engine's per-layer protocol, copies landing at the end of each layer) and through
  the runtime gives the same resident set after every layer and the same counters; replaying the
  routing the SimPy engine recorded gives the engine's per-step hits, misses and bytes.
* Copies: the link shaper holds its cap, demand loads overtake queued prefetches, copied weights
  equal the host's bit for bit, staging when every slot is pinned, wasted prefetch bytes.
* Threads: the policy is only ever called from the thread that owns the runtime.
* CUDA logic with a recording fake of the CUDA primitives (streams, events): fences, compute
  waits, stall events. No GPU here: pinned memory and real streams are not exercised.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import time

import numpy as np
import pytest
import torch

from real_backend.offload import (CopyEngine, CopyJob, DeviceSlotPool, ExpertLayout, HostStore, OffloadRuntime,
                                  _TorchCuda)
from sim.cache_controller import CacheController
from sim.memory import ExpertCache, MemoryBudget
from sim.policies.base import Prefetch, PrefetchConfig, StepInfo
from sim.policies.prefetch import LFU, LRU, GateLookahead
from workloads.model import ModelSpec
from workloads.validation import ConfigError

H, I = 16, 24


def tiny_model(num_layers: int = 3, num_experts: int = 8, hidden: int = H, inter: int = I) -> ModelSpec:
    return ModelSpec(name="tiny", hidden_size=hidden, num_layers=num_layers, num_experts=num_experts, top_k=2,
                     expert_intermediate_size=inter, num_attention_heads=1, num_kv_heads=1, head_dim=hidden,
                     vocab_size=32, weight_bytes_per_param=4.0)


def make_runtime(model: ModelSpec, policy, *, scope="per_layer", cap=None, total=None, fill=True, **kw):
    store = HostStore.random(model.moe_layers, model.num_experts, model.hidden_size,
                             model.expert_intermediate_size, seed=1)
    rt = OffloadRuntime(store, policy, capacity_per_layer=cap, total_slots=total, cache_scope=scope, **kw)
    rt.start(model, initial_residency="fill" if fill else "empty")
    return rt


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(bits(x), bits(y))
                                    for x, y in zip(a, b))


# ============================================================================ the controller, copies landing by hand
class LayerEndSink:
    """A ``CopySink`` whose copies all land at the end of their layer, in copy-engine order
    (priority, then issue order); staging copies land nowhere."""

    def __init__(self):
        self.queue: list = []
        self.seq = 0
        self.controller = None

    def copy(self, order) -> None:
        heapq.heappush(self.queue, (order.priority, self.seq, order))
        self.seq += 1

    def land_all(self) -> None:
        while self.queue:
            order = heapq.heappop(self.queue)[2]
            if order.kind != "staging":
                self.controller.landed(order.key, order.kind)


class RefEngine:
    """The shared ``CacheController`` over a plain ``ExpertCache`` (the simulator's), every copy
    landing at the end of its layer: what the real runtime must reproduce with its own buffers,
    copy thread, staging and landing points when it drains after each layer."""

    def __init__(self, model, policy, scope, cap, total, fill=True):
        per_layer = scope == "per_layer"
        total = cap * model.num_moe_layers if per_layer else total
        budget = MemoryBudget(0, 0, 0, 0, 0, 0, scope, cap if per_layer else None, total)
        self.cache = ExpertCache(budget, model.moe_layers)
        initial = self.cache.initial_fill(model) if fill else []
        self.sink = LayerEndSink()
        self.ctl = CacheController(self.cache, policy, model.expert_bytes, self.sink)
        self.sink.controller = self.ctl
        self.ctl.start(model, initial)

    @property
    def c(self) -> dict:
        return _counters_of(self.ctl.totals)

    def layer(self, step, layer, ids, predicted=None):
        self.ctl.begin_layer(step, layer, ids, [1] * len(ids), predicted)
        self.ctl.end_layer()
        self.sink.land_all()


def access_sequence(model, steps, seed, max_needed=5):
    rng = np.random.default_rng(seed)
    seq = []
    for _ in range(steps):
        seq.append({layer: sorted(rng.choice(model.num_experts, size=int(rng.integers(1, max_needed + 1)),
                                             replace=False).tolist()) for layer in model.moe_layers})
    return seq


def predictions(model, seq, step, layer, rng):
    """Half-right guesses of the next layer's experts (as a lookahead trace would carry)."""
    m = model.moe_layer_index[layer]
    if m + 1 >= model.num_moe_layers:
        return None
    nxt = model.moe_layers[m + 1]
    true = seq[step][nxt]
    guess = {e if rng.random() < 0.5 else int(rng.integers(model.num_experts)) for e in true}
    return {nxt: sorted(guess)}


def _counters_of(rt_counters) -> dict:
    t = rt_counters
    return dict(hits=t.hits, misses=t.misses, demand_loads=t.demand_loads, staged=t.staged_loads,
                demand_bytes=t.demand_bytes, prefetch_bytes=t.prefetch_bytes, prefetches=t.prefetches,
                wasted=t.wasted_prefetch_bytes, useful=t.useful_prefetches, late=t.late_prefetches)


@pytest.mark.parametrize("policy_cls,scope", [(LRU, "per_layer"), (LRU, "global"), (LFU, "per_layer"),
                                              (GateLookahead, "per_layer"), (GateLookahead, "global")])
def test_same_calls_same_cache_as_the_simulators_expert_cache(policy_cls, scope):
    model = tiny_model()
    cap, total = (3, None) if scope == "per_layer" else (None, 4)
    seq = access_sequence(model, steps=25, seed=3)
    ref = RefEngine(model, policy_cls(PrefetchConfig()), scope, cap, total)
    rt = make_runtime(model, policy_cls(PrefetchConfig()), scope=scope, cap=cap, total=total)
    assert rt.pool.resident == ref.cache.resident
    rng_ref, rng_rt = np.random.default_rng(9), np.random.default_rng(9)
    try:
        for step, layers in enumerate(seq):
            rt.begin_step(StepInfo(step, "decode", (0,), 1))
            for layer in model.moe_layers:
                ids = layers[layer]
                ref.layer(step, layer, ids, predictions(model, seq, step, layer, rng_ref))
                acc = rt.begin_layer(step, layer, ids, predicted=predictions(model, seq, step, layer, rng_rt))
                assert sorted(acc.on_device + acc.host) == ids
                for e in acc.on_device:
                    rt.weights((layer, e))
                    rt.release((layer, e))
                rt.end_layer()
                rt.drain()  # the reference lands every copy at the end of the layer too
                assert rt.pool.resident == ref.cache.resident, (step, layer)
                assert not rt.pool.in_flight
                for b in rt.pool.capacity:
                    assert rt.pool.used[b] == ref.cache.used[b]
            rt.end_step(step)
        assert _counters_of(rt.totals) == ref.c
        kinds = [r.kind for r in rt.copy_records]
        assert kinds.count("staging") == ref.c["staged"] > 0
        assert kinds.count("prefetch") == ref.c["prefetches"]
        if policy_cls is GateLookahead:
            assert ref.c["prefetches"] > 0 and ref.c["wasted"] > 0 and ref.c["useful"] > 0
    finally:
        rt.close()


@pytest.mark.parametrize("policy,scope", [("lru", "per_layer"), ("lru", "global"), ("lfu", "per_layer")])
def test_replaying_the_engines_routing_gives_the_engines_step_counts(policy, scope):
    """The SimPy engine on a tiny Mixtral-shaped model; its recorded routing replayed through the
    runtime. On-demand LRU/LFU decisions do not depend on timing, so every step must agree."""
    from sim.config import compose_scenario
    from sim.engine import Engine
    from workloads.requests import build_requests

    sc = compose_scenario(["model=mixtral_8x7b", "model.hidden_size=32", "model.expert_intermediate_size=48",
                           "model.num_layers=4", "model.weight_bytes_per_param=4", f"policy/prefetch={policy}",
                           "policy.prefetch.capacity_per_layer=3", f"policy.prefetch.cache_scope={scope}",
                           "workload.batch_size=2", "workload.num_requests=3", "workload.prompt_len=3",
                           "workload.output_len=10", "sim.progress=false"])
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    eng = Engine(sc, reqs, record_routing=True)
    res = eng.run()
    model = sc.model
    pol = (LRU if policy == "lru" else LFU)(sc.prefetch)
    store = HostStore.random(model.moe_layers, model.num_experts, model.hidden_size, model.expert_intermediate_size)
    assert store.expert_bytes == model.expert_bytes
    rt = OffloadRuntime(store, pol, capacity_per_layer=3, cache_scope=scope)
    try:
        rt.start(model, initial_residency="fill")
        rows = []
        for step, (routing, comp) in enumerate(zip(eng.recorded_passes, eng.recorded_compositions)):
            rt.begin_step(StepInfo(step, "decode", comp, len(comp)))
            for layer in model.moe_layers:
                acc = rt.begin_layer(step, layer, routing[layer])
                for e in acc.on_device:
                    rt.weights((layer, e))
                    rt.release((layer, e))
                rt.end_layer()
            rows.append(rt.end_step(step))
        got = [(r.hits, r.misses, r.demand_loads, r.demand_bytes, r.prefetch_bytes, r.h2d_bytes) for r in rows]
        want = list(res.steps[["hits", "misses", "demand_loads", "demand_bytes", "prefetch_bytes",
                               "h2d_bytes"]].itertuples(index=False, name=None))
        assert got == [tuple(x) for x in want]
        assert sum(r.misses for r in rows) > 0
        if scope == "per_layer":  # 3 slots, up to 4 experts a layer in prefill: some loads are staged
            assert sum(r.staged_loads for r in rows) > 0
    finally:
        rt.close()


# ============================================================================ copies
def _durations(eng: CopyEngine, n: int, reps: int) -> list[float]:
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    out = []
    for i in range(reps):
        job = eng.submit(CopyJob((0, i), "prefetch", 1, n, src=src, dst=dst))
        job.done.wait()
        assert job.error is None and torch.equal(dst, src)
        out.append(job.end - job.start)
    return out


class _VirtualClock:
    """``time`` for ``real_backend.offload`` on a clock that only moves when the copy worker acts:
    a ``sleep(s)`` advances it by ``s`` plus ``overshoot_s`` (a real sleep wakes late), a
    ``sched_yield`` by ``tick_s``, a byte copy by its bytes / ``copy_bps`` (the machine's memmove
    speed). The shaper's pacing is then exact arithmetic, whatever else the machine is doing."""

    def __init__(self, copy_bps: float, overshoot_s: float = 80e-6, tick_s: float = 1e-6):
        self.now, self.copy_bps, self.overshoot_s, self.tick_s = 1000.0, copy_bps, overshoot_s, tick_s
        self._lock = threading.Lock()

    def _advance(self, dt: float) -> None:
        with self._lock:
            self.now += dt

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self._advance(max(0.0, s) + self.overshoot_s)

    def tick(self) -> None:
        self._advance(self.tick_s)

    def install(self, monkeypatch) -> None:
        from real_backend import offload

        real_copy = offload._copy_bytes

        def copy(dst, src):
            real_copy(dst, src)
            self._advance(src.numel() * src.element_size() / self.copy_bps)

        monkeypatch.setattr(offload, "time", self)
        monkeypatch.setattr(offload, "_yield", self.tick)
        monkeypatch.setattr(offload, "_copy_bytes", copy)


@pytest.mark.parametrize("nbytes,bw,chunk,latency", [
    (4 << 20, 2e9, None, 0.0),       # 2.1 ms
    (4 << 20, 4e9, None, 0.0),       # 1.05 ms
    (256 << 10, 2e9, None, 0.0),     # 131 us: shorter than a sleep's overshoot plus spin_s
    (4 << 20, 2e9, 1 << 20, 0.0),    # chunked: each chunk sleeps to its own deadline
    (256 << 10, 2e9, 64 << 10, 1e-3),
])
def test_link_shaper_paces_copies_to_its_cap_on_a_virtual_clock(monkeypatch, nbytes, bw, chunk, latency):
    """A copy takes latency + n / bandwidth and no more: it sleeps to within spin_s of its deadline
    (the sleep's overshoot, 80 us, is less than spin_s, 150 us), then yields until the deadline,
    overshooting by at most one yield. The machine copies at 10 GB/s here, faster than every cap,
    so a missing or wrong cap would show (an unshaped copy takes n / 10 GB/s, checked below). How
    close the real clock comes to this is a property of the machine and its load:
    ``python benchmarks/link_shaper.py``."""
    clock = _VirtualClock(copy_bps=10e9)
    clock.install(monkeypatch)
    # unshaped, latency_s is a floor under the copy's own time
    for cap, want in ((bw, latency + nbytes / bw), (None, max(latency, nbytes / 10e9))):
        eng = CopyEngine("cpu", bandwidth_bps=cap, chunk_bytes=chunk, latency_s=latency)
        try:
            d = _durations(eng, nbytes, reps=3)
        finally:
            eng.close()
        assert all(want - 1e-9 <= x <= want + 1.5 * clock.tick_s for x in d), (d, want)


def test_link_shaper_adds_nothing_to_a_copy_slower_than_its_cap(monkeypatch):
    clock = _VirtualClock(copy_bps=1e9)   # the machine copies at 1 GB/s, under the 2 GB/s cap
    clock.install(monkeypatch)
    for chunk in (None, 1 << 20):
        eng = CopyEngine("cpu", bandwidth_bps=2e9, chunk_bytes=chunk)
        try:
            d = _durations(eng, 4 << 20, reps=2)
        finally:
            eng.close()
        assert d == [pytest.approx((4 << 20) / 1e9, abs=1e-9)] * 2


@pytest.mark.parametrize("nbytes,bw", [(16 << 20, 2e9), (256 << 10, 2e9)])
def test_link_shaper_never_beats_its_cap(nbytes, bw):
    """On the real clock: every copy takes at least n / bandwidth (by construction: the worker
    sleeps and then spins to the deadline; a busy machine can only make it later) and copies the
    bytes exactly."""
    eng = CopyEngine("cpu", bandwidth_bps=bw)
    try:
        d = _durations(eng, nbytes, reps=5)
    finally:
        eng.close()
    assert min(d) >= nbytes / bw - 1e-9  # (float rounding of perf_counter differences)


def test_link_shaper_holds_its_cap_while_torch_computes():
    """With the copy worker on SCHED_FIFO (needs CAP_SYS_NICE), copies stay shaped and exact while
    compute threads fill every core (how close to the cap they finish: benchmarks/link_shaper.py)."""
    eng = CopyEngine("cpu", bandwidth_bps=2e9)
    if eng.sched != "realtime":
        eng.close()
        pytest.skip("no CAP_SYS_NICE here: the copy worker could not get SCHED_FIFO")
    stop = threading.Event()

    def compute():
        a, w = torch.randn(8, 1024), torch.randn(4096, 1024)
        while not stop.is_set():
            a @ w.t()

    t = threading.Thread(target=compute)
    t.start()
    try:
        time.sleep(0.02)
        d = _durations(eng, 4 << 20, reps=7)
    finally:
        stop.set()
        t.join()
        eng.close()
    assert min(d) >= (4 << 20) / 2e9 - 1e-9  # (float rounding of perf_counter differences)


def test_priority_queue_order_demand_first_fifo_within_a_priority():
    n = 256 << 10
    eng = CopyEngine("cpu", bandwidth_bps=n / 0.02)  # 20 ms per copy
    src = torch.ones(n, dtype=torch.uint8)
    dsts = [torch.zeros_like(src) for _ in range(6)]
    # The worker holds the first job until the others are queued (however long that takes on a
    # busy machine), so the queue order alone decides what runs next.
    taken, release = threading.Event(), threading.Event()
    copy_cpu = eng._copy_cpu

    def held(job):
        if job.key == (9, 9):
            taken.set()
            release.wait(10)
        copy_cpu(job)

    eng._copy_cpu = held
    try:
        eng.submit(CopyJob((9, 9), "prefetch", 5, n, src=src, dst=dsts[0]))
        assert taken.wait(10)
        for i, p in enumerate([3, 1, 2, 1, 0]):
            eng.submit(CopyJob((0, i), "x", p, n, src=src, dst=dsts[i + 1]))
        release.set()
        eng.wait_idle()
        done = eng.take_completed()
    finally:
        eng.close()
    assert [j.key for j in done] == [(9, 9), (0, 4), (0, 1), (0, 3), (0, 2), (0, 0)]
    starts = [j.start for j in done]
    assert starts == sorted(starts)
    assert all(b.start >= a.end for a, b in zip(done, done[1:]))  # one at a time


def test_a_demand_load_overtakes_queued_prefetches():
    model = tiny_model(num_layers=2, hidden=64, inter=96)
    B = model.expert_bytes
    rt = make_runtime(model, LRU(PrefetchConfig()), cap=4, fill=False, bandwidth_bps=B / 0.02)  # 20 ms a copy
    try:
        rt.begin_step(StepInfo(0, "decode", (0,), 1))
        rt.execute([Prefetch(1, e, 0) for e in range(4)])
        acc = rt.begin_layer(0, 0, [5])
        assert acc.loads == [5]
        rt.weights((0, 5))
        rt.end_layer()
        rt.drain()
        recs = rt.copy_records
    finally:
        rt.close()
    demand = next(r for r in recs if r.kind == "demand")
    pref = sorted((r for r in recs if r.kind == "prefetch"), key=lambda r: r.expert)
    assert demand.priority == 0 and {r.priority for r in pref} == {1}
    # Prefetches the worker had taken before the demand was queued (normally just the one on the
    # link; more only if this thread was held up for 20 ms copies): every other one waits for the
    # demand, which itself waits only for the copy in progress (one at a time, non-preemptive).
    before = [r for r in pref if r.start_s < demand.queued_at_s]
    assert all(r.start_s >= demand.end_s for r in pref if r not in before)
    assert all(demand.start_s >= r.end_s for r in before)
    assert [r.start_s for r in pref] == sorted(r.start_s for r in pref)  # FIFO among prefetches
    assert all(r.end_s - r.start_s >= 0.02 - 1e-9 for r in recs)
    c = rt.totals
    assert c.copy_stall_s >= 0.02  # waited at least for its own copy


def test_copied_weights_equal_the_hosts_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    experts = {(layer, e): ((torch.randn(2 * I, H, generator=g)).to(torch.bfloat16),
                            torch.randn(H, I, generator=g),
                            torch.randint(-128, 127, (7,), generator=g, dtype=torch.int8),
                            torch.randn(3, 5, generator=g, dtype=torch.float64))
               for layer in (0, 1) for e in range(4)}
    store = HostStore(experts)
    assert store.expert_bytes == sum(t.numel() * t.element_size() for t in experts[(0, 0)])
    assert all(o % 64 == 0 for o in store.layout.offsets)
    model = ModelSpec(name="odd", hidden_size=H, num_layers=2, num_experts=4, top_k=2, expert_intermediate_size=I,
                      num_attention_heads=1, num_kv_heads=1, head_dim=H, vocab_size=32)
    rt = OffloadRuntime(store, LRU(PrefetchConfig()), capacity_per_layer=1, bandwidth_bps=1e9)
    try:
        rt.start(model, allow_byte_mismatch=True)  # (0,0), (1,0) resident by the initial fill
        for key in store.keys():
            assert same_bits(store.tensors(key), experts[key])
        rt.begin_step(StepInfo(0, "decode", (0,), 1))
        rt.execute([Prefetch(1, 3)])  # evicts (1,0): layer 1's only slot now holds a prefetch
        acc = rt.begin_layer(0, 0, [0, 1, 2])  # 0 hit; 1, 2 staged (the only slot is pinned)
        assert acc.hits == [0] and acc.staged == [1, 2]
        for e in acc.on_device:
            w = rt.weights((0, e))
            assert same_bits(w, experts[(0, e)]), e
            assert all(t.device.type == "cpu" for t in w)
        rt.end_layer()
        acc = rt.begin_layer(0, 1, [3])
        assert acc.late + acc.hits == [3]
        assert same_bits(rt.weights((1, 3)), experts[(1, 3)])
        rt.end_layer()
        rt.end_step(0)
        # weights from a slot after eviction and reuse: (0,0) goes, (0,2) comes
        rt.begin_step(StepInfo(1, "decode", (0,), 1))
        acc = rt.begin_layer(1, 0, [2])
        assert acc.loads == [2]
        assert same_bits(rt.weights((0, 2)), experts[(0, 2)])
        rt.end_layer()
    finally:
        rt.close()


def test_staging_when_every_slot_is_pinned():
    model = tiny_model(num_layers=1)
    B = model.expert_bytes
    rt = make_runtime(model, LRU(PrefetchConfig()), cap=1, bandwidth_bps=B / 0.005)
    store = rt.store
    try:
        rt.begin_step(StepInfo(0, "decode", (0,), 1))
        acc = rt.begin_layer(0, 0, [0, 1, 2, 3])
        assert acc.hits == [0] and acc.staged == [1, 2, 3] and acc.loads == []
        assert rt.pool.free_slots(0) == 0 and rt.pool.resident == {(0, 0)}
        assert not any(rt.pool.is_in_flight(0, e) for e in (1, 2, 3))  # staged copies are not cached
        with pytest.raises(RuntimeError, match="staging buffer"):
            rt.weights((0, 3))  # both staging buffers are held by 1 and 2
        for e in acc.on_device:
            assert same_bits(rt.weights((0, e)), store.tensors((0, e)))
            rt.release((0, e))
        rt.end_layer()
        c = rt.end_step(0)
    finally:
        rt.close()
    assert rt.pool.resident == {(0, 0)}
    assert (c.demand_loads, c.staged_loads, c.demand_bytes, c.hits, c.misses) == (3, 3, 3 * B, 1, 3)
    recs = [r for r in rt.copy_records if r.kind == "staging"]
    assert sorted(r.expert for r in recs) == [1, 2, 3]
    first, third = (next(r for r in recs if r.expert == e) for e in (1, 3))
    assert third.queued_at_s >= first.end_s  # issued only once expert 1's buffer was released
    span = third.span(t0_s=first.queued_at_s)
    assert span["name"] == "L0 E3 demand (staging)" and span["ph"] == "X" and span["dur"] > 0


def test_wasted_and_useful_prefetch_bytes():
    model = tiny_model(num_layers=1)
    B = model.expert_bytes
    rt = make_runtime(model, LRU(PrefetchConfig()), cap=1)
    try:
        rt.begin_step(StepInfo(0, "decode", (0,), 1))
        assert rt.prefetch((0, 5)) is not None  # evicts (0,0)
        rt.drain()
        assert rt.pool.resident == {(0, 5)}
        acc = rt.begin_layer(0, 0, [3])  # miss: LRU evicts (0,5), never used
        assert acc.loads == [3]
        rt.weights((0, 3))
        rt.end_layer()
        c = rt.end_step(0)
        assert (c.prefetches, c.prefetch_bytes, c.wasted_prefetch_bytes, c.useful_prefetches) == (1, B, B, 0)
        rt.begin_step(StepInfo(1, "decode", (0,), 1))
        rt.prefetch((0, 6))
        rt.drain()
        acc = rt.begin_layer(1, 0, [6])
        assert acc.hits == [6]
        rt.end_layer()
        c = rt.end_step(1)
        assert (c.prefetches, c.wasted_prefetch_bytes, c.useful_prefetches, c.demand_bytes) == (1, 0, 1, 0)
        assert rt.totals.h2d_bytes == 3 * B
    finally:
        rt.close()


# ============================================================================ threads
class SpyPolicy(GateLookahead):
    """GateLookahead that notes the thread of every call the runtime makes."""

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[tuple[str, int]] = []

    def _note(self, name):
        self.calls.append((name, threading.get_ident()))

    def reset(self, ctx):
        self._note("reset")
        super().reset(ctx)

    def on_step_begin(self, info, cache):
        self._note("on_step_begin")
        return super().on_step_begin(info, cache)

    def on_routed(self, *a, **kw):
        self._note("on_routed")
        return super().on_routed(*a, **kw)

    def on_miss(self, *a, **kw):
        self._note("on_miss")
        return super().on_miss(*a, **kw)

    def victim(self, *a, **kw):
        self._note("victim")
        return super().victim(*a, **kw)

    def on_copy_done(self, *a, **kw):
        self._note("on_copy_done")
        return super().on_copy_done(*a, **kw)

    def on_step_end(self, *a, **kw):
        self._note("on_step_end")
        return super().on_step_end(*a, **kw)


def test_the_policy_is_only_called_from_the_owning_thread():
    model = tiny_model()
    B = model.expert_bytes
    spy = SpyPolicy(PrefetchConfig())
    rt = make_runtime(model, spy, cap=2, bandwidth_bps=B / 0.002)  # 2 ms copies finish while "computing"
    seq = access_sequence(model, steps=6, seed=5, max_needed=3)
    rng = np.random.default_rng(1)
    try:
        for step, layers in enumerate(seq):
            rt.begin_step(StepInfo(step, "decode", (0,), 1))
            for layer in model.moe_layers:
                acc = rt.begin_layer(step, layer, layers[layer], predicted=predictions(model, seq, step, layer, rng))
                for e in acc.on_device:
                    rt.weights((layer, e))
                    time.sleep(0.001)  # the expert's compute, while copies run
                    rt.release((layer, e))
                rt.end_layer()
            rt.end_step(step)
        rt.drain()
        errors = []

        def intruder():
            try:
                rt.poll()
            except RuntimeError as exc:
                errors.append(exc)

        t = threading.Thread(target=intruder)
        t.start()
        t.join()
        assert errors, "the runtime must refuse calls from another thread"
    finally:
        rt.close()
    me = threading.get_ident()
    names = {n for n, _ in spy.calls}
    assert {"reset", "on_routed", "victim", "on_copy_done", "on_step_end"} <= names
    assert {tid for _, tid in spy.calls} == {me}
    cached = [r for r in rt.copy_records if r.kind in ("demand", "prefetch")]
    assert sum(n == "on_copy_done" for n, _ in spy.calls) == len(cached) > 0


@pytest.mark.parametrize("name", ["lru", "lfu", "lookahead", "speculating", "transition", "moe_infinity",
                                  "pregated", "fiddler", "oracle"])
def test_every_registered_policy_runs_on_the_runtime(name):
    """Each built-in policy, unchanged, drives the real cache: the pool never overflows, every needed
    expert is served (device or host), and bytes add up to copies made."""
    from sim.future import RecordedFuture
    from sim.policies.base import prefetch_policy_class

    model = tiny_model(num_layers=4)
    seq = access_sequence(model, steps=12, seed=2, max_needed=4)
    cls = prefetch_policy_class(name)
    kw = {"crossover_tokens": 2} if name == "fiddler" else {}
    pol = cls(cls.Config(name=name, **kw))
    store = HostStore.random(model.moe_layers, model.num_experts, H, I)
    rt = OffloadRuntime(store, pol, capacity_per_layer=2, bandwidth_bps=model.expert_bytes / 2e-4)
    rng = np.random.default_rng(4)
    try:
        rt.start(model, future=RecordedFuture(seq, [(0,)] * len(seq)) if pol.needs_future else None)
        for step, layers in enumerate(seq):
            rt.begin_step(StepInfo(step, "decode", (0,), 1, finished=(0,) if step == 6 else ()))
            for layer in model.moe_layers:
                ids = layers[layer]
                counts = [1 + (e % 3) for e in ids]
                if pol.substitutes:
                    ids, counts = pol.substitute(step, layer, ids, counts)
                acc = rt.begin_layer(step, layer, ids, counts,
                                     predicted=predictions(model, seq, step, layer, rng))
                assert sorted(acc.on_device + acc.host) == sorted(ids)
                for e in acc.on_device:
                    w = rt.weights((layer, e))
                    assert same_bits(w, store.tensors((layer, e)))
                    rt.release((layer, e))
                rt.end_layer()
                for b in rt.pool.capacity:
                    assert 0 <= rt.pool.used[b] <= rt.pool.capacity[b]
            rt.end_step(step)
        rt.drain()
        t = rt.totals
        recs = rt.copy_records
        assert len(recs) == t.demand_loads + t.prefetches
        assert sum(r.bytes for r in recs) == t.demand_bytes + t.prefetch_bytes
        assert t.hits + t.misses == sum(len(layers[layer]) for layers in seq for layer in model.moe_layers) \
            or pol.substitutes
        if name == "fiddler":
            assert t.host_runs > 0
        if name in ("lookahead", "pregated", "oracle", "transition"):
            assert t.prefetches > 0
    finally:
        rt.close()


# ============================================================================ configuration
def test_bad_configuration_is_a_one_line_error():
    store = HostStore.random([0], 4, H, I)
    with pytest.raises(ConfigError, match="capacity_per_layer"):
        OffloadRuntime(store, LRU(PrefetchConfig()), capacity_per_layer=0)
    with pytest.raises(ConfigError, match="bandwidth_bps"):
        CopyEngine("cpu", bandwidth_bps=0)
    with pytest.raises(ConfigError, match="CPU-only"):
        CopyEngine("cuda:0", bandwidth_bps=8e9)
    with pytest.raises(ValueError, match="every expert must have the same shapes"):
        HostStore({(0, 0): (torch.zeros(2, 3),), (0, 1): (torch.zeros(3, 2),)})
    with pytest.raises(ValueError, match="experts 0..1"):
        HostStore({(0, 0): (torch.zeros(2),), (0, 2): (torch.zeros(2),)})
    rt = OffloadRuntime(store, LRU(PrefetchConfig()), capacity_per_layer=2)
    try:
        with pytest.raises(ValueError, match="expert_bytes"):
            rt.start(tiny_model(num_layers=1, num_experts=4, inter=I + 1))
    finally:
        rt.close()


def test_pool_answers_like_expert_cache():
    model = tiny_model(num_layers=2, num_experts=4)
    layout = ExpertLayout.of(HostStore.random([0], 1, H, I).tensors((0, 0)))
    for scope, cap, total in [("per_layer", 2, 4), ("global", None, 3)]:
        pool = DeviceSlotPool(layout, model.moe_layers, scope, cap, total)
        ref = ExpertCache(MemoryBudget(0, 0, 0, 0, 0, 0, scope, cap, total), model.moe_layers)
        assert pool.initial_order(model.num_experts) == ref.initial_fill(model)
        for key in pool.initial_order(model.num_experts):
            pool.place(key, torch.zeros(layout.span_bytes, dtype=torch.uint8))
        for c in (pool, ref):
            c.pinned = {(0, 0)}
        for layer in model.moe_layers:
            assert pool.free_slots(layer) == ref.free_slots(layer)
            for e in range(4):
                assert pool.can_evict(layer, e) == ref.can_evict(layer, e)
                assert pool.is_resident(layer, e) == ref.is_resident(layer, e)
        with pytest.raises(RuntimeError, match="not evictable"):
            pool.evict((0, 0))


# ============================================================================ CUDA logic, with a fake
class FakeEvent:
    def __init__(self, log, gate, timing):
        self.log, self.gate, self.stream = log, gate, None

    def record(self, stream):
        self.stream = stream
        self.log.append(("record", stream.name, self))

    def synchronize(self):
        if self.stream is not None and self.stream.name == "copy":
            assert self.gate.wait(5), "test gate never opened"

    def elapsed_time(self, other):
        return 1.0  # ms


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, ev):
        self.log.append(("wait", self.name, ev))


class FakeCuda(_TorchCuda):
    """Records stream/event calls; copies run on CPU tensors; copy events block on ``gate``."""

    def __init__(self):
        super().__init__(torch.device("cuda", 0))
        self.log: list = []
        self.gate = threading.Event()
        self.compute = FakeStream("compute", self.log)

    def empty_device(self, shape):
        return torch.zeros(shape, dtype=torch.uint8)

    def new_stream(self):
        return FakeStream("copy", self.log)

    def current_stream(self):
        return self.compute

    @contextlib.contextmanager
    def use_stream(self, stream):
        yield

    def event(self, timing=False):
        return FakeEvent(self.log, self.gate, timing)

    def set_device(self):
        pass

    def synchronize(self):
        pass


def test_cuda_path_fences_waits_and_stall_events():
    fake = FakeCuda()
    model = tiny_model(num_layers=1)
    store = HostStore.random(model.moe_layers, model.num_experts, H, I)
    with pytest.warns(UserWarning, match="not pinned"):
        rt = OffloadRuntime(store, LRU(PrefetchConfig()), capacity_per_layer=1, device="cuda:0", _cuda=fake)
    try:
        rt.start(model)  # (0,0) resident
        fake.gate.set()
        rt.begin_step(StepInfo(0, "decode", (0,), 1))
        assert rt.begin_layer(0, 0, [0]).hits == [0]
        rt.weights((0, 0))
        rt.end_layer()  # fence for (0,0)'s slot, recorded on the compute stream
        fence = next(ev for op, s, ev in reversed(fake.log) if op == "record" and s == "compute")
        assert rt.pool.fences[rt.pool.slot_id((0, 0))] is fence
        rt.end_step(0)

        fake.gate.clear()  # copies now stay "on the GPU" until the gate opens
        n0 = len(fake.log)
        rt.begin_step(StepInfo(1, "decode", (0,), 1))
        acc = rt.begin_layer(1, 0, [1])  # (0,0) evicted, (0,1) copied into its slot
        assert acc.loads == [1]
        job = rt._jobs[(0, 1)]
        assert job.fence is fence
        assert job.dispatched.wait(5)
        copy_ops = [(op, ev) for op, s, ev in fake.log[n0:] if s == "copy"]
        assert copy_ops[0] == ("wait", fence)  # the copy waits for the last compute on the slot
        rt.weights((0, 1))  # must not block the host on the copy
        assert not job.done.is_set()
        waits = [ev for op, s, ev in fake.log[n0:] if op == "wait" and s == "compute"]
        assert waits == [job.cuda_event]
        fake.gate.set()
        rt.end_layer()
        rt.drain()
        assert rt.pool.resident == {(0, 1)}
        c = rt.end_step(1)
        assert c.copy_stall_s == pytest.approx(1e-3)  # from the bracketing timing events

        # staging: the next copy into a released staging buffer waits on the release's fence
        rt.begin_step(StepInfo(2, "decode", (0,), 1))
        acc = rt.begin_layer(2, 0, [1, 2, 3, 4])
        assert acc.staged == [2, 3, 4]
        rt.weights((0, 2))
        rt.release((0, 2))
        rel = next(ev for op, s, ev in reversed(fake.log) if op == "record" and s == "compute")
        job4 = rt._staged[(0, 4)]
        assert job4.submitted and job4.fence is rel
        for e in (3, 4):
            rt.weights((0, e))
            rt.release((0, e))
        rt.end_layer()
        rt.end_step(2)
        rt.drain()
        assert sum(r.kind == "staging" for r in rt.copy_records) == 3
    finally:
        fake.gate.set()
        rt.close()
