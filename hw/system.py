"""A machine as a graph: GPUs, the host CPU and the links between them, with routes.

``SystemSpec`` is the ``hw`` node of the Hydra config (``conf/hw/*.yaml``). ``System`` turns it
into a directed networkx graph whose nodes are ``"host"`` and ``"gpu0" .. "gpuN-1"`` and whose
edges are one direction of a link (each edge carries its ``LinkSpec`` and a unique ``link_id``).
``route(src, dst)`` gives the link ids a transfer crosses; the simulator times copies on them.

``tensor_parallel`` (default 1) runs the model on that many of the node's GPUs with Megatron-style
tensor parallelism, as vLLM's ``--tensor-parallel-size`` does (MoESD runs Qwen2-57B-A14B on
2xH800 this way): every GPU holds ``ModelSpec.tensor_shard(p)`` and the GPUs all-reduce the
activations twice per layer over ``gpu_link`` (``hw.parallel``).

Many nodes (``num_nodes``; ``num_gpus`` is GPUs *per node*). Graph nodes:

* ``"host"`` (node 0), ``"host1"``, ``"host2"`` .. (``host_node(n)``): each node's CPU, joined to
  each of its node's GPUs by one ``host_link`` (one edge per direction, as before);
* ``"gpu0"`` .. : the global GPU index, node ``n`` holds ``gpu{n*num_gpus}`` .. ``gpu{(n+1)*num_gpus-1}``
  (``System.node_of``, ``System.host_of``);
* ``"nvswitch{n}"``: node ``n``'s GPU switch (``gpu_fabric="nvswitch"``, the default): every GPU has
  ONE port to it per direction with ``gpu_link``'s bandwidth, so a GPU sending to 7 peers at once
  shares its one uplink (and a GPU receiving from 7 peers its one downlink). For a PCIe
  ``gpu_link`` (``hw=4xl40``) the switch stands for the PCIe switch / root complex.
  ``gpu_fabric="mesh"`` keeps point-to-point links between every pair of a node's GPUs instead
  (NVLink bridges, HGX A100 4-GPU boards);
* ``"netswitch"``: one non-blocking network switch between nodes; every GPU has its own ``nic``
  (GPUDirect RDMA: one ConnectX NIC per GPU, ``conf/hw/link/cx7_ib.yaml``), one edge per direction.

Latency: a route's latency is the sum of its edges' ``latency_s``. A link through a switch is two
edges (GPU->switch, switch->GPU); its whole ``latency_s`` sits on the *uplink* edge and the downlink
edge carries a copy of the ``LinkSpec`` with ``latency_s=0``, so an uncontended transfer between
two GPUs of a node takes exactly ``gpu_link.latency_s + n / gpu_link.bandwidth_bps`` and one between
nodes ``nic.latency_s + n / nic.bandwidth_bps``. Routes are the cheapest path by hop weight
(fabric hop 1, host link 10, network hop 100): GPUs of one node talk over their fabric, never
through the host or the network; GPUs of different nodes over their NICs.
Single-node systems keep the edges, link ids and numbers they had (``gpu_fabric="mesh"`` exactly
so; ``"nvswitch"`` routes GPU to GPU over two edges with the same uncontended time).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import networkx as nx

from workloads.validation import positive, require

from .cost import MoeKernels, check_moe_kernels
from .devices import CpuSpec, GpuSpec, LinkSpec

HOST = "host"
NETSWITCH = "netswitch"
GpuFabric = Literal["nvswitch", "mesh"]

# Route weights per edge kind: a node's GPUs talk over their fabric, never via the host or the network.
_FABRIC_HOP, _HOST_HOP, _NETWORK_HOP = 1, 10, 100


def gpu_node(index: int) -> str:
    """Graph node of the GPU with global index ``index`` (node n holds n*num_gpus ..)."""
    return f"gpu{index}"


def host_node(node: int) -> str:
    """Graph node of node ``node``'s host CPU: ``"host"`` for node 0, ``"host1"``, ``"host2"`` ..."""
    return HOST if node == 0 else f"host{node}"


def nvswitch_node(node: int) -> str:
    return f"nvswitch{node}"


def gpu_index(name: str) -> int:
    """The global index of GPU node ``name`` (``"gpu11"`` -> 11); a ValueError for a non-GPU name."""
    if not (name.startswith("gpu") and name[3:].isdigit()):
        raise ValueError(f"{name!r} is not a GPU node (gpu0, gpu1, ...)")
    return int(name[3:])


@dataclass(frozen=True)
class SystemSpec:
    """``num_nodes`` identical nodes of ``num_gpus`` GPUs, each GPU on its own host link, optionally a
    GPU fabric inside a node (``gpu_link`` over ``gpu_fabric``) and a NIC per GPU between nodes."""

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
    num_nodes: int = 1                    # nodes of num_gpus GPUs each (num_gpus stays per node)
    gpu_fabric: GpuFabric = "nvswitch"    # nvswitch: one port per GPU to the node's switch (shared by
                                          # all its peers); mesh: a gpu_link between every pair
    nic: Optional[LinkSpec] = None        # one NIC per GPU (GPUDirect) to the network switch between
                                          # nodes; needed when num_nodes > 1

    @property
    def total_gpus(self) -> int:
        """GPUs in all nodes together."""
        return self.num_gpus * self.num_nodes

    def validate(self, key: str = "hw") -> None:
        positive(self, key, "num_gpus", "num_nodes")
        require(self.gpu_fabric in ("nvswitch", "mesh"), f"{key}.gpu_fabric", self.gpu_fabric,
                "choose one of: nvswitch, mesh")
        if self.num_nodes > 1:
            require(self.nic is not None, f"{key}.nic", None,
                    f"{key}.num_nodes={self.num_nodes} needs a nic between nodes (e.g. +hw/link@hw.nic=cx7_ib)")
        check_moe_kernels(self.moe_kernels, f"{key}.moe_kernels")
        require(self.moe_kernels == "per_expert" or self.cost_model == "roofline", f"{key}.moe_kernels",
                self.moe_kernels, "applies to cost_model=roofline; a table times the kernels it measured")
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
    """The machine's topology graph with one edge per link direction (see the module docstring)."""

    def __init__(self, spec: SystemSpec):
        self.spec = spec
        self.graph = nx.DiGraph()
        for n in range(spec.num_nodes):
            self._add_node_of(n)
        if spec.nic is not None and spec.num_nodes > 1:
            self._add_network()

    # ------------------------------------------------------------------ building
    def _edge(self, a: str, b: str, link: LinkSpec, weight: int) -> None:
        self.graph.add_edge(a, b, link=link, link_id=f"{link.name}:{a}->{b}", weight=weight)

    def _add_node_of(self, n: int) -> None:
        spec, g = self.spec, self.graph
        host = host_node(n)
        g.add_node(host, kind="cpu", spec=spec.cpu, node=n)
        for gpu in self.gpus_of_node(n):
            g.add_node(gpu, kind="gpu", spec=spec.gpu, node=n)
            self._edge(host, gpu, spec.host_link, _HOST_HOP)
            self._edge(gpu, host, spec.host_link, _HOST_HOP)
        if spec.gpu_link is not None and spec.num_gpus > 1:
            if spec.gpu_fabric == "mesh":
                self._add_mesh(n)
            else:
                self._add_switch(nvswitch_node(n), self.gpus_of_node(n), spec.gpu_link, _FABRIC_HOP, n)

    def _add_mesh(self, n: int) -> None:
        gpus = self.gpus_of_node(n)
        for a in gpus:
            for b in gpus:
                if a != b:
                    self._edge(a, b, self.spec.gpu_link, _FABRIC_HOP)

    def _add_switch(self, switch: str, gpus: list[str], link: LinkSpec, weight: int, n: Optional[int]) -> None:
        """One port per GPU: the uplink carries the link's latency, the downlink none."""
        self.graph.add_node(switch, kind="switch", spec=link, node=n)
        down = replace(link, latency_s=0.0)
        for gpu in gpus:
            self._edge(gpu, switch, link, weight)
            self._edge(switch, gpu, down, weight)

    def _add_network(self) -> None:
        self._add_switch(NETSWITCH, self.gpus, self.spec.nic, _NETWORK_HOP, None)

    # ------------------------------------------------------------------ names
    @property
    def gpus(self) -> list[str]:
        """Every GPU of every node, by global index."""
        return [gpu_node(i) for i in range(self.spec.total_gpus)]

    @property
    def hosts(self) -> list[str]:
        return [host_node(n) for n in range(self.spec.num_nodes)]

    def gpus_of_node(self, node: int) -> list[str]:
        k = self.spec.num_gpus
        return [gpu_node(i) for i in range(node * k, (node + 1) * k)]

    def node_of(self, gpu_name: str) -> int:
        """The node index GPU ``gpu_name`` sits in."""
        i = gpu_index(gpu_name)
        require(0 <= i < self.spec.total_gpus, "gpu", gpu_name, f"this system has gpu0..gpu{self.spec.total_gpus - 1}")
        return i // self.spec.num_gpus

    def host_of(self, gpu_name: str) -> str:
        """The host node of GPU ``gpu_name``'s node."""
        return host_node(self.node_of(gpu_name))

    # ------------------------------------------------------------------ routes
    @lru_cache(maxsize=None)
    def route(self, src: str, dst: str) -> tuple[str, ...]:
        """Link ids of the cheapest path from ``src`` to ``dst`` (hop weights: module docstring)."""
        nodes = nx.shortest_path(self.graph, src, dst, weight="weight")
        return tuple(self.graph.edges[a, b]["link_id"] for a, b in zip(nodes, nodes[1:]))

    def links(self) -> dict[str, LinkSpec]:
        """Every link direction by id (a switch downlink's spec has ``latency_s=0``)."""
        return {d["link_id"]: d["link"] for _, _, d in self.graph.edges(data=True)}

    def route_latency_s(self, src: str, dst: str) -> float:
        """Summed latencies of the route's links."""
        links = self.links()
        return sum(links[i].latency_s for i in self.route(src, dst))

    def transfer_s(self, src: str, dst: str, nbytes: float) -> float:
        """Uncontended time to move ``nbytes`` along the route: summed latencies + bytes / bottleneck."""
        links = self.links()
        route = [links[i] for i in self.route(src, dst)]
        if not route:
            return 0.0
        return sum(l.latency_s for l in route) + nbytes / min(l.bandwidth_bps for l in route)
