"""The real expert offload runtime: host store, device slot pool, asynchronous copies, policy driving.

What it models, piece by piece (the simulator's counterparts in brackets):

* ``HostStore`` [host memory]: every routed expert's weights, ``(layer, expert) -> tuple of
  tensors``. Each expert is packed into one contiguous byte buffer (tensors 64-byte aligned inside
  it, so a copy is one ``memcpy``/``cudaMemcpyAsync``), in pinned memory when the target device is
  CUDA. ``expert_bytes`` is the payload (the sum of the tensors' bytes), which is what the byte
  counters count and what ``ModelSpec.expert_bytes`` must equal for bytes to compare with the sim.
* ``DeviceSlotPool`` [``sim.memory.ExpertCache``]: a fixed set of preallocated device buffers
  ("slots"), one pool per MoE layer (``cache_scope=per_layer``) or one for all layers
  (``global``), plus ``staging`` buffers (2 by default, ``sim.memory.STAGING_EXPERTS``) for experts
  that must run but get no slot. It is the ``CacheView`` the policies read, with ExpertCache's
  meaning: a slot is *reserved* when a copy into it is issued (the expert is then *in flight*)
  until the expert is evicted; *resident* once the copy has landed; ``can_evict`` = resident and
  not pinned (pinned = needed by the layer running now).
* ``CopyEngine`` [``sim.engine.PriorityServer``]: the host->device direction of the link. One worker
  thread serves a priority queue: lowest priority value first (demand loads = 0, prefetches =
  1 + the plan's priority), FIFO within a priority, one copy at a time, non-preemptive.
  On CPU the worker does the copy itself (a ``memmove`` that releases the GIL) and can shape it to a
  link's speed: a copy of n bytes takes at least ``latency_s + n / bandwidth_bps`` (copied in
  chunks, the worker sleeping until each chunk's deadline, so the instantaneous rate is capped
  too). On CUDA the worker enqueues ``copy_(non_blocking=True)`` from pinned memory on a dedicated
  copy stream, records an event and waits for it before taking the next job (so the host-side
  priority order is the order the copy engine runs them); compute streams wait on the event.
* ``OffloadRuntime``: the facade the executor uses, the real backend's ``OffloadPort`` of the
  serving loop (``sim.loop``). The per-layer protocol and every counter are the simulator's own
  ``sim.cache_controller.CacheController`` (pin, ``policy.on_routed`` -> plan, hit / late
  prefetch / host run / demand load, victims, staging when the policy names no victim); the
  runtime is its ``CopySink``: it carries the controller's copy orders out into device slots and
  staging buffers, lands finished copies at its landing points, measures copy stall and keeps a
  record per copy (``CopyRecord``). It moves tensors; it never runs an expert.

Synchronous copies (``synchronous_copies=True``, ``CopyEngine(synchronous=True)``): no worker
thread. Copies queue as usual and are carried out on the main thread, in queue order (priority,
then FIFO), the next time the runtime lands copies (``poll``) or waits for one (``weights``,
``wait``, ``drain``). So every copy issued before a policy decision point has landed by it, in the
order the simulator's copy engine runs them when copies take no time (a link far faster than
compute): the cache decisions, and so every counter, cannot depend on thread timing. For tests
that compare the two engines' counters exactly; a wait that runs the copies counts as copy stall.

Threading (the policy objects are not thread-safe, and must see the same sequence of calls as in
the simulator): the copy worker only copies, timestamps the job, appends it to a completed queue
and sets the job's ``threading.Event``. Everything else happens on the thread that created the
runtime (the executor's main thread; other threads get a RuntimeError): ``poll()`` takes finished
copies in completion order, marks their slots landed and calls ``policy.on_copy_done``; it runs at
``begin_step``, ``begin_layer``, ``weights``, ``end_step`` and on demand. So a copy lands, from the
policy's point of view, at the first of those points after it finished (the simulator lands it at
the exact completion time); between two such points the cache view does not change under the
policy's feet.

CPU shaper accuracy, measured on this 2-core VM (``worker_priority="realtime"``, the default;
medians of 9-12 copies, ``end - start`` against ``n / bandwidth_bps``). By construction no copy
finishes before its deadline. The same buffers copied again and again: 256 KiB .. 64 MiB at
2 GB/s and 1 .. 16 MiB at 8 GB/s within +0.5% (+0-5 us), idle or while PyTorch computes on both
cores; 256 KiB at 8 GB/s (33 us) +20-50 us. Expert-sized copies from a cold host store (32-96
experts, as the executor sees them): mini_mixtral's 10.5 MiB and mini_qwen's 1.5 MiB experts at
4 GB/s within +0.1%, idle or computing; at 8 GB/s 1.1-1.6x, because one core cannot memmove
faster than ~5-7 GB/s from DRAM here: the cap is a ceiling, not a promise, so profile copies
through this engine (``moesim-profile``) rather than assuming ``bandwidth_bps``. Single outliers
(max of 9) reach 1.5-3.5x: VM noise. With ``worker_priority="normal"`` and compute running, a
copy waking from a pacing sleep waits for a CFS time slice: medians were 1.5-22x the cap (+0.3-3
ms a copy); realtime needs CAP_SYS_NICE (``CopyEngine.sched`` says what the worker got).

Staging: a staging buffer is busy from the moment a copy into it is issued until the executor
calls ``release(key)`` (after it issued that expert's compute) or ``end_layer()``. A staged load
that finds both buffers busy waits (on the main thread, not in the copy queue) and is issued at
demand priority when a buffer is released. The simulator models the same wait
(``sim.engine.SimCopies``).

CUDA specifics (written, not run here: this machine has no GPU): host buffers are pinned; every
slot and staging buffer carries a *fence*, an event recorded on the compute stream after the last
layer that used it (``end_layer``/``release``), and a copy into a buffer makes the copy stream
wait on its fence first, so a copy never overwrites weights a queued kernel still reads.
``weights()`` does not block the host on a copy; it makes the compute stream wait on the copy's
event, bracketed by two timing events whose distance is the copy stall (resolved at
``end_step``/``take_counters``). The link shaper is CPU-only.
"""

from __future__ import annotations

import collections
import ctypes
import heapq
import itertools
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import torch

from sim.cache_controller import (DEMAND_PRIORITY, CacheController, CopyKind, CopyOrder, LayerAccess,
                                  StepCounters)
from sim.memory import STAGING_EXPERTS, ExpertCache
from sim.policies.base import ExpertKey, Plan, PolicyContext, PrefetchPolicy, StepInfo
from workloads.validation import ConfigError

ALIGN_BYTES = 64
__all__ = ["HostStore", "DeviceSlotPool", "CopyEngine", "OffloadRuntime", "StepCounters", "LayerAccess",
           "CopyRecord", "CopyJob", "ExpertLayout"]


def _key(key: Sequence[int]) -> ExpertKey:
    layer, expert = key
    return int(layer), int(expert)


_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


WorkerPriority = Literal["realtime", "high", "normal"]


def _prepare_copy_thread(priority: WorkerPriority) -> str:
    """Make the calling (copy worker) thread behave more like a DMA engine; returns what it got.

    Linux only, best effort: timer slack 1 us (sleeps wake within ~1 us of their deadline instead
    of 50 us), and ``realtime`` = SCHED_FIFO priority 1 (it preempts compute threads the moment its
    sleep ends; needs CAP_SYS_NICE, else falls back), ``high`` = nice -10, ``normal`` = unchanged.
    Without it, on a machine whose cores are all busy computing, a copy waking from its pacing
    sleep waits for a CFS time slice: measured here, +0.3-3 ms per wake-up, copies 1.5-20x slower
    than the cap; with SCHED_FIFO they stay within 1% of it (see the module docstring).
    """
    if sys.platform != "linux":
        return "normal"
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK (ns), this thread only
    except (OSError, AttributeError):
        pass
    tid = threading.get_native_id()
    if priority == "realtime":
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
            return "realtime"
        except (OSError, AttributeError):
            priority = "high"
    if priority == "high":
        try:
            os.setpriority(os.PRIO_PROCESS, tid, -10)
            return "high"
        except (OSError, AttributeError):
            pass
    return "normal"


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The CPU copy worker's byte copy: libc ``memmove`` through ctypes, on this thread alone, with
    the GIL released. Not ``Tensor.copy_``: that wakes an OpenMP team in the worker (20-50 us after
    it was idle) whose helper threads would inherit the worker's SCHED_FIFO class and spin at that
    priority; and it is no faster for DRAM-sized copies (one thread: ~7 GB/s here, copy_ 6-7 GB/s).
    So the copy worker is one core's worth of "DMA engine"."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())


# ============================================================================================ CUDA seam
class _TorchCuda:
    """The CUDA primitives the runtime uses, in one place (tests substitute a recording fake)."""

    def __init__(self, device: torch.device):
        self.device = device

    def empty_device(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.uint8, device=self.device)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream: Any):
        return torch.cuda.stream(stream)

    def event(self, timing: bool = False) -> Any:
        return torch.cuda.Event(enable_timing=timing)

    def set_device(self) -> None:
        torch.cuda.set_device(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


# ============================================================================================ host store
@dataclass(frozen=True)
class ExpertLayout:
    """Where one expert's tensors sit inside its packed byte buffer (same for every expert)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]       # byte offset of each tensor, ALIGN_BYTES-aligned
    sizes: tuple[int, ...]         # bytes of each tensor
    span_bytes: int                # buffer length (payload + alignment padding, a multiple of ALIGN_BYTES)

    @staticmethod
    def of(tensors: Sequence[torch.Tensor]) -> "ExpertLayout":
        offsets, sizes, off = [], [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            offsets.append(off)
            sizes.append(nbytes)
            off += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return ExpertLayout(tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors),
                            tuple(offsets), tuple(sizes), max(off, ALIGN_BYTES))

    @property
    def payload_bytes(self) -> int:
        return sum(self.sizes)

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Typed tensors viewing a packed uint8 buffer ``flat`` (no copy)."""
        return tuple(flat[o:o + n].view(dt).view(shape)
                     for o, n, dt, shape in zip(self.offsets, self.sizes, self.dtypes, self.shapes))

    def pack(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors per expert, got {len(tensors)}")
        for view, t in zip(self.views(flat), tensors):
            if tuple(t.shape) != view.shape or t.dtype != view.dtype:
                raise ValueError(f"expert tensor {tuple(t.shape)} {t.dtype} does not match the layout "
                                 f"{tuple(view.shape)} {view.dtype}: every expert must have the same shapes")
            view.copy_(t.detach().to("cpu"))


class HostStore:
    """Every expert's weights in host memory: ``(layer, expert) -> tuple of tensors``.

    ``experts`` gives each expert's tensors (e.g. ``w_gate_up [2I, H], w_down [H, I]``); all experts
    must have the same shapes and dtypes. They are copied into one packed, aligned byte buffer per
    expert (``pin_memory=True``: page-locked, for asynchronous copies to a CUDA device; use
    ``HostStore.for_device``). ``tensors(key)`` returns views of the stored weights.
    """

    def __init__(self, experts: Mapping[ExpertKey, Sequence[torch.Tensor]], pin_memory: bool = False):
        if not experts:
            raise ValueError("HostStore needs at least one expert")
        items = sorted(((_key(k), tuple(v)) for k, v in experts.items()), key=lambda kv: kv[0])
        self.layout = ExpertLayout.of(items[0][1])
        self.pinned = bool(pin_memory)
        self._flat: dict[ExpertKey, torch.Tensor] = {}
        self._views: dict[ExpertKey, tuple[torch.Tensor, ...]] = {}
        for key, tensors in items:
            flat = torch.zeros(self.layout.span_bytes, dtype=torch.uint8, pin_memory=self.pinned)
            self.layout.pack(tensors, flat)
            self._flat[key] = flat
            self._views[key] = self.layout.views(flat)
        self.layers: tuple[int, ...] = tuple(sorted({k[0] for k in self._flat}))
        per_layer = {layer: sorted(e for (l2, e) in self._flat if l2 == layer) for layer in self.layers}
        E = len(per_layer[self.layers[0]])
        for layer, ids in per_layer.items():
            if ids != list(range(E)):
                raise ValueError(f"HostStore: layer {layer} has experts {ids[:8]}{'...' if len(ids) > 8 else ''}; "
                                 f"every layer must hold experts 0..{E - 1}")
        self.num_experts = E

    @classmethod
    def for_device(cls, experts: Mapping[ExpertKey, Sequence[torch.Tensor]], device: torch.device | str) -> "HostStore":
        """A store whose buffers are pinned when ``device`` is a CUDA device, plain otherwise."""
        return cls(experts, pin_memory=torch.device(device).type == "cuda")

    @classmethod
    def random(cls, layers: Iterable[int], num_experts: int, hidden_size: int, intermediate_size: int,
               dtype: torch.dtype = torch.float32, seed: int = 0, pin_memory: bool = False) -> "HostStore":
        """Random SwiGLU experts: ``w_gate_up [2I, H]``, ``w_down [H, I]`` (tests, profiling)."""
        g = torch.Generator().manual_seed(seed)
        experts = {}
        for layer in layers:
            for e in range(num_experts):
                experts[(layer, e)] = (
                    (torch.randn(2 * intermediate_size, hidden_size, generator=g) / hidden_size ** 0.5).to(dtype),
                    (torch.randn(hidden_size, intermediate_size, generator=g) / intermediate_size ** 0.5).to(dtype))
        return cls(experts, pin_memory=pin_memory)

    @property
    def expert_bytes(self) -> int:
        """Payload bytes of one expert (what a copy of it counts as)."""
        return self.layout.payload_bytes

    def keys(self) -> list[ExpertKey]:
        return list(self._flat)

    def __contains__(self, key) -> bool:
        return _key(key) in self._flat

    def __len__(self) -> int:
        return len(self._flat)

    def tensors(self, key: ExpertKey) -> tuple[torch.Tensor, ...]:
        """The expert's weights in host memory (views; do not write)."""
        return self._views[_key(key)]

    def flat(self, key: ExpertKey) -> torch.Tensor:
        """The expert's packed byte buffer (the source of its copies)."""
        return self._flat[_key(key)]


# ============================================================================================ slot pool
class DeviceSlotPool(ExpertCache):
    """Preallocated device buffers holding cached experts, and the ``CacheView`` over them.

    ``cache_scope=per_layer``: each MoE layer in ``moe_layers`` has ``slots_per_layer`` slots;
    ``global``: one pool of ``total_slots`` for all layers. ``staging`` extra buffers hold experts
    that must run but get no slot. The bookkeeping (``resident``, ``in_flight``, ``pinned``,
    ``used``), the CacheView answers and the initial fill order are inherited from
    ``sim.memory.ExpertCache``; this class adds the buffers and which slot each expert occupies.
    """

    def __init__(self, layout: ExpertLayout, moe_layers: Sequence[int], cache_scope: str = "per_layer",
                 slots_per_layer: Optional[int] = None, total_slots: Optional[int] = None,
                 device: torch.device | str = "cpu", staging: int = STAGING_EXPERTS,
                 _cuda: Optional[_TorchCuda] = None):
        self.layout = layout
        self.device = torch.device(device)
        if cache_scope not in ("per_layer", "global"):
            raise ConfigError(f"cache_scope={cache_scope!r} is invalid; allowed: per_layer, global")
        self.cache_scope = cache_scope
        if cache_scope == "per_layer":
            if slots_per_layer is None or slots_per_layer < 1:
                raise ConfigError(f"capacity_per_layer={slots_per_layer!r} is invalid; cache_scope=per_layer "
                                  f"needs an integer >= 1")
            self.slots_per_layer: Optional[int] = int(slots_per_layer)
            self.total_slots = int(slots_per_layer) * len(tuple(moe_layers))
        else:
            if total_slots is None or total_slots < 1:
                raise ConfigError(f"total_slots={total_slots!r} is invalid; cache_scope=global needs an integer >= 1")
            self.slots_per_layer = None
            self.total_slots = int(total_slots)
        self._init_pools(cache_scope, self.slots_per_layer, self.total_slots, moe_layers)
        if staging < 1:
            raise ConfigError(f"staging_buffers={staging!r} is invalid; must be >= 1")
        span = layout.span_bytes
        # zeros, not empty: touch every page now, so no timed copy pays for first-touch page faults
        alloc = (_cuda.empty_device if _cuda is not None
                 else (lambda shape: torch.zeros(shape, dtype=torch.uint8, device=self.device)))
        self._buffers = {b: alloc((n, span)) for b, n in self.capacity.items()}
        self._slot_views = {b: [layout.views(buf[i]) for i in range(buf.shape[0])] for b, buf in self._buffers.items()}
        self._free = {b: list(range(n)) for b, n in self.capacity.items()}  # heaps: lowest index first
        self._slot: dict[ExpertKey, int] = {}
        self.staging_buffers = alloc((staging, span))
        self.staging_views = [layout.views(self.staging_buffers[i]) for i in range(staging)]
        # CUDA only: per buffer, the compute-stream event after its last use (None = never used).
        self.fences: dict[tuple[int, int], Any] = {}
        self.staging_fences: list[Any] = [None] * staging

    def bucket(self, layer: int) -> int:
        return self._bucket(layer)

    # ---- engine-side mutations (main thread only)
    def reserve(self, key: ExpertKey) -> torch.Tensor:
        """Take a free slot for ``key`` (now in flight); returns the slot's byte buffer."""
        key = _key(key)
        if key in self._slot:
            raise RuntimeError(f"expert {key} already holds a slot")
        super().reserve(key)
        b = self._bucket(key[0])
        idx = heapq.heappop(self._free[b])
        self._slot[key] = idx
        return self._buffers[b][idx]

    def land(self, key: ExpertKey) -> None:
        super().land(_key(key))

    def evict(self, key: ExpertKey) -> None:
        key = _key(key)
        super().evict(key)
        heapq.heappush(self._free[self._bucket(key[0])], self._slot.pop(key))

    def place(self, key: ExpertKey, src: torch.Tensor) -> None:
        """Make ``key`` resident now by a synchronous copy of ``src`` (initial residency)."""
        self.reserve(key).copy_(src)
        self.land(key)

    def slot_id(self, key: ExpertKey) -> Optional[tuple[int, int]]:
        """(bucket, slot index) of a reserved expert, None if it holds no slot."""
        key = _key(key)
        idx = self._slot.get(key)
        return None if idx is None else (self._bucket(key[0]), idx)

    def buffer(self, key: ExpertKey) -> torch.Tensor:
        b, idx = self.slot_id(key)
        return self._buffers[b][idx]

    def views(self, key: ExpertKey) -> tuple[torch.Tensor, ...]:
        """Typed views of the expert's tensors in its slot."""
        sid = self.slot_id(key)
        if sid is None:
            raise KeyError(f"expert {_key(key)} holds no slot")
        return self._slot_views[sid[0]][sid[1]]


# ============================================================================================ copies
@dataclass(frozen=True)
class CopyRecord:
    """One finished host->device copy. Times are ``time.perf_counter()`` seconds."""

    layer: int
    expert: int
    kind: str            # demand | prefetch | staging
    priority: int        # queue priority (0 = demand; prefetches 1 + the plan's priority)
    bytes: int           # payload bytes (the expert's tensors)
    queued_at_s: float
    start_s: float
    end_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def span(self, t0_s: float, track: str = "copy host->gpu0") -> dict:
        """A Chrome-trace (Perfetto) complete event, labelled as the simulator labels its copies;
        ``t0_s``: the perf_counter time that becomes ts=0."""
        label = f"L{self.layer} E{self.expert} " + ("demand (staging)" if self.kind == "staging" else self.kind)
        return {"name": label, "cat": "copy", "ph": "X", "ts": (self.start_s - t0_s) * 1e6,
                "dur": (self.end_s - self.start_s) * 1e6, "pid": 1, "tid": track,
                "args": {"bytes": self.bytes, "priority": self.priority, "queued_us": (self.queued_at_s - t0_s) * 1e6}}


@dataclass(eq=False)
class CopyJob:
    """A copy of one expert into a device buffer; the handle ``demand_load``/``prefetch`` return.

    The worker thread writes ``start``/``end``/``error`` and then sets ``done``; the main thread
    reads them only after ``done`` is set.
    """

    key: ExpertKey
    kind: str
    priority: int
    nbytes: int
    src: Optional[torch.Tensor] = None
    dst: Optional[torch.Tensor] = None
    fence: Any = None                  # CUDA: event the copy stream waits on before writing dst
    staging_index: Optional[int] = None
    queued_at: float = math.nan
    start: float = math.nan
    end: float = math.nan
    seq: int = -1
    error: Optional[BaseException] = None
    cancelled: bool = False
    released: bool = False             # staging: the executor is done with the buffer
    cuda_event: Any = None             # CUDA: recorded on the copy stream after the copy
    done: threading.Event = field(default_factory=threading.Event)
    dispatched: threading.Event = field(default_factory=threading.Event)

    @property
    def submitted(self) -> bool:
        return self.seq >= 0

    def record(self) -> CopyRecord:
        return CopyRecord(self.key[0], self.key[1], self.kind, self.priority, self.nbytes,
                          self.queued_at, self.start, self.end)


class CopyEngine:
    """One copy direction served by a worker thread: lowest ``priority`` first, FIFO within a
    priority, one job at a time, non-preemptive (``sim.engine.CopyEngine``'s discipline).

    CPU: the worker copies; with ``bandwidth_bps`` a copy of n bytes takes at least
    ``latency_s + n / bandwidth_bps`` (chunks of ``chunk_bytes``, sleeping until each chunk's
    deadline; the last deadline is met by sleeping to within ``spin_s`` and then yielding in a
    loop, which releases the GIL). CUDA: the worker enqueues the copy on its own stream after the
    job's fence and waits for the copy's event before the next job; no shaping.
    The main thread calls ``take_completed()`` to get finished jobs in completion order.
    ``synchronous=True``: no worker thread; queued jobs run on the calling thread, in queue order,
    when ``run_pending()``, ``take_completed()`` or ``wait_idle()`` is called (``sched="inline"``).
    """

    def __init__(self, device: torch.device | str = "cpu", bandwidth_bps: Optional[float] = None,
                 latency_s: float = 0.0, chunk_bytes: Optional[int] = None, spin_s: float = 1.5e-4,
                 worker_priority: WorkerPriority = "realtime", name: str = "h2d copy",
                 _cuda: Optional[_TorchCuda] = None, synchronous: bool = False):
        self.device = torch.device(device)
        if worker_priority not in ("realtime", "high", "normal"):
            raise ConfigError(f"worker_priority={worker_priority!r} is invalid; allowed: realtime, high, normal")
        self.worker_priority = worker_priority
        self.sched = "normal"  # what the worker got (CPU): realtime | high | normal
        self.is_cuda = self.device.type == "cuda"
        if bandwidth_bps is not None and not bandwidth_bps > 0:
            raise ConfigError(f"bandwidth_bps={bandwidth_bps!r} is invalid; must be > 0 (or None: no cap)")
        if latency_s < 0:
            raise ConfigError(f"latency_s={latency_s!r} is invalid; must be >= 0")
        if self.is_cuda and (bandwidth_bps is not None or latency_s):
            raise ConfigError(f"bandwidth_bps={bandwidth_bps!r} is invalid on device={self.device}: the link "
                              f"shaper is CPU-only (a CUDA copy runs at the real link's speed); use None")
        self.bandwidth_bps = bandwidth_bps
        self.latency_s = float(latency_s)
        if chunk_bytes is not None and chunk_bytes < 1:
            raise ConfigError(f"chunk_bytes={chunk_bytes!r} is invalid; must be >= 1 (or None: one burst per copy)")
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self.spin_s = float(spin_s)
        self.name = name
        self._cuda = (_cuda or _TorchCuda(self.device)) if self.is_cuda else None
        self._stream = self._cuda.new_stream() if self.is_cuda else None
        self._cv = threading.Condition()
        self._heap: list = []
        self._seq = itertools.count()
        self._completed: collections.deque[CopyJob] = collections.deque()
        self._outstanding = 0
        self._closed = False
        self.busy_s = 0.0
        self.synchronous = bool(synchronous)
        self._thread: Optional[threading.Thread] = None
        if self.synchronous:   # no worker: run_pending() copies on the caller's thread
            self.sched = "inline"
            return
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def stream(self) -> Any:
        """The CUDA copy stream (None on CPU)."""
        return self._stream

    # ---- main thread
    def submit(self, job: CopyJob) -> CopyJob:
        if job.src is None or job.dst is None:
            raise ValueError(f"copy of {job.key} has no source or destination")
        with self._cv:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            job.queued_at = time.perf_counter()
            job.seq = next(self._seq)
            heapq.heappush(self._heap, (job.priority, job.seq, job))
            self._outstanding += 1
            self._cv.notify()
        return job

    def run_pending(self) -> None:
        """``synchronous``: carry out every queued job now, in queue order (no-op with a worker)."""
        if not self.synchronous:
            return
        while True:
            with self._cv:
                if not self._heap:
                    return
                _, _, job = heapq.heappop(self._heap)
            self._do(job)

    def take_completed(self) -> list[CopyJob]:
        """Finished jobs (landed or failed) since the last call, in completion order."""
        self.run_pending()
        out = []
        while True:
            try:
                out.append(self._completed.popleft())
            except IndexError:
                return out

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until every submitted job has finished."""
        self.run_pending()
        with self._cv:
            return self._cv.wait_for(lambda: self._outstanding == 0, timeout)

    @property
    def outstanding(self) -> int:
        with self._cv:
            return self._outstanding

    def close(self) -> None:
        """Drop queued jobs (marked ``cancelled``), let the running one finish, stop the worker."""
        with self._cv:
            self._closed = True
            while self._heap:
                _, _, job = heapq.heappop(self._heap)
                job.cancelled = True
                self._outstanding -= 1
                job.dispatched.set()
                job.done.set()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ---- worker thread
    def _run(self) -> None:
        try:
            if self.is_cuda:
                self._cuda.set_device()
            else:
                self.sched = _prepare_copy_thread(self.worker_priority)
        finally:
            self._ready.set()
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, job = heapq.heappop(self._heap)
            self._do(job)

    def _do(self, job: CopyJob) -> None:
        """Copy one job, then hand it to the main thread (the worker's, or ``run_pending``'s, work)."""
        try:
            if self.is_cuda:
                self._copy_cuda(job)
            else:
                self._copy_cpu(job)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread by poll()
            job.error = exc
            if math.isnan(job.start):
                job.start = time.perf_counter()
            job.end = time.perf_counter()
        self.busy_s += job.end - job.start
        self._completed.append(job)   # before done.set(): a waiter that wakes finds it queued
        with self._cv:
            self._outstanding -= 1
            self._cv.notify_all()
        job.dispatched.set()
        job.done.set()

    def _copy_cpu(self, job: CopyJob) -> None:
        src, dst = job.src, job.dst
        n = src.numel()
        bw = self.bandwidth_bps
        job.start = t0 = time.perf_counter()
        job.dispatched.set()
        if bw is None:
            _copy_bytes(dst, src)
            if self.latency_s:
                self._pace_until(t0 + self.latency_s)
        else:
            step, off = self.chunk_bytes or n, 0
            while off < n:
                m = min(step, n - off)
                _copy_bytes(dst[off:off + m], src[off:off + m])
                off += m
                deadline = t0 + self.latency_s + off / bw
                if off < n:  # wake a little early: the next chunk absorbs the sleep's jitter
                    wait = deadline - time.perf_counter() - self.spin_s
                    if wait > 0:
                        time.sleep(wait)
                else:
                    self._pace_until(deadline)
        job.end = time.perf_counter()

    def _pace_until(self, deadline: float) -> None:
        """Return at or just after ``deadline`` (perf_counter): sleep to within ``spin_s`` of it (a
        sleep overshoots by ~50-100 us here), then spin on ``sched_yield``, which releases the GIL."""
        wait = deadline - time.perf_counter() - self.spin_s
        if wait > 0:
            time.sleep(wait)
        while time.perf_counter() < deadline:
            _yield()

    def _copy_cuda(self, job: CopyJob) -> None:
        cuda, stream = self._cuda, self._stream
        begin, end = cuda.event(timing=True), cuda.event(timing=True)
        t_issue = time.perf_counter()
        with cuda.use_stream(stream):
            if job.fence is not None:
                stream.wait_event(job.fence)
            begin.record(stream)
            job.dst.copy_(job.src, non_blocking=True)
            end.record(stream)
        job.cuda_event = end
        job.dispatched.set()      # from here the main thread can make compute wait on job.cuda_event
        end.synchronize()         # one copy at a time: the host queue's order is the link's order
        job.end = time.perf_counter()
        job.start = max(t_issue, job.end - begin.elapsed_time(end) / 1e3)


# ============================================================================================ runtime
class OffloadRuntime:
    """The real backend's expert cache: device slots, staging buffers and the copy engine, driven by
    the shared ``sim.cache_controller.CacheController`` (which calls the policy and counts).

    Per forward pass (all calls from the thread that created the runtime)::

        rt.begin_step(StepInfo(...))              # policy.on_step_begin -> prefetches
        for each MoE layer, after its router:
            acc = rt.begin_layer(step, layer, experts, counts, predicted)
            for e in acc.on_device:
                w = rt.weights((layer, e))        # waits for its copy if needed (copy stall)
                ... issue the expert's compute with w ...
                rt.release((layer, e))            # frees a staging buffer (no-op for cached experts)
            for e in acc.host: ... run on HostStore.tensors((layer, e)) ...
            rt.end_layer()
        counters = rt.end_step(step)              # policy.on_step_end; StepCounters of the pass

    ``start(model)`` fills the initial residency and resets the policy first; ``close()`` stops the
    copy worker. ``capacity_per_layer`` (per_layer scope) or ``total_slots`` (global) fix the pool.
    Routing decisions stay with the executor: a lossy policy's ``substitute`` is applied before
    ``begin_layer``; host-run experts (``acc.host``) run on ``HostStore.tensors`` and their outputs'
    bytes go to ``count_activation_bytes``. ``weights`` returns views of a slot or staging buffer,
    valid until ``release``/``end_layer``. ``synchronous_copies=True``: no copy thread, copies run
    on this thread at the next landing point (module docstring; deterministic, for tests).
    """

    def __init__(self, store: HostStore, policy: PrefetchPolicy, *, capacity_per_layer: Optional[int] = None,
                 total_slots: Optional[int] = None, cache_scope: str = "per_layer",
                 device: torch.device | str = "cpu", bandwidth_bps: Optional[float] = None,
                 latency_s: float = 0.0, staging_buffers: int = STAGING_EXPERTS,
                 chunk_bytes: Optional[int] = None, worker_priority: WorkerPriority = "realtime",
                 _cuda: Optional[_TorchCuda] = None, synchronous_copies: bool = False):
        self.store = store
        self.policy = policy
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and _cuda is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_cuda = self.device.type == "cuda"
        self._cuda = (_cuda or _TorchCuda(self.device)) if self.is_cuda else None
        if self.is_cuda and not store.pinned:
            warnings.warn("HostStore is not pinned: copies to CUDA will not overlap compute "
                          "(build it with HostStore.for_device(..., device))", stacklevel=2)
        if cache_scope == "global" and total_slots is None and capacity_per_layer is not None:
            total_slots = capacity_per_layer * len(store.layers)
        self.copier = CopyEngine(self.device, bandwidth_bps, latency_s, chunk_bytes,
                                 worker_priority=worker_priority, _cuda=self._cuda, synchronous=synchronous_copies)
        try:
            self.pool = DeviceSlotPool(store.layout, store.layers, cache_scope, capacity_per_layer, total_slots,
                                       self.device, staging_buffers, _cuda=self._cuda)
        except BaseException:
            self.copier.close()
            raise
        self.moe_layers = store.layers
        self.num_experts = store.num_experts
        self.expert_bytes = store.expert_bytes
        self._owner = threading.get_ident()
        self.controller = CacheController(self.pool, policy, self.expert_bytes, self)
        self._jobs: dict[ExpertKey, CopyJob] = {}          # copies into cache slots, not landed yet
        self._staged: dict[ExpertKey, CopyJob] = {}        # this layer's staged loads
        self._staging_free = list(range(staging_buffers))  # heap
        self._staging_backlog: collections.deque[CopyJob] = collections.deque()
        self._records: list[CopyRecord] = []
        self._cuda_stalls: list[tuple[Any, Any]] = []
        # CPU: for each wait that blocked, from the copy's end (worker clock) to this thread resuming.
        self.resume_delays_s: list[float] = []
        self._layer: Optional[int] = None
        self.initial_resident: tuple[ExpertKey, ...] = ()

    @property
    def counters(self) -> StepCounters:
        """The open step's counters (the controller's)."""
        return self.controller.counters

    # ------------------------------------------------------------------ lifecycle
    def start(self, model, *, seed: int = 0, initial_residency: Literal["fill", "empty"] = "fill",
              host_crossover_tokens: Optional[int] = None, future=None,
              allow_byte_mismatch: bool = False, tensor_parallel: int = 1) -> PolicyContext:
        """Fill the pool (``fill``: as ``ExpertCache.initial_fill``; the copies are not counted) and
        reset the policy with the matching ``PolicyContext``; ``future`` goes to ``set_future``.
        ``tensor_parallel=p``: the store holds one rank's slice of each expert (``model.tensor_shard(p)``'s
        ``expert_bytes``)."""
        self._check_thread()
        if tuple(model.moe_layers) != self.moe_layers or model.num_experts != self.num_experts:
            raise ValueError(f"model {model.name} has MoE layers {tuple(model.moe_layers)} x {model.num_experts} "
                             f"experts; the HostStore holds layers {self.moe_layers} x {self.num_experts}")
        want_bytes = model.tensor_shard(tensor_parallel).expert_bytes
        if not allow_byte_mismatch and want_bytes != self.expert_bytes:
            raise ValueError(f"model {model.name}: expert_bytes={want_bytes:g} but the HostStore's experts "
                             f"have {self.expert_bytes} bytes; set the spec's expert_bytes_per_param to the store's "
                             f"dtype size (or pass allow_byte_mismatch=True)")
        if self.pool.resident or self.pool.in_flight:
            raise RuntimeError("start() needs an empty pool")
        if initial_residency not in ("fill", "empty"):
            raise ConfigError(f"initial_residency={initial_residency!r} is invalid; allowed: fill, empty")
        initial = self.pool.initial_order(self.num_experts) if initial_residency == "fill" else []
        for key in initial:
            self.pool.place(key, self.store.flat(key))
        if self.is_cuda and initial:
            self._cuda.synchronize()
        self.initial_resident = tuple(initial)
        return self.controller.start(model, initial, seed, host_crossover_tokens, future)

    def close(self) -> None:
        self.copier.close()

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("OffloadRuntime is single-threaded: call it (and so its policy) only from "
                               "the thread that created it")

    # ------------------------------------------------------------------ the per-pass protocol
    def begin_step(self, info: StepInfo) -> Plan:
        """A forward pass begins: land finished copies, reset the step counters, run the policy's
        ``on_step_begin`` plan. Returns the plan."""
        self._check_thread()
        if self._layer is not None:
            raise RuntimeError("begin_step() inside a layer: call end_layer() first")
        self.poll()
        self.take_counters()
        return self.controller.begin_step(info)

    def begin_layer(self, step: int, layer: int, experts: Sequence[int], counts: Optional[Sequence[int]] = None,
                    predicted: Optional[Mapping[int, Sequence[int]]] = None) -> LayerAccess:
        """``layer``'s router has run and needs ``experts`` (distinct, ascending; ``counts`` tokens
        each): pin them, ask the policy (``on_routed``, then ``on_miss`` per missing expert), issue
        demand loads, then the plan's prefetches (they queue behind the demand loads)."""
        self._check_thread()
        if self._layer is not None:
            raise RuntimeError(f"begin_layer({layer}) while layer {self._layer} is open: call end_layer() first")
        if layer not in self.moe_layers:
            raise KeyError(f"layer {layer} is not an MoE layer of the HostStore ({self.moe_layers})")
        self.poll()
        ids = [int(e) for e in experts]
        counts = [int(n) for n in counts] if counts is not None else [1] * len(ids)
        if len(counts) != len(ids):
            raise ValueError(f"{len(ids)} experts but {len(counts)} counts")
        if len(set(ids)) != len(ids):
            raise ValueError(f"begin_layer({layer}): experts must be distinct, got {ids}")
        self._layer = layer
        return self.controller.begin_layer(step, layer, ids, counts, predicted)

    def weights(self, key: ExpertKey) -> tuple[torch.Tensor, ...]:
        """The expert's tensors on the device, for the running layer's needed experts. Waits for
        its copy if it is still running; the wait is copy stall. On CUDA the host does not wait:
        the current compute stream is made to wait on the copy's event."""
        self._check_thread()
        key = _key(key)
        job = self._staged.get(key)
        if job is not None:
            if not job.submitted:
                raise RuntimeError(
                    f"expert {key} waits for a staging buffer, and all {len(self.pool.staging_views)} are held: "
                    f"call release(key) on staged experts once their compute is issued")
            self._wait(job)
            self.poll()
            return self.pool.staging_views[job.staging_index]
        if key not in self.pool.pinned:
            raise KeyError(f"expert {key} is not needed by the running layer: weights() serves only the experts "
                           f"passed to begin_layer (host-run experts: HostStore.tensors)")
        if key in self.pool.resident:
            return self.pool.views(key)
        job = self._jobs.get(key)
        if job is None:
            raise KeyError(f"expert {key} is neither resident nor being copied (did the policy run it on the host?)")
        self._wait(job)
        self.poll()
        return self.pool.views(key)

    def release(self, key: ExpertKey) -> None:
        """The executor has issued ``key``'s compute: its staging buffer (if any) may be reused."""
        self._check_thread()
        key = _key(key)
        job = self._staged.get(key)
        if job is None or job.released:
            return
        job.released = True
        if not job.submitted:  # never got a buffer and is no longer wanted: not copied
            try:
                self._staging_backlog.remove(job)
            except ValueError:
                pass
            return
        i = job.staging_index
        if self.is_cuda:
            ev = self._cuda.event()
            ev.record(self._cuda.current_stream())
            self.pool.staging_fences[i] = ev
        heapq.heappush(self._staging_free, i)
        while self._staging_free and self._staging_backlog:
            self._submit_staged(self._staging_backlog.popleft())

    def end_layer(self) -> None:
        """The layer's expert compute has been issued: release staging buffers and unpin."""
        self._check_thread()
        if self._layer is None:
            raise RuntimeError("end_layer() without begin_layer()")
        for key in list(self._staged):
            self.release(key)
        self._staged.clear()
        if self.is_cuda and self.pool.pinned:
            ev = self._cuda.event()
            ev.record(self._cuda.current_stream())
            for key in self.pool.pinned:
                sid = self.pool.slot_id(key)
                if sid is not None:
                    self.pool.fences[sid] = ev
        self.controller.end_layer()
        self._layer = None

    def end_step(self, step: int) -> StepCounters:
        """The forward pass is done: land finished copies, ``policy.on_step_end``; returns (and
        resets) the pass's counters."""
        self._check_thread()
        if self._layer is not None:
            raise RuntimeError("end_step() inside a layer: call end_layer() first")
        self.poll()
        self._resolve_cuda_stalls()
        return self.controller.end_step(step)

    # ------------------------------------------------------------------ copies
    def demand_load(self, key: ExpertKey) -> CopyJob:
        """Copy a needed expert now, at demand priority: into a cache slot (evicting the policy's
        victim if the pool is full), or into a staging buffer if the policy names no victim."""
        self._check_thread()
        key = _key(key)
        self._check_key(key)
        if key in self.pool.resident:
            raise ValueError(f"expert {key} is resident: nothing to load")
        if key in self._jobs:
            return self._jobs[key]
        if key in self._staged:
            return self._staged[key]
        if self._layer is None:
            raise RuntimeError(f"demand_load({key}) outside a layer: demand loads belong to begin_layer/end_layer")
        staged = self.controller.demand_load(key)
        return self._staged[key] if staged else self._jobs[key]

    def prefetch(self, key: ExpertKey, priority: int = 0) -> Optional[CopyJob]:
        """Start copying ``key`` into the cache behind demand loads (queue priority
        ``1 + priority``); None if it is resident or in flight already, or the policy names no victim."""
        self._check_thread()
        key = _key(key)
        self._check_key(key)
        return self._jobs[key] if self.controller.prefetch(key, priority) else None

    def execute(self, plan: Plan) -> None:
        """Carry out a policy plan (the controller's ``execute``)."""
        self._check_thread()
        self.controller.execute(plan)

    def copy(self, order: CopyOrder) -> None:
        """``CopySink``: carry out the controller's copy order (a slot copy, or staging)."""
        key = order.key
        if order.kind != "staging":
            self._submit(key, order.kind, order.priority, order.slot)
            return
        job = CopyJob(key, "staging", DEMAND_PRIORITY, self.expert_bytes, src=self.store.flat(key))
        self._staged[key] = job
        if self._staging_free:
            self._submit_staged(job)
        else:
            self._staging_backlog.append(job)

    def poll(self) -> int:
        """Land the copies that have finished, in completion order: mark them resident and tell
        the policy (``on_copy_done``). Returns how many copies finished."""
        self._check_thread()
        done = self.copier.take_completed()
        for job in done:
            if job.cancelled:
                continue
            if job.error is not None:
                raise RuntimeError(f"copy of expert {job.key} ({job.kind}) failed") from job.error
            self._records.append(job.record())
            if job.kind == "staging":
                continue
            self._jobs.pop(job.key, None)
            self.controller.landed(job.key, job.kind)
        return len(done)

    def wait(self, key: ExpertKey) -> None:
        """Block until ``key``'s copy (if any) has finished and land it (not counted as stall)."""
        self._check_thread()
        key = _key(key)
        job = self._jobs.get(key) or self._staged.get(key)
        if job is not None and job.submitted:
            self.copier.run_pending()   # synchronous copies: carried out now (no-op with the worker)
            job.done.wait()
        self.poll()

    def drain(self) -> None:
        """Block until the copy queue is empty and land everything (not counted as stall)."""
        self._check_thread()
        self.copier.wait_idle()
        self.poll()

    def count_activation_bytes(self, nbytes: float) -> None:
        """Host-run experts' outputs copied back to the device (the executor moves them)."""
        self.controller.count_activation_bytes(nbytes)

    # ------------------------------------------------------------------ counters and records
    def take_counters(self) -> StepCounters:
        """The counters since the last call (CUDA stalls resolved), and start new ones."""
        self._check_thread()
        self._resolve_cuda_stalls()
        return self.controller.take_counters()

    @property
    def totals(self) -> StepCounters:
        """Counters over the whole run so far (CUDA stalls of the open step not yet included)."""
        return self.controller.totals

    @property
    def copy_records(self) -> list[CopyRecord]:
        """Every finished copy so far, in completion order (initial fill excluded)."""
        return list(self._records)

    def take_copy_records(self) -> list[CopyRecord]:
        out, self._records = self._records, []
        return out

    # ------------------------------------------------------------------ internals
    def _check_key(self, key: ExpertKey) -> None:
        if key not in self.store:
            raise KeyError(f"expert {key} is not in the HostStore (layers {self.moe_layers}, "
                           f"experts 0..{self.num_experts - 1})")

    def _submit(self, key: ExpertKey, kind: CopyKind, priority: int, dst: torch.Tensor) -> CopyJob:
        fence = self.pool.fences.get(self.pool.slot_id(key)) if self.is_cuda else None
        job = CopyJob(key, kind, priority, self.expert_bytes, src=self.store.flat(key), dst=dst, fence=fence)
        self._jobs[key] = job
        return self.copier.submit(job)

    def _submit_staged(self, job: CopyJob) -> None:
        i = heapq.heappop(self._staging_free)
        job.staging_index = i
        job.dst = self.pool.staging_buffers[i]
        job.fence = self.pool.staging_fences[i] if self.is_cuda else None
        self.copier.submit(job)

    def _wait(self, job: CopyJob) -> None:
        """Make compute wait for ``job``; count the wait as copy stall."""
        if job.done.is_set():
            return
        if self.is_cuda:
            cuda = self._cuda
            stream = cuda.current_stream()
            before, after = cuda.event(timing=True), cuda.event(timing=True)
            before.record(stream)
            self.copier.run_pending()   # synchronous copies: enqueued now (no-op with the worker)
            job.dispatched.wait()  # normally instant; blocks while the job queues behind others
            if job.cuda_event is not None:
                stream.wait_event(job.cuda_event)
            after.record(stream)
            self._cuda_stalls.append((before, after))
            return
        t0 = time.perf_counter()
        self.copier.run_pending()   # synchronous copies: this thread copies them now (stall, as a wait)
        job.done.wait()
        t1 = time.perf_counter()
        self.counters.copy_stall_s += t1 - t0
        self.resume_delays_s.append(t1 - job.end)

    def _resolve_cuda_stalls(self) -> None:
        for before, after in self._cuda_stalls:
            after.synchronize()
            self.counters.copy_stall_s += before.elapsed_time(after) / 1e3
        self._cuda_stalls.clear()
