"""The serving loop, written once (no simpy, no torch): both backends drive this protocol.

Sans-I/O, like h11: the loop decides, counts and records; a backend (the SimPy engine,
``sim.engine``, or the real executor, ``real_backend.executor``) only carries out each pass's work
and tells the loop when things happened. One run, as a backend drives it::

    loop = ServingLoop(scenario, requests, offload, spec_policy)
    while (s := loop.next_step(now_s)) is not None:
        if isinstance(s, Idle): wait until s.until_s; continue
        loop.begin_pass(s)                                  # scheduler's pass -> offload.begin_step
        for each layer:
            ...attention, router (the backend's compute)...
            acc = loop.layer(s, layer, ids, counts)         # predictions, policy, copy orders
            ...run acc.hits, wait for and run acc.waiting, run acc.host on the host...
            loop.end_layer()
        finished = loop.end_pass(s, start_s, end_s, PassTimes(...))   # records, round end, completions
    result = loop.result(extra_summary)

What lives here: the scheduler seam (``sim.schedulers``: which requests, how many tokens), the
pass's routing rows (speculation rounds' rejected positions included), gate-lookahead predictions
for the next layer, the step and request records (``STEP_COLUMNS`` / ``REQUEST_COLUMNS``, one
schema for both engines), the speculation round's end (``on_round_end``) and the summary. The
offload protocol itself (residency, victims, prefetches, counters) is ``sim.cache_controller``,
reached through an ``OffloadPort``: the controller itself in the simulator, the real
``OffloadRuntime`` (which lands finished copies first) in the executor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from workloads.acceptance import AcceptanceSampler
from workloads.model import ModelSpec
from workloads.requests import Request

from .cache_controller import LayerAccess, StepCounters
from .memory import MemoryBudget, default_activation_bytes, plan_memory
from .policies.base import PrefetchPolicy, StepInfo
from .policies.speculation import RoundResult, SpecContext, SpeculationPolicy
from .records import Records
from .scenario import Scenario
from .schedulers import RunningRequest, Scheduler, build_scheduler
from .speculation import Drafter, RejectedRouting, Round, plan_round, spec_columns

STEP_COLUMNS = ["step", "phase", "start_s", "end_s", "duration_s", "batch_size", "tokens", "attention_s",
                "expert_compute_s", "other_compute_s", "copy_stall_s", "host_stall_s", "host_expert_s",
                "h2d_bytes", "demand_bytes", "prefetch_bytes", "hits", "misses", "late_prefetches",
                "prefetches", "useful_prefetches", "demand_loads", "host_runs", "wasted_prefetch_bytes",
                "active_experts_mean", "active_experts_per_layer", "spec_k", "drafting_requests", "draft_tokens",
                "accepted_tokens", "committed_tokens", "draft_s", "reject_s"]
REQUEST_COLUMNS = ["request_id", "arrival_s", "prompt_len", "output_len", "first_token_s", "finish_s",
                   "ttft_s", "tpot_s"]


class OffloadPort(Protocol):
    """What the loop asks of a backend's expert cache (``sim.cache_controller.CacheController``'s
    per-pass protocol)."""

    def begin_step(self, info: StepInfo): ...
    def begin_layer(self, step: int, layer: int, ids: Sequence[int], counts: Sequence[int],
                    predicted: Optional[Mapping[int, Sequence[int]]] = None) -> LayerAccess: ...
    def end_layer(self) -> None: ...
    def end_step(self, step: int) -> StepCounters: ...
    def count_activation_bytes(self, nbytes: float) -> None: ...


@dataclass(slots=True)
class PassTimes:
    """A pass's time split, seconds (``sim.metrics``): what the backend measured or computed. A
    backend that measures copy stalls in its offload runtime (the real executor) leaves
    ``copy_stall_s`` at 0: the record adds the runtime's ``StepCounters.copy_stall_s``."""

    attention_s: float = 0.0
    expert_compute_s: float = 0.0
    other_compute_s: float = 0.0
    copy_stall_s: float = 0.0
    host_stall_s: float = 0.0
    host_expert_s: float = 0.0
    draft_s: float = 0.0
    reject_s: float = 0.0


@dataclass
class Idle:
    """Nothing to run: the next request arrives at ``until_s``."""

    until_s: float


@dataclass
class Step:
    """One forward pass the scheduler chose: its requests and the routing rows it replays.

    ``rows``: ``[tokens, moe_layers, top_k]`` expert ids in token order (prompts concatenated;
    a speculation round's verify positions request by request); None when the backend's model
    routes by itself (the real executor's free-running mode). ``pred_rows``: the same shape of
    gate-lookahead predictions when the policy reads them and every request has them.
    """

    index: int
    phase: str
    batch: list[RunningRequest]
    rnd: Optional[Round] = None
    rows: Optional[np.ndarray] = None
    pred_rows: Optional[np.ndarray] = None
    pass_: Any = None                                 # the scheduler's Pass (handed back to complete)
    token_count: int = 0                              # tokens of a pass without rows (set by the backend)
    active: list[int] = field(default_factory=list)   # distinct experts per MoE layer, as routed

    @property
    def composition(self) -> tuple[int, ...]:
        return tuple(r.req.request_id for r in self.batch)

    @property
    def tokens(self) -> int:
        return int(self.rows.shape[0]) if self.rows is not None else self.token_count


def layer_routing(rows: np.ndarray, num_experts: int) -> list[tuple[list[int], list[int]]]:
    """Per MoE layer of ``rows`` ``[T, M, K]``: the distinct experts (ascending) and tokens per expert."""
    T, M, K = rows.shape
    if T == 1:
        return [(sorted(ids), [1] * K) for ids in rows[0].tolist()]
    offsets = np.arange(M, dtype=np.int64)[None, :, None] * num_experts
    flat = (rows.astype(np.int64) + offsets).ravel()
    counts = np.bincount(flat, minlength=M * num_experts)
    used = np.flatnonzero(counts)   # (layer, expert) cells in order (a 1-D nonzero is the cheap one)
    lay, exp = np.divmod(used, num_experts)
    vals = counts[used].tolist()
    bounds = np.searchsorted(lay, np.arange(M + 1)).tolist()
    exp_l = exp.tolist()
    return [(exp_l[bounds[m]:bounds[m + 1]], vals[bounds[m]:bounds[m + 1]]) for m in range(M)]


def kv_cache_tokens(scenario: Scenario, requests: Sequence[Request]) -> int:
    """KV tokens the run reserves: ``sim.kv_cache_tokens``, else a full batch of the longest request."""
    if scenario.sim.kv_cache_tokens is not None:
        return scenario.sim.kv_cache_tokens
    longest = max((r.prompt_len + r.output_len for r in requests), default=0)
    return min(scenario.workload.batch_size, max(len(requests), 1)) * longest


def plan_run_memory(scenario: Scenario, requests: Sequence[Request]) -> MemoryBudget:
    """The HBM plan both backends use (``sim.memory.plan_memory``): weights that stay resident, the
    KV cache, activations, a drafter's weights and KV cache beside the target's; experts get the rest."""
    model, wl, tp = scenario.model, scenario.workload, scenario.hw.tensor_parallel
    kv_tokens = kv_cache_tokens(scenario, requests)
    act = scenario.sim.activation_bytes
    if act is None:
        act = default_activation_bytes(model, wl.max_prefill_tokens, tp)
    reserved = scenario.hw.gpu.reserved_bytes
    if scenario.speculation.name != "none":
        drafter = Drafter.build(scenario.speculation, model, scenario.draft_model, None)
        reserved += drafter.resident_bytes + kv_tokens * drafter.kv_bytes_per_token
    return plan_memory(model, scenario.hw.gpu.memory_bytes, reserved, kv_tokens, act,
                       scenario.prefetch.cache_scope, scenario.prefetch.capacity_per_layer, scenario.hw.name,
                       tensor_parallel=tp)


class ServingLoop:
    """The serving protocol of the module docstring over ``requests`` (sorted by arrival, stable).

    ``offload``: the backend's ``OffloadPort``; ``policy``: the prefetch policy (read for
    ``uses_predictions``, ``substitutes`` and its report). ``record_routing``: keep every pass's
    routing (``recorded_passes``/``recorded_compositions``, for ``record_future``); ``future``: a
    ``RecordedFuture`` whose pass is overridden with the actual routing when they differ.
    """

    def __init__(self, scenario: Scenario, requests: Sequence[Request], offload: OffloadPort,
                 policy: PrefetchPolicy, spec_policy: SpeculationPolicy, *, record_routing: bool = False,
                 future=None, progress: bool = False, progress_label: str = "moesim"):
        self.scenario = scenario
        self.model: ModelSpec = scenario.model
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.offload = offload
        self.policy = policy
        self.spec_policy = spec_policy
        self.speculating = scenario.speculation.name != "none"
        self.scheduler: Scheduler = build_scheduler(scenario, self.requests)
        spec_policy.reset(SpecContext(self.model, scenario.speculation.k, scenario.seed))
        self.sampler = AcceptanceSampler(scenario.speculation, scenario.seed) if self.speculating else None
        self.rejected = RejectedRouting(scenario.seed)
        self.record_routing = record_routing
        self.recorded_passes: list[dict[int, list[int]]] = []
        self.recorded_compositions: list[tuple[int, ...]] = []
        self.future = future
        self.step_rows: list[dict] = []
        self.request_rows: list[dict] = []
        self._just_finished: list[int] = []
        self._step_index = 0
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.requests), unit="req", desc=progress_label, file=sys.stderr, leave=False)

    # ------------------------------------------------------------------ choosing a pass
    def next_step(self, now_s: float, with_rows: bool = True):
        """The pass to run at ``now_s``, ``Idle`` until the next arrival, or None when all are served."""
        sched = self.scheduler
        if sched.done():
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            return None
        p = sched.next_pass(now_s)
        if p is None:
            return Idle(sched.next_arrival_s())
        rnd = None
        if p.phase == "decode" and self.speculating:
            rnd = plan_round(self.spec_policy, self.sampler, p.batch, self._step_index, self.scenario.speculation.k)
        step = Step(self._step_index, p.phase, p.batch, rnd, pass_=p)
        if with_rows:
            step.rows = self._rows(step)
            step.pred_rows = self._pred_rows(step)
        return step

    def _rows(self, step: Step) -> np.ndarray:
        batch, rnd = step.batch, step.rnd
        if rnd is not None:
            cfg = self.scenario.speculation
            return np.concatenate([self.rejected.rows(r.req.experts, r.pos, d, a, cfg.rejected_routing,
                                                      self.model.num_experts, r.req.request_id)
                                   for r, d, a in zip(batch, rnd.drafts, rnd.accepted)])
        if step.phase == "decode":
            return np.stack([r.req.experts[r.pos] for r in batch])
        return np.concatenate([r.req.experts[: r.req.prompt_len] for r in batch])

    def _pred_rows(self, step: Step) -> Optional[np.ndarray]:
        if not self.policy.uses_predictions or any(not r.req.has_predictions for r in step.batch):
            return None
        if step.phase == "decode":
            return np.stack([r.req.predictions()[r.pos] for r in step.batch])
        return np.concatenate([r.req.predictions()[: r.req.prompt_len] for r in step.batch])

    # ------------------------------------------------------------------ one pass
    def begin_pass(self, step: Step, routing: Optional[list[tuple[list[int], list[int]]]] = None):
        """The pass starts: record/override its routing (``routing``: ``layer_routing(step.rows)``,
        given when the backend computed it already), then the cache's ``begin_step``."""
        if self.record_routing or self.future is not None:
            if routing is None:
                routing = layer_routing(step.rows, self.model.num_experts)
            by_layer = {self.model.moe_layers[m]: ids for m, (ids, _) in enumerate(routing)}
            if self.record_routing:
                self.recorded_passes.append(by_layer)
                self.recorded_compositions.append(step.composition)
            if self.future is not None:
                self.future.override(step.index, by_layer)
        info = StepInfo(step.index, step.phase, step.composition, step.tokens, tuple(self._just_finished))
        self._just_finished.clear()
        return self.offload.begin_step(info)

    def predicted_next(self, step: Step, layer: int) -> Optional[dict[int, list[int]]]:
        """Gate-lookahead: the experts predicted for the MoE layer after ``layer``, from this pass's rows."""
        if step.pred_rows is None:
            return None
        model = self.model
        m = model.moe_layer_index[layer]
        if m + 1 >= len(model.moe_layers):
            return None
        p = np.unique(step.pred_rows[:, m, :])
        return {model.moe_layers[m + 1]: p[p >= 0].tolist()}

    def layer(self, step: Step, layer: int, ids: Sequence[int], counts: Sequence[int]) -> LayerAccess:
        """``layer``'s router chose ``ids`` with ``counts`` tokens each: a lossy policy's substitution,
        then the offload protocol. Host-run experts' outputs come back to the device (counted here)."""
        if self.policy.substitutes:
            ids, counts = self.policy.substitute(step.index, layer, ids, counts)
        step.active.append(len(ids))
        predicted = None if step.pred_rows is None else self.predicted_next(step, layer)
        acc = self.offload.begin_layer(step.index, layer, ids, counts, predicted)
        if acc.host:
            per_token = self.model.hidden_size * self.model.act_bytes_per_elem
            tokens = acc.tokens
            for e in acc.host:
                self.offload.count_activation_bytes(tokens[e] * per_token)
        return acc

    def end_layer(self) -> None:
        self.offload.end_layer()

    def end_pass(self, step: Step, start_s: float, end_s: float, times: PassTimes) -> list[RunningRequest]:
        """The pass is over: its record, the round's end for the speculation policy, completions.
        Returns the requests that finished (their records are written)."""
        c = self.offload.end_step(step.index)
        self.step_rows.append(step_row(step, start_s, end_s, times, c))
        committed = None
        if step.rnd is not None:
            committed = step.rnd.committed([r.req.request_id for r in step.batch])
            self.spec_policy.on_round_end(RoundResult(step.index, step.rnd.k, len(step.batch),
                                                      sum(committed.values()), end_s - start_s))
        finished = self.scheduler.complete(step.pass_, end_s, committed)
        for r in finished:
            self._finish(r, end_s)
        self._step_index += 1
        return finished

    def _finish(self, r: RunningRequest, now_s: float) -> None:
        self.request_rows.append(request_row(r, now_s))
        self._just_finished.append(r.req.request_id)
        if self.sampler is not None:
            self.sampler.forget(r.req.request_id)
            self.rejected.forget(r.req.request_id)
        if self._bar is not None:
            self._bar.update(1)

    # ------------------------------------------------------------------ records
    def records(self) -> tuple[Records, Records]:
        """The step and request records as columns (one schema for both engines; ``sim.records``)."""
        return Records.from_rows(self.step_rows, STEP_COLUMNS), Records.from_rows(self.request_rows, REQUEST_COLUMNS)

    def summary(self, steps: Records, reqs: Records, memory: MemoryBudget, extra: Mapping[str, Any]) -> dict[str, Any]:
        """``sim.metrics.summarize`` of the records, then the backend's ``extra`` keys, the policies'
        reports, the memory plan and the scenario's choices: the same keys from both engines."""
        from .metrics import summarize

        summary = summarize(steps, reqs)
        summary.update(extra)
        summary.update(self.policy.report())
        summary.update(self.spec_policy.report())
        if self.future is not None:
            summary["future_passes_overridden"] = self.future.overridden
        summary["expert_slots"] = memory.total_slots
        summary["expert_budget_bytes"] = memory.expert_budget_bytes
        summary.update(self.scenario.choices())
        return summary


def step_row(step: Step, start_s: float, end_s: float, t: PassTimes, c: StepCounters) -> dict:
    """One step record (``STEP_COLUMNS``)."""
    active = step.active
    return {
        "step": step.index, "phase": step.phase, "start_s": start_s, "end_s": end_s, "duration_s": end_s - start_s,
        "batch_size": len(step.batch), "tokens": step.tokens, "attention_s": t.attention_s,
        "expert_compute_s": t.expert_compute_s, "other_compute_s": t.other_compute_s,
        "copy_stall_s": t.copy_stall_s + c.copy_stall_s, "host_stall_s": t.host_stall_s, "host_expert_s": t.host_expert_s,
        "h2d_bytes": c.h2d_bytes, "demand_bytes": c.demand_bytes, "prefetch_bytes": c.prefetch_bytes,
        "hits": c.hits, "misses": c.misses, "late_prefetches": c.late_prefetches,
        "prefetches": c.prefetches, "useful_prefetches": c.useful_prefetches,
        "demand_loads": c.demand_loads, "host_runs": c.host_runs,
        "wasted_prefetch_bytes": c.wasted_prefetch_bytes,
        "active_experts_mean": sum(active) / len(active) if active else float("nan"),
        "active_experts_per_layer": active, **spec_columns(len(step.batch), step.rnd, t.draft_s, t.reject_s)}


def request_row(r: RunningRequest, now_s: float) -> dict:
    """One request record (``REQUEST_COLUMNS``): TPOT over its tokens after the first."""
    req = r.req
    tpot = (now_s - r.first_token_s) / (req.output_len - 1) if req.output_len > 1 else float("nan")
    return {"request_id": req.request_id, "arrival_s": req.arrival_s, "prompt_len": req.prompt_len,
            "output_len": req.output_len, "first_token_s": r.first_token_s, "finish_s": now_s,
            "ttft_s": r.first_token_s - req.arrival_s, "tpot_s": tpot}
