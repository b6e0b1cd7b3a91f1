"""How fast a serving-size run goes: CPU seconds per phase, decode steps and SimPy events per CPU second.

    python benchmarks/serving_speed.py                 # the issue-11 scenario: 300 requests
    python benchmarks/serving_speed.py --requests 30   # a tenth of it, for a quick look

The scenario: Qwen3-30B-A3B on one H100 PCIe (the default hw; the KV cache of 128 running
requests leaves room for most, not all, experts: LRU offloading), Poisson arrivals at 10
requests/s, prompts uniform in 860 +- 50% tokens, outputs uniform in 660 +- 50%, continuous
batching up to 128 requests. Each phase is timed once with ``time.process_time`` (CPU seconds of
this process): ``import`` (the modules a ``moesim`` run loads), ``config+requests`` (composing
the scenario, arrivals and lengths), ``routing`` (the synthetic routing, which the run generates
as it reads it; its CPU time is taken out of the engine's) and ``engine+records`` (the SimPy run,
prefill passes included, then the step and request frames and the summary). ``--profile`` prints
cProfile's top functions of the run instead. Figures depend on the machine and its load: quote
one run's numbers.
"""

from __future__ import annotations

import argparse
import time

T0 = time.process_time()

import sys  # noqa: E402
import os  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sim.config import compose_scenario  # noqa: E402
from sim.engine import Engine  # noqa: E402
from workloads.requests import build_requests  # noqa: E402

IMPORT_S = time.process_time() - T0


def overrides(requests: int) -> list[str]:
    return ["model=qwen3_30b_a3b", "hw=h100_pcie", "workload.batch_size=128", f"workload.num_requests={requests}",
            "workload.prompt_len=860", "workload.output_len=660", "workload.length_dist=uniform",
            "workload.length_spread=0.5", "workload.arrival=poisson", "workload.arrival_rate_per_s=10",
            "workload.max_prefill_tokens=16384", "sim.progress=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="cProfile the engine phase, print its top 25")
    args = ap.parse_args()
    t = time.process_time()
    sc = compose_scenario(overrides(args.requests))
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    requests_s = time.process_time() - t
    stream = getattr(reqs[0]._experts, "stream", None) if reqs else None   # the routing, built as it is read
    engine = Engine(sc, reqs)
    t = time.process_time()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        res = engine.run()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        res = engine.run()
    run_s = time.process_time() - t
    routing_s = stream.build_cpu_s if stream is not None else 0.0
    decode = int((res.steps.phase == "decode").sum())
    events = res.summary["events"]
    positions = sum(r.positions for r in reqs)
    print(f"requests {len(reqs)}, token positions {positions}, passes {len(res.steps)} ({decode} decode), "
          f"events {events}, hit rate {res.summary['expert_hit_rate']:.3f}, TPOT {res.summary['tpot_s'] * 1e3:.2f} ms")
    engine_s = run_s - routing_s
    print(f"CPU s: import {IMPORT_S:.2f}, config+requests {requests_s:.2f}, routing (built as read, during "
          f"the run) {routing_s:.2f} ({routing_s / positions * 1e6:.0f} us per position), engine+records "
          f"{engine_s:.2f}, total {time.process_time() - T0:.2f}")
    print(f"decode steps per engine CPU s {decode / engine_s:.0f}, passes/s {len(res.steps) / engine_s:.0f}, "
          f"events/s {events / engine_s:.0f}")


if __name__ == "__main__":
    main()
