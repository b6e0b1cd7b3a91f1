"""``moesim-validate``: run the real executor and the simulator on the same scenario and compare.

    moesim-validate [KEY=VALUE ...] [--repeats N] [--profile-dir DIR] [-o OUT]
                    [--sweep KEY=V1,V2 ...] [--recalibrate] [--free-running] [--checkpoint DIR]
                    [--torch-profile] [--device cpu|cuda]

``--checkpoint DIR``: the real model's weights from a local safetensors checkpoint (Hugging Face
Mixtral names; ``real_backend.model``) instead of random ones; the shapes must be the scenario's
``model``. Weights change what a free-running router picks, not the op costs.

One validation: the scenario is composed with ``sim.config.compose_scenario`` (defaults below,
then the user's overrides), the requests are built once (synthetic or trace) and shared by both
engines. The real executor (``real_backend.executor``) runs ``--repeats`` times (default 3; medians
are quoted); the simulator runs once with the measured ``Table`` cost model
(``hw.cost_model=table``, ``hw.profile_dir`` = ``--profile-dir``, else the scenario's profile
directory when it holds the model, else a ``moesim-profile --quick`` profile cached in
``$MOESIM_CACHE`` or ``~/.cache/moesim/profile-<device>-quick``). Written into OUT
(default ``validation/DATE-TIME``):

* ``comparison.csv``: per metric (``tpot_s, ttft_s, throughput_tok_s, decode_step_s, copy_stall_s,
  h2d_bytes, expert_hit_rate``) the simulated value, the real median (and min, max over repeats)
  and the error ``(sim - real) / real`` in %; then the per-iteration relative error of
  ``duration_s`` (passes matched by step index, real = median over repeats): ``iter_abs_err_mean``,
  ``iter_abs_err_p50``, ``iter_abs_err_p99`` (of |error|) and ``iter_err_mean`` (signed), in %.
  Speculative decoding (``policy/speculation=static|cascade``, ``drafter=model|ngram``) adds
  ``decode_tokens`` (committed by decode passes), ``draft_tokens``, ``accepted_tokens``,
  ``spec_rounds``, ``acceptance_rate``, ``committed_tokens_per_round`` (which must agree exactly:
  both engines plan the same rounds, as they route the same tokens; with ``cascade`` K follows
  each engine's own measured times, so they may not), ``verify_step_s``, ``draft_round_s`` and
  ``reject_round_s`` (``sim.metrics``). The cost tables must then also hold the draft model
  (``moesim-profile --models ...,mini_draft``).
* ``scatter.png``: simulated vs real per-iteration time.
* ``sim_timeline.json``, ``real_timeline.json``: Chrome traces (the real one of the median run).
* ``sim/`` and ``real/``: ``summary.json``, ``steps.parquet``, ``requests.parquet`` of each engine
  (``sim.cli.write_outputs``; real = the run with the median TPOT), ``real_repeats.csv``: every
  real run's summary.

Defaults (each replaced by an override of the same key): ``hw=this_cpu model=mini_mixtral
workload.num_requests=4 workload.prompt_len=32 workload.output_len=17`` (16 decode tokens)
``hw.host_link.bandwidth_bps=2e9`` (a link cap the CPU shaper holds, at which copying an expert
takes several times as long as computing it for one token -- mini_mixtral: 5.5 vs 0.8 ms,
mini_qwen: 0.8 vs 0.15 ms -- the offload-bound regime PCIe puts real MoE experts in; it is also
the cap ``moesim-profile`` measures the copy overheads at), and, unless the user sizes
the expert cache (``policy.prefetch.capacity_per_layer``, ``hw.gpu.memory_bytes`` or another
``hw``), ``policy.prefetch.capacity_per_layer`` = half the model's experts (4 of 8 for
mini_mixtral, 16 of 32 for mini_qwen), so offloading matters.

A sweep (``--sweep KEY=V1,V2 ...``, cartesian product over the keys, on top of the fixed
overrides) runs one validation per cell into ``OUT/cells/NNN-.../`` and writes ``accuracy.csv``:
one row per cell with its key values, sim and real TPOT, the TPOT error, and the policy ranking
by TPOT within its group (the cells that differ only in ``policy/prefetch``): ``sim_rank``,
``real_rank``, ``ranking_agrees`` (the whole group's order is the same). The cost tables are
resolved (profiled if needed) once, before the first cell. Every cell is simulated first, then the
real runs go round robin over the cells (repeat 1 of every cell, then repeat 2, ...): a stretch of
load on the shared machine then moves one repeat of several cells, which their medians absorb,
rather than every repeat of one cell (a sweep cell once read -12.8% that read -2.4% and -3.4% when
validated alone).

Free-running (``--free-running``): the real model's own router decides instead of the requests'
routing (``RealExecutor(free_running=True)``). The real runs go first; the routing the first one
chose is written to ``OUT/free_running_trace.parquet`` (a router trace, ``moesim workload=trace``
replays it) and the simulator replays exactly that. Repeats that choose differently (nondeterministic
kernels) are reported. Policies that need the routing before a pass (``oracle``, ``pregated``,
``speculating``, ``lookahead``) are refused.

``--recalibrate``: before anything is simulated, the executor-overhead rows of the validated
models (``layer_overhead``, ``copy_overhead``, ``host_run_overhead``, and a draft model's
``draft_pass_overhead``: the executor's time minus what the op tables say, from synthetic
calibration runs, never a validated scenario) are measured again
(``real_backend.profile.recalibrate``, ~1.5 min per MoE model here), with the ``policy_overhead``
rows of every validated prefetch policy but LRU (its decision hooks' time in the executor beyond
LRU's, 13-28 s per policy and model), into ``OUT/profile``, a copy of the profile with those rows
replaced; the simulator uses that copy. Those rows carry
the machine's speed at the moment they are measured, and on a shared machine that speed drifts
between a profile and a validation run minutes later (README, "Validation on this CPU").

OUT must be missing or empty unless ``--force`` (which writes into it, replacing files of the same
names); it is never an input's directory (``--profile-dir``, ``--checkpoint``, ``workload.path``).
Both are checked before anything runs.

Bad input prints one line ``moesim-validate: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from workloads.io import FORCE_HELP_DIR, check_outputs
from workloads.validation import ConfigError
from .cli_util import OneLineParser as _Parser, run_cli

PROG = "moesim-validate"
RECALIBRATED_PROFILE = "profile"   # OUT/profile: the tables --recalibrate simulated with
DEFAULT_OVERRIDES = ("hw=this_cpu", "model=mini_mixtral", "workload.num_requests=4", "workload.prompt_len=32",
                     "workload.output_len=17", "hw.host_link.bandwidth_bps=2e9")
CAPACITY_KEYS = ("policy.prefetch.capacity_per_layer", "hw.gpu.memory_bytes", "hw/gpu", "hw")
METRICS = ("tpot_s", "ttft_s", "throughput_tok_s", "decode_step_s", "copy_stall_s", "h2d_bytes", "expert_hit_rate")
SPEC_METRICS = ("decode_tokens", "draft_tokens", "accepted_tokens", "spec_rounds", "acceptance_rate",
                "committed_tokens_per_round", "verify_step_s", "draft_round_s", "reject_round_s")
TIME_METRICS = ("tpot_s", "ttft_s", "decode_step_s", "copy_stall_s", "verify_step_s", "draft_round_s",
                "reject_round_s")
POLICY_KEY = "policy/prefetch"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_defaults(overrides: Sequence[str]) -> list[str]:
    """The default overrides whose keys the user did not set, then the user's; and, unless the user
    sized the expert cache (``policy.prefetch.capacity_per_layer``, ``hw.gpu.memory_bytes``, another
    ``hw``), ``capacity_per_layer`` = half the model's experts, so offloading matters."""
    keys = {_key(o) for o in overrides if "=" in o}
    out = [d for d in DEFAULT_OVERRIDES if _key(d) not in keys] + list(overrides)
    if not keys & set(CAPACITY_KEYS):
        spec = _compose(out + ["sim.progress=false", "++hw.cost_model=roofline"]).model   # tables may not exist yet
        if spec.num_experts:   # a dense model has no experts to cache
            out.append(f"policy.prefetch.capacity_per_layer={max(1, spec.num_experts // 2)}")
    return out


def _compose(overrides: Sequence[str]):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sim.config import compose_scenario

    try:
        return compose_scenario(list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None


# ------------------------------------------------------------------------------------ cost tables
def _profiled(profile_dir: Path, model_name: str) -> bool:
    try:
        header = json.loads((profile_dir / "profile.json").read_text())
    except (OSError, ValueError):
        return False
    return model_name in header.get("models", {})


def default_cache_dir(device: str = "cpu") -> Path:
    root = os.environ.get("MOESIM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "moesim") / f"profile-{device}-quick"


def resolve_profile_dir(scenarios, profile_dir: Optional[str | Path], device: str = "cpu",
                        log: Callable[[str], None] = lambda s: None) -> Path:
    """The directory of cost tables for every scenario's model: ``profile_dir`` if given (it must
    hold them), else the scenarios' ``hw.profile_dir`` if it holds them, else a quick profile
    in the cache directory (profiled now for the models it lacks)."""
    models = sorted({sc.model.name for sc in scenarios}
                    | {sc.draft_model.name for sc in scenarios if getattr(sc, "draft_model", None) is not None})
    if profile_dir is not None:
        d = Path(profile_dir)
        missing = [m for m in models if not _profiled(d, m)]
        if missing:
            raise ConfigError(f"--profile-dir={profile_dir} holds no cost tables for model(s) {', '.join(missing)}; "
                              f"run moesim-profile --models {','.join(missing)} -o {profile_dir}")
        return d.resolve()
    own = {Path(sc.hw.profile_dir) for sc in scenarios if getattr(sc.hw, "profile_dir", None)}
    for d in own:
        if all(_profiled(d, m) for m in models):
            return d.resolve()
    cache = default_cache_dir(device)
    missing = [m for m in models if not _profiled(cache, m)]
    if missing:
        from .profile import run_profile

        log(f"profiling {', '.join(missing)} (--quick) into {cache}")
        run_profile(missing, device, cache, quick=True, log=lambda s: log(f"moesim-profile: {s}"))
    return cache.resolve()


def recalibrated_profile_dir(pdir: Path, scenarios, out: Path, device: Optional[str],
                             log: Callable[[str], None]) -> Path:
    """``--recalibrate``: the profile in ``pdir`` with the executor-overhead rows of the scenarios'
    models (and draft models) measured again now (``real_backend.profile.recalibrate``), and the
    ``policy_overhead`` rows of their prefetch policies besides LRU, written to ``OUT/profile``."""
    from .profile import recalibrate

    models = {sc.model.name: sc.model for sc in scenarios}   # the specs as configured (overrides included)
    models.update({sc.draft_model.name: sc.draft_model for sc in scenarios
                   if getattr(sc, "draft_model", None) is not None})
    policies = sorted({sc.prefetch.name for sc in scenarios} - {"lru"})   # their decisions' time beyond LRU's
    log(f"recalibrating the executor overheads of {', '.join(sorted(models))} (from {pdir}) into "
        f"{out / RECALIBRATED_PROFILE}" + (f", with the decision time of {', '.join(policies)}" if policies else ""))
    return recalibrate(pdir, [models[m] for m in sorted(models)], out / RECALIBRATED_PROFILE, device,
                       log=lambda s: log(f"moesim-profile: {s}"), policies=policies).resolve()


# ------------------------------------------------------------------------------------ one validation
def _median_index(values: Sequence[float]) -> int:
    order = sorted(range(len(values)), key=lambda i: (math.inf if values[i] is None else values[i]))
    return order[(len(order) - 1) // 2]


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def per_iteration(sim_steps: pd.DataFrame, real_runs: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per step index: simulated and real (median over repeats) duration and the relative error."""
    real = pd.concat([r[["step", "duration_s"]] for r in real_runs]).groupby("step")["duration_s"].median()
    sim = sim_steps.set_index("step")[["phase", "batch_size", "tokens", "duration_s"]]
    df = sim.join(real.rename("real_duration_s"), how="inner").rename(columns={"duration_s": "sim_duration_s"})
    df["rel_err"] = (df["sim_duration_s"] - df["real_duration_s"]) / df["real_duration_s"]
    return df.reset_index()


def with_spec_totals(summary: dict, steps: pd.DataFrame) -> dict:
    """``summary`` plus the run's ``draft_tokens`` and ``accepted_tokens`` totals (from its steps)."""
    out = dict(summary)
    for c in ("draft_tokens", "accepted_tokens"):
        if c in steps:
            out[c] = float(steps[c].sum())
    return out


def comparison_table(sim_summary: dict, real_summaries: Sequence[dict], iters: pd.DataFrame,
                     metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    rows = []
    for m in metrics:
        s = _num(sim_summary.get(m))
        vals = [_num(r.get(m)) for r in real_summaries]
        finite = [v for v in vals if not math.isnan(v)]
        med = float(np.median(finite)) if finite else float("nan")
        err = (s - med) / med * 100 if finite and med != 0 and not math.isnan(s) else float("nan")
        if finite and med == 0 and s == 0:
            err = 0.0
        rows.append({"metric": m, "sim": s, "real_median": med, "real_min": min(finite) if finite else float("nan"),
                     "real_max": max(finite) if finite else float("nan"), "error_pct": err})
    e = iters["rel_err"].to_numpy(dtype=float) * 100
    e = e[np.isfinite(e)]
    stats = {"iter_abs_err_mean": np.mean(np.abs(e)) if len(e) else float("nan"),
             "iter_abs_err_p50": np.percentile(np.abs(e), 50) if len(e) else float("nan"),
             "iter_abs_err_p99": np.percentile(np.abs(e), 99) if len(e) else float("nan"),
             "iter_err_mean": np.mean(e) if len(e) else float("nan")}
    for k, v in stats.items():
        rows.append({"metric": k, "sim": float("nan"), "real_median": float("nan"), "real_min": float("nan"),
                     "real_max": float("nan"), "error_pct": float(v)})
    return pd.DataFrame(rows, columns=["metric", "sim", "real_median", "real_min", "real_max", "error_pct"])


def format_table(df: pd.DataFrame) -> str:
    def f(v, metric=""):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if metric in TIME_METRICS:
            return f"{v * 1e3:.3f} ms"
        if metric == "throughput_tok_s":
            return f"{v:.1f} tok/s"
        if metric == "h2d_bytes":
            return f"{v / 1e6:.1f} MB"
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.4g}"

    lines = [f"{'metric':<20} {'sim':>12} {'real (median)':>14} {'error':>9}"]
    for r in df.itertuples():
        err = "-" if math.isnan(r.error_pct) else f"{r.error_pct:+.1f} %"
        lines.append(f"{r.metric:<20} {f(r.sim, r.metric):>12} {f(r.real_median, r.metric):>14} {err:>9}")
    return "\n".join(lines)


def scatter_plot(iters: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for phase, marker in (("prefill", "s"), ("decode", "o")):
        d = iters[iters["phase"] == phase]
        if len(d):
            ax.scatter(d["real_duration_s"] * 1e3, d["sim_duration_s"] * 1e3, s=14, marker=marker, alpha=0.7,
                       label=phase)
    if len(iters):
        lo = float(min(iters["real_duration_s"].min(), iters["sim_duration_s"].min())) * 1e3 * 0.9
        hi = float(max(iters["real_duration_s"].max(), iters["sim_duration_s"].max())) * 1e3 * 1.1
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="sim = real")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel("real per-iteration time (ms, median of repeats)")
    ax.set_ylabel("simulated per-iteration time (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Models:
    """Keeps the last built (model, host store) so repeats and cells of one model share them."""

    def __init__(self):
        self.key = None
        self.value = None

    def draft(self, scenario, device, dtype):
        """The scenario's draft model (``drafter=model``), kept across repeats and cells."""
        from .executor import build_draft_model
        from hw.table import model_signature

        d = scenario.draft_model if scenario.speculation.name != "none" and scenario.speculation.drafter == "model" \
            else None
        if d is None:
            return None
        key = (json.dumps(model_signature(d), sort_keys=True, default=str), d.num_layers, scenario.seed,
               str(device), str(dtype))
        if key != getattr(self, "draft_key", None):
            self.draft_key, self.draft_value = None, None
            self.draft_value = build_draft_model(scenario, device, dtype)
            self.draft_key = key
        return self.draft_value

    def get(self, scenario, device, checkpoint=None):
        from .executor import build_model_and_store
        from hw.table import model_signature

        key = (json.dumps(model_signature(scenario.model), sort_keys=True, default=str), scenario.model.num_layers,
               scenario.model.dense_layers, scenario.seed, str(device), str(checkpoint))
        if key != self.key:
            self.key, self.value = None, None
            self.value = build_model_and_store(scenario, device, checkpoint=checkpoint)
            self.key = key
        return self.value


_MODELS = _Models()


def check_free_running(scenario) -> None:
    """One-line error unless the scenario's policy can run with the model's own router."""
    from sim.policies.base import prefetch_policy_class

    cls = prefetch_policy_class(scenario.prefetch.name)
    if cls.needs_future or cls.uses_predictions:
        need = "the future routing" if cls.needs_future else "gate-lookahead predictions"
        raise ConfigError(f"--free-running: policy/prefetch={scenario.prefetch.name} needs {need} before each pass, "
                          f"which a model whose own router decides cannot give; drop --free-running (forced "
                          f"routing) or choose lru, lfu, transition, moe_infinity or fiddler")


@dataclass
class _Validation:
    """One validation between its steps: composed, simulated (unless free-running) and ready for
    real runs (``_prepare``), real runs added one at a time (``_real_run``), compared and written
    (``_finish``)."""

    scenario: Any
    sim_scenario: Any
    overrides: list
    profile_dir: Path
    out: Path
    requests: list
    cost: Any
    model: Any
    store: Any
    draft: Any
    free_running: bool
    sim: Any = None
    reals: list = field(default_factory=list)
    chosen: Optional[list] = None   # free-running: the routing the first real run chose


def _prepare(overrides: Sequence[str], profile_dir, out, device, log, _resolved_profile, free_running: bool,
             checkpoint, recalibrate: bool = False) -> _Validation:
    from hw.cost import cost_model_for
    from workloads.requests import build_requests

    from .executor import check_runnable

    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise ConfigError(f"--checkpoint={checkpoint} is not a directory; give a local safetensors checkpoint "
                          f"directory (model*.safetensors, config.json)")
    ov = with_defaults(overrides)
    # The real run needs no cost tables: check the scenario without them (they may not exist yet).
    scenario = _compose(ov + ["sim.progress=false", "++hw.cost_model=roofline"])
    if free_running:
        check_free_running(scenario)
    check_runnable(scenario, free_running)
    check_one_device(scenario)
    pdir = _resolved_profile or resolve_profile_dir([scenario], profile_dir, device or "cpu", log)
    out = Path(out) if out is not None else Path("validation") / _dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    if recalibrate and _resolved_profile is None:
        pdir = recalibrated_profile_dir(pdir, [scenario], out, device, log)
    sim_scenario = _compose(ov + ["sim.progress=false", "sim.timeline=true", "++hw.cost_model=table",
                                  f"++hw.profile_dir={pdir}"])
    requests = build_requests(scenario.workload, scenario.model, scenario.seed)
    cost = cost_model_for(sim_scenario.hw, sim_scenario.model)   # checks the tables before anything runs
    model, store = _MODELS.get(scenario, device, checkpoint)
    v = _Validation(scenario, sim_scenario, ov, pdir, out, requests, cost, model, store,
                    _MODELS.draft(scenario, device, model.dtype), free_running)
    if not free_running:
        v.sim = _run_sim(v, requests, log)
    return v


def _run_sim(v: _Validation, requests, log):
    from sim.engine import simulate

    t0 = time.perf_counter()
    res = simulate(v.sim_scenario, requests, cost=v.cost, progress=False)
    log(f"simulated in {time.perf_counter() - t0:.2f} s")
    return res


def _real_run(v: _Validation, repeats: int, torch_profile: bool, log) -> None:
    """One more real run of ``v`` (the ``len(v.reals)``-th)."""
    from .executor import RealExecutor

    i = len(v.reals)
    t0 = time.perf_counter()
    tp = v.out / f"torch_profile_{i}.json" if torch_profile else None
    ex = RealExecutor(v.scenario, v.requests, model=v.model, store=v.store, cost=v.cost, timeline=True,
                      torch_profile=tp, free_running=v.free_running, draft=v.draft)
    res = ex.run()
    v.reals.append(res)
    log(f"real run {i + 1}/{repeats}: TPOT {_num(res.summary['tpot_s']) * 1e3:.3f} ms "
        f"({time.perf_counter() - t0:.2f} s)")
    if v.free_running:
        routed = ex.routed_requests()
        if v.chosen is None:
            v.chosen = routed
        elif any(not np.array_equal(a.experts, b.experts) for a, b in zip(v.chosen, routed)):
            log(f"real run {i + 1}: the router chose differently from run 1 (nondeterministic kernels); "
                f"the simulator replays run 1's routing")


def _finish(v: _Validation, log) -> dict:
    """Compare the simulated run with the real ones and write OUT (module docstring)."""
    from sim.cli import write_outputs

    sc, out, reals = v.scenario, v.out, v.reals
    if v.free_running:
        from workloads.trace import TraceMeta, requests_to_frame, write_trace

        out.mkdir(parents=True, exist_ok=True)
        write_trace(out / "free_running_trace.parquet", requests_to_frame(v.chosen, sc.model),
                    TraceMeta.for_model(sc.model, f"{PROG} --free-running (real_backend.executor)"))
        v.sim = _run_sim(v, v.chosen, log)
    sim = v.sim
    iters = per_iteration(sim.steps, [r.steps for r in reals])
    metrics = METRICS + (SPEC_METRICS if sc.speculation.name != "none" else ())
    table = comparison_table(with_spec_totals(sim.summary, sim.steps),
                             [with_spec_totals(r.summary, r.steps) for r in reals], iters, metrics)
    med = reals[_median_index([r.summary["tpot_s"] for r in reals])]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    iters.to_csv(out / "iterations.csv", index=False)
    pd.DataFrame([{"repeat": i, **{k: val for k, val in r.summary.items() if not isinstance(val, (list, dict))}}
                  for i, r in enumerate(reals)]).to_csv(out / "real_repeats.csv", index=False)
    for name, res in (("sim", sim), ("real", med)):
        (out / f"{name}_timeline.json").write_text(json.dumps({"traceEvents": res.timeline or [],
                                                               "displayTimeUnit": "ms"}))
        tl, res.timeline = res.timeline, None
        write_outputs(res, out / name)
        res.timeline = tl
    t = table.set_index("metric")
    title = (f"{sc.model.name}, {sc.prefetch.name}, batch {sc.workload.batch_size}: TPOT err "
             f"{t.loc['tpot_s', 'error_pct']:+.1f}%, |iter err| P50 {t.loc['iter_abs_err_p50', 'error_pct']:.1f}%")
    scatter_plot(iters, out / "scatter.png", title)
    (out / "validation.json").write_text(json.dumps({"overrides": list(v.overrides), "repeats": len(reals),
                                                     "profile_dir": str(v.profile_dir),
                                                     "free_running": v.free_running}, indent=2) + "\n")
    return {"comparison": table, "iterations": iters, "sim": sim, "real": reals, "out": out}


def validate(overrides: Sequence[str] = (), repeats: int = 3, profile_dir: Optional[str | Path] = None,
             out: Optional[str | Path] = None, device: Optional[str] = None, torch_profile: bool = False,
             log: Callable[[str], None] = lambda s: None, _resolved_profile: Optional[Path] = None,
             free_running: bool = False, checkpoint: Optional[str | Path] = None, recalibrate: bool = False) -> dict:
    """One validation (module docstring); returns ``{"comparison", "iterations", "sim", "real", "out"}``."""
    if repeats < 1:
        raise ConfigError(f"--repeats={repeats} is invalid; must be >= 1")
    v = _prepare(overrides, profile_dir, out, device, log, _resolved_profile, free_running, checkpoint, recalibrate)
    for _ in range(repeats):
        _real_run(v, repeats, torch_profile, log)
    return _finish(v, log)


# ------------------------------------------------------------------------------------ sweeps
def sweep_cells(axes: Sequence[str]) -> list[list[str]]:
    """Cartesian product of ``KEY=V1,V2`` axes -> lists of single overrides."""
    lists = []
    for a in axes:
        if "=" not in a:
            raise ConfigError(f"--sweep {a} is invalid; expected KEY=V1,V2,...")
        k, vals = a.split("=", 1)
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--sweep {a} has no values")
        lists.append([f"{k}={v}" for v in values])
    return [list(c) for c in itertools.product(*lists)]


def _slug(cell: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(o.split("=", 1)[1] if "=" in o else o for o in cell))[:80]


def rank_groups(acc: pd.DataFrame, axes_keys: Sequence[str]) -> pd.DataFrame:
    """Per group (the cells that differ only in the policy), rank policies by sim and real TPOT."""
    group_keys = [k for k in axes_keys if k != POLICY_KEY]
    acc = acc.copy()
    acc["group"] = acc[group_keys].astype(str).agg(" ".join, axis=1) if group_keys else "all"
    acc["sim_rank"] = acc.groupby("group")["sim_tpot_s"].rank(method="first").astype(int)
    acc["real_rank"] = acc.groupby("group")["real_tpot_s"].rank(method="first").astype(int)
    agrees = acc.groupby("group").apply(lambda g: bool((g["sim_rank"] == g["real_rank"]).all()),
                                        include_groups=False)
    acc["ranking_agrees"] = acc["group"].map(agrees)
    return acc


def check_one_device(scenario) -> None:
    """One-line ``ConfigError`` for a tensor-parallel scenario: the cost tables ``moesim-profile``
    measures are one device's ops on the whole model, so a simulated split has no measured costs to
    be compared with (the real executor itself runs tensor parallelism; see README)."""
    tp = scenario.hw.tensor_parallel
    if tp != 1:
        raise ConfigError(f"hw.tensor_parallel={tp} is not validated by moesim-validate (its cost tables are measured "
                          f"on one device, for the unsplit model); use hw.tensor_parallel=1")


def run_sweep(fixed: Sequence[str], axes: Sequence[str], repeats: int, profile_dir, out: Path, device,
              log: Callable[[str], None], free_running: bool = False,
              checkpoint: Optional[str | Path] = None, recalibrate: bool = False) -> pd.DataFrame:
    if repeats < 1:
        raise ConfigError(f"--repeats={repeats} is invalid; must be >= 1")
    cells = sweep_cells(axes)
    axes_keys = [a.split("=", 1)[0] for a in axes]
    scenarios = [_compose(with_defaults(list(fixed) + c) + ["sim.progress=false", "++hw.cost_model=roofline"])
                 for c in cells]  # all checked first (no cost tables needed for that)
    from .executor import check_runnable

    for sc in scenarios:
        if free_running:
            check_free_running(sc)
        check_runnable(sc, free_running)
        check_one_device(sc)
    pdir = resolve_profile_dir(scenarios, profile_dir, device or "cpu", log)
    if recalibrate:
        pdir = recalibrated_profile_dir(pdir, scenarios, out, device, log)
    # Every cell is prepared and simulated first; then the real runs go round robin (repeat 1 of
    # every cell, then repeat 2, ...), so a stretch of load on the shared machine moves one repeat
    # of several cells (which their medians absorb), not every repeat of one cell.
    vals = []
    for i, cell in enumerate(cells):
        log(f"cell {i + 1}/{len(cells)}: {' '.join(cell)}")
        vals.append(_prepare(list(fixed) + cell, None, out / "cells" / f"{i:03d}-{_slug(cell)}", device, log, pdir,
                             free_running, checkpoint))
    for rep in range(repeats):
        for i, v in enumerate(vals):
            log(f"round {rep + 1}/{repeats}, cell {i + 1}/{len(cells)}")
            _real_run(v, repeats, False, log)
    rows = []
    for cell, v in zip(cells, vals):
        r = _finish(v, log)
        t = r["comparison"].set_index("metric")
        rows.append({**{k: o.split("=", 1)[1] for k, o in zip(axes_keys, cell)},
                     "sim_tpot_s": t.loc["tpot_s", "sim"], "real_tpot_s": t.loc["tpot_s", "real_median"],
                     "real_tpot_spread_pct": _spread_pct(t.loc["tpot_s"]),
                     "tpot_err_pct": t.loc["tpot_s", "error_pct"],
                     "abs_tpot_err_pct": abs(t.loc["tpot_s", "error_pct"]),
                     "ttft_err_pct": t.loc["ttft_s", "error_pct"],
                     "copy_stall_err_pct": t.loc["copy_stall_s", "error_pct"],
                     "h2d_bytes_err_pct": t.loc["h2d_bytes", "error_pct"],
                     "iter_abs_err_p50_pct": t.loc["iter_abs_err_p50", "error_pct"],
                     "iter_abs_err_p99_pct": t.loc["iter_abs_err_p99", "error_pct"], "dir": str(v.out)})
    acc = pd.DataFrame(rows)
    if POLICY_KEY in axes_keys:
        acc = rank_groups(acc, axes_keys)
    out.mkdir(parents=True, exist_ok=True)
    acc.to_csv(out / "accuracy.csv", index=False)
    return acc


def _spread_pct(row) -> float:
    """How far a metric's real repeats spread: (max - min) / median, in percent (the noise an error
    of the simulator should be read against)."""
    med = row["real_median"]
    return float((row["real_max"] - row["real_min"]) / med * 100) if med else float("nan")


def format_accuracy(acc: pd.DataFrame) -> str:
    cols = [c for c in acc.columns if c not in ("dir", "group")]
    show = acc[cols].copy()
    for c in ("sim_tpot_s", "real_tpot_s"):
        show[c] = (show[c] * 1e3).map(lambda v: f"{v:.3f}")
    show = show.rename(columns={"sim_tpot_s": "sim_tpot_ms", "real_tpot_s": "real_tpot_ms"})
    for c in [c for c in show.columns if c.endswith("_pct")]:
        show[c] = show[c].map(lambda v: "-" if pd.isna(v) else f"{v:+.1f}")
    lines = [show.to_string(index=False), "",
             f"median |TPOT error|: {acc['abs_tpot_err_pct'].median():.1f} % over {len(acc)} cells; "
             f"median spread of a cell's real repeats: {acc['real_tpot_spread_pct'].median():.1f} %"]
    if "ranking_agrees" in acc:
        g = acc.groupby("group")["ranking_agrees"].first()
        lines.append(f"policy ranking agrees in {int(g.sum())}/{len(g)} groups")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI

#: what a validation (or a sweep) writes into OUT: top-level names (glob patterns)
OUTPUT_NAMES = ("comparison.csv", "iterations.csv", "real_repeats.csv", "sim_timeline.json",
                "real_timeline.json", "scatter.png", "validation.json", "free_running_trace.parquet",
                "torch_profile_*.json", "sim", "real", "cells", "accuracy.csv", RECALIBRATED_PROFILE)
#: overrides whose values are files or directories the run reads
INPUT_KEYS = ("workload.path", "hw.profile_dir")


def check_output_dir(out: Path, args: argparse.Namespace) -> None:
    """Refuse (ConfigError, one line), before anything runs: an OUT that exists and is not empty,
    unless ``--force``; with or without it, an OUT that is one of the run's inputs
    (``--profile-dir``, ``--checkpoint``, ``workload.path=``, ``hw.profile_dir=``) or holds one at a
    name validation writes (``OUTPUT_NAMES``)."""
    inputs = [("--profile-dir", args.profile_dir), ("--checkpoint", args.checkpoint)]
    for o in list(args.overrides) + list(args.sweep or ()):
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in INPUT_KEYS:
            inputs += [(key, v.strip()) for v in (value.split(",") if o in (args.sweep or ()) else [value])
                       if v.strip()]
    check_outputs((), inputs, args.force, dirs=[("-o", out, OUTPUT_NAMES)])



def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run the real executor and the simulator (measured cost tables) on the same "
                "scenario and compare (see real_backend/validate.py).")
    p.add_argument("overrides", nargs="*", help="Hydra-style KEY=VALUE overrides (as for moesim)")
    p.add_argument("--repeats", type=int, default=3, help="real runs per validation (median quoted; default 3)")
    p.add_argument("--profile-dir", default=None, metavar="DIR", help="cost tables (moesim-profile output)")
    p.add_argument("-o", "--output", default=None, metavar="OUT", help="output directory")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="validate every combination (cartesian product) and write accuracy.csv")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="real executor's device (default: cpu "
                   "unless CUDA is available)")
    p.add_argument("--torch-profile", action="store_true", help="also write torch.profiler traces of the real runs")
    p.add_argument("--free-running", action="store_true", help="the real model's own router decides; the "
                   "simulator replays what it chose (written to OUT/free_running_trace.parquet)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="real model weights from a local safetensors "
                   "checkpoint directory (Hugging Face Mixtral names) instead of random ones")
    p.add_argument("--recalibrate", action="store_true", help="measure the profile's executor overheads "
                   "(layer_overhead, copy_overhead, host_run_overhead, a drafter's draft_pass_overhead) of the "
                   "validated models again right before validating, and the policy_overhead (decision time beyond "
                   f"LRU's) of every validated prefetch policy but lru, into OUT/{RECALIBRATED_PROFILE} (the given "
                   "profile is not changed)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP_DIR)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    log = lambda s: print(f"{PROG}: {s}", file=sys.stderr, flush=True)  # noqa: E731

    def body() -> int:
        args = parser.parse_intermixed_args(argv)
        for o in args.overrides:
            if "=" not in o:
                raise ConfigError(f"{o} is not an override; expected KEY=VALUE")
        out = Path(args.output) if args.output else Path("validation") / _dt.datetime.now().strftime(
            "%Y-%m-%d-%H-%M-%S")
        check_output_dir(out, args)
        if args.sweep:
            acc = run_sweep(args.overrides, args.sweep, args.repeats, args.profile_dir, out, args.device, log,
                            free_running=args.free_running, checkpoint=args.checkpoint, recalibrate=args.recalibrate)
            print(format_accuracy(acc))
        else:
            r = validate(args.overrides, args.repeats, args.profile_dir, out, args.device,
                         torch_profile=args.torch_profile, log=log, free_running=args.free_running,
                         checkpoint=args.checkpoint, recalibrate=args.recalibrate)
            print(format_table(r["comparison"]))
        print(f"outputs: {out}")
        return 0

    return run_cli(PROG, body)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
