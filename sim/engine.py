"""The SimPy backend of the serving loop: one GPU with experts offloaded to host memory.

The loop (``sim.loop.ServingLoop``) decides each pass and counts; the offload protocol is
``sim.cache_controller.CacheController``. This module only turns their work into simulated time:

* **The GPU compute stream** (the ``serve`` process) runs one forward pass at a time, as the
  loop's scheduler (``sim.schedulers``) chose it.
* **A layer** is attention, then (MoE layers) the router, then every expert the pass selected.
  After the router the loop runs the offload protocol (``CacheController.begin_layer``: the
  policy's plan, demand loads, then prefetches). Resident experts (and shared experts) compute
  first, then each missing expert as soon as its copy has landed, in the order the copies were
  issued. Time the stream waits for a copy is *copy stall*.
* **The copy engine** (``PriorityServer``) is the host->GPU direction of the host link, its own
  resource: copies run one at a time, highest priority first (demand loads before prefetches,
  non-preemptive), each taking ``cost.copy_s`` (latency + bytes / bandwidth), overlapping compute.
  ``SimCopies`` carries the controller's copy orders onto it and tells the controller when each lands.
* **Memory**: the expert cache has the slots the HBM budget allows (``sim.loop.plan_run_memory``);
  an expert that must run but gets no slot is copied into a staging buffer and not cached. There
  are ``STAGING_EXPERTS`` (2) of them, as in the executor: a buffer is held from its copy's
  submission until its expert's compute is done, and a staging copy that finds both held waits,
  outside the copy queue, until one is released (``SimCopies``).
* **Host execution** (a policy answering ``on_miss -> "host"``, Fiddler): the expert's input
  activations go GPU->host on the device-to-host copy engine, the host CPU (one job at a time)
  runs the expert, and the outputs come back host->GPU on the copy engine at demand priority. The
  GPU runs its other experts meanwhile and waits for host results before the combine
  (``host_stall_s``). When the host is the device (``hw.host_is_device``, ``hw=this_cpu``), a
  host-run expert is compute on the stream itself, after the layer's other experts, booked as
  ``host_stall_s`` (and ``host_expert_s``, the host CPU's time on them), so the step's parts still
  add up to its duration.
* **Policy decisions**: after each MoE layer's router the stream spends
  ``overheads.policy_overhead_s`` on the prefetch policy's decisions beyond what LRU's cost (0 for
  the roofline and for LRU; measured for the policies ``moesim-validate --recalibrate`` validates),
  booked as ``other_compute_s``; the layer's copies are ordered after it.
* **Copy overhead**: each expert copy costs the compute stream ``overheads.copy_overhead_s``
  (``hw.overheads``: what a copy costs the executor's compute thread besides waiting for it, measured
  by ``moesim-profile``; 0 for the roofline), booked as ``other_compute_s`` and paid once the copy
  has landed, at the stream's next point: right after a wait for a copy, at each MoE layer's
  start, before the LM head (in the executor that cost falls after the copy: landing it, and the
  ops that run on caches its bytes went through; 2026-12-04 timelines, README "Validation"). The
  copy engine starts each copy ``overheads.copy_launch_s`` after its turn, and a stream blocked
  on a copy resumes ``overheads.copy_resume_s`` after it lands (counted as stall); 0 for the
  roofline. The part of
  an expert that runs while the copy engine has copies running or queued takes
  ``overheads.copy_contention`` times longer (the executor's copy thread slowing its compute
  thread, measured by ``moesim-profile``; 1 for the roofline), booked as expert compute.
* **Speculative decoding** (``policy/speculation``, ``sim/speculation.py``): a decode pass becomes
  a round: the drafter's passes, one verify pass of ``k_r + 1`` positions per request (its MoE
  layers fetch each missing expert once for the whole round), rejection sampling; the loop commits.

Events are spent only where something can happen: one per copy or host job (its end, fixed as
soon as nothing can overtake it, ``PriorityServer``; a staging copy waiting for a buffer is fixed
when the stream knows when that buffer comes free, unless something else may reach the copy
engine first: ``SimCopies.release_at``); a timeout up to a MoE layer's router, and to a pass's
end, only when some other event is due before it (otherwise the clock just moves on by the same
sum SimPy would form, ``Engine._forward``); a timeout before a copy wait only when the copy lands
before the ready compute is done; and no resume of the stream for a copy whose landing is the
next event due (``_process_next`` processes it in place). Everything else is summed analytically.
Mixtral-8x7B at batch 1 with LRU spends ~12.5 events per decode step (82 before these rules),
with the same schedule: clock values are the sums the one-event-per-wait engine formed, except
that ready compute ahead of an already landed copy is now summed before its timeout (last-bit
differences in a few stall sums).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import simpy

from hw.cost import BatchShape, CostModel
from hw.devices import LinkSpec
from hw.overheads import NO_OVERHEADS, ExecutorOverheads, overheads_of
from hw.parallel import cost_for_system
from hw.system import HOST, System, gpu_node
from workloads.model import ModelSpec
from workloads.requests import Request
from workloads.validation import ConfigError

from .cache_controller import CacheController, CopyOrder, LayerAccess
from .future import RecordedFuture
from .loop import REQUEST_COLUMNS, STEP_COLUMNS, Idle, PassTimes, ServingLoop, Step, layer_routing, plan_run_memory
from .memory import STAGING_EXPERTS, ExpertCache, MemoryBudget
from .records import Records
from .policies.base import PrefetchConfig, PrefetchPolicy, prefetch_policy_class
from .policies.speculation import SpeculationPolicy, speculation_policy_class
from .scenario import Scenario
from .speculation import Drafter, decode_shape, verify_shape, without_speculation

__all__ = ["Engine", "RunResult", "PriorityServer", "STEP_COLUMNS", "REQUEST_COLUMNS", "simulate",
           "record_future", "host_crossover_tokens", "speculation_gains"]


class _Job(simpy.Event):
    """One job of a ``PriorityServer``, and the event that fires when it is done: scheduled (at
    ``end_s``) once its start is fixed, so a wait on a queued job costs no event of its own."""

    def __init__(self, env: simpy.Environment, nbytes: float, priority: int, seq: int, tag: Any):
        super().__init__(env)
        self.nbytes, self.priority, self.seq, self.tag = nbytes, priority, seq, tag
        self.end_s: Optional[float] = None      # set when the job's start is fixed
        self.duration_s = 0.0                   # likewise

    def __lt__(self, other: "_Job") -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class PriorityServer:
    """A SimPy server of jobs, one at a time, lowest priority value first, FIFO within a priority,
    non-preemptive.

    One direction of a link's copy engine (``duration_s(nbytes)``: a transfer) or the host CPU
    (``duration_s(tokens)``: an expert run); ``duration_s`` must be a pure function of the size, as
    it is asked once per distinct size. ``on_done(tag)`` runs when a job is done, before
    anything waiting on it resumes. ``launch_s(engine_idle)``: delay before a job starts
    (``Table``: the executor's copy-thread wake-up; ``engine_idle``: nothing was queued when the job
    came up).

    Events: ONE per job, the job itself, at its end. A job's start is fixed, and its end event
    scheduled, as soon as nothing can overtake it: at once for a job that finds the server idle or
    one of the top priority (0: it starts behind the running job and the top-priority jobs fixed
    before it), and when the server comes to it for the others (a later demand copy may still
    overtake a queued prefetch). Times are the sums the equivalent one-process server would form (end = start +
    duration, start = previous end + launch), so schedules are the same to the last bit.
    """

    def __init__(self, env: simpy.Environment, link: Optional[LinkSpec], name: str, timeline: Optional[list],
                 duration_s: Optional[Callable[[float], float]] = None,
                 launch_s: Optional[Callable[[bool], float]] = None,
                 on_done: Optional[Callable[[Any], None]] = None, label: Callable[[Any], str] = str):
        self.env = env
        self.on_done = on_done     # called with a job's tag when it is done
        self.label = label         # a job's name in the timeline, from its tag
        self.link = link
        self.duration_s = duration_s or link.transfer_s
        self.launch_s = launch_s
        self.name = name
        self._queue: list[_Job] = []       # jobs whose start is not fixed yet (a heap)
        self._fixed = 0                    # jobs with a fixed start that have not ended
        self._tail_s = 0.0                 # end of the last job with a fixed start
        self._seq = 0
        self._durations: dict[float, float] = {}
        self._timeline = timeline
        self.busy_s = 0.0

    def submit(self, nbytes: float, priority: int, tag: Any = None) -> _Job:
        """Queue a job of ``nbytes`` (tokens for the host CPU); the returned job is an event that
        fires when it is done, after ``on_done(tag)``. ``tag`` also names it in the timeline."""
        job = self.job(nbytes, priority, tag)
        self.submit_job(job)
        return job

    def job(self, nbytes: float, priority: int, tag: Any = None) -> _Job:
        """A job not queued yet (``submit_job`` queues it); one may wait on it already."""
        if priority < 0:
            raise ValueError(f"job priority {priority} is invalid; 0 (the top) or more")
        return _Job(self.env, nbytes, priority, 0, tag)

    def submit_job(self, job: _Job) -> None:
        """Queue ``job`` (from ``job``) now: FIFO order within its priority counts from here."""
        job.seq = self._seq
        self._seq += 1
        priority = job.priority
        if self._fixed == 0:          # idle: it starts now
            self._fix(job, self.env._now, True)
        elif priority == 0:           # behind the fixed jobs, before every queued one; nothing overtakes it
            self._fix(job, self._tail_s, False)
        else:
            heapq.heappush(self._queue, job)

    def fix_as_of(self, job: _Job, submit_s: float) -> bool:
        """Fix the start of a top-priority ``job`` now, as ``submit_job`` would at ``submit_s`` (>= now),
        for a caller that knows nothing else reaches this server before then. Done only when
        nothing is queued and ``submit_s`` is not the end of the last fixed job (a tie, whose
        order the events would decide); returns whether it was done."""
        if job.priority != 0 or self._queue or (self._fixed and self._tail_s == submit_s):
            return False
        job.seq = self._seq
        self._seq += 1
        if self._fixed == 0 or self._tail_s < submit_s:   # idle by then: it starts at submit_s
            self._fix(job, submit_s, True)
        else:                                             # behind the fixed jobs
            self._fix(job, self._tail_s, False)
        return True

    def busy_until_s(self) -> float:
        """When the jobs running and queued now will all be done (now if idle; queued jobs run back
        to back after the fixed ones, each after its launch delay)."""
        if self._fixed == 0:
            return self.env._now
        end_s = self._tail_s
        for job in self._queue:
            duration = self._durations.get(job.nbytes)
            end_s += (self.launch_s(False) if self.launch_s is not None else 0.0) + \
                (duration if duration is not None else self.duration_s(job.nbytes))
        return end_s

    def _fix(self, job: _Job, after_s: float, idle: bool) -> None:
        start_s = after_s
        if self.launch_s is not None:
            delay = self.launch_s(idle)
            if delay > 0:
                start_s = start_s + delay
        duration = self._durations.get(job.nbytes)
        if duration is None:   # a pure function of the job's size: asked once per size
            duration = self._durations[job.nbytes] = self.duration_s(job.nbytes)
        job.duration_s = duration
        job.end_s = end_s = start_s + duration
        self._tail_s = end_s
        self._fixed += 1
        job.callbacks.insert(0, self._complete)   # before anything waiting on it
        job._ok, job._value = True, None
        _schedule_at(self.env, job, end_s)

    def _complete(self, job: _Job) -> None:
        self._fixed -= 1
        duration = job.duration_s
        self.busy_s += duration
        if self._timeline is not None:
            self._timeline.append(_span(self.label(job.tag), "copy" if self.link else "host", job.end_s - duration,
                                        duration, self.name))
        if self.on_done is not None:
            self.on_done(job.tag)
        if self._fixed == 0 and self._queue:   # the server comes to the best queued job now
            self._fix(heapq.heappop(self._queue), self.env.now, False)


_INFINITY = float("inf")


def _schedule_at(env: simpy.Environment, event: simpy.Event, time_s: float) -> None:
    """Schedule a triggered ``event`` at absolute time ``time_s`` (``env.schedule`` takes a delay,
    and now + (time - now) need not round back to time). This and ``Engine._forward``'s clock advance
    use SimPy 4's ``Environment`` internals (``_now``, ``_queue``, ``_eid``); pyproject caps simpy below 5."""
    heapq.heappush(env._queue, (time_s, simpy.core.NORMAL, next(env._eid), event))


def _process_next(env: simpy.Environment) -> None:
    """Process the event at the top of SimPy's queue from inside the running process, as
    ``Environment.step`` would: the clock moves to it and its callbacks run. For a copy job the
    stream would otherwise yield on: when it is the next event due and nobody else waits on it,
    yielding would process exactly this and resume the stream first thing (its callback comes
    after the copy engine's), so the schedule is the same and no resume is spent."""
    env._now, _, _, event = heapq.heappop(env._queue)
    callbacks, event.callbacks = event.callbacks, None
    for callback in callbacks:
        callback(event)


def _span(name: str, cat: str, start_s: float, dur_s: float, track: str) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "ts": start_s * 1e6, "dur": dur_s * 1e6,
            "pid": 1, "tid": track}


class SimCopies:
    """The SimPy backend's ``CopySink``: copy orders become jobs on the host->GPU copy engine
    (tagged with the order); a copy into a slot tells the controller when it lands (staging
    copies land nowhere).

    Staging buffers (``STAGING_EXPERTS``, as the executor's ``OffloadRuntime``): a staging copy
    holds one from its submission until the compute of its expert is done (``release_at``); a
    staging copy ordered while all are held waits, outside the copy queue, and is submitted at
    demand priority when one is released (FIFO), as the executor does."""

    def __init__(self, h2d: PriorityServer, staging_buffers: int = STAGING_EXPERTS):
        self.h2d = h2d
        h2d.on_done, h2d.label = self._landed, _job_label
        self.controller: Optional[CacheController] = None
        self._jobs: dict = {}   # copies into slots, until landed; staging copies of the open layer
        self._staging_free = staging_buffers
        self._free_at: list[float] = []     # heap: when held buffers nobody waits for come free
        self._staging_backlog: collections.deque = collections.deque()   # staging jobs not queued yet
        self._claims = 0                    # release events scheduled for backlog entries, not fired yet
        self.landed = 0                     # expert copies landed so far (staging ones too)

    def copy(self, order: CopyOrder) -> None:
        if order.kind == "staging":
            now = self.h2d.env.now
            while self._free_at and self._free_at[0] <= now:   # buffers released by now
                heapq.heappop(self._free_at)
                self._staging_free += 1
            if not self._staging_free:
                # its job, queued when a buffer is free (its end is not fixed till then: the
                # engine waits on the event)
                self._jobs[order.key] = job = self.h2d.job(order.nbytes, order.priority, order)
                self._staging_backlog.append(job)
                if self._free_at:   # a buffer whose release time is known already: it goes to this one
                    self._schedule_release(heapq.heappop(self._free_at))
                return
            self._staging_free -= 1
        self._jobs[order.key] = self.h2d.submit(order.nbytes, order.priority, order)

    def release_at(self, time_s: float, alone: bool = False) -> None:
        """A staged expert's compute ends at ``time_s``: its staging buffer is free from then on. Only
        a buffer a waiting copy will take costs an event (the copy is submitted then); otherwise the
        time is kept and the buffer counted free when the next staging copy is ordered.

        ``alone``: the caller (the compute stream) vouches that nothing but itself submits to the
        copy engine or reads its queue before ``time_s``. Then the waiting copy, if the engine has
        nothing queued and no earlier release is pending, is fixed now as it would be at
        ``time_s`` (``PriorityServer.fix_as_of``), and no release event is spent."""
        if len(self._staging_backlog) <= self._claims:
            heapq.heappush(self._free_at, time_s)
        elif alone and not self._claims and self.h2d.fix_as_of(self._staging_backlog[0], time_s):
            self._staging_backlog.popleft()
        else:
            self._schedule_release(time_s)

    def _schedule_release(self, time_s: float) -> None:
        self._claims += 1
        ev = simpy.Event(self.h2d.env)
        ev._ok, ev._value = True, None
        ev.callbacks.append(self._release)
        _schedule_at(self.h2d.env, ev, time_s)

    def _release(self, _event) -> None:
        self._claims -= 1
        self.h2d.submit_job(self._staging_backlog.popleft())   # the freed buffer passes straight to it

    def _landed(self, tag) -> None:
        if isinstance(tag, CopyOrder):
            self.landed += 1
            if tag.kind != "staging":
                self._jobs.pop(tag.key, None)
                self.controller.landed(tag.key, tag.kind)

    def job(self, key) -> simpy.Event:
        """``key``'s copy job (ordered in this layer or in flight since earlier; a staging copy still
        waiting for a buffer: the event of its end)."""
        return self._jobs[key]


def _job_label(tag) -> str:
    """A copy engine job's name in the timeline."""
    if isinstance(tag, CopyOrder):
        name = f"L{tag.key[0]} E{tag.key[1]} {'prefetch' if tag.kind == 'prefetch' else 'demand'}"
        return name + " (staging)" if tag.kind == "staging" else name
    return str(tag)


@dataclass
class RunResult:
    """Everything a run produced: records, summary, optional timeline, memory plan.

    ``step_records`` / ``request_records``: the records as columns (``sim.records.Records``,
    ``sim.loop.STEP_COLUMNS`` / ``REQUEST_COLUMNS``); ``steps`` / ``requests``: the same as pandas
    DataFrames, built on first use (a run that only writes its files never imports pandas).
    """

    step_records: Records
    request_records: Records
    summary: dict[str, Any]
    memory: MemoryBudget
    timeline: Optional[list] = None

    @property
    def steps(self):
        """The step records as a pandas DataFrame (one row per pass)."""
        return self.step_records.frame()

    @property
    def requests(self):
        """The request records as a pandas DataFrame (one row per request)."""
        return self.request_records.frame()


@dataclass
class _PassCosts:
    """Cost-model durations of one pass's ops (seconds); the same for every layer of the pass."""

    lm_positions: int
    draft_s: float
    reject_s: float
    attention_s: float
    router_s: float
    shared_s: float
    combine_s: float
    dense_s: float


class Engine:
    """The SimPy backend: runs one scenario's ``ServingLoop`` in simulated time and returns its records."""

    def __init__(self, scenario: Scenario, requests: list[Request], cost: Optional[CostModel] = None,
                 policy: Optional[PrefetchPolicy] = None, progress: Optional[bool] = None,
                 record_routing: bool = False, speculation: Optional[SpeculationPolicy] = None):
        self.scenario = scenario
        self.model: ModelSpec = scenario.model
        self.requests = sorted(requests, key=lambda r: r.arrival_s)  # stable: ties keep the given (trace) order
        self.system = System(scenario.hw)
        tp = scenario.hw.tensor_parallel
        self.cost: CostModel = cost or cost_for_system(scenario.hw, self.model)
        self.overheads: ExecutorOverheads = overheads_of(self.cost)   # the executor's, measured (Table) or none
        self.gpu_model = self.model.tensor_shard(tp)   # one GPU's part (the model itself when tp == 1)
        self.policy = policy or prefetch_policy_class(scenario.prefetch.name)(scenario.prefetch)
        spec_cfg = scenario.speculation
        self.spec_policy: SpeculationPolicy = speculation or speculation_policy_class(spec_cfg.name)(spec_cfg)
        # The drafter runs unsharded on the model's first GPU (vLLM's speculative_draft_tensor_parallel_size=1:
        # a 0.5B draft gains nothing from TP, and its head count need not divide by it).
        draft_cost = getattr(self.cost, "inner", self.cost) if tp > 1 else self.cost
        self.drafter: Optional[Drafter] = (Drafter.build(spec_cfg, self.model, scenario.draft_model, draft_cost,
                                                         scenario.sim.pass_overhead_s)
                                           if spec_cfg.name != "none" else None)
        self.memory = plan_run_memory(scenario, self.requests)
        if self.drafter is not None and spec_cfg.drafter == "self":   # SpecMoE drafts through the cache
            per_layer = self.memory.slots_per_layer
            if per_layer is None:
                per_layer = self.memory.total_slots // max(1, self.model.num_moe_layers)
            self.drafter.resident_experts_per_layer = max(self.model.top_k, per_layer)
        if self.policy.uses_predictions and any(not r.has_predictions for r in self.requests):
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
        h2d, d2h = self._build_servers(env)
        cache = ExpertCache(self.memory, self.model.moe_layers)
        initial = cache.initial_fill(self.model) if sc.sim.initial_residency == "fill" else []
        self.copies = SimCopies(self.copier)
        self.controller = ctl = CacheController(cache, self.policy, self.memory.expert_slot_bytes, self.copies)
        self.copies.controller = ctl
        ctl.start(self.model, initial, sc.seed, host_crossover_tokens(self.cost, self.gpu_model, h2d), self.future)
        loop = ServingLoop(sc, self.requests, ctl, self.policy, self.spec_policy, record_routing=self._record,
                           future=self.future, progress=self._progress)
        self._copy_overhead_s = self.overheads.copy_overhead_s(self.model)
        self._policy_s = self.overheads.policy_overhead_s(self.model, self.policy.name)   # per MoE layer
        self._copies_paid = 0   # landed copies whose copy_overhead_s the stream has paid
        self._copy_resume_s = self.overheads.copy_resume_s(h2d)
        self._host_is_device = bool(getattr(sc.hw, "host_is_device", False))
        self._expert_s: dict[int, float] = {}     # tokens -> one expert's compute time
        self._contention: dict[int, float] = {}   # tokens -> overheads.copy_contention
        self._contends = self.overheads is not NO_OVERHEADS   # a measured table may slow experts beside copies
        self._h2d = h2d
        self._ops_s: dict[int, tuple] = {}        # tokens -> (router, shared experts, combine, dense FFN) times
        env.process(self._serve(loop))
        env.run()
        self.recorded_passes, self.recorded_compositions = loop.recorded_passes, loop.recorded_compositions
        steps, reqs = loop.records()
        extra = {"sim_wall_s": 0.0, "events": _events_scheduled(env), "copy_engine_busy_s": self.copier.busy_s,
                 "host_cpu_busy_s": self.host.busy_s}
        summary = loop.summary(steps, reqs, self.memory, extra)
        summary["sim_wall_s"] = time.perf_counter() - wall0
        return RunResult(steps, reqs, summary, self.memory, self.timeline)

    def _build_servers(self, env: simpy.Environment) -> tuple[LinkSpec, LinkSpec]:
        """The GPU's host link, one server per direction, and the host CPU; returns the two links."""
        gpu = gpu_node(self.scenario.sim.gpu)
        links = self.system.links()
        (h2d_id,) = self.system.route(HOST, gpu)
        (d2h_id,) = self.system.route(gpu, HOST)
        h2d, d2h = links[h2d_id], links[d2h_id]
        launch = None if self.overheads is NO_OVERHEADS else lambda idle: self.overheads.copy_launch_s(h2d, idle)
        self.copier = PriorityServer(env, h2d, f"copy {HOST}->{gpu}", self.timeline,
                                     duration_s=lambda n: self.cost.copy_s(n, h2d), launch_s=launch)
        self.d2h = PriorityServer(env, d2h, f"copy {gpu}->{HOST}", self.timeline,
                                  duration_s=lambda n: self.cost.copy_s(n, d2h))
        self.host = PriorityServer(env, None, "host cpu", self.timeline, duration_s=self._host_expert_s)
        return h2d, d2h

    # ------------------------------------------------------------------ serving
    def _serve(self, loop: ServingLoop):
        env = self.env
        while True:
            s = loop.next_step(env.now)
            if s is None:
                return
            if isinstance(s, Idle):
                yield env.timeout(s.until_s - env.now)
                continue
            start = env.now
            times = yield from self._forward(loop, s)
            if self.timeline is not None:
                self.timeline.append(_span(f"{s.phase} step {s.index} (B={len(s.batch)})", "compute", start,
                                           env.now - start, "gpu compute"))
            loop.end_pass(s, start, env.now, times)

    def _expert_time(self, tokens: int) -> float:
        t = self._expert_s.get(tokens)
        if t is None:
            t = self._expert_s[tokens] = self.cost.expert_s(self.model, tokens)
        return t

    def _host_expert_s(self, tokens: float) -> float:
        return self.cost.host_expert_s(self.model, int(tokens))

    def _pass_costs(self, s: Step) -> _PassCosts:
        """The pass's shape and what each of its ops costs (the drafter's and rejection sampling's too)."""
        model, cost, batch, rnd = self.model, self.cost, s.batch, s.rnd
        draft_s = reject_s = 0.0
        lm_positions = len(batch)
        if rnd is not None:
            positions = [r.pos for r in batch]
            shape = verify_shape(positions, rnd.drafts)
            lm_positions = shape.tokens
            draft_s = self.drafter.round_s(positions, rnd.drafts, rnd.k)
            reject_s = cost.rejection_sampling_s(model, shape.tokens) if any(rnd.drafts) else 0.0
        elif s.phase == "decode":
            shape = decode_shape([r.pos + 1 for r in batch])
        else:
            pairs = sum(r.req.prompt_len * (r.req.prompt_len + 1) // 2 for r in batch)
            shape = BatchShape(tokens=s.tokens, sequences=len(batch), attended_pairs=pairs, kv_tokens=s.tokens)
            if self.drafter is not None:
                draft_s = self.drafter.prefill_s([r.req.prompt_len for r in batch])
        T = shape.tokens
        by_tokens = self._ops_s.get(T)
        if by_tokens is None:   # ops whose cost depends on the token count alone: asked once per count
            by_tokens = self._ops_s[T] = (cost.router_s(model, T), cost.shared_experts_s(model, T),
                                          cost.combine_s(model, T),
                                          cost.dense_ffn_s(model, T) if model.dense_layers else 0.0)
        return _PassCosts(lm_positions, draft_s, reject_s, cost.attention_block_s(model, shape), *by_tokens)

    def _forward(self, loop: ServingLoop, s: Step):
        """One pass on the GPU's compute stream: up to each MoE layer's router (a timeout only when
        another event is due first), then the layer's experts (``_experts``, or ``_resident_experts``
        when none has to be waited for); returns the pass's ``PassTimes``."""
        env, model = self.env, self.model
        pc = self._pass_costs(s)
        routing = layer_routing(s.rows, model.num_experts)
        t = PassTimes(draft_s=pc.draft_s, reject_s=pc.reject_s)
        loop.begin_pass(s, routing)
        pending = self.scenario.sim.pass_overhead_s + self.cost.embed_s(model, s.tokens)
        t.other_compute_s += pending
        pending += pc.draft_s   # the drafter runs before the target's pass
        moe_index, queue = model.moe_layer_index, env._queue
        attention_s, dense_s = pc.attention_s, pc.dense_s
        router_s = pc.router_s + self._policy_s   # the router, then the policy's decisions (table-driven runs)
        attention_total_s = t.attention_s   # summed here (nothing else adds to it), in layer order
        landing_cost = self._copy_overhead_s > 0
        moe_other_s = pc.router_s + pc.shared_s + pc.combine_s + self._policy_s
        for layer in range(model.num_layers):
            m = moe_index.get(layer)
            if m is None:
                pending += attention_s + dense_s
                attention_total_s += attention_s
                t.other_compute_s += dense_s
                continue
            ids, counts = routing[m]
            pending += attention_s + router_s
            if landing_cost and self.copies.landed != self._copies_paid:
                pending += self._landed_copies_s(t)
            attention_total_s += attention_s
            t.other_compute_s += moe_other_s
            if (queue[0][0] if queue else _INFINITY) > env._now + pending:   # nothing else happens first
                # What yielding env.timeout(pending) does when no event is due before it fires: the
                # clock moves on (the same sum SimPy forms) with no event spent; no other code runs.
                env._now = env._now + pending
            else:
                yield env.timeout(pending)  # the router has run: routing is known from here on
            acc = loop.layer(s, layer, ids, counts)
            if acc.waiting or acc.host:
                pending = yield from self._experts(acc, pc, t)
            else:
                pending = self._resident_experts(acc, pc, t)
            loop.end_layer()
        t.attention_s = attention_total_s
        lm = self.cost.lm_head_s(model, pc.lm_positions)
        t.other_compute_s += lm
        rest_s = pending + lm + pc.reject_s + self._landed_copies_s(t)
        if (queue[0][0] if queue else _INFINITY) > env._now + rest_s:   # as at a router: no event spent
            env._now = env._now + rest_s
        else:
            yield env.timeout(rest_s)
        return t

    def _landed_copies_s(self, t: PassTimes) -> float:
        """The stream's cost for the copies landed since it last paid (``copy_overhead_s`` each),
        booked as other compute."""
        n = self.copies.landed - self._copies_paid
        if not n or not self._copy_overhead_s:
            return 0.0
        self._copies_paid += n
        paid_s = self._copy_overhead_s * n
        t.other_compute_s += paid_s
        return paid_s

    def _resident_experts(self, acc: LayerAccess, pc: _PassCosts, t: PassTimes) -> float:
        """``_experts`` of a layer whose experts are all resident: no wait, only sums (routing order)."""
        ready, expert_s, cached = pc.shared_s, t.expert_compute_s, self._expert_s
        busy_until_s = self.copier.busy_until_s() if self._contends else 0.0   # no copy is ordered below
        contended = busy_until_s > self.env._now
        for n in acc.counts:
            x = cached.get(n)
            if x is None:
                x = self._expert_time(n)
            if contended:
                x = self._contended_s(self.env._now + ready, x, n, busy_until_s)
            expert_s += x
            ready += x
        t.expert_compute_s = expert_s
        return ready + pc.combine_s

    def _run_contended_s(self, start_s: float, x: float, tokens: int, t: PassTimes) -> float:
        """``_contended_s`` for an expert whose uncontended ``x`` is booked already (it waited for a
        copy, so the copy engine's queue is asked now): books the extra."""
        stretched = self._contended_s(start_s, x, tokens, self.copier.busy_until_s())
        if stretched != x:
            t.expert_compute_s += stretched - x
        return stretched

    def _contended_s(self, start_s: float, x: float, tokens: int, busy_until_s: float) -> float:
        """An expert of ``tokens`` with ``x`` seconds of work, starting at ``start_s``: the part that
        runs before ``busy_until_s`` (when the copy engine's queued and running copies are done)
        takes ``overheads.copy_contention`` times longer (the executor's copy thread slowing its
        compute thread); the rest runs at full speed."""
        factor = self._contention.get(tokens)
        if factor is None:
            factor = self._contention[tokens] = self.overheads.copy_contention(self.model, tokens, self._h2d)
        busy_s = busy_until_s - start_s
        if factor == 1.0 or busy_s <= 0.0:
            return x
        slow_work_s = busy_s / factor   # the work that fits before the copies are done
        return x * factor if x <= slow_work_s else busy_s + (x - slow_work_s)

    def _experts(self, acc: LayerAccess, pc: _PassCosts, t: PassTimes):
        """A MoE layer's experts after its router: resident (and shared) experts first, then each
        copied one once it landed, host-run ones beside; returns the compute left pending (the combine)."""
        env, layer = self.env, acc.layer
        ready = pc.shared_s
        contends = self._contends
        # Nothing below submits a copy before the first wait (host runs start when the stream
        # yields), so the copy engine's busy period is the same for every expert up to there.
        busy_until_s = self.copier.busy_until_s() if contends else 0.0
        waits, host_jobs, inline_host_s = [], [], 0.0
        # Membership tests on the layer's few copied / host-run / staged experts (empty: a tuple).
        waiting = set(acc.waiting)
        host = set(acc.host) if acc.host else ()
        staged = set(acc.staged) if acc.staged else ()
        cached, expert_s = self._expert_s, t.expert_compute_s   # summed here, in routing order
        for e, n in zip(acc.ids, acc.counts):   # routing order: the sums add up as they always did
            if host and e in host:
                h = self._host_expert_s(n)
                t.host_expert_s += h
                if self._host_is_device:   # the same core: after the layer's other experts
                    inline_host_s += h
                else:
                    host_jobs.append(env.process(self._run_on_host(layer, e, n)))
                continue
            x = cached.get(n)
            if x is None:
                x = self._expert_time(n)
            if e in waiting:   # its contention, if any, is booked when it runs
                expert_s += x
                waits.append((self.copies.job((layer, e)), x, e in staged, n))
                continue
            if contends:
                x = self._contended_s(env._now + ready, x, n, busy_until_s)
            expert_s += x
            ready += x
        t.expert_compute_s = expert_s
        acc_s = ready
        # Until the layer's end nothing but this stream submits copies (no host-run expert's outputs
        # coming back) or reads the copy engine's queue (no contention to charge).
        alone = not contends and not host_jobs
        for ev, x, in_staging, n in waits:
            if ev.processed:
                if contends:
                    x = self._run_contended_s(env._now + acc_s, x, n, t)
                acc_s += x
                if in_staging:   # its buffer is free once its compute is done
                    self.copies.release_at(env.now + acc_s, alone)
                continue
            if acc_s > 0:
                if ev.end_s is not None and ev.end_s >= env.now + acc_s:
                    t0 = env.now + acc_s   # the compute runs out before the copy lands: one event, the landing
                else:
                    yield env.timeout(acc_s)
                    t0 = env.now
                acc_s = 0.0
            else:
                t0 = env.now
            if not ev.processed:
                queue = env._queue
                if queue and queue[0][3] is ev and len(ev.callbacks) == 1:
                    _process_next(env)   # its landing is the next event and only the copy engine hears it
                else:
                    yield ev
                if self._copy_resume_s > 0:   # the stream notices the copy landed this much later
                    yield env.timeout(self._copy_resume_s)
                t.copy_stall_s += env.now - t0
                acc_s += self._landed_copies_s(t)   # the copy it waited for, and any landed meanwhile
            if contends:
                x = self._run_contended_s(env._now + acc_s, x, n, t)
            acc_s += x
            if in_staging:
                self.copies.release_at(env.now + acc_s, alone)
        if host_jobs:  # the combine needs the host-run experts' outputs back
            if acc_s > 0:
                yield env.timeout(acc_s)
                acc_s = 0.0
            for job in host_jobs:
                if not job.triggered:
                    t0 = env.now
                    yield job
                    t.host_stall_s += env.now - t0
        t.host_stall_s += inline_host_s   # host is the device: the stream ran them itself
        return acc_s + inline_host_s + pc.combine_s

    def _run_on_host(self, layer: int, expert: int, tokens: int):
        """Fiddler: activations to the host, the expert on the CPU, outputs back to the GPU."""
        nbytes = tokens * self.model.hidden_size * self.model.act_bytes_per_elem
        label = f"L{layer} E{expert}"
        for server, amount, what in ((self.d2h, nbytes, "acts out"), (self.host, tokens, "on host"),
                                     (self.copier, nbytes, "acts back")):
            yield server.submit(amount, 0, f"{label} {what}")


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
