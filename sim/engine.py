"""The SimPy engine: serving on one GPU with experts offloaded to host memory.

What runs, in simulated time:

* **The GPU compute stream** (the ``serve`` process) runs one forward pass at a time. Continuous
  batching: when requests wait and fewer than ``workload.batch_size`` run, the next pass is a
  prefill of waiting requests (prefill first, as vLLM schedules, at most ``max_prefill_tokens``
  tokens; at least one request); otherwise it is a decode pass of every running request.
* **A layer** is attention, then (MoE layers) the router, then every expert the pass selected.
  After the router, the prefetch policy is told the routing and may plan prefetches; experts that
  are not resident are copied from host memory on demand (those copies are queued first, then the
  planned prefetches). Resident experts (and shared experts)
  compute first, then each missing expert as soon as its copy has landed, in the order the copies
  were issued. Time the stream waits for a copy is *copy stall*.
* **The copy engine** (``CopyEngine``) is the host->GPU direction of the host link, its own
  resource: copies run one at a time, highest priority first (demand loads before prefetches,
  non-preemptive), each taking ``latency + bytes / bandwidth``, overlapping compute.
* **Memory**: the expert cache has the slots the HBM budget allows (``sim.memory``); when a copy
  needs a slot and none is free, the policy names a victim. An expert that must run but gets no
  slot (every slot holds an expert the layer needs) is copied into a staging buffer and not cached.
* **Host execution** (a policy answering ``on_miss -> "host"``, Fiddler): the expert's input
  activations go GPU->host on the device-to-host copy engine, the host CPU (one job at a time)
  runs the expert, and the outputs come back host->GPU on the copy engine at demand priority. The
  GPU runs its other experts meanwhile and waits for host results before the combine
  (``host_stall_s``). When the host is the device (``hw.host_is_device``, ``hw=this_cpu``), a
  host-run expert is compute on the stream itself, after the layer's other experts (its output
  bytes are still counted, as the real executor counts them), booked as ``host_stall_s``: the
  stream's time on host-run experts, so the step's parts still add up to its duration (and it
  is ``host_expert_s`` too, the host CPU's time on them).
* **Copy overhead**: each expert copy the pass issues adds ``cost.copy_overhead_s`` (the
  executor's per-copy host work, measured by ``moesim-profile``; 0 for the roofline) to the
  compute stream before it waits, booked as ``other_compute_s``. The copy engine starts each copy
  ``cost.copy_launch_s`` after its turn (submitted to an idle engine / the previous copy done), and
  a stream blocked on a copy resumes ``cost.copy_resume_s`` after it lands (counted as stall): the
  real executor's thread wake-ups, measured by ``moesim-profile``; 0 for the roofline.

* **Speculative decoding** (``policy/speculation``, ``sim/speculation.py``): a decode pass becomes
  a round: the drafter's passes, one verify pass of ``k_r + 1`` positions per request (its MoE
  layers fetch each missing expert once for the whole round), rejection sampling, then the
  accepted tokens are committed and the rest rolled back. The policy picks K per round.

Events are spent only where something can wait: one timeout per MoE layer (up to its router),
plus a wait and a timeout per missing expert; everything else is summed analytically.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import simpy

from hw.cost import BatchShape, CostModel
from hw.devices import LinkSpec
from hw.system import HOST, System, gpu_node
from hw.parallel import cost_for_system
from workloads.acceptance import AcceptanceSampler
from workloads.model import ModelSpec
from workloads.requests import Request
from workloads.validation import ConfigError

from .future import RecordedFuture
from .memory import ExpertCache, MemoryBudget, default_activation_bytes, plan_memory
from .metrics import summarize
from .policies.base import (PolicyContext, Prefetch, PrefetchConfig, PrefetchPolicy, RunOnHost, StepInfo,
                            prefetch_policy_class)
from .policies.speculation import RoundResult, SpecContext, SpeculationPolicy, speculation_policy_class
from .scenario import Scenario
from .scheduler import BatchScheduler, RunningRequest
from .speculation import (Drafter, RejectedRouting, Round, decode_shape, plan_round, spec_columns, verify_shape,
                          without_speculation)

DEMAND_PRIORITY = 0
PREFETCH_PRIORITY_BASE = 1


class CopyEngine:
    """One direction of a link: copies run one at a time, lowest priority value first, FIFO within.

    ``duration_s(nbytes)`` gives a job's length (a link transfer by default; the host CPU reuses
    this queue with compute durations).
    """

    def __init__(self, env: simpy.Environment, link: Optional[LinkSpec], name: str, timeline: Optional[list],
                 duration_s: Optional[Callable[[float], float]] = None,
                 launch_s: Optional[Callable[[bool], float]] = None):
        self.env = env
        self.link = link
        self.duration_s = duration_s or link.transfer_s
        self.launch_s = launch_s   # engine_idle -> delay before a job starts (Table: copy_launch)
        self.name = name
        self._queue: list = []
        self._seq = 0
        self._wake: Optional[simpy.Event] = None
        self._timeline = timeline
        self.busy_s = 0.0
        env.process(self._run())

    def submit(self, nbytes: float, priority: int, on_done: Callable[[], None], label: str) -> simpy.Event:
        """Queue a copy of ``nbytes``; the returned event fires when it has landed."""
        done = self.env.event()
        heapq.heappush(self._queue, (priority, self._seq, nbytes, done, on_done, label))
        self._seq += 1
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        return done

    def _run(self):
        env = self.env
        while True:
            idle = not self._queue
            if idle:
                self._wake = env.event()
                yield self._wake
                self._wake = None
            if self.launch_s is not None:
                delay = self.launch_s(idle)
                if delay > 0:
                    yield env.timeout(delay)
            _, _, nbytes, done, on_done, label = heapq.heappop(self._queue)
            start = env.now
            duration = self.duration_s(nbytes)
            yield env.timeout(duration)
            self.busy_s += duration
            if self._timeline is not None:
                self._timeline.append(_span(label, "copy" if self.link else "host", start, duration, self.name))
            on_done()
            done.succeed()


def _span(name: str, cat: str, start_s: float, dur_s: float, track: str) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "ts": start_s * 1e6, "dur": dur_s * 1e6,
            "pid": 1, "tid": track}


@dataclass
class RunResult:
    """Everything a run produced: records, summary, optional timeline, memory plan."""

    steps: pd.DataFrame
    requests: pd.DataFrame
    summary: dict[str, Any]
    memory: MemoryBudget
    timeline: Optional[list] = None


class _Counter:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.demand_bytes = 0.0
        self.prefetch_bytes = 0.0
        self.activation_bytes = 0.0  # host-run experts' outputs coming back to the GPU
        self.wasted_bytes = 0.0
        self.prefetches = 0


class Engine:
    """Runs one scenario over a list of requests and returns its records."""

    def __init__(self, scenario: Scenario, requests: list[Request], cost: Optional[CostModel] = None,
                 policy: Optional[PrefetchPolicy] = None, progress: Optional[bool] = None,
                 record_routing: bool = False, speculation: Optional[SpeculationPolicy] = None):
        self.scenario = scenario
        self.model: ModelSpec = scenario.model
        self.requests = sorted(requests, key=lambda r: r.arrival_s)  # stable: ties keep the given (trace) order
        self.system = System(scenario.hw)
        tp = scenario.hw.tensor_parallel
        self.cost: CostModel = cost or cost_for_system(scenario.hw, self.model)
        self.gpu_model = self.model.tensor_shard(tp)   # one GPU's part (the model itself when tp == 1)
        self.policy = policy or prefetch_policy_class(scenario.prefetch.name)(scenario.prefetch)
        spec_cfg = scenario.speculation
        self.spec_policy: SpeculationPolicy = speculation or speculation_policy_class(spec_cfg.name)(spec_cfg)
        self._speculating = spec_cfg.name != "none"
        # The drafter runs unsharded on the model's first GPU (vLLM's speculative_draft_tensor_parallel_size=1:
        # a 0.5B draft gains nothing from TP, and its head count need not divide by it).
        draft_cost = getattr(self.cost, "inner", self.cost) if tp > 1 else self.cost
        self.drafter: Optional[Drafter] = (Drafter.build(spec_cfg, self.model, scenario.draft_model, draft_cost,
                                                         scenario.sim.pass_overhead_s)
                                           if self._speculating else None)
        wl = scenario.workload
        longest = max((r.prompt_len + r.output_len for r in self.requests), default=0)
        kv_tokens = scenario.sim.kv_cache_tokens
        if kv_tokens is None:
            kv_tokens = min(wl.batch_size, max(len(self.requests), 1)) * longest
        act = scenario.sim.activation_bytes
        if act is None:
            act = default_activation_bytes(self.model, wl.max_prefill_tokens, tp)
        gpu = scenario.hw.gpu
        reserved = gpu.reserved_bytes
        if self.drafter is not None:  # the drafter's weights and KV cache live beside the target's
            reserved += self.drafter.resident_bytes + kv_tokens * self.drafter.kv_bytes_per_token
        self.memory = plan_memory(self.model, gpu.memory_bytes, reserved, kv_tokens, act,
                                  scenario.prefetch.cache_scope, scenario.prefetch.capacity_per_layer,
                                  scenario.hw.name, tensor_parallel=tp)
        if self.drafter is not None and spec_cfg.drafter == "self":   # SpecMoE drafts through the cache
            per_layer = self.memory.slots_per_layer
            if per_layer is None:
                per_layer = self.memory.total_slots // max(1, self.model.num_moe_layers)
            self.drafter.resident_experts_per_layer = max(self.model.top_k, per_layer)
        if self.policy.uses_predictions and any(r.predicted is None for r in self.requests):
            raise ConfigError(
                f"policy/prefetch={scenario.prefetch.name} needs predicted_experts in the router trace "
                f"(record them with moesim-capture --predict lookahead); for traces without them use "
                f"policy/prefetch=transition or speculating")
        if progress is None:
            progress = scenario.sim.progress if isinstance(scenario.sim.progress, bool) else sys.stderr.isatty()
        self._progress = progress
        self._record = record_routing
        self.recorded_passes: list[dict[int, list[int]]] = []
        self.recorded_compositions: list[tuple[int, ...]] = []
        self.future: Optional[RecordedFuture] = None

    # ------------------------------------------------------------------ run
    def run(self) -> RunResult:
        wall0 = time.perf_counter()
        env = self.env = simpy.Environment()
        sc = self.scenario
        self.timeline: Optional[list] = [] if sc.sim.timeline else None
        gpu = gpu_node(sc.sim.gpu)
        (h2d_id,) = self.system.route(HOST, gpu)
        (d2h_id,) = self.system.route(gpu, HOST)
        links = self.system.links()
        h2d, d2h = links[h2d_id], links[d2h_id]
        self.copier = CopyEngine(env, h2d, f"copy {HOST}->{gpu}", self.timeline,
                                 duration_s=lambda n: self.cost.copy_s(n, h2d),
                                 launch_s=lambda idle: self.cost.copy_launch_s(h2d, idle))
        self.d2h = CopyEngine(env, d2h, f"copy {gpu}->{HOST}", self.timeline,
                              duration_s=lambda n: self.cost.copy_s(n, d2h))
        self.host = CopyEngine(env, None, "host cpu", self.timeline, duration_s=self._host_expert_s)
        self.cache = ExpertCache(self.memory, self.model.moe_layers)
        initial = self.cache.initial_fill(self.model) if sc.sim.initial_residency == "fill" else []
        self.policy.reset(PolicyContext(self.model, self.memory.cache_scope, self.memory.slots_per_layer,
                                        self.memory.total_slots, tuple(initial), sc.seed,
                                        host_crossover_tokens(self.cost, self.gpu_model, links[h2d_id])))
        if self.future is not None:
            self.policy.set_future(self.future)
        self.spec_policy.reset(SpecContext(self.model, sc.speculation.k, sc.seed))
        self._sampler = AcceptanceSampler(sc.speculation, sc.seed) if self._speculating else None
        self._rejected = RejectedRouting(sc.seed)
        self._use_predictions = self.policy.uses_predictions
        self._substitutes = self.policy.substitutes
        self._just_finished: list[int] = []
        self._copy_events: dict = {}
        self._unused_prefetch: set = set()     # landed by a prefetch, not used yet
        self._prefetch_in_flight: set = set()  # prefetch copies not landed yet
        self._bytes = _Counter()
        self._expert_copies = 0   # expert copies issued so far (demand loads, staging, prefetches)
        self._copy_overhead_s = self.cost.copy_overhead_s(self.model)
        self._copy_resume_s = self.cost.copy_resume_s(h2d)
        self._host_is_device = bool(getattr(sc.hw, "host_is_device", False))
        self._expert_s: dict[int, float] = {}
        self._step_rows: list[dict] = []
        self._request_rows: list[dict] = []
        layer_offsets = np.arange(self.model.num_moe_layers, dtype=np.int64)[None, :, None] * self.model.num_experts
        self._layer_offsets = layer_offsets
        self._dense = set(self.model.dense_layers)
        self._moe_index = self.model.moe_layer_index
        bar = None
        if self._progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.requests), unit="req", desc="moesim", file=sys.stderr, leave=False)
        self._bar = bar
        env.process(self._serve())
        env.run()
        if bar is not None:
            bar.close()
        events = _events_scheduled(env)
        steps = pd.DataFrame(self._step_rows, columns=STEP_COLUMNS)
        reqs = pd.DataFrame(self._request_rows, columns=REQUEST_COLUMNS)
        summary = summarize(steps, reqs)
        summary["sim_wall_s"] = time.perf_counter() - wall0
        summary["events"] = events
        summary["copy_engine_busy_s"] = self.copier.busy_s
        summary["host_cpu_busy_s"] = self.host.busy_s
        summary.update(self.policy.report())
        summary.update(self.spec_policy.report())
        if self.future is not None:
            summary["future_passes_overridden"] = self.future.overridden
        summary["expert_slots"] = self.memory.total_slots
        summary["expert_budget_bytes"] = self.memory.expert_budget_bytes
        summary.update(sc.choices())
        return RunResult(steps, reqs, summary, self.memory, self.timeline)

    # ------------------------------------------------------------------ serving loop
    def _serve(self):
        env = self.env
        wl = self.scenario.workload
        sched = BatchScheduler(self.requests, wl.batch_size, wl.max_prefill_tokens)
        step = 0
        while not sched.done():
            p = sched.next_pass(env.now)
            if p is None:
                yield env.timeout(sched.next_arrival_s() - env.now)
                continue
            rnd = self._plan_round(p.batch, step) if p.phase == "decode" and self._speculating else None
            t0 = env.now
            yield from self._forward(p.phase, p.batch, step, rnd)
            committed = None
            if rnd is not None:
                committed = rnd.committed([r.req.request_id for r in p.batch])
                self.spec_policy.on_round_end(RoundResult(step, rnd.k, len(p.batch), sum(committed.values()),
                                                          env.now - t0))
            for r in sched.complete(p, env.now, committed):
                self._finish(r)
            step += 1

    def _finish(self, r: RunningRequest) -> None:
        now = self.env.now
        req = r.req
        tpot = (now - r.first_token_s) / (req.output_len - 1) if req.output_len > 1 else float("nan")
        self._request_rows.append({
            "request_id": req.request_id, "arrival_s": req.arrival_s, "prompt_len": req.prompt_len,
            "output_len": req.output_len, "first_token_s": r.first_token_s, "finish_s": now,
            "ttft_s": r.first_token_s - req.arrival_s, "tpot_s": tpot})
        self._just_finished.append(req.request_id)
        if self._sampler is not None:
            self._sampler.forget(req.request_id)
            self._rejected.forget(req.request_id)
        if self._bar is not None:
            self._bar.update(1)

    # ------------------------------------------------------------------ one forward pass
    def _layer_routing(self, rows: np.ndarray) -> list[tuple[list[int], list[int]]]:
        """Per MoE layer: the distinct experts the pass selected (ascending) and tokens per expert."""
        T, M, K = rows.shape
        if T == 1:
            return [(sorted(ids), [1] * K) for ids in rows[0].tolist()]
        E = self.model.num_experts
        flat = (rows.astype(np.int64) + self._layer_offsets).ravel()
        counts = np.bincount(flat, minlength=M * E).reshape(M, E)
        lay, exp = np.nonzero(counts)
        vals = counts[lay, exp].tolist()
        bounds = np.searchsorted(lay, np.arange(M + 1)).tolist()
        exp_l = exp.tolist()
        return [(exp_l[bounds[m]:bounds[m + 1]], vals[bounds[m]:bounds[m + 1]]) for m in range(M)]

    def _expert_time(self, tokens: int) -> float:
        t = self._expert_s.get(tokens)
        if t is None:
            t = self._expert_s[tokens] = self.cost.expert_s(self.model, tokens)
        return t

    def _plan_round(self, batch: list[RunningRequest], step: int) -> Round:
        return plan_round(self.spec_policy, self._sampler, batch, step, self.scenario.speculation.k)

    def _forward(self, phase: str, batch: list[RunningRequest], step: int, rnd: Optional[Round] = None):
        env, model, cost, cache, policy = self.env, self.model, self.cost, self.cache, self.policy
        start = env.now
        draft_s = reject_s = 0.0
        lm_positions = len(batch)
        if rnd is not None:
            cfg = self.scenario.speculation
            positions = [r.pos for r in batch]
            rows = np.concatenate([self._rejected.rows(r.req.experts, r.pos, d, a, cfg.rejected_routing,
                                                       model.num_experts, r.req.request_id)
                                   for r, d, a in zip(batch, rnd.drafts, rnd.accepted)])
            shape = verify_shape(positions, rnd.drafts)
            lm_positions = shape.tokens
            draft_s = self.drafter.round_s(positions, rnd.drafts, rnd.k)
            reject_s = cost.rejection_sampling_s(model, shape.tokens) if any(rnd.drafts) else 0.0
        elif phase == "decode":
            rows = np.stack([r.req.experts[r.pos] for r in batch])
            shape = decode_shape([r.pos + 1 for r in batch])
        else:
            rows = np.concatenate([r.req.experts[: r.req.prompt_len] for r in batch])
            pairs = sum(r.req.prompt_len * (r.req.prompt_len + 1) // 2 for r in batch)
            shape = BatchShape(tokens=rows.shape[0], sequences=len(batch), attended_pairs=pairs,
                               kv_tokens=rows.shape[0])
            if self.drafter is not None:
                draft_s = self.drafter.prefill_s([r.req.prompt_len for r in batch])
        T = shape.tokens
        routing = self._layer_routing(rows)
        attn = cost.attention_block_s(model, shape)
        router = cost.router_s(model, T)
        shared = cost.shared_experts_s(model, T)
        combine = cost.combine_s(model, T)
        dense = cost.dense_ffn_s(model, T) if self._dense else 0.0
        counters = self._bytes
        counters.reset()
        composition = tuple(r.req.request_id for r in batch)
        if self._record:
            self.recorded_passes.append({model.moe_layers[m]: ids for m, (ids, _) in enumerate(routing)})
            self.recorded_compositions.append(composition)
        if self.future is not None:
            self.future.override(step, {model.moe_layers[m]: ids for m, (ids, _) in enumerate(routing)})
        pred_rows = None
        if self._use_predictions and all(r.req.predicted is not None for r in batch):
            pred_rows = (np.stack([r.req.predicted[r.pos] for r in batch]) if phase == "decode"
                         else np.concatenate([r.req.predicted[: r.req.prompt_len] for r in batch]))
        copies_before = self._expert_copies
        plan = policy.on_step_begin(StepInfo(step, phase, composition, T, tuple(self._just_finished)), cache)
        self._just_finished.clear()
        if plan:
            self._execute(plan)

        attention_s = expert_s = other_s = stall_s = host_stall_s = host_cpu_s = 0.0
        hits = misses = late = useful = demand_loads = host_runs = 0
        active: list[int] = []
        # The compute stream's share of each copy it issues (Table: the profile's copy_overhead).
        pending = (self.scenario.sim.pass_overhead_s + cost.embed_s(model, T)
                   + self._copy_overhead_s * (self._expert_copies - copies_before))
        other_s += pending
        pending += draft_s   # the drafter runs before the target's pass
        for layer in range(model.num_layers):
            if layer in self._dense:
                pending += attn + dense
                attention_s += attn
                other_s += dense
                continue
            ids, counts = routing[self._moe_index[layer]]
            if self._substitutes:
                ids, counts = policy.substitute(step, layer, ids, counts)
            active.append(len(ids))
            pending += attn + router
            attention_s += attn
            other_s += router + shared + combine
            yield env.timeout(pending)  # the router has run: routing is known from here on
            pending = 0.0
            predicted = None
            if pred_rows is not None:
                m = self._moe_index[layer]
                if m + 1 < len(model.moe_layers):
                    p = np.unique(pred_rows[:, m, :])
                    predicted = {model.moe_layers[m + 1]: p[p >= 0].tolist()}
            cache.pinned = {(layer, e) for e in ids}  # from here on, nothing this layer needs is evicted
            copies_before = self._expert_copies
            plan = policy.on_routed(step, layer, ids, predicted, cache, counts)
            ready = shared
            waits = []
            host_jobs = []
            inline_host_s = 0.0
            for e, n in zip(ids, counts):
                key = (layer, e)
                if key in cache.resident:
                    hits += 1
                    t = self._expert_time(n)
                    expert_s += t
                    ready += t
                    if key in self._unused_prefetch:
                        self._unused_prefetch.discard(key)
                        useful += 1
                    continue
                misses += 1
                ev = self._copy_events.get(key)
                if ev is not None:
                    late += 1
                    if key in self._unused_prefetch or key in self._prefetch_in_flight:
                        self._prefetch_in_flight.discard(key)
                        useful += 1
                elif policy.on_miss(layer, e, n, cache) == "host":
                    host_runs += 1
                    t = self._host_expert_s(n)
                    host_cpu_s += t
                    if self._host_is_device:  # the same core: after the layer's other experts
                        self._bytes.activation_bytes += n * model.hidden_size * model.act_bytes_per_elem
                        inline_host_s += t
                    else:
                        host_jobs.append(env.process(self._run_on_host(key, n)))
                    continue
                else:
                    demand_loads += 1
                    ev = self._demand_load(key)
                t = self._expert_time(n)
                expert_s += t
                waits.append((ev, t))
            if plan:  # prefetches queue behind this layer's demand loads, issued just above
                self._execute(plan)
            if self._expert_copies != copies_before:
                issue_s = self._copy_overhead_s * (self._expert_copies - copies_before)
                ready += issue_s
                other_s += issue_s
            acc = ready  # resident (and shared) experts run first, then each missing one once it landed
            for ev, t in waits:
                if acc > 0:
                    yield env.timeout(acc)
                    acc = 0.0
                if not ev.triggered:
                    t0 = env.now
                    yield ev
                    if self._copy_resume_s > 0:   # the stream notices the copy landed this much later
                        yield env.timeout(self._copy_resume_s)
                    stall_s += env.now - t0
                acc += t
            if host_jobs:  # the combine needs the host-run experts' outputs back
                if acc > 0:
                    yield env.timeout(acc)
                    acc = 0.0
                for job in host_jobs:
                    if not job.triggered:
                        t0 = env.now
                        yield job
                        host_stall_s += env.now - t0
            host_stall_s += inline_host_s   # host is the device: the stream ran them itself
            pending = acc + inline_host_s + combine
            cache.pinned = set()
        lm = cost.lm_head_s(model, lm_positions)
        other_s += lm
        pending += lm + reject_s
        yield env.timeout(pending)
        policy.on_step_end(step, cache)
        end = env.now
        if self.timeline is not None:
            self.timeline.append(_span(f"{phase} step {step} (B={len(batch)})", "compute", start, end - start,
                                       "gpu compute"))
        self._step_rows.append({
            "step": step, "phase": phase, "start_s": start, "end_s": end, "duration_s": end - start,
            "batch_size": len(batch), "tokens": T, "attention_s": attention_s,
            "expert_compute_s": expert_s, "other_compute_s": other_s, "copy_stall_s": stall_s,
            "host_stall_s": host_stall_s, "host_expert_s": host_cpu_s,
            "h2d_bytes": counters.demand_bytes + counters.prefetch_bytes + counters.activation_bytes,
            "demand_bytes": counters.demand_bytes, "prefetch_bytes": counters.prefetch_bytes,
            "hits": hits, "misses": misses, "late_prefetches": late,
            "prefetches": counters.prefetches, "useful_prefetches": useful,
            "demand_loads": demand_loads, "host_runs": host_runs,
            "wasted_prefetch_bytes": counters.wasted_bytes,
            "active_experts_mean": sum(active) / len(active) if active else float("nan"),
            "active_experts_per_layer": active, **spec_columns(len(batch), rnd, draft_s, reject_s)})

    # ------------------------------------------------------------------ copies and slots
    def _make_room(self, key) -> bool:
        """Reserve a slot for ``key``, evicting the policy's victim if needed; False if none."""
        cache = self.cache
        if cache.free_slots(key[0]) <= 0:
            victim = self.policy.victim(key[0], key[1], cache)
            if victim is None:
                return False
            cache.evict(victim)
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self._bytes.wasted_bytes += self.memory.expert_slot_bytes
        cache.reserve(key)
        return True

    def _landed(self, key, prefetched: bool) -> Callable[[], None]:
        def done() -> None:
            self._copy_events.pop(key, None)
            self.cache.land(key)
            if prefetched and key in self._prefetch_in_flight:
                self._prefetch_in_flight.discard(key)
                self._unused_prefetch.add(key)
            self.policy.on_copy_done(key[0], key[1], self.cache)
        return done

    def _demand_load(self, key) -> simpy.Event:
        nbytes = self.memory.expert_slot_bytes
        self._bytes.demand_bytes += nbytes
        self._expert_copies += 1
        label = f"L{key[0]} E{key[1]} demand"
        if self._make_room(key):
            ev = self.copier.submit(nbytes, DEMAND_PRIORITY, self._landed(key, False), label)
            self._copy_events[key] = ev
            return ev
        return self.copier.submit(nbytes, DEMAND_PRIORITY, _nothing, label + " (staging)")

    def _execute(self, plan) -> None:
        for action in plan:
            if isinstance(action, Prefetch):
                key = (action.layer, action.expert)
                if key in self.cache.resident or key in self.cache.in_flight:
                    continue
                if not self._make_room(key):
                    continue
                self._bytes.prefetch_bytes += self.memory.expert_slot_bytes
                self._bytes.prefetches += 1
                self._expert_copies += 1
                self._prefetch_in_flight.add(key)
                ev = self.copier.submit(self.memory.expert_slot_bytes, PREFETCH_PRIORITY_BASE + action.priority,
                                        self._landed(key, True), f"L{key[0]} E{key[1]} prefetch")
                self._copy_events[key] = ev
            elif isinstance(action, RunOnHost):
                raise ValueError("RunOnHost is answered through on_miss(...) -> 'host', not planned ahead")
            else:
                raise TypeError(f"unknown plan action {action!r}")

    def _host_expert_s(self, tokens: float) -> float:
        return self.cost.host_expert_s(self.model, int(tokens))

    def _run_on_host(self, key, tokens: int):
        """Fiddler: activations to the host, the expert on the CPU, outputs back to the GPU."""
        nbytes = tokens * self.model.hidden_size * self.model.act_bytes_per_elem
        self._bytes.activation_bytes += nbytes
        yield self.d2h.submit(nbytes, DEMAND_PRIORITY, _nothing, f"L{key[0]} E{key[1]} acts out")
        yield self.host.submit(tokens, DEMAND_PRIORITY, _nothing, f"L{key[0]} E{key[1]} on host")
        yield self.copier.submit(nbytes, DEMAND_PRIORITY, _nothing, f"L{key[0]} E{key[1]} acts back")


def _nothing() -> None:
    pass


def host_crossover_tokens(cost: CostModel, model: ModelSpec, h2d: LinkSpec, limit: int = 1 << 16) -> Optional[int]:
    """Smallest token count at which running an expert on the host is no faster than copying it
    in and running it on the GPU (Fiddler's profiled crossover); None if the host always wins."""
    copy_s = cost.copy_s(model.expert_bytes, h2d)

    def host_wins(n: int) -> bool:
        return cost.host_expert_s(model, n) < copy_s + cost.expert_s(model, n)

    if not host_wins(1):
        return 1
    hi = 2
    while hi <= limit and host_wins(hi):
        hi *= 2
    if hi > limit:
        return None
    lo = hi // 2  # host wins at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if host_wins(mid) else (lo, mid)
    return hi


def _events_scheduled(env: simpy.Environment) -> int:
    """SimPy events scheduled during the run (all are processed when ``env.run()`` returns)."""
    counter = getattr(env, "_eid", None)
    return int(next(counter)) if counter is not None else -1


STEP_COLUMNS = ["step", "phase", "start_s", "end_s", "duration_s", "batch_size", "tokens", "attention_s",
                "expert_compute_s", "other_compute_s", "copy_stall_s", "host_stall_s", "host_expert_s",
                "h2d_bytes", "demand_bytes", "prefetch_bytes", "hits", "misses", "late_prefetches",
                "prefetches", "useful_prefetches", "demand_loads", "host_runs", "wasted_prefetch_bytes",
                "active_experts_mean", "active_experts_per_layer", "spec_k", "drafting_requests", "draft_tokens",
                "accepted_tokens", "committed_tokens", "draft_s", "reject_s"]
REQUEST_COLUMNS = ["request_id", "arrival_s", "prompt_len", "output_len", "first_token_s", "finish_s",
                   "ttft_s", "tpot_s"]


def record_future(scenario: Scenario, requests: list[Request], cost: Optional[CostModel] = None) -> RecordedFuture:
    """Run the scenario once with on-demand LRU and record every pass's routing (for oracles)."""
    probe = Engine(scenario, requests, cost=cost, policy=prefetch_policy_class("lru")(
        PrefetchConfig(name="lru", capacity_per_layer=scenario.prefetch.capacity_per_layer,
                       cache_scope=scenario.prefetch.cache_scope)), progress=False, record_routing=True)
    probe.run()
    return RecordedFuture(probe.recorded_passes, probe.recorded_compositions)


def simulate(scenario: Scenario, requests: Optional[list[Request]] = None, **kwargs) -> RunResult:
    """Build the requests (unless given) and run the scenario.

    A policy with ``needs_future`` gets the routing of every pass from a first, on-demand LRU run
    of the same scenario (``record_future``).
    """
    if requests is None:
        from workloads.requests import build_requests

        requests = build_requests(scenario.workload, scenario.model, scenario.seed)
        batch = scenario.workload.batch_size
        if len(requests) < batch:
            logging.getLogger("moesim").warning(
                "workload.batch_size=%d can never fill: the workload has %d requests, so no pass decodes more "
                "than %d at once (raise workload.num_requests)", batch, len(requests), len(requests))
    engine = Engine(scenario, requests, **kwargs)
    if engine.policy.needs_future:
        engine.future = record_future(scenario, requests, kwargs.get("cost"))
    result = engine.run()
    if scenario.speculation.name != "none":
        base_sc = dataclasses.replace(scenario, speculation=without_speculation(scenario.speculation), draft_model=None)
        base_kwargs = {k: v for k, v in kwargs.items() if k not in ("policy", "speculation")}
        base_kwargs["progress"] = False
        baseline = simulate(base_sc, requests, **base_kwargs)
        result.summary.update(speculation_gains(result.summary, baseline.summary))
    return result


def speculation_gains(spec: dict, baseline: dict) -> dict:
    """What speculation bought against the same scenario without it (``baseline``).

    speedup: baseline TPOT / TPOT. target_efficiency (MoESD's TE = T_T(B,1) / T_T(B,K)): the
    baseline's mean decode pass / the mean verify pass, both at the full batch (``sim.metrics``:
    the run's largest batch; TE is defined at one batch size, and averaging in the tail rounds
    where a few stragglers run gave TE above 1 at batch 32). spec_utility (Cascade's U = ETR /
    (t_iter(K) / t_iter(0))): committed tokens per request per decode pass / (mean decode pass /
    the baseline's mean decode pass). Batch composition can differ between the two runs near the
    end (speculation finishes requests sooner); the means are over each run's own decode passes.
    """
    def ratio(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    etr, step, base_step = spec.get("committed_tokens_per_round"), spec.get("decode_step_s"), baseline.get("decode_step_s")
    rel = ratio(step, base_step)
    return {"speedup": ratio(baseline.get("tpot_s"), spec.get("tpot_s")),
            "target_efficiency": ratio(baseline.get("decode_step_full_batch_s"), spec.get("verify_step_full_batch_s")),
            "spec_utility": ratio(etr, rel) if etr is not None else None,
            "baseline_tpot_s": baseline.get("tpot_s"), "baseline_decode_step_s": base_step,
            "baseline_decode_step_full_batch_s": baseline.get("decode_step_full_batch_s"),
            "baseline_throughput_tok_s": baseline.get("throughput_tok_s")}
