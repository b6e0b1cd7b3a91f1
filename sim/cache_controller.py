"""The expert-offload protocol, written once: residency, pinning, victims, prefetches and counters.

Both backends (the SimPy engine, ``sim.engine``, and the real executor's ``OffloadRuntime``,
``real_backend.offload``) drive one ``CacheController``; it is the only code that calls the prefetch
policy and the only code that counts. A backend only *carries out* the copies the controller orders
(``CopySink.copy``) and tells it when each one has landed (``landed``), in completion order.

Per forward pass::

    ctl.begin_step(StepInfo(...))            # policy.on_step_begin -> prefetch orders
    for each MoE layer, after its router:
        acc = ctl.begin_layer(step, layer, experts, counts, predicted)
        ... the backend runs acc.hits, then acc.waiting once each copy landed, acc.host on the host ...
        ctl.end_layer()                      # unpin
    counters = ctl.end_step(step)            # policy.on_step_end; the pass's StepCounters

What ``begin_layer`` does, in this order (the order is part of the contract: it decides which
expert a later ``victim`` call may evict): pin the layer's experts; ``policy.on_routed`` -> plan;
per needed expert in routing order: resident = hit (a prefetch used for the first time is
*useful*); a copy into a slot in flight = late prefetch (or a repeated demand); else ask
``policy.on_miss``: ``"host"`` = host run, otherwise a demand load (into a slot, evicting the
policy's victim when the pool is full; into a staging buffer, not cached, when the policy names no
victim); then the plan's prefetches, which queue behind the layer's demand loads.

Copies: demand loads at ``DEMAND_PRIORITY`` (0), prefetches at ``PREFETCH_PRIORITY_BASE + plan
priority``; lower runs first, FIFO within a priority (the backends' copy queues). Bytes are the
expert's payload bytes (``expert_bytes``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping, NamedTuple, Optional, Protocol, Sequence

from .memory import ExpertCache
from .policies.base import ExpertKey, Plan, PolicyContext, Prefetch, PrefetchPolicy, RunOnHost, StepInfo

DEMAND_PRIORITY = 0
PREFETCH_PRIORITY_BASE = 1
CopyKind = Literal["demand", "prefetch", "staging"]


class CopyOrder(NamedTuple):
    """A command to a backend: copy one expert's weights host -> device.

    ``slot`` is what the cache's ``reserve`` returned for it (a device buffer in the real backend,
    None in the simulator); None for a staging copy (the backend picks a staging buffer). (A
    named tuple: one is built per copy, and a frozen dataclass costs several times more.)
    """

    key: ExpertKey
    kind: CopyKind
    priority: int
    nbytes: float
    slot: Any = None


class CopySink(Protocol):
    """What a backend gives the controller: something that carries out copy orders."""

    def copy(self, order: CopyOrder) -> None: ...


@dataclass
class StepCounters:
    """What the controller counted since the last ``take_counters``; the step-record columns of
    ``sim.metrics`` with the same meanings (bytes are payload bytes). ``copy_stall_s`` is filled in
    by a backend that measures its waits (the real executor); the simulator books its own."""

    demand_bytes: float = 0.0
    prefetch_bytes: float = 0.0
    activation_bytes: float = 0.0       # host-run experts' outputs coming back (``count_activation_bytes``)
    wasted_prefetch_bytes: float = 0.0  # prefetched experts evicted before any use
    prefetches: int = 0                 # prefetch copies issued
    useful_prefetches: int = 0          # prefetched experts used before eviction
    demand_loads: int = 0               # needed experts copied on demand (into a slot or staging)
    staged_loads: int = 0               # of which into a staging buffer (not cached)
    hits: int = 0                       # needed experts resident when the layer routed
    misses: int = 0
    late_prefetches: int = 0            # misses already being copied
    host_runs: int = 0                  # misses the policy ran on the host (on_miss -> "host")
    copy_stall_s: float = 0.0           # time compute waited for copies (measured by a backend)

    @property
    def h2d_bytes(self) -> float:
        return self.demand_bytes + self.prefetch_bytes + self.activation_bytes

    def __add__(self, other: "StepCounters") -> "StepCounters":
        return StepCounters(*[getattr(self, name) + getattr(other, name) for name in _COUNTER_NAMES])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["h2d_bytes"] = self.h2d_bytes
        return d


_COUNTER_NAMES = tuple(f.name for f in fields(StepCounters))


class LayerAccess:
    """How ``begin_layer`` served one MoE layer's needed experts (expert ids, in routing order).

    ``ids``, ``counts``: every needed expert and its token count, in routing order (``tokens``: the
    same as a dict); ``hits``: resident (weights ready); ``late``: being copied (a prefetch), the
    backend waits; ``loads``: demand-loaded into a cache slot; ``staged``: demand-loaded into a
    staging buffer (not cached); ``host``: the policy runs them on the host; ``waiting``: late +
    loads + staged, in routing order; ``plan``: the policy's prefetch plan for this layer. (A
    slotted class: one is built per MoE layer per pass.)
    """

    __slots__ = ("layer", "ids", "counts", "hits", "late", "loads", "staged", "host", "waiting", "plan")

    def __init__(self, layer: int, ids: Sequence[int] = (), counts: Sequence[int] = ()):
        self.layer = layer
        self.ids, self.counts = ids, counts
        self.hits: list[int] = []
        self.late: list[int] = []
        self.loads: list[int] = []
        self.staged: list[int] = []
        self.host: list[int] = []
        self.waiting: list[int] = []
        self.plan: Plan = ()

    @property
    def tokens(self) -> dict[int, int]:
        """Each needed expert's token count, in routing order."""
        return dict(zip(self.ids, self.counts))

    @property
    def on_device(self) -> list[int]:
        """Experts that run on the device, in the order both backends compute them: resident ones
        first, then the ones being copied, in routing order."""
        return self.hits + self.waiting


class CacheController:
    """The offload protocol over ``cache`` (an ``ExpertCache``, or a subclass that owns buffers).

    ``expert_bytes``: bytes one expert copy moves. ``sink``: the backend's copy carrier.
    """

    def __init__(self, cache: ExpertCache, policy: PrefetchPolicy, expert_bytes: float, sink: CopySink):
        self.cache = cache
        self.policy = policy
        self.expert_bytes = expert_bytes
        self.sink = sink
        self.counters = StepCounters()
        self._taken = StepCounters()
        self._unused_prefetch: set[ExpertKey] = set()     # landed by a prefetch, not used yet
        self._prefetch_in_flight: set[ExpertKey] = set()  # prefetch copies not landed yet
        self.layer: Optional[int] = None                  # the layer between begin_layer and end_layer

    # ------------------------------------------------------------------ lifecycle
    def start(self, model, initial: Sequence[ExpertKey], seed: int = 0,
              host_crossover_tokens: Optional[int] = None, future=None) -> PolicyContext:
        """Reset the policy for a run whose cache already holds ``initial`` (in load order)."""
        cache = self.cache
        ctx = PolicyContext(model, cache.cache_scope, cache.slots_per_layer, cache.total_slots, tuple(initial),
                            seed, host_crossover_tokens)
        self.policy.reset(ctx)
        if future is not None:
            self.policy.set_future(future)
        elif self.policy.needs_future:
            raise ValueError(f"policy {self.policy.name} needs the future routing: pass future=...")
        return ctx

    # ------------------------------------------------------------------ the per-pass protocol
    def begin_step(self, info: StepInfo) -> Plan:
        """A pass begins: the policy's ``on_step_begin`` plan is carried out; returns the plan."""
        if self.layer is not None:
            raise RuntimeError("begin_step() inside a layer: call end_layer() first")
        plan = self.policy.on_step_begin(info, self.cache)
        if plan:
            self.execute(plan)
        return plan

    def begin_layer(self, step: int, layer: int, ids: Sequence[int], counts: Sequence[int],
                    predicted: Optional[Mapping[int, Sequence[int]]] = None) -> LayerAccess:
        """``layer``'s router chose ``ids`` (distinct, ascending; ``counts`` tokens each): the
        protocol of the module docstring. Returns how each needed expert is served."""
        if self.layer is not None:
            raise RuntimeError(f"begin_layer({layer}) while layer {self.layer} is open: call end_layer() first")
        cache, policy, c = self.cache, self.policy, self.counters
        keys = [(layer, e) for e in ids]
        cache.pinned = keys  # from here on, nothing this layer needs is evicted
        self.layer = layer
        plan = policy.on_routed(step, layer, ids, predicted, cache, counts)
        acc = LayerAccess(layer, ids, counts)
        resident, unused, hits = cache.resident, self._unused_prefetch, acc.hits
        for key, e, n in zip(keys, ids, counts):
            if key in resident:
                hits.append(e)
                if unused and key in unused:
                    unused.discard(key)
                    c.useful_prefetches += 1
            else:
                self._serve_miss(acc, key, e, n)
        c.hits += len(hits)
        if plan:  # prefetches queue behind this layer's demand loads, ordered just above
            self.execute(plan)
            acc.plan = tuple(plan)
        return acc

    def _serve_miss(self, acc: LayerAccess, key: ExpertKey, e: int, n: int) -> None:
        """A needed expert that is not resident: late prefetch, host run or demand load."""
        c = self.counters
        c.misses += 1
        if key in self.cache.in_flight:
            c.late_prefetches += 1
            acc.late.append(e)
            acc.waiting.append(e)
            if key in self._unused_prefetch or key in self._prefetch_in_flight:
                self._prefetch_in_flight.discard(key)
                c.useful_prefetches += 1
        elif self.policy.on_miss(acc.layer, e, n, self.cache) == "host":
            c.host_runs += 1
            acc.host.append(e)
        else:
            staged = self.demand_load(key)
            (acc.staged if staged else acc.loads).append(e)
            acc.waiting.append(e)

    def end_layer(self) -> None:
        """The layer's experts have run (or been issued): unpin them."""
        self.cache.unpin()
        self.layer = None

    def end_step(self, step: int) -> StepCounters:
        """The pass is done: ``policy.on_step_end``; returns (and resets) the pass's counters."""
        if self.layer is not None:
            raise RuntimeError("end_step() inside a layer: call end_layer() first")
        self.policy.on_step_end(step, self.cache)
        return self.take_counters()

    # ------------------------------------------------------------------ copies
    def demand_load(self, key: ExpertKey) -> bool:
        """Order a needed expert's copy at demand priority; True if it goes to a staging buffer
        (the policy named no victim), False if into a cache slot."""
        self.counters.demand_bytes += self.expert_bytes
        self.counters.demand_loads += 1
        slot = self._make_room(key)
        if slot is False:
            self.counters.staged_loads += 1
            self.sink.copy(CopyOrder(key, "staging", DEMAND_PRIORITY, self.expert_bytes))
            return True
        self.sink.copy(CopyOrder(key, "demand", DEMAND_PRIORITY, self.expert_bytes, slot))
        return False

    def prefetch(self, key: ExpertKey, priority: int = 0) -> bool:
        """Order a prefetch behind demand loads; False (nothing ordered) if ``key`` is resident or
        in flight already, or the pool is full and the policy names no victim."""
        cache = self.cache
        if key in cache.resident or key in cache.in_flight:
            return False
        slot = self._make_room(key)
        if slot is False:
            return False
        self.counters.prefetch_bytes += self.expert_bytes
        self.counters.prefetches += 1
        self._prefetch_in_flight.add(key)
        self.sink.copy(CopyOrder(key, "prefetch", PREFETCH_PRIORITY_BASE + int(priority), self.expert_bytes, slot))
        return True

    def execute(self, plan: Plan) -> None:
        """Carry out a policy plan."""
        for action in plan:
            if isinstance(action, Prefetch):
                self.prefetch((int(action.layer), int(action.expert)), action.priority)
            elif isinstance(action, RunOnHost):
                raise ValueError("RunOnHost is answered through on_miss(...) -> 'host', not planned ahead")
            else:
                raise TypeError(f"unknown plan action {action!r}")

    def landed(self, key: ExpertKey, kind: CopyKind) -> None:
        """A backend's copy into a slot has landed (call in completion order; not for staging)."""
        self.cache.land(key)
        if kind == "prefetch" and key in self._prefetch_in_flight:
            self._prefetch_in_flight.discard(key)
            self._unused_prefetch.add(key)
        self.policy.on_copy_done(key[0], key[1], self.cache)

    def count_activation_bytes(self, nbytes: float) -> None:
        """Host-run experts' outputs copied back to the device."""
        self.counters.activation_bytes += nbytes

    def _make_room(self, key: ExpertKey):
        """Reserve a slot for ``key`` (evicting the policy's victim if the pool is full) and return
        what the cache's ``reserve`` gave; False if the policy names no victim."""
        cache = self.cache
        if cache.free_slots(key[0]) <= 0:
            victim = self.policy.victim(key[0], key[1], cache)
            if victim is None:
                return False
            victim = (int(victim[0]), int(victim[1]))
            cache.evict(victim)
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self.counters.wasted_prefetch_bytes += self.expert_bytes
        return cache.reserve(key)

    # ------------------------------------------------------------------ counters
    def take_counters(self) -> StepCounters:
        """The counters since the last call, and start new ones."""
        out, self.counters = self.counters, StepCounters()
        self._taken = self._taken + out
        return out

    @property
    def totals(self) -> StepCounters:
        """Counters over the whole run so far."""
        return self._taken + self.counters
