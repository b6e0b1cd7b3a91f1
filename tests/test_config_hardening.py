"""Config values a user can get wrong: each refused in one line before anything runs, or warned about."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sim.config import compose_scenario
from sim.engine import simulate
from workloads.requests import build_requests, routing_bytes_estimate, synthetic_request_count
from workloads.validation import ConfigError


@pytest.mark.parametrize("override", ["hw.host_link.bandwidth_bps=inf", "hw.gpu.peak_flops=inf",
                                      "hw.gpu.mem_bw_bps=nan", "workload.arrival_rate_per_s=inf",
                                      "sim.pass_overhead_s=inf"])
def test_infinite_or_nan_rates_and_bandwidths_are_refused(override):
    extra = ["workload.arrival=poisson"] if "arrival" in override else []
    with pytest.raises(ConfigError, match="finite number"):
        compose_scenario(extra + [override])


@pytest.mark.parametrize("batch,expected", [(1, 8), (4, 8), (16, 32), (64, 128)])
def test_default_request_count_follows_the_batch_size(batch, expected):
    sc = compose_scenario([f"workload.batch_size={batch}"])
    assert synthetic_request_count(sc.workload) == expected
    assert sc.choices()["num_requests"] == expected
    assert synthetic_request_count(compose_scenario([f"workload.batch_size={batch}", "workload.num_requests=3"]).workload) == 3


def test_batch_sizes_16_and_64_no_longer_give_identical_numbers():
    # The README sweep workload.batch_size=1,4,16,64 used to run 8 requests for both.
    small = ["model=olmoe_1b_7b", "workload.prompt_len=16", "workload.output_len=4", "sim.progress=false"]
    a = simulate(compose_scenario(small + ["workload.batch_size=16"]))
    b = simulate(compose_scenario(small + ["workload.batch_size=64"]))
    assert a.steps.batch_size.max() == 16 and b.steps.batch_size.max() == 64
    assert a.summary["tpot_s"] != b.summary["tpot_s"]


def test_a_batch_that_can_never_fill_is_warned_about_in_one_line(caplog):
    sc = compose_scenario(["model=olmoe_1b_7b", "workload.batch_size=32", "workload.num_requests=8",
                           "workload.prompt_len=16", "workload.output_len=3", "sim.progress=false"])
    with caplog.at_level(logging.WARNING, logger="moesim"):
        simulate(sc)
    (record,) = [r for r in caplog.records if r.name == "moesim"]
    assert "batch_size=32 can never fill" in record.getMessage() and "\n" not in record.getMessage()


def test_routing_memory_estimate_matches_what_is_built():
    sc = compose_scenario(["model=olmoe_1b_7b", "workload.num_requests=5", "workload.prompt_len=20",
                           "workload.output_len=7"])
    built = sum(r.experts.nbytes + (r.predictions().nbytes if r.has_predictions else 0)
                for r in build_requests(sc.workload, sc.model, sc.seed))
    # 5 requests x (20 + 7 - 1) positions built; the estimate counts 20 + 7 (one spare) plus 2 KB each
    estimate = routing_bytes_estimate(sc.workload, sc.model)
    assert built <= estimate <= built * 27 / 26 + 2048 * 5 + 1


def test_a_workload_too_big_for_memory_is_refused_with_its_estimate_and_leaves_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sim.cli", "workload.num_requests=1e12", "hydra.run.dir=run"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "workload.num_requests=1000000000000 needs about" in lines[0] and "GB" in lines[0]
    assert not (tmp_path / "run").exists()
