"""``moesim-trace import``: read router logs others produced and write a trace Parquet in our schema.

The work is done by :mod:`workloads.importers`; this module parses the command line, resolves
``--model`` through the config catalog and prints the report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import resources

from workloads.importers import (FORMATS, ImportOptions, discover, import_trace, parse_drop_where,
                                 parse_fields)
from workloads.io import FORCE_HELP, atomic_write, check_outputs
from workloads.trace import TraceError, TraceMeta
from workloads.validation import ConfigError

DESCRIPTION = """\
Read router logs and write a router trace (Parquet, our schema) to DEST.

Formats: generic JSON Lines / CSV with one record per (request, token, layer), fields named with
--fields (unmapped roles default to request_id, token_index, layer, experts and, when the files
have them, weights, phase, predicted_experts); experts/weights may be JSON lists, also inside CSV
cells. MoELens per-prompt JSON files (--format moelens, or detected): one file is one request,
shapes come from the file and are checked against --model when given. A directory SRC means every
file of the format in it (manifest.json is skipped).

Phase: a mapped phase field (prefill|prompt / decode|generate) or --prompt-len-field decides it;
otherwise every generic row is --phase (default decode: replay treats a request's first position as
a one-token prompt). MoELens rows are prefill (one forward pass over the prompt).

Messy logs are handled and reported with counts, never filled in: --drop-where / --drop-requests
(warm-up batches), records lacking values, duplicates (exact repeats dropped; conflicting copies all
dropped), rows with a wrong number of experts or an expert named twice (dropped), token indices
renumbered per layer (--token-index order), missing (token, layer) cells (--on-ragged). Hard errors
(exit 2, one line, DEST untouched): unknown fields, unreadable files, expert ids out of range, layers
that do not match the model.

Outputs: DEST and --json never name a source (checked on resolved paths, before anything is read),
and an existing DEST or --json file is replaced only with --force.
"""

EPILOG = """\
examples:
  moesim-trace import ../shared/traces/moelens/DeepSeek/deepseek_routing_trace ds.parquet
  moesim-trace import log.jsonl out.parquet --model olmoe_1b_7b \\
      --fields request=problem_id,token=token_idx,layer=layer,experts=experts,weights=gating_probs \\
      --group dataset,problem_id --drop-requests 1 --on-ragged truncate --json report.json
  moesim-trace import layers/ out.parquet --format csv --num-experts 8 --top-k 2 --num-layers 32 \\
      --layer-from-filename 'layer_(\\d+)' --token-index order
"""


def _int_list(text: str, key: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{key} {text!r} is invalid; expected comma-separated integers, e.g. 0,1") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="read router logs (JSONL, CSV, MoELens) into a trace Parquet",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SRC", help="router-log files or directories")
    p.add_argument("dest", metavar="DEST.parquet", help="the trace to write (atomically)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="source format (default: auto, per file)")
    p.add_argument("--model", metavar="NAME",
                   help="catalog model (conf/model): shapes of a generic log; checked against MoELens files")
    p.add_argument("--num-experts", type=int, metavar="E", help="generic logs without --model: experts per layer")
    p.add_argument("--top-k", type=int, metavar="K", help="generic logs without --model: experts per token")
    p.add_argument("--num-layers", type=int, metavar="L", help="generic logs without --model: all layers")
    p.add_argument("--dense-layers", default="", metavar="0,1",
                   help="generic logs without --model: layers with a dense FFN (default: none)")
    p.add_argument("--fields", default="", metavar="ROLE=FIELD,...",
                   help="field names: roles request, token, layer, experts, weights, phase, predicted")
    p.add_argument("--group", default="", metavar="F1,F2",
                   help="fields that together identify a request (ids 0..N-1 assigned)")
    p.add_argument("--token-index", choices=("field", "order"), default="field",
                   help="field: the logged token index; order: order of appearance within (request, layer)")
    p.add_argument("--layer-numbering", choices=("absolute", "moe"), default="absolute",
                   help="absolute: logged layer = checkpoint layer; moe: logged layer = ordinal among MoE layers")
    p.add_argument("--layer-from-filename", metavar="REGEX",
                   help="one layer per file: a regex with one capture group around the layer number")
    p.add_argument("--drop-requests", type=int, default=0, metavar="N",
                   help="drop the first N requests (warm-up dummy batches)")
    p.add_argument("--drop-where", action="append", default=[], metavar="FIELD=VALUE",
                   help="drop records whose FIELD equals VALUE (repeatable; any match drops)")
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                   help="phase of generic rows when no phase field / --prompt-len-field is given (default decode)")
    p.add_argument("--prompt-len-field", metavar="FIELD",
                   help="per-request prompt length: positions below it are prefill, the rest decode")
    p.add_argument("--on-ragged", choices=("error", "truncate", "keep"), default="error",
                   help="missing (token, layer) cells: error (refuse), truncate (longest prefix complete on "
                        "every MoE layer), keep (write as is; replay needs workload.on_ragged=truncate)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run)


def catalog_hf_names() -> dict[str, str]:
    """Hugging Face id -> catalog model name, from the ``hf_id`` of every ``conf/model/*.yaml``."""
    out: dict[str, str] = {}
    folder = resources.files("conf").joinpath("model")
    for entry in folder.iterdir():
        if not entry.name.endswith(".yaml"):
            continue
        m = re.search(r"^hf_id:\s*['\"]?([^'\"\s#]+)", entry.read_text(), flags=re.MULTILINE)
        if m:
            out[m.group(1)] = entry.name[:-5]
    return out


def run(args: argparse.Namespace) -> int:
    sources, dest = args.sources, args.dest
    # Before anything is read: the files the sources name are the inputs (a directory source's
    # files of the format), DEST and the report the outputs.
    inputs = [("SRC", f) for f in discover(sources, args.format)]
    check_outputs([("DEST", dest), ("--json", args.json)], inputs, args.force)
    dense_layers = _int_list(args.dense_layers, "--dense-layers")
    fields = parse_fields(args.fields)
    group = tuple(x.strip() for x in args.group.split(",") if x.strip())
    shape_args = {"--num-experts": args.num_experts, "--top-k": args.top_k, "--num-layers": args.num_layers}
    given = [k for k, v in shape_args.items() if v is not None]
    model = shapes = None
    if args.model is not None:
        if given or dense_layers:
            raise ConfigError(f"--model and {(given or ['--dense-layers'])[0]} are alternatives; give "
                              f"--model NAME or the shapes")
        from sim.config import compose_scenario
        model = compose_scenario([f"model={args.model}"]).model
    elif given:
        lacking = [k for k, v in shape_args.items() if v is None]
        if lacking:
            raise ConfigError(f"explicit shapes need --num-experts, --top-k and --num-layers; {lacking[0]} "
                              f"is missing (or give --model NAME)")
        dense = set(dense_layers)
        shapes = TraceMeta(model="custom", num_experts=args.num_experts, top_k=args.top_k,
                           num_layers=args.num_layers,
                           moe_layers=tuple(i for i in range(args.num_layers) if i not in dense))
        bad = sorted(d for d in dense if not 0 <= d < args.num_layers)
        if bad:
            raise ConfigError(f"--dense-layers {bad[0]} is outside [0, --num-layers={args.num_layers})")
    elif dense_layers:
        raise ConfigError("--dense-layers needs --num-experts, --top-k and --num-layers")
    options = ImportOptions(format=args.format, fields=fields, group=group,
                            token_index=args.token_index, layer_numbering=args.layer_numbering,
                            drop_requests=args.drop_requests, drop_where=parse_drop_where(args.drop_where),
                            layer_from_filename=args.layer_from_filename, phase=args.phase,
                            prompt_len_field=args.prompt_len_field, on_ragged=args.on_ragged)
    try:
        report = import_trace(sources, dest, options, model=model, shapes=shapes, hf_names=catalog_hf_names())
    except OSError as exc:
        raise TraceError(f"cannot write {dest} ({exc.strerror or exc})") from None
    print("\n".join(report.lines()))
    if args.json:
        try:
            text = json.dumps(report.to_dict(), indent=2, default=str) + "\n"
            atomic_write(args.json, lambda tmp: tmp.write_text(text))
        except OSError as exc:
            raise TraceError(f"wrote {dest} but cannot write --json {args.json} ({exc.strerror or exc})") from None
        print(f"  report: {args.json}")
    sys.stdout.flush()
    return 0
