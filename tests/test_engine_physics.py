"""The engine against hand-computed physics: roofline sums, copy times, stalls, LRU order, N(t)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.config import compose_scenario
from sim.engine import Engine, simulate
from workloads.model import expected_active_experts
from workloads.requests import Request

# OLMoE-1B-7B public shapes (conf/model/olmoe_1b_7b.yaml); H100 SXM datasheet (conf/hw/gpu/h100_sxm.yaml).
H, I, E, K, L, NH, HD, V = 2048, 1024, 64, 8, 16, 16, 128, 50304
PEAK, BW, FE, ME, LAUNCH = 989e12, 3.35e12, 0.7, 0.8, 3e-6
PCIE5_BPS, PCIE_LAT = 50e9, 10e-6
EXPERT_BYTES = 3 * H * I * 2


def kernel(flops: float, nbytes: float) -> float:
    return max(flops / (PEAK * FE), nbytes / (BW * ME)) + LAUNCH


def gemm(m: int, n: int, k: int) -> float:
    return kernel(2 * m * n * k, 2 * (n * k + m * k + m * n))


def olmoe_decode_step_by_hand(ctx: int, fused_moe: bool = False) -> float:
    """Batch-1 decode pass of OLMoE with every expert resident, written out op by op.
    ``fused_moe``: vLLM's fused_moe launches a layer's experts as 4 kernels (align, w13, activation,
    w2) instead of 3 per expert; the experts' bytes and FLOPs are unchanged."""
    norm = kernel(0, 2 * H * 2)
    qkv = gemm(1, (NH + 2 * NH) * HD, H)
    o = gemm(1, H, NH * HD)
    core = kernel(2 * NH * (HD + HD) * ctx, ctx * 2 * NH * HD * 2 + NH * 2 * HD * 2)
    attention = 2 * norm + qkv + o + core
    router = gemm(1, E, H) + kernel(0, E * 4)
    expert = gemm(1, 2 * I, H) + kernel(0, 3 * I * 2) + gemm(1, H, I)
    combine = kernel(0, (K + 1) * H * 2)
    if fused_moe:
        expert -= 3 * LAUNCH
        combine += 4 * LAUNCH
    embed = kernel(0, 2 * H * 2)
    lm_head = kernel(0, 2 * H * 2) + gemm(1, V, H)
    return embed + L * (attention + router + K * expert + combine) + lm_head


def request(rid: int, rows: np.ndarray, prompt_len: int) -> Request:
    return Request(rid, 0.0, prompt_len, rows.shape[0] - prompt_len + 1, rows.astype(np.int16))


def olmoe(*overrides: str):
    return compose_scenario(["model=olmoe_1b_7b", "hw=h100_sxm", "sim.progress=false", *overrides])


@pytest.mark.parametrize("moe_kernels", ["per_expert", "fused"])
def test_all_resident_decode_step_equals_roofline_sum_by_hand(moe_kernels):
    sc = olmoe("policy.prefetch.capacity_per_layer=64", f"hw.moe_kernels={moe_kernels}")
    rng = np.random.default_rng(1)
    rows = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(6)])
    res = Engine(sc, [request(0, rows, prompt_len=3)]).run()
    decode = res.steps[res.steps.phase == "decode"]
    assert len(decode) == 3
    assert (decode.misses == 0).all() and (decode.h2d_bytes == 0).all()
    for ctx, duration in zip([4, 5, 6], decode.duration_s):
        assert duration == pytest.approx(olmoe_decode_step_by_hand(ctx, moe_kernels == "fused"), rel=1e-12)


def test_fused_moe_saves_the_launches_of_all_but_four_kernels_per_layer():
    """8 active experts per layer: fused saves (3 * 8 - 4) launches in each of the 16 layers."""
    per_expert, fused = olmoe_decode_step_by_hand(10), olmoe_decode_step_by_hand(10, fused_moe=True)
    assert per_expert - fused == pytest.approx(L * (3 * K - 4) * LAUNCH, rel=1e-9)


def test_fused_moe_needs_the_roofline():
    from workloads.validation import ConfigError

    with pytest.raises(ConfigError, match="hw.moe_kernels"):
        compose_scenario(["hw=this_cpu", "hw.profile_dir=tests", "hw.moe_kernels=fused"])


def test_lone_miss_costs_bytes_over_bandwidth_plus_latency():
    # Capacity 63 per layer, filled with experts 0..62: expert 63 is the only one ever missing.
    base = np.tile(np.arange(K), (3, L, 1))          # prompt token + 2 decode tokens, all resident
    miss = base.copy()
    miss[2, 0, 7] = 63                               # second decode token needs expert 63 at layer 0
    runs = {}
    for name, rows in {"hit": base, "miss": miss}.items():
        sc = olmoe("policy.prefetch.capacity_per_layer=63", "sim.timeline=true")
        runs[name] = Engine(sc, [request(0, rows, prompt_len=1)]).run()
    copy_s = EXPERT_BYTES / PCIE5_BPS + PCIE_LAT
    copies = [ev for ev in runs["miss"].timeline if ev["cat"] == "copy"]
    assert len(copies) == 1
    assert copies[0]["dur"] * 1e-6 == pytest.approx(copy_s, rel=1e-12)
    step_hit = runs["hit"].steps.iloc[2]
    step_miss = runs["miss"].steps.iloc[2]
    assert step_miss.misses == 1 and step_miss.h2d_bytes == EXPERT_BYTES
    # The seven resident experts of layer 0 run while the copy is under way.
    resident_compute = 7 * (gemm(1, 2 * I, H) + kernel(0, 3 * I * 2) + gemm(1, H, I))
    assert step_miss.copy_stall_s == pytest.approx(copy_s - resident_compute, rel=1e-9)
    assert step_miss.duration_s - step_hit.duration_s == pytest.approx(copy_s - resident_compute, rel=1e-9)


def test_copy_overhead_is_paid_by_the_compute_stream_once_the_copy_lands():
    """A cost model whose copies cost the compute stream ``c`` each (what a copy costs the real
    executor's compute thread besides the wait, ``Table.overheads.copy_overhead_s``): the lone miss
    above issues one copy; the stream waits for it as before (the same stall), then pays c before
    the expert runs, so the step is exactly c longer, whatever c is."""
    from hw.cost import Roofline

    from hw.overheads import NoOverheads

    class CopyOverhead(NoOverheads):
        def __init__(self, c):
            self.c = c

        def copy_overhead_s(self, model):
            return self.c

    class WithCopyOverhead(Roofline):
        def __init__(self, sc, c):
            super().__init__(sc.hw.gpu, sc.hw.cpu)
            self.overheads = CopyOverhead(c)

    base = np.tile(np.arange(K), (3, L, 1))
    rows = base.copy()
    rows[2, 0, 7] = 63
    sc = olmoe("policy.prefetch.capacity_per_layer=63")
    copy_s = EXPERT_BYTES / PCIE5_BPS + PCIE_LAT
    resident_compute = 7 * (gemm(1, 2 * I, H) + kernel(0, 3 * I * 2) + gemm(1, H, I))
    stall = copy_s - resident_compute
    steps = {c: Engine(sc, [request(0, rows, prompt_len=1)], cost=WithCopyOverhead(sc, c)).run().steps.iloc[2]
             for c in (0.0, stall / 2, stall + 1e-4)}
    s0 = steps[0.0]
    for c, st in steps.items():
        assert st.demand_loads == 1
        assert st.other_compute_s - s0.other_compute_s == pytest.approx(c, rel=1e-9, abs=1e-15)
        assert st.copy_stall_s == pytest.approx(stall, rel=1e-9, abs=1e-15)
        assert st.duration_s - s0.duration_s == pytest.approx(c, rel=1e-6, abs=1e-12)


def test_copy_launch_delays_each_copy_by_the_idle_or_busy_figure():
    """``copy_launch_s`` (the real copy worker's wake-up): a copy submitted to an idle engine starts
    ``idle`` later, one queued behind another ``busy`` after it. Two misses in one layer: the first
    waits for the engine to wake, the second for its turn; the stall grows by idle + busy."""
    from hw.cost import Roofline

    from hw.overheads import NoOverheads

    class Launch(NoOverheads):
        def __init__(self, idle, busy):
            self.idle, self.busy = idle, busy

        def copy_launch_s(self, link, engine_idle):
            return self.idle if engine_idle else self.busy

    class WithLaunch(Roofline):
        def __init__(self, sc, idle, busy):
            super().__init__(sc.hw.gpu, sc.hw.cpu)
            self.overheads = Launch(idle, busy)

    rows = np.tile(np.arange(K), (3, L, 1))
    rows[2, 0, 6], rows[2, 0, 7] = 62, 63            # two misses at layer 0 of the second decode token
    sc = olmoe("policy.prefetch.capacity_per_layer=62", "sim.timeline=true")
    idle, busy = 3e-4, 5e-5
    runs = {k: Engine(sc, [request(0, rows, prompt_len=1)], cost=WithLaunch(sc, *k)).run()
            for k in ((0.0, 0.0), (idle, busy))}
    copy_s = EXPERT_BYTES / PCIE5_BPS + PCIE_LAT
    plain, delayed = (runs[k].steps.iloc[2] for k in runs)
    assert plain.demand_loads == delayed.demand_loads == 2
    assert delayed.copy_stall_s - plain.copy_stall_s == pytest.approx(idle + busy, rel=1e-9)
    copies = sorted((ev["ts"], ev["dur"]) for ev in runs[(idle, busy)].timeline if ev["cat"] == "copy")
    (t1, d1), (t2, d2) = copies
    assert d1 * 1e-6 == pytest.approx(copy_s) and d2 * 1e-6 == pytest.approx(copy_s)
    assert (t2 - (t1 + d1)) * 1e-6 == pytest.approx(busy, rel=1e-6)


def test_copy_shorter_than_compute_ahead_adds_no_stall():
    # A 2048-token prefill: 63 resident experts share the tokens (~0.6 ms of compute) while the
    # one missing expert (12.6 MB, ~0.25 ms over PCIe 5) is copied: no stall at all.
    rng = np.random.default_rng(2)
    T = 2048
    rows = np.stack([np.stack([rng.permutation(63)[:K] for _ in range(L)]) for _ in range(T)])
    rows[5, 3, 0] = 63
    rows = np.concatenate([rows, rows[:1]])  # one decode position
    results = {}
    for cap in (63, 64):
        sc = olmoe(f"policy.prefetch.capacity_per_layer={cap}")
        results[cap] = Engine(sc, [request(0, rows, prompt_len=T)]).run().steps.iloc[0]
    assert EXPERT_BYTES / PCIE5_BPS < results[64].expert_compute_s / L  # the premise
    assert results[63].misses == 1
    assert results[63].copy_stall_s == 0.0
    assert results[63].duration_s == pytest.approx(results[64].duration_s, rel=1e-12)


def test_lru_evicts_in_hand_computed_order():
    # Mixtral (top-2 of 8), two slots per layer holding {0, 1} at the start. Layer 0 sees this
    # sequence of decode tokens; every other layer always uses {0, 1} and never misses.
    seq = [(0, 1), (2, 3), (0, 2), (1, 2), (3, 0)]
    # Hand-run LRU on layer 0 (slots, most recent last):
    #   (0,1): hits 0,1                     -> [0,1]          misses 0
    #   (2,3): 2 evicts 0, 3 evicts 1       -> [2,3]          misses 2
    #   (0,2): 2 hit (-> [3,2]); 0 evicts 3 -> [2,0]          misses 1
    #   (1,2): 2 hit (-> [0,2]); 1 evicts 0 -> [2,1]          misses 1
    #   (3,0): 0 evicts 2, 3 evicts 1       -> [0,3]          misses 2
    expected_misses = [0, 2, 1, 1, 2]
    rows = np.tile(np.array([0, 1]), (1 + len(seq), 32, 1))
    for i, pair in enumerate(seq):
        rows[1 + i, 0] = pair
    sc = compose_scenario(["policy.prefetch.capacity_per_layer=2", "sim.progress=false"])
    res = Engine(sc, [request(0, rows, prompt_len=1)]).run()
    decode = res.steps[res.steps.phase == "decode"]
    assert decode.misses.tolist() == expected_misses
    assert decode.h2d_bytes.tolist() == [m * 3 * 4096 * 14336 * 2 for m in expected_misses]


@pytest.mark.parametrize("model,E_,K_", [("mixtral_8x7b", 8, 2), ("qwen2_57b_a14b", 64, 8)])
@pytest.mark.parametrize("t", [1, 4, 16, 64])
def test_mean_active_experts_matches_moesd_n_of_t(model, E_, K_, t):
    steps = max(4, 2048 // (t * 28))
    sc = compose_scenario([f"model={model}", "workload.routing=uniform", f"workload.batch_size={t}",
                           f"workload.num_requests={t}", "workload.prompt_len=1",
                           f"workload.output_len={steps + 1}", "sim.progress=false", "seed=3"])
    res = simulate(sc)
    expected = expected_active_experts(t, E_, K_)
    assert res.summary["mean_active_experts"] == pytest.approx(expected, rel=0.02)


def test_step_time_is_the_sum_of_its_parts_and_runs_are_deterministic():
    overrides = ["workload.batch_size=4", "workload.num_requests=6", "workload.output_len=12",
                 "workload.prompt_len=32", "sim.progress=false", "seed=7"]
    a = simulate(compose_scenario(overrides))
    b = simulate(compose_scenario(overrides))
    s = a.steps
    parts = s.attention_s + s.expert_compute_s + s.other_compute_s + s.copy_stall_s + s.host_stall_s
    np.testing.assert_allclose(parts, s.duration_s, rtol=1e-9)
    assert a.steps.equals(b.steps)
    assert a.requests.equals(b.requests)
    # Each demand byte is an expert copy; the copy engine is busy exactly that long (plus latencies).
    copies = s.demand_bytes.sum() / (3 * 4096 * 14336 * 2)
    assert a.summary["copy_engine_busy_s"] == pytest.approx(copies * (3 * 4096 * 14336 * 2 / 50e9 + 10e-6))


@pytest.mark.parametrize("copy_ms,stall_ms", [(1.5, 1.0), (1.0, 0.0)])
def test_a_staging_copy_waits_for_one_of_the_two_staging_buffers(copy_ms, stall_ms):
    """Two staging buffers, as in the executor: a buffer is held from its copy's submission until its
    expert has computed. Every token needs 8 experts per layer and 4 slots hold experts 0..3, so
    each layer computes its 4 resident experts and stages 4 copies. With every expert taking X = 1 ms
    and every copy C = 1.5 ms (from the router's end, t = 0):
      copies s1 [0, 1.5], s2 [1.5, 3]; both buffers held; residents compute [0, 4];
      s1 computes [4, 5] -> s3 copies [5, 6.5] (the engine idle by then); s2 computes [5, 6] -> s4
      waits for the engine: [6.5, 8];
      s3 computes [6.5, 7.5] (stall 0.5), s4 computes [8, 9] (stall 0.5): 1 ms of stall per layer,
    where copies with unlimited buffers would have landed at 1.5, 3, 4.5, 6 and none stalled.
    With C = 1 ms: s1 [0, 1], s2 [1, 2]; s3 [5, 6]; s2's buffer is free at 6, the very moment s3
    lands, so s4 [6, 7]; s3 computes [6, 7], s4 [7, 8]: no stall."""
    from hw.cost import Roofline

    class Fixed(Roofline):
        def expert_s(self, model, tokens):
            return 1e-3

        def copy_s(self, nbytes, link):
            return copy_ms * 1e-3

    rows = np.tile(np.arange(K), (3, L, 1))   # prompt token + 2 decode tokens
    sc = olmoe("policy.prefetch.capacity_per_layer=4")
    res = Engine(sc, [request(0, rows, prompt_len=1)], cost=Fixed(sc.hw.gpu, sc.hw.cpu)).run()
    for _, st in res.steps.iterrows():
        assert st.hits == 4 * L and st.demand_loads == 4 * L and st.prefetches == 0
        assert st.copy_stall_s == pytest.approx(L * stall_ms * 1e-3, rel=1e-9, abs=1e-12)
        assert st.expert_compute_s == pytest.approx(L * 8e-3, rel=1e-9)


def _one_ms_experts_ten_ms_copies(sc, rows, overheads):
    """The step records of one request replaying ``rows`` (prompt of 1 token) under the roofline
    with every expert 1 ms, every copy 10 ms and the given executor ``overheads``."""
    from hw.cost import Roofline

    class Fixed(Roofline):
        def expert_s(self, model, tokens):
            return 1e-3

        def copy_s(self, nbytes, link):
            return 10e-3

    cost = Fixed(sc.hw.gpu, sc.hw.cpu)
    cost.overheads = overheads
    return Engine(sc, [request(0, rows, prompt_len=1)], cost=cost).run().steps


def test_experts_beside_a_copy_run_slower_by_the_copy_contention_factor():
    """``overheads.copy_contention`` (the executor's copy thread slowing its compute thread, measured
    by ``moesim-profile``): the part of an expert that runs while the copy engine is busy takes f
    times longer. The lone miss of layer 0 with every expert X = 1 ms and the copy C = 10 ms, from
    the router's end (t = 0), f = 2: the 7 resident experts do 5 ms of work by t = 10 (at half speed),
    the last 2 ms at full speed, done at 12; the copy landed at 10, so no stall; the copied expert
    runs alone, [12, 13]. Without contention: residents [0, 7], stall [7, 10], copied expert [10, 11].
    So the step is 2 ms longer, its stall 3 ms shorter and its expert time 5 ms longer."""
    from hw.overheads import NoOverheads

    class Contention(NoOverheads):
        def __init__(self, factor):
            self.factor = factor

        def copy_contention(self, model, tokens, link):
            return self.factor

    rows = np.tile(np.arange(K), (3, L, 1))
    rows[2, 0, 7] = 63                                # the lone miss (capacity 63: 0..62 resident)
    sc = olmoe("policy.prefetch.capacity_per_layer=63")
    plain, slowed = (_one_ms_experts_ten_ms_copies(sc, rows, Contention(f)) for f in (1.0, 2.0))
    for st in (plain, slowed):   # steps 0 and 1 copy nothing: contention changes nothing there
        assert st.iloc[2].demand_loads == 1 and st.iloc[:2].demand_loads.sum() == 0
    assert slowed.iloc[:2].duration_s.tolist() == plain.iloc[:2].duration_s.tolist()
    a, b = plain.iloc[2], slowed.iloc[2]
    assert a.copy_stall_s == pytest.approx(3e-3, rel=1e-9) and b.copy_stall_s == 0.0
    assert b.duration_s - a.duration_s == pytest.approx(2e-3, rel=1e-6)
    assert b.expert_compute_s - a.expert_compute_s == pytest.approx(5e-3, rel=1e-6)


def test_a_copys_overhead_is_paid_after_it_lands_where_a_later_wait_can_hide_it():
    """Two misses in layer 0, every expert X = 1 ms, every copy C = 10 ms, copy overhead c = 2 ms,
    from the router's end (t = 0): copies [0, 10] and [10, 20]; the 6 resident experts [0, 6]; stall
    [6, 10]; c for the first copy [10, 12]; its expert [12, 13]; stall [13, 20]; c for the second
    [20, 22]; its expert [22, 23]. Against c = 0 (stalls [6, 10] and [11, 20]): the step is c = 2 ms
    longer, its stall c shorter (the first c hides in the second wait) and its other compute 2c
    longer. (Paid when the copies are ordered, both c would hide in the first stall: no longer.)"""
    from hw.overheads import NoOverheads

    class CopyOverhead(NoOverheads):
        def __init__(self, c):
            self.c = c

        def copy_overhead_s(self, model):
            return self.c

    rows = np.tile(np.arange(K), (3, L, 1))
    rows[2, 0, 6], rows[2, 0, 7] = 62, 63             # two misses (capacity 62: 0..61 resident)
    sc = olmoe("policy.prefetch.capacity_per_layer=62")
    plain, paid = (_one_ms_experts_ten_ms_copies(sc, rows, CopyOverhead(c)) for c in (0.0, 2e-3))
    for st in (plain, paid):
        assert st.iloc[2].demand_loads == 2 and st.iloc[:2].demand_loads.sum() == 0
    a, b = plain.iloc[2], paid.iloc[2]
    assert a.copy_stall_s == pytest.approx(13e-3, rel=1e-9) and b.copy_stall_s == pytest.approx(11e-3, rel=1e-9)
    assert b.duration_s - a.duration_s == pytest.approx(2e-3, rel=1e-6)
    assert b.other_compute_s - a.other_compute_s == pytest.approx(4e-3, rel=1e-6)


@pytest.mark.parametrize("overrides", [
    ["model=mixtral_8x7b", "policy.prefetch.capacity_per_layer=3", "workload.batch_size=16"],
    ["model=mixtral_8x7b", "policy.prefetch.capacity_per_layer=3", "workload.batch_size=16",
     "policy/prefetch=lookahead"],
    ["model=mixtral_8x7b", "policy.prefetch.capacity_per_layer=3", "workload.batch_size=16",
     "policy/prefetch=fiddler"],
    ["model=qwen3_30b_a3b", "policy.prefetch.capacity_per_layer=16", "workload.batch_size=16",
     "workload.arrival=poisson", "workload.arrival_rate_per_s=50"],
])
def test_staged_copies_fixed_ahead_keep_the_event_schedule(overrides, monkeypatch):
    """A staged copy fixed as soon as its buffer's release time is known (``fix_as_of``) starts and
    ends where the release event would have put it: the records are the same to the last bit as
    when every such copy waits for its release event, with prefetches queued (lookahead), host runs
    (fiddler) and requests arriving while others decode."""
    from sim.engine import PriorityServer

    sc = compose_scenario(overrides + ["workload.num_requests=24", "workload.output_len=6", "sim.progress=false"])
    fixed_ahead = simulate(sc)
    monkeypatch.setattr(PriorityServer, "fix_as_of", lambda self, job, submit_s: False)
    by_events = simulate(sc)
    assert by_events.summary["events"] > fixed_ahead.summary["events"]   # the shortcut was taken
    assert fixed_ahead.steps.equals(by_events.steps)
    assert fixed_ahead.requests.equals(by_events.requests)
    assert fixed_ahead.steps.demand_loads.sum() > 0


def test_a_policys_decision_time_is_charged_in_every_moe_layer():
    """``overheads.policy_overhead_s`` (what a policy's decisions cost the executor beyond LRU's,
    per MoE layer, measured by ``moesim-validate --recalibrate``): with every expert resident
    (nothing copied), each pass of lfu is exactly L x 0.5 ms longer, booked as other compute; an
    LRU run, which the overheads object charges nothing, is unchanged."""
    from hw.overheads import NoOverheads

    class Decisions(NoOverheads):
        def policy_overhead_s(self, model, policy):
            return 0.5e-3 if policy == "lfu" else 0.0

    rows = np.tile(np.arange(K), (3, L, 1))
    runs = {}
    for policy in ("lfu", "lru"):
        sc = olmoe("policy.prefetch.capacity_per_layer=64", f"policy/prefetch={policy}")
        runs[policy] = [_one_ms_experts_ten_ms_copies(sc, rows, o) for o in (NoOverheads(), Decisions())]
    plain, charged = runs["lfu"]
    assert (plain.demand_loads == 0).all() and len(plain) == 3
    np.testing.assert_allclose(charged.duration_s - plain.duration_s, L * 0.5e-3, rtol=1e-9)
    np.testing.assert_allclose(charged.other_compute_s - plain.other_compute_s, L * 0.5e-3, rtol=1e-9)
    assert runs["lru"][0].equals(runs["lru"][1])
