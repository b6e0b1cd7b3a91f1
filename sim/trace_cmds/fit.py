"""``moesim-trace fit TRACE -o params.yaml``: fit the synthetic router and request lengths to a trace.

Writes plain YAML with three sections: ``model`` (identity and routing shapes, ``catalog: true`` when
the trace's model is a moesim catalog model), ``workload`` (the ``workload.*`` keys of the fitted
synthetic workload, each documented by a comment) and ``fit`` (what was fitted to: the trace's
statistics, the generator's at the fitted knobs, uncertainties, notes). Prints the equivalent
``moesim`` overrides. Method: ``workloads/fit.py``.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from typing import Optional

import yaml

from workloads.fit import PRIORITIES, WORKLOAD_KEY_DOCS, fit_trace, moesim_overrides
from workloads.io import FORCE_HELP, atomic_write, check_outputs
from workloads.trace import TraceMeta
from workloads.validation import ConfigError

from .stats import load_trace


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def catalog_models() -> dict[str, dict]:
    """Catalog model name -> its conf/model YAML (plain mapping; read without Hydra)."""
    out = {}
    folder = resources.files("conf").joinpath("model")
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out[entry.name[:-5]] = data
    return out


def _shapes(cfg: dict) -> tuple:
    layers = int(cfg.get("num_layers", 0))
    dense = set(cfg.get("dense_layers") or ())
    return (int(cfg.get("num_experts", 0)), int(cfg.get("top_k", 0)), layers,
            tuple(i for i in range(layers) if i not in dense))


def catalog_match(meta: TraceMeta) -> tuple[Optional[str], list[str]]:
    """(catalog model named by the trace with the same shapes or None, catalog models that only
    share the shapes)."""
    mine = (meta.num_experts, meta.top_k, meta.num_layers, tuple(meta.moe_layers))
    named, same = None, []
    wanted = {_norm(meta.model), _norm(meta.model.split("/")[-1])}
    for name, cfg in sorted(catalog_models().items()):
        if _shapes(cfg) != mine:
            continue
        ids = {_norm(name), _norm(str(cfg.get("name", ""))), _norm(str(cfg.get("hf_id", ""))),
               _norm(str(cfg.get("hf_id", "")).split("/")[-1])} - {""}
        if wanted & ids:
            named = name
        else:
            same.append(name)
    return named, same


def params_yaml(params: dict, header: list[str]) -> str:
    """params.yaml text: a comment header, then model / workload (commented keys) / fit."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(yaml.safe_dump({"model": params["model"]}, sort_keys=False,
                                default_flow_style=None, width=100).rstrip())
    lines.append("workload:")
    for key, value in params["workload"].items():
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
        doc = WORKLOAD_KEY_DOCS.get(key, "")
        lines.append(f"  {text}" + (f"   # {doc}" if doc else ""))
    lines.append(yaml.safe_dump({"fit": params["fit"]}, sort_keys=False, default_flow_style=None,
                                width=100).rstrip())
    return "\n".join(lines) + "\n"


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="fit the synthetic router and request lengths to a trace",
        description=__doc__.splitlines()[0].split(": ", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", metavar="TRACE", help="Parquet router trace")
    p.add_argument("-o", "--output", required=True, metavar="PARAMS.yaml", help="where to write the parameters")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration simulations (0)")
    p.add_argument("--replicates", type=int, metavar="R",
                   help="generated copies of the trace per calibration step (default: 8..32 by size)")
    p.add_argument("--priority", choices=PRIORITIES, default="reuse",
                   help="only when the trace's cross-layer affinity is beyond the generator's reach "
                        "at the trace's reuse: keep the reuse (default) or lower it until the "
                        "affinity fits")
    p.add_argument("--on-ragged", choices=("error", "truncate"), default="error",
                   help="requests with missing records: fail (default) or keep each request's "
                        "longest complete prefix")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run)


def _g(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def run(args) -> int:
    check_outputs([("-o", args.output)], [("TRACE", args.trace)], args.force)
    if args.replicates is not None and args.replicates < 1:
        raise ConfigError(f"--replicates={args.replicates} is invalid; must be >= 1")
    t0 = time.perf_counter()
    requests, meta = load_trace(args.trace, args.on_ragged)
    result = fit_trace(requests, meta, seed=args.seed, replicates=args.replicates,
                       priority=args.priority)
    params = result.params()
    catalog, same = catalog_match(meta)
    params["model"] = {"name": catalog or meta.model, "catalog": catalog is not None,
                       "trace_model": meta.model, **{k: v for k, v in params["model"].items()
                                                     if k != "name"}}
    params["fit"]["wall_s"] = round(time.perf_counter() - t0, 3)
    overrides = moesim_overrides(params)
    header = [f"moesim-trace fit {args.trace}",
              f"model {meta.model}: {meta.num_experts} experts, top-{meta.top_k}, "
              f"{len(meta.moe_layers)} MoE layers; {len(requests)} requests",
              "Replay the fitted workload: moesim-trace generate THIS.yaml -o OUT.parquet, or",
              "  moesim " + " ".join(overrides)]
    if catalog is None:
        header.append(f"(model not in the moesim catalog{'; same shapes: ' + ', '.join(same) if same else ''}: "
                      "pick a model= and apply the model.* overrides above)")
    header.append("")
    write_text(args.output, params_yaml(params, header))

    obs, exp, unc = result.observed, result.expected, result.details["uncertainty"]
    wl = params["workload"]
    print(f"fitted {args.trace}: model {meta.model}"
          + (f" (catalog model {catalog})" if catalog else " (not a catalog model)"))
    print(f"{'statistic':<34} {'trace':>9} {'fitted':>9} {'sd':>8}")
    rows = [("popularity max/mean (median)", obs["popularity_median"], exp["popularity_median"],
             exp["popularity_median_sd"]),
            ("reuse", obs["reuse"], exp["reuse"], exp.get("reuse_sd")),
            ("affinity top-successor", obs["affinity"], exp["affinity"], exp["affinity_sd"]),
            ("affinity independent", obs["affinity_independent"], exp["affinity_independent"], None),
            ("affinity excess", obs["affinity_excess"], exp["affinity_excess"], exp["affinity_excess_sd"])]
    for name, a, b, sd in rows:
        print(f"{name:<34} {_g(a):>9} {_g(b):>9} {_g(sd):>8}")
    print(f"(statistics at the trace's sample size: {obs['chunks']} chunk(s) of ~{obs['chunk_tokens']} "
          f"tokens, {result.details['replicates']} generated replicates; sd = one replicate's spread)")
    print("workload: " + ", ".join(f"{k}={_g(v)}" for k, v in wl.items() if k != "kind"))
    print("uncertainty (1 sd): " + ", ".join(f"{k}={_g(v)}" for k, v in unc.items()))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {args.output}")
    print("moesim " + " ".join(overrides))
    return 0
