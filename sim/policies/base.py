"""The seam between engines and policies: what a policy is told, what it is asked, what it answers.

Policies are pure decision logic: no simpy, no torch, no clock of their own. An engine (the SimPy
simulator, later the PyTorch executor) owns the expert cache and the copy machinery; it tells the
policy what happened and asks it what to do. The same policy object runs unchanged in either engine.

Layers are absolute layer indices (``model.moe_layers``), experts are ids ``0 .. num_experts-1``;
an ``ExpertKey`` is ``(layer, expert)``.

Lifecycle, per engine run::

    reset(ctx)
    for each forward pass (a "step"):
        plan = on_step_begin(info, cache)                  # info: StepInfo (step, phase, requests)
        for each MoE layer, once its router has run:
            plan = on_routed(step, layer, experts, predicted, cache, counts=...)
            for each needed expert that is neither resident nor being copied:
                on_miss(layer, expert, tokens, cache) -> "load" | "host"
            # a load that finds no free slot asks
            victim(layer, incoming, cache) -> ExpertKey | None
        on_copy_done(layer, expert, cache)                 # whenever a copy into a cache slot lands
        on_step_end(step, cache)

Knowledge a policy may use: what it was told (routing so far, predictions the trace or a predictor
supplies, copies landed). Policies that model a predictor with known accuracy, or that are bounds
(``needs_future = True``), additionally get a ``FutureRouting`` through ``set_future``: the routing
of the current pass, and of the passes after it as scheduled in a first run of the same scenario.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Protocol, Sequence, Union

from workloads.model import ModelSpec
from workloads.registry import Registry
from workloads.validation import require

ExpertKey = tuple[int, int]


@dataclass(frozen=True)
class Prefetch:
    """Start copying ``expert`` of ``layer`` into the cache; lower ``priority`` goes first."""

    layer: int
    expert: int
    priority: int = 0


@dataclass(frozen=True)
class RunOnHost:
    """Run ``expert`` of ``layer`` on the host CPU for this step instead of copying it."""

    layer: int
    expert: int


Action = Union[Prefetch, RunOnHost]
Plan = Sequence[Action]
NO_PLAN: Plan = ()


class CacheView(Protocol):
    """Read-only view of the engine's expert cache."""

    def is_resident(self, layer: int, expert: int) -> bool: ...
    def is_in_flight(self, layer: int, expert: int) -> bool: ...
    def can_evict(self, layer: int, expert: int) -> bool:
        """Resident, not being copied, and not needed by the layer running now."""
    def free_slots(self, layer: int) -> int:
        """Unreserved slots in the pool that ``layer``'s experts live in."""

    generation: int
    """Changes whenever ``can_evict`` may answer True where it answered False (a copy landed, the
    running layer's pins changed); a policy may remember "no victim" while it stays the same."""


@dataclass(frozen=True)
class StepInfo:
    """A forward pass about to run: its index, phase and the requests (ids) in it."""

    step: int
    phase: Literal["prefill", "decode"]
    request_ids: tuple[int, ...]
    tokens: int
    finished: tuple[int, ...] = ()   # requests that completed since the previous pass


class FutureRouting(Protocol):
    """Routing known ahead of time (oracle-style policies only)."""

    def experts(self, step: int, layer: int) -> Sequence[int]:
        """Distinct experts MoE ``layer`` needs in pass ``step`` (ascending; empty past the end)."""
    def next_use(self, layer: int, expert: int, after_step: int) -> float:
        """First pass index > ``after_step`` in which ``layer`` needs ``expert`` (inf if never)."""
    @property
    def num_steps(self) -> int: ...


@dataclass(frozen=True)
class PolicyContext:
    """What a policy knows before the run starts.

    cache_scope: ``per_layer`` (each MoE layer has ``slots_per_layer`` slots of its own) or
    ``global`` (one pool of ``total_slots`` shared by all layers).
    initial_resident: the experts resident at t=0, in the order they were loaded.
    """

    model: ModelSpec
    cache_scope: Literal["per_layer", "global"]
    slots_per_layer: Optional[int]
    total_slots: int
    initial_resident: tuple[ExpertKey, ...]
    seed: int = 0
    # Token count below which an expert runs faster on the host CPU than it can be copied and run
    # on the GPU (from the cost model, as Fiddler profiles it); None = never.
    host_crossover_tokens: Optional[int] = None


@dataclass(frozen=True)
class PrefetchConfig:
    """The ``policy.prefetch`` node: which policy, and how big the expert cache is."""

    name: str = "lru"
    capacity_per_layer: Optional[int] = None  # experts cached per MoE layer; null = HBM budget
    cache_scope: Literal["per_layer", "global"] = "per_layer"

    def validate(self, key: str = "policy.prefetch") -> None:
        if self.capacity_per_layer is not None:
            require(self.capacity_per_layer >= 1, f"{key}.capacity_per_layer",
                    self.capacity_per_layer, "must be >= 1 (or null for whatever the HBM budget allows)")


class PrefetchPolicy:
    """Base class: on-demand loading, no prefetch, no eviction preference. Subclasses override.

    Class attributes an engine reads: ``needs_future`` (call ``set_future`` before the run),
    ``uses_predictions`` (pass the trace's ``predicted_experts`` to ``on_routed``).
    """

    name: str = "base"
    Config: type = PrefetchConfig
    needs_future: bool = False
    uses_predictions: bool = False
    substitutes: bool = False   # True: the engine runs substitute(...)'s experts instead of the router's

    def __init__(self, config: PrefetchConfig):
        self.config = config
        self.ctx: Optional[PolicyContext] = None
        self.future: Optional[FutureRouting] = None

    def reset(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def set_future(self, future: FutureRouting) -> None:
        self.future = future

    def on_step_begin(self, info: StepInfo, cache: CacheView) -> Plan:
        return NO_PLAN

    def on_routed(self, step: int, layer: int, experts: Sequence[int],
                  predicted: Optional[Mapping[int, Sequence[int]]], cache: CacheView,
                  counts: Optional[Sequence[int]] = None) -> Plan:
        """``experts``: distinct experts this pass needs at ``layer`` (ascending); ``counts``: tokens
        routed to each; ``predicted``: {later layer: experts predicted for it} when known."""
        return NO_PLAN

    def on_miss(self, layer: int, expert: int, tokens: int, cache: CacheView) -> Literal["load", "host"]:
        """Where a needed expert that is neither resident nor on its way runs: copy it in, or host CPU."""
        return "load"

    def victim(self, layer: int, incoming: int, cache: CacheView) -> Optional[ExpertKey]:
        """The resident expert to evict so ``(layer, incoming)`` can be cached; None = do not cache it."""
        return None

    def on_copy_done(self, layer: int, expert: int, cache: CacheView) -> None:
        pass

    def on_step_end(self, step: int, cache: CacheView) -> None:
        pass

    def substitute(self, step: int, layer: int, experts: Sequence[int],
                   counts: Sequence[int]) -> tuple[list[int], list[int]]:
        """Lossy policies only: the experts (and tokens per expert) the layer really runs."""
        return list(experts), list(counts)

    def report(self) -> dict:
        """Policy-specific figures for summary.json (keys start with ``policy_``)."""
        return {}


PREFETCH_POLICIES = Registry("policy.prefetch.name", "prefetch policy")


def register_prefetch(name: str):
    """Class decorator: make a prefetch policy selectable as ``policy/prefetch=NAME``."""
    return PREFETCH_POLICIES.register(name)


def prefetch_policy_class(name: str) -> type[PrefetchPolicy]:
    from . import prefetch  # noqa: F401  (registers the built-in policies)

    return PREFETCH_POLICIES.get(name)
