"""GPU memory: the HBM budget left for experts, and the expert cache that lives in it.

Budget (bytes)::

    expert budget = HBM capacity - reserved (CUDA context) - non-expert weights
                    - KV cache (kv_cache_tokens * kv_bytes_per_token) - activation workspace

The activation workspace defaults to ``max_prefill_tokens * act_bytes * (6*H + 3*I_max)`` (hidden
states, residual, attention and FFN intermediates of the widest FFN for the largest prefill) plus
two expert-sized staging buffers, which hold experts that must run but find no cache slot (their
copy is not cached). ``ExpertCache`` tracks which experts occupy the remaining slots.

A dense model (``num_experts=0``) has no experts to cache: the plan has zero slots (the budget left
over is still reported) and only an explicit ``capacity_per_layer > 0`` is an error.

Tensor parallelism (``hw.tensor_parallel = p``): the budget is one GPU's. Pass
``tensor_parallel=p`` with the full model (or pass ``model.tensor_shard(p)`` and leave it at 1):
weights, KV cache and expert slots are then the shard's (each slot holds one expert's ``1/p``
slice; every GPU caches the same experts), the activation workspace is sized for the shard's
widest FFN slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from workloads.model import ModelSpec
from workloads.validation import ConfigError

from .policies.base import ExpertKey

STAGING_EXPERTS = 2
_NOTHING_PINNED: frozenset = frozenset()


@dataclass(frozen=True)
class MemoryBudget:
    """Where the GPU's memory goes, in bytes, and the expert slots that result."""

    capacity_bytes: float
    reserved_bytes: float
    non_expert_bytes: float
    kv_cache_bytes: float
    activation_bytes: float
    expert_budget_bytes: float
    cache_scope: Literal["per_layer", "global"]
    slots_per_layer: Optional[int]   # per_layer scope only
    total_slots: int
    tensor_parallel: int = 1         # the budget is one of this many GPUs' (each holds a shard)
    expert_slot_bytes: float = 0.0   # bytes one slot holds: the (shard's) expert_bytes


def default_activation_bytes(model: ModelSpec, max_prefill_tokens: int, tensor_parallel: int = 1) -> float:
    """Activation workspace of one GPU (see the module docstring); ``model`` is the full model or,
    with ``tensor_parallel=1``, a shard."""
    model = model.tensor_shard(tensor_parallel)
    widest = max(model.expert_intermediate_size, model.shared_intermediate_total, model.dense_intermediate_size)
    work = max_prefill_tokens * model.act_bytes_per_elem * (6 * model.hidden_size + 3 * widest)
    return work + STAGING_EXPERTS * model.expert_bytes


def plan_memory(model: ModelSpec, capacity_bytes: float, reserved_bytes: float, kv_cache_tokens: int,
                activation_bytes: float, cache_scope: str, capacity_per_layer: Optional[int],
                hw_name: str = "hw", tensor_parallel: int = 1) -> MemoryBudget:
    """Split one GPU's HBM and size the expert cache; raise a one-line ConfigError if it cannot fit.

    ``capacity_bytes``/``reserved_bytes`` are one GPU's; with ``tensor_parallel=p`` the GPU holds
    ``model.tensor_shard(p)`` (``kv_cache_tokens`` is still counted in tokens of the whole batch:
    each GPU caches its KV heads of every token).
    """
    p = tensor_parallel
    model = model.tensor_shard(p, "hw.tensor_parallel")
    kv = kv_cache_tokens * model.kv_bytes_per_token
    budget = capacity_bytes - reserved_bytes - model.non_expert_bytes - kv - activation_bytes
    gb = 1e9
    where = f"hw={hw_name}" if p == 1 else f"hw={hw_name} (per GPU, tensor_parallel={p})"
    weights = "non-expert weights" if model.num_experts else "weights"
    if budget < model.expert_bytes or budget < 0:
        need = f", less than one expert ({model.expert_bytes / gb:.3f} GB)" if model.num_experts else ""
        raise ConfigError(
            f"model={model.name} does not fit on {where}: HBM {capacity_bytes / gb:.1f} GB minus "
            f"reserved {reserved_bytes / gb:.1f} GB, {weights} {model.non_expert_bytes / gb:.2f} GB, "
            f"KV cache {kv / gb:.2f} GB and activations {activation_bytes / gb:.2f} GB leaves "
            f"{budget / gb:.2f} GB{need}; "
            f"lower workload.batch_size or the request lengths, or pick a larger GPU")
    L, E = model.num_moe_layers, model.num_experts
    if L == 0 or E == 0:  # a dense model: nothing to cache
        if capacity_per_layer:
            raise ConfigError(f"policy.prefetch.capacity_per_layer={capacity_per_layer} is invalid; "
                              f"model {model.name} is dense (no experts to cache), so 0 or unset")
        scope = "per_layer" if cache_scope == "per_layer" else "global"
        return MemoryBudget(capacity_bytes, reserved_bytes, model.non_expert_bytes, kv, activation_bytes,
                            budget, scope, 0 if scope == "per_layer" else None, 0, p, model.expert_bytes)
    fit_total = int(budget // model.expert_bytes)
    if capacity_per_layer is not None:
        if capacity_per_layer > E:
            raise ConfigError(f"policy.prefetch.capacity_per_layer={capacity_per_layer} is invalid; "
                              f"model {model.name} has {E} experts per layer, so at most {E}")
        need = capacity_per_layer * L
        if need > fit_total:
            raise ConfigError(
                f"policy.prefetch.capacity_per_layer={capacity_per_layer} needs "
                f"{need * model.expert_bytes / gb:.1f} GB of HBM for experts but {model.name} on {hw_name} "
                f"has {budget / gb:.1f} GB left for them; allowed: at most {fit_total // L} per layer")
        total = need
    else:
        total = min(fit_total, L * E)
    if cache_scope == "per_layer":
        per_layer = total // L
        if per_layer < 1:
            raise ConfigError(
                f"policy.prefetch.cache_scope=per_layer leaves no expert slot per layer for {model.name} "
                f"on {hw_name} ({fit_total} slots for {L} layers); use policy.prefetch.cache_scope=global")
        return MemoryBudget(capacity_bytes, reserved_bytes, model.non_expert_bytes, kv, activation_bytes,
                            budget, "per_layer", per_layer, per_layer * L, p, model.expert_bytes)
    return MemoryBudget(capacity_bytes, reserved_bytes, model.non_expert_bytes, kv, activation_bytes,
                        budget, "global", None, total, p, model.expert_bytes)


class ExpertCache:
    """Which experts occupy cache slots, which are being copied in, and which the running layer needs.

    Implements the ``CacheView`` the policies read. A slot is *reserved* from the moment a copy into
    it is issued (the expert is then in flight) until the expert is evicted.
    """

    def __init__(self, budget: MemoryBudget, moe_layers: tuple[int, ...]):
        self._init_pools(budget.cache_scope, budget.slots_per_layer, budget.total_slots, moe_layers)

    def _init_pools(self, cache_scope: str, slots_per_layer: Optional[int], total_slots: int,
                    moe_layers) -> None:
        self.moe_layers = tuple(moe_layers)
        self.cache_scope = cache_scope
        self.per_layer = cache_scope == "per_layer"
        self.slots_per_layer = slots_per_layer if self.per_layer else None
        self.total_slots = slots_per_layer * len(self.moe_layers) if self.per_layer else total_slots
        self.capacity = {layer: slots_per_layer for layer in self.moe_layers} if self.per_layer \
            else {-1: total_slots}
        self.used = {b: 0 for b in self.capacity}
        self.resident: set[ExpertKey] = set()
        self.in_flight: set[ExpertKey] = set()
        # Bumped whenever what ``can_evict`` answers may have grown (a landing, a new pin set): a
        # policy may remember "nothing evictable" for as long as it stays the same.
        self.generation = 0
        self._pinned: set[ExpertKey] = set()

    @property
    def pinned(self) -> set[ExpertKey]:
        """The experts the running layer needs (not evictable); replace it, never mutate it."""
        return self._pinned

    @pinned.setter
    def pinned(self, keys) -> None:
        """The running layer needs ``keys`` (any iterable): none may be evicted until the next pins."""
        self._pinned = set(keys)
        self.generation += 1

    def unpin(self) -> None:
        """The running layer is done: nothing is pinned."""
        self._pinned = _NOTHING_PINNED
        self.generation += 1

    def _bucket(self, layer: int) -> int:
        return layer if self.per_layer else -1

    # ---- CacheView
    def is_resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.resident

    def is_in_flight(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.in_flight

    def can_evict(self, layer: int, expert: int) -> bool:
        key = (layer, expert)
        return key in self.resident and key not in self._pinned

    def free_slots(self, layer: int) -> int:
        b = layer if self.per_layer else -1
        return self.capacity[b] - self.used[b]

    # ---- engine-side mutations
    def reserve(self, key: ExpertKey) -> None:
        b = key[0] if self.per_layer else -1
        if self.used[b] >= self.capacity[b]:
            raise RuntimeError(f"no free slot for expert {key}")
        self.used[b] += 1
        self.in_flight.add(key)

    def land(self, key: ExpertKey) -> None:
        self.in_flight.discard(key)
        self.resident.add(key)
        self.generation += 1

    def place(self, key: ExpertKey) -> None:
        """Make ``key`` resident without a copy (initial residency)."""
        self.reserve(key)
        self.land(key)

    def evict(self, key: ExpertKey) -> None:
        if key not in self.resident or key in self._pinned:
            raise RuntimeError(f"policy chose {key} as victim, but it is not evictable")
        self.resident.remove(key)
        self.used[key[0] if self.per_layer else -1] -= 1

    def initial_order(self, num_experts: int) -> list[ExpertKey]:
        """The experts an initial fill loads: lowest ids, layer by layer (round-robin over layers for
        a global pool), as many as the pools hold."""
        order: list[ExpertKey] = []
        if self.per_layer:
            for layer in self.moe_layers:
                order.extend((layer, e) for e in range(min(self.capacity[layer], num_experts)))
        else:
            slots = self.capacity[-1]
            for e in range(num_experts):
                for layer in self.moe_layers:
                    if len(order) < slots:
                        order.append((layer, e))
        return order

    def initial_fill(self, model: ModelSpec) -> list[ExpertKey]:
        """Make the ``initial_order`` experts resident without copies; returns them in load order."""
        order = self.initial_order(model.num_experts)
        for key in order:
            self.place(key)
        return order
