"""``moesim-trace generate PARAMS.yaml -o OUT.parquet``: a synthetic router trace of any length
from parameters written by ``moesim-trace fit``.

Requests (lengths and routing) are built exactly as ``moesim`` builds the params' synthetic workload
for the same seed (``workloads.requests.build_requests``), then written with the trace schema and
the params' model as metadata. A catalog model (``model.catalog: true``) uses its ModelSpec;
otherwise a ModelSpec-compatible shape is built from the params (only num_experts, top_k and the
layers matter for routing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from workloads.fit import generate_requests, params_model, params_workload
from workloads.io import FORCE_HELP, check_outputs
from workloads.synthetic import generate_weights
from workloads.trace import TraceMeta, requests_to_frame, write_trace
from workloads.validation import ConfigError


EXPECTS = "moesim-trace generate expects the params YAML written by moesim-trace fit"


def read_params(path) -> dict:
    """The mapping in a params.yaml (ConfigError, one line, if missing, not YAML text, or without
    the ``model`` and ``workload`` sections ``moesim-trace fit`` writes)."""
    path = Path(path)
    where = f"params file {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; {EXPECTS}" if not path.exists()
                          else f"{where} is not a file; {EXPECTS}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if raw.startswith(b"PAR1"):
        raise ConfigError(f"{where} is a Parquet file (a trace?), not YAML; {EXPECTS}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not a text file; {EXPECTS}") from None
    if not text.strip():
        raise ConfigError(f"{where} is empty; {EXPECTS}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = (str(exc).strip().splitlines() or ["invalid YAML"])[0]
        raise ConfigError(f"{where} is not valid YAML ({first}); {EXPECTS}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} does not hold a mapping with model and workload sections; {EXPECTS}")
    lacking = [k for k in ("model", "workload") if not isinstance(data.get(k), dict)]
    if lacking:
        raise ConfigError(f"{where}: {lacking[0]} is required (a mapping); {EXPECTS}")
    try:  # the sections' keys and values, checked before anything is generated
        params_model(data)
        params_workload(data)
    except ConfigError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: {first}; {EXPECTS}") from None
    return data


def params_spec(params: dict):
    """The ModelSpec to generate with: the catalog model, or the params' routing shapes."""
    m = params_model(params)
    if not m.catalog:
        return m.spec()
    from sim.config import compose_scenario

    spec = compose_scenario([f"model={m.name}"]).model
    mine = (m.num_experts, m.top_k, m.num_layers, tuple(m.moe_layers))
    theirs = (spec.num_experts, spec.top_k, spec.num_layers, tuple(spec.moe_layers))
    if mine != theirs:
        raise ConfigError(f"model.name={m.name!r} is a catalog model with num_experts, top_k, "
                          f"num_layers, moe_layers = {theirs[:3]}, {list(theirs[3])}; the params say "
                          f"{mine[:3]}, {list(mine[3])} (set model.catalog: false to use the params' shapes)")
    return spec


def _positive(value, name: str):
    if value is not None and value < 1:
        raise ConfigError(f"{name}={value} is invalid; must be >= 1")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="a synthetic router trace from fitted parameters",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("params", metavar="PARAMS.yaml", help="parameters written by moesim-trace fit")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace to write")
    p.add_argument("--num-requests", type=int, metavar="N", help="requests (default: the params')")
    p.add_argument("--prompt-len", type=int, metavar="P", help="mean prompt length (default: the params')")
    p.add_argument("--output-len", type=int, metavar="O",
                   help="mean generated tokens per request (default: the params')")
    p.add_argument("--seed", type=int, default=0, help="seed (0); same params and seed, same trace")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    check_outputs([("-o", args.output)], [("PARAMS.yaml", args.params)], args.force)
    for name in ("num_requests", "prompt_len", "output_len"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"))
    params = read_params(args.params)
    model = params_spec(params)
    requests = generate_requests(params, model, num_requests=args.num_requests,
                                 prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed)
    wrng = np.random.default_rng([args.seed, 0x5754])  # weights: their own stream
    weights = [generate_weights(r.experts, wrng) for r in requests]
    frame = requests_to_frame(requests, model, weights)
    source = f"moesim-trace generate {args.params} seed={args.seed}"
    pm = params_model(params)
    meta = TraceMeta(model=pm.name, num_experts=model.num_experts, top_k=model.top_k,
                     num_layers=model.num_layers, moe_layers=tuple(model.moe_layers), source=source)
    write_trace(args.output, frame, meta)
    tokens = sum(r.experts.shape[0] for r in requests)
    print(f"wrote {args.output}: {len(requests)} requests, {tokens} token positions, model {pm.name} "
          f"({model.num_experts} experts, top-{model.top_k}, {model.num_moe_layers} MoE layers), "
          f"routing {params['workload'].get('routing')}, seed {args.seed}")
    return 0
