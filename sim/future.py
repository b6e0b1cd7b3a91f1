"""Routing known ahead of time, for oracle-style policies (``PrefetchPolicy.needs_future``).

The engine records, in a first run of the same scenario, which requests each pass held and which
experts each MoE layer needed; ``RecordedFuture`` answers "what does pass s need at layer l" and
"when is (layer, expert) next needed". When arrivals are all at once the schedule of passes does not
depend on timing, so the second run sees exactly the recorded passes. With timed arrivals it may
not: the engine then overrides the recorded routing of each pass that differs with the actual one
(so the current pass is always exact) and says how many passes differed.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Sequence


class RecordedFuture:
    """Per-pass routing: ``passes[s][layer] -> ascending expert ids``."""

    def __init__(self, passes: list[dict[int, list[int]]], compositions: list[tuple[int, ...]]):
        self._passes = passes
        self.compositions = compositions
        self._uses: dict[tuple[int, int], list[int]] = defaultdict(list)
        for step, routing in enumerate(passes):
            for layer, experts in routing.items():
                for e in experts:
                    self._uses[(layer, e)].append(step)
        self.overridden = 0

    @property
    def num_steps(self) -> int:
        return len(self._passes)

    def experts(self, step: int, layer: int) -> Sequence[int]:
        if 0 <= step < len(self._passes):
            return self._passes[step].get(layer, ())
        return ()

    def next_use(self, layer: int, expert: int, after_step: int) -> float:
        uses = self._uses.get((layer, expert))
        if not uses:
            return math.inf
        i = bisect.bisect_right(uses, after_step)
        return uses[i] if i < len(uses) else math.inf

    def override(self, step: int, routing: dict[int, list[int]]) -> None:
        """Replace pass ``step``'s routing with what actually ran (and fix the next-use index)."""
        while step >= len(self._passes):
            self._passes.append({})
        old = self._passes[step]
        if old == routing:
            return
        self.overridden += 1
        for layer, experts in old.items():
            for e in experts:
                uses = self._uses[(layer, e)]
                i = bisect.bisect_left(uses, step)
                if i < len(uses) and uses[i] == step:
                    uses.pop(i)
        for layer, experts in routing.items():
            for e in experts:
                bisect.insort(self._uses[(layer, e)], step)
        self._passes[step] = routing
