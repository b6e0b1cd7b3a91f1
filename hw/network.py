"""Bandwidth sharing on a ``System``'s links: max-min fair rates and a fluid model of transfers.

What it models: concurrent transfers (flows) over the directed links of ``hw.system.System``. A
flow crosses the links of its route; every link direction has a capacity (``LinkSpec.bandwidth_bps``)
that the flows on it share **max-min fairly** (progressive filling / water-filling: all flows'
rates rise together; a link that fills up freezes the flows on it at its fair share; the rest keep
rising until every flow crosses a full link). Flows are fluid: bytes drain continuously at the
flow's rate, and rates are re-solved only when a flow enters the network or finishes.

Latency: a flow issued at ``start_s`` enters the network at ``start_s + latency`` (the summed
``latency_s`` of its route, ``System.route_latency_s``) and then drains its bytes at its share; the
latency consumes no bandwidth. So one transfer alone takes exactly ``System.transfer_s`` (latency
+ bytes / bottleneck bandwidth). A zero-byte flow finishes at ``start_s + latency``; a flow with an
empty route (``src == dst``) at ``start_s``.

Units: bytes, bytes/s (``_bps``), seconds (``_s``).

Hand checks: tests/test_network.py (two flows sharing a link overlap at half rate each; three
flows on two bottlenecks; one host->GPU copy equals ``System.transfer_s``), tests/test_collectives.py
(ring all-reduce on NVSwitch, uniform and non-uniform all-to-all across two nodes).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# A flow is done when what is left is at most this fraction of its bytes (float rounding of the
# drained bytes), or when finishing it would not move the clock.
_DONE_REL = 1e-12


def max_min_fair_rates(routes: Sequence[Sequence[int]], capacity_bps: Sequence[float]) -> np.ndarray:
    """Max-min fair rate (bytes/s) of each flow; ``routes[f]`` holds the link indices flow ``f``
    crosses (a link listed twice is used twice), ``capacity_bps[l]`` link ``l``'s capacity.

    Bottleneck order: the link with the smallest fair share ``remaining capacity / unfixed flows``
    fixes its unfixed flows at that share, whose rates are then taken off every link they cross;
    repeat. A flow with an empty route gets ``inf``.
    """
    cap = np.asarray(capacity_bps, dtype=float)
    rates = np.full(len(routes), np.inf)
    if not routes:
        return rates
    flow_of = np.concatenate([np.full(len(r), f, dtype=np.int64) for f, r in enumerate(routes)])
    link_of = np.concatenate([np.asarray(r, dtype=np.int64) for r in routes])
    unfixed = np.array([len(r) > 0 for r in routes])
    remaining = cap.copy()
    while unfixed.any():
        on = unfixed[flow_of]
        count = np.bincount(link_of[on], minlength=cap.size)
        share = np.full(cap.size, np.inf)
        used = count > 0
        share[used] = np.maximum(remaining[used], 0.0) / count[used]
        level = share.min()
        newly = np.zeros(len(routes), dtype=bool)
        newly[flow_of[on & (share[link_of] == level)]] = True
        rates[newly] = level
        np.subtract.at(remaining, link_of[newly[flow_of]], level)
        unfixed &= ~newly
    return rates


@dataclass
class _Flow:
    route: np.ndarray          # link indices
    nbytes: float
    remaining_bytes: float
    enter_s: float             # when its bytes enter the network (issue + route latency)
    rate_bps: float = 0.0


class FlowSchedule:
    """Fluid state of flows on links of capacities ``capacity_bps``, advanced event by event.

    ``add`` issues a flow; ``next_event_s`` says when the next flow enters or finishes; ``advance(t)``
    moves the clock to ``t`` (at most ``next_event_s()``), returns the ids of flows finished at ``t``
    (in id order) and re-solves the rates if any flow entered or finished. Deterministic: flows are
    kept in id order, pending entries in (time, id) order.
    """

    def __init__(self, capacity_bps: Sequence[float], now_s: float = 0.0):
        self.capacity_bps = np.asarray(capacity_bps, dtype=float)
        self.now_s = float(now_s)
        self.flows: dict[int, _Flow] = {}
        self.finish_s: dict[int, float] = {}
        self.bytes_by_link = np.zeros(self.capacity_bps.size)
        self.busy_s_by_link = np.zeros(self.capacity_bps.size)
        self.solves = 0
        self._pending: list[tuple[float, int]] = []
        self._active: list[int] = []
        self._next_id = 0

    def add(self, route: Sequence[int], nbytes: float, start_s: float, latency_s: float = 0.0) -> int:
        """Issue a flow of ``nbytes`` at ``start_s`` (>= now) over links ``route``; returns its id."""
        if start_s < self.now_s:
            raise ValueError(f"flow start_s={start_s} is before the schedule's clock {self.now_s}")
        fid = self._next_id
        self._next_id += 1
        enter_s = start_s + latency_s
        self.flows[fid] = _Flow(np.asarray(route, dtype=np.int64), float(nbytes), float(nbytes), enter_s)
        heapq.heappush(self._pending, (enter_s, fid))
        return fid

    def next_event_s(self) -> Optional[float]:
        """When the next flow enters the network or finishes at current rates; None when idle."""
        times = [self._pending[0][0]] if self._pending else []
        for fid in self._active:
            f = self.flows[fid]
            times.append(self.now_s + f.remaining_bytes / f.rate_bps if f.rate_bps > 0 else np.inf)
        return min(times) if times else None

    def advance(self, t_s: float) -> list[int]:
        """Move the clock to ``t_s``; returns the flows finished at ``t_s``."""
        t_s = max(t_s, self.now_s)   # never backwards (a caller's clock may lag by rounding)
        self._drain(t_s - self.now_s)
        self.now_s = t_s
        entered = self._enter_due()
        done = self._finish_done()
        if entered or done:
            self._solve()
        return done

    @property
    def idle(self) -> bool:
        return not self._active and not self._pending

    def _drain(self, dt_s: float) -> None:
        if dt_s <= 0 or not self._active:
            return
        busy = np.zeros(self.capacity_bps.size, dtype=bool)
        for fid in self._active:
            f = self.flows[fid]
            moved = min(f.rate_bps * dt_s, f.remaining_bytes)
            f.remaining_bytes -= moved
            np.add.at(self.bytes_by_link, f.route, moved)
            busy[f.route] |= f.rate_bps > 0
        self.busy_s_by_link[busy] += dt_s

    def _enter_due(self) -> bool:
        entered = False
        while self._pending and self._pending[0][0] <= self.now_s:
            _, fid = heapq.heappop(self._pending)
            self._active.append(fid)
            entered = True
        if entered:
            self._active.sort()
        return entered

    def _is_done(self, f: _Flow) -> bool:
        if f.remaining_bytes <= _DONE_REL * f.nbytes or f.route.size == 0:
            return True
        return f.rate_bps > 0 and self.now_s + f.remaining_bytes / f.rate_bps == self.now_s

    def _finish_done(self) -> list[int]:
        done = [fid for fid in self._active if self._is_done(self.flows[fid])]
        for fid in done:
            f = self.flows.pop(fid)
            np.add.at(self.bytes_by_link, f.route, f.remaining_bytes)   # rounding leftovers
            self.finish_s[fid] = self.now_s
        if done:
            gone = set(done)
            self._active = [fid for fid in self._active if fid not in gone]
        return done

    def _solve(self) -> None:
        if not self._active:
            return
        rates = max_min_fair_rates([self.flows[fid].route for fid in self._active], self.capacity_bps)
        for fid, r in zip(self._active, rates):
            self.flows[fid].rate_bps = float(r)
        self.solves += 1


@dataclass(frozen=True)
class Transfer:
    """``nbytes`` from graph node ``src`` to ``dst``, issued at ``start_s``."""

    src: str
    dst: str
    nbytes: float
    start_s: float = 0.0


def link_index(system) -> tuple[list[str], np.ndarray]:
    """The system's link ids (graph edge order) and their capacities, aligned."""
    links = system.links()
    ids = list(links)
    return ids, np.array([links[i].bandwidth_bps for i in ids], dtype=float)


def simulate_flows(system, flows: Sequence[Transfer | tuple]) -> np.ndarray:
    """Finish time (s) of each transfer ``(src, dst, nbytes, start_s)`` sharing ``system``'s links
    max-min fairly (fluid; rates re-solved when a flow enters or finishes)."""
    ids, cap = link_index(system)
    index = {lid: i for i, lid in enumerate(ids)}
    sched = FlowSchedule(cap, now_s=min((Transfer(*f).start_s for f in flows), default=0.0))
    fids = []
    for f in flows:
        t = f if isinstance(f, Transfer) else Transfer(*f)
        route = [index[lid] for lid in system.route(t.src, t.dst)]
        latency_s = system.route_latency_s(t.src, t.dst) if route else 0.0
        fids.append(sched.add(route, t.nbytes, t.start_s, latency_s))
    while (t_s := sched.next_event_s()) is not None:
        sched.advance(t_s)
    return np.array([sched.finish_s[fid] for fid in fids])
