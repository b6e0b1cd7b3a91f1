"""Fitting the synthetic router to traces (workloads/fit.py, ``moesim-trace fit`` / ``generate``):
round trips with known knobs, the real DeepSeek trace (fit -> generate -> the statistics come back),
params.yaml and the moesim overrides, generation consistent with moesim's own workload, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from sim.trace_cli import main
from workloads.fit import (WORKLOAD_KEY_DOCS, fit_trace, generate_routed, moesim_overrides,
                           params_model)
from workloads.synthetic import RoutingConfig, generate_routing
from workloads.trace import (RoutedRequest, TraceMeta, load_trace_requests, read_trace,
                             requests_to_frame, write_trace)
from workloads.trace_stats import (affinity, distinct_experts, flatten, hit_rates, model_for_trace,
                                   popularity, reuse)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEEPSEEK_DIR = TRACES / "moelens" / "DeepSeek" / "deepseek_routing_trace"
DEEPSEEK_ID = "deepseek-ai/deepseek-moe-16b-base"


# ------------------------------------------------------------------ round trips with known knobs

def synthetic_trace(kind, p, q, s, E=16, K=2, M=8, requests=50, tokens=60, seed=100):
    model = model_for_trace("toy_moe", E, K, M, range(M))
    cfg = RoutingConfig(kind, p, q, s)
    routing = generate_routing(model, cfg, [tokens] * requests, np.random.default_rng(seed))
    reqs = [RoutedRequest(i, tokens // 2, tokens - tokens // 2 + 1, x) for i, x in enumerate(routing)]
    return reqs, TraceMeta.for_model(model, "test")


def test_round_trip_recovers_known_knobs():
    # 50 requests x 60 tokens x 8 layers of 16 experts (top-2). Over repeated draws of such a
    # trace the fitted knobs scatter with sd ~0.03 (popularity: the median over 8 layers of
    # max/mean), ~0.002 (reuse) and ~0.015 (inheritance probability 1 - e^-strength);
    # tolerances are about 3 sd, and the fit's own standard errors must cover the error.
    reqs, meta = synthetic_trace("realistic", 2.0, 0.3, 1.5)
    res = fit_trace(reqs, meta)
    wl, unc = res.workload(), res.details["uncertainty"]
    assert wl["routing"] == "realistic" and not res.notes and res.details["saturated"] == []
    assert wl["popularity_max_over_mean"] == pytest.approx(2.0, abs=0.1)
    assert wl["reuse_prob"] == pytest.approx(0.3, abs=0.008)
    beta = 1 - math.exp(-wl["affinity_strength"])
    assert beta == pytest.approx(1 - math.exp(-1.5), abs=0.05)
    assert abs(wl["popularity_max_over_mean"] - 2.0) < 4 * unc["popularity_max_over_mean"]
    assert abs(beta - (1 - math.exp(-1.5))) < 4 * unc["affinity_inherit_prob"]
    # lengths: every request has 30 prompt positions and 31 generated tokens
    assert (wl["num_requests"], wl["prompt_len"], wl["output_len"], wl["length_dist"]) == (50, 30, 31, "fixed")
    # the fitted generator reproduces the statistics it was fitted to, at this sample size
    assert res.expected["popularity_median"] == pytest.approx(res.observed["popularity_median"], abs=0.02)
    assert res.expected["affinity_excess"] == pytest.approx(res.observed["affinity_excess"], abs=0.004)


@pytest.mark.parametrize("kind, p, q, s", [("uniform", 1.0, None, 0.0), ("temporal", 1.6, 0.35, 0.0)])
def test_round_trip_switches_features_off(kind, p, q, s):
    # features that are absent stay off (the 2-sigma rule), those present are recovered
    reqs, meta = synthetic_trace(kind, p, q, s, seed=7)
    wl = fit_trace(reqs, meta).workload()
    assert wl["routing"] == kind
    assert wl["affinity_strength"] == 0.0
    if kind == "uniform":
        assert wl["popularity_max_over_mean"] == 1.0 and wl["reuse_prob"] is None
    else:
        assert wl["popularity_max_over_mean"] == pytest.approx(p, abs=0.1)
        assert wl["reuse_prob"] == pytest.approx(q, abs=0.008)


def test_lengths_are_fitted():
    reqs, meta = synthetic_trace("uniform", 1.0, None, 0.0, requests=6, tokens=8)
    # prompts 1..6 (mean 3.5, sd 1.708) and outputs 8 - prompt + 1 = 8..3 (mean 5.5)
    cut = [RoutedRequest(i, 1 + i, 8 - i, r.experts) for i, r in enumerate(reqs)]
    res = fit_trace(cut, meta)
    assert res.length_stats["prompt_len"] == {"mean": 3.5, "std": pytest.approx(1.7078, abs=1e-4),
                                              "min": 1, "max": 6}
    assert res.length_stats["output_len"]["mean"] == 5.5 and res.length_stats["tokens"] == 48
    wl = res.workload()
    assert (wl["num_requests"], wl["prompt_len"], wl["output_len"]) == (6, 4, 6)  # half up
    # spread of a uniform law with the same coefficient of variation, weighted by the 21 prompt
    # and 27 decode positions: (21 * sqrt(3)*1.708/3.5 + 27 * sqrt(3)*1.708/5.5) / 48
    assert wl["length_dist"] == "uniform"
    assert wl["length_spread"] == pytest.approx((21 * 0.84515 + 27 * 0.53782) / 48, abs=1e-3)


# ------------------------------------------------------------------ the real DeepSeek trace

def load_deepseek():
    """MoELens DeepSeek-MoE-16B prompts -> RoutedRequests (MoE layers 1..27), prompt order."""
    files = sorted(DEEPSEEK_DIR.glob("prompt-*.json"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    out = []
    for i, path in enumerate(files):
        data = json.loads(path.read_text())
        layers = [layer for layer in data["layers"] if not layer["is_dense"]]
        rows = [[tok["top_experts"] for tok in sorted(layer["tokens"], key=lambda t: t["token_index"])]
                for layer in layers]
        ex = np.asarray(rows, dtype=np.int16).transpose(1, 0, 2)  # [T, 27, 6]
        out.append(RoutedRequest(i, ex.shape[0], 1, np.ascontiguousarray(ex)))
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(requests, trace path, params path, params) with params from ``moesim-trace fit``."""
    if not DEEPSEEK_DIR.is_dir():
        pytest.skip(f"{DEEPSEEK_DIR} is absent")
    reqs = load_deepseek()
    model = model_for_trace(DEEPSEEK_ID, 64, 6, 28, range(1, 28))
    tmp = tmp_path_factory.mktemp("deepseek")
    trace = tmp / "deepseek.parquet"
    write_trace(trace, requests_to_frame(reqs, model), TraceMeta.for_model(model, "MoELens"))
    params_path = tmp / "params.yaml"
    assert main(["fit", str(trace), "-o", str(params_path)]) == 0
    return reqs, trace, params_path, yaml.safe_load(params_path.read_text())


def test_deepseek_fit_identity_lengths_and_knobs(deepseek):
    reqs, _, _, params = deepseek
    m = params["model"]
    assert (m["name"], m["catalog"], m["trace_model"]) == ("deepseek_moe_16b", True, DEEPSEEK_ID)
    assert (m["num_experts"], m["top_k"], m["num_layers"], m["moe_layers"]) == (64, 6, 28, list(range(1, 28)))
    wl = params["workload"]
    assert (wl["num_requests"], wl["prompt_len"], wl["output_len"]) == (10, 9, 1)  # 87 / 10 = 8.7
    assert wl["length_dist"] == "uniform" and wl["length_spread"] == pytest.approx(0.3676, abs=1e-3)
    assert wl["routing"] == "realistic"
    # 87 tokens read max/mean 3.31; the bias-corrected knob is lower (~3.2)
    assert 2.8 < wl["popularity_max_over_mean"] < 3.31
    assert wl["reuse_prob"] == pytest.approx(0.2624, abs=1e-4)
    fit = params["fit"]
    assert fit["observed"]["popularity_median"] == pytest.approx(3.3103, abs=1e-4)
    assert fit["expected"]["popularity_median"] == pytest.approx(3.3103, abs=0.06)
    # reuse and cross-layer affinity are reached together: nothing saturates, no caveats
    assert fit["saturated"] == [] and fit["notes"] == []
    assert 0 < wl["affinity_strength"] < 8


GROUPS = 20  # generated copies of the trace's 10 request lengths (200 requests)


def group_statistics(reqs):
    f = flatten(reqs, 64)
    a = affinity(f, 64)
    return {"popularity": popularity(f, 64).median, "reuse": reuse(f, 64).overall,
            "affinity": a.overall, "affinity_excess": a.excess,
            "consecutive": distinct_experts(f, 64, [1, 2, 4, 8]).consecutive,
            "random": distinct_experts(f, 64, [1, 2, 4, 8, 16, 32, 64]).random,
            "lru": hit_rates(f, 64, None, ["lru"]).hit_rate("lru")}


def generated_statistics(params, reqs, seed=1):
    """Statistics of a 200-request generated trace, computed on each group of 10 requests with
    the real trace's lengths (the statistics depend on the sample size), averaged over groups."""
    model = params_model(params).spec()
    gen = generate_routed(params, model, [(r.prompt_len, r.output_len) for r in reqs] * GROUPS, seed)
    rows = [group_statistics(gen[i * len(reqs):(i + 1) * len(reqs)]) for i in range(GROUPS)]
    return ({k: np.mean([r[k] for r in rows], axis=0) for k in rows[0]},
            {k: np.std([r[k] for r in rows], axis=0, ddof=1) for k in rows[0]})


@pytest.fixture(scope="module")
def deepseek_comparison(deepseek):
    reqs, _, _, params = deepseek
    mean, sd = generated_statistics(params, reqs)
    return group_statistics(reqs), mean, sd


def test_deepseek_generated_trace_reproduces_fitted_statistics(deepseek_comparison):
    real, gen, sd = deepseek_comparison
    # Tolerances: at 87 tokens one sample of median-over-layers max/mean has sd ~0.1. The 20
    # generated samples share one generator call's popularity tables, and with strong cross-layer
    # attachment the layers share noise, so their mean spreads more around the fit's expectation
    # than 20 independent samples would: over generation seeds 1-8 the gap to the trace ran from
    # -0.025 to +0.074 (seed 1, used here: +0.074). Stated tolerance 0.1.
    assert sd["popularity"] == pytest.approx(0.1, abs=0.05)
    assert gen["popularity"] == pytest.approx(real["popularity"], abs=0.1)
    # reuse: one sample's sd ~0.006 (77 position pairs x 6 x 27 layers), 20 samples -> 0.0013,
    # the generator's own calibration error <= 0.002: 0.01 is ~4 sd
    assert gen["reuse"] == pytest.approx(real["reuse"], abs=0.01)
    # distinct experts of t random tokens across requests (what a batch of t decodes needs):
    # one sample's sd is <= 0.5% of the mean; the fitted generator is within 2.5% of the trace at
    # every t. (The trace sits ~1% below: prompts share tokens, e.g. the BOS token, whose
    # routing repeats exactly; independent synthetic tokens cannot repeat like that.)
    assert np.allclose(gen["random"], real["random"], rtol=0.025)
    # t consecutive tokens of one request: the trace has only 19 windows of 8 tokens; within 5%.
    # (Real routing stays similar over several tokens, the generator's reuse is one-step: the
    # trace's 4- and 8-token windows hold 2-4% fewer distinct experts than the fit predicts.)
    assert np.allclose(gen["consecutive"], real["consecutive"], rtol=0.05)


def test_deepseek_generated_trace_reproduces_lru_curve(deepseek_comparison):
    real, gen, sd = deepseek_comparison
    # LRU hit rate vs capacity c = 1..64 (10 prefill passes, cache empty at start). One sample's
    # sd is <= 0.006 at every c, yet the trace's curve lies up to ~0.08 above the generated one
    # (c ~ 28): prompts share tokens (BOS, "The", "is") whose experts recur from request to
    # request, which i.i.d. synthetic tokens cannot do. Stated tolerance: 0.10 at every c, and
    # exactly the cold-miss limit at c = E (within sampling error).
    assert (sd["lru"] < 0.01).all()
    assert np.abs(gen["lru"] - real["lru"]).max() < 0.10
    assert gen["lru"][-1] == pytest.approx(real["lru"][-1], abs=0.02)
    assert (np.diff(gen["lru"]) >= 0).all()


def test_deepseek_generated_trace_reproduces_affinity(deepseek_comparison):
    real, gen, sd = deepseek_comparison
    # affinity excess: one sample's sd ~0.007, 20 samples -> 0.0016, calibration (27 replicates)
    # ~0.002: 0.015 is ~5 sd
    assert gen["affinity_excess"] == pytest.approx(real["affinity_excess"], abs=0.015)
    # the top-successor probability itself: the independence baseline differs by ~0.013 (the
    # shape of the popularity profile), so 0.025
    assert gen["affinity"] == pytest.approx(real["affinity"], abs=0.025)


def test_priority_affinity_trades_reuse_when_affinity_saturates():
    # A trace beyond the generator's reach: strong affinity (inheritance ~1) with every token
    # repeated 6 times (reuse ~0.87), where the excess the generator reads at full strength is
    # lower than at low reuse. The default keeps the reuse and says the affinity saturated;
    # priority=affinity gives up reuse and gets closer.
    reqs, meta = synthetic_trace("affinity", 2.0, None, 8.0, tokens=10)
    reqs = [RoutedRequest(r.request_id, 30, 31, np.repeat(r.experts, 6, axis=0)) for r in reqs]
    default = fit_trace(reqs, meta, replicates=8)
    q_obs = default.observed["reuse"]
    assert q_obs > 0.8
    assert default.details["saturated"] == ["affinity_strength"]
    assert any("priority=affinity trades reuse" in n for n in default.notes)
    assert default.workload()["reuse_prob"] == pytest.approx(q_obs, abs=1e-4)
    traded = fit_trace(reqs, meta, replicates=8, priority="affinity")
    assert any(n.startswith("priority=affinity: reuse_prob lowered") for n in traded.notes)
    wl = traded.workload()
    assert wl["reuse_prob"] is None or wl["reuse_prob"] < q_obs - 0.05
    assert traded.expected["affinity_excess"] > default.expected["affinity_excess"] + 0.01
    assert traded.expected["popularity_median"] == pytest.approx(traded.observed["popularity_median"],
                                                                 abs=0.05)


# ------------------------------------------------------------------ params.yaml, overrides, generate

def test_params_yaml_is_plain_documented_yaml(deepseek):
    _, _, params_path, params = deepseek
    text = params_path.read_text()
    assert OmegaConf.to_container(OmegaConf.load(params_path)) == params
    workload_lines = text.split("\nworkload:\n")[1].split("\nfit:")[0].splitlines()
    assert len(workload_lines) == len(params["workload"])
    for line in workload_lines:
        key = line.split(":")[0].strip()
        assert f"# {WORKLOAD_KEY_DOCS[key]}" in line
    assert "moesim model=deepseek_moe_16b workload=synthetic" in text


def test_overrides_compose_to_the_fitted_workload(deepseek):
    from sim.config import compose_scenario

    _, _, _, params = deepseek
    overrides = moesim_overrides(params)
    assert overrides[:2] == ["model=deepseek_moe_16b", "workload=synthetic"]
    sc = compose_scenario(overrides)
    assert sc.model.name == "deepseek_moe_16b"
    for key, value in params["workload"].items():
        got = getattr(sc.workload, key)
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key


def test_generate_matches_moesim_workload_and_is_deterministic(deepseek, tmp_path, capsys):
    from sim.config import compose_scenario
    from workloads.requests import build_requests

    _, _, params_path, params = deepseek
    out = tmp_path / "gen.parquet"
    args = ["generate", str(params_path), "-o", str(out), "--num-requests", "30",
            "--prompt-len", "12", "--output-len", "5", "--seed", "4"]
    assert main(args) == 0
    df, meta = read_trace(out)
    assert (meta.model, meta.num_experts, meta.top_k, meta.num_layers) == ("deepseek_moe_16b", 64, 6, 28)
    assert meta.moe_layers == tuple(range(1, 28))
    sc = compose_scenario([*moesim_overrides(params), "workload.num_requests=30", "workload.prompt_len=12",
                           "workload.output_len=5", "seed=4"])
    ref = build_requests(sc.workload, sc.model, sc.seed)
    got = load_trace_requests(out, sc.model)
    assert len(got) == len(ref) == 30
    for a, b in zip(got, ref):
        assert (a.prompt_len, a.output_len) == (b.prompt_len, b.output_len)
        assert np.array_equal(a.experts, b.experts)
    lengths = [r.prompt_len for r in got]
    assert min(lengths) >= round(12 * (1 - 0.3676)) and max(lengths) <= round(12 * (1 + 0.3676))
    # same seed, same trace; another seed, another
    again = tmp_path / "again.parquet"
    assert main(args[:3] + [str(again)] + args[4:]) == 0
    assert read_trace(again)[0].equals(df)
    other = tmp_path / "other.parquet"
    assert main(args[:3] + [str(other)] + args[4:-1] + ["5"]) == 0
    assert not read_trace(other)[0]["experts"].equals(df["experts"])
    assert "wrote" in capsys.readouterr().out


def test_non_catalog_model_fit_and_generate(tmp_path, capsys):
    reqs, meta = synthetic_trace("skewed", 1.8, None, 0.0, requests=12, tokens=20)
    model = model_for_trace("toy_moe", 16, 2, 8, range(8))
    trace = tmp_path / "toy.parquet"
    write_trace(trace, requests_to_frame(reqs, model), meta)
    params_path = tmp_path / "toy.yaml"
    assert main(["fit", str(trace), "-o", str(params_path), "--replicates", "8"]) == 0
    printed = capsys.readouterr().out
    assert "model.num_experts=16 model.top_k=2 model.num_layers=8 model.dense_layers=[]" in printed
    params = yaml.safe_load(params_path.read_text())
    assert params["model"]["catalog"] is False and params["model"]["name"] == "toy_moe"
    assert params["workload"]["routing"] == "skewed"
    out = tmp_path / "toy_gen.parquet"
    assert main(["generate", str(params_path), "-o", str(out), "--num-requests", "40"]) == 0
    gen = load_trace_requests(out, model)
    assert len(gen) == 40 and all(r.experts.shape[1:] == (8, 2) for r in gen)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.pop("workload"), "workload is required"),
    (lambda p: p["workload"].update(colour="blue"), "workload.colour is not a known key"),
    (lambda p: p["workload"].update(popularity_max_over_mean=50.0), "popularity_max_over_mean"),
    (lambda p: p["model"].update(top_k=99), "top_k"),
    (lambda p: p["model"].update(num_experts=8), "catalog model"),
])
def test_generate_bad_params_exit_2(deepseek, tmp_path, capsys, edit, message):
    params = yaml.safe_load(deepseek[2].read_text())
    edit(params)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    assert main(["generate", str(bad), "-o", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim-trace: error:") and message in err and "\n" not in err
    assert not (tmp_path / "x.parquet").exists()


def test_fit_and_generate_bad_input_exit_2(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "none.parquet"), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "x.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["generate", str(tmp_path / "list.yaml"), "-o", str(tmp_path / "x.parquet")]) == 2
    assert "mapping" in capsys.readouterr().err
