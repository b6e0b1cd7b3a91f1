"""The real executor with tensor parallelism: one scenario at ``hw.tensor_parallel`` 1 and 2, where
a pass's time goes, and what the all-reduces cost on this machine.

    python benchmarks/tensor_parallel.py                     # mini_mixtral, 4 requests, batch 4
    python benchmarks/tensor_parallel.py model=mini_qwen workload.batch_size=2

Each TP size runs the real executor (``real_backend.executor.RealExecutor``; at p = 2 two
processes joined by gloo, each with one torch thread) on the same requests with every expert
resident (``policy.prefetch.capacity_per_layer`` = the model's experts: no copies), and the
simulator (roofline, ``hw=this_cpu``) on the same scenario, its GPU link the measured gloo loopback
(``conf/hw/link/gloo_loopback.yaml``: ~290 us per ring phase, ~1.2 GB/s). Printed per run: median decode pass
(ms), the medians of its attention, expert and other-compute parts (the attention all-reduce is
inside attention, the FFN all-reduce inside other: ``combine``), the medians' ratio p=2 / p=1,
and gloo all-reduces timed alone (2 processes; one decode pass's hidden states, then 1 KiB to 16
MiB, median of 200 runs, 20 from 4 MiB) with the fit of a 2-rank ring to them (latency per phase,
bandwidth): what ``conf/hw/link/gloo_loopback.yaml`` holds for this machine.
Wall-clock figures of a shared machine: compare only figures from one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from real_backend.executor import RealExecutor
from sim.config import compose_scenario
from sim.engine import simulate
from workloads.requests import build_requests

BASE = ["hw=this_cpu", "hw.cost_model=roofline", "model=mini_mixtral", "workload.num_requests=4",
        "workload.prompt_len=32", "workload.output_len=17", "workload.batch_size=4", "sim.progress=false"]
TP2 = ["hw.num_gpus=2", "hw.tensor_parallel=2", "+hw/link@hw.gpu_link=gloo_loopback"]
PARTS = ["duration_s", "attention_s", "expert_compute_s", "other_compute_s"]


#: float32 elements of the all-reduces timed alone: 1 KiB .. 16 MiB (conf/hw/link/gloo_loopback.yaml's fit)
SIZES = (256, 2048, 65536, 1 << 20, 4 << 20)


def _allreduce_rank(rank: int, init_file: str, sizes: tuple, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    medians = []
    for n in sizes:
        x = torch.zeros(n)
        times = []
        for _ in range(200 if n < (1 << 20) else 20):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    if rank == 0:
        with open(out, "w") as f:
            f.write(" ".join(map(repr, medians)))
    dist.destroy_process_group()


def allreduce_s(sizes: tuple) -> list[float]:
    """Median seconds of a 2-process gloo all-reduce of each size (float32 elements)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_allreduce_rank, args=(f"{d}/init", tuple(sizes), f"{d}/out"), nprocs=2)
        return [float(v) for v in open(f"{d}/out").read().split()]


def decode_medians(steps) -> dict[str, float]:
    dec = steps[steps["phase"] == "decode"]
    return {k: float(dec[k].median()) for k in PARTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the scenario")
    args = ap.parse_args()
    rows = {}
    for p in (1, 2):
        ov = BASE + list(args.overrides) + (TP2 if p == 2 else [])
        sc = compose_scenario(ov)
        sc = compose_scenario(ov + [f"policy.prefetch.capacity_per_layer={sc.model.num_experts}"])
        reqs = build_requests(sc.workload, sc.model, sc.seed)
        real = RealExecutor(sc, reqs).run()
        sim = simulate(sc, reqs)
        rows[p] = (decode_medians(real.steps), decode_medians(sim.steps))
        print(f"p={p}: model={sc.model.name}, batch {sc.workload.batch_size}, {len(real.steps)} passes, "
              f"h2d_bytes {real.summary['h2d_bytes']:.0f}")
    print(f"{'median decode pass (ms)':28s} {'real p=1':>9s} {'real p=2':>9s} {'ratio':>6s}   "
          f"{'sim p=1':>9s} {'sim p=2':>9s} {'ratio':>6s}")
    for k in PARTS:
        r1, r2 = rows[1][0][k] * 1e3, rows[2][0][k] * 1e3
        s1, s2 = rows[1][1][k] * 1e3, rows[2][1][k] * 1e3
        print(f"{k:28s} {r1:9.3f} {r2:9.3f} {r2 / r1 if r1 else float('nan'):6.2f}   "
              f"{s1:9.4f} {s2:9.4f} {s2 / s1 if s1 else float('nan'):6.2f}")
    sc = compose_scenario(BASE + list(args.overrides))
    sizes = (sc.workload.batch_size * sc.model.hidden_size,) + SIZES
    secs = allreduce_s(sizes)
    print("gloo all-reduce alone, 2 processes (median of 200, 20 from 4 MiB): " + ", ".join(
        f"{n * 4} B {t * 1e6:.0f} us" for n, t in zip(sizes, secs)))
    # a 2-rank ring all-reduce of n bytes: 2 phases of (latency + n/2 / bandwidth) = 2 latency + n / bandwidth
    slope, intercept = np.polyfit([4.0 * n for n in SIZES], secs[1:], 1)
    print(f"fit (hw/link gpu_link for this machine): latency_s {intercept / 2:.3g} per phase, "
          f"bandwidth_bps {1.0 / slope:.3g}")


if __name__ == "__main__":
    main()
