"""Schedulers: which requests each forward pass carries, and how many tokens each. Pure logic.

The serving loop (``sim.loop``) asks its scheduler once per pass, in simulated time (the SimPy
backend) or wall-clock time (the real executor); a scheduler never sees a backend. The seam::

    class Scheduler(Protocol):
        def done(self) -> bool
        def next_arrival_s(self) -> float | None          # when nothing runs: idle until then
        def next_pass(self, now_s) -> Pass | None          # None: nothing has arrived yet
        def complete(self, pass_, now_s, committed) -> list[RunningRequest]   # the pass is over

Schedulers register by name (``register_scheduler``) and are chosen by ``scheduler=NAME``
(``conf/scheduler/NAME.yaml``, ``SchedulerConfig``); ``build_scheduler(scenario, requests)`` builds
the scenario's. A new scheduler (the vLLM V1 token-budget scheduler of a later issue) is a class here
with ``@register_scheduler("name")`` and a YAML file: the loop and both backends need no change.

``continuous`` (``BatchScheduler``): when requests wait and fewer than ``workload.batch_size``
run, the next pass is a prefill of waiting requests (prefill first, as vLLM schedules; at most
``workload.max_prefill_tokens`` prompt tokens, at least one request); otherwise it is a decode
pass of every running request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Protocol, Sequence

from workloads.requests import Request
from workloads.registry import Registry


@dataclass
class RunningRequest:
    """A request being served: the next token position to feed and how many tokens it generated."""

    req: Request
    pos: int = 0
    generated: int = 0
    first_token_s: float = float("nan")


@dataclass
class Pass:
    """One forward pass: its phase and the requests in it."""

    phase: Literal["prefill", "decode"]
    batch: list[RunningRequest] = field(default_factory=list)


class Scheduler(Protocol):
    """The scheduler seam (module docstring)."""

    def done(self) -> bool: ...
    def next_arrival_s(self) -> Optional[float]: ...
    def next_pass(self, now_s: float) -> Optional[Pass]: ...
    def complete(self, p: Pass, now_s: float, committed: Optional[Mapping[int, int]] = None) -> list[RunningRequest]: ...


SCHEDULERS = Registry("scheduler.name", "scheduler")


def register_scheduler(name: str):
    """Class decorator: make a scheduler available as ``scheduler=name``; the class builds itself
    with ``from_scenario(scenario, requests)``."""
    return SCHEDULERS.register(name)


@dataclass(frozen=True)
class SchedulerConfig:
    """The ``scheduler`` node (``conf/scheduler/NAME.yaml``): which registered scheduler runs the passes."""

    name: str = "continuous"

    def validate(self, key: str = "scheduler") -> None:
        SCHEDULERS.get(self.name)


def build_scheduler(scenario, requests: Sequence[Request]) -> Scheduler:
    """The scenario's scheduler over ``requests``."""
    cfg = getattr(scenario, "scheduler", None) or SchedulerConfig()
    return SCHEDULERS.get(cfg.name).from_scenario(scenario, requests)


@register_scheduler("continuous")
class BatchScheduler:
    """Continuous batching, prefill first (module docstring)."""

    def __init__(self, requests: Sequence[Request], batch_size: int, max_prefill_tokens: int):
        self._pending = sorted(requests, key=lambda r: r.arrival_s)  # stable: ties keep the given order
        self._next = 0
        self._waiting: list[Request] = []
        self._running: list[RunningRequest] = []
        self.batch_size = batch_size
        self.max_prefill_tokens = max_prefill_tokens

    @classmethod
    def from_scenario(cls, scenario, requests: Sequence[Request]) -> "BatchScheduler":
        wl = scenario.workload
        return cls(requests, wl.batch_size, wl.max_prefill_tokens)

    def done(self) -> bool:
        return self._next >= len(self._pending) and not self._waiting and not self._running

    def next_arrival_s(self) -> Optional[float]:
        return self._pending[self._next].arrival_s if self._next < len(self._pending) else None

    def next_pass(self, now_s: float) -> Optional[Pass]:
        """The pass to run at ``now_s``; None when nothing has arrived yet (idle until next_arrival_s)."""
        while self._next < len(self._pending) and self._pending[self._next].arrival_s <= now_s:
            self._waiting.append(self._pending[self._next])
            self._next += 1
        if not self._waiting and not self._running:
            return None
        if self._waiting and len(self._running) < self.batch_size:
            batch: list[RunningRequest] = []
            tokens = 0
            while self._waiting and len(self._running) + len(batch) < self.batch_size:
                if batch and tokens + self._waiting[0].prompt_len > self.max_prefill_tokens:
                    break
                req = self._waiting.pop(0)
                tokens += req.prompt_len
                batch.append(RunningRequest(req))
            return Pass("prefill", batch)
        return Pass("decode", list(self._running))

    def complete(self, p: Pass, now_s: float, committed: Optional[Mapping[int, int]] = None) -> list[RunningRequest]:
        """Account for a finished pass; returns the requests that are now complete.

        ``committed``: tokens a decode pass committed per request id (speculative decoding: the
        accepted drafts plus one; the KV cache of the rejected ones is rolled back, so the next
        position to feed advances by the same count). Default: one token per request.
        """
        if p.phase == "prefill":
            for r in p.batch:
                r.first_token_s = now_s
                r.generated = 1
                r.pos = r.req.prompt_len
                self._running.append(r)
        else:
            for r in p.batch:
                n = 1 if committed is None else committed[r.req.request_id]
                if not 1 <= n <= r.req.output_len - r.generated:
                    raise ValueError(f"request {r.req.request_id}: {n} tokens committed with "
                                     f"{r.req.output_len - r.generated} left to generate")
                r.generated += n
                r.pos += n
        finished = [r for r in self._running if r.generated >= r.req.output_len]
        self._running = [r for r in self._running if r.generated < r.req.output_len]
        return finished
