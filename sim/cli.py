"""``moesim``: run one simulation (or a ``-m`` sweep) from the Hydra config in ``conf/``.

Writes into the Hydra run directory (``outputs/DATE/TIME/`` or ``multirun/DATE/TIME/N/``):
``summary.json``, ``steps.parquet``, ``requests.parquet`` and, with ``sim.timeline=true``,
``timeline.json`` (open in https://ui.perfetto.dev or chrome://tracing). Bad input exits with
status 2 and one line on stderr, leaving no output files behind.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from workloads.io import atomic_write
from workloads.validation import ConfigError

from .config import CONFIG_NAME, check_group_overrides, to_plain

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    print(f"moesim: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


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


def write_outputs(result, out_dir: Path) -> None:
    """summary.json, steps.parquet, requests.parquet (+ timeline.json), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "steps.parquet", lambda p: result.steps.to_parquet(p, index=False))
    atomic_write(out_dir / "requests.parquet", lambda p: result.requests.to_parquet(p, index=False))
    if result.timeline is not None:
        atomic_write(out_dir / "timeline.json",
                      lambda p: p.write_text(json.dumps({"traceEvents": result.timeline,
                                                         "displayTimeUnit": "ms"})))
    atomic_write(out_dir / "summary.json",
                  lambda p: p.write_text(json.dumps(result.summary, indent=2, sort_keys=True) + "\n"))


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


@hydra.main(config_path="pkg://conf", config_name=CONFIG_NAME, version_base="1.3")
def _run(cfg: DictConfig) -> None:
    from .engine import simulate
    from .scenario import build_scenario

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        scenario = build_scenario(to_plain(cfg))
        result = simulate(scenario)
    except ConfigError as exc:
        _remove_if_only_hydra_files(out_dir)
        _fail(str(exc))
        return
    write_outputs(result, out_dir)
    print(summary_table(result.summary))
    print(f"outputs: {out_dir}")


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as exc:
        _fail(str(exc))
    _run()


if __name__ == "__main__":
    main()
