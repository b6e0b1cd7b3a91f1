"""How long ``moesim`` takes for one tiny request, end to end, and where the time goes.

    python benchmarks/startup.py               # 5 runs of `moesim workload.num_requests=1 workload.output_len=2`
    python benchmarks/startup.py --runs 9

Each run is a fresh process writing into a temporary directory (wall seconds, median printed).
Beside it, the floor that moesim's own dependencies set: a fresh interpreter that only imports
what every run needs (Hydra, pyarrow's Parquet writer, networkx, numpy, SimPy), timed the same
way; the difference is what moesim itself spends (its modules, two Hydra compositions, the routing
calibration, the simulation and the writes). A run does not import pandas (``sim.records``).
Then one more run under ``python -X importtime`` splits the imports: the packages that cost most
(cumulative seconds, from what Python reports in microseconds), and the watched ones it never
imported. Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time

TINY = ["workload.num_requests=1", "workload.output_len=2"]
WATCH = ("pandas", "pyarrow", "networkx", "hydra", "omegaconf", "numpy", "simpy", "scipy", "matplotlib", "torch")


def run_once(out_dir: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sim.cli", *TINY, f"hydra.run.dir={out_dir}"],
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


FLOOR = "import hydra, omegaconf, numpy, pyarrow.parquet, networkx, simpy"


def floor_once() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def import_costs() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sim.cli", *TINY, f"hydra.run.dir={d}/run"],
                             check=True, capture_output=True, text=True)
    costs: dict[str, float] = {}
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and m.group(3) in WATCH:
            costs[m.group(3)] = max(costs.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    walls, floors = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs):   # interleaved, so that both see the same machine
            walls.append(run_once(f"{d}/run{i}"))
            floors.append(floor_once())
    wall, floor = statistics.median(walls), statistics.median(floors)
    print(f"moesim, one tiny request: median {wall:.2f} s wall over {args.runs} runs "
          f"(min {min(walls):.2f}, max {max(walls):.2f})")
    print(f"floor (a fresh interpreter importing only the dependencies): median {floor:.2f} s; "
          f"moesim's own share {wall - floor:.2f} s")
    costs = import_costs()
    print("imports (cumulative s, one run): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                         sorted(costs.items(), key=lambda kv: -kv[1])))
    print("not imported: " + (", ".join(m for m in WATCH if m not in costs) or "none"))


if __name__ == "__main__":
    main()
