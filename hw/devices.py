"""Device and link specifications (vendor datasheet figures plus achieved-fraction factors).

Units: FLOP/s, bytes, bytes/s (``_bps``), seconds. Peak figures are datasheet values (REFERENCE.md
section 6); the ``*_efficiency`` factors are the achieved fraction of peak on large operations and
belong to the device, calibrated by profiling where a device is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workloads.validation import positive, require


@dataclass(frozen=True)
class GpuSpec:
    """An accelerator: dense bf16 compute, HBM size and bandwidth, per-kernel overhead."""

    name: str
    peak_flops: float             # dense bf16 FLOP/s
    memory_bytes: float           # HBM capacity
    mem_bw_bps: float             # HBM bandwidth
    flops_efficiency: float = 0.7   # achieved / peak on large GEMMs
    mem_efficiency: float = 0.8     # achieved / peak on streaming reads
    kernel_launch_s: float = 3e-6   # fixed cost per kernel (launch + tail)
    reserved_bytes: float = 2e9     # CUDA context, allocator slack: never available to the model

    def validate(self, key: str = "gpu") -> None:
        positive(self, key, "peak_flops", "memory_bytes", "mem_bw_bps", "flops_efficiency", "mem_efficiency")
        require(self.flops_efficiency <= 1 and self.mem_efficiency <= 1, f"{key}.flops_efficiency",
                (self.flops_efficiency, self.mem_efficiency), "efficiencies must be in (0, 1]")
        require(self.kernel_launch_s >= 0, f"{key}.kernel_launch_s", self.kernel_launch_s, "must be >= 0")
        require(0 <= self.reserved_bytes < self.memory_bytes, f"{key}.reserved_bytes", self.reserved_bytes,
                "must be >= 0 and below memory_bytes")


@dataclass(frozen=True)
class CpuSpec:
    """The host: cores, FLOP/s across all cores, DRAM size and bandwidth."""

    name: str
    cores: int
    peak_flops: float             # all cores, bf16/fp32 vector FLOP/s
    dram_bytes: float
    dram_bw_bps: float
    flops_efficiency: float = 0.5
    mem_efficiency: float = 0.6
    op_overhead_s: float = 20e-6  # per operator dispatched on the CPU

    def validate(self, key: str = "cpu") -> None:
        positive(self, key, "cores", "peak_flops", "dram_bytes", "dram_bw_bps", "flops_efficiency", "mem_efficiency")
        require(self.flops_efficiency <= 1 and self.mem_efficiency <= 1, f"{key}.flops_efficiency",
                (self.flops_efficiency, self.mem_efficiency), "efficiencies must be in (0, 1]")
        require(self.op_overhead_s >= 0, f"{key}.op_overhead_s", self.op_overhead_s, "must be >= 0")


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link; ``bandwidth_bps`` is the achieved rate in each direction."""

    name: str
    kind: Literal["pcie", "nvlink", "c2c", "network"]
    bandwidth_bps: float
    latency_s: float = 10e-6

    def validate(self, key: str = "link") -> None:
        positive(self, key, "bandwidth_bps")
        require(self.latency_s >= 0, f"{key}.latency_s", self.latency_s, "must be >= 0")

    def transfer_s(self, nbytes: float) -> float:
        """Time to move ``nbytes`` over this link alone: latency + bytes / bandwidth."""
        return self.latency_s + nbytes / self.bandwidth_bps
