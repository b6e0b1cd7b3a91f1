"""Link bandwidth sharing (hw/network.py, sim/links.py) and the many-node System (hw/system.py),
checked against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from hw.devices import CpuSpec, GpuSpec, LinkSpec
from hw.network import FlowSchedule, max_min_fair_rates, simulate_flows
from hw.system import HOST, System, SystemSpec, gpu_node, host_node
from sim.config import compose_scenario
from sim.links import LinkFabric
from workloads.validation import ConfigError, build

REL = 1e-12
GPU = GpuSpec("g", 1e15, 80e9, 3e12)
CPU = CpuSpec("c", 64, 4e12, 512e9, 300e9)
LINK_10G = LinkSpec("l10", "pcie", 10e9, 1e-5)   # 10 GB/s per direction, 10 us


def one_gpu(link: LinkSpec = LINK_10G) -> System:
    return System(SystemSpec("t", GPU, CPU, link))


@pytest.fixture(scope="module")
def two_nodes() -> System:
    return System(compose_scenario(["hw=2x8xh100_ib"]).hw)


def run_fabric(system: System, transfers):
    """Issue each (src, dst, nbytes, start_s) on a LinkFabric; returns (finish times, fabric, env)."""
    env = simpy.Environment()
    fabric = LinkFabric(env, system)
    finish = [None] * len(transfers)

    def issue(k, src, dst, nbytes, start_s):
        yield env.timeout(start_s)
        yield fabric.transfer(src, dst, nbytes)
        finish[k] = env.now

    for k, t in enumerate(transfers):
        env.process(issue(k, *t))
    env.run()
    return finish, fabric, env


# ------------------------------------------------------------------ max-min solver
def test_three_flows_two_bottlenecks():
    # link 0: 10 GB/s, link 1: 4 GB/s; a crosses 0, b crosses 0 and 1, c crosses 1.
    # Link 1's share 4/2 = 2 < link 0's 10/2 = 5: b = c = 2 GB/s; link 0 then has 10 - 2 = 8 left for a.
    rates = max_min_fair_rates([[0], [0, 1], [1]], [10e9, 4e9])
    assert rates.tolist() == pytest.approx([8e9, 2e9, 2e9], rel=REL)


def test_max_min_edge_cases():
    assert max_min_fair_rates([], [1e9]).size == 0
    assert max_min_fair_rates([[]], [1e9])[0] == np.inf
    # one flow crossing a link twice uses it twice: half the capacity
    assert max_min_fair_rates([[0, 0]], [6e9])[0] == pytest.approx(3e9, rel=REL)
    # three equal flows on one link, one of them also on a wider link: a third each
    assert max_min_fair_rates([[0], [0], [0, 1]], [9e9, 100e9]).tolist() == pytest.approx([3e9] * 3, rel=REL)


# ------------------------------------------------------------------ fluid transfers
def test_two_transfers_share_one_link_during_their_overlap():
    # 10 GB/s, latency L = 10 us; A: 1 GB issued at 0, B: 1 GB issued at 0.05 s (both host -> gpu0).
    # A alone from L to 0.05 + L: 0.5 GB; then 5 GB/s each: A's last 0.5 GB take 0.1 s -> A lands at
    # 0.15 + L, when B has 0.5 GB done; B's last 0.5 GB alone at 10 GB/s: 0.05 s -> 0.2 + L.
    L = 1e-5
    flows = [(HOST, "gpu0", 1e9, 0.0), (HOST, "gpu0", 1e9, 0.05)]
    expected = [0.15 + L, 0.2 + L]
    system = one_gpu()
    assert simulate_flows(system, flows).tolist() == pytest.approx(expected, rel=REL)
    finish, fabric, _ = run_fabric(system, flows)
    assert finish == pytest.approx(expected, rel=REL)
    assert fabric.bytes_by_link["l10:host->gpu0"] == pytest.approx(2e9, rel=REL)
    assert fabric.bytes_by_link["l10:gpu0->host"] == 0.0
    assert fabric.busy_s_by_link["l10:host->gpu0"] == pytest.approx(0.2, rel=REL)   # L .. 0.2 + L


def test_opposite_directions_do_not_share():
    flows = [(HOST, "gpu0", 1e9, 0.0), ("gpu0", HOST, 1e9, 0.0)]
    assert simulate_flows(one_gpu(), flows).tolist() == pytest.approx([0.1 + 1e-5] * 2, rel=REL)


def test_one_copy_alone_equals_system_transfer_s(two_nodes):
    for src, dst in [(HOST, "gpu3"), ("gpu3", HOST), (host_node(1), "gpu12"), ("gpu1", "gpu6"),
                     ("gpu2", "gpu13"), (HOST, "gpu9")]:
        expect = two_nodes.transfer_s(src, dst, 3e8)
        assert simulate_flows(two_nodes, [(src, dst, 3e8, 0.0)])[0] == pytest.approx(expect, rel=REL)
        finish, _, _ = run_fabric(two_nodes, [(src, dst, 3e8, 0.0)])
        assert finish[0] == pytest.approx(expect, rel=REL)


def test_zero_bytes_and_same_node_transfers():
    system = one_gpu()
    assert simulate_flows(system, [(HOST, "gpu0", 0.0, 0.5), ("gpu0", "gpu0", 5e9, 0.5)]).tolist() == \
        pytest.approx([0.5 + 1e-5, 0.5], rel=REL)
    finish, _, _ = run_fabric(system, [(HOST, "gpu0", 0.0, 0.5), ("gpu0", "gpu0", 5e9, 0.5)])
    assert finish == pytest.approx([0.5 + 1e-5, 0.5], rel=REL)


def test_flow_schedule_rejects_a_start_in_the_past():
    sched = FlowSchedule([1e9], now_s=1.0)
    with pytest.raises(ValueError, match="before the schedule's clock"):
        sched.add([0], 1.0, 0.5)


def test_fabric_spends_a_few_events_per_transfer_and_is_deterministic(two_nodes):
    rng = np.random.default_rng(0)
    gpus = two_nodes.gpus
    n = 200
    flows = [(gpus[a], gpus[b] if b != a else HOST, float(rng.integers(1, 100)) * 1e6, float(rng.random()) * 1e-3)
             for a, b in zip(rng.integers(0, 16, n), rng.integers(0, 16, n))]
    finish, fabric, env = run_fabric(two_nodes, flows)
    fabric_events = next(env._eid) - 3 * n - 1
    # the issuer's process start, start timeout and end are 3 per transfer; the fabric's own: about
    # one timeout at entry, one at completion and the landed event -- never one per byte or packet
    assert n < fabric_events <= 4 * n
    assert fabric.rate_solves <= 2 * n
    assert finish == pytest.approx(simulate_flows(two_nodes, flows).tolist(), rel=1e-9)
    again, _, _ = run_fabric(two_nodes, flows)
    assert again == finish
    expected = dict.fromkeys(fabric.link_ids, 0.0)
    for src, dst, nbytes, _ in flows:
        for lid in two_nodes.route(src, dst):
            expected[lid] += nbytes
    got = fabric.bytes_by_link
    assert all(got[lid] == pytest.approx(expected[lid], rel=1e-9, abs=1e-3) for lid in expected)


# ------------------------------------------------------------------ the System of many nodes
def test_two_node_system_names_routes_and_uncontended_times(two_nodes):
    hw = two_nodes.spec
    assert (hw.num_gpus, hw.num_nodes, hw.total_gpus, hw.gpu_fabric) == (8, 2, 16, "nvswitch")
    assert two_nodes.hosts == ["host", "host1"] and two_nodes.gpus[-1] == "gpu15"
    assert two_nodes.node_of("gpu7") == 0 and two_nodes.node_of("gpu8") == 1 and two_nodes.host_of("gpu9") == "host1"
    assert two_nodes.route(HOST, gpu_node(3)) == ("pcie5_x16:host->gpu3",)
    assert two_nodes.route("gpu0", "gpu1") == ("nvlink4:gpu0->nvswitch0", "nvlink4:nvswitch0->gpu1")
    assert two_nodes.route("gpu9", "gpu10") == ("nvlink4:gpu9->nvswitch1", "nvlink4:nvswitch1->gpu10")
    assert two_nodes.route("gpu2", "gpu13") == ("cx7_ib:gpu2->netswitch", "cx7_ib:netswitch->gpu13")
    nv, nic = hw.gpu_link, hw.nic
    assert two_nodes.transfer_s("gpu0", "gpu5", 1e9) == pytest.approx(nv.latency_s + 1e9 / nv.bandwidth_bps, rel=REL)
    assert two_nodes.transfer_s("gpu0", "gpu15", 1e9) == pytest.approx(nic.latency_s + 1e9 / 50e9, rel=REL)
    assert len(set(two_nodes.links())) == two_nodes.graph.number_of_edges()


def test_single_node_presets_keep_their_routes():
    mesh = System(compose_scenario(["hw=2xh800"]).hw)
    assert mesh.route("gpu0", "gpu1") == ("nvlink4_h800:gpu0->gpu1",)
    sw = System(compose_scenario(["hw=8xh200_nvswitch"]).hw)
    assert sw.route(HOST, "gpu7") == ("pcie5_x16:host->gpu7",)
    assert sw.transfer_s("gpu0", "gpu7", 1e9) == pytest.approx(5e-6 + 1e9 / 450e9, rel=REL)
    # a GPU sending to its 7 peers at once shares its one NVSwitch uplink: 7 GB at 450 GB/s
    flows = [("gpu0", f"gpu{j}", 1e9, 0.0) for j in range(1, 8)]
    assert simulate_flows(sw, flows).tolist() == pytest.approx([5e-6 + 7e9 / 450e9] * 7, rel=REL)


def test_num_nodes_needs_a_nic():
    spec = {"name": "x", "gpu": vars(GPU), "cpu": vars(CPU), "host_link": vars(LINK_10G), "num_nodes": 2}
    with pytest.raises(ConfigError, match=r"^hw\.nic=None is invalid; hw\.num_nodes=2 needs a nic") as info:
        build(SystemSpec, spec, "hw")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"hw\.gpu_fabric='ring' is not allowed"):
        build(SystemSpec, {**spec, "num_nodes": 1, "gpu_fabric": "ring"}, "hw")
