"""What the serving engine's host code costs beyond the ops: the executor's measured overheads.

A cost model (``hw.cost.CostModel``) times the operations of a forward pass. The six figures
here are not operations of the model but of the engine that runs it: what a copy costs the real
executor's compute stream besides waiting for it (paid once the copy has landed), its copy
thread's wake-up before a copy starts, the compute stream's resume after a copy it waited for,
how much slower an expert runs while the copy thread copies (``copy_contention``, a factor),
what a draft-model pass costs beyond its ops, and what a prefetch policy's decisions cost per MoE
layer beyond LRU's (``policy_overhead_s``: LRU's own are inside the measured layer and copy
overheads). An
ideal engine (the roofline's world) has none of them (``NO_OVERHEADS``); only configurations
driven by tables that ``moesim-profile`` measured carry real ones (``hw.table.TableOverheads``,
``Table.overheads``). The SimPy backend asks ``overheads_of(cost)``. Seconds throughout.
"""

from __future__ import annotations

from typing import Protocol

from workloads.model import ModelSpec

from .devices import LinkSpec


class ExecutorOverheads(Protocol):
    def copy_overhead_s(self, model: ModelSpec) -> float: ...
    def copy_launch_s(self, link: LinkSpec, engine_idle: bool) -> float: ...
    def copy_resume_s(self, link: LinkSpec) -> float: ...
    def copy_contention(self, model: ModelSpec, tokens: int, link: LinkSpec) -> float: ...
    def draft_pass_overhead_s(self, draft: ModelSpec) -> float: ...
    def policy_overhead_s(self, model: ModelSpec, policy: str) -> float: ...


class NoOverheads:
    """An ideal engine: a GPU's copy engine works beside the SMs (issuing ``cudaMemcpyAsync`` is
    host time that overlaps), a copy starts at its turn (the link's latency covers it), a stream
    waiting on an event resumes at once, a copy does not slow the kernels beside it (copy/compute
    contention for HBM bandwidth is not modelled), a drafter pass costs its kernels (their
    launches are in ``kernel_launch_s``; the engine's host time per pass is ``sim.pass_overhead_s``),
    and a prefetch policy's decisions cost the GPU nothing (the host makes them while kernels run)."""

    def copy_overhead_s(self, model: ModelSpec) -> float:
        return 0.0

    def copy_launch_s(self, link: LinkSpec, engine_idle: bool) -> float:
        return 0.0

    def copy_resume_s(self, link: LinkSpec) -> float:
        return 0.0

    def copy_contention(self, model: ModelSpec, tokens: int, link: LinkSpec) -> float:
        return 1.0

    def draft_pass_overhead_s(self, draft: ModelSpec) -> float:
        return 0.0

    def policy_overhead_s(self, model: ModelSpec, policy: str) -> float:
        return 0.0


NO_OVERHEADS = NoOverheads()


def overheads_of(cost) -> ExecutorOverheads:
    """The overheads a cost model carries (a measured ``Table`` and what wraps one), else none."""
    return getattr(cost, "overheads", None) or NO_OVERHEADS
