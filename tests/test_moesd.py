"""MoESD's analytical speedup model (``sim.moesd``): known answers, the physics of the batch-size
trend, fitting recovers what generated the data, and the ``moesim-moesd`` command."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sim.moesd import (
    MoESDParams, active_experts, ar_time_s, draft_time_s, expected_accepted_tokens, fit, main,
    parse_batch_sizes, predict, reject_time_s, roofline_curve, sigma, speedup, target_efficiency,
    verify_time_s,
)
from workloads.validation import ConfigError

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# A Qwen2-57B-A14B-like target (E=64, K=8) on an H800-like device (RP = 989e12/3.35e12 ~ 295
# FLOP/byte): 5 ms fixed, 5 ms of dense work per unit of G, 0.25 ms to load one expert's weights,
# G's knee at lam*RP = 147.5 tokens with ln(s) = 1/knee (G rises e-fold up to the knee, as a
# roofline would). The draft is a small dense model; rejection sampling is nearly free.
SPARSE = MoESDParams(num_experts=64, top_k=8, ridge_point=295.0, s=math.exp(1 / 147.5), lam=0.5,
                     bias_s=5e-3, k1_s=5e-3, k2_s=0.25e-3, k3_s=1e-4, draft_bias_s=2e-3,
                     draft_k_s=1e-3, reject_bias_s=1e-4, reject_k_s=1e-6)


def with_(params: MoESDParams, **changes) -> MoESDParams:
    return MoESDParams(**{**params.to_dict(), **changes})


def measurements(params: MoESDParams, batches=BATCHES, gammas=(1, 2, 3, 4)) -> pd.DataFrame:
    """What a profiler would have measured if the model were exact."""
    rows = [dict(batch_size=b, gamma=g, target_1_s=ar_time_s(params, b),
                 target_gamma_s=verify_time_s(params, b, g), draft_s=draft_time_s(params, b),
                 reject_s=reject_time_s(params, b))
            for b in batches for g in gammas]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# sigma and speedup: known answers
# ------------------------------------------------------------------------------------------

def test_sigma_known_values():
    # by hand: (1 - 0.9^5) / (1 - 0.9) = (1 - 0.59049) / 0.1 = 4.0951 tokens; / 5 positions
    assert sigma(0.9, 4) == pytest.approx(0.81902, abs=1e-12)
    assert expected_accepted_tokens(0.9, 4) == pytest.approx(4.0951, abs=1e-12)
    # every draft accepted: all gamma + 1 positions commit; none accepted: only the bonus token
    assert sigma(1.0, 4) == 1.0 and expected_accepted_tokens(1.0, 4) == 5.0
    assert sigma(0.0, 4) == pytest.approx(1 / 5) and expected_accepted_tokens(0.0, 3) == 1.0
    # gamma = 1: 1 + alpha tokens out of 2 positions
    assert sigma(0.6, 1) == pytest.approx(0.8)
    # continuous at alpha -> 1 (no cancellation in the closed form's 0/0)
    assert sigma(1 - 1e-12, 4) == pytest.approx(1.0, abs=1e-10)
    # vectorised, and more acceptance never commits fewer tokens
    alphas = np.linspace(0, 1, 11)
    values = sigma(alphas, 3)
    assert values.shape == (11,) and np.all(np.diff(values) > 0)


def test_speedup_is_sigma_times_positions_when_drafting_is_free_and_verify_costs_one_step():
    t = 0.02
    assert target_efficiency(t, t) == 1.0
    for alpha, gamma in [(0.9, 4), (0.5, 2), (1.0, 3)]:
        assert speedup(alpha, gamma, t, t, 0.0, 0.0) == pytest.approx(sigma(alpha, gamma) * (gamma + 1))
    # nothing accepted, everything free: one token per round at one decode step's cost -> 1x
    assert speedup(0.0, 4, t, t, 0.0, 0.0) == pytest.approx(1.0)
    # ... and any drafting cost then makes SD a slowdown
    assert speedup(0.0, 4, t, t, 1e-3, 0.0) < 1.0


def test_speedup_scales_with_target_efficiency_and_draft_cost():
    t1 = 0.02
    # draft free: speedup = sigma (gamma + 1) * TE exactly
    for tg in (0.02, 0.03, 0.05):
        te = target_efficiency(t1, tg)
        assert speedup(0.8, 3, t1, tg, 0.0, 0.0) == pytest.approx(sigma(0.8, 3) * 4 * te)
    # a round of gamma draft steps costing one decode step adds 1 to the denominator
    assert speedup(0.8, 3, t1, t1, t1 / 3, 0.0) == pytest.approx(sigma(0.8, 3) * 4 / 2)
    # reject time counts like verify time
    assert speedup(0.8, 3, t1, t1, 0.0, t1) == pytest.approx(sigma(0.8, 3) * 4 / 2)


@pytest.mark.parametrize("call, needle", [
    (lambda: sigma(1.1, 4), "alpha=1.1"),
    (lambda: sigma(-0.1, 4), "alpha=-0.1"),
    (lambda: sigma(float("nan"), 4), "alpha=nan"),
    (lambda: sigma(0.5, 0), "gamma=0"),
    (lambda: sigma(0.5, 2.5), "gamma=2.5"),
    (lambda: speedup(0.9, 4, 0.0, 0.02, 0.0, 0.0), "t_target_1=0.0"),
    (lambda: speedup(0.9, 4, 0.02, 0.02, -1e-3, 0.0), "t_draft_1=-0.001"),
    (lambda: target_efficiency(0.02, float("inf")), "t_target_gamma=inf"),
])
def test_bad_arguments_are_one_line_config_errors(call, needle):
    with pytest.raises(ConfigError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# The forward-time model
# ------------------------------------------------------------------------------------------

def test_roofline_curve_is_exponential_then_its_tangent_line():
    s, lam, rp = 1.01, 0.2, 250.0
    knee = lam * rp  # 50 tokens
    assert roofline_curve(0, s, lam, rp) == 1.0
    assert roofline_curve(30, s, lam, rp) == pytest.approx(1.01 ** 30)
    # beyond the knee: straight line with the exponential's slope at the knee
    g_knee, slope = 1.01 ** knee, 1.01 ** knee * math.log(1.01)
    for t in (60.0, 500.0, 5000.0):
        assert roofline_curve(t, s, lam, rp) == pytest.approx(g_knee + slope * (t - knee))
    # continuous in value and slope at the knee
    eps = 1e-6
    left = (roofline_curve(knee, s, lam, rp) - roofline_curve(knee - eps, s, lam, rp)) / eps
    right = (roofline_curve(knee + eps, s, lam, rp) - roofline_curve(knee, s, lam, rp)) / eps
    assert left == pytest.approx(right, rel=1e-5)


def test_active_experts_and_verify_tokens():
    # N(1) = K, N saturates at E; the verify pass carries gamma + 1 positions per request
    assert active_experts(1, 64, 8) == pytest.approx(8.0)
    assert active_experts(1000, 64, 8) == pytest.approx(64.0)
    assert verify_time_s(SPARSE, 4, 3) == pytest.approx(ar_time_s(SPARSE, 16))
    # a dense-like router (K = E) touches every expert from the first token
    assert active_experts(np.array([1, 5]), 64, 64) == pytest.approx([64.0, 64.0])


# ------------------------------------------------------------------------------------------
# Batch-size trends (the paper's Section 3 findings)
# ------------------------------------------------------------------------------------------

def test_sparse_moe_speedup_rises_then_falls_with_batch_size():
    table = predict(SPARSE, BATCHES, gamma=4, alpha=0.9)
    sp = table.speedup.to_numpy()
    peak = int(np.argmax(sp))
    assert 0 < peak < len(sp) - 1, sp
    assert np.all(np.diff(sp[: peak + 1]) > 0) and np.all(np.diff(sp[peak:]) < 0), sp
    # at B=1 verifying 5 tokens loads ~4x the experts of one decode step: TE well below 1
    assert table.target_efficiency.iloc[0] < 0.7
    # alpha barely matters for the shape: sigma is the same for every B
    assert table.sigma.nunique() == 1
    # G past its knee (compute-bound) drags TE down at large B
    assert table.target_efficiency.iloc[-1] < table.target_efficiency.iloc[peak]


def test_dense_like_routing_speedup_only_falls():
    dense = with_(SPARSE, top_k=SPARSE.num_experts)
    table = predict(dense, BATCHES, gamma=4, alpha=0.9)
    assert np.all(np.diff(table.speedup.to_numpy()) < 0), table.speedup.tolist()
    assert np.all(np.diff(table.target_efficiency.to_numpy()) < 0)
    # at B=1 verify loads no more experts than decoding does, so dense-like beats sparse there
    assert table.speedup.iloc[0] > predict(SPARSE, [1], 4, 0.9).speedup.iloc[0]


def test_sparser_moe_peaks_at_larger_batch():
    # same total expert bytes (k2 * E), same K, four times the experts: rho = K/E drops 1/8 -> 1/32
    sparser = with_(SPARSE, num_experts=256, k2_s=SPARSE.k2_s * 64 / 256)
    b = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    peak = lambda p: int(predict(p, b, 4, 0.9).set_index("batch_size").speedup.idxmax())  # noqa: E731
    assert peak(sparser) > peak(SPARSE)


# ------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------

def test_fit_recovers_the_parameters_that_generated_the_measurements():
    got = fit(measurements(SPARSE), num_experts=64, top_k=8, ridge_point=295.0)
    want = SPARSE.to_dict()
    for key in ("s", "lam", "bias_s", "k1_s", "k2_s", "k3_s", "draft_bias_s", "draft_k_s",
                "reject_bias_s", "reject_k_s"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-6, abs=1e-12), key
    assert got.fit_rms_rel_error < 1e-9 and got.fit_rows == 36
    # deterministic
    assert fit(measurements(SPARSE), 64, 8, 295.0) == got


def test_fit_to_noisy_measurements_reports_the_noise_and_predicts_speedup():
    rng = np.random.default_rng(7)
    noisy = measurements(SPARSE)
    for col in ("target_1_s", "target_gamma_s", "draft_s", "reject_s"):
        noisy[col] *= 1 + 0.01 * rng.standard_normal(len(noisy))
    got = fit(noisy.sample(frac=1.0, random_state=1), 64, 8, 295.0)  # row order is irrelevant
    assert 0.005 < got.fit_rms_rel_error < 0.015  # the 1% noise, not model error
    ratio = predict(got, BATCHES, 4, 0.9).speedup / predict(SPARSE, BATCHES, 4, 0.9).speedup
    assert np.all(np.abs(ratio - 1) < 0.02), ratio.tolist()


@pytest.mark.parametrize("edit, needle", [
    (lambda df: df.drop(columns=["draft_s", "reject_s"]), "lack column(s) draft_s, reject_s"),
    (lambda df: df.assign(batch_size=df.batch_size.where(df.index != 5, 0)), "row 5: batch_size=0"),
    (lambda df: df.assign(gamma=df.gamma.astype(float).where(df.index != 2, 1.5)), "row 2: gamma=1.5"),
    (lambda df: df.assign(target_1_s=df.target_1_s.where(df.index != 3, -1.0)), "row 3: target_1_s=-1.0"),
    (lambda df: df.assign(reject_s="x"), "reject_s='x'"),
    (lambda df: df.head(2), "at least 3 rows"),
])
def test_fit_rejects_bad_measurements(edit, needle):
    with pytest.raises(ConfigError) as info:
        fit(edit(measurements(SPARSE)), 64, 8, 295.0)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_fit_rejects_bad_model_constants():
    df = measurements(SPARSE)
    for args, needle in [((64, 0, 295.0), "top_k=0"), ((8, 64, 295.0), "top_k=64"),
                         ((64, 8, 0.0), "ridge_point=0.0")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            fit(df, *args)


def test_params_round_trip_and_validation():
    assert MoESDParams.from_dict(json.loads(json.dumps(SPARSE.to_dict()))) == SPARSE
    with pytest.raises(ConfigError, match="colour is not a known key"):
        MoESDParams.from_dict({**SPARSE.to_dict(), "colour": 1})
    with pytest.raises(ConfigError, match="s=1.0 is invalid"):
        with_(SPARSE, s=1.0)
    with pytest.raises(ConfigError, match="k2_s=-1"):
        with_(SPARSE, k2_s=-1.0)


def test_predict_validates_and_has_the_documented_columns():
    table = predict(SPARSE, [1, 8], 2, 0.7)
    assert list(table.columns) == ["batch_size", "gamma", "alpha", "sigma", "target_efficiency", "speedup",
                                   "target_1_s", "target_gamma_s", "draft_s", "reject_s"]
    assert table.batch_size.tolist() == [1, 8] and (table.gamma == 2).all()
    for bad, needle in [(([0, 1], 2, 0.7), "batch_size=[0, 1]"), (([1], 2, 1.5), "alpha=1.5"),
                        (([1], 0, 0.7), "gamma=0")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            predict(SPARSE, *bad)


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,2,4,...,128") == [1, 2, 4, 8, 16, 32, 64, 128]
    assert parse_batch_sizes("8,16,24,...,48") == [8, 16, 24, 32, 40, 48]
    assert parse_batch_sizes(" 3, 5 ,7") == [3, 5, 7]
    for bad in ("", "1,x", "0,1", "1,2,...,8", "1,2,4,...,100", "1,3,4,...,9"):
        with pytest.raises(ConfigError):
            parse_batch_sizes(bad)


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------

def test_cli_fit_then_predict_round_trip(tmp_path, capsys):
    meas = tmp_path / "meas.csv"
    measurements(SPARSE).to_csv(meas, index=False)
    params_path = tmp_path / "out" / "params.json"
    assert main(["fit", str(meas), "--num-experts", "64", "--top-k", "8", "--ridge-point", "295",
                 "-o", str(params_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "fit RMS relative error" in out
    saved = json.loads(params_path.read_text())
    assert saved["k2_s"] == pytest.approx(SPARSE.k2_s, rel=1e-6)
    assert [p.name for p in params_path.parent.iterdir()] == ["params.json"]  # no temp left behind

    pred = tmp_path / "pred.csv"
    assert main(["predict", str(params_path), "--batch-sizes", "1,2,4,...,256", "--gamma", "4",
                 "--alpha", "0.9", "-o", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "peak speedup" in out
    got = pd.read_csv(pred)
    want = predict(SPARSE, BATCHES, 4, 0.9)
    assert list(got.columns) == list(want.columns)
    np.testing.assert_allclose(got.speedup, want.speedup, rtol=1e-6)
    np.testing.assert_allclose(got.target_gamma_s, want.target_gamma_s, rtol=1e-6)

    # Parquet in, and predict without -o only prints
    pq = tmp_path / "meas.parquet"
    measurements(SPARSE).to_parquet(pq, index=False)
    assert main(["fit", str(pq), "--num-experts", "64", "--top-k", "8", "--ridge-point", "295",
                 "-o", str(tmp_path / "p2.json")]) == 0
    assert main(["predict", str(tmp_path / "p2.json"), "--gamma", "2", "--alpha", "0.5"]) == 0
    assert "peak speedup" in capsys.readouterr().out


def _bad(capsys, argv, output):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("moesim-moesd: error: ") and "\n" not in err, err
    assert not output.exists() and not list(output.parent.glob(f".{output.name}*"))
    return err


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    good = tmp_path / "meas.csv"
    measurements(SPARSE).to_csv(good, index=False)
    params_out = tmp_path / "params.json"
    fit_args = ["--num-experts", "64", "--top-k", "8", "--ridge-point", "295", "-o", str(params_out)]

    missing = tmp_path / "missing.csv"
    measurements(SPARSE).drop(columns=["reject_s"]).to_csv(missing, index=False)
    assert "reject_s" in _bad(capsys, ["fit", str(missing), *fit_args], params_out)

    zero_batch = tmp_path / "zero.csv"
    measurements(SPARSE).assign(batch_size=0).to_csv(zero_batch, index=False)
    assert "batch_size=0" in _bad(capsys, ["fit", str(zero_batch), *fit_args], params_out)

    assert "does not exist" in _bad(capsys, ["fit", str(tmp_path / "nope.csv"), *fit_args], params_out)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert "not a readable parquet" in _bad(capsys, ["fit", str(garbage), *fit_args], params_out)
    assert "required" in _bad(capsys, ["fit", str(good), "--num-experts", "64", "-o", str(params_out)],
                              params_out)
    assert "top_k=80" in _bad(capsys, ["fit", str(good), "--num-experts", "64", "--top-k", "80",
                                       "--ridge-point", "295", "-o", str(params_out)], params_out)

    # predict
    assert main(["fit", str(good), *fit_args]) == 0
    capsys.readouterr()
    pred_out = tmp_path / "pred.csv"
    pred = ["predict", str(params_out), "-o", str(pred_out)]
    assert "alpha=1.5" in _bad(capsys, [*pred, "--gamma", "4", "--alpha", "1.5"], pred_out)
    assert "gamma=0" in _bad(capsys, [*pred, "--gamma", "0", "--alpha", "0.9"], pred_out)
    assert "batch sizes must be positive" in _bad(
        capsys, [*pred, "--gamma", "4", "--alpha", "0.9", "--batch-sizes", "0,1"], pred_out)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "not readable JSON" in _bad(capsys, ["predict", str(broken), "--gamma", "4", "--alpha", "0.9",
                                                "-o", str(pred_out)], pred_out)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**SPARSE.to_dict(), "lam": -1}))
    assert "lam=-1" in _bad(capsys, ["predict", str(wrong), "--gamma", "4", "--alpha", "0.9",
                                     "-o", str(pred_out)], pred_out)


def test_module_runs_as_a_command_without_torch_or_simpy(tmp_path):
    code = ("import sys, sim.moesd; bad = {'torch', 'simpy'} & set(sys.modules); "
            "assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    out = subprocess.run([sys.executable, "-m", "sim.moesd", "predict", str(tmp_path / "none.json"),
                          "--gamma", "4", "--alpha", "0.9"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("moesim-moesd: error: params ")
    assert len(out.stderr.strip().splitlines()) == 1
