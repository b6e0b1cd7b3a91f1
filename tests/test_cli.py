"""The ``moesim`` command as a user runs it: outputs, sweeps, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.config import compose_scenario
from workloads.requests import build_requests
from workloads.trace import TraceMeta, requests_to_frame, write_trace

SMALL = ["workload.num_requests=3", "workload.prompt_len=16", "workload.output_len=8", "sim.progress=false"]
REQUIRED_KEYS = {"tpot_s", "ttft_s", "throughput_tok_s", "decode_tokens", "sim_wall_s", "events",
                 "expert_hit_rate", "h2d_bytes", "mean_active_experts", "model", "hw", "prefetch", "seed"}


def moesim(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from sim.cli import main; sys.argv[0] = 'moesim'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_default_run_writes_summary_and_records(tmp_path):
    out = moesim(tmp_path, *SMALL)
    assert out.returncode == 0, out.stderr
    assert "TPOT" in out.stdout and "expert hit rate" in out.stdout
    (summary_path,) = tmp_path.glob("outputs/*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert REQUIRED_KEYS <= set(summary)
    assert summary["model"] == "mixtral_8x7b" and summary["hw"] == "h100_pcie"
    steps = pd.read_parquet(summary_path.parent / "steps.parquet")
    reqs = pd.read_parquet(summary_path.parent / "requests.parquet")
    assert len(reqs) == 3 and summary["decode_tokens"] == 3 * 7
    assert steps.h2d_bytes.sum() == pytest.approx(summary["h2d_bytes"])
    # Mixtral experts are 352 MB each: every byte over PCIe is a whole number of experts.
    assert summary["h2d_bytes"] % (3 * 4096 * 14336 * 2) == 0


def test_multirun_sweep_writes_one_summary_per_job(tmp_path):
    out = moesim(tmp_path, "-m", "workload.batch_size=1,3", *SMALL)
    assert out.returncode == 0, out.stderr
    summaries = sorted(tmp_path.glob("multirun/*/*/*/summary.json"))
    assert len(summaries) == 2
    rows = pd.json_normalize([json.loads(p.read_text()) for p in summaries]).sort_values("batch_size")
    assert rows.batch_size.tolist() == [1, 3]
    # Batching three requests finishes the same work sooner.
    assert rows.throughput_tok_s.iloc[1] > rows.throughput_tok_s.iloc[0]
    # moesim-report gathers the sweep into one table, varying key first, and plots it.
    from sim.report import main as report

    sweep_dir = summaries[0].parent.parent
    assert report([str(sweep_dir)]) == 0
    table = pd.read_csv(sweep_dir / "report.csv")
    assert table["workload.batch_size"].tolist() == [1, 3]
    assert table.tpot_s.tolist() == rows.tpot_s.tolist()
    assert (sweep_dir / "report_tpot_s.png").stat().st_size > 1000
    assert report([str(tmp_path / "nothing-here")]) == 2


def _trace_for(model_name: str, path: Path) -> None:
    sc = compose_scenario([f"model={model_name}", "workload.num_requests=2", "workload.prompt_len=4",
                           "workload.output_len=3"])
    reqs = build_requests(sc.workload, sc.model, 0)
    write_trace(path, requests_to_frame(reqs, sc.model), TraceMeta.for_model(sc.model, source="test"))


@pytest.mark.parametrize("args,needle", [
    (["model=foo"], "model=foo is not a known model option; choose one of: deepseek_moe_16b"),
    (["hw=h900"], "hw=h900 is not a known hw option"),
    (["-m", "model=mixtral_8x7b,nope"], "model=nope is not a known model option"),
    (["hw.host_link.bandwidth_bps=0"], "hw.host_link.bandwidth_bps=0.0 is invalid; must be > 0"),
    (["hw.host_link.bandwidth_bps=-1e9"], "hw.host_link.bandwidth_bps=-1000000000.0 is invalid"),
    (["policy.prefetch.capacity_per_layer=8"], "policy.prefetch.capacity_per_layer=8 needs"),
    (["workload=trace"], "workload.path is required"),
    (["workload=trace", "workload.path=missing.parquet"], "missing.parquet"),
    (["workload=trace", "workload.path=olmoe.parquet"], "num_experts"),
])
def test_bad_input_is_one_line_exit_2_and_no_outputs(tmp_path, args, needle):
    _trace_for("olmoe_1b_7b", tmp_path / "olmoe.parquet")
    small = SMALL if "workload=trace" not in args else ["sim.progress=false"]
    out = moesim(tmp_path, *args, *small)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error: "), out.stderr
    assert needle in lines[0]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    assert (tmp_path / "olmoe.parquet").exists()  # nothing of the user's is touched


def test_trace_replay_matches_the_synthetic_run_it_was_written_from(tmp_path):
    sc = compose_scenario(["model=olmoe_1b_7b", "hw=t4", "workload.num_requests=3", "workload.prompt_len=8",
                           "workload.output_len=5", "workload.batch_size=2"])
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    write_trace(tmp_path / "t.parquet", requests_to_frame(reqs, sc.model), TraceMeta.for_model(sc.model, "test"))
    common = ["model=olmoe_1b_7b", "hw=t4", "workload.batch_size=2", "sim.progress=false"]
    synth = moesim(tmp_path, *common, "workload.num_requests=3", "workload.prompt_len=8", "workload.output_len=5",
                   "hydra.run.dir=synth")
    replay = moesim(tmp_path, *common, "workload=trace", f"workload.path={tmp_path / 't.parquet'}",
                    "hydra.run.dir=replay")
    assert synth.returncode == 0 and replay.returncode == 0, replay.stderr
    a = pd.read_parquet(tmp_path / "synth" / "steps.parquet")
    b = pd.read_parquet(tmp_path / "replay" / "steps.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert np.isclose(a.duration_s.sum(), b.duration_s.sum())


def test_policy_comparison_sweep_gathers_into_one_table(tmp_path):
    from sim.report import main as report

    out = moesim(tmp_path, "-m", "policy/prefetch=lru,lookahead,transition,oracle,fiddler",
                 "workload.num_requests=2", "workload.prompt_len=8", "workload.output_len=6", "sim.progress=false")
    assert out.returncode == 0, out.stderr
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    assert report([str(sweep_dir)]) == 0
    table = pd.read_csv(sweep_dir / "report.csv")
    assert sorted(table["policy/prefetch"]) == ["fiddler", "lookahead", "lru", "oracle", "transition"]
    for column in ("expert_hit_rate", "prefetch_precision", "prefetch_recall", "h2d_bytes",
                   "wasted_prefetch_bytes", "copy_stall_s", "tpot_s"):
        assert column in table
    oracle = table.set_index("policy/prefetch").loc["oracle"]
    assert (table.expert_hit_rate <= oracle.expert_hit_rate + 1e-12).all()
