"""``moesim``: run one simulation (or a ``-m`` sweep) from the Hydra config in ``conf/``.

Writes into the Hydra run directory (``outputs/DATE/TIME/`` or ``multirun/DATE/TIME/N/``):
``summary.json``, ``steps.parquet``, ``requests.parquet`` and, with ``sim.timeline=true``,
``timeline.json`` (open in https://ui.perfetto.dev or chrome://tracing). Each is written atomically;
``summary.json`` is written last and carries ``"status": "ok"``.

Exit status and what is left behind:

* bad input: status 2, one line ``moesim: error: ...`` on stderr, no output files. In a sweep every
  point is checked before the first runs (the ``moesim`` sweeper, ``hydra_plugins/moesim_sweeper``)
  and each bad point gets its own line; nothing is created.
* Ctrl-C: status 130, one line ``moesim: interrupted``. A run directory holds an ``INCOMPLETE``
  marker from the moment the simulation starts until its ``summary.json`` is written; an
  interrupted run removes the result files it had written and keeps the marker, so its directory
  never holds a partial set of results. A run killed outright (``kill -9``, a dying worker) keeps
  the marker too.
* a point of a sweep that fails at run time (any exception, ``ConfigError`` included) does not stop
  the sweep: its directory gets ``error.txt`` (the traceback) and a ``summary.json`` with
  ``"status": "failed"``, ``error_type`` and ``error``; after the sweep each failed point gets one
  line on stderr and the status is 1.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import traceback
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from workloads.io import atomic_write
from workloads.validation import ConfigError

from .config import CONFIG_NAME, check_group_overrides, to_plain

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
#: present in a run directory while its results are not all written (see the module docstring)
INCOMPLETE = "INCOMPLETE"
RESULT_FILES = ("summary.json", "steps.parquet", "requests.parquet", "timeline.json")


def _fail(message: str) -> None:
    print(f"moesim: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


fail = _fail


def _remove_if_only_hydra_files(out_dir: Path) -> None:
    """Remove a run directory this run created if it holds nothing but Hydra's own bookkeeping."""
    if not out_dir.is_dir():
        return
    ours = {".hydra"}
    if not all(p.name in ours or p.suffix == ".log" for p in out_dir.iterdir()):
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    # The date (run) or sweep (multirun) directory above it, if nothing else is in it.
    for parent in (out_dir.parent, out_dir.parent.parent):
        leftovers = [p for p in parent.iterdir() if p.name != "multirun.yaml"] if parent.is_dir() else [None]
        if leftovers:
            break
        shutil.rmtree(parent, ignore_errors=True)


def write_outputs(result, out_dir: Path, written: Optional[list] = None) -> None:
    """summary.json, steps.parquet, requests.parquet (+ timeline.json), each written atomically.

    summary.json comes last, so a directory with a summary has all of its run's results. Each path
    is appended to ``written`` (when given) once it is in place.
    """
    written = [] if written is None else written
    out_dir.mkdir(parents=True, exist_ok=True)

    def put(name: str, write) -> None:
        atomic_write(out_dir / name, write)
        written.append(out_dir / name)

    put("steps.parquet", result.step_records.write_parquet)
    put("requests.parquet", result.request_records.write_parquet)
    if result.timeline is not None:
        put("timeline.json", lambda p: p.write_text(json.dumps({"traceEvents": result.timeline,
                                                                 "displayTimeUnit": "ms"})))
    put("summary.json", lambda p: p.write_text(json.dumps(result.summary, indent=2, sort_keys=True) + "\n"))


# ------------------------------------------------------------------------------------------------
# Run directories: the INCOMPLETE marker, failures, and what the sweeper reads back


def _mark_incomplete(out_dir: Path) -> None:
    atomic_write(out_dir / INCOMPLETE,
                 lambda p: p.write_text("moesim started this run; this file is removed once summary.json "
                                        "is written. Still here: the run was interrupted or killed.\n"))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def clean_partial(out_dir: Optional[Path]) -> None:
    """Remove what a killed run may have left in ``out_dir``: atomic_write's temporary files and
    results without a summary (the marker stays until the point is run again)."""
    if out_dir is None or not out_dir.is_dir():
        return
    for tmp in out_dir.glob(".*.tmp"):
        _unlink(tmp)
    if not (out_dir / "summary.json").exists() or (out_dir / INCOMPLETE).exists():
        for name in RESULT_FILES:
            _unlink(out_dir / name)


def record_failure(out_dir: Optional[Path], error_type: str, message: str, details: str = "",
                   extra: Optional[dict] = None) -> dict:
    """Record a failed run in ``out_dir``: ``error.txt`` (``details``, e.g. the traceback) and a
    ``summary.json`` with ``status: failed``, ``error_type``, ``error`` (one line) and ``extra``
    (the scenario's key choices when it was built). Returns the summary."""
    summary = dict(extra or {})
    summary.update({"status": "failed", "error_type": error_type, "error": " ".join(message.split())})
    if out_dir is None:
        return summary
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES[1:]:
        _unlink(out_dir / name)
    atomic_write(out_dir / "error.txt", lambda p: p.write_text((details or message).rstrip() + "\n"))
    atomic_write(out_dir / "summary.json",
                 lambda p: p.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"))
    _unlink(out_dir / INCOMPLETE)
    return summary


def point_result(out_dir: Optional[Path]) -> Optional[dict]:
    """The summary of a finished run in ``out_dir`` (``status`` ok or failed), or None if it has no
    readable summary or is still marked incomplete."""
    if out_dir is None or (out_dir / INCOMPLETE).exists():
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    summary.setdefault("status", "ok")
    return summary


def _check_trace_header(path: str, model) -> None:
    """The cheap part of loading a router trace: the file, its columns and its shapes (no rows read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workloads.trace import REQUIRED_COLUMNS, TraceError, TraceMeta

    where = f"router trace {path}"
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{where} does not exist")
    if not p.is_file():
        raise TraceError(f"{where} is not a file")
    try:
        schema = pq.ParquetFile(p).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{where} is not a readable Parquet file ({' '.join(str(exc).split())})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise TraceError(f"{where} lacks column(s) {', '.join(missing)}")
    TraceMeta.from_metadata(schema.metadata, where).check_model(model, where)


def check_point(cfg: DictConfig) -> None:
    """Raise (ConfigError, one line) if ``moesim`` would refuse this composed config of a sweep point.

    What a run checks before simulating: every value typed and validated (``build_scenario``), and
    for ``workload=trace`` the trace file's header (exists, Parquet, columns, shapes matching the
    model). Problems only the whole trace shows (ragged records) still surface at run time, as a
    failed point. ``cfg`` may hold the ``hydra`` node; it is dropped here.
    """
    from .scenario import build_scenario

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    scenario = build_scenario(to_plain(cfg))
    if scenario.workload.kind == "trace":
        from workloads.validation import require

        require(not scenario.model.is_dense, "workload", "trace",
                f"model={scenario.model.name} is dense (num_experts=0): router traces do not apply")
        _check_trace_header(scenario.workload.path, scenario.model)


def _fmt(value, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}{unit}"


def summary_table(s: dict) -> str:
    rows = [
        ("scenario", f"{s['model']} on {s['hw']}, batch {s['batch_size']}, prefetch={s['prefetch']}"),
        ("TPOT", _fmt(s["tpot_s"], 1e3, " ms")),
        ("TTFT", _fmt(s["ttft_s"], 1e3, " ms")),
        ("throughput", _fmt(s["throughput_tok_s"], 1, " tok/s", 1)),
        ("decode tokens", str(s["decode_tokens"])),
        ("expert hit rate", _fmt(s["expert_hit_rate"], 100, " %", 1)),
        ("bytes over PCIe (H2D)", _fmt(s["h2d_bytes"], 1e-9, " GB", 2)),
        ("copy stall", _fmt(s["copy_stall_s"], 1, " s")),
        ("prefetch precision / recall", f"{_fmt(s['prefetch_precision'], 1, '', 2)} / {_fmt(s['prefetch_recall'], 1, '', 2)}"
         f" (wasted {_fmt(s['wasted_prefetch_bytes'], 1e-9, ' GB', 2)})"),
        ("experts run on host", str(s["host_runs"])),
        ("mean active experts", _fmt(s["mean_active_experts"], 1, "", 2)),
    ]
    if s.get("speculation", "none") != "none":
        rows += [
            ("speculation", f"{s['speculation']} (k={s.get('spec_k')}, drafter={s.get('drafter')}"
             + (f" {s['draft_model']}" if s.get("draft_model") else "") + ")"),
            ("acceptance rate", _fmt(s.get("acceptance_rate"), 100, " %", 1)),
            ("tokens per round (ETR)", _fmt(s.get("committed_tokens_per_round"), 1, "", 2)),
            ("speedup / TE / utility", f"{_fmt(s.get('speedup'), 1, 'x', 2)} / {_fmt(s.get('target_efficiency'), 1, '', 2)}"
             f" / {_fmt(s.get('spec_utility'), 1, '', 2)} (baseline TPOT {_fmt(s.get('baseline_tpot_s'), 1e3, ' ms')})"),
        ]
    rows += [
        ("simulated time", _fmt(s["simulated_time_s"], 1, " s")),
        ("simulation wall time", _fmt(s["sim_wall_s"], 1, " s", 2) + f" ({s['events']} events)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _simulate_into(cfg: DictConfig, out_dir: Path, state: dict) -> dict:
    """Build, mark incomplete, simulate, write; ``state`` keeps the scenario and the files written."""
    from .engine import simulate
    from .scenario import build_scenario

    scenario = build_scenario(to_plain(cfg))
    state["scenario"] = scenario
    _mark_incomplete(out_dir)
    result = simulate(scenario)
    result.summary["status"] = "ok"
    write_outputs(result, out_dir, state["written"])
    _unlink(out_dir / INCOMPLETE)
    _unlink(out_dir / "error.txt")   # from an earlier failed attempt at this point
    return result.summary


def _interrupted(out_dir: Path, state: dict) -> None:
    """Ctrl-C during a run: drop the results it wrote, keep (or put) the INCOMPLETE marker."""
    for path in state["written"]:
        _unlink(path)
    if out_dir.is_dir():
        try:
            _mark_incomplete(out_dir)
        except OSError:
            pass


@hydra.main(config_path="pkg://conf", config_name=CONFIG_NAME, version_base="1.3")
def _run(cfg: DictConfig) -> Optional[dict]:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    state: dict = {"written": [], "scenario": None}
    if hc.mode == RunMode.MULTIRUN:
        return _run_point(cfg, out_dir, state)
    try:
        summary = _simulate_into(cfg, out_dir, state)
    except KeyboardInterrupt:
        _interrupted(out_dir, state)
        raise
    except ConfigError as exc:
        _unlink(out_dir / INCOMPLETE)
        _remove_if_only_hydra_files(out_dir)
        _fail(str(exc))
        return None
    print(summary_table(summary))
    print(f"outputs: {out_dir}")
    return {"status": "ok"}


def _run_point(cfg: DictConfig, out_dir: Path, state: dict) -> dict:
    """One point of a sweep. Never exits: a failure is recorded in the point's directory and
    returned (``{"status": "failed", ...}``) for the sweeper; Ctrl-C still ends the sweep."""
    try:
        summary = _simulate_into(cfg, out_dir, state)
    except KeyboardInterrupt:
        _interrupted(out_dir, state)
        raise
    except (Exception, SystemExit) as exc:
        scenario = state["scenario"]
        recorded = record_failure(out_dir, type(exc).__name__, str(exc) or type(exc).__name__,
                                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                                  scenario.choices() if scenario is not None else None)
        return {k: recorded[k] for k in ("status", "error_type", "error")}
    print(summary_table(summary))
    print(f"outputs: {out_dir}")
    return {"status": "ok"}


def _register_sweeper() -> None:
    """Make the ``moesim`` sweeper known to Hydra even where its plugin scan cannot see the
    ``hydra_plugins`` folder of an editable install (a no-op where it can)."""
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.moesim_sweeper.moesim_sweeper import MoesimSweeper
    except ImportError:
        return
    Plugins.instance().register(MoesimSweeper)


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as exc:
        _fail(str(exc))
    _register_sweeper()
    try:
        _run()
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("moesim: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
