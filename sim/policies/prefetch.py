"""Expert caching and prefetching policies (``policy/prefetch=NAME``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence

from .base import NO_PLAN, CacheView, ExpertKey, Plan, PolicyContext, PrefetchPolicy, register_prefetch


@register_prefetch("lru")
class LRU(PrefetchPolicy):
    """On-demand loading with least-recently-used eviction (mixtral-offloading).

    Recency is kept per pool: one list per MoE layer (``cache_scope=per_layer``) or one for the
    whole model (``global``). An access is a layer routing a token to the expert; an expert that
    was just copied in counts as accessed at the moment its copy landed. Experts resident at the
    start are ordered by load order (first loaded = least recent).
    """

    def reset(self, ctx: PolicyContext) -> None:
        super().reset(ctx)
        self._per_layer = ctx.cache_scope == "per_layer"
        self._recency: dict[int, OrderedDict[ExpertKey, None]] = {}
        for key in ctx.initial_resident:
            self._pool(key[0])[key] = None

    def _pool(self, layer: int) -> OrderedDict:
        bucket = layer if self._per_layer else -1
        pool = self._recency.get(bucket)
        if pool is None:
            pool = self._recency[bucket] = OrderedDict()
        return pool

    def on_routed(self, step: int, layer: int, experts: Sequence[int],
                  predicted: Optional[Mapping[int, Sequence[int]]], cache: CacheView) -> Plan:
        pool = self._pool(layer)
        for e in experts:
            key = (layer, e)
            if key in pool:
                pool.move_to_end(key)
        return NO_PLAN

    def on_copy_done(self, layer: int, expert: int, cache: CacheView) -> None:
        pool = self._pool(layer)
        pool[(layer, expert)] = None
        pool.move_to_end((layer, expert))

    def victim(self, layer: int, incoming: int, cache: CacheView) -> Optional[ExpertKey]:
        pool = self._pool(layer)
        for key in pool:
            if cache.can_evict(*key):
                del pool[key]
                return key
        return None
