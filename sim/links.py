"""The links of a ``System`` as a SimPy resource: transfers that share bandwidth max-min fairly.

What it models: every directed link of ``hw.system.System`` (host links, NVLink/NVSwitch ports,
NICs) with its ``bandwidth_bps``. ``LinkFabric.transfer(src, dst, nbytes)`` returns an event that
fires when the bytes have landed; transfers in flight at the same time share each link they cross
**max-min fairly** (``hw.network.max_min_fair_rates``), exactly as ``hw.network.simulate_flows``
computes it analytically (the same ``FlowSchedule`` does the bookkeeping). Latency: a transfer's
bytes enter the network after its route latency, which consumes no bandwidth (``hw/network.py``).

Events: one controller process owns the ``FlowSchedule``. On every flow start or end it advances
the remaining bytes, re-solves the rates and sleeps with ONE timeout until the next entry or
completion; a new transfer interrupts that sleep only if its bytes enter the network before the
timer would fire (at most one interrupt pending). So a transfer costs about three events (the
timeout at its entry, the one at its completion, its own landed event), fewer when flows start or
end together, never one per packet. Deterministic: flows are kept in issue order.

Units: bytes, bytes/s (``_bps``), seconds (``_s``). Counters: ``bytes_by_link``, ``busy_s_by_link``
(time a link carried any flow), by link id.

Hand checks: tests/test_network.py (overlap at half rate, event count per transfer),
tests/test_collectives.py (the SimPy collective equals ``hw.collectives.collective_time_s``).
"""

from __future__ import annotations

from typing import Sequence

import simpy

from hw.collectives import Collective
from hw.network import FlowSchedule, link_index
from hw.system import System


class LinkFabric:
    """All links of ``system`` in SimPy environment ``env``."""

    def __init__(self, env: simpy.Environment, system: System):
        self.env = env
        self.system = system
        self.link_ids, capacity_bps = link_index(system)
        self._index = {lid: i for i, lid in enumerate(self.link_ids)}
        self._schedule = FlowSchedule(capacity_bps, now_s=env.now)
        self._events: dict[int, tuple[simpy.Event, float]] = {}   # flow id -> (landed, nbytes)
        self._interrupt_pending = False
        self._sleeping = False
        self._wake_s = float("inf")   # when the controller's timer fires (inf: asleep until woken)
        self._controller = env.process(self._run())

    # ------------------------------------------------------------------ public
    def transfer(self, src: str, dst: str, nbytes: float) -> simpy.Event:
        """An event that fires (value ``nbytes``) when ``nbytes`` from ``src`` have landed at ``dst``."""
        done = self.env.event()
        route_ids = self.system.route(src, dst)
        if not route_ids:
            return done.succeed(nbytes)
        route = [self._index[lid] for lid in route_ids]
        latency_s = self.system.route_latency_s(src, dst)
        start_s = max(self.env.now, self._schedule.now_s)
        fid = self._schedule.add(route, nbytes, start_s, latency_s)
        self._events[fid] = (done, nbytes)
        self._wake(start_s + latency_s)
        return done

    def transfer_group(self, transfers: Sequence[tuple[str, str, float]]) -> simpy.Event:
        """An event that fires when every ``(src, dst, nbytes)`` of the group has landed."""
        return self.env.all_of([self.transfer(s, d, n) for s, d, n in transfers])

    def collective(self, collective: Collective) -> simpy.Event:
        """A process that runs ``collective``'s phases one after another, each phase's transfers at
        once (sharing the links with any other traffic); its value is the bytes moved."""
        return self.env.process(self._collective(collective))

    @property
    def bytes_by_link(self) -> dict[str, float]:
        self._sync()
        return dict(zip(self.link_ids, self._schedule.bytes_by_link.tolist()))

    @property
    def busy_s_by_link(self) -> dict[str, float]:
        self._sync()
        return dict(zip(self.link_ids, self._schedule.busy_s_by_link.tolist()))

    @property
    def rate_solves(self) -> int:
        """How often the rates were re-solved (once per batch of flow starts / ends)."""
        return self._schedule.solves

    # ------------------------------------------------------------------ controller
    def _collective(self, collective: Collective):
        for phase in collective.phases:
            if phase:
                yield self.transfer_group(phase)
        return collective.bytes_moved

    def _wake(self, enter_s: float) -> None:
        """Interrupt the controller's sleep if a flow enters before it would wake anyway."""
        if self._sleeping and not self._interrupt_pending and enter_s < self._wake_s:
            self._interrupt_pending = True
            self._controller.interrupt()

    def _sync(self) -> None:
        """Bring the counters up to now (no event fires between the controller's wake-ups)."""
        if self.env.now > self._schedule.now_s and (nxt := self._schedule.next_event_s()) is not None \
                and self.env.now < nxt:
            self._schedule.advance(self.env.now)

    def _run(self):
        target_s = self.env.now
        while True:
            # advance to the instant the timer aimed at (env.now may differ from it by rounding)
            for fid in self._schedule.advance(max(target_s, self._schedule.now_s)):
                done, nbytes = self._events.pop(fid)
                done.succeed(nbytes)
            nxt = self._schedule.next_event_s()
            wait = self.env.event() if nxt is None else self.env.timeout(max(nxt - self.env.now, 0.0))
            self._wake_s = float("inf") if nxt is None else nxt
            self._sleeping = True
            try:
                yield wait
                target_s = nxt
            except simpy.Interrupt:
                self._interrupt_pending = False
                target_s = self.env.now
            self._sleeping = False
