"""Collectives over a group of GPUs as phases of concurrent transfers on a ``System``'s links.

What it models: NCCL-style ring collectives and an all-to-all as a sequence of *phases*; a phase is
a set of transfers issued at once, and the next phase starts when the slowest transfer of the
previous one has landed (each ring step needs its neighbour's chunk). Within a phase, transfers
share links max-min fairly with each other (and, in the SimPy fabric, with any other traffic):
``hw/network.py``. Every transfer pays its route latency once (no bandwidth consumed by it).

* ring all-reduce of ``nbytes`` (each GPU's buffer) among ``p`` GPUs: 2(p-1) phases, in each every
  GPU sends ``nbytes / p`` to its ring neighbour (reduce-scatter, then all-gather);
* ring all-gather with a result of ``nbytes`` (each GPU holds ``nbytes / p``) and ring
  reduce-scatter of ``nbytes`` (each GPU's input): p-1 phases of ``nbytes / p`` to the neighbour;
* all-to-all from a per-pair byte matrix (row = sender, column = receiver, in group order): one
  phase, every pair's bytes one flow; zero entries and the diagonal send nothing.

On one NVSwitch every GPU's uplink and downlink carry one ring flow per phase, so a ring all-reduce
takes ``2(p-1) * (latency_s + (nbytes/p) / bandwidth_bps)``, ``hw.parallel.ring_all_reduce_s``.

Units: bytes, seconds. ``bytes_moved`` counts each byte once per transfer (not per link crossed).

Hand checks: tests/test_collectives.py (ring all-reduce on 8xh200_nvswitch; uniform and
non-uniform all-to-all across 2x8xh100_ib; bytes moved = matrix sum off the diagonal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from workloads.validation import require

from .network import simulate_flows

TransferSpec = tuple[str, str, float]   # (src, dst, nbytes)


@dataclass(frozen=True)
class Collective:
    """A named collective: phases run one after another, each phase's transfers at once."""

    name: str
    group: tuple[str, ...]
    phases: tuple[tuple[TransferSpec, ...], ...]

    @property
    def bytes_moved(self) -> float:
        """Bytes sent by all transfers of all phases."""
        return float(sum(n for phase in self.phases for _, _, n in phase))


def _ring_phase(group: Sequence[str], chunk_bytes: float) -> tuple[TransferSpec, ...]:
    p = len(group)
    return tuple((group[i], group[(i + 1) % p], chunk_bytes) for i in range(p))


def _ring(name: str, group: Sequence[str], chunk_bytes: float, phases: int) -> Collective:
    group = tuple(group)
    require(len(set(group)) == len(group), f"{name}.group", group, "lists a GPU twice")
    steps = phases if len(group) > 1 else 0
    return Collective(name, group, tuple(_ring_phase(group, chunk_bytes) for _ in range(steps)))


def ring_all_reduce(group: Sequence[str], nbytes: float) -> Collective:
    """All-reduce of ``nbytes`` per GPU: 2(p-1) phases of ``nbytes / p`` to the ring neighbour."""
    p = len(group)
    return _ring("all_reduce", group, nbytes / p, 2 * (p - 1))


def ring_all_gather(group: Sequence[str], nbytes: float) -> Collective:
    """All-gather whose result is ``nbytes``: p-1 phases of ``nbytes / p`` to the neighbour."""
    p = len(group)
    return _ring("all_gather", group, nbytes / p, p - 1)


def ring_reduce_scatter(group: Sequence[str], nbytes: float) -> Collective:
    """Reduce-scatter of ``nbytes`` per GPU: p-1 phases of ``nbytes / p`` to the neighbour."""
    p = len(group)
    return _ring("reduce_scatter", group, nbytes / p, p - 1)


def all_to_all(group: Sequence[str], bytes_matrix) -> Collective:
    """One phase: ``bytes_matrix[i][j]`` bytes from ``group[i]`` to ``group[j]`` as one flow each;
    zero entries and the diagonal send nothing."""
    group = tuple(group)
    m = np.asarray(bytes_matrix, dtype=float)
    p = len(group)
    require(m.shape == (p, p), "all_to_all.bytes_matrix", m.shape, f"must be {p} x {p} (one row per sender)")
    require(bool(np.all(np.isfinite(m)) and np.all(m >= 0)), "all_to_all.bytes_matrix", "...",
            "entries must be finite and >= 0")
    phase = tuple((group[i], group[j], float(m[i, j])) for i in range(p) for j in range(p)
                  if i != j and m[i, j] > 0)
    return Collective("all_to_all", group, (phase,) if phase else ())


def phase_time_s(system, phase: Sequence[TransferSpec]) -> float:
    """Time for one phase's transfers issued together on an otherwise idle ``system``."""
    if not phase:
        return 0.0
    return float(simulate_flows(system, [(s, d, n, 0.0) for s, d, n in phase]).max())


def collective_time_s(system, collective: Collective) -> float:
    """Analytic time of ``collective`` on an otherwise idle ``system``: its phases' times summed
    (a ring's identical phases are solved once)."""
    times: dict[tuple, float] = {}
    for phase in collective.phases:
        if phase not in times:
            times[phase] = phase_time_s(system, phase)
    return float(sum(times[phase] for phase in collective.phases))
