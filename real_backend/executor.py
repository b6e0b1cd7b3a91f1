"""The real executor: run a ``Scenario`` on the PyTorch ``MoEModel`` with experts offloaded for real.

``RealExecutor(scenario, requests).run()`` is the wall-clock twin of ``sim.engine.simulate``: same
scenario, same requests, same policy objects, same record schema, same summariser.

* **Model**: ``MoEModel(scenario.model)`` with random weights seeded by ``scenario.seed`` (float32
  on CPU, bfloat16 on CUDA: on CUDA set ``model.weight_bytes_per_param=2`` so byte counters agree).
  Every routed expert moves into a ``HostStore`` (pinned on CUDA); the model keeps only its
  non-expert weights.
* **Routing is forced** from the requests' ``experts`` arrays (``model.forward(routing=...)``), so
  the real run and the simulator see identical routing. The router GEMM still runs.
  ``free_running=True``: the model's own router decides instead (the requests' ``experts`` are
  ignored) and the executor records what it chose: ``routed_requests()`` returns the requests
  with the recorded routing, ready for the simulator or ``workloads.trace.requests_to_frame``.
  Policies that need the routing ahead of the pass (``oracle``, ``pregated``, ``speculating``: the
  future; ``lookahead``: predictions) are refused in this mode (one-line error).
* **Offloading**: an ``OffloadRuntime`` with the scenario's policy object
  (``sim.policies`` registry). Its capacity is the simulator's: ``sim.memory.plan_memory`` over
  ``hw.gpu.memory_bytes`` (weights that stay resident, KV cache, activations; the slot pool gets the
  rest), or exactly ``policy.prefetch.capacity_per_layer`` when it is set. The copy engine's cap is
  ``hw.host_link.bandwidth_bps`` (and ``latency_s``); ``bandwidth_bps >= 1e12`` (``hw=this_cpu``'s
  default) means no cap. Policies with ``needs_future`` get ``sim.engine.record_future(...)``;
  policies with ``uses_predictions`` get the requests' ``predicted`` arrays as the simulator does.
  Lossy substitution (``speculating lossy=true``) is not supported here (one-line error).
* **Serving loop**: the simulator's own ``sim.loop.ServingLoop`` (scheduler, routing rows,
  predictions, records, summary) on the wall clock (``perf_counter`` from the run's
  start); when nothing has arrived the executor sleeps until the next arrival. One pass is the
  simulator's pass: prefill of admitted requests or decode of all running ones. Each pass feeds
  real tokens (prompts drawn from the seed; decode feeds the argmax of the previous logits).
* **Per-pass records** (``sim.engine.STEP_COLUMNS``, meanings of ``sim.metrics``): ``duration_s``
  measured around the whole pass (policy calls included); ``attention_s`` (attention blocks),
  ``expert_compute_s`` (routed experts), ``other_compute_s`` (embed, router, shared experts, dense
  FFNs, combine, LM head) timed around the ops (``perf_counter`` on CPU, CUDA events on GPU);
  ``copy_stall_s`` = time spent waiting in ``OffloadRuntime.weights()``; ``host_expert_s``: experts
  the policy runs on the host (``on_miss -> "host"``), timed around their op; on CPU they run on
  the executing thread itself (the host is the device, as ``hw.host_is_device`` in the simulator),
  so that time is also ``host_stall_s``, the simulator's booking (0 on CUDA); hits, misses, bytes and
  prefetch counters from the runtime; ``draft_s``, ``reject_s`` and the other speculation columns
  from ``sim.speculation.spec_columns``. Unlike the simulator, the time columns do not add up to
  ``duration_s``: the rest is Python, policy and bookkeeping overhead (``summary["overhead_s"]``:
  duration less attention, expert, other compute, copy stall, host stall, draft and reject time,
  and on CUDA less host-expert time too). On CPU every part is timed around its own stretch of the
  pass, inside the stretch ``duration_s`` is timed around, so they never add up to more.
* **Speculative decoding** (``policy/speculation=static|cascade``; ``sim/speculation.py`` is the
  reference): each decode pass is a round planned by ``sim.speculation.plan_round`` with the
  scenario's policy object and a ``workloads.acceptance.AcceptanceSampler`` seeded as the
  simulator's, so both engines run identical rounds (K, drafts and accepted drafts per request).
  (a) **Draft**: ``drafter=model``: the draft model (``policy.speculation.draft_model``, a
  ``MoEModel`` with random weights, seed ``seed + 1``, every weight on the device, its own KV
  cache) runs ``max k_r`` sequential passes, pass ``j`` carrying the requests with ``k_r > j``;
  the first feeds each request the committed tokens its cache lacks (the last one, plus the last
  draft of a fully accepted round, which the simulator does not charge), the others the previous
  pass's greedy token (argmax; its softmax is kept as the drafter's distribution). When the policy
  asks for K=0 with ``draft_keeps_running``, one pass keeps the draft cache current. The draft model also prefills
  every prompt in the prefill pass. ``drafter=ngram``: prompt lookup on the host over the
  request's token ids (``ngram_propose``), one-hot draft distributions. ``drafter=eagle`` is
  refused (one-line error). (b) **Verify**: one target pass of ``k_r + 1`` tokens per request
  (the last committed token and its drafts) appended to the KV cache, routing forced from
  ``sim.speculation.verify_rows`` (``rejected_routing`` and its seeding: ``sim.speculation.RejectedRouting``,
  the engine's own method is called), the offload runtime fetching each missing expert once per
  layer as in any pass, the LM head on every position. (c) **Rejection sampling**
  (``ops.rejection_sampling``: softmax over every verified position, accept test against the
  drafter's probabilities, residual distribution) runs for real and is timed, but its outcome is
  ignored: the planned accepted counts are committed (forced acceptance, as routing is forced:
  random weights have no meaningful acceptance). The target's own token at the first rejected
  position (or the bonus token) is the greedy argmax of the verify logits there. (d) **Commit and
  roll back**: the target's KV cache keeps ``pos + a_r + 1`` tokens (``KVCache.truncate``), the
  draft's at most as many; ``BatchScheduler.complete`` gets ``Round.committed``; the policy's
  ``on_round_end`` gets the measured pass. ``draft_s`` (the draft passes, or the lookup) and
  ``reject_s`` are timed around their work and are not part of ``attention_s``,
  ``expert_compute_s`` or ``other_compute_s``. ``token_ids`` / ``token_origins`` keep every
  request's committed tokens and which model chose each generated one (``T`` target, ``D``
  draft). ``free_running=True`` with speculation is refused (the rejected drafts' routing could
  not be replayed).
* **Tensor parallelism** (``hw.tensor_parallel = p > 1``): ``real_backend.tensor_parallel``; rank 0 is
  this process (loop, controller, policy, offload runtime for its slice of every expert, records),
  ranks ``1..p-1`` are worker processes started by ``run()`` and stopped at its end; each target pass
  goes through ``TPGroup.forward``. Memory plan, copy bytes and the Fiddler crossover are one GPU's
  (``ModelSpec.tensor_shard``), as in the simulator. ``model``/``store`` cannot be passed (every
  rank builds its shard from the seed).
* **Dense targets** (``num_experts: 0``, e.g. ``model=mini_draft``): nothing to offload; the
  runtime is a stand-in that counts nothing (used by ``moesim-profile`` to calibrate dense models).
* **Outputs**: ``RunResult`` (``sim.engine``), so ``sim.cli.write_outputs`` writes the same files
  as ``moesim``. ``timeline=True`` adds a Chrome trace: passes and ops on the compute track, the
  runtime's copy records on the copy track. ``torch_profile=PATH`` also writes a torch.profiler
  Chrome trace.

CUDA: the op timer records CUDA events and resolves them at the end of each pass (after a
synchronize); written, not run on a GPU here.
"""

from __future__ import annotations

import gc
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from hw.cost import CostModel
from hw.parallel import cost_for_system
from hw.system import HOST, System, gpu_node
from sim.engine import RunResult, host_crossover_tokens, record_future
from sim.loop import Idle, PassTimes, ServingLoop, Step, plan_run_memory
from sim.policies.base import PolicyContext, PrefetchPolicy, StepInfo, prefetch_policy_class
from sim.policies.speculation import SpeculationPolicy, speculation_policy_class
from sim.scenario import Scenario
from sim.schedulers import RunningRequest
from sim.speculation import Round
from workloads.requests import Request, build_requests
from workloads.validation import ConfigError

from . import ops
from .model import MoEModel
from .offload import HostStore, OffloadRuntime, StepCounters
from .tensor_parallel import TPGroup, check_tensor_parallel

NO_CAP_BPS = 1e12   # a host-link bandwidth at or above this is "no cap" (hw=this_cpu's default)
ATTENTION_OPS = frozenset({"attention"})
EXPERT_OPS = frozenset({"expert"})


def build_model_and_store(scenario: Scenario, device: Optional[str | torch.device] = None,
                          dtype: Optional[torch.dtype] = None,
                          checkpoint: Optional[str | Path] = None) -> tuple[MoEModel, Optional[HostStore]]:
    """The scenario's model (random weights, ``scenario.seed``; or the weights of the local
    safetensors ``checkpoint`` directory, Hugging Face Mixtral names, see ``real_backend.model``)
    with its routed experts moved into a ``HostStore`` (the model keeps only non-expert weights;
    a dense model has no experts and no store: None). Reusable across runs of one model. A
    checkpoint that is missing or does not fit the model's shapes is a one-line ``ConfigError``."""
    dev = ops.resolve_device(device)
    if checkpoint is not None:
        try:
            model = MoEModel.from_checkpoint(scenario.model, checkpoint, dev, dtype, expert_device="cpu")
        except (OSError, ValueError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--checkpoint={checkpoint} cannot be loaded for model={scenario.model.name}: "
                              f"{msg}") from None
    else:
        model = MoEModel(scenario.model, dev, dtype, seed=scenario.seed, expert_device="cpu")
    return model, move_experts_to_store(model, dev)


def move_experts_to_store(model: MoEModel, device: torch.device) -> Optional[HostStore]:
    """Move the model's routed experts into a ``HostStore`` (pinned for a CUDA ``device``); the model
    keeps only its non-expert weights. A dense model has none: None."""
    if not model.experts:
        return None
    store = HostStore.for_device({k: w.tensors for k, w in model.experts.items()}, device)
    model.experts = {}
    return store


def build_draft_model(scenario: Scenario, device: Optional[str | torch.device] = None,
                      dtype: Optional[torch.dtype] = None) -> Optional[MoEModel]:
    """The draft model of a ``drafter=model`` scenario (``scenario.draft_model``; random weights
    seeded by ``seed + 1``; every weight on the device); None for other drafters or no speculation."""
    spec_cfg = scenario.speculation
    if spec_cfg.name == "none" or spec_cfg.drafter != "model" or scenario.draft_model is None:
        return None
    return MoEModel(scenario.draft_model, ops.resolve_device(device), dtype, seed=scenario.seed + 1)


def ngram_propose(ids: list[int], k: int, max_n: int = 3) -> list[int]:
    """Prompt lookup (vLLM's ``ngram`` drafter): the longest suffix of ``ids`` of ``max_n`` .. 1
    tokens that occurred earlier in ``ids``; the ``k`` tokens that followed its latest earlier
    occurrence. Fewer than ``k`` found (or no match): padded with the last proposed (or last)
    token -- the round's plan asks for exactly ``k`` drafts."""
    n_ids = len(ids)
    out: list[int] = []
    for n in range(min(max_n, n_ids - 1), 0, -1):
        suffix = ids[n_ids - n:]
        for start in range(n_ids - n - 1, -1, -1):
            if ids[start:start + n] == suffix:
                out = ids[start + n:start + n + k]
                break
        if out:
            break
    last = out[-1] if out else (ids[-1] if ids else 0)
    return out + [last] * (k - len(out))


REAL_DRAFTERS = ("model", "ngram")


def check_runnable(scenario: Scenario, free_running: bool = False) -> None:
    """One-line ``ConfigError`` unless the real executor can run ``scenario`` as the simulator
    would: speculative decoding it can carry out (``check_speculation``); tensor parallelism is
    checked with the device (``tensor_parallel.check_tensor_parallel``)."""
    check_speculation(scenario, free_running)


def check_speculation(scenario: Scenario, free_running: bool = False) -> None:
    """One-line ``ConfigError`` unless the real executor can run the scenario's speculative decoding."""
    cfg = scenario.speculation
    if cfg.name == "none":
        return
    if free_running:
        raise ConfigError(f"policy/speculation={cfg.name} cannot run free-running (--free-running): the verify pass "
                          f"routes rejected drafts, which a recorded trace cannot replay; drop --free-running "
                          f"(forced routing) or use policy/speculation=none")
    if cfg.drafter not in REAL_DRAFTERS:
        why = {"eagle": " (an EAGLE head needs a trained head on the target's hidden states)",
               "self": " (SpecMoE's drafting through the target's resident experts is simulated only)"}
        raise ConfigError(f"policy.speculation.drafter={cfg.drafter} is not run by the real executor"
                          f"{why.get(cfg.drafter, '')}; choose one of: {', '.join(REAL_DRAFTERS)}")
    if cfg.drafter == "model":
        d, t = scenario.draft_model, scenario.model
        if d is None:
            raise ConfigError(f"policy.speculation.draft_model={cfg.draft_model} did not resolve to a model; "
                              f"name a conf/model preset, e.g. mini_draft")
        if d.vocab_size != t.vocab_size:
            raise ConfigError(f"policy.speculation.draft_model={d.name} has vocab_size={d.vocab_size} but "
                              f"model={t.name} has {t.vocab_size}; a draft model must share its target's "
                              f"vocabulary (e.g. mini_draft for mini_mixtral and mini_qwen)")


class _DenseRuntime:
    """Stands in for the ``OffloadRuntime`` when the target is dense: no experts, nothing to copy,
    nothing counted (the policy is reset and asked nothing)."""

    def __init__(self, policy: PrefetchPolicy):
        self.policy = policy
        self.copier = type("NoCopier", (), {"busy_s": 0.0, "sched": "none"})()
        self.copy_records: list = []
        self.resume_delays_s: list[float] = []

    def start(self, model, *, seed: int = 0, initial_residency: str = "fill", host_crossover_tokens=None,
              future=None, tensor_parallel: int = 1) -> None:
        self.policy.reset(PolicyContext(model, "per_layer", 0, 0, (), seed, host_crossover_tokens))

    def begin_step(self, info: StepInfo) -> tuple:
        return ()

    def end_step(self, step: int) -> StepCounters:
        return StepCounters()

    def count_activation_bytes(self, nbytes: float) -> None:
        raise RuntimeError("a dense model runs no experts on the host")

    def poll(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _OpTimer:
    """``op_timer`` for ``MoEModel.forward``: times each op into the pass's categories and, when
    asked, keeps spans for the timeline. Also closes the runtime's layer before ``combine``."""

    def __init__(self, ex: "RealExecutor"):
        self.ex = ex
        self.cuda = ex.device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.attention_s = self.expert_s = self.other_s = self.host_expert_s = 0.0
        self.draft_s = self.reject_s = 0.0
        self.spans: list[tuple[str, str, Any, Any]] = []   # (category, name, start, end)

    def __call__(self, op: str, layer: Optional[int], expert: Optional[int]):
        ex = self.ex
        if op == "combine" and ex._layer_open:
            ex._close_layer()   # expert compute issued: release staging buffers, unpin (not timed)
        if op == "attention":
            cat = "attention"
        elif op == "draft":
            cat = "draft"
        elif op == "rejection_sampling":
            cat = "reject"
        elif op == "expert":
            cat = "host_expert" if expert in ex._host_experts else "expert"
        else:
            cat = "other"
        if layer is None:
            name = op
        elif expert is None:
            name = f"{op} L{layer}"
        else:   # an expert's span says how many tokens it ran on
            name = f"{op} L{layer} E{expert} ({ex._expert_tokens.get(expert, 0)} tok)"
        return _Span(self, cat, name)

    def add(self, cat: str, dt: float) -> None:
        if cat == "attention":
            self.attention_s += dt
        elif cat == "expert":
            self.expert_s += dt
        elif cat == "host_expert":
            self.host_expert_s += dt
        elif cat == "draft":
            self.draft_s += dt
        elif cat == "reject":
            self.reject_s += dt
        else:
            self.other_s += dt

    def resolve_cuda(self) -> None:
        """CUDA: turn the pass's event pairs into seconds (call after a synchronize)."""
        if not self.cuda:
            return
        for cat, _, a, b in self.spans:
            self.add(cat, a.elapsed_time(b) / 1e3)


class _Span:
    __slots__ = ("timer", "cat", "name", "t0", "ev")

    def __init__(self, timer: _OpTimer, cat: str, name: str):
        self.timer, self.cat, self.name = timer, cat, name

    def __enter__(self):
        if self.timer.cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        t = self.timer
        if t.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            t.spans.append((self.cat, self.name, self.ev, end))
            return
        t1 = time.perf_counter()
        t.add(self.cat, t1 - self.t0)
        if t.ex.timeline is not None:
            t.spans.append((self.cat, self.name, self.t0, t1))


@dataclass
class _Seq:
    slot: int
    next_token: int
    dslot: Optional[int] = None                        # the draft model's KV cache slot
    ids: list[int] = field(default_factory=list)       # prompt + committed tokens (the last: next_token)
    origins: list[str] = field(default_factory=list)   # per generated token: "T" target, "D" accepted draft


class RealExecutor:
    """Runs ``scenario`` over ``requests`` on the real model; ``run()`` returns a ``RunResult``.

    ``model``/``store`` (from ``build_model_and_store``) may be shared between runs of the same
    model. ``cost`` is used only for what a policy needs from a cost model (the host crossover of
    ``fiddler``, the first run of ``record_future``); default: the scenario's cost model if it
    loads, else the roofline. ``threads``: torch intra-op threads during the run (default 1 on
    CPU, as ``moesim-profile`` measures; the copy worker takes the other core). ``draft``: the
    draft model of a ``drafter=model`` scenario (``build_draft_model``; built by ``run()`` if not
    given); ``speculation``: the speculation policy object (default: the scenario's).
    ``synchronous_copies``: no copy thread; each copy runs on the main thread when the runtime next
    lands copies (``real_backend.offload``): every copy has landed by the next policy decision, in
    the simulator's copy-engine order, so the counters cannot depend on thread timing (for tests
    that compare them with the simulator's exactly; times are then not those of an async copy).
    """

    def __init__(self, scenario: Scenario, requests: Optional[list[Request]] = None, *,
                 device: Optional[str | torch.device] = None, model: Optional[MoEModel] = None,
                 store: Optional[HostStore] = None, policy: Optional[PrefetchPolicy] = None,
                 cost: Optional[CostModel] = None, threads: Optional[int] = None,
                 timeline: Optional[bool] = None, torch_profile: Optional[str | Path] = None,
                 warmup_passes: int = 1, worker_priority: str = "realtime", record_routing: bool = False,
                 progress: bool = False, free_running: bool = False, draft: Optional[MoEModel] = None,
                 speculation: Optional[SpeculationPolicy] = None, synchronous_copies: bool = False):
        self.scenario = scenario
        self.spec = scenario.model
        if requests is None:
            requests = build_requests(scenario.workload, scenario.model, scenario.seed)
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        if not self.requests:
            raise ConfigError("workload.num_requests=0 is invalid for the real executor; need at least one request")
        check_runnable(scenario, free_running)
        spec_cfg = scenario.speculation
        self._speculating = spec_cfg.name != "none"
        self.spec_policy: SpeculationPolicy = speculation or speculation_policy_class(spec_cfg.name)(spec_cfg)
        self.draft = draft
        self.policy = policy or prefetch_policy_class(scenario.prefetch.name)(scenario.prefetch)
        if self.policy.substitutes:
            raise ConfigError(f"policy/prefetch={scenario.prefetch.name} with lossy substitution is not supported "
                              f"by the real executor; use lossy=false")
        self.free_running = free_running
        self._free_routing: Optional[dict[int, np.ndarray]] = None
        if free_running and (self.policy.needs_future or self.policy.uses_predictions):
            need = "the future routing" if self.policy.needs_future else "gate-lookahead predictions"
            raise ConfigError(f"policy/prefetch={scenario.prefetch.name} needs {need} before each pass, which a "
                              f"free-running model (its own router decides) cannot give; replay a trace "
                              f"(forced routing) or choose lru, lfu, transition, moe_infinity, fiddler")
        if self.policy.uses_predictions and any(not r.has_predictions for r in self.requests):
            raise ConfigError(
                f"policy/prefetch={scenario.prefetch.name} needs predicted_experts in the router trace "
                f"(record them with moesim-capture --predict lookahead); for traces without them use "
                f"policy/prefetch=transition or speculating")
        if model is not None:
            self.device = model.device
        else:
            try:
                self.device = ops.resolve_device(device)
            except ValueError as exc:
                raise ConfigError(f"device={device} is not usable: {exc}") from None
        self.tensor_parallel = scenario.hw.tensor_parallel
        check_tensor_parallel(self.tensor_parallel, self.device, free_running)
        if self.tensor_parallel > 1 and (model is not None or store is not None):
            raise ConfigError(f"hw.tensor_parallel={self.tensor_parallel}: every rank builds its shard from the "
                              f"seed; do not pass a model or store")
        self._tp: Optional[TPGroup] = None
        self.model, self.store = model, store
        self._cost = cost
        self.threads = threads if threads is not None else (1 if self.device.type == "cpu" else None)
        self.timeline: Optional[list] = [] if (timeline if timeline is not None else scenario.sim.timeline) else None
        self.torch_profile = Path(torch_profile) if torch_profile is not None else None
        self.warmup_passes = warmup_passes
        self.worker_priority = worker_priority
        self.synchronous_copies = synchronous_copies
        self.progress = progress
        self._record = record_routing
        self.recorded_passes: list[dict[int, list[int]]] = []      # per pass: layer -> experts that ran (sorted)
        self.memory = self._plan_memory()
        self._layer_open = False
        self._host_experts: set[int] = set()
        self._expert_tokens: dict[int, int] = {}   # this layer's routed experts -> tokens (timeline span names)
        # Host-run experts run on the executing thread: the host is the device (CPU).
        self._host_inline = self.device.type == "cpu"

    # ------------------------------------------------------------------ set-up
    def _plan_memory(self):
        return plan_run_memory(self.scenario, self.requests)

    def _cost_model(self) -> CostModel:
        """The simulator's cost model of the scenario (tensor parallelism included), else the roofline."""
        if self._cost is None:
            hw = self.scenario.hw
            try:
                self._cost = cost_for_system(hw, self.spec)
            except ConfigError:
                self._cost = cost_for_system(replace(hw, cost_model="roofline"), self.spec)
        return self._cost

    def _runtime(self) -> OffloadRuntime:
        if self.store is None:
            return _DenseRuntime(self.policy)
        link = self.scenario.hw.host_link
        bw = None if (link.bandwidth_bps >= NO_CAP_BPS or self.device.type == "cuda") else link.bandwidth_bps
        lat = 0.0 if self.device.type == "cuda" else link.latency_s
        mem = self.memory
        return OffloadRuntime(self.store, self.policy, capacity_per_layer=mem.slots_per_layer,
                              total_slots=mem.total_slots, cache_scope=mem.cache_scope, device=self.device,
                              bandwidth_bps=bw, latency_s=lat, worker_priority=self.worker_priority,
                              synchronous_copies=self.synchronous_copies)

    # ------------------------------------------------------------------ run
    def run(self) -> RunResult:
        wall0 = time.perf_counter()
        failed = True
        try:
            result = self._run(wall0)
            failed = False
            return result
        finally:
            if self._tp is not None:
                self._tp.close(failed)
                self._tp = None

    def _start_model(self) -> None:
        """The target model and its host store: rank 0's shard under tensor parallelism (the other
        ranks start here too), else the whole model (unless given)."""
        sc = self.scenario
        if self.tensor_parallel > 1:
            self._tp = TPGroup.start(sc, self.tensor_parallel, self.device, None, self.threads)
            self.model = self._tp.model
            self.store = move_experts_to_store(self.model, self.device)
        elif self.model is None or (self.store is None and not self.spec.is_dense):
            self.model, self.store = build_model_and_store(sc, self.device)

    def _new_cache(self, max_seqs: int, capacity: int):
        """A KV cache of the target model (on every rank under tensor parallelism)."""
        if self._tp is not None:
            return self._tp.new_cache(max_seqs, capacity)
        return self.model.new_cache(max_seqs, capacity)

    def _target_forward(self, tokens, cache, slots, **kwargs):
        """One forward pass of the target model (announced to the other ranks under tensor parallelism)."""
        if self._tp is not None:
            return self._tp.forward(tokens, cache, slots, **kwargs)
        return self.model.forward(tokens, cache, slots, **kwargs)

    def _run(self, wall0: float) -> RunResult:
        sc = self.scenario
        self._start_model()
        if self.draft is None:
            self.draft = build_draft_model(sc, self.device, self.model.dtype)
        future = None
        if self.policy.needs_future:
            future = record_future(sc, self.requests, self._cost_model())
        crossover = None
        if not self.spec.is_dense:   # the host crossover the simulator gives the policy (Fiddler)
            system = System(sc.hw)
            (h2d_id,) = system.route(HOST, gpu_node(sc.sim.gpu))
            crossover = host_crossover_tokens(self._cost_model(), self.spec.tensor_shard(self.tensor_parallel),
                                              system.links()[h2d_id])
        old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        gc_was = gc.isenabled()
        rt = self._runtime()
        self._future = future
        try:
            try:
                rt.start(self.spec, seed=sc.seed, initial_residency=sc.sim.initial_residency,
                         host_crossover_tokens=crossover, future=future, tensor_parallel=self.tensor_parallel)
            except ValueError as exc:
                raise ConfigError(str(exc).splitlines()[0]) from None
            self.rt = rt
            with torch.inference_mode():
                self._warmup()
            gc.collect()
            gc.disable()
            prof = None
            if self.torch_profile is not None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if self.device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                prof = torch.profiler.profile(activities=acts)
            with (prof if prof is not None else nullcontext()), torch.inference_mode():
                self._serve()
            if prof is not None:
                self.torch_profile.parent.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(self.torch_profile))
            copy_busy = rt.copier.busy_s
            records = rt.copy_records
            sched = rt.copier.sched
        finally:
            if gc_was:
                gc.enable()
            rt.close()
            torch.set_num_threads(old_threads)
        steps, reqs = self.loop.records()
        parts = ["attention_s", "expert_compute_s", "other_compute_s", "copy_stall_s", "host_stall_s", "draft_s",
                 "reject_s"] + ([] if self._host_inline else ["host_expert_s"])   # on CPU: inside host_stall_s
        extra = {"sim_wall_s": time.perf_counter() - wall0, "events": 0, "engine": "real",
                 "device": self.device.type, "torch_threads": self.threads or torch.get_num_threads(),
                 "copy_worker_sched": sched, "copy_engine_busy_s": copy_busy,
                 "overhead_s": float(np.sum(steps["duration_s"] - np.sum([steps[p] for p in parts], axis=0)))}
        summary = self.loop.summary(steps, reqs, self.memory, extra)
        if self.timeline is not None:
            track = f"copy {HOST}->{gpu_node(sc.sim.gpu)}"
            self.timeline.extend(r.span(self._t0, track) for r in records)
        self.copy_records = records
        return RunResult(steps, reqs, summary, self.memory, self.timeline)

    def _warmup(self) -> None:
        """Untimed passes on a scratch KV cache, experts straight from the host store (the cache and
        the policy are untouched): first-call allocations and lazy initialisation are not timed."""
        if self.warmup_passes <= 0:
            return
        model, store = self.model, self.store
        r = self.requests[0]
        n = max(1, min(r.prompt_len, 64))
        cache = self._new_cache(1, n + self.warmup_passes + 1)
        slot = cache.allocate()
        ids = r.experts[:n].astype(np.int64)
        get = lambda layer, e: store.tensors((layer, e))  # noqa: E731
        routing = {layer: ids[:, m, :] for m, layer in enumerate(model.moe_layers)}
        fwd = self._target_forward
        out = fwd([[1] * n], cache, [slot], routing=routing, get_expert=get)
        for i in range(self.warmup_passes):
            row = r.experts[min(n + i, len(r.experts) - 1)].astype(np.int64)
            routing = {layer: row[m][None, :] for m, layer in enumerate(model.moe_layers)}
            out = fwd([[int(out.logits[0].argmax())]], cache, [slot], routing=routing, get_expert=get)
        if self._speculating:   # a verify-shaped pass (masked attention, every position's logits), the
            v = self.scenario.speculation.k + 1   # drafter's passes and rejection sampling
            idx = [min(n + self.warmup_passes + j, len(r.experts) - 1) for j in range(v)]
            rows = r.experts[idx].astype(np.int64)
            routing = {layer: rows[:, m, :] for m, layer in enumerate(model.moe_layers)}
            out = fwd([[1] * v], cache, [slot], routing=routing, get_expert=get, all_logits=True)
            q = out.logits.softmax(dim=-1)
            drafted = torch.ones(v, dtype=torch.long, device=self.device)
            ops.rejection_sampling(out.logits, q, drafted)
            if self.draft is not None:
                dcache = self.draft.new_cache(1, n + v + 1)
                dslot = dcache.allocate()
                self.draft.forward([[1] * n], dcache, [dslot])
                for _ in range(max(1, self.warmup_passes)):
                    self.draft.forward([[1]], dcache, [dslot])
        ops.synchronize(self.device)

    # ------------------------------------------------------------------ serving loop
    def _serve(self) -> None:
        sc, wl = self.scenario, self.scenario.workload
        self._seqs: dict[int, _Seq] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.token_origins: dict[int, list[str]] = {}
        longest = max(r.prompt_len + r.output_len for r in self.requests)
        max_seqs = max(1, min(wl.batch_size, len(self.requests)))
        self.kv = self._new_cache(max_seqs, longest + 1)
        self.dkv = self.draft.new_cache(max_seqs, longest + 1) if self.draft is not None else None
        self._reject_gen = torch.Generator(device=self.device).manual_seed(sc.seed + 29)
        self._timer = _OpTimer(self)
        self._rng = np.random.default_rng(sc.seed + 17)
        M, K = self.spec.num_moe_layers, self.spec.top_k
        self._free_routing = ({r.request_id: np.full((r.prompt_len + r.output_len - 1, M, K), -1, dtype=np.int16)
                               for r in self.requests} if self.free_running else None)
        self.loop = loop = ServingLoop(sc, self.requests, self.rt, self.policy, self.spec_policy,
                                       future=self._future, progress=self.progress,
                                       progress_label="real")
        self._t0 = time.perf_counter()
        while True:
            now = time.perf_counter() - self._t0
            s = loop.next_step(now, with_rows=not self.free_running)
            if s is None:
                break
            if isinstance(s, Idle):
                time.sleep(max(0.0, s.until_s - now))
                continue
            start, end, times = self._forward(s)
            for r in loop.end_pass(s, start, end, times):
                self._finish(r)

    def _finish(self, r: RunningRequest) -> None:
        """A request is done (the loop wrote its record): free its KV slots, keep its tokens."""
        req = r.req
        seq = self._seqs.pop(req.request_id, None)
        if seq is not None:
            self.kv.release(seq.slot)
            if seq.dslot is not None:
                self.dkv.release(seq.dslot)
            self.token_ids[req.request_id] = seq.ids
            self.token_origins[req.request_id] = seq.origins

    # ------------------------------------------------------------------ one pass
    def _forward(self, s: Step) -> tuple[float, float, PassTimes]:
        """One pass: prefill, decode, or (``s.rnd``) a speculation round: draft, verify, rejection
        sampling, commit and roll back (module docstring). Returns its start, end and time split."""
        timer, loop = self._timer, self.loop
        t_start = time.perf_counter()
        timer.reset()
        batch, rnd = s.batch, s.rnd
        tokens = self._pass_tokens(s)
        slots = [self._seqs[r.req.request_id].slot for r in batch]
        routing = None
        if s.rows is not None:
            rows = s.rows.astype(np.int64)
            routing = {layer: rows[:, m, :] for m, layer in enumerate(self.spec.moe_layers)}
        else:
            s.token_count = sum(len(t) for t in tokens)
        self._step, self._ran = s, {}
        loop.begin_pass(s)
        if s.phase == "prefill" and self.draft is not None:   # the draft model prefills every prompt
            with timer("draft", None, None):
                self.draft.forward(tokens, self.dkv, [self._seqs[r.req.request_id].dslot for r in batch])
        if rnd is not None:   # drafted after the step began (prefetches overlap drafting, as simulated)
            with timer("draft", None, None):
                tokens, q, drafted = self._draft_round(batch, rnd)
        out = self._target_forward(tokens, self.kv, slots, routing=routing, get_expert=self._get_expert,
                                   on_routed=self._on_routed, op_timer=timer, all_logits=rnd is not None)
        if rnd is not None:
            if any(rnd.drafts):   # real work, timed; its outcome is ignored (forced acceptance)
                with timer("rejection_sampling", None, None):
                    ops.rejection_sampling(out.logits, q, drafted, generator=self._reject_gen)
            self._commit_round(batch, rnd, out.logits, drafted)
        else:
            self._commit_tokens(batch, out.logits.argmax(dim=-1).tolist())   # synchronises on CUDA
        if self.free_running:
            self._record_free_routing(s.phase, batch, out.routing)
        self.rt.poll()
        t_end = time.perf_counter()
        timer.resolve_cuda()
        if self._record:
            self.recorded_passes.append({layer: sorted(ran) for layer, ran in self._ran.items()})
        start, end = t_start - self._t0, t_end - self._t0
        self._timeline_pass(s, start, end)
        return start, end, PassTimes(
            attention_s=timer.attention_s, expert_compute_s=timer.expert_s, other_compute_s=timer.other_s,
            host_stall_s=timer.host_expert_s if self._host_inline else 0.0,   # copy stall: the runtime's counter
            host_expert_s=timer.host_expert_s, draft_s=timer.draft_s, reject_s=timer.reject_s)

    def _pass_tokens(self, s: Step) -> list:
        """The token ids each request feeds this pass (prefill: a fresh prompt from the seed, and its
        KV slots; decode: the last committed token; a round: drafted later, in ``_forward``)."""
        if s.rnd is not None:
            return []
        if s.phase == "decode":
            return [[self._seqs[r.req.request_id].next_token] for r in s.batch]
        tokens = []
        for r in s.batch:
            prompt = self._rng.integers(0, self.spec.vocab_size, size=r.req.prompt_len).tolist()
            self._seqs[r.req.request_id] = _Seq(self.kv.allocate(), 0, ids=list(prompt),
                                                dslot=self.dkv.allocate() if self.dkv is not None else None)
            tokens.append(prompt)
        return tokens

    def _commit_tokens(self, batch: list[RunningRequest], nxt: list[int]) -> None:
        for r, tok in zip(batch, nxt):
            seq = self._seqs[r.req.request_id]
            seq.next_token = int(tok)
            seq.ids.append(int(tok))
            seq.origins.append("T")

    def _timeline_pass(self, s: Step, start: float, end: float) -> None:
        if self.timeline is None:
            return
        tl, timer = self.timeline, self._timer
        tl.append(_span(f"{s.phase} step {s.index} (B={len(s.batch)})", "compute", start, end - start, "gpu compute"))
        if not timer.cuda:
            for cat, name, a, b in timer.spans:
                tl.append(_span(name, cat, a - self._t0, b - a, "ops"))

    # ------------------------------------------------------------------ speculation
    def _draft_round(self, batch: list[RunningRequest], rnd: Round
                     ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Draft ``rnd.drafts[i]`` tokens for each request (module docstring). Returns the verify
        pass's tokens per request (the last committed token, then the drafts), the drafter's
        distributions ``q [T, V]`` and the draft tokens ``[T]`` laid out as the verify pass's rows
        (request ``i``: ``drafts[i] + 1`` rows; a zero row and -1 at its bonus position)."""
        dev, V = self.device, self.spec.vocab_size
        drafts = rnd.drafts
        sizes = [k + 1 for k in drafts]
        offs = np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()
        T = int(sum(sizes))
        seqs = [self._seqs[r.req.request_id] for r in batch]
        drafted = torch.full((T,), -1, dtype=torch.long, device=dev)
        q = torch.zeros(T, V, dtype=torch.float32, device=dev)
        kmax = max(drafts)
        cfg = self.scenario.speculation
        if self.draft is not None:
            dkv = self.dkv
            active = [i for i, k in enumerate(drafts) if k > 0]
            if rnd.k == 0 and cfg.draft_keeps_running:   # as Drafter.round_s: K=0 (not: every request
                active = list(range(len(batch)))         # at its end): one pass keeps the draft's KV current
            # pass 0 feeds each request the committed tokens its draft cache lacks (the last one; also
            # the last draft of a fully accepted round); pass j > 0 the previous pass's draft
            inputs: list = [seqs[i].ids[dkv.lengths[seqs[i].dslot]:] for i in active]
            j = 0
            while active:
                logits = self.draft.forward(inputs, dkv, [seqs[i].dslot for i in active]).logits
                if kmax == 0:
                    break
                tok = logits.argmax(dim=-1)
                rows = torch.tensor([offs[i] + j for i in active], dtype=torch.long, device=dev)
                drafted.index_copy_(0, rows, tok)
                q.index_copy_(0, rows, logits.float().softmax(dim=-1))
                keep = [n for n, i in enumerate(active) if drafts[i] > j + 1]
                active = [active[n] for n in keep]
                if active:
                    inputs = list(tok.index_select(0, torch.tensor(keep, dtype=torch.long, device=dev)).view(-1, 1))
                j += 1
        elif kmax > 0:   # ngram: prompt lookup on the host, one-hot draft distributions
            rows, toks = [], []
            for i, k in enumerate(drafts):
                if k:
                    rows.extend(range(offs[i], offs[i] + k))
                    toks.extend(ngram_propose(seqs[i].ids, k))
            rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
            toks_t = torch.tensor(toks, dtype=torch.long, device=dev)
            drafted.index_copy_(0, rows_t, toks_t)
            q.index_put_((rows_t, toks_t), torch.ones(len(rows), dtype=q.dtype, device=dev))
        verify = torch.empty(T, dtype=torch.long, device=dev)
        verify[1:] = drafted[:-1]
        verify.index_copy_(0, torch.tensor(offs, dtype=torch.long, device=dev),
                           torch.tensor([s.ids[-1] for s in seqs], dtype=torch.long, device=dev))
        return list(verify.split(sizes)), q, drafted

    def _commit_round(self, batch: list[RunningRequest], rnd: Round, logits: torch.Tensor,
                      drafted: torch.Tensor) -> None:
        """Commit each request's planned ``a`` drafts and the target's token after them (greedy over
        the verify logits at that position); roll both KV caches back to the committed context."""
        sizes = [k + 1 for k in rnd.drafts]
        offs = np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()
        sel = torch.tensor([o + a for o, a in zip(offs, rnd.accepted)], dtype=torch.long, device=logits.device)
        nxt = logits.index_select(0, sel).argmax(dim=-1).tolist()   # synchronises on CUDA
        dl = drafted.tolist() if any(rnd.accepted) else None
        for i, r in enumerate(batch):
            seq, a = self._seqs[r.req.request_id], rnd.accepted[i]
            if a:
                seq.ids.extend(dl[offs[i]:offs[i] + a])
                seq.origins.extend("D" * a)
            seq.next_token = int(nxt[i])
            seq.ids.append(seq.next_token)
            seq.origins.append("T")
            keep = r.pos + a + 1   # the last committed token, then the accepted drafts
            self.kv.truncate(seq.slot, keep)
            if seq.dslot is not None:
                self.dkv.truncate(seq.dslot, min(self.dkv.lengths[seq.dslot], keep))

    def _record_free_routing(self, phase: str, batch: list[RunningRequest], routing: dict) -> None:
        """Store the pass's router choices (token order: the batch's, prompts concatenated)."""
        ids = np.stack([routing[layer][0].to("cpu").numpy() for layer in self.spec.moe_layers], axis=1)
        off = 0
        for r in batch:
            dst = self._free_routing[r.req.request_id]
            if phase == "decode":
                dst[r.pos] = ids[off]
                off += 1
            else:
                n = r.req.prompt_len
                dst[:n] = ids[off:off + n]
                off += n

    def routed_requests(self) -> list[Request]:
        """After a free-running ``run()``: the requests with the routing the model chose."""
        if self._free_routing is None:
            raise RuntimeError("routed_requests() needs a finished run with free_running=True")
        out = []
        for r in self.requests:
            ex = self._free_routing[r.request_id]
            if (ex < 0).any():
                raise RuntimeError(f"request {r.request_id}: routing not recorded for every position")
            out.append(Request(r.request_id, r.arrival_s, r.prompt_len, r.output_len, ex.copy()))
        return out

    def _on_routed(self, layer: int, experts: list[int], counts: list[int]) -> list[int]:
        """The layer's router has run: the loop's per-layer protocol (predictions, policy, copy
        orders); returns the order to run the experts: resident first, then those being copied
        (routing order), then host-run ones (the simulator's order)."""
        acc = self.loop.layer(self._step, layer, experts, counts)
        self._layer_open = True
        self._host_experts = set(acc.host)
        self._expert_tokens = dict(zip(experts, counts))
        self._prev_key = None
        return list(acc.on_device) + list(acc.host)

    def _get_expert(self, layer: int, e: int):
        rt = self.rt
        if self._prev_key is not None:
            rt.release(self._prev_key)   # its compute has been issued: a staging buffer may be reused
            self._prev_key = None
        key = (layer, e)
        if self._record:
            self._ran.setdefault(layer, []).append(int(e))
        if e in self._host_experts:
            w = self.store.tensors(key)
            return tuple(t.to(self.device, non_blocking=True) for t in w) if self.device.type == "cuda" else w
        w = rt.weights(key)
        self._prev_key = key
        return w

    def _close_layer(self) -> None:
        if self._prev_key is not None:
            self.rt.release(self._prev_key)
            self._prev_key = None
        self.loop.end_layer()
        self._layer_open = False
        self._host_experts = set()


def _span(name: str, cat: str, start_s: float, dur_s: float, track: str) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "ts": start_s * 1e6, "dur": dur_s * 1e6, "pid": 1, "tid": track}


def execute(scenario: Scenario, requests: Optional[list[Request]] = None, **kwargs) -> RunResult:
    """Build the requests (unless given) and run the scenario on the real backend."""
    return RealExecutor(scenario, requests, **kwargs).run()
