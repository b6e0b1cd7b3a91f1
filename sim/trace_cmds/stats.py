"""``moesim-trace stats TRACE``: the statistics of a router trace that matter for expert offloading.

Popularity skew, temporal reuse, cross-layer affinity, distinct experts per batch against MoESD's
N(t), and LRU / LFU / Belady-MIN expert-cache hit rates versus per-layer capacity
(definitions: ``workloads/trace_stats.py``). Prints tables; ``--json OUT.json`` writes everything
as plain JSON (one list of flat records per table: ``pd.DataFrame(json.load(f)["hit_rate"])``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from workloads.io import FORCE_HELP, atomic_write, check_outputs
from workloads.trace import TraceError, TraceMeta, load_trace_requests
from workloads.trace_stats import POLICIES, format_report, model_for_trace, trace_statistics
from workloads.validation import ConfigError


def int_list(text: str, name: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (ConfigError naming the option otherwise)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{name}={text!r} is invalid; expected comma-separated integers, e.g. 1,2,4")
    return values


def trace_meta(path) -> TraceMeta:
    """The metadata of a Parquet router trace (TraceError, one line, if unreadable)."""
    path = Path(path)
    where = f"router trace {path}"
    if not path.is_file():
        raise TraceError(f"{where} does not exist" if not path.exists() else f"{where} is not a file")
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TraceError(f"{where} is not a readable Parquet file ({first})") from None
    return TraceMeta.from_metadata(schema.metadata, where)


def load_trace(path, on_ragged: str = "error", limit: Optional[int] = None):
    """(requests in file order, metadata) of a trace, with the trace's own shapes as the model."""
    meta = trace_meta(path)
    model = model_for_trace(meta.model or "trace", meta.num_experts, meta.top_k, meta.num_layers,
                            meta.moe_layers)
    return load_trace_requests(path, model, on_ragged=on_ragged, limit=limit), meta


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON atomically (strict: no NaN)."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"  # fails before anything is written
    atomic_write(path, lambda tmp: tmp.write_text(text))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stats", help="offloading statistics of a router trace",
        description=__doc__.splitlines()[0].split(": ", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Replay for the hit rates: batch 1, requests in file order, one cache of c slots per "
               "MoE layer, empty at start; a pass is a request's prefill or one decode position.")
    p.add_argument("trace", metavar="TRACE", help="Parquet router trace")
    p.add_argument("--json", metavar="OUT.json", help="also write every statistic as JSON")
    p.add_argument("--capacities", metavar="C1,C2,...",
                   help="per-layer cache capacities for the hit-rate curves (default: every c in "
                        "1..E when cheap, else powers of two, K and E)")
    p.add_argument("--batch-tokens", metavar="T1,T2,...",
                   help="batch sizes in tokens for distinct experts (default: 1, 2, 4, ... up to "
                        "the trace's token count)")
    p.add_argument("--policies", default=",".join(POLICIES), metavar="P1,P2",
                   help=f"cache policies (default {','.join(POLICIES)})")
    p.add_argument("--on-ragged", choices=("error", "truncate"), default="error",
                   help="requests with missing records: fail (default) or keep each request's "
                        "longest complete prefix")
    p.add_argument("--num-requests", type=int, metavar="N", help="only the first N requests")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    check_outputs([("--json", args.json)], [("TRACE", args.trace)], args.force)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    bad = [s for s in policies if s not in POLICIES]
    if bad or not policies:
        raise ConfigError(f"--policies={args.policies!r} is invalid; choose from {', '.join(POLICIES)}")
    capacities = int_list(args.capacities, "--capacities") if args.capacities else None
    batch_tokens = int_list(args.batch_tokens, "--batch-tokens") if args.batch_tokens else None
    t0 = time.perf_counter()
    requests, meta = load_trace(args.trace, args.on_ragged, args.num_requests)
    info = {"path": str(args.trace), "model": meta.model, "num_layers": meta.num_layers,
            "moe_layers": list(meta.moe_layers), "source": meta.source}
    stats = trace_statistics(requests, meta.num_experts, capacities=capacities,
                             batch_tokens=batch_tokens, policies=policies, meta=info)
    stats["trace"]["wall_s"] = round(time.perf_counter() - t0, 3)
    print(format_report(stats))
    if args.json:
        write_json(args.json, stats)
        print(f"\nwrote {args.json}")
    return 0
