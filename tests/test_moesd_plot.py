"""scripts/moesd_plot.py on a small sweep: gathers runs, fits MoESD's model, writes its files."""

from __future__ import annotations

import pandas as pd
import pytest

from sim.cli import write_outputs
from sim.config import compose_scenario
from sim.engine import simulate


def test_plot_script_gathers_fits_and_reports_peaks(tmp_path, load_script):
    sweep = tmp_path / "sweep"
    for i, b in enumerate((1, 8, 32, 128)):
        sc = compose_scenario(["+experiment=moesd_qwen2_2xh800", f"workload.batch_size={b}", "workload.output_len=24",
                               "workload.prompt_len=64"])
        write_outputs(simulate(sc), sweep / str(i))
    out = tmp_path / "moesd.png"
    assert load_script("moesd_plot").main([str(sweep), "-o", str(out)]) == 0
    runs = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(runs["batch_size"]) == [1, 8, 32, 128] and runs["moesd_model_speedup"].notna().all()
    meas = pd.read_csv(tmp_path / "moesd_measurements.csv")
    assert {"batch_size", "gamma", "target_1_s", "target_gamma_s", "draft_s", "reject_s"} <= set(meas.columns)
    assert (meas["gamma"] == 4).all() and out.stat().st_size > 0


def test_plot_script_refuses_runs_without_speculation(tmp_path, load_script):
    sc = compose_scenario(["workload.num_requests=1", "workload.output_len=4", "sim.progress=false"])
    write_outputs(simulate(sc), tmp_path / "sweep" / "0")
    with pytest.raises(SystemExit, match="without speculation"):
        load_script("moesd_plot").main([str(tmp_path / "sweep"), "-o", str(tmp_path / "x.png")])


def test_a_gamma_sweep_gets_a_curve_per_gamma_and_only_gamma_4_a_published_peak(tmp_path, load_script, capsys):
    sweep = tmp_path / "sweep"
    for i, (k, b) in enumerate((k, b) for k in (2, 4) for b in (1, 8, 32)):
        sc = compose_scenario(["+experiment=moesd_qwen2_2xh800", f"workload.batch_size={b}", "workload.output_len=16",
                               "workload.prompt_len=32", f"policy.speculation.k={k}", "policy.speculation.sigma=null",
                               "policy.speculation.alpha=0.947"])
        write_outputs(simulate(sc), sweep / str(i))
    out = tmp_path / "gamma.png"
    assert load_script("moesd_plot").main([str(sweep), "-o", str(out)]) == 0
    runs = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(runs["setup"].unique()) == ["qwen2_57b_a14b 2xh800 model gamma=2", "qwen2_57b_a14b 2xh800 model gamma=4"]
    printed = capsys.readouterr().out
    gamma2 = next(line for line in printed.splitlines() if "gamma=2" in line)
    gamma4 = next(line for line in printed.splitlines() if "gamma=4" in line)
    assert "2.29" in gamma4 and "2.29" not in gamma2   # MoESD's 2.29x is a gamma-4 figure
