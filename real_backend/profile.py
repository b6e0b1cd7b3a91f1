"""``moesim-profile``: measure the cost tables ``hw.table.Table`` interpolates, on this machine's device.

    moesim-profile [--device cpu|cuda] [--models mini_mixtral,mini_qwen] [-o DIR] [--quick]
                   [--threads N] [--max-layers N] [--seed S]

**Model ops, inside real forward passes.** For each model (a ``conf/model`` name) it builds the
whole model (random weights) and times the functions of ``real_backend.ops`` *inside forward
passes* of it (``MoEModel.forward`` with an ``op_timer``): every op runs exactly as in the
executor, with the cache, allocator and interleaving state a pass leaves behind. (An op timed
alone in a loop keeps its weights cache-hot; timed alone after flushing the caches its weights
are colder than in a pass; on the CPU presets both were 10-30% off against whole passes, while
op times taken inside passes add up to the pass within a few percent.) Routing is forced (the
trace-replay mode) and the KV cache's lengths are set directly (attention's cost does not depend
on the cached values):

* decode grid (``op=attention, phase=decode``): ``batch`` sequences of one new token each,
  attending ``context`` keys, uniform random top-k routing; configs whose KV cache (all layers)
  would exceed ``kv_budget_bytes`` are skipped (the table extrapolates there);
* prefill grid (``op=attention, phase=prefill``): ``batch`` sequences of ``context`` new tokens
  each (causal), uniform random routing;
* expert curve (``op=expert``): one sequence of ``n`` tokens, all routed to the same K experts of
  each layer, so each of them runs on exactly ``n`` tokens (the decode and prefill passes' expert
  runs whose token count lies on the curve are pooled in);
* ``router`` (router + dispatch), ``shared_experts``, ``dense_ffn``, ``combine`` and ``embed``
  (per-pass bookkeeping + embedding lookup) vs the pass's tokens; ``lm_head`` (final norm + LM
  head) vs its sequences: pooled from the decode and prefill passes;
* ``rejection_sampling`` vs ``tokens`` = verified positions (``ops.rejection_sampling`` on the
  ``[tokens, vocab]`` logits of a verify-like pass of the model, timed right after that pass as the
  executor runs it; speculative decoding's ``Table.rejection_sampling_s``), for every model;
* ``op=expert, phase=copying``: expert passes while expert-sized blocks are copied back to back
  as the executor copies them (CPU: its ``CopyEngine`` worker thread with the link shaper at
  ``CALIBRATION_LINK_BPS``, the rate ``moesim-validate`` runs at; CUDA: a side stream). On this
  two-core machine the copy worker's chunks, sleeps and GIL hand-offs slow the compute thread's
  experts; ``Table.overheads.copy_contention`` charges the ratio to experts that run while the
  copy engine is busy. ``phase=after_copy`` (CPU): each expert runs from a slot its weights were
  copied into just before (the copy leaves them in the CPU caches: what a demand-loaded expert
  sees in the executor); the table does not use it;
* ``host_expert`` (CUDA runs only): the expert on the host CPU, timed alone after evicting the
  host's caches (Fiddler-style host execution).

A dense model (``num_experts: 0``, e.g. ``mini_draft``, a speculative-decoding drafter) has no
expert, router or combine rows and no copy or host-run calibration: its tables are the attention
grids, ``dense_ffn``, ``embed``, ``lm_head``, ``rejection_sampling``, ``layer_overhead`` and
``draft_pass_overhead``.

Each config runs ``warmup`` untimed passes, then passes until ``min_passes`` and a time budget are
reached (at most ``max_passes``). A row keeps the median and the 10th/90th percentiles over all
samples of its key (one per layer per pass for per-layer ops; ``repeats`` counts them).

**Executor overheads, from runs of the real executor** (``real_backend.executor.RealExecutor``,
synthetic requests with uniform routing, LRU; not any scenario that gets validated):

* ``layer_overhead`` vs the pass's tokens: with every expert resident (no copies), a pass's wall
  time beyond what the op tables above say its ops take -- Python between ops, op timers,
  scheduling, policy calls, runtime bookkeeping, sampling, and ops running slower inside the
  executor than in the op passes (a larger working set: host store plus slot pool) -- per layer;
  decode passes of ``overhead_batches`` sequences and the prefill passes before them
  (``OVERHEAD_PROMPT`` tokens per sequence), each run ``overhead_repeats`` times with the samples
  pooled (4 in the full sweep). The ops' share comes from simulating the same
  requests with the tables measured so far (``hw.table.Table`` over the rows in memory), pass by
  pass. ``Table`` adds it to each layer's attention block so that the simulator's sum of ops adds
  up to an executor pass. It is a residual, so it can be negative (ops faster in the executor).
* ``copy_overhead`` (``bytes`` = the expert's size): what one expert copy costs the compute thread
  besides waiting for it -- submitting and landing the copy, waking the copy worker, the caches
  its bytes pollute. Measured as pairs of runs of one scenario (batch 1, 4 requests of 16 + 16
  tokens), every expert resident vs half of them (LRU) with the link capped at
  ``CALIBRATION_LINK_BPS`` on CPU: (non-stall time per decode pass, offloaded - resident) /
  expert copies per pass; the median over ``overhead_pairs`` pairs (p10/p90 keep the spread; 15 in
  the full sweep: with 5, mini_qwen's median moved 0.04-0.22 ms between calibrations minutes
  apart, with 15 0.09-0.11 ms).
  Measured here (2026-12-04): 0.67 ms per 11 MB mini_mixtral copy, 0.13 ms per 1.5 MB mini_qwen
  copy (earlier profiles: 0.15-0.3 ms for both). In the executor's timelines that time falls after
  the copy lands (the thread resuming, the ops after it running on caches the copy's bytes went
  through), which is where the simulator charges it.
* ``host_run_overhead`` (CPU): what running a missed expert on the host (Fiddler; on CPU the host
  is the device) costs beyond running it from a slot -- gathering its tokens, the cold weights of
  the host store. Pairs of runs of the same scenario, every expert resident vs half of them with
  ``policy/prefetch=fiddler``: (decode-pass time, fiddler - resident) / host runs per pass.
* ``copy_launch`` (device-level, from the same offloaded runs' copy records): from a copy's
  submission to an idle copy worker to its first byte (``phase=idle``: the worker's wake-up, ~0.1
  ms here) and from one copy's end to the next queued one's start (``phase=busy``, ~30 us);
  ``copy_resume``: from a copy's end to the executor's thread running again when it was blocked
  waiting for that copy (a futex wake-up).
* ``draft_pass_overhead`` (dense models, i.e. speculative-decoding drafters; one row, after every
  model of the run is profiled): what one pass of the draft model costs in the executor's
  speculation rounds beyond what its op tables say (``layer_overhead`` included, which was
  calibrated running the model as a target) -- it runs right after the target's verify pass, with
  the caches that pass left, plus the executor's host work per draft pass (argmax, softmax,
  bookkeeping). Runs of static speculation (``k`` = ``DRAFT_K``, ``alpha`` = ``DRAFT_ALPHA``,
  ``draft_batches`` x ``draft_requests`` requests of ``OVERHEAD_PROMPT`` + ``DRAFT_OUTPUT_LEN``
  tokens, uniform routing, every expert resident) with the model drafting for the first MoE model
  of the run that shares its vocabulary (none: no row): per round, (measured ``draft_s`` - the
  ``Drafter``'s time for the same passes from the tables so far) / passes; the median over rounds
  (``Table.overheads.draft_pass_overhead_s``; signed, a residual).
* ``policy_overhead`` (``phase`` = a prefetch policy; only from ``recalibrate(policies=...)``,
  i.e. ``moesim-validate --recalibrate`` for the policies it validates): the policy's decision
  hooks timed where they run, inside the executor (``_TimedPolicy``), per MoE layer, minus LRU's
  on the same offloaded scenario as ``copy_overhead``; ``POLICY_OVERHEAD_PAIRS`` pairs, LRU and
  the policy alternating, the median of the differences. LRU's own decisions are inside the rows
  above, which are calibrated with it. Measured 2026-12-04: moe_infinity 156-167 us per MoE layer
  beyond LRU's 15-19 us, lfu 8-22 us, lookahead 11-13 us. Timed in the simulator's own process
  (mini_qwen, batch 3), moe_infinity's extra was ~47 us per layer: the executor's thread, with its
  copy worker beside it, takes about three times as long over the same Python.

**Copies** (device-level, ``model`` empty): ``op=copy`` vs bytes, ``phase=idle`` and
``phase=contended`` (while a second thread runs expert FFNs of the first model on 8 tokens back
to back): on CPU a ``copy_`` between two CPU tensors (the executor's host store -> slot pool), on
CUDA pinned host -> device on a side stream. Source and destination rotate through pools of at
least ``copy_pool_bytes`` so copies are not cache-hot. Sizes are log-spaced plus each model's
expert size exactly. Each is timed alone (``perf_counter`` on CPU, CUDA events on the copy stream)
after warm-up calls, until ``min_repeats`` and a time budget are reached (at most
``max_repeats``), with garbage collection off.

**Threads.** Torch intra-op threads are set explicitly (``--threads``; default 1 on CPU: on this
two-core machine one core computes, as the "device", and the other is left to the executor's copy
thread, as the DMA engine). The count is recorded with every row and in the header; the
executor must run with the same count for the tables to apply.

Output into DIR (default ``profiles/<device>/``): ``profile.parquet`` and ``profile.csv`` (one row
per measurement: ``device, model, op, phase, tokens, batch, context, bytes, median_s, p10_s,
p90_s, repeats, threads, dtype``; inapplicable sizes are empty) and ``profile.json`` (machine,
device name, torch version, threads, dtype, date, the shape signature of every model). Profiling
more models into a directory that holds a profile of the same device and thread count keeps the
other models' rows (copy rows are replaced). ``moesim-profile`` replaces anything else there -- a
``profile.*`` file that is not such a profile, or a profile of another device or thread count --
only with ``--force`` (checked before anything is measured; ``check_output_dir``).

Bad input (an unknown model, no CUDA, a bad option) prints one line ``moesim-profile: error: ...``
on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from hw.table import COPYING_PHASE, PROFILE_COLUMNS, PROFILE_CSV, PROFILE_HEADER, PROFILE_PARQUET, model_signature
from workloads.io import check_outputs
from workloads.model import ModelSpec
from workloads.validation import ConfigError

from . import ops
from .model import ExpertWeights, MoEModel
from .cli_util import OneLineParser as _Parser, run_cli

PROG = "moesim-profile"
OVERHEAD_PROMPT = 16           # prompt tokens per request in the executor-overhead runs
POLICY_OVERHEAD_PAIRS = 5      # LRU / policy run pairs per policy_overhead row (fewer in a quick sweep)
CALIBRATION_LINK_BPS = 2e9     # CPU link cap of the copy_overhead runs (moesim-validate's default)
DEFAULT_MODELS = ("mini_mixtral", "mini_qwen", "mini_draft")   # mini_draft: the speculation draft
MB = 1 << 20
DRAFT_OUTPUT_LEN = 12         # draft_pass_overhead runs: generated tokens per request ...
DRAFT_K, DRAFT_ALPHA = 3, 0.6  # ... static K and acceptance


@dataclass(frozen=True)
class Sweep:
    """Which points to measure and how hard."""

    expert_tokens: tuple[int, ...]         # expert curve: tokens routed to one expert
    decode_batches: tuple[int, ...]        # decode grid: sequences ...
    decode_contexts: tuple[int, ...]       # ... x keys each attends
    prefill_seqs: tuple[int, ...]          # prefill grid: sequences ...
    prefill_lens: tuple[int, ...]          # ... x new tokens each
    prefill_max_tokens: int                # largest prefill pass
    copy_bytes: tuple[int, ...]            # copy curve (plus each model's expert size)
    extra_expert_tokens: tuple[int, ...]   # expert under copy contention / right after its copy
    warmup: int                            # untimed passes (calls) before each config (point)
    min_passes: int                        # forward passes per config: at least ...
    max_passes: int                        # ... at most ...
    pass_budget_s: float                   # ... and until this much time was spent
    min_repeats: int                       # isolated timings (copies): at least ...
    max_repeats: int                       # ... at most ...
    budget_s: float                        # ... and until this much time was spent
    kv_budget_bytes: float                 # decode configs whose KV cache would exceed this are skipped
    copy_pool_bytes: float                 # copies rotate through this many bytes of buffers
    overhead_batches: tuple[int, ...]      # executor runs (every expert resident): decode batch sizes
    overhead_pairs: int                    # resident/offloaded executor run pairs for copy_overhead
    # layer_overhead: runs of each overhead batch (their passes pooled). One short run gives ~10
    # decode samples per token count, and its median swung 0.14-0.47 ms per layer between
    # profiles of mini_qwen at 2 tokens (p10-p90 spanning 0.9 ms): ~1-2 ms of a 20 ms pass.
    overhead_repeats: int = 1
    reject_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)   # rejection sampling: verified positions
    draft_batches: tuple[int, ...] = (1, 2)   # draft_pass_overhead runs: batch sizes ...
    draft_requests: tuple[int, ...] = (3, 4)  # ... and requests of each run
    draft_runs: int = 2                       # runs of each


FULL = Sweep(
    expert_tokens=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    decode_batches=(1, 2, 4, 8, 16, 32, 64),
    decode_contexts=(64, 128, 256, 512, 1024, 2048),
    prefill_seqs=(1, 2, 4, 8),
    prefill_lens=(16, 64, 128, 256, 512),
    prefill_max_tokens=2048,
    copy_bytes=tuple(4096 * 4 ** i for i in range(8)),           # 4 KB .. 64 MB
    extra_expert_tokens=(1, 8, 64),
    warmup=1, min_passes=3, max_passes=12, pass_budget_s=0.2,
    min_repeats=5, max_repeats=60, budget_s=0.15,
    kv_budget_bytes=1.0e9, copy_pool_bytes=256 * MB,
    overhead_batches=(1, 2, 4, 8, 16, 32, 64), overhead_pairs=15, overhead_repeats=4)

QUICK = Sweep(
    expert_tokens=(1, 4, 16, 64, 256),
    decode_batches=(1, 8, 32),
    decode_contexts=(128, 1024),
    prefill_seqs=(1, 4),
    prefill_lens=(32, 128),
    prefill_max_tokens=512,
    copy_bytes=(64 * 1024, 1 * MB, 16 * MB),
    extra_expert_tokens=(1,),
    warmup=1, min_passes=2, max_passes=2, pass_budget_s=0.0,
    min_repeats=3, max_repeats=15, budget_s=0.03,
    kv_budget_bytes=0.5e9, copy_pool_bytes=64 * MB,
    overhead_batches=(1, 8), overhead_pairs=1, reject_tokens=(1, 8, 64), draft_runs=1)


# --------------------------------------------------------------------------- timing


class Clock:
    """Times one call: perf_counter on CPU; CUDA events on ``stream`` (default: the current one)."""

    def __init__(self, device: torch.device, stream=None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = stream

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            fn()
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class _TimedPolicy:
    """A prefetch policy whose decision hooks are timed where they run (``spent_s``: wall seconds
    summed, perf_counter); everything else passes through to the policy itself."""

    HOOKS = ("on_step_begin", "on_routed", "on_miss", "victim", "on_copy_done", "on_step_end")

    def __init__(self, policy):
        self._policy = policy
        self.spent_s = 0.0

    def __getattr__(self, name: str):
        attr = getattr(self._policy, name)
        if name not in self.HOOKS:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.spent_s += time.perf_counter() - t0
        return timed


def _summary(samples: Sequence[float]) -> dict:
    a = np.asarray(samples, dtype=float)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)), "repeats": len(a)}


def measure(fn: Callable[[], object], clock: Clock, sweep: Sweep,
            before: Optional[Callable[[], object]] = None) -> dict:
    """An op timed alone: warm up, then repeat until ``min_repeats`` and the time budget are met
    (at most ``max_repeats``). ``before`` runs, untimed, before every call."""
    with torch.inference_mode():
        for _ in range(sweep.warmup):
            if before is not None:
                before()
            fn()
        ops.synchronize(clock.device)
        samples: list[float] = []
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            t_start = time.perf_counter()
            while len(samples) < sweep.max_repeats:
                if before is not None:
                    before()
                    ops.synchronize(clock.device)
                samples.append(clock.time(fn))
                if len(samples) >= sweep.min_repeats and time.perf_counter() - t_start >= sweep.budget_s:
                    break
        finally:
            if was_enabled:
                gc.enable()
    return _summary(samples)


class _PassTimer:
    """``op_timer`` + ``on_routed`` for one forward pass: each op's duration and the tokens each
    expert got (CUDA: event pairs on the current stream, read after the pass)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.spans: list[tuple] = []
        self.counts: dict[int, dict[int, int]] = {}

    def routed(self, layer: int, experts: list[int], counts: list[int]) -> None:
        self.counts[layer] = dict(zip(experts, counts))
        return None

    @contextlib.contextmanager
    def __call__(self, op: str, layer: Optional[int], expert: Optional[int]) -> Iterator[None]:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.spans.append((op, layer, expert, (a, b)))
        else:
            t0 = time.perf_counter()
            yield
            self.spans.append((op, layer, expert, time.perf_counter() - t0))

    def results(self, kind: str, seqs: int, tokens: int, context: int, expert_phase: str = "",
                num_layers: int = 1):
        """``(key, seconds)`` per op, keyed as the profile's rows group them."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for op, layer, expert, t in self.spans:
            dt = t[0].elapsed_time(t[1]) / 1e3 if self.cuda else t
            if op == "attention":
                yield ("attention", kind, seqs, context, tokens), dt
            elif op == "expert":
                yield ("expert", expert_phase, self.counts[layer][expert]), dt
            elif op == "lm_head":
                yield ("lm_head", seqs), dt
            else:
                yield (op, tokens), dt


class _Background:
    """Runs ``step`` over and over in a daemon thread while the ``with`` block runs."""

    def __init__(self, step: Callable[[], None], name: str):
        self.step, self.name = step, name
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self.stop.is_set():
                    self.step()
        except BaseException as exc:  # surfaced on exit
            self.error = exc

    def __enter__(self) -> "_Background":
        self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self.thread.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


class _ShapedCopies:
    """The executor's CPU copy engine (``real_backend.offload.CopyEngine``, capped at
    ``bandwidth_bps``) kept busy with copies of ``src[i]`` into ``dst[i]`` while the ``with`` block
    runs: a feeder thread keeps two jobs queued and waits on the oldest."""

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor], bandwidth_bps: float):
        from .offload import CopyEngine, CopyJob

        self._job = lambda i: CopyJob(("profile", i), "demand", 0, int(src[i].numel()), src[i], dst[i])
        self.engine = CopyEngine("cpu", bandwidth_bps, name="profile copy")
        self.count = len(src)
        self._feeder = _Background(self._feed, "profile-copy-feeder")
        self._queued: list = []
        self._next = 0

    def _feed(self) -> None:
        while len(self._queued) < 2:
            self._queued.append(self.engine.submit(self._job(self._next)))
            self._next = (self._next + 1) % self.count
        self._queued.pop(0).done.wait()
        self.engine.take_completed()

    def __enter__(self) -> "_ShapedCopies":
        self._feeder.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._feeder.__exit__(*exc)
        finally:
            self.engine.close()


# --------------------------------------------------------------------------- specs


def dtype_consistent(spec: ModelSpec, dtype: torch.dtype) -> ModelSpec:
    """The spec with the byte sizes of the dtype the profile actually runs at."""
    b = float(ops.DTYPE_BYTES[dtype])
    return replace(spec, weight_bytes_per_param=b, expert_bytes_per_param=None, kv_bytes_per_elem=b,
                   act_bytes_per_elem=b)


def truncated(spec: ModelSpec, max_layers: Optional[int]) -> ModelSpec:
    """The first ``max_layers`` layers of ``spec`` (per-layer op costs do not depend on the depth)."""
    if max_layers is None or max_layers >= spec.num_layers:
        return spec
    dense = tuple(d for d in spec.dense_layers if d < max_layers)
    if len(dense) >= max_layers and not spec.is_dense:
        raise ConfigError(f"--max-layers={max_layers} keeps no MoE layer of model={spec.name} "
                          f"(dense layers {list(spec.dense_layers)}); use a larger value")
    return replace(spec, num_layers=max_layers, dense_layers=dense)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resolve_models(models: Sequence[str | ModelSpec]) -> list[ModelSpec]:
    from sim.config import compose_scenario

    return [m if isinstance(m, ModelSpec) else compose_scenario([f"model={m}"]).model for m in models]


# --------------------------------------------------------------------------- the profiler


class _Profiler:
    def __init__(self, device: torch.device, dtype: torch.dtype, sweep: Sweep, threads: int, seed: int,
                 log: Callable[[str], None]):
        self.device, self.dtype, self.sweep, self.threads, self.seed = device, dtype, sweep, threads, seed
        self.rows: list[dict] = []
        self.log = log
        self.rng = random.Random(seed)
        self._launch_samples: dict[str, list[float]] = {}   # copy_launch, pooled over the models
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, model: str, op: str, result: dict, phase: str = "", tokens=None, batch=None, context=None,
            nbytes=None) -> None:
        self.rows.append({"device": self.device.type, "model": model, "op": op, "phase": phase, "tokens": tokens,
                          "batch": batch, "context": context, "bytes": nbytes, **result,
                          "threads": self.threads, "dtype": str(self.dtype).replace("torch.", "")})

    def tables_so_far(self, spec: ModelSpec):
        """``hw.table.Table`` over the rows measured so far for ``spec`` (calibration runs simulate
        with it)."""
        from hw.table import Table

        partial = pd.DataFrame(self.rows, columns=PROFILE_COLUMNS)
        partial = partial[partial["model"] == spec.name].copy()
        for c in ("model", "op", "phase"):
            partial[c] = partial[c].fillna("").astype(str)
        return Table("(profiling)", loaded=({"device": self.device.type,
                                             "models": {spec.name: model_signature(spec)}}, partial))

    # ------------------------------------------------------------------ model ops inside passes
    def model_ops(self, spec: ModelSpec) -> MoEModel:
        """Time every op of ``spec`` inside forward passes of the whole model (module docstring)."""
        sw, name = self.sweep, spec.name
        t0 = time.perf_counter()
        model = MoEModel(spec, self.device, self.dtype, seed=self.seed)
        samples: dict[tuple, list[float]] = {}
        E, K = spec.num_experts, spec.top_k
        geom = model.geometry
        kv_per_token = spec.num_layers * ops.DTYPE_BYTES[self.dtype] * 2 * geom.kv_heads * geom.head_dim
        g = torch.Generator().manual_seed(self.seed + 7)
        on_curve = set(sw.expert_tokens)

        def uniform(T: int) -> dict:
            return {l: torch.rand(T, E, generator=g).topk(K, dim=-1).indices for l in spec.moe_layers}

        def concentrated(T: int) -> dict:
            return {l: torch.randperm(E, generator=g)[:K].repeat(T, 1) for l in spec.moe_layers}

        def run(kind: str, cache: ops.KVCache, slots: list[int], start: int, new: int, routing, keep,
                expert_phase: str = "", get_expert=None) -> None:
            tokens = [[1] * new for _ in slots]
            T, context = new * len(slots), start + new
            t_cfg = time.perf_counter()
            done = 0
            while True:
                for s in slots:
                    cache.lengths[s] = start
                timer = _PassTimer(self.device)
                forced = routing(T)
                with torch.inference_mode():
                    ops.synchronize(self.device)
                    model.forward(tokens, cache, slots, routing=forced, op_timer=timer, on_routed=timer.routed,
                                  get_expert=get_expert)
                    ops.synchronize(self.device)
                done += 1
                if done <= sw.warmup:
                    continue
                for key, dt in timer.results(kind, len(slots), T, context, expert_phase, spec.num_layers):
                    if keep(key):
                        samples.setdefault(key, []).append(dt)
                n = done - sw.warmup
                if n >= sw.max_passes or (n >= sw.min_passes and time.perf_counter() - t_cfg >= sw.pass_budget_s):
                    break

        everything = lambda k: k[0] != "expert" or k[2] in on_curve  # noqa: E731
        experts_only = lambda k: k[0] == "expert"  # noqa: E731

        # Decode grid.
        for b in sw.decode_batches:
            ctxs = [c for c in sw.decode_contexts if b * c * kv_per_token <= sw.kv_budget_bytes]
            if not ctxs:
                continue
            cache = model.new_cache(b, max(ctxs))
            for t in cache.k + cache.v:
                t.fill_(0.01)  # touch every page: never-written zero pages read as if they were cached
            slots = [cache.allocate() for _ in range(b)]
            for c in ctxs:
                run("decode", cache, slots, c - 1, 1, uniform, everything)
            del cache
        self.log(f"{name}: decode passes in {time.perf_counter() - t0:.1f} s")
        t1 = time.perf_counter()
        if model.experts:   # a dense model has no expert curve (nor copies of experts)
            # Expert curve, and the same passes under copy contention / right after each expert's copy.
            cache = model.new_cache(1, max(sw.expert_tokens))
            for n in sw.expert_tokens:
                run("expert", cache, [0], 0, n, concentrated, experts_only)
            nbytes = model.expert_nbytes
            src, dst = self._buffers(nbytes)
            with self._copies_running(src, dst):
                for n in sw.extra_expert_tokens:
                    run("expert", cache, [0], 0, n, concentrated, experts_only, expert_phase=COPYING_PHASE)
            del src, dst
            if self.device.type == "cpu":
                slot = ExpertWeights(*(torch.empty_like(t) for t in model.experts[next(iter(model.experts))].tensors))

                def copy_in(layer: int, e: int):
                    ops.copy_expert(slot.tensors, model.experts[(layer, e)].tensors)
                    return slot.tensors

                for n in sw.extra_expert_tokens:
                    run("expert", cache, [0], 0, n, concentrated, experts_only, expert_phase="after_copy",
                        get_expert=copy_in)
            del cache
        # Prefill grid.
        for s in sw.prefill_seqs:
            lens = [t for t in sw.prefill_lens if s * t <= sw.prefill_max_tokens]
            if not lens:
                continue
            cache = model.new_cache(s, max(lens))
            slots = [cache.allocate() for _ in range(s)]
            for t in lens:
                run("prefill", cache, slots, 0, t, uniform, everything)
            del cache
        self.log(f"{name}: expert and prefill passes in {time.perf_counter() - t1:.1f} s")

        for key, vals in sorted(samples.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            r = _summary(vals)
            op = key[0]
            if op == "attention":
                _, phase, b, c, T = key
                self.add(name, op, r, phase=phase, tokens=T, batch=b, context=c)
            elif op == "expert":
                self.add(name, op, r, phase=key[1], tokens=key[2])
            elif op == "lm_head":
                self.add(name, op, r, tokens=key[1], batch=key[1])
            else:
                self.add(name, op, r, tokens=key[1])
        self.rejection_sampling(spec, model, uniform)
        return model

    def rejection_sampling(self, spec: ModelSpec, model: MoEModel, routing: Callable[[int], dict]) -> None:
        """``rejection_sampling`` rows: ``ops.rejection_sampling`` over ``tokens`` verified positions
        of ``spec``'s vocabulary, each timed right after a verify-like forward pass of the model (one
        sequence of ``tokens`` new tokens, every position's logits, uniform routing) whose logits it
        reads, as the executor runs it: after the target's pass, not cache-hot in a loop (timed in a
        loop it ran 3x faster than in the executor on this CPU). The draft distributions are written
        before the pass, as drafting does; every position drafted (the op's work does not depend on
        how many are bonus rows)."""
        sw, V, dev = self.sweep, spec.vocab_size, self.device
        clock = Clock(dev)
        cache = model.new_cache(1, max(sw.reject_tokens) + 1)
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        for n in sw.reject_tokens:
            samples: list[float] = []
            t_cfg = time.perf_counter()
            done = 0
            while True:
                q = torch.randn(n, V, generator=self.gen).softmax(dim=-1).to(dev)
                drafted = torch.randint(0, V, (n,), generator=self.gen).to(dev)
                cache.lengths[0] = 0
                with torch.inference_mode():
                    logits = model.forward([[1] * n], cache, [0], routing=routing(n), all_logits=True).logits
                    ops.synchronize(dev)
                    dt = clock.time(lambda: ops.rejection_sampling(logits, q, drafted, generator=gen))
                done += 1
                if done <= sw.warmup:
                    continue
                samples.append(dt)
                if len(samples) >= sw.max_passes or (len(samples) >= sw.min_passes
                                                     and time.perf_counter() - t_cfg >= sw.pass_budget_s):
                    break
            self.add(spec.name, "rejection_sampling", _summary(samples), tokens=n)

    def executor_overheads(self, spec: ModelSpec, policies: Sequence[str] = ()) -> None:
        """``layer_overhead`` and ``copy_overhead`` rows from runs of the real executor (module
        docstring); a dense model gets ``layer_overhead`` only (no experts: no copies, no host runs).
        ``policies``: prefetch policies (besides LRU) whose ``policy_overhead`` rows to measure too."""
        from dataclasses import replace as _replace

        from sim.config import compose_scenario
        from sim.policies.base import prefetch_policy_class

        from .executor import RealExecutor, build_model_and_store

        sw, E, L = self.sweep, spec.num_experts, spec.num_layers
        t0 = time.perf_counter()
        cap_bps = CALIBRATION_LINK_BPS if self.device.type == "cpu" else 1e12

        def scenario(batch: int, requests: int, output_len: int, capacity: int, policy: str = "lru"):
            # The executor never asks the cost model, and the tables are what is being written:
            # the roofline stands in so that no profile_dir needs to exist yet (fresh clones).
            # Gate-lookahead predictions only for a policy that reads them.
            predictions = [] if prefetch_policy_class(policy).uses_predictions else ["workload.lookahead_accuracy=null"]
            sc = compose_scenario(["hw=this_cpu", "hw.cost_model=roofline", f"workload.batch_size={batch}",
                                   f"workload.num_requests={requests}", f"workload.prompt_len={OVERHEAD_PROMPT}",
                                   f"workload.output_len={output_len}", "workload.routing=uniform",
                                   *predictions, f"policy/prefetch={policy}",
                                   f"hw.host_link.bandwidth_bps={cap_bps}", "sim.progress=false",
                                   f"seed={self.seed}"])
            if spec.is_dense:   # no experts: no cache to size
                return _replace(sc, model=spec)
            return _replace(sc, model=spec, prefetch=_replace(sc.prefetch, capacity_per_layer=capacity))

        model, store = build_model_and_store(scenario(1, 1, 2, E), self.device, self.dtype)

        launch: dict[str, list[float]] = {"idle": [], "busy": [], "resume": []}

        def run(sc, policy=None) -> pd.DataFrame:
            ex = RealExecutor(sc, model=model, store=store, threads=self.threads, policy=policy)
            steps = ex.run().steps
            launch["resume"].extend(ex.rt.resume_delays_s)
            prev_end = -math.inf
            for r in sorted(ex.copy_records, key=lambda r: r.start_s):
                idle = r.queued_at_s >= prev_end
                launch["idle" if idle else "busy"].append(r.start_s - (r.queued_at_s if idle else prev_end))
                prev_end = r.end_s
            return steps

        # The rest is measured against what the tables measured so far say the pass's ops take
        # (not against the executor's own op timers): ops run slower inside the executor than in
        # the op passes above (a larger working set: host store plus slot pool, Python between
        # ops), and the simulator, which only knows the tables, must be charged that too.
        from sim.engine import Engine
        from workloads.requests import build_requests

        ops_table = self.tables_so_far(spec)
        samples: dict[int, list[float]] = {}
        calib = []
        for b in sw.overhead_batches:
            sc = scenario(b, 2 * b, 6, E)
            sim = Engine(sc, build_requests(sc.workload, sc.model, sc.seed), cost=ops_table,
                         progress=False).run().steps
            calib.append((sc, sim[["attention_s", "expert_compute_s", "other_compute_s", "host_expert_s"]].sum(axis=1)))
        for _ in range(sw.overhead_repeats):   # round robin: each batch's runs spread over the calibration
            for sc, ops_s in calib:
                steps = run(sc)
                if len(ops_s) != len(steps):
                    raise RuntimeError(f"calibration: the simulator ran {len(ops_s)} passes, the executor {len(steps)}")
                # Not clipped: where ops run faster inside the executor than in the op passes (large
                # prefill passes), the residual is negative and corrects the tables the other way.
                rest = (steps["duration_s"] - ops_s.to_numpy() - steps["copy_stall_s"]) / L
                for T, v in zip(steps["tokens"], rest):
                    samples.setdefault(int(T), []).append(float(v))
        for T, vals in sorted(samples.items()):
            self.add(spec.name, "layer_overhead", _summary(vals), tokens=T)
        if spec.is_dense:
            self.log(f"{spec.name}: executor overheads in {time.perf_counter() - t0:.1f} s (dense: no copies)")
            return

        per_copy: list[float] = []
        per_host_run: list[float] = []
        resident, offloaded = scenario(1, 4, 17, E), scenario(1, 4, 17, max(1, E // 2))
        host_run = scenario(1, 4, 17, max(1, E // 2), "fiddler") if self.device.type == "cpu" else None
        for _ in range(sw.overhead_pairs):
            res, off = run(resident), run(offloaded)
            if host_run is not None:
                fid = run(host_run)
                fid = fid[fid["phase"] == "decode"]
                runs = float(fid["host_runs"].mean())
                if runs > 0:
                    per_host_run.append(float((fid["duration_s"] - fid["copy_stall_s"]).mean()
                                              - (res[res["phase"] == "decode"]["duration_s"]).mean()) / runs)
            res, off = res[res["phase"] == "decode"], off[off["phase"] == "decode"]
            copies = float(((off["demand_bytes"] + off["prefetch_bytes"]) / store.expert_bytes).mean())
            if copies <= 0:
                continue
            extra = ((off["duration_s"] - off["copy_stall_s"]).mean()
                     - (res["duration_s"] - res["copy_stall_s"]).mean())
            per_copy.append(float(extra) / copies)
        if per_copy:
            self.add(spec.name, "copy_overhead", _summary(per_copy), tokens=1, batch=1, nbytes=int(store.expert_bytes))
        if per_host_run:
            self.add(spec.name, "host_run_overhead", _summary(per_host_run), tokens=1, batch=1)
        for k, vals in launch.items():
            self._launch_samples.setdefault(k, []).extend(vals)
        self.log(f"{spec.name}: executor overheads in {time.perf_counter() - t0:.1f} s"
                 + (f" (copy_overhead {np.median(per_copy) * 1e3:.3f} ms per copy)" if per_copy else ""))
        for policy in sorted(set(policies) - {"lru"}):
            self.policy_overhead(spec, policy, lambda p: scenario(1, 4, 17, max(1, E // 2), p), run)

    def policy_overhead(self, spec: ModelSpec, policy: str, scenario, run) -> None:
        """``policy_overhead`` row of ``policy`` (``hw.table``): its decision hooks' time inside the
        real executor minus LRU's, per MoE layer, on the offloaded calibration runs (``scenario(p)``,
        run by ``run(sc, timed_policy)``), LRU and ``policy`` alternating."""
        from sim.policies.base import prefetch_policy_class

        t0 = time.perf_counter()
        per_layer: dict[str, list[float]] = {"lru": [], policy: []}
        for _ in range(min(POLICY_OVERHEAD_PAIRS, self.sweep.overhead_pairs)):
            for name in per_layer:
                sc = scenario(name)
                timed = _TimedPolicy(prefetch_policy_class(name)(sc.prefetch))
                steps = run(sc, timed)
                per_layer[name].append(timed.spent_s / (len(steps) * spec.num_moe_layers))
        extra = [p - b for p, b in zip(per_layer[policy], per_layer["lru"])]
        self.add(spec.name, "policy_overhead", _summary(extra), phase=policy, tokens=1, batch=1)
        self.log(f"{spec.name}: policy_overhead of {policy} {np.median(extra) * 1e6:.1f} us per MoE layer "
                 f"beyond lru's {np.median(per_layer['lru']) * 1e6:.1f} us, in {time.perf_counter() - t0:.1f} s")

    def draft_overheads(self, draft: ModelSpec, target: ModelSpec) -> None:
        """``draft_pass_overhead`` row of the dense model ``draft`` (module docstring): static
        speculation on the real executor with ``draft`` drafting for ``target`` (both profiled in
        this run), against what ``draft``'s tables say its passes take (``sim.speculation.Drafter``
        over the rows measured so far, without this row)."""
        from dataclasses import replace as _replace

        from sim.config import compose_scenario
        from sim.speculation import Drafter

        from .executor import RealExecutor, build_model_and_store

        sw = self.sweep
        t0 = time.perf_counter()

        class Recording(RealExecutor):   # each round's (positions, drafts, k), in step order
            def _draft_round(self, batch, rnd):
                self.rounds.append(([r.pos for r in batch], list(rnd.drafts), rnd.k))
                return super()._draft_round(batch, rnd)

        def scenario(batch: int, requests: int):
            sc = compose_scenario(["hw=this_cpu", "hw.cost_model=roofline", f"workload.batch_size={batch}",
                                   f"workload.num_requests={requests}", f"workload.prompt_len={OVERHEAD_PROMPT}",
                                   f"workload.output_len={DRAFT_OUTPUT_LEN}", "workload.routing=uniform",
                                   "workload.lookahead_accuracy=null", "policy/prefetch=lru",
                                   "policy/speculation=static", "policy.speculation.drafter=model",
                                   "policy.speculation.draft_model=mini_draft",
                                   f"policy.speculation.k={DRAFT_K}", f"policy.speculation.alpha={DRAFT_ALPHA}",
                                   "sim.progress=false", f"seed={self.seed}"])
            sc = _replace(sc, model=target, draft_model=draft)
            if target.is_dense:
                return sc
            return _replace(sc, prefetch=_replace(sc.prefetch, capacity_per_layer=target.num_experts))

        table = self.tables_so_far(draft)
        first = scenario(1, 1)
        model, store = build_model_and_store(first, self.device, self.dtype)   # every expert resident
        dmodel = MoEModel(draft, self.device, self.dtype, seed=self.seed + 1)
        drafter = Drafter.build(first.speculation, target, draft, table)
        per_pass: dict[int, list[float]] = {}
        for b, n in zip(sw.draft_batches, sw.draft_requests):
            for _ in range(sw.draft_runs):
                ex = Recording(scenario(b, n), model=model, store=store, draft=dmodel, threads=self.threads)
                ex.rounds = []
                steps = ex.run().steps
                real = steps.loc[steps["phase"] == "decode", "draft_s"].to_numpy(dtype=float)
                if len(real) != len(ex.rounds):
                    raise RuntimeError(f"calibration: {len(real)} decode passes but {len(ex.rounds)} rounds")
                for (positions, drafts, k), t in zip(ex.rounds, real):
                    passes = drafter.round_passes(drafts, k)
                    if passes:
                        per_pass.setdefault(b, []).append((t - drafter.round_s(positions, drafts, k)) / passes)
        del model, store, dmodel
        pooled = [v for vals in per_pass.values() for v in vals]
        if not pooled:
            self.log(f"{draft.name}: no draft passes ran; no draft_pass_overhead row")
            return
        self.add(draft.name, "draft_pass_overhead", _summary(pooled))
        by_batch = ", ".join(f"B={b}: {np.median(v) * 1e3:.3f}" for b, v in sorted(per_pass.items()))
        self.log(f"{draft.name}: draft_pass_overhead {np.median(pooled) * 1e3:.3f} ms per pass ({by_batch}; "
                 f"drafting for {target.name}) in {time.perf_counter() - t0:.1f} s")

    def host_expert(self, spec: ModelSpec) -> None:
        """CUDA runs: one expert on the host CPU (float32), timed alone with the host's caches
        evicted before every call (a host-run expert's weights come from DRAM)."""
        cpu = torch.device("cpu")
        model = MoEModel(replace(spec, num_layers=1, dense_layers=()), cpu, torch.float32, seed=self.seed)
        pool = [model.experts[k] for k in sorted(model.experts)]
        flush = torch.ones(64 * MB)  # 256 MB of float32, larger than a server's last-level cache
        clock = Clock(cpu)
        for n in self.sweep.expert_tokens:
            x, idx, w = torch.randn(n, spec.hidden_size), torch.arange(n), torch.ones(n, 1)
            r = measure(lambda: ops.run_expert(x, idx, w, *pool[self.rng.randrange(len(pool))].tensors), clock,
                        self.sweep, lambda: (flush.sum(), x.sum()))
            self.add(spec.name, "host_expert", r, tokens=n)

    # ------------------------------------------------------------------ copies
    def _buffers(self, nbytes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Source (host; pinned for CUDA) and destination (device) buffers of ``nbytes``, enough of
        them to cover ``copy_pool_bytes``, every page written."""
        count = int(max(2, -(-self.sweep.copy_pool_bytes // nbytes)))
        pin = self.device.type == "cuda"
        src = []
        for _ in range(count):
            t = torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=pin)
            t.fill_(1)
            src.append(t)
        dst = [torch.ones(int(nbytes), dtype=torch.uint8, device=self.device) for _ in range(count)]
        return src, dst

    def _copier(self, src: list[torch.Tensor], dst: list[torch.Tensor], stream=None) -> Callable[[], None]:
        """One copy per call, rotating through the buffers (on ``stream`` for CUDA, waited for)."""
        state = {"i": 0}
        cuda = self.device.type == "cuda"
        stream = stream or (torch.cuda.Stream(self.device) if cuda else None)

        def copy() -> None:
            i = state["i"] = (state["i"] + 1) % len(src)
            if stream is None:
                dst[i].copy_(src[i])
                return
            with torch.cuda.stream(stream):
                dst[i].copy_(src[i], non_blocking=True)
            stream.synchronize()

        return copy

    def _copies_running(self, src: list[torch.Tensor], dst: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        """Copies of ``src`` into ``dst`` back to back while the ``with`` block runs, as the executor
        makes them: on CPU through its own ``CopyEngine`` (the worker thread, its link shaper at
        ``CALIBRATION_LINK_BPS``, two jobs queued so the worker never waits); on CUDA on a side stream."""
        if self.device.type == "cuda":
            return _Background(self._copier(src, dst), "profile-copy")
        return _ShapedCopies(src, dst, CALIBRATION_LINK_BPS)

    def copies(self, sizes: Sequence[int], pool: Optional[list[ExpertWeights]]) -> None:
        """The copy curve alone (``idle``) and while expert FFNs run in another thread (``contended``)."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        clock = Clock(self.device, stream)

        def curve(phase: str) -> None:
            for nbytes in sizes:
                src, dst = self._buffers(nbytes)
                state = {"i": 0}

                def copy() -> None:
                    i = state["i"] = (state["i"] + 1) % len(src)
                    if stream is None:
                        dst[i].copy_(src[i])
                    else:
                        with torch.cuda.stream(stream):
                            dst[i].copy_(src[i], non_blocking=True)

                self.add("", "copy", measure(copy, clock, self.sweep), phase=phase, nbytes=int(nbytes))
                del src, dst

        curve("idle")
        for phase, vals in sorted(self._launch_samples.items()):
            if vals and phase == "resume":
                self.add("", "copy_resume", _summary(vals))
            elif vals:
                self.add("", "copy_launch", _summary(vals), phase=phase)
        if not pool:
            return
        x = (torch.randn(8, pool[0].gate_up.shape[1], generator=self.gen)).to(self.device, self.dtype)
        idx = torch.arange(8, device=self.device)
        w = torch.ones(8, 1, device=self.device, dtype=self.dtype)
        rng = random.Random(self.seed + 1)

        def compute() -> None:
            ops.run_expert(x, idx, w, *pool[rng.randrange(len(pool))].tensors)
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()

        with _Background(compute, "profile-compute"):
            curve("contended")


# --------------------------------------------------------------------------- the run


def run_profile(models: Sequence[str | ModelSpec], device: Optional[str] = None, out_dir: Optional[str | Path] = None,
                quick: bool = False, threads: Optional[int] = None, seed: int = 0, max_layers: Optional[int] = None,
                log: Callable[[str], None] = lambda s: None, sweep: Optional[Sweep] = None) -> Path:
    """Profile ``models`` (conf/model names or ModelSpecs) on ``device`` and write the tables into
    ``out_dir`` (default ``profiles/<device>``); returns the directory."""
    try:
        dev = ops.resolve_device(device)
    except ValueError as exc:
        raise ConfigError(f"--device={device} is not usable here: {exc}") from None
    if threads is None:
        threads = 1 if dev.type == "cpu" else torch.get_num_threads()
    if threads < 1:
        raise ConfigError(f"--threads={threads} is invalid; must be >= 1")
    if max_layers is not None and max_layers < 1:
        raise ConfigError(f"--max-layers={max_layers} is invalid; must be >= 1")
    specs = _resolve_models(models)
    if not specs:
        raise ConfigError("--models is empty; name at least one model, e.g. --models mini_mixtral")
    out = Path(out_dir) if out_dir is not None else Path("profiles") / dev.type
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; give a directory")
    sweep = sweep or (QUICK if quick else FULL)
    dtype = ops.default_dtype(dev)
    specs = [truncated(dtype_consistent(s, dtype), max_layers) for s in specs]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        prof = _Profiler(dev, dtype, sweep, threads, seed, log)
        first_pool: Optional[list[ExpertWeights]] = None
        sizes = set(sweep.copy_bytes)
        for spec in specs:
            model = prof.model_ops(spec)
            if dev.type == "cuda" and not spec.is_dense:
                prof.host_expert(spec)
            prof.executor_overheads(spec)   # after every op table it simulates with
            if model.experts:
                sizes.add(int(model.expert_nbytes))
            if first_pool is None and model.experts:
                first_pool = [model.experts[k] for k in sorted(model.experts)]
            del model
        # Dense models (drafters): draft_pass_overhead, drafting for the first target of the run that
        # shares their vocabulary (its tables and theirs exist by now).
        for spec in specs:
            if not spec.is_dense:
                continue
            target = next((t for t in specs if not t.is_dense and t.vocab_size == spec.vocab_size), None)
            if target is None:
                log(f"{spec.name}: no MoE target of its vocabulary profiled in this run; no draft_pass_overhead row")
                continue
            prof.draft_overheads(spec, target)
        t0 = time.perf_counter()
        prof.copies(sorted(sizes), first_pool)
        log(f"copies in {time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_num_threads(old_threads)
    rows = pd.DataFrame(prof.rows, columns=PROFILE_COLUMNS)
    header = {
        "format": 1,
        "device": dev.type,
        "device_name": device_name(dev),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "duration_s": round(time.perf_counter() - t_start, 2),
        "host_link": ("pinned host -> device copy_ on a side stream" if dev.type == "cuda"
                      else "copy_ between two CPU tensors (host store -> slot pool)"),
        "models": {s.name: model_signature(s) for s in specs},
        "profiled_layers": {s.name: s.num_layers for s in specs},
    }
    write_profile(out, rows, header)
    return out


# what recalibrate() measures again: the executor's time beyond the op tables
EXECUTOR_OVERHEAD_OPS = ("layer_overhead", "copy_overhead", "host_run_overhead", "draft_pass_overhead")


def recalibrate(profile_dir: str | Path, models: Sequence[str | ModelSpec], out_dir: str | Path,
                device: Optional[str] = None, seed: int = 0, log: Callable[[str], None] = lambda s: None,
                sweep: Optional[Sweep] = None, policies: Sequence[str] = ()) -> Path:
    """A copy of the profile in ``profile_dir`` written to ``out_dir`` (a new directory; the input
    is never written) with the executor-overhead rows (``EXECUTOR_OVERHEAD_OPS``) of ``models``
    measured again now, against the profile's own op tables: the same calibration runs as
    ``moesim-profile`` (synthetic requests, uniform routing; a dense model's ``draft_pass_overhead``
    drafting for the first MoE model of ``models`` with its vocabulary, else kept as profiled).
    Those rows are the executor's time minus what the op tables say, so they carry the machine's
    speed at the moment they are measured; ``moesim-validate --recalibrate`` takes them right
    before it validates. Every other row (op tables, copies, launch and resume delays) is kept as
    profiled. ``policies``: prefetch policies (besides LRU) whose ``policy_overhead`` rows are
    measured too, for each MoE model (``hw.table``)."""
    src, out = Path(profile_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ConfigError(f"the recalibrated profile must go to a new directory, not into {src} (its input)")
    header = json.loads((src / PROFILE_HEADER).read_text())
    rows = pd.read_parquet(src / PROFILE_PARQUET)
    try:
        dev = ops.resolve_device(device or header["device"])
    except ValueError as exc:
        raise ConfigError(f"--device={device or header['device']} is not usable here: {exc}") from None
    if dev.type != header["device"]:
        raise ConfigError(f"--device={dev.type} does not match the profile in {src} (measured on {header['device']})")
    threads = int(header["torch_threads"])
    dtype = ops.default_dtype(dev)
    specs = [truncated(dtype_consistent(s, dtype), header.get("profiled_layers", {}).get(s.name))
             for s in _resolve_models(models)]
    specs.sort(key=lambda s: s.is_dense)   # targets first: a drafter's overhead is measured drafting for one
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for spec in specs:
            if header.get("models", {}).get(spec.name) != model_signature(spec):
                raise ConfigError(f"{src} holds no cost tables for model {spec.name} as configured; "
                                  f"run moesim-profile --models {spec.name}")
            prof = _Profiler(dev, dtype, sweep or (QUICK if header.get("quick") else FULL), threads, seed, log)
            mine = rows["model"] == spec.name
            drafts_for = (next((t for t in specs if not t.is_dense and t.vocab_size == spec.vocab_size), None)
                          if spec.is_dense else None)
            remeasured = (["layer_overhead"] if spec.is_dense else ["layer_overhead", "copy_overhead",
                                                                     "host_run_overhead"])
            if drafts_for is not None:
                remeasured.append("draft_pass_overhead")
            stale = rows["op"].isin(remeasured) | ((rows["op"] == "policy_overhead") & rows["phase"].isin(policies))
            prof.rows = rows[mine & ~stale].to_dict("records")   # kept as profiled
            prof.executor_overheads(spec, () if spec.is_dense else policies)
            if drafts_for is not None:
                prof.draft_overheads(spec, drafts_for)
            rows = pd.concat([rows[~mine], pd.DataFrame(prof.rows, columns=PROFILE_COLUMNS)], ignore_index=True)
    finally:
        torch.set_num_threads(old_threads)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    header = {**header, "recalibrated": {"date": now, "from": str(src.resolve()), "models": [s.name for s in specs]}}
    write_profile(out, rows, header)
    return out


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in ("tokens", "batch", "context", "bytes", "repeats", "threads"):
        df[c] = pd.array(df[c], dtype="Int64")
    for c in ("median_s", "p10_s", "p90_s"):
        df[c] = df[c].astype(float)
    for c in ("device", "model", "op", "phase", "dtype"):
        df[c] = df[c].astype(str)
    return df[PROFILE_COLUMNS]


def write_profile(out: Path, rows: pd.DataFrame, header: dict) -> None:
    """Write (or merge into) the profile in ``out``, each file atomically."""
    out.mkdir(parents=True, exist_ok=True)
    rows = _typed(rows)
    if (out / PROFILE_HEADER).is_file() and (out / PROFILE_PARQUET).is_file():
        try:
            old_header = json.loads((out / PROFILE_HEADER).read_text())
            old = pd.read_parquet(out / PROFILE_PARQUET)
        except (OSError, ValueError):
            old_header, old = None, None
        if (old_header is not None and old_header.get("device") == header["device"]
                and old_header.get("torch_threads") == header["torch_threads"]):
            keep = old[(old["model"] != "") & ~old["model"].isin(list(header["models"]))]
            if len(keep):
                rows = _typed(pd.concat([keep, rows], ignore_index=True))
                for field in ("models", "profiled_layers"):
                    merged = {k: v for k, v in old_header.get(field, {}).items() if k not in header[field]}
                    merged.update(header[field])
                    header = {**header, field: merged}

    def atomic(name: str, write: Callable[[Path], None]) -> None:
        tmp = out / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, out / name)

    atomic(PROFILE_PARQUET, lambda p: rows.to_parquet(p, index=False))
    atomic(PROFILE_CSV, lambda p: rows.to_csv(p, index=False))
    atomic(PROFILE_HEADER, lambda p: p.write_text(json.dumps(header, indent=2) + "\n"))


# --------------------------------------------------------------------------- CLI


def check_output_dir(out: Path, device: str, threads: int, force: bool) -> None:
    """Refuse (ConfigError, one line) to replace what ``out`` holds, before anything is measured.

    ``out`` may be missing, hold unrelated files (left alone) or hold a profile this command wrote
    for the same device and thread count (merged into, as the module docstring says). Anything
    else -- a ``profile.*`` file that is not such a profile, or a profile of another device or
    thread count, which the new one would replace whole -- needs ``--force``.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; give a directory")
    files = [("", out / name) for name in (PROFILE_PARQUET, PROFILE_CSV, PROFILE_HEADER)]
    merge = False
    if (out / PROFILE_HEADER).is_file() and (out / PROFILE_PARQUET).is_file():
        try:
            old = json.loads((out / PROFILE_HEADER).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            old = None
        if isinstance(old, dict) and "format" in old and "models" in old:
            if (old.get("device"), old.get("torch_threads")) == (device, threads):
                merge = True
            elif not force:
                raise ConfigError(f"-o {out} holds a profile of device {old.get('device')} with "
                                  f"{old.get('torch_threads')} thread(s), which this run ({device}, {threads} "
                                  f"thread(s)) would replace; pass --force to replace it or name another -o DIR")
    check_outputs(files, (), force or merge)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Measure the cost tables of the MoE ops on this machine's device "
                "(see real_backend/profile.py); hw.table.Table reads them (e.g. moesim hw=this_cpu).")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), metavar="A,B",
                   help=f"conf/model names to profile (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="output directory (default profiles/<device>/)")
    p.add_argument("--quick", action="store_true", help="fewer points and passes (seconds, for tests and smoke runs)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default 1 on cpu, torch's default on cuda); the executor "
                        "must use the same")
    p.add_argument("--max-layers", type=int, default=None, metavar="N",
                   help="build only the first N layers of each model (for models too large for this device; "
                        "per-layer op costs do not depend on the depth)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and routing (default 0)")
    p.add_argument("--force", action="store_true",
                   help="replace existing output files in DIR: profile.* files that are not a profile of "
                        "this device and thread count (one that is is merged into without --force)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        try:
            dev = ops.resolve_device(args.device)
        except ValueError:
            dev = None  # run_profile says why, before any work
        if dev is not None:
            threads = args.threads if args.threads is not None else (
                1 if dev.type == "cpu" else torch.get_num_threads())
            out_dir = Path(args.output) if args.output else Path("profiles") / dev.type
            check_output_dir(out_dir, dev.type, threads, args.force)
        t0 = time.perf_counter()
        out = run_profile(models, args.device, args.output, quick=args.quick, threads=args.threads,
                          seed=args.seed, max_layers=args.max_layers,
                          log=lambda s: print(f"{PROG}: {s}", file=sys.stderr, flush=True))
        rows = pd.read_parquet(out / PROFILE_PARQUET)
        print(f"{PROG}: wrote {out}/{{{PROFILE_PARQUET},{PROFILE_CSV},{PROFILE_HEADER}}}: {len(rows)} rows, "
              f"models {', '.join(models)}, {time.perf_counter() - t0:.1f} s")
        return 0

    return run_cli(PROG, body)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
