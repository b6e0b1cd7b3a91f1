"""How fast the simulator runs: simulated decode steps and SimPy events per second (wall and CPU).

    python benchmarks/sim_speed.py            # Mixtral-8x7B on H100 PCIe, batch 1 and 64, LRU offloading
    python benchmarks/sim_speed.py --repeats 5 --model qwen2_57b_a14b

Each case is run ``--repeats`` times in this process and the median is printed. Request
generation is not timed; the engine run is (prefill passes included, so steps/s is a lower bound
for decode alone), in wall seconds and in this process's CPU seconds (``time.process_time``: what
another process on a shared core does not add; ``steps/cpu s``). Figures depend on the machine
and its load: quote medians from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sim.config import compose_scenario
from sim.engine import Engine
from workloads.requests import build_requests


def measure(model: str, batch: int, decode_steps: int, repeats: int) -> dict:
    requests = batch
    output_len = decode_steps // max(1, requests // batch) + 1
    sc = compose_scenario([f"model={model}", f"workload.batch_size={batch}", f"workload.num_requests={requests}",
                           "workload.prompt_len=128", f"workload.output_len={output_len}", "sim.progress=false"])
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    walls, cpus, events, decode = [], [], [], 0
    for _ in range(repeats):
        engine = Engine(sc, reqs)
        t0, c0 = time.perf_counter(), time.process_time()
        res = engine.run()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
        events.append(res.summary["events"])
        decode = int((res.steps.phase == "decode").sum())
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"model": model, "batch": batch, "decode_steps": decode, "events": events[0], "wall_s": wall,
            "steps_per_s": decode / wall, "events_per_s": events[0] / wall, "steps_per_cpu_s": decode / cpu,
            "hit_rate": res.summary["expert_hit_rate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral_8x7b")
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--decode-steps", type=int, default=2000, help="decode steps per run (batch 1)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':<16} {'batch':>5} {'decode steps':>12} {'events':>9} {'wall s':>8} "
          f"{'steps/s':>9} {'events/s':>10} {'steps/cpu s':>11} {'hit rate':>8}")
    for batch in (int(b) for b in args.batches.split(",")):
        steps = args.decode_steps if batch == 1 else max(64, args.decode_steps // 16)
        r = measure(args.model, batch, steps, args.repeats)
        print(f"{r['model']:<16} {r['batch']:>5} {r['decode_steps']:>12} {r['events']:>9} {r['wall_s']:>8.3f} "
              f"{r['steps_per_s']:>9.0f} {r['events_per_s']:>10.0f} {r['steps_per_cpu_s']:>11.0f} "
              f"{r['hit_rate']:>8.3f}")


if __name__ == "__main__":
    main()
