"""``moesim-report SWEEP_DIR``: gather a multirun's summaries into one table and standard plots.

Reads every run below ``SWEEP_DIR`` (a ``multirun/DATE/TIME`` directory, or any folder holding
runs), finds the config keys that vary between runs (from each run's ``.hydra/overrides.yaml``,
plus the key choices in the summaries), and writes into ``SWEEP_DIR``:

* ``report.csv`` and ``report.parquet``: one row per point, ``status`` and ``error`` first, then
  the varying keys, then the metrics;
* ``report_METRIC.png`` (see :mod:`sim.report_plots`), from the points whose status is ``ok``.

It also prints the table, and one line per point that is not ``ok``. A point's ``status``:

* ``ok``: its ``summary.json`` is complete (older runs without a ``status`` key count as ok);
* ``failed``: the run failed and said so (``summary.json`` with ``"status": "failed"``, the error
  in ``error``; the traceback is in the run's ``error.txt``);
* ``incomplete``: the run directory still holds the ``INCOMPLETE`` marker (interrupted or killed
  before its summary was written; any summary there is stale and not used);
* ``missing``: listed in the sweep's ``sweep_points.json`` but without a directory, or a run
  directory without ``summary.json``;
* ``bad``: a file the report needs is unreadable (a truncated ``summary.json``, a corrupt
  ``.hydra/overrides.yaml``); the row says which, and the report goes on.

Existing ``report.csv``, ``report.parquet`` or ``report_*.png`` are replaced only with ``--force``.
Exit status: 0 when the report was written (whatever the points' status), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from workloads.io import atomic_write

from .report_plots import plot

TABLE_METRICS = ["tpot_s", "ttft_s", "throughput_tok_s", "expert_hit_rate", "h2d_bytes", "copy_stall_s",
                 "prefetch_precision", "prefetch_recall", "wasted_prefetch_bytes", "host_runs",
                 "mean_active_experts", "sim_wall_s"]
POINTS_FILE = "sweep_points.json"     # written by the moesim sweeper (hydra_plugins/moesim_sweeper)
INCOMPLETE = "INCOMPLETE"             # sim/cli.py's marker of a run that has not finished
OK, FAILED, INCOMPLETE_STATUS, MISSING, BAD = "ok", "failed", "incomplete", "missing", "bad"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_overrides(items) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" in str(item):
            key, value = str(item).split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def read_overrides(run_dir: Path) -> tuple[dict[str, str], Optional[str]]:
    """(KEY -> VALUE of the run's ``.hydra/overrides.yaml``, problem or None)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}, None
    import yaml

    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = _one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}, f".hydra/overrides.yaml is unreadable ({first})"
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(i, (str, int, float, bool)) for i in items):
        return {}, ".hydra/overrides.yaml is not a list of KEY=VALUE overrides"
    return _parse_overrides(items), None


def read_summary(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the run's ``summary.json`` or None if there is none, problem or None)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None, None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"summary.json is unreadable (truncated?): {_one_line(exc)}"
    if not isinstance(summary, dict):
        return None, "summary.json does not hold a JSON object"
    return summary, None


def read_points(sweep_dir: Path) -> tuple[list[dict], Optional[str]]:
    """The sweep's points from ``sweep_points.json`` (``num``, ``dir``, ``overrides``), problem or None."""
    path = sweep_dir / POINTS_FILE
    if not path.exists():
        return [], None
    try:
        doc = json.loads(path.read_text())
        points = doc["points"]
        out = [{"num": int(p["num"]), "dir": p.get("dir"), "overrides": list(p.get("overrides") or [])}
               for p in points]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [], f"{POINTS_FILE} is unreadable ({type(exc).__name__}: {_one_line(exc)}); points that never ran are not listed"
    return out, None


def _run_dirs(sweep_dir: Path) -> list[Path]:
    found = set()
    for name in (".hydra", "summary.json", INCOMPLETE, "error.txt"):
        for p in sweep_dir.rglob(name):
            rel = p.relative_to(sweep_dir).parts
            if ".submitit" in rel or (name != ".hydra" and ".hydra" in rel[:-1]):
                continue
            found.add(p.parent)
    return sorted(found)


def _status_of(run_dir: Path, summary: Optional[dict], problems: list[str]) -> tuple[str, str]:
    if problems:
        return BAD, "; ".join(problems)
    if (run_dir / INCOMPLETE).exists():
        return INCOMPLETE_STATUS, "interrupted or killed before its summary was written (INCOMPLETE marker)"
    if summary is None:
        return MISSING, "no summary.json (the run died, or is still running)"
    status = str(summary.get("status", OK))
    if status == OK:
        return OK, ""
    error = _one_line(f"{summary.get('error_type', 'Error')}: {summary.get('error', '')}")
    return status, error


def gather(sweep_dir: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(table of every point, varying keys, warnings).

    The table has a row per run directory and per point of ``sweep_points.json`` that has none,
    with ``run``, ``point``, ``status``, ``error``, the overrides and the summary's keys (metrics only
    for ``ok`` rows).
    """
    points, problem = read_points(sweep_dir)
    warnings = [problem] if problem else []
    by_dir = {str(p["dir"]): p for p in points if p.get("dir") is not None}
    rows, seen = [], set()
    for run_dir in _run_dirs(sweep_dir):
        rel = str(run_dir.relative_to(sweep_dir)) or "."
        point = by_dir.get(rel)
        seen.add(rel)
        overrides, bad_overrides = read_overrides(run_dir)
        summary, bad_summary = read_summary(run_dir)
        problems = [p for p in (bad_overrides, bad_summary) if p]
        if bad_overrides and point is not None:
            overrides = _parse_overrides(point["overrides"])
        status, error = _status_of(run_dir, summary, problems)
        row = {"run": rel, "point": point["num"] if point else None, "status": status, "error": error}
        row.update({f"override:{k}": v for k, v in overrides.items()})
        if summary is not None and status not in (BAD, INCOMPLETE_STATUS, MISSING):
            # ok: the metrics; failed: the scenario's key choices, when the run got that far
            row.update({k: v for k, v in summary.items() if k not in ("status", "error")})
        rows.append(row)
    for point in points:
        if str(point.get("dir")) in seen:
            continue
        row = {"run": point.get("dir"), "point": point["num"], "status": MISSING,
               "error": "never ran (no run directory)"}
        row.update({f"override:{k}": v for k, v in _parse_overrides(point["overrides"]).items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table, [], warnings
    for col in table.columns:   # whole-number columns stay integers where some rows lack them
        values = [r[col] for r in rows if r.get(col) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values) \
                and len(values) < len(rows):
            table[col] = pd.array([r.get(col) for r in rows], dtype="Int64")
    override_cols = [c for c in table.columns if c.startswith("override:")]
    varying = [c[len("override:"):] for c in override_cols if table[c].dropna().astype(str).nunique() > 1]
    for col in override_cols:
        key = col[len("override:"):]
        if key in table.columns:   # an override named like a summary key (model=...): one column
            table[key] = table[key].astype(object).where(table[key].notna(), table[col])
            table = table.drop(columns=[col])
    table = table.rename(columns={c: c[len("override:"):] for c in override_cols if c in table.columns})
    for key in varying:
        numeric = pd.to_numeric(table[key], errors="coerce")
        if numeric[table[key].notna()].notna().all():
            whole = numeric.dropna()
            table[key] = numeric.astype("Int64") if (whole == whole.round()).all() else numeric
    table["point"] = pd.array(table["point"], dtype="Int64")
    table = table.sort_values([*varying, "run"], na_position="last", kind="stable").reset_index(drop=True)
    first = ["run", "point", "status", "error", *varying]
    table = table[first + [c for c in table.columns if c not in first]]
    return table, varying, warnings


def _check_outputs(sweep_dir: Path, plots: bool, force: bool) -> None:
    """ConfigError (one line) if a report file exists and ``force`` is not given."""
    from workloads.io import check_outputs

    outputs = [("", sweep_dir / "report.csv"), ("", sweep_dir / "report.parquet")]
    if plots:
        outputs += [("", p) for p in sorted(sweep_dir.glob("report_*.png"))]
    check_outputs(outputs, force=force)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="moesim-report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a multirun directory (multirun/DATE/TIME) or any folder of runs")
    ap.add_argument("--no-plots", action="store_true", help="write the table only")
    ap.add_argument("--force", action="store_true",
                    help="replace an existing report.csv, report.parquet and report_*.png")
    args = ap.parse_args(argv)
    sweep_dir: Path = args.sweep_dir

    def error(message: str) -> int:
        print(f"moesim-report: error: {message}", file=sys.stderr)
        return 2

    if not sweep_dir.is_dir():
        return error(f"{sweep_dir} is not a directory; give a multirun directory such as "
                     f"multirun/2026-11-22/10-00-00")
    from workloads.validation import ConfigError

    try:
        _check_outputs(sweep_dir, not args.no_plots, args.force)
    except ConfigError as exc:
        return error(str(exc))
    table, varying, warnings = gather(sweep_dir)
    for line in warnings:
        print(f"moesim-report: warning: {line}", file=sys.stderr)
    if table.empty:
        return error(f"no runs below {sweep_dir}; run a sweep with moesim -m first")
    atomic_write(sweep_dir / "report.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(sweep_dir / "report.parquet", lambda p: _to_parquet(table, p))
    shown = [c for c in [*varying, "status", *TABLE_METRICS] if c in table]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[shown].to_string(index=False))
    not_ok = table[table.status != OK]
    for _, row in not_ok.iterrows():
        point = f"point {row['point']}" if pd.notna(row["point"]) else "run"
        keys = " ".join(f"{k}={row[k]}" for k in varying if pd.notna(row[k]))
        print(f"{point}{f' ({keys})' if keys else ''} in {row['run']}: {row['status']}: {row['error']}")
    ok = table[table.status == OK].reset_index(drop=True)
    if len(not_ok):
        print(f"{len(ok)} of {len(table)} points ok; {len(not_ok)} not ({', '.join(sorted(set(not_ok.status)))})")
    if not args.no_plots:
        if ok.empty:
            print("no plots: no point finished ok")
        else:
            for path in plot(ok, varying, sweep_dir):
                print(f"wrote {path}")
    print(f"wrote {sweep_dir / 'report.csv'} and report.parquet")
    return 0


def _to_parquet(table: pd.DataFrame, path: Path) -> None:
    """Parquet needs one type per column: columns mixing types (a key that is a number in one run
    and a string in another) are written as strings."""
    out = table.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col] if v is not None and not (isinstance(v, float) and pd.isna(v))}
            if len(kinds) > 1 or kinds & {dict, list}:
                out[col] = out[col].map(lambda v: None if v is None or (isinstance(v, float) and pd.isna(v))
                                        else (json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    out.to_parquet(path, index=False)


def entry() -> None:
    sys.exit(main())
