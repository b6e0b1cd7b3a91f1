"""Expert caching and prefetching policies (``policy/prefetch=NAME``), REFERENCE.md section 3.

| name | what it decides |
|---|---|
| ``lru`` | on-demand loading, least-recently-used eviction (mixtral-offloading) |
| ``lfu`` | on-demand loading, least-frequently-used eviction (ties: least recent) |
| ``lookahead`` | gate-lookahead prefetch of the next layer's predicted experts, from the trace's ``predicted_experts`` (mixtral-offloading); LRU eviction |
| ``speculating`` | Speculating Experts: a next-layer predictor of given accuracy (an accuracy model, for traces without hidden states), optionally running the predicted experts (lossy); LRU eviction |
| ``transition`` | cross-layer transition table P(expert j at layer l+1 given expert i at l), fitted on another trace and/or online; LRU eviction |
| ``moe_infinity`` | MoE-Infinity: expert-activation matrix of the running requests matched by cosine similarity against past requests; prefetch a few layers ahead with priority by distance; eviction by predicted reuse, early layers protected |
| ``pregated`` | Pre-gated MoE: exact knowledge of the next layer's experts (the model is changed so that block l's gate picks block l+1's experts); LRU eviction |
| ``fiddler`` | Fiddler: a missed expert with fewer tokens than the host/GPU crossover runs on the host CPU; LRU eviction |
| ``oracle`` | the bound: Belady eviction (farthest next use, with bypass) and perfect prefetch of upcoming accesses whenever Belady allows |

All are engine-agnostic: they keep their own bookkeeping from what the engine tells them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence

import numpy as np

from workloads.validation import require

from .base import (NO_PLAN, CacheView, ExpertKey, Plan, PolicyContext, Prefetch, PrefetchConfig, PrefetchPolicy,
                   StepInfo, register_prefetch)


# ---------------------------------------------------------------------------------------------- LRU, LFU
@register_prefetch("lru")
class LRU(PrefetchPolicy):
    """On-demand loading with least-recently-used eviction (mixtral-offloading).

    Recency is kept per pool: one list per MoE layer (``cache_scope=per_layer``) or one for the
    whole model (``global``). An access is a layer routing a token to the expert; resident experts a
    layer needs become most recent in ascending id order, and an expert that was just copied in
    becomes most recent when its copy lands. Experts resident at the start are ordered by load order
    (first loaded = least recent). Subclasses that prefetch inherit this eviction.
    """

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        self._per_layer = ctx.cache_scope == "per_layer"
        self._recency: dict[int, OrderedDict[ExpertKey, None]] = {}
        self._protected: set[ExpertKey] = set()  # predicted for the next layer: not a victim
        # pool bucket -> the cache generation at which a scan of it found no victim. A layer that
        # needs more experts than its pool holds pins every slot, and each further miss would
        # rescan the whole pool for nothing (Qwen3-30B-A3B at batch 128: 54 M can_evict calls).
        self._no_victim: dict[int, int] = {}
        for key in ctx.initial_resident:
            self._pool(key[0])[key] = None

    def _pool(self, layer: int) -> OrderedDict:
        bucket = layer if self._per_layer else -1
        pool = self._recency.get(bucket)
        if pool is None:
            pool = self._recency[bucket] = OrderedDict()
        return pool

    def on_routed(self, step: int, layer: int, experts: Sequence[int],
                  predicted: Optional[Mapping[int, Sequence[int]]], cache: CacheView,
                  counts: Optional[Sequence[int]] = None) -> Plan:
        self._begin_layer(layer, experts)
        return NO_PLAN

    def _prefetch(self, layer: int, experts: Sequence[int], cache: CacheView, priority: int = 0) -> Plan:
        """Prefetch ``experts`` of ``layer``. They count as used now, and until the next layer routes
        none of them is chosen as a victim, so a prefetch never evicts an expert the same
        prediction needs (a prediction larger than the pool prefetches only what fits)."""
        self._touch(layer, experts)
        self._protected.update((layer, e) for e in experts)
        return _prefetch_plan(layer, experts, cache, priority)

    def _begin_layer(self, layer: int, experts: Sequence[int]) -> None:
        """A layer routed: its experts are used now, and the previous prediction's protection ends."""
        if self._protected:
            self._protected.clear()
            self._no_victim.clear()
        self._touch(layer, experts)

    def _touch(self, layer: int, experts: Sequence[int]) -> None:
        pool = self._recency.get(layer if self._per_layer else -1) or self._pool(layer)
        for e in experts:
            key = (layer, e)
            if key in pool:
                pool.move_to_end(key)

    def on_copy_done(self, layer: int, expert: int, cache: CacheView) -> None:
        pool = self._recency.get(layer if self._per_layer else -1) or self._pool(layer)
        key = (layer, expert)
        pool[key] = None
        pool.move_to_end(key)

    def victim(self, layer: int, incoming: int, cache: CacheView) -> Optional[ExpertKey]:
        bucket = layer if self._per_layer else -1
        generation = cache.generation
        if self._no_victim.get(bucket) == generation:
            return None   # nothing in the pool became evictable since the last fruitless scan
        pool = self._pool(layer)
        protected = self._protected
        for key in pool:
            if cache.can_evict(*key) and key not in protected:
                del pool[key]
                return key
        self._no_victim[bucket] = generation
        return None

    def _forget(self, key: ExpertKey) -> None:
        self._pool(key[0]).pop(key, None)


@register_prefetch("lfu")
class LFU(LRU):
    """On-demand loading with least-frequently-used eviction.

    Frequency of (layer, expert) = passes that needed it so far, counted when its layer routes
    (before any victim is chosen); the victim is the evictable expert of the pool with the lowest
    frequency, ties broken by least recent use (recency as in LRU).
    """

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        self._freq: dict[ExpertKey, int] = defaultdict(int)

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        for e in experts:
            self._freq[(layer, e)] += 1
        return super().on_routed(step, layer, experts, predicted, cache, counts)

    def victim(self, layer: int, incoming: int, cache: CacheView) -> Optional[ExpertKey]:
        pool = self._pool(layer)
        best, best_freq = None, math.inf
        for key in pool:  # least recent first, so the first minimum wins ties
            if cache.can_evict(*key):
                f = self._freq[key]
                if f < best_freq:
                    best, best_freq = key, f
        if best is not None:
            del pool[best]
        return best


# ---------------------------------------------------------------------------------------------- prefetchers
def _next_moe_layer(ctx: PolicyContext, layer: int) -> Optional[int]:
    idx = ctx.model.moe_layer_index[layer]
    layers = ctx.model.moe_layers
    return layers[idx + 1] if idx + 1 < len(layers) else None


def _prefetch_plan(layer: int, experts: Sequence[int], cache: CacheView, priority: int = 0) -> Plan:
    return tuple(Prefetch(layer, e, priority) for e in experts
                 if not cache.is_resident(layer, e) and not cache.is_in_flight(layer, e))


@register_prefetch("lookahead")
class GateLookahead(LRU):
    """Gate-lookahead prefetch (mixtral-offloading): after layer l routes, prefetch the experts that
    layer l+1's router picks from layer l's hidden state, as recorded in the trace's
    ``predicted_experts`` column (``moesim-capture --predict lookahead``). A wrong guess costs a
    wasted copy; the right expert is then loaded on demand. LRU eviction."""

    uses_predictions = True

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        self._begin_layer(layer, experts)
        if not predicted:
            return NO_PLAN
        plan: list = []
        for nxt, ids in predicted.items():
            plan.extend(self._prefetch(nxt, ids, cache))
        return tuple(plan)


@dataclass(frozen=True)
class SpeculatingConfig(PrefetchConfig):
    name: str = "speculating"
    accuracy: float = 0.8   # chance that a needed next-layer expert is among the predicted ones (assumed)
    lossy: bool = False     # run the predicted experts instead of the router's (no re-fetch)

    def validate(self, key: str = "policy.prefetch") -> None:
        super().validate(key)
        require(0.0 <= self.accuracy <= 1.0, f"{key}.accuracy", self.accuracy, "must be in [0, 1]")


@register_prefetch("speculating")
class SpeculatingExperts(LRU):
    """Speculating Experts (arXiv 2603.19289) as an accuracy model, for traces without hidden states.

    After layer l routes, the next MoE layer's experts are "predicted": each expert that layer will
    need is predicted correctly with probability ``accuracy``, otherwise replaced by a random expert
    it does not need; the predictions are prefetched (async, double-buffer style: they compete for
    cache slots under LRU). The first MoE layer has no predictor and loads on demand. With
    ``lossy=true`` the layer runs the predicted experts instead of the router's (the paper's
    speculative execution: nothing is re-fetched; token counts move with the substitution); the share
    of substituted experts is reported as ``policy_substituted_share``.
    """

    Config = SpeculatingConfig
    needs_future = True

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        self._rng = np.random.default_rng(ctx.seed + 0x5E)
        self._pending: dict[tuple[int, int], dict[int, int]] = {}  # (step, layer) -> true -> predicted
        self.substitutes = bool(self.config.lossy)
        self._predicted = self._correct = self._substituted = self._needed = 0

    def _predict(self, step: int, layer: int) -> dict[int, int]:
        true = list(self.future.experts(step, layer))
        E = self.ctx.model.num_experts
        mapping: dict[int, int] = {}
        taken = set(true)
        for e in true:
            if self._rng.random() < self.config.accuracy or len(taken) >= E:
                mapping[e] = e
            else:
                choices = [x for x in range(E) if x not in taken]
                x = int(choices[int(self._rng.integers(len(choices)))])
                taken.add(x)
                mapping[e] = x
        return mapping

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        self._begin_layer(layer, experts)
        nxt = _next_moe_layer(self.ctx, layer)
        if nxt is None:
            return NO_PLAN
        mapping = self._predict(step, nxt)
        self._pending[(step, nxt)] = mapping
        self._predicted += len(mapping)
        self._correct += sum(1 for a, b in mapping.items() if a == b)
        return self._prefetch(nxt, sorted(set(mapping.values())), cache)

    def substitute(self, step: int, layer: int, experts: Sequence[int],
                   counts: Sequence[int]) -> tuple[list[int], list[int]]:
        """Lossy mode: the experts the layer actually runs (predicted ones), with token counts."""
        mapping = self._pending.pop((step, layer), None)
        self._needed += len(experts)
        if mapping is None:
            return list(experts), list(counts)
        merged: dict[int, int] = defaultdict(int)
        for e, n in zip(experts, counts):
            target = mapping.get(e, e)
            self._substituted += target != e
            merged[target] += n
        ids = sorted(merged)
        return ids, [merged[e] for e in ids]

    def on_step_end(self, step, cache) -> None:
        for key in [k for k in self._pending if k[0] <= step]:
            del self._pending[key]

    def report(self) -> dict:
        out = {"policy_prediction_accuracy": self._correct / self._predicted if self._predicted else None}
        if self.config.lossy:
            out["policy_substituted_share"] = self._substituted / self._needed if self._needed else None
        return out


@register_prefetch("pregated")
class PreGated(LRU):
    """Pre-gated MoE: block l's gate selects block l+1's experts, so after layer l routes the next
    layer's experts are known exactly and prefetched. LRU eviction."""

    needs_future = True

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        self._begin_layer(layer, experts)
        nxt = _next_moe_layer(self.ctx, layer)
        if nxt is None:
            return NO_PLAN
        return self._prefetch(nxt, self.future.experts(step, nxt), cache)


@dataclass(frozen=True)
class TransitionConfig(PrefetchConfig):
    name: str = "transition"
    fit_path: Optional[str] = None      # a router trace (Parquet) of the same model to fit the table on
    online: bool = True                 # also learn from the run itself, pass by pass
    num_predict: Optional[int] = None   # experts prefetched per layer; null = as many as this layer needed

    def validate(self, key: str = "policy.prefetch") -> None:
        super().validate(key)
        if self.num_predict is not None:
            require(self.num_predict >= 1, f"{key}.num_predict", self.num_predict, "must be >= 1 or null")
        require(self.fit_path is not None or self.online, f"{key}.online", self.online,
                "with no fit_path the table can only be learnt online: set online=true or give fit_path")


@register_prefetch("transition")
class TransitionTable(LRU):
    """Cross-layer transition-table predictor (ExFlow-style affinity as a predictor).

    ``counts[m][i, j]`` = how often expert i at MoE layer m was followed by expert j at MoE layer
    m+1 (pairs over the experts a pass needed at the two layers), from the trace at ``fit_path``
    (token by token) and/or online. After layer m routes, score each expert j of layer m+1 by
    ``sum over i needed at m of counts[m][i, j]`` plus a small popularity prior, and prefetch the
    ``num_predict`` best. Works on any trace. LRU eviction.
    """

    Config = TransitionConfig

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        M, E = ctx.model.num_moe_layers, ctx.model.num_experts
        self._counts = np.zeros((max(M - 1, 0), E, E), dtype=np.float64)
        self._prev: Optional[tuple[int, Sequence[int]]] = None
        if self.config.fit_path:
            from workloads.trace import load_trace_requests

            for req in load_trace_requests(self.config.fit_path, ctx.model, on_ragged="truncate"):
                ex = req.experts.astype(np.int64)  # [T, M, K]
                for m in range(M - 1):
                    a, b = ex[:, m, :], ex[:, m + 1, :]
                    np.add.at(self._counts[m], (np.repeat(a, b.shape[1], axis=1), np.tile(b, (1, a.shape[1]))), 1)

    def on_step_begin(self, info: StepInfo, cache) -> Plan:
        self._prev = None
        return NO_PLAN

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        self._begin_layer(layer, experts)
        m = self.ctx.model.moe_layer_index[layer]
        if self.config.online and self._prev is not None and self._prev[0] == m - 1:
            prev = np.asarray(self._prev[1], dtype=np.int64)
            cur = np.asarray(experts, dtype=np.int64)
            self._counts[m - 1][np.ix_(prev, cur)] += 1
        self._prev = (m, experts)
        if m >= self._counts.shape[0]:
            return NO_PLAN
        table = self._counts[m]
        if not table.any():
            return NO_PLAN
        score = table[np.asarray(experts, dtype=np.int64)].sum(axis=0) + 1e-3 * table.sum(axis=0)
        n = self.config.num_predict or len(experts)
        best = np.argsort(-score, kind="stable")[:n]
        nxt = self.ctx.model.moe_layers[m + 1]
        return self._prefetch(nxt, sorted(int(e) for e in best if score[e] > 0), cache)


@dataclass(frozen=True)
class MoEInfinityConfig(PrefetchConfig):
    name: str = "moe_infinity"
    prefetch_layers: int = 3        # how many MoE layers ahead to prefetch
    num_predict: Optional[int] = None  # experts prefetched per layer; null = as many as this layer needed
    protect_layers: int = 1         # the first N MoE layers' experts are evicted last
    bank_size: int = 256            # past requests kept for matching (oldest dropped)
    fit_path: Optional[str] = None  # a trace of past requests to seed the bank

    def validate(self, key: str = "policy.prefetch") -> None:
        super().validate(key)
        for name in ("prefetch_layers", "bank_size"):
            require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "must be >= 1")
        require(self.protect_layers >= 0, f"{key}.protect_layers", self.protect_layers, "must be >= 0")
        if self.num_predict is not None:
            require(self.num_predict >= 1, f"{key}.num_predict", self.num_predict, "must be >= 1 or null")


@register_prefetch("moe_infinity")
class MoEInfinity(LRU):
    """MoE-Infinity: request-level expert-activation matrices (EAMs).

    Each running request has an EAM (MoE layers x experts, tokens routed so far). After layer l
    routes, the EAM summed over the pass's requests is matched by cosine similarity against a bank
    of finished requests' EAMs; the best match predicts the next ``prefetch_layers`` layers: their
    experts with non-zero predicted activation are prefetched, nearer layers first (priority scaled
    by 1 - (i - l)/L). Eviction: the evictable expert with the lowest predicted reuse
    ``(1 - d/L) * share in the matched EAM`` (d = layers until its layer comes again), experts of
    the first ``protect_layers`` MoE layers last; LRU among ties and before any match exists.
    """

    Config = MoEInfinityConfig

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        M, E = ctx.model.num_moe_layers, ctx.model.num_experts
        self._M, self._E = M, E
        self._eam: dict[int, np.ndarray] = {}
        self._bank: list[np.ndarray] = []
        self._running: tuple[int, ...] = ()
        self._match: Optional[np.ndarray] = None
        self._layer_now = 0
        if self.config.fit_path:
            from workloads.trace import load_trace_requests

            for req in load_trace_requests(self.config.fit_path, ctx.model, on_ragged="truncate"):
                eam = np.zeros((M, E))
                ex = req.experts.astype(np.int64)
                for m in range(M):
                    np.add.at(eam[m], ex[:, m, :].ravel(), 1)
                self._add_to_bank(eam)

    def _add_to_bank(self, eam: np.ndarray) -> None:
        norm = np.linalg.norm(eam)
        if norm > 0:
            self._bank.append(eam / norm)
            if len(self._bank) > self.config.bank_size:
                self._bank.pop(0)

    def on_step_begin(self, info: StepInfo, cache) -> Plan:
        for rid in info.finished:
            if rid in self._eam:
                self._add_to_bank(self._eam.pop(rid))  # finished: its EAM becomes history
        self._running = info.request_ids
        for rid in info.request_ids:
            if rid not in self._eam:
                self._eam[rid] = np.zeros((self._M, self._E))
        self._match = None
        return NO_PLAN

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        self._begin_layer(layer, experts)
        m = self.ctx.model.moe_layer_index[layer]
        self._layer_now = m
        n = counts if counts is not None else [1] * len(experts)
        share = np.zeros(self._E)
        share[np.asarray(experts, dtype=np.int64)] = np.asarray(n, dtype=np.float64) / max(len(self._running), 1)
        for rid in self._running:
            self._eam[rid][m] += share
        if not self._bank:
            return NO_PLAN
        current = sum(self._eam[rid] for rid in self._running)
        bank = np.stack(self._bank)
        sims = (bank * current).sum(axis=(1, 2)) / max(np.linalg.norm(current), 1e-12)
        self._match = bank[int(np.argmax(sims))]
        plan: list = []
        layers = self.ctx.model.moe_layers
        n = self.config.num_predict or len(experts)
        for d in range(1, self.config.prefetch_layers + 1):
            if m + d >= self._M:
                break
            row = self._match[m + d]
            ids = [int(e) for e in np.argsort(-row, kind="stable")[:n] if row[e] > 0]
            plan.extend(self._prefetch(layers[m + d], ids, cache, priority=d))
        return tuple(plan)

    def victim(self, layer: int, incoming: int, cache: CacheView) -> Optional[ExpertKey]:
        if self._match is None:
            return super().victim(layer, incoming, cache)
        pool = self._pool(layer)
        idx = self.ctx.model.moe_layer_index
        best, best_score = None, math.inf
        for key in pool:  # least recent first: ties go to the least recent
            if not cache.can_evict(*key) or key in self._protected:
                continue
            m = idx[key[0]]
            d = (m - self._layer_now) % self._M
            row = self._match[m]
            score = (1 - d / self._M) * (row[key[1]] / row.sum() if row.sum() > 0 else 0.0)
            if m < self.config.protect_layers:
                score += 1.0
            if score < best_score:
                best, best_score = key, score
        if best is not None:
            del pool[best]
        return best


@dataclass(frozen=True)
class FiddlerConfig(PrefetchConfig):
    name: str = "fiddler"
    crossover_tokens: Optional[int] = None  # run on the host below this many tokens; null = from the cost model

    def validate(self, key: str = "policy.prefetch") -> None:
        super().validate(key)
        if self.crossover_tokens is not None:
            require(self.crossover_tokens >= 0, f"{key}.crossover_tokens", self.crossover_tokens, "must be >= 0")


@register_prefetch("fiddler")
class Fiddler(LRU):
    """Fiddler: a needed expert that is not on the GPU runs on the host CPU (only activations cross
    PCIe) when its token count is below the crossover where copying it and running it on the GPU
    becomes faster; otherwise its weights are copied in (LRU eviction)."""

    Config = FiddlerConfig

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        c = self.config.crossover_tokens
        self._crossover = c if c is not None else (ctx.host_crossover_tokens if ctx.host_crossover_tokens is not None
                                                    else math.inf)

    def on_miss(self, layer: int, expert: int, tokens: int, cache: CacheView) -> Literal["load", "host"]:
        return "host" if tokens < self._crossover else "load"

    def report(self) -> dict:
        return {"policy_crossover_tokens": None if math.isinf(self._crossover) else int(self._crossover)}


# ---------------------------------------------------------------------------------------------- the bound
@register_prefetch("oracle")
class Oracle(PrefetchPolicy):
    """The bound: Belady's MIN (with bypass) for what is cached, plus perfect prefetch of its loads.

    Before the run, the policy replays the recorded future through MIN: at every layer-step (pass
    p, MoE layer l) the needed experts S are hits if cached; each missing expert, in ascending id
    order, takes a free slot, or replaces the cached expert not in S whose next use is farthest,
    unless its own next use is farther still (then it is streamed and not cached). That fixes
    every copy MIN makes and its victim, so the oracle never copies more than MIN. At run time the
    oracle issues each of MIN's cached loads as a prefetch as early as it safely can: when its
    slot is free or its victim is not needed again before the load's layer-step (looking one pass
    ahead), nearer layer-steps first. Demand loads follow MIN's decisions too. Pass-level timing
    decides whether a prefetch lands in time; its hit count is MIN's when copies are fast.
    """

    needs_future = True

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        self._layers = ctx.model.moe_layers
        self._index = ctx.model.moe_layer_index
        self._M = len(self._layers)
        self._per_layer = ctx.cache_scope == "per_layer"
        self._initial = ctx.initial_resident
        self._now = (0, -1)  # (pass, MoE-layer position) last routed
        self._decisions: dict[tuple[int, int], dict[int, Optional[ExpertKey]]] = {}
        self._pending: dict[ExpertKey, Optional[ExpertKey]] = {}

    def _bucket(self, layer: int) -> int:
        return layer if self._per_layer else -1

    def _time(self, step: float, layer: int) -> float:
        return step * self._M + self._index[layer] if step != math.inf else math.inf

    def set_future(self, future) -> None:
        super().set_future(future)
        self._plan_min()

    def _plan_min(self) -> None:
        """Replay MIN with bypass over the recorded future; remember each cached load's victim."""
        ctx, fut = self.ctx, self.future
        capacity = {}
        cached: dict[int, set] = defaultdict(set)
        for key in self._initial:
            cached[self._bucket(key[0])].add(key)
        for layer in self._layers:
            b = self._bucket(layer)
            capacity[b] = ctx.slots_per_layer if self._per_layer else ctx.total_slots
        for step in range(fut.num_steps):
            for layer in self._layers:
                needed = fut.experts(step, layer)
                if not needed:
                    continue
                b = self._bucket(layer)
                pool = cached[b]
                S = {(layer, e) for e in needed}
                loads: dict[int, Optional[ExpertKey]] = {}
                for e in needed:
                    key = (layer, e)
                    if key in pool:
                        continue
                    if len(pool) < capacity[b]:
                        pool.add(key)
                        loads[e] = None
                        continue
                    victim, t_victim = None, -1.0
                    for other in sorted(pool - S):
                        t = self._time(fut.next_use(other[0], other[1], step), other[0])
                        if t > t_victim:
                            victim, t_victim = other, t
                    if victim is None or self._time(fut.next_use(layer, e, step), layer) > t_victim:
                        continue  # streamed, not cached
                    pool.discard(victim)
                    pool.add(key)
                    loads[e] = victim
                if loads:
                    self._decisions[(step, layer)] = loads

    def _next_use_time(self, key: ExpertKey) -> float:
        """Layer-step of the next access of ``key`` from now on (the running layer counts)."""
        step, pos = self._now
        m = self._index[key[0]]
        after = step - 1 if m >= pos else step
        return self._time(self.future.next_use(key[0], key[1], after), key[0])

    def victim(self, layer: int, incoming: int, cache: CacheView) -> Optional[ExpertKey]:
        key = (layer, incoming)
        if key in self._pending:  # a prefetch of one of MIN's loads
            v = self._pending.pop(key)
            return v if v is not None and cache.can_evict(*v) else None
        loads = self._decisions.get((self._now[0], layer), {})
        if incoming not in loads:
            return None  # MIN streams it (or expected it cached): do not cache
        v = loads[incoming]
        return v if v is not None and cache.can_evict(*v) else None

    def _plan(self, cache: CacheView) -> Plan:
        step, pos = self._now
        now = step * self._M + pos
        plan: list = []
        for d in range(1, self._M + 1):
            s, m = (step, pos + d) if pos + d < self._M else (step + 1, pos + d - self._M)
            layer = self._layers[m]
            for e, v in self._decisions.get((s, layer), {}).items():
                key = (layer, e)
                if key in self._pending or cache.is_resident(layer, e) or cache.is_in_flight(layer, e):
                    continue
                if v is None:
                    if cache.free_slots(layer) <= len([k for k in self._pending if self._bucket(k[0]) ==
                                                       self._bucket(layer) and self._pending[k] is None]):
                        continue
                elif not cache.can_evict(*v) or self._next_use_time(v) < now + d:
                    continue  # the victim is still needed before this load's layer-step
                self._pending[key] = v
                plan.append(Prefetch(layer, e, priority=d))
        return tuple(plan)

    def on_step_begin(self, info: StepInfo, cache) -> Plan:
        self._now = (info.step, -1)
        return self._plan(cache)

    def on_routed(self, step, layer, experts, predicted, cache, counts=None) -> Plan:
        self._now = (step, self._index[layer])
        self._pending.clear()  # the engine has executed (or dropped) every earlier plan
        return self._plan(cache)
