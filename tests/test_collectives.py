"""Collectives as phases of concurrent transfers (hw/collectives.py, sim/links.py), against
hand-computed finish times."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from hw.collectives import all_to_all, collective_time_s, ring_all_gather, ring_all_reduce, ring_reduce_scatter
from hw.network import simulate_flows
from hw.system import System
from sim.config import compose_scenario
from sim.links import LinkFabric
from workloads.validation import ConfigError

REL = 1e-12
NV_BPS, NV_LAT_S = 450e9, 5e-6     # conf/hw/link/nvlink4.yaml: per direction, per GPU port
NIC_BPS, NIC_LAT_S = 50e9, 5e-6    # conf/hw/link/cx7_ib.yaml


@pytest.fixture(scope="module")
def h200x8() -> System:
    return System(compose_scenario(["hw=8xh200_nvswitch"]).hw)


@pytest.fixture(scope="module")
def two_nodes() -> System:
    return System(compose_scenario(["hw=2x8xh100_ib"]).hw)


def run_on_fabric(system: System, collective, extra=()):
    """Run ``collective`` (and ``extra`` transfers issued at 0) on a fresh fabric; (end, bytes, fabric)."""
    env = simpy.Environment()
    fabric = LinkFabric(env, system)
    others = [fabric.transfer(*t) for t in extra]
    proc = fabric.collective(collective)
    env.run()
    return env.now, proc.value, fabric, others


def test_ring_all_reduce_on_eight_h200(h200x8):
    n, p = 64e6, 8
    coll = ring_all_reduce(h200x8.gpus, n)
    # 2(p-1) = 14 phases; in each, every GPU's uplink and downlink carry one flow of n/p bytes
    expected = 2 * (p - 1) * (NV_LAT_S + (n / p) / NV_BPS)
    assert len(coll.phases) == 14 and all(len(ph) == 8 for ph in coll.phases)
    assert collective_time_s(h200x8, coll) == pytest.approx(expected, rel=REL)
    end_s, moved, _, _ = run_on_fabric(h200x8, coll)
    assert end_s == pytest.approx(expected, rel=REL)
    assert moved == coll.bytes_moved == pytest.approx(14 * 8 * n / p, rel=REL)


def test_ring_all_gather_and_reduce_scatter(h200x8):
    n, p = 8e6, 8
    for make in (ring_all_gather, ring_reduce_scatter):
        coll = make(h200x8.gpus, n)
        expected = (p - 1) * (NV_LAT_S + (n / p) / NV_BPS)
        assert len(coll.phases) == p - 1
        assert collective_time_s(h200x8, coll) == pytest.approx(expected, rel=REL)
    assert collective_time_s(h200x8, ring_all_reduce(["gpu3"], n)) == 0.0


def test_uniform_all_to_all_across_two_nodes(two_nodes):
    b = 1e6
    gpus = two_nodes.gpus
    m = np.full((16, 16), b)
    np.fill_diagonal(m, 0.0)
    coll = all_to_all(gpus, m)
    # Each sender has 7 intra-node flows on its one NVSwitch uplink (and every downlink receives 7):
    # 450/7 GB/s each, landing at 5us + 7b/450e9 = 5us + 15.556us. Its 8 inter-node flows share its
    # NIC (every remote NIC downlink also receives 8): 50/8 GB/s each, landing at 5us + 8b/50e9 =
    # 5us + 160us. Disjoint links, so neither group's end changes the other's rates.
    intra_s = NV_LAT_S + 7 * b / NV_BPS
    inter_s = NIC_LAT_S + 8 * b / NIC_BPS
    finish = simulate_flows(two_nodes, [(s, d, n, 0.0) for s, d, n in coll.phases[0]])
    same_node = [two_nodes.node_of(s) == two_nodes.node_of(d) for s, d, _ in coll.phases[0]]
    assert sum(same_node) == 16 * 7 and len(same_node) == 16 * 15
    assert finish[np.array(same_node)] == pytest.approx(np.full(112, intra_s), rel=REL)
    assert finish[~np.array(same_node)] == pytest.approx(np.full(128, inter_s), rel=REL)
    assert collective_time_s(two_nodes, coll) == pytest.approx(inter_s, rel=REL)
    end_s, moved, _, _ = run_on_fabric(two_nodes, coll)
    assert end_s == pytest.approx(inter_s, rel=REL)
    assert moved == coll.bytes_moved == m.sum() == 240 * b


def test_non_uniform_all_to_all(two_nodes):
    b = 1e6
    B, N = NV_BPS, NIC_BPS
    m = np.zeros((16, 16))
    m[0, 1], m[0, 2] = 2 * b, b                      # share gpu0's NVSwitch uplink
    m[4, 10], m[4, 11], m[6, 11], m[7, 11] = 4 * b, b, b, b   # gpu4's NIC; gpu11's NIC downlink
    m[5, 5] = 7 * b                                   # the diagonal sends nothing
    coll = all_to_all(two_nodes.gpus, m)
    # 0->1 and 0->2 at B/2 each; 0->2 lands at L + b/(B/2) = L + 2b/B, then 0->1's last b alone at
    #   B: L + 3b/B.
    # gpu11's NIC downlink carries 4->11, 6->11, 7->11: N/3 each (the tighter bottleneck); gpu4's NIC
    #   uplink carries 4->11 (N/3) and 4->10, which gets the rest, 2N/3. The three into gpu11 land at
    #   Ln + b/(N/3) = Ln + 3b/N; by then 4->10 has moved 2N/3 * 3b/N = 2b, its last 2b alone at N
    #   take 2b/N: Ln + 5b/N.
    expected = [NV_LAT_S + 3 * b / B, NV_LAT_S + 2 * b / B, NIC_LAT_S + 5 * b / N,
                NIC_LAT_S + 3 * b / N, NIC_LAT_S + 3 * b / N, NIC_LAT_S + 3 * b / N]
    phase = coll.phases[0]
    assert [(s, d) for s, d, _ in phase] == [("gpu0", "gpu1"), ("gpu0", "gpu2"), ("gpu4", "gpu10"),
                                             ("gpu4", "gpu11"), ("gpu6", "gpu11"), ("gpu7", "gpu11")]
    assert simulate_flows(two_nodes, [(s, d, n, 0.0) for s, d, n in phase]).tolist() == \
        pytest.approx(expected, rel=REL)
    assert collective_time_s(two_nodes, coll) == pytest.approx(NIC_LAT_S + 5 * b / N, rel=REL)
    end_s, moved, fabric, _ = run_on_fabric(two_nodes, coll)
    assert end_s == pytest.approx(NIC_LAT_S + 5 * b / N, rel=REL)
    assert moved == coll.bytes_moved == m.sum() - np.trace(m) == 10 * b
    assert fabric.bytes_by_link["cx7_ib:netswitch->gpu11"] == pytest.approx(3 * b, rel=REL)


def test_a_collective_shares_links_with_other_traffic(two_nodes):
    b = 1e6
    m = np.zeros((16, 16))
    m[0, 1] = b
    # the all-to-all's 0->1 and a plain copy 0->2 issued at the same time share gpu0's uplink:
    # B/2 each, both land at L + 2b/B
    end_s, _, _, (other,) = run_on_fabric(two_nodes, all_to_all(two_nodes.gpus, m), extra=[("gpu0", "gpu2", b)])
    assert end_s == pytest.approx(NV_LAT_S + 2 * b / NV_BPS, rel=REL)
    assert other.processed and other.value == b


def test_all_to_all_checks_its_matrix(two_nodes):
    with pytest.raises(ConfigError, match=r"all_to_all\.bytes_matrix=\(2, 2\) is invalid; must be 16 x 16"):
        all_to_all(two_nodes.gpus, np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="finite and >= 0"):
        all_to_all(["gpu0", "gpu1"], [[0, -1], [0, 0]])
    assert all_to_all(["gpu0", "gpu1"], [[5, 0], [0, 5]]).phases == ()
