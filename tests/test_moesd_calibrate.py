"""scripts/moesd_calibrate.py: the calibration arithmetic on hand-made peak curves, and one small
end-to-end run."""

from __future__ import annotations

import pandas as pd
import pytest


def _linear_runs() -> pd.DataFrame:
    """Two presets whose peak falls linearly with the overhead h (ms): A = 3 - 0.1 h at batch 32,
    B = 2.8 - 0.1 h at batch 64; each also has a lower point at batch 8 that must not count."""
    rows = []
    for h in (0.0, 2.0, 4.0, 6.0, 8.0, 10.0):
        rows += [{"preset": "A", "pass_overhead_ms": h, "batch_size": 32, "speedup": 3.0 - 0.1 * h},
                 {"preset": "A", "pass_overhead_ms": h, "batch_size": 8, "speedup": 1.0},
                 {"preset": "B", "pass_overhead_ms": h, "batch_size": 64, "speedup": 2.8 - 0.1 * h},
                 {"preset": "B", "pass_overhead_ms": h, "batch_size": 8, "speedup": 1.0}]
    return pd.DataFrame(rows)


def test_calibration_matches_each_preset_and_least_squares_by_hand(load_script):
    mod = load_script("moesd_calibrate")
    best, table = mod.report(_linear_runs(), {"A": 2.5, "B": 2.2})
    t = table.set_index("preset")
    # Each preset alone: 3 - 0.1 h = 2.5 at h = 5; 2.8 - 0.1 h = 2.2 at h = 6.
    assert t.loc["A", "match_ms"] == pytest.approx(5.0) and t.loc["B", "match_ms"] == pytest.approx(6.0)
    # Minimise ((0.5 - 0.1 h) / 2.5)^2 + ((0.6 - 0.1 h) / 2.2)^2: h = (0.5/2.5^2 + 0.6/2.2^2) /
    # (0.1/2.5^2 + 0.1/2.2^2) = 5.5637 ms, on the script's 0.01 ms grid 5.56.
    assert best == pytest.approx(5.56, abs=0.005)
    assert t.loc["A", "error_pct"] == pytest.approx(100 * ((3.0 - 0.556) / 2.5 - 1), abs=0.05)
    # Leave-one-out: A is predicted with B's overhead (6 ms): 2.4 against 2.5, -4 %.
    assert t.loc["A", "leave_one_out_ms"] == pytest.approx(6.0) and t.loc["A", "leave_one_out_error_pct"] == -4.0
    assert t.loc["B", "leave_one_out_ms"] == pytest.approx(5.0) and t.loc["B", "leave_one_out_error_pct"] == pytest.approx(
        100 * (2.3 / 2.2 - 1), abs=0.06)


def test_a_preset_the_range_cannot_match_says_so(load_script):
    mod = load_script("moesd_calibrate")
    pk = mod.peaks(_linear_runs())
    assert mod.matching_overhead(pk[pk.preset == "A"], 1.5) is None      # would need h = 15 ms
    assert mod.preset_batch_sizes("qwen2_2xh800")[:3] == [1, 2, 4]


def test_end_to_end_more_host_time_per_pass_means_less_speedup(tmp_path, capsys, load_script):
    mod = load_script("moesd_calibrate")
    out = tmp_path / "cal.csv"
    # Short requests (two speculative rounds of k + 1 = 5 tokens each, 8-token prompts): the
    # speedup is a ratio of per-step times, which do not depend on how many steps there are.
    assert mod.main(["--presets", "qwen2_2xh800", "--overheads-ms", "0,20", "-o", str(out),
                     "workload.output_len=10", "workload.prompt_len=8"]) == 0
    runs = pd.read_csv(out)
    sizes = mod.preset_batch_sizes("qwen2_2xh800")
    assert len(runs) == 2 * len(sizes)
    peak = runs.groupby("pass_overhead_ms")["speedup"].max()
    # Every round runs k + 1 = 5 passes where plain decoding runs one: host time per pass costs
    # speculation more than it costs the baseline.
    assert peak[20.0] < peak[0.0]
    assert "calibrated sim.pass_overhead_s" in capsys.readouterr().out


def test_bad_arguments_fail_in_one_line_and_write_nothing(tmp_path, load_script):
    mod = load_script("moesd_calibrate")
    out = tmp_path / "cal.csv"
    with pytest.raises(SystemExit, match="no published peak"):
        mod.main(["--presets", "opt_dense_2xa800", "-o", str(out)])
    with pytest.raises(SystemExit, match="at least two values"):
        mod.main(["--overheads-ms", "5", "-o", str(out)])
    with pytest.raises(SystemExit, match="Could not override 'hw.bogus'"):
        mod.main(["--presets", "qwen2_2xh800", "--overheads-ms", "0,1", "-o", str(out), "hw.bogus=1"])
    assert not out.exists()
