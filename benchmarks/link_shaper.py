"""How closely the CPU copy engine's link shaper (``real_backend.offload.CopyEngine``) holds its cap.

    python benchmarks/link_shaper.py              # 7 copies per case
    python benchmarks/link_shaper.py --reps 21

Every shaped copy takes at least bytes / bandwidth by construction (the tests check that, and the
pacing arithmetic on a virtual clock); how much longer it takes is a property of this machine and
its load -- a sleeping thread's wake-up, the memmove speed. Printed per case: the ideal time, the
median and maximum measured copy time, and median / ideal. Also: an unshaped copy's speed (the
caps below must be slower than this, or they do not bind), and shaped copies while a torch thread
computes (the copy worker on SCHED_FIFO where the process may; see ``CopyEngine.sched``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from real_backend.offload import CopyEngine, CopyJob  # noqa: E402

CASES = [(16 << 20, 2e9), (64 << 20, 4e9), (256 << 10, 2e9)]


def durations(eng: CopyEngine, n: int, reps: int) -> list[float]:
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    out = []
    for i in range(reps):
        job = eng.submit(CopyJob((0, i), "prefetch", 1, n, src=src, dst=dst))
        job.done.wait()
        if job.error is not None:
            raise job.error
        out.append(job.end - job.start)
    return out


def case(label: str, n: int, bw: float | None, reps: int, compute: bool = False) -> None:
    eng = CopyEngine("cpu", bandwidth_bps=bw)
    stop = threading.Event()

    def busy():
        a, w = torch.randn(8, 1024), torch.randn(4096, 1024)
        while not stop.is_set():
            a @ w.t()

    t = threading.Thread(target=busy) if compute else None
    try:
        if t is not None:
            t.start()
        d = durations(eng, n, reps)
    finally:
        stop.set()
        if t is not None:
            t.join()
        eng.close()
    med = statistics.median(d)
    size = f"{n / 2**20:g} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
    if bw is None:
        print(f"{label:<22} {size:>9} {'-':>8} {'-':>10} {med * 1e3:>10.3f} {max(d) * 1e3:>9.3f} "
              f"{n / med / 1e9:>7.2f} GB/s  ({eng.sched})")
        return
    ideal = n / bw
    print(f"{label:<22} {size:>9} {bw / 1e9:>6.1f}GB {ideal * 1e3:>10.3f} {med * 1e3:>10.3f} {max(d) * 1e3:>9.3f} "
          f"{med / ideal:>7.3f}x ideal  ({eng.sched})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="copies per case (median and max over them)")
    args = ap.parse_args()
    print(f"{'case':<22} {'bytes':>9} {'cap':>8} {'ideal ms':>10} {'median ms':>10} {'max ms':>9} {'ratio':>7}")
    for n, bw in CASES:
        case("shaped", n, bw, args.reps)
    case("unshaped", 16 << 20, None, args.reps)
    case("shaped, torch computing", 4 << 20, 2e9, args.reps, compute=True)


if __name__ == "__main__":
    main()
