"""``moesim-report SWEEP_DIR``: gather a multirun's summaries into one table and standard plots.

Reads every ``summary.json`` below ``SWEEP_DIR`` (a ``multirun/DATE/TIME`` directory, or any folder
holding runs), finds the config keys that vary between runs (from each run's
``.hydra/overrides.yaml``, plus the key choices in the summaries), and writes into ``SWEEP_DIR``:

* ``report.csv`` and ``report.parquet``: one row per run, the varying keys first, then the metrics;
* ``report_METRIC.png`` for TPOT, throughput, expert hit rate, bytes over PCIe and copy stall:
  the metric against the first varying key, one line (or bar group) per value of the second.

It also prints the table. Runs that failed (no summary.json) are listed and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from .report_plots import plot

TABLE_METRICS = ["tpot_s", "ttft_s", "throughput_tok_s", "expert_hit_rate", "h2d_bytes", "copy_stall_s",
                 "prefetch_precision", "prefetch_recall", "wasted_prefetch_bytes", "host_runs",
                 "mean_active_experts", "sim_wall_s"]


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    import yaml

    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        if "=" in str(item):
            key, value = str(item).split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def gather(sweep_dir: Path) -> tuple[pd.DataFrame, list[str], list[Path]]:
    """(table, varying keys, run dirs without a summary)."""
    rows, failed = [], []
    run_dirs = sorted({p.parent for p in sweep_dir.rglob(".hydra")} | {p.parent for p in sweep_dir.rglob("summary.json")})
    for run_dir in run_dirs:
        summary = run_dir / "summary.json"
        if not summary.exists():
            failed.append(run_dir)
            continue
        row = {"run": str(run_dir.relative_to(sweep_dir)) or "."}
        row.update({f"override:{k}": v for k, v in _overrides(run_dir).items()})
        row.update(json.loads(summary.read_text()))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table, [], failed
    override_cols = [c for c in table.columns if c.startswith("override:")]
    varying = [c for c in override_cols if table[c].astype(str).nunique() > 1]
    table = table.rename(columns={c: c[len("override:"):] for c in override_cols})
    varying = [c[len("override:"):] for c in varying]
    for key in varying:
        numeric = pd.to_numeric(table[key], errors="coerce")
        if numeric.notna().all():
            table[key] = numeric
    table = table.sort_values(varying or ["run"]).reset_index(drop=True)
    return table, varying, failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="moesim-report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a multirun directory (multirun/DATE/TIME) or any folder of runs")
    ap.add_argument("--no-plots", action="store_true", help="write the table only")
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"moesim-report: error: {args.sweep_dir} is not a directory; give a multirun directory "
              f"such as multirun/2026-11-22/10-00-00", file=sys.stderr)
        return 2
    table, varying, failed = gather(args.sweep_dir)
    if table.empty:
        print(f"moesim-report: error: no summary.json below {args.sweep_dir}; run a sweep with moesim -m first",
              file=sys.stderr)
        return 2
    table.to_csv(args.sweep_dir / "report.csv", index=False)
    table.to_parquet(args.sweep_dir / "report.parquet", index=False)
    shown = [c for c in [*varying, *TABLE_METRICS] if c in table]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[shown].to_string(index=False))
    if failed:
        print(f"{len(failed)} run(s) without summary.json (failed?): " + ", ".join(str(f) for f in failed))
    if not args.no_plots:
        for path in plot(table, varying, args.sweep_dir):
            print(f"wrote {path}")
    print(f"wrote {args.sweep_dir / 'report.csv'} and report.parquet")
    return 0


def entry() -> None:
    sys.exit(main())
