"""A machine as a graph: GPUs, the host CPU and the links between them, with routes.

``SystemSpec`` is the ``hw`` node of the Hydra config (``conf/hw/*.yaml``). ``System`` turns it
into a directed networkx graph whose nodes are ``"host"`` and ``"gpu0" .. "gpuN-1"`` and whose
edges are one direction of a link (each edge carries its ``LinkSpec`` and a unique ``link_id``).
``route(src, dst)`` gives the link ids a transfer crosses; the simulator times copies on them.

``tensor_parallel`` (default 1) runs the model on that many of the node's GPUs with Megatron-style
tensor parallelism, as vLLM's ``--tensor-parallel-size`` does (MoESD runs Qwen2-57B-A14B on
2xH800 this way): every GPU holds ``ModelSpec.tensor_shard(p)`` and the GPUs all-reduce the
activations twice per layer over ``gpu_link`` (``hw.parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import networkx as nx

from workloads.validation import positive, require

from .cost import MoeKernels, check_moe_kernels
from .devices import CpuSpec, GpuSpec, LinkSpec

HOST = "host"


def gpu_node(index: int) -> str:
    return f"gpu{index}"


@dataclass(frozen=True)
class SystemSpec:
    """One node: ``num_gpus`` identical GPUs, each on its own host link, optionally a GPU fabric."""

    name: str
    gpu: GpuSpec
    cpu: CpuSpec
    host_link: LinkSpec
    num_gpus: int = 1
    gpu_link: Optional[LinkSpec] = None   # all-to-all fabric (NVLink switch) between GPUs
    cost_model: Literal["roofline", "table"] = "roofline"  # table: measured by moesim-profile (hw.table)
    profile_dir: Optional[str] = None     # the tables' directory (cost_model=table)
    profile_copy: Literal["idle", "contended"] = "idle"  # which measured copy curve the table uses
    host_is_device: bool = False          # the "GPU" is the host CPU itself (hw=this_cpu): host-run
                                          # experts run on the compute stream, not beside it
    tensor_parallel: int = 1              # GPUs the model is split across (vLLM --tensor-parallel-size);
                                          # > 1 needs gpu_link, whose all-reduces hw.parallel times
    moe_kernels: MoeKernels = "per_expert"  # how the roofline launches routed experts:
                                          # one expert at a time, or vLLM's fused_moe (hw/cost.py)

    def validate(self, key: str = "hw") -> None:
        positive(self, key, "num_gpus")
        check_moe_kernels(self.moe_kernels, f"{key}.moe_kernels")
        require(self.moe_kernels == "per_expert" or self.cost_model == "roofline", f"{key}.moe_kernels",
                self.moe_kernels, f"applies to cost_model=roofline; a table times the kernels it measured")
        if self.cost_model == "table":
            from .table import PROFILE_HEADER

            require(self.profile_dir is not None, f"{key}.profile_dir", None,
                    f"{key}.cost_model=table needs the directory moesim-profile wrote (e.g. profiles/cpu)")
            require((Path(self.profile_dir) / PROFILE_HEADER).is_file(), f"{key}.profile_dir", self.profile_dir,
                    f"holds no cost tables ({PROFILE_HEADER}); run moesim-profile -o {self.profile_dir} first")
        if self.num_gpus > 1:
            require(self.gpu_link is not None, f"{key}.gpu_link", None,
                    "a system with num_gpus > 1 needs a gpu_link (e.g. hw/link@hw.gpu_link=nvlink4)")
        require(1 <= self.tensor_parallel <= self.num_gpus, f"{key}.tensor_parallel", self.tensor_parallel,
                f"must be between 1 and hw.num_gpus={self.num_gpus}")
        if self.tensor_parallel > 1:
            require(self.gpu_link is not None, f"{key}.gpu_link", None,
                    f"{key}.tensor_parallel={self.tensor_parallel} needs a gpu_link for its all-reduces "
                    f"(e.g. hw/link@hw.gpu_link=nvlink4)")


class System:
    """The machine's topology graph with one edge per link direction."""

    def __init__(self, spec: SystemSpec):
        self.spec = spec
        g = nx.DiGraph()
        g.add_node(HOST, kind="cpu", spec=spec.cpu)
        for i in range(spec.num_gpus):
            node = gpu_node(i)
            g.add_node(node, kind="gpu", spec=spec.gpu)
            g.add_edge(HOST, node, link=spec.host_link, link_id=f"{spec.host_link.name}:{HOST}->{node}")
            g.add_edge(node, HOST, link=spec.host_link, link_id=f"{spec.host_link.name}:{node}->{HOST}")
        if spec.gpu_link is not None:
            for i in range(spec.num_gpus):
                for j in range(spec.num_gpus):
                    if i != j:
                        a, b = gpu_node(i), gpu_node(j)
                        g.add_edge(a, b, link=spec.gpu_link, link_id=f"{spec.gpu_link.name}:{a}->{b}")
        self.graph = g

    @property
    def gpus(self) -> list[str]:
        return [gpu_node(i) for i in range(self.spec.num_gpus)]

    @lru_cache(maxsize=None)
    def route(self, src: str, dst: str) -> tuple[str, ...]:
        """Link ids of the fewest-hop path from ``src`` to ``dst``."""
        nodes = nx.shortest_path(self.graph, src, dst)
        return tuple(self.graph.edges[a, b]["link_id"] for a, b in zip(nodes, nodes[1:]))

    def links(self) -> dict[str, LinkSpec]:
        """Every link direction by id."""
        return {d["link_id"]: d["link"] for _, _, d in self.graph.edges(data=True)}

    def transfer_s(self, src: str, dst: str, nbytes: float) -> float:
        """Uncontended time to move ``nbytes`` along the route: summed latencies + bytes / bottleneck."""
        links = self.links()
        route = [links[i] for i in self.route(src, dst)]
        if not route:
            return 0.0
        return sum(l.latency_s for l in route) + nbytes / min(l.bandwidth_bps for l in route)
