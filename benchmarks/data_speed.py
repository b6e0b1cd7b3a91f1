"""How fast the data side runs: synthetic trace generation, trace conversion, trace statistics.

    python benchmarks/data_speed.py               # every case, median of 3 runs each
    python benchmarks/data_speed.py --repeats 5

Cases (the sizes the test suite used to hold to wall-clock budgets; the tests now check only
what these produce):

* ``generate``: ``workloads.synthetic.generate_routing`` with the default ``RoutingConfig``
  (calibration is cached and not timed): Mixtral-8x7B, 64 sequences of 640 tokens; Qwen2-57B-A14B,
  8 of 200. Throughput in token-layers (one top-k row) per second.
* ``convert``: a 640k-row router trace (Mixtral, 100 requests of 200 positions x 32 layers):
  ``requests_to_frame`` + ``write_trace`` to Parquet, and ``load_trace_requests`` back into
  replayable requests. Rows per second.
* ``stats``: ``workloads.trace_stats.hit_rates`` (LRU, LFU and MIN replays) on the MoELens
  DeepSeek-MoE-16B trace at all 64 capacities (skipped if ``shared/traces`` is absent), and on
  about half a million accesses (64 experts, top-6, 27 layers, 8 requests of 16 + 384 tokens) at
  one capacity. Expert accesses replayed per second (per capacity for the first).

Every figure is the median over ``--repeats`` runs in this process; they depend on the machine
and its load (quote them from one run, idle).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workloads.model import ModelSpec  # noqa: E402
from workloads.requests import Request  # noqa: E402
from workloads.synthetic import RoutingConfig, generate_routing, resolve_routing  # noqa: E402
from workloads.trace import (RoutedRequest, TraceMeta, load_trace_requests, requests_to_frame,  # noqa: E402
                             write_trace)
from workloads.trace_stats import Routed, hit_rates, model_for_trace  # noqa: E402

MIXTRAL = ModelSpec(name="mixtral_8x7b", hidden_size=4096, num_layers=32, num_experts=8, top_k=2,
                    expert_intermediate_size=14336, num_attention_heads=32, num_kv_heads=8,
                    head_dim=128, vocab_size=32000)
QWEN2 = ModelSpec(name="qwen2_57b_a14b", hidden_size=3584, num_layers=28, num_experts=64, top_k=8,
                  expert_intermediate_size=2560, num_attention_heads=28, num_kv_heads=4,
                  head_dim=128, vocab_size=151936, num_shared_experts=1,
                  shared_expert_intermediate_size=20480)
DEEPSEEK_DIR = ROOT.parent / "shared" / "traces" / "moelens" / "DeepSeek" / "deepseek_routing_trace"


def median_s(fn: Callable[[], object], repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def row(case: str, what: str, wall: float, work: float, unit: str) -> None:
    print(f"{case:<9} {what:<52} {wall:>8.3f} {work / wall:>12.3g} {unit}")


def generate(repeats: int) -> None:
    for model, n, t in ((MIXTRAL, 64, 640), (QWEN2, 8, 200)):
        cfg = RoutingConfig()
        resolve_routing(model, cfg)   # calibration is cached: time generation only
        wall = median_s(lambda: generate_routing(model, cfg, [t] * n, np.random.default_rng(0)), repeats)
        row("generate", f"{model.name}: {n} x {t} tokens x {model.num_moe_layers} layers", wall,
            n * t * model.num_moe_layers, "token-layers/s")


def convert(repeats: int) -> None:
    routing = generate_routing(MIXTRAL, RoutingConfig(), [200] * 100, np.random.default_rng(0))
    reqs = [Request(i, 0.0, 100, 101, r) for i, r in enumerate(routing)]
    rows = 100 * 200 * MIXTRAL.num_moe_layers
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.parquet"

        def write():
            write_trace(path, requests_to_frame(reqs, MIXTRAL), TraceMeta.for_model(MIXTRAL, "bench"))

        row("convert", f"requests -> Parquet trace ({rows // 1000}k rows)", median_s(write, repeats), rows, "rows/s")
        got = load_trace_requests(path, MIXTRAL)
        assert len(got) == 100 and all(np.array_equal(g.experts, r.experts) for g, r in zip(got, reqs))
        row("convert", f"Parquet trace -> requests ({rows // 1000}k rows)",
            median_s(lambda: load_trace_requests(path, MIXTRAL), repeats), rows, "rows/s")


def load_deepseek(directory: Path) -> list[RoutedRequest]:
    files = sorted(directory.glob("prompt-*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    out = []
    for i, path in enumerate(files):
        layers = [layer for layer in json.loads(path.read_text())["layers"] if not layer["is_dense"]]
        rows = [[tok["top_experts"] for tok in sorted(layer["tokens"], key=lambda t: t["token_index"])]
                for layer in layers]
        ex = np.asarray(rows, dtype=np.int16).transpose(1, 0, 2)
        out.append(RoutedRequest(i, ex.shape[0], 1, np.ascontiguousarray(ex)))
    return out


def stats(repeats: int, deepseek_dir: Path) -> None:
    if deepseek_dir.is_dir():
        ds = load_deepseek(deepseek_dir)
        accesses = float(hit_rates(ds, 64, [64]).accesses.sum())
        row("stats", "hit_rates: DeepSeek trace, 64 capacities x 3 policies",
            median_s(lambda: hit_rates(ds, 64), repeats), 64 * accesses, "accesses/s")
    else:
        print(f"stats     (DeepSeek trace: {deepseek_dir} is absent; skipped)")
    E, K, M = 64, 6, 27
    model = model_for_trace("t", E, K, M + 1, range(1, M + 1))
    routing = generate_routing(model, RoutingConfig(), [400] * 8, np.random.default_rng(0))
    reqs = [Routed(x, 16) for x in routing]
    accesses = float(hit_rates(reqs, E, [16]).accesses.sum())
    row("stats", f"hit_rates: {accesses / 1e3:.0f}k accesses, 1 capacity x 3 policies",
        median_s(lambda: hit_rates(reqs, E, [16]), repeats), accesses, "accesses/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deepseek-dir", type=Path, default=DEEPSEEK_DIR)
    args = ap.parse_args()
    print(f"{'case':<9} {'what':<52} {'wall s':>8} {'throughput':>12}")
    generate(args.repeats)
    convert(args.repeats)
    stats(args.repeats, args.deepseek_dir)


if __name__ == "__main__":
    main()
