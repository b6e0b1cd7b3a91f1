"""``Table``: a cost model that interpolates the cost tables ``moesim-profile`` measured.

A profile directory (``real_backend/profile.py`` writes it) holds ``profile.parquet`` (or
``profile.csv``) with one row per measurement -- ``device, model, op, phase, tokens, batch,
context, bytes, median_s, p10_s, p90_s, repeats, threads, dtype`` -- and ``profile.json`` (machine,
torch version, threads, and the shape signature of every profiled model). ``Table`` answers every
``CostModel`` question from the medians, for the models the directory was profiled for, matched by
name and checked against the shapes that were profiled (a model that was not profiled, or whose
shapes differ, is a one-line ``ConfigError``).

Interpolation: piecewise linear in the size argument (tokens, sequences, bytes), between measured
points. Every op here costs, to a good approximation, a fixed part plus a part proportional to its
size (a GEMM against a fixed weight matrix: weights read once plus per-token work; a copy: latency
plus bytes over bandwidth; attention: projections per token plus the core per attended key), and
linear interpolation reproduces such affine segments exactly, is exact at the measured points and
monotone between two of them. Below the smallest measured size the answer is clamped to that
point's time (a smaller op is not cheaper than the fixed part); above the largest it is
extrapolated along the last segment (slope floored at zero), which for large sizes is the
compute- or bandwidth-bound regime where time does grow linearly.

Attention is two-dimensional. Decode passes (one new token per sequence) interpolate a grid over
(sequences, context per sequence); prefill passes (every sequence's new tokens attend causally to
themselves) a grid over (sequences, prompt tokens per sequence), both measured with equal-length
sequences, so a batch is looked up at its mean context (``kv_tokens / sequences``). A grid is
interpolated as curves of curves: along the context axis within each measured batch size, then
linearly across batch sizes -- bilinear where the grid is complete, which is exact for the
``a + b*B + c*C + d*B*C`` form attention time takes. Passes with several but not all new tokens
attending a longer context (speculative verification, chunked prefill) are not measured; they are
interpolated in log(new tokens per sequence) between the decode and prefill grids at the same
batch and context, an approximation.

Copies: ``copy_s(bytes, link)`` on the profiled host link (the system's ``host_link``, which on
``hw=this_cpu`` is the CPU->CPU copy into the executor's slot pool) is
``max(measured(bytes), latency + bytes / bandwidth_bps)``: the measured curve, unless the link's
configured bandwidth is lower (a cap that mimics PCIe; the executor's link shaper copies at most
that fast). Which measured curve -- copies alone (``idle``) or while expert FFNs run
(``contended``) -- is ``hw.profile_copy``. Any other link: ``latency + bytes / bandwidth``.

Executor overheads (measured by running the real executor, ``real_backend.executor``):
``layer_overhead`` rows (a pass's wall time outside every op -- Python between ops, scheduling,
policy calls, bookkeeping -- per layer, vs the pass's tokens, with every expert resident);
``attention_block_s`` includes it, so that the ops the simulator sums add up to a measured pass.
Being a residual it may be negative (ops faster inside the executor than in the op passes; noise
on a busy machine), and it can even exceed the attention it is added to; the block is then floored
at the cheapest attention pass the profile measured for the model (``attention_floor_s``: the
smallest median of its decode and prefill grids, which is also the least the attention
interpolation itself ever answers), so that a layer's attention never costs nothing.
``copy_overhead`` (one row per model): the compute stream's extra time per expert copy
(submitting and landing the copy, the copy worker's wake-ups, the caches the copy's bytes
pollute), ``copy_overhead_s``, paid by the SimPy backend once the copy has landed; without the
row, 0. ``copy_launch`` (device-level, ``phase`` =
``idle`` or ``busy``): how long the executor's copy worker takes to start a copy submitted to it
while idle (a sleeping thread's wake-up) or to start the next queued one; ``copy_launch_s`` adds
it to every copy on the profiled host link (without the rows, 0). ``copy_resume`` (device-level):
from a copy's end to the executor's thread running again when it was blocked waiting for it
(``copy_resume_s``, counted as copy stall; without the row, 0). ``expert`` rows of phase
``copying`` (expert passes while the executor's copy engine copies back to back at the
calibration link rate): ``copy_contention`` is their time over the expert curve's, per token
count (floored at 1, interpolated, held beyond the measured counts); the SimPy backend stretches
an expert by it for the part that runs while the copy engine is busy. Without the rows (profiles
from before 2026-12-04), 1.

``policy_overhead`` (``phase`` = a prefetch policy's name, measured by ``moesim-validate
--recalibrate`` for the policies it validates): how much longer that policy's decision hooks take
inside the real executor than LRU's, per MoE layer, on the offloaded calibration runs (batch 1, half
the experts resident). LRU's own decisions are inside ``layer_overhead`` and ``copy_overhead``,
which are calibrated with it. ``policy_overhead_s`` (floored at 0), charged by the SimPy backend as
other compute in every MoE layer; without the row, 0.

Speculative decoding: ``rejection_sampling`` rows (vs verified positions, ``tokens``) give
``rejection_sampling_s``; a dense model (``num_experts: 0``, a drafter such as ``mini_draft``) has
no expert, router or combine rows and costs 0 for those ops. ``draft_pass_overhead`` (one row per
draft model, measured by running the real executor's static speculation with that model drafting
for a profiled target): what one drafter pass costs beyond what its op tables (``layer_overhead``
included, which was calibrated running the model as a target) say -- the draft running with the
caches the target's verify pass left, the executor's host work per draft pass (argmax, softmax,
bookkeeping). ``draft_pass_overhead_s``; a residual like ``layer_overhead``, so it is kept signed
(the drafter floors each pass's total at its attention blocks); without the row (older profiles), 0.

Host execution (``host_expert_s``): the ``host_expert`` rows a CUDA profile carries, or on a CPU
profile the expert curve itself (the host *is* the device) plus the measured
``host_run_overhead`` (what a host run costs the executor beyond a slot run).

This module must not import torch (hw/ never does).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from workloads.model import ModelSpec
from workloads.validation import ConfigError

from .cost import COST_MODELS, BatchShape
from .devices import LinkSpec

PROFILE_PARQUET = "profile.parquet"
PROFILE_CSV = "profile.csv"
PROFILE_HEADER = "profile.json"
PROFILE_COLUMNS = ["device", "model", "op", "phase", "tokens", "batch", "context", "bytes", "median_s", "p10_s",
                   "p90_s", "repeats", "threads", "dtype"]

# ModelSpec fields an op's cost depends on (num_layers and the positions of dense layers do not).
SIGNATURE_FIELDS = ("hidden_size", "num_experts", "top_k", "expert_intermediate_size", "num_attention_heads",
                    "num_kv_heads", "head_dim", "vocab_size", "num_shared_experts",
                    "shared_expert_intermediate_size", "dense_intermediate_size", "attention", "kv_lora_rank",
                    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "tie_word_embeddings",
                    "weight_bytes_per_param", "kv_bytes_per_elem", "act_bytes_per_elem")


def model_signature(spec: ModelSpec) -> dict[str, Any]:
    """The shapes and byte sizes a profile of ``spec`` is valid for."""
    sig: dict[str, Any] = {f: getattr(spec, f) for f in SIGNATURE_FIELDS}
    sig["expert_bytes_per_param"] = spec.expert_param_bytes
    sig["has_dense_layers"] = bool(spec.dense_layers)
    if not spec.dense_layers:
        sig["dense_intermediate_size"] = 0
    return sig


# --------------------------------------------------------------------------- interpolation


class Curve:
    """Piecewise-linear ``y(x)`` through measured points; clamped below, extrapolated above."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        if len(xs) == 0:
            raise ValueError("a curve needs at least one point")
        pts: dict[float, list[float]] = {}
        for x, y in zip(xs, ys):
            pts.setdefault(float(x), []).append(float(y))
        self.xs = sorted(pts)
        self.ys = [float(np.mean(pts[x])) for x in self.xs]

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0] or len(xs) == 1:
            return ys[0]
        i = bisect.bisect_right(xs, x)
        if i >= len(xs):  # beyond the last point: along the last segment, never decreasing
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            return ys[-1] + slope * (x - xs[-1])
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class Grid:
    """``z(a, b)``: a ``Curve`` over ``b`` for each measured ``a``, interpolated linearly across ``a``
    (clamped below the smallest ``a``, extrapolated along the last two above the largest)."""

    def __init__(self, a: Sequence[float], b: Sequence[float], z: Sequence[float]):
        by_a: dict[float, tuple[list, list]] = {}
        for ai, bi, zi in zip(a, b, z):
            xs, ys = by_a.setdefault(float(ai), ([], []))
            xs.append(bi)
            ys.append(zi)
        if not by_a:
            raise ValueError("a grid needs at least one point")
        self.a = sorted(by_a)
        self.curves = [Curve(*by_a[x]) for x in self.a]

    def __call__(self, a: float, b: float) -> float:
        av, cs = self.a, self.curves
        if a <= av[0] or len(av) == 1:
            return cs[0](b) if a <= av[0] else cs[-1](b)
        i = bisect.bisect_right(av, a)
        if i >= len(av):
            z0, z1 = cs[-2](b), cs[-1](b)
            slope = max(0.0, (z1 - z0) / (av[-1] - av[-2]))
            return z1 + slope * (a - av[-1])
        a0, a1 = av[i - 1], av[i]
        z0, z1 = cs[i - 1](b), cs[i](b)
        return z0 + (z1 - z0) * (a - a0) / (a1 - a0)


# --------------------------------------------------------------------------- loading


def read_profile(profile_dir: str | Path, key: str = "hw.profile_dir") -> tuple[dict, pd.DataFrame]:
    """The header and rows of a profile directory; one-line ConfigError if it is missing or broken."""
    d = Path(profile_dir)
    header_file = d / PROFILE_HEADER
    if not header_file.is_file():
        raise ConfigError(f"{key}={profile_dir} holds no cost tables ({PROFILE_HEADER} not found); "
                          f"run moesim-profile -o {profile_dir} first")
    try:
        header = json.loads(header_file.read_text())
        if (d / PROFILE_PARQUET).is_file():
            rows = pd.read_parquet(d / PROFILE_PARQUET)
        else:
            rows = pd.read_csv(d / PROFILE_CSV, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={profile_dir} has unreadable cost tables: {str(exc).splitlines()[0]}") from None
    missing = [c for c in PROFILE_COLUMNS if c not in rows.columns]
    if missing:
        raise ConfigError(f"{key}={profile_dir} cost tables lack column(s) {', '.join(missing)}; "
                          f"re-run moesim-profile")
    rows = rows.copy()
    for c in ("model", "op", "phase"):
        rows[c] = rows[c].fillna("").astype(str)
    return header, rows


@dataclass
class _ModelTables:
    curves: dict[str, Curve]
    decode: Optional[Grid]
    prefill: Optional[Grid]
    copy_overhead_s: float = 0.0
    host_run_overhead_s: float = 0.0
    draft_pass_overhead_s: float = 0.0
    attention_floor_s: float = 0.0      # the cheapest measured attention (module docstring)
    copy_contention: Optional[Curve] = None   # expert time while copying / alone, vs tokens
    policy_overhead_s: dict[str, float] = field(default_factory=dict)   # policy name -> s per MoE layer


COPYING_PHASE = "copying"   # real_backend/profile.py: expert passes while the copy engine copies


def _contention_curve(rows: pd.DataFrame, expert: Optional[Curve]) -> Optional[Curve]:
    """Expert time while the executor's copy engine copies over expert time alone, at each token
    count of the ``copying`` rows (floored at 1: a copy never speeds an expert up); None without them."""
    r = rows[(rows["op"] == "expert") & (rows["phase"] == COPYING_PHASE)]
    if expert is None or r.empty:
        return None
    tokens = r["tokens"].astype(float).tolist()
    ratios = [max(1.0, float(m) / expert(n)) for n, m in zip(tokens, r["median_s"].astype(float))]
    return Curve(tokens, ratios)


class Table:
    """``CostModel`` from measured tables (see the module docstring)."""

    def __init__(self, profile_dir: str | Path, host_link: Optional[LinkSpec] = None,
                 copy_phase: str = "idle", key: str = "hw.profile_dir",
                 loaded: Optional[tuple[dict, pd.DataFrame]] = None):
        """``loaded``: (header, rows) already in memory (the profiler's own partial tables), instead
        of reading ``profile_dir``."""
        self.profile_dir = str(profile_dir)
        self.key = key
        self.header, self.rows = loaded if loaded is not None else read_profile(profile_dir, key)
        self.device = str(self.header.get("device", ""))
        self.host_link = host_link
        if copy_phase not in ("idle", "contended"):
            raise ConfigError(f"hw.profile_copy={copy_phase!r} is not allowed; choose one of: idle, contended")
        copies = self.rows[(self.rows["op"] == "copy") & (self.rows["phase"] == copy_phase)]
        if copies.empty and host_link is not None:
            raise ConfigError(f"{key}={self.profile_dir} has no '{copy_phase}' copy measurements; "
                              f"re-run moesim-profile")
        self._copy = Curve(copies["bytes"].astype(float), copies["median_s"].astype(float)) if len(copies) else None
        launch = self.rows[self.rows["op"] == "copy_launch"]
        self._launch = {ph: max(0.0, float(launch.loc[launch["phase"] == ph, "median_s"].median()))
                        for ph in ("idle", "busy") if (launch["phase"] == ph).any()}
        resume = self.rows.loc[self.rows["op"] == "copy_resume", "median_s"]
        self._resume = max(0.0, float(resume.median())) if len(resume) else 0.0
        self._models: dict[str, _ModelTables] = {}
        self.overheads = TableOverheads(self)   # the executor's measured overheads (hw.overheads)

    @property
    def models(self) -> list[str]:
        return sorted(self.header.get("models", {}))

    # ------------------------------------------------------------------ model lookup
    def check(self, model: ModelSpec) -> None:
        """Raise a one-line ConfigError unless ``model`` was profiled here with these shapes."""
        self._tables(model)

    def _tables(self, model: ModelSpec) -> _ModelTables:
        t = self._models.get(model.name)
        if t is not None:
            return t
        profiled = self.header.get("models", {})
        if model.name not in profiled:
            raise ConfigError(
                f"model={model.name} was not profiled in {self.key}={self.profile_dir} "
                f"(profiled: {', '.join(sorted(profiled)) or 'none'}); "
                f"run moesim-profile --models {model.name} -o {self.profile_dir}")
        want, have = profiled[model.name], model_signature(model)
        for f, v in have.items():
            if f in want and want[f] != v:
                raise ConfigError(
                    f"model.{f}={v!r} differs from the {want[f]!r} profiled for model={model.name} in "
                    f"{self.key}={self.profile_dir}; set model.{f}={want[f]} or re-run moesim-profile")
        rows = self.rows[self.rows["model"] == model.name]
        curves: dict[str, Curve] = {}
        for op, size in (("expert", "tokens"), ("router", "tokens"), ("shared_experts", "tokens"),
                         ("dense_ffn", "tokens"), ("combine", "tokens"), ("embed", "tokens"),
                         ("lm_head", "batch"), ("host_expert", "tokens"), ("layer_overhead", "tokens"),
                         ("rejection_sampling", "tokens")):
            r = rows[(rows["op"] == op) & (rows["phase"] == "")]
            if len(r):
                curves[op] = Curve(r[size].astype(float), r["median_s"].astype(float))
        # A dense model (num_experts=0: a speculative-decoding drafter, a dense target) has no
        # expert, router or combine rows; it never asks for them (they cost 0 below).
        required = ("expert", "router", "combine", "embed", "lm_head") if model.num_moe_layers else ("embed", "lm_head")
        for op in required:
            if op not in curves:
                raise ConfigError(f"{self.key}={self.profile_dir} has no '{op}' measurements for model={model.name}; "
                                  f"re-run moesim-profile --models {model.name}")
        if model.num_shared_experts and "shared_experts" not in curves:
            raise ConfigError(f"{self.key}={self.profile_dir} has no shared_experts measurements for "
                              f"model={model.name}; re-run moesim-profile --models {model.name}")
        if model.dense_layers and "dense_ffn" not in curves:
            raise ConfigError(f"{self.key}={self.profile_dir} has no dense_ffn measurements for "
                              f"model={model.name}; re-run moesim-profile --models {model.name}")
        grids = {}
        for phase in ("decode", "prefill"):
            r = rows[(rows["op"] == "attention") & (rows["phase"] == phase)]
            grids[phase] = (Grid(r["batch"].astype(float), r["context"].astype(float), r["median_s"].astype(float))
                            if len(r) else None)
        if grids["decode"] is None:
            raise ConfigError(f"{self.key}={self.profile_dir} has no decode attention measurements for "
                              f"model={model.name}; re-run moesim-profile --models {model.name}")
        measured = rows.loc[rows["op"] == "attention", "median_s"].astype(float)
        measured = measured[np.isfinite(measured) & (measured > 0)]
        attention_floor = float(measured.min()) if len(measured) else 0.0
        r = rows[(rows["op"] == "copy_overhead")]
        copy_overhead = max(0.0, float(r["median_s"].median())) if len(r) else 0.0
        r = rows[(rows["op"] == "host_run_overhead")]
        host_run_overhead = max(0.0, float(r["median_s"].median())) if len(r) else 0.0
        r = rows[(rows["op"] == "draft_pass_overhead")]
        draft_pass = float(r["median_s"].median()) if len(r) else 0.0   # signed: a residual
        if not math.isfinite(draft_pass):
            draft_pass = 0.0
        r = rows[rows["op"] == "policy_overhead"]
        policy_overhead = {str(name): max(0.0, float(g["median_s"].median())) for name, g in r.groupby("phase")}
        t = self._models[model.name] = _ModelTables(curves, grids["decode"], grids["prefill"], copy_overhead,
                                                    host_run_overhead, draft_pass, attention_floor,
                                                    _contention_curve(rows, curves.get("expert")), policy_overhead)
        return t

    # ------------------------------------------------------------------ CostModel
    def attention_block_s(self, model: ModelSpec, batch: BatchShape) -> float:
        t = self._tables(model)
        overhead = t.curves["layer_overhead"](batch.tokens) if "layer_overhead" in t.curves else 0.0
        # The residual may be negative, even below -attention: floored (module docstring).
        return max(t.attention_floor_s, overhead + self._attention_s(t, batch))

    def attention_floor_s(self, model: ModelSpec) -> float:
        """The least ``attention_block_s`` answers for ``model``: its cheapest measured attention."""
        return self._tables(model).attention_floor_s

    @staticmethod
    def _attention_s(t: _ModelTables, batch: BatchShape) -> float:
        seqs = max(batch.sequences, 1)
        q = batch.tokens / seqs                 # new tokens per sequence
        c = max(batch.kv_tokens / seqs, q)      # context per sequence
        if q <= 1.0 or t.prefill is None:
            return t.decode(seqs, c)
        prefill = t.prefill(seqs, q)
        if q >= c:
            return prefill
        dec, pre = t.decode(seqs, c), t.prefill(seqs, c)
        f = math.log(q) / math.log(c)
        return dec + (pre - dec) * f

    def router_s(self, model: ModelSpec, tokens: int) -> float:
        if not model.num_moe_layers:
            return 0.0
        return self._tables(model).curves["router"](tokens)

    def expert_s(self, model: ModelSpec, tokens: int) -> float:
        if tokens <= 0 or not model.num_moe_layers:
            return 0.0
        return self._tables(model).curves["expert"](tokens)

    def shared_experts_s(self, model: ModelSpec, tokens: int) -> float:
        if not model.num_shared_experts:
            return 0.0
        return self._tables(model).curves["shared_experts"](tokens)

    def dense_ffn_s(self, model: ModelSpec, tokens: int) -> float:
        if not model.dense_layers:
            return 0.0
        return self._tables(model).curves["dense_ffn"](tokens)

    def combine_s(self, model: ModelSpec, tokens: int) -> float:
        if not model.num_moe_layers:
            return 0.0
        return self._tables(model).curves["combine"](tokens)

    def embed_s(self, model: ModelSpec, tokens: int) -> float:
        return self._tables(model).curves["embed"](tokens)

    def lm_head_s(self, model: ModelSpec, sequences: int) -> float:
        return self._tables(model).curves["lm_head"](sequences)

    def host_expert_s(self, model: ModelSpec, tokens: int) -> float:
        if tokens <= 0 or not model.num_moe_layers:
            return 0.0
        t = self._tables(model)
        if "host_expert" in t.curves:
            return t.curves["host_expert"](tokens)
        if self.device == "cpu":
            return t.curves["expert"](tokens) + t.host_run_overhead_s
        raise ConfigError(f"{self.key}={self.profile_dir} has no host_expert measurements for model={model.name}; "
                          f"re-run moesim-profile on the {self.device} machine")

    def rejection_sampling_s(self, model: ModelSpec, positions: int) -> float:
        curves = self._tables(model).curves
        if "rejection_sampling" not in curves:
            raise ConfigError(f"{self.key}={self.profile_dir} has no rejection_sampling measurements for "
                              f"model={model.name} (speculative decoding); re-run moesim-profile --models {model.name}")
        return curves["rejection_sampling"](positions)

    def copy_s(self, nbytes: float, link: LinkSpec) -> float:
        analytic = link.transfer_s(nbytes)
        if self._copy is None or self.host_link is None or link != self.host_link:
            return analytic
        return max(self._copy(nbytes), analytic)


class TableOverheads:
    """``hw.overheads.ExecutorOverheads`` measured by ``moesim-profile`` (module docstring):
    per-copy host work and draft-pass residuals per model, copy launch and resume on the profiled
    host link (0 on any other link)."""

    def __init__(self, table: "Table"):
        self.table = table

    def draft_pass_overhead_s(self, draft: ModelSpec) -> float:
        """The ``draft_pass_overhead`` row of ``draft`` (module docstring; signed), 0 without it."""
        return self.table._tables(draft).draft_pass_overhead_s

    def copy_overhead_s(self, model: ModelSpec) -> float:
        return self.table._tables(model).copy_overhead_s

    def copy_launch_s(self, link: LinkSpec, engine_idle: bool) -> float:
        t = self.table
        if t.host_link is None or link != t.host_link:
            return 0.0
        return t._launch.get("idle" if engine_idle else "busy", 0.0)

    def copy_resume_s(self, link: LinkSpec) -> float:
        t = self.table
        if t.host_link is None or link != t.host_link:
            return 0.0
        return t._resume

    def policy_overhead_s(self, model: ModelSpec, policy: str) -> float:
        """The ``policy_overhead`` row of ``policy`` (module docstring), 0 without it (LRU's own)."""
        return self.table._tables(model).policy_overhead_s.get(policy, 0.0)

    def copy_contention(self, model: ModelSpec, tokens: int, link: LinkSpec) -> float:
        """How much slower an expert of ``tokens`` runs while the copy engine of ``link`` copies: the
        ``copying`` rows' ratio, interpolated in tokens and held at the end points; 1 on any link
        but the profiled host link, or without the rows."""
        t = self.table
        curve = t._tables(model).copy_contention
        if curve is None or t.host_link is None or link != t.host_link:
            return 1.0
        return curve(min(float(tokens), curve.xs[-1]))


@COST_MODELS.register("table")
def _table_cost_model(hw, model: ModelSpec) -> "Table":
    """``hw.cost_model=table``: the tables in ``hw.profile_dir``, checked against ``model``."""
    table = Table(hw.profile_dir, host_link=hw.host_link, copy_phase=getattr(hw, "profile_copy", "idle"))
    table.check(model)
    return table
