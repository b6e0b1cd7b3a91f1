"""The SimPy copy engine / host CPU queue (``sim.engine.PriorityServer``) by hand: one job at a
time, lowest priority first, FIFO within a priority, non-preemptive, one event per job."""

from __future__ import annotations

import simpy

from sim.engine import PriorityServer


def _run(jobs, launch=None):
    """jobs: (submit_s, nbytes, priority, name); duration = nbytes seconds. Returns (ends, order, events)."""
    env = simpy.Environment()
    ends, order = {}, []
    server = PriorityServer(env, None, "test", None, duration_s=lambda n: float(n), launch_s=launch,
                            on_done=order.append)

    def submit(at_s, nbytes, prio, name):
        yield env.timeout(at_s)
        yield server.submit(nbytes, prio, name)   # the job is the event of its end
        ends[name] = env.now

    for j in jobs:
        env.process(submit(*j))
    eid0 = len(jobs) * 3   # each submitter: process start, its timeout, its end
    env.run()
    return ends, order, next(env._eid) - eid0


def test_a_demand_copy_overtakes_queued_prefetches_but_not_the_running_one():
    # A (prefetch, 10 s) starts at 0; B and C (prefetches) queue; D (demand) arrives at 1 and runs
    # right after A; then C (priority 1, before B's 2), then B.
    ends, order, events = _run([(0, 10, 1, "A"), (0.5, 5, 2, "B"), (0.5, 3, 1, "C"), (1, 2, 0, "D")])
    assert order == ["A", "D", "C", "B"]
    assert ends == {"A": 10.0, "D": 12.0, "C": 15.0, "B": 20.0}
    assert events == 4   # one per job, its end: even B and C, waited on before their start was fixed


def test_demand_copies_are_fifo_and_the_launch_delay_follows_idleness():
    # idle server: a job waits launch(True) = 0.5 s before it starts; a queued one launch(False) = 0.1 s
    ends, order, _ = _run([(0, 2, 0, "A"), (1, 1, 0, "B"), (10, 1, 0, "C")],
                          launch=lambda idle: 0.5 if idle else 0.1)
    assert order == ["A", "B", "C"]
    assert ends["A"] == 0.5 + 2          # idle at 0
    assert ends["B"] == 2.5 + 0.1 + 1    # queued behind A
    assert ends["C"] == 10 + 0.5 + 1     # the server was idle again at 10
