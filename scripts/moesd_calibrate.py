"""Calibrate the serving engine's per-pass host time (``sim.pass_overhead_s``) of the MoESD presets
against MoESD's published peak speedups, and say how well one constant explains all of them.

Every ``conf/experiment/moesd_*.yaml`` preset that has a published peak (``sim.moesd.PUBLISHED_PEAKS``)
is swept over its own batch sizes (the preset's ``hydra.sweeper.params``) once per candidate overhead.
A preset's simulated peak falls as the overhead grows (every speculative round runs k + 1 passes where
plain decoding runs one), so for each preset there is one overhead that reproduces its published
peak (``match_ms``). The calibrated constant is the one overhead that minimises the summed squared
relative peak error over all presets (printed last; ``error_pct`` is each preset's peak error at it);
``leave_one_out_ms`` refits it without each preset in turn and ``leave_one_out_error_pct`` is that
preset's peak error there, a prediction it took no part in.

    python scripts/moesd_calibrate.py                          # all presets, 3..8 ms in 0.5 ms steps
    python scripts/moesd_calibrate.py --overheads-ms 4,4.5,5,5.5,6 --jobs 2 -o calibration.csv
    python scripts/moesd_calibrate.py --presets qwen2_2xh800,mixtral_2xa800 hw.moe_kernels=per_expert

Trailing arguments are Hydra overrides applied to every run (after the preset). Writes one CSV row per
run (preset, overhead, batch size, simulated speedup) and prints the per-preset table and the
calibrated overhead. The peak of a curve is read off the swept batch sizes; between two candidate
overheads a preset's peak is interpolated linearly.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

CONF = Path(__file__).resolve().parents[1] / "conf" / "experiment"
DEFAULT_OVERHEADS_MS = [3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]


def preset_batch_sizes(preset: str) -> list[int]:
    """The batch sizes a preset's own ``-m`` sweep runs."""
    path = CONF / f"moesd_{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"moesd_calibrate: error: no preset {path.name} in {CONF}")
    params = (yaml.safe_load(path.read_text()).get("hydra") or {}).get("sweeper", {}).get("params", {})
    text = str(params.get("workload.batch_size", ""))
    if not text:
        raise SystemExit(f"moesd_calibrate: error: {path.name} sweeps no workload.batch_size")
    return [int(b) for b in text.split(",")]


def published_presets() -> dict[str, float]:
    """Every moesd_* preset with a published peak, by preset name (without the ``moesd_`` prefix)."""
    from sim.config import compose_scenario
    from sim.moesd import PUBLISHED_PEAKS

    out = {}
    for path in sorted(CONF.glob("moesd_*.yaml")):
        preset = path.stem.removeprefix("moesd_")
        sc = compose_scenario([f"+experiment=moesd_{preset}"])
        peak = PUBLISHED_PEAKS.get((sc.model.name, sc.hw.name))
        if peak is not None:
            out[preset] = peak
    return out


def sweep(task: tuple[str, float, tuple[str, ...]]) -> list[dict]:
    """One preset at one overhead over its batch sizes: a row per batch size."""
    from sim.config import compose_scenario
    from sim.engine import simulate

    preset, overhead_ms, overrides = task
    rows = []
    for b in preset_batch_sizes(preset):
        sc = compose_scenario([f"+experiment=moesd_{preset}", f"workload.batch_size={b}",
                               f"sim.pass_overhead_s={overhead_ms / 1e3!r}", "sim.progress=false", *overrides])
        s = simulate(sc).summary
        rows.append({"preset": preset, "pass_overhead_ms": overhead_ms, "batch_size": b, "speedup": s["speedup"]})
    return rows


def peaks(runs: pd.DataFrame) -> pd.DataFrame:
    """Peak speedup (and its batch size) per preset and overhead."""
    idx = runs.groupby(["preset", "pass_overhead_ms"])["speedup"].idxmax()
    return runs.loc[idx].rename(columns={"speedup": "peak_speedup", "batch_size": "peak_batch_size"}) \
        .reset_index(drop=True)


def _peak_at(curve: pd.DataFrame, overhead_ms: np.ndarray) -> np.ndarray:
    c = curve.sort_values("pass_overhead_ms")
    return np.interp(overhead_ms, c["pass_overhead_ms"], c["peak_speedup"])


def least_squares_overhead(pk: pd.DataFrame, published: dict[str, float], presets: list[str]) -> float:
    """The overhead (ms, within the swept range) minimising the summed squared relative peak error
    over ``presets``, found on a 0.01 ms grid of the interpolated peak curves."""
    lo, hi = pk["pass_overhead_ms"].min(), pk["pass_overhead_ms"].max()
    grid = np.round(np.arange(lo, hi + 1e-9, 0.01), 2)
    cost = np.zeros_like(grid)
    for p in presets:
        cost += (_peak_at(pk[pk.preset == p], grid) / published[p] - 1.0) ** 2
    return float(grid[int(np.argmin(cost))])


def matching_overhead(curve: pd.DataFrame, published: float) -> float | None:
    """The overhead at which the interpolated peak equals ``published`` (None outside the range)."""
    c = curve.sort_values("pass_overhead_ms")
    x, y = c["pass_overhead_ms"].to_numpy(), c["peak_speedup"].to_numpy()
    for i in range(len(x) - 1):
        if (y[i] - published) * (y[i + 1] - published) <= 0 and y[i] != y[i + 1]:
            return float(x[i] + (published - y[i]) * (x[i + 1] - x[i]) / (y[i + 1] - y[i]))
    return None


def report(runs: pd.DataFrame, published: dict[str, float]) -> tuple[float, pd.DataFrame]:
    """The calibrated overhead and the per-preset table (peak at it, error, leave-one-out error)."""
    pk = peaks(runs)
    presets = sorted(published)
    best = least_squares_overhead(pk, published, presets)
    rows = []
    for p in presets:
        curve = pk[pk.preset == p]
        at_best = float(_peak_at(curve, np.array([best]))[0])
        others = [q for q in presets if q != p]
        loo = least_squares_overhead(pk, published, others) if others else None
        loo_peak = float(_peak_at(curve, np.array([loo]))[0]) if loo is not None else None
        match = matching_overhead(curve, published[p])
        rows.append({"preset": p, "published_peak": published[p],
                     "match_ms": None if match is None else round(match, 2),
                     "peak_at_calibrated": round(at_best, 3),
                     "error_pct": round(100 * (at_best / published[p] - 1), 1),
                     "leave_one_out_ms": loo,
                     "leave_one_out_error_pct": None if loo_peak is None else round(100 * (loo_peak / published[p] - 1), 1)})
    return best, pd.DataFrame(rows)


def _progress(parts, total: int):
    for i, part in enumerate(parts, 1):
        print(f"  {i}/{total} sweeps done", file=sys.stderr, flush=True)
        yield part


def _overheads(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"moesd_calibrate: error: --overheads-ms {text!r} is not a comma-separated list of numbers")
    if len(values) < 2 or values[0] < 0:
        raise SystemExit(f"moesd_calibrate: error: --overheads-ms needs at least two values >= 0, got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moesd_calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    ap.add_argument("--presets", default=None, help="comma-separated preset names (default: all with a published peak)")
    ap.add_argument("--overheads-ms", default=",".join(f"{v:g}" for v in DEFAULT_OVERHEADS_MS),
                    help="candidate sim.pass_overhead_s values in milliseconds, comma-separated")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (1: run in this process)")
    ap.add_argument("-o", "--output", type=Path, default=Path("moesd_calibration.csv"), help="CSV of every run")
    args = ap.parse_args(argv)
    overheads = _overheads(args.overheads_ms)
    published = published_presets()
    if args.presets:
        chosen = [p.strip() for p in args.presets.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in published]
        if unknown:
            raise SystemExit(f"moesd_calibrate: error: no published peak for preset(s) {unknown}; "
                             f"choose from {sorted(published)}")
        published = {p: published[p] for p in chosen}
    for p in published:
        preset_batch_sizes(p)   # a preset without a batch sweep fails before any run
    tasks = [(p, h, tuple(args.overrides)) for p in sorted(published) for h in overheads]
    rows: list[dict] = []
    try:
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                parts = list(_progress(pool.map(sweep, tasks), len(tasks)))
        else:   # in this process (also what lets a caller that loaded this file by path run it)
            parts = list(_progress(map(sweep, tasks), len(tasks)))
        for part in parts:
            rows.extend(part)
    except Exception as exc:   # a bad override or config: one line, nothing written
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"moesd_calibrate: error: {first}")
    runs = pd.DataFrame(rows)
    best, table = report(runs, published)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    runs.to_csv(tmp, index=False)
    tmp.replace(args.output)
    print(table.to_string(index=False))
    print(f"calibrated sim.pass_overhead_s = {best / 1e3:g} s ({best:g} ms; least squares on relative peak error "
          f"over {len(published)} presets); wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
