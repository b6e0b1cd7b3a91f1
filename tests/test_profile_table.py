"""moesim-profile writes well-formed cost tables; hw.table.Table interpolates them and drives the
simulator with hw=this_cpu. The profile here is a --quick run of the two CPU presets (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from hw.cost import BatchShape
from hw.devices import LinkSpec
from hw.table import PROFILE_COLUMNS, Curve, Grid, Table, model_signature
from sim.config import compose_scenario
from sim.engine import Engine, simulate
from workloads.validation import ConfigError

torch = pytest.importorskip("torch")

from real_backend import profile as rp  # noqa: E402

MODELS = ("mini_mixtral", "mini_qwen")
DRAFT = "mini_draft"   # profiled too: its draft_pass_overhead, drafting for mini_mixtral


@pytest.fixture(scope="session")
def quick_profile(built_once):
    """One --quick profile per test session (~50 s on an idle 2-core machine), shared by the
    xdist workers (tests/conftest.py). Its times depend on how busy the machine is; nothing here
    asserts them beyond what holds on any machine."""
    def build(out):
        assert rp.main(["--device", "cpu", "--models", ",".join(MODELS + (DRAFT,)), "-o", str(out), "--quick"]) == 0

    return built_once("quick_profile_cpu", build)


@pytest.fixture(scope="module")
def specs():
    return {m: compose_scenario([f"model={m}"]).model for m in MODELS}


def test_quick_profile_writes_well_formed_tables(quick_profile):
    rows = pd.read_parquet(quick_profile / "profile.parquet")
    csv = pd.read_csv(quick_profile / "profile.csv", keep_default_na=False, na_values=[""])
    header = json.loads((quick_profile / "profile.json").read_text())
    assert list(rows.columns) == PROFILE_COLUMNS and len(csv) == len(rows)
    np.testing.assert_allclose(csv["median_s"], rows["median_s"])
    assert header["device"] == "cpu" and header["torch_threads"] == 1 and header["quick"] is True
    assert header["torch_version"] == torch.__version__ and header["date"] and header["machine"] is not None
    assert set(header["models"]) == set(MODELS) | {DRAFT}
    assert (rows["device"] == "cpu").all() and (rows["threads"] == 1).all() and (rows["dtype"] == "float32").all()
    assert (rows["p10_s"] <= rows["median_s"]).all() and (rows["median_s"] <= rows["p90_s"]).all()
    # copy_overhead and host_run_overhead are differences of two runs' times (they may come out
    # slightly negative: noise; Table clips them at 0); layer_overhead is a residual against the op
    # tables (negative where ops run faster in the executor, and on a busy machine of any size:
    # Table floors the attention block, test_attention_block_never_costs_nothing), one row per
    # token count of the calibration runs' passes: decode batches and their prefills.
    timed = rows[~rows["op"].isin(["copy_overhead", "host_run_overhead", "layer_overhead", "draft_pass_overhead"])]
    assert (timed["median_s"] > 0).all() and (timed["repeats"] >= rp.QUICK.min_passes).all()
    for m in MODELS + (DRAFT,):
        residual = rows[(rows["model"] == m) & (rows["op"] == "layer_overhead")]
        assert residual["median_s"].map(np.isfinite).all() and (residual["repeats"] > 0).all()
        assert set(residual["tokens"]) == set(rp.QUICK.overhead_batches) | {b * rp.OVERHEAD_PROMPT
                                                                            for b in rp.QUICK.overhead_batches}
    per_copy = rows[rows["op"] == "copy_overhead"]
    assert sorted(per_copy["model"]) == sorted(MODELS) and per_copy["median_s"].map(np.isfinite).all()
    assert {11010048, 1572864} == set(per_copy["bytes"])
    for m in MODELS:
        ops_seen = set(rows.loc[rows["model"] == m, "op"])
        assert {"expert", "router", "combine", "embed", "lm_head", "attention", "layer_overhead"} <= ops_seen
        mine = rows[(rows["model"] == m) & (rows["op"] == "expert") & (rows["phase"] == "")]
        assert sorted(mine["tokens"]) == list(rp.QUICK.expert_tokens)
        att = rows[(rows["model"] == m) & (rows["op"] == "attention")]
        assert set(att["phase"]) == {"decode", "prefill"}
        assert att[["batch", "context", "tokens"]].notna().all().all()
    assert "shared_experts" in set(rows.loc[rows["model"] == "mini_qwen", "op"])
    for m in MODELS:   # speculative decoding's rejection sampling, per target (its vocabulary)
        rej = rows[(rows["model"] == m) & (rows["op"] == "rejection_sampling")]
        assert sorted(rej["tokens"]) == list(rp.QUICK.reject_tokens) and (rej["median_s"] > 0).all()
    # The dense draft: one draft_pass_overhead row (a residual per drafter pass, measured from real
    # speculation runs drafting for mini_mixtral; finite, and far below a whole draft pass).
    dpo = rows[rows["op"] == "draft_pass_overhead"]
    assert list(dpo["model"]) == [DRAFT] and dpo["median_s"].map(np.isfinite).all()
    draft_pass = rows.loc[(rows["model"] == DRAFT) & (rows["op"] == "attention") & (rows["phase"] == "decode"),
                          "median_s"].max() * 10
    assert abs(float(dpo["median_s"].iloc[0])) < draft_pass and (dpo["repeats"] > 0).all()
    assert Table(quick_profile).overheads.draft_pass_overhead_s(compose_scenario([f"model={DRAFT}"]).model) == float(
        dpo["median_s"].iloc[0])
    copies = rows[rows["op"] == "copy"]
    assert set(copies["phase"]) == {"idle", "contended"} and (copies["model"] == "").all()
    # Each model's expert size is one of the measured copy sizes.
    assert {11010048, 1572864} <= set(copies["bytes"])


def test_table_is_exact_at_measured_points(quick_profile, specs):
    rows = pd.read_parquet(quick_profile / "profile.parquet")
    link = LinkSpec("this_cpu_copy", "pcie", 1e12, 0.0)
    table = Table(quick_profile, host_link=link)
    for name, spec in specs.items():
        r = rows[(rows["model"] == name) & (rows["phase"] == "")]
        for op, fn in [("expert", table.expert_s), ("router", table.router_s), ("combine", table.combine_s),
                       ("embed", table.embed_s), ("shared_experts", table.shared_experts_s)]:
            for _, row in r[r["op"] == op].iterrows():
                assert fn(spec, int(row["tokens"])) == pytest.approx(row["median_s"], rel=1e-12)
        for _, row in r[r["op"] == "lm_head"].iterrows():
            assert table.lm_head_s(spec, int(row["batch"])) == pytest.approx(row["median_s"], rel=1e-12)
        att = rows[(rows["model"] == name) & (rows["op"] == "attention")]
        floor = float(att["median_s"].min())
        assert table.attention_floor_s(spec) == floor > 0
        # The executor's per-layer overhead, measured at its own token counts, linear in between.
        ovh_rows = r[r["op"] == "layer_overhead"]
        overhead = Curve(ovh_rows["tokens"].astype(float), ovh_rows["median_s"].astype(float))
        for _, row in att.iterrows():
            B, c = int(row["batch"]), int(row["context"])
            if row["phase"] == "decode":
                shape = BatchShape(B, B, B * c, B * c)
            else:
                shape = BatchShape(B * c, B, B * c * (c + 1) // 2, B * c)
            # The block's time plus the executor's per-layer overhead at the pass's tokens (a
            # residual, which may be negative; the block never costs less than the cheapest
            # attention measured).
            expected = max(floor, row["median_s"] + overhead(float(row["tokens"])))
            assert table.attention_block_s(spec, shape) == pytest.approx(expected, rel=1e-12)
    for name, spec in specs.items():
        for _, row in rows[(rows["model"] == name) & (rows["op"] == "rejection_sampling")].iterrows():
            assert table.rejection_sampling_s(spec, int(row["tokens"])) == pytest.approx(row["median_s"], rel=1e-12)
    idle = rows[(rows["op"] == "copy") & (rows["phase"] == "idle")]
    for _, row in idle.iterrows():
        assert table.copy_s(float(row["bytes"]), link) == pytest.approx(row["median_s"], rel=1e-12)
    # The CPU is its own host: host execution costs what the expert costs, plus the executor's
    # measured extra per host run (a difference of two runs, clipped at 0).
    spec = specs["mini_mixtral"]
    extra = rows.loc[(rows["model"] == "mini_mixtral") & (rows["op"] == "host_run_overhead"), "median_s"]
    assert len(extra) == 1
    assert table.host_expert_s(spec, 3) == pytest.approx(table.expert_s(spec, 3) + max(0.0, float(extra.iloc[0])),
                                                         rel=1e-12)
    assert table.shared_experts_s(spec, 8) == 0.0 and table.dense_ffn_s(spec, 8) == 0.0


def _between(v, a, b):
    lo, hi = min(a, b), max(a, b)
    return lo - 1e-15 <= v <= hi + 1e-15


def test_table_is_monotone_between_measured_points(quick_profile, specs):
    table = Table(quick_profile)
    rows = pd.read_parquet(quick_profile / "profile.parquet")
    for name, spec in specs.items():
        r = rows[(rows["model"] == name) & (rows["op"] == "expert") & (rows["phase"] == "")].sort_values("tokens")
        pts = list(zip(r["tokens"].astype(int), r["median_s"]))
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            vals = [table.expert_s(spec, n) for n in range(x0, x1 + 1)]
            assert all(_between(v, y0, y1) for v in vals)
            assert vals == sorted(vals) or vals == sorted(vals, reverse=True)
        # Decode attention between two measured contexts at a measured batch, and between batches.
        dec = rows[(rows["model"] == name) & (rows["op"] == "attention") & (rows["phase"] == "decode")].copy()
        ovh = rows[(rows["model"] == name) & (rows["op"] == "layer_overhead")]
        ovh = Curve(ovh["tokens"].astype(float), ovh["median_s"].astype(float))
        floor = table.attention_floor_s(spec)
        dec["median_s"] = (dec["median_s"] + dec["tokens"].astype(float).map(ovh)).clip(lower=floor)
        B = int(dec["batch"].min())
        line = dec[dec["batch"] == B].sort_values("context")
        (c0, y0), (c1, y1) = list(zip(line["context"].astype(int), line["median_s"]))[:2]
        vals = [table.attention_block_s(spec, BatchShape(B, B, B * c, B * c)) for c in range(c0, c1 + 1, 7)]
        assert all(_between(v, y0, y1) for v in vals) and (vals == sorted(vals) or vals == sorted(vals, reverse=True))
        b0, b1 = sorted(dec["batch"].astype(int).unique())[:2]
        c = int(dec["context"].min())
        z0, z1 = (float(dec[(dec["batch"] == b) & (dec["context"] == c)]["median_s"].iloc[0]) for b in (b0, b1))
        for b in range(b0, b1 + 1):
            assert _between(table.attention_block_s(spec, BatchShape(b, b, b * c, b * c)), z0, z1)
        # Partly-prefill passes (speculative verification) fall between the decode and prefill grids.
        t = table._tables(spec)
        d, p = Table._attention_s(t, BatchShape(1, 1, 512, 512)), Table._attention_s(
            t, BatchShape(512, 1, 512 * 513 // 2, 512))
        assert _between(Table._attention_s(t, BatchShape(4, 1, 4 * 512, 512)), d, p)


def test_curve_and_grid_rules():
    c = Curve([1, 2, 4], [1.0, 2.0, 2.5])
    assert c(0) == 1.0 and c(1) == 1.0 and c(3) == 2.25 and c(8) == pytest.approx(3.5)   # clamp, interp, extrap
    assert Curve([1, 2], [2.0, 1.0])(10) == 1.0          # a falling last segment extrapolates flat
    assert Curve([5], [3.0])(100) == 3.0
    # Bilinear on a complete grid is exact for a + bB + cC + dBC, inside and beyond the grid.
    f = lambda B, C: 1 + 2 * B + 3 * C + 0.5 * B * C
    A, Cs = [1, 2, 4], [10, 20, 40]
    g = Grid([a for a in A for _ in Cs], [x for _ in A for x in Cs], [f(a, x) for a in A for x in Cs])
    for B, C in [(1, 10), (3, 15), (4, 40), (8, 80), (1.5, 33)]:
        assert g(B, C) == pytest.approx(f(B, C))


def _row(model, op, median_s, phase="", tokens=None, batch=None, context=None):
    """One hand-made profile row: a CPU float32 op measured three times at exactly ``median_s``."""
    return {"device": "cpu", "model": model, "op": op, "phase": phase, "tokens": tokens, "batch": batch,
            "context": context, "bytes": None, "median_s": median_s, "p10_s": median_s, "p90_s": median_s,
            "repeats": 3, "threads": 1, "dtype": "float32"}


def test_attention_block_never_costs_nothing(specs):
    """layer_overhead is a residual (an executor pass minus what the op tables say its ops take);
    profiled on a busy machine it can be more negative than the attention it is added to. The
    block is then the cheapest attention the profile measured, never 0 (nor negative)."""
    spec = specs["mini_mixtral"]
    rows = []

    def add(op, median, phase="", tokens=None, batch=None, context=None):
        rows.append(_row(spec.name, op, median, phase, tokens, batch, context))

    for op in ("expert", "router", "combine", "embed", "lm_head"):
        add(op, 1e-4, tokens=1, batch=1)
        add(op, 2e-4, tokens=64, batch=64)
    for b in (1, 8):
        for c in (128, 1024):
            add("attention", 1e-4 * b * (1 + c / 128), phase="decode", tokens=b, batch=b, context=c)
    add("attention", 5e-3, phase="prefill", tokens=128, batch=1, context=128)
    # Residuals: a little negative at 1 token, far below -attention at 8 and 128 tokens.
    add("layer_overhead", -1e-4, tokens=1)
    add("layer_overhead", -1.0, tokens=8)
    add("layer_overhead", -1.0, tokens=128)
    frame = pd.DataFrame(rows, columns=PROFILE_COLUMNS)
    table = Table("(hand-made)", loaded=({"device": "cpu", "models": {spec.name: model_signature(spec)}}, frame))
    floor = 2e-4   # decode, one sequence, 128 keys: the cheapest attention above
    assert table.attention_floor_s(spec) == pytest.approx(floor)
    assert table.attention_block_s(spec, BatchShape(1, 1, 1024, 1024)) == pytest.approx(9e-4 - 1e-4)
    for shape in (BatchShape(1, 1, 128, 128), BatchShape(8, 8, 8 * 1024, 8 * 1024), BatchShape(4, 4, 400, 400),
                  BatchShape(128, 1, 128 * 129 // 2, 128)):
        assert table.attention_block_s(spec, shape) == pytest.approx(floor)
    # Without layer_overhead rows the block is the attention op alone.
    plain = Table("(hand-made)", loaded=({"device": "cpu", "models": {spec.name: model_signature(spec)}},
                                         frame[frame["op"] != "layer_overhead"]))
    assert plain.attention_block_s(spec, BatchShape(8, 8, 8 * 1024, 8 * 1024)) == pytest.approx(1e-4 * 8 * 9)


def test_copy_contention_is_the_copying_rows_over_the_expert_curve(specs):
    """``copy_contention``: expert time while the executor's copy engine copies (``phase=copying``)
    over the expert curve at the same tokens, interpolated between the measured counts, held beyond
    them, floored at 1, and 1 on any link but the profiled host link or without the rows."""
    from hw.devices import LinkSpec

    spec = specs["mini_mixtral"]
    rows = []

    def add(op, median, phase="", tokens=None, batch=None, context=None):
        rows.append(_row(spec.name, op, median, phase, tokens, batch, context))

    for op in ("router", "combine", "embed", "lm_head"):
        add(op, 1e-4, tokens=1, batch=1)
    for n, t in ((1, 1e-3), (8, 2e-3), (64, 4e-3)):
        add("expert", t, tokens=n)
    add("expert", 1.5e-3, phase="copying", tokens=1)    # 1.5x
    add("expert", 2.2e-3, phase="copying", tokens=8)    # 1.1x
    add("expert", 3.6e-3, phase="copying", tokens=64)   # 0.9x: floored at 1
    add("attention", 1e-4, phase="decode", tokens=1, batch=1, context=128)
    rows.append({**rows[0], "model": "", "op": "copy", "phase": "idle", "tokens": None, "batch": None,
                 "bytes": 1 << 20})
    frame = pd.DataFrame(rows, columns=PROFILE_COLUMNS)
    header = {"device": "cpu", "models": {spec.name: model_signature(spec)}}
    link = LinkSpec(name="cap", kind="pcie", bandwidth_bps=2e9, latency_s=0.0)
    other = LinkSpec(name="pcie", kind="pcie", bandwidth_bps=32e9, latency_s=0.0)
    ov = Table("(hand-made)", host_link=link, loaded=(header, frame)).overheads
    assert ov.copy_contention(spec, 1, link) == pytest.approx(1.5)
    assert ov.copy_contention(spec, 8, link) == pytest.approx(1.1)
    assert ov.copy_contention(spec, 4, link) == pytest.approx(1.5 + (1.1 - 1.5) * 3 / 7)
    assert ov.copy_contention(spec, 36, link) == pytest.approx(1.05)
    assert ov.copy_contention(spec, 64, link) == ov.copy_contention(spec, 512, link) == 1.0
    assert ov.copy_contention(spec, 1, other) == 1.0
    plain = Table("(hand-made)", host_link=link, loaded=(header, frame[frame["phase"] != "copying"])).overheads
    assert plain.copy_contention(spec, 1, link) == 1.0


def test_policy_overhead_rows_are_read_per_policy(specs):
    """``policy_overhead`` rows (phase = the policy): the median of a policy's rows, floored at 0
    (a policy measured cheaper than LRU costs nothing extra); 0 for a policy without rows."""
    spec = specs["mini_mixtral"]
    rows = [_row(spec.name, op, 1e-4, tokens=1, batch=1) for op in ("expert", "router", "combine", "embed", "lm_head")]
    rows.append(_row(spec.name, "attention", 1e-4, phase="decode", tokens=1, batch=1, context=128))
    rows += [_row(spec.name, "policy_overhead", v, phase="lfu", tokens=1, batch=1) for v in (1e-5, 3e-5, 2e-5)]
    rows.append(_row(spec.name, "policy_overhead", -4e-6, phase="transition", tokens=1, batch=1))
    header = {"device": "cpu", "models": {spec.name: model_signature(spec)}}
    ov = Table("(hand-made)", loaded=(header, pd.DataFrame(rows, columns=PROFILE_COLUMNS))).overheads
    assert ov.policy_overhead_s(spec, "lfu") == pytest.approx(2e-5)
    assert ov.policy_overhead_s(spec, "transition") == 0.0
    assert ov.policy_overhead_s(spec, "lru") == ov.policy_overhead_s(spec, "oracle") == 0.0


def test_table_refuses_models_it_was_not_profiled_for(quick_profile, specs):
    table = Table(quick_profile)
    mixtral = compose_scenario(["model=mixtral_8x7b"]).model
    with pytest.raises(ConfigError) as e:
        table.expert_s(mixtral, 1)
    msg = str(e.value)
    assert "\n" not in msg and "model=mixtral_8x7b was not profiled" in msg and "--models mixtral_8x7b" in msg
    with pytest.raises(ConfigError, match=r"model\.top_k=3 differs from the 2 profiled") as e:
        table.check(replace(specs["mini_mixtral"], top_k=3))
    assert "\n" not in str(e.value)
    # Layer count is not part of an op's cost: a deeper mini_mixtral uses the same tables.
    table.check(replace(specs["mini_mixtral"], num_layers=8))
    with pytest.raises(ConfigError, match=r"hw\.profile_dir=.*holds no cost tables"):
        Table(quick_profile / "nowhere")


def test_simulation_with_this_cpu_and_table_runs_end_to_end(quick_profile, specs):
    common = ["model=mini_mixtral", "hw=this_cpu", f"hw.profile_dir={quick_profile}", "workload.num_requests=4",
              "workload.prompt_len=16", "workload.output_len=8", "workload.batch_size=2", "sim.progress=false",
              "policy.prefetch.capacity_per_layer=4"]
    sc = compose_scenario(common)
    assert sc.hw.cost_model == "table" and sc.hw.name == "this_cpu"
    from workloads.requests import build_requests

    reqs = build_requests(sc.workload, sc.model, sc.seed)
    eng = Engine(sc, reqs)
    assert isinstance(eng.cost, Table)
    res = eng.run()
    s = res.summary
    assert s["tpot_s"] > 0 and s["ttft_s"] > 0 and s["decode_tokens"] > 0 and s["h2d_bytes"] > 0
    table, spec = eng.cost, specs["mini_mixtral"]
    # Attention time of a decode step is the table's, layer by layer.
    step = res.steps.iloc[1]   # the first decode pass after the prefill of two 16-token prompts
    assert step["phase"] == "decode" and step["batch_size"] == 2
    per_layer = table.attention_block_s(spec, BatchShape(2, 2, 2 * 17, 2 * 17))
    assert per_layer > 0 and step["attention_s"] == pytest.approx(spec.num_layers * per_layer)
    # Copies take the measured copy time of one expert (no cap: bandwidth 1e12).
    copies = (s["h2d_bytes"]) / spec.expert_bytes
    measured = table.copy_s(spec.expert_bytes, sc.hw.host_link)
    assert s["copy_engine_busy_s"] == pytest.approx(copies * measured)
    rows = pd.read_parquet(quick_profile / "profile.parquet")
    idle = rows[(rows["op"] == "copy") & (rows["phase"] == "idle") & (rows["bytes"] == spec.expert_bytes)]
    assert measured == pytest.approx(float(idle["median_s"].iloc[0]))
    # A bandwidth cap (mimicking a PCIe link) slows every copy to bytes / cap. The cap is chosen
    # so that a copy at the cap takes 10x the measured copy (on an idle machine ~1 GB/s), so that it
    # binds however slowly this machine copied while it was profiled.
    cap = spec.expert_bytes / (10 * measured)
    capped = simulate(compose_scenario(common + [f"hw.host_link.bandwidth_bps={cap!r}"]))
    n = capped.summary["h2d_bytes"] / spec.expert_bytes
    assert capped.summary["copy_engine_busy_s"] == pytest.approx(n * spec.expert_bytes / cap)
    assert capped.summary["tpot_s"] > s["tpot_s"]
    # mini_qwen runs too; the roofline stays selectable on the same hardware description.
    assert simulate(compose_scenario([c.replace("mini_mixtral", "mini_qwen") for c in common])).summary["tpot_s"] > 0
    rl = Engine(compose_scenario(common + ["hw.cost_model=roofline"]), reqs)
    assert not isinstance(rl.cost, Table)


def test_missing_profile_dir_and_unprofiled_model_are_one_line_errors(tmp_path, quick_profile):
    with pytest.raises(ConfigError, match=r"hw\.profile_dir=.*holds no cost tables.*run moesim-profile") as e:
        compose_scenario(["hw=this_cpu", f"hw.profile_dir={tmp_path / 'none'}"])
    assert "\n" not in str(e.value)
    sc = compose_scenario(["hw=this_cpu", f"hw.profile_dir={quick_profile}", "model=olmoe_1b_7b",
                           "sim.progress=false"])
    with pytest.raises(ConfigError, match="model=olmoe_1b_7b was not profiled"):
        simulate(sc)


def test_profiles_merge_by_model_and_cli_errors(tmp_path, capsys):
    tiny = rp.Sweep(expert_tokens=(1, 4), decode_batches=(1, 2), decode_contexts=(16, 32), prefill_seqs=(1,),
                    prefill_lens=(8,), prefill_max_tokens=64, copy_bytes=(4096,), extra_expert_tokens=(1,),
                    warmup=1, min_passes=1, max_passes=1, pass_budget_s=0.0, min_repeats=2, max_repeats=3,
                    budget_s=0.0, kv_budget_bytes=1e8, copy_pool_bytes=1 << 16, overhead_batches=(1,),
                    overhead_pairs=1)
    base = compose_scenario(["model=mini_qwen"]).model
    a = replace(base, name="tiny_a", hidden_size=64, expert_intermediate_size=32, num_experts=4, top_k=2,
                shared_expert_intermediate_size=64, num_attention_heads=2, num_kv_heads=2, head_dim=32,
                vocab_size=64, num_layers=2)
    b = replace(a, name="tiny_b", num_shared_experts=0, shared_expert_intermediate_size=0)
    rp.run_profile([a], "cpu", tmp_path, sweep=tiny)
    rp.run_profile([b], "cpu", tmp_path, sweep=replace(tiny, overhead_repeats=3))
    header = json.loads((tmp_path / "profile.json").read_text())
    assert set(header["models"]) == {"tiny_a", "tiny_b"} and header["models"]["tiny_a"] == model_signature(a)
    rows = pd.read_parquet(tmp_path / "profile.parquet")
    assert set(rows["model"]) == {"tiny_a", "tiny_b", ""}
    assert len(rows[rows["op"] == "copy"]) == 2 * 2   # 4096 B and the tiny expert size, idle and contended
    # layer_overhead: 2 requests of 16 + 6 tokens at batch 1 give 2 prefill passes of 16 tokens and
    # 10 decode passes of 1 token per run; tiny_b's calibration ran 3 times and pooled them
    lo = rows[rows["op"] == "layer_overhead"].set_index(["model", "tokens"])["repeats"]
    assert lo[("tiny_a", 1)] == 10 and lo[("tiny_a", 16)] == 2
    assert lo[("tiny_b", 1)] == 30 and lo[("tiny_b", 16)] == 6
    Table(tmp_path).check(a)
    Table(tmp_path).check(b)

    assert rp.main(["--models", "no_such_model", "-o", str(tmp_path / "x"), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim-profile: error: model=no_such_model is not a known model option")
    assert "\n" not in err and not (tmp_path / "x").exists()
    assert rp.main(["--threads", "0", "--models", "mini_qwen", "-o", str(tmp_path / "y")]) == 2
    assert "--threads=0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert rp.main(["--device", "cuda", "-o", str(tmp_path / "z")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moesim-profile: error: --device=cuda is not usable here") and "\n" not in err


def test_dense_draft_model_profiles_and_simulates_speculation(tmp_path):
    """A dense model (a drafter) profiles without expert, router, combine or copy-overhead rows;
    the table then times it as a drafter, and a speculation scenario simulates with the tables."""
    tiny = rp.Sweep(expert_tokens=(1, 4), decode_batches=(1, 2), decode_contexts=(16, 32), prefill_seqs=(1,),
                    prefill_lens=(8, 16), prefill_max_tokens=64, copy_bytes=(4096,), extra_expert_tokens=(1,),
                    warmup=1, min_passes=1, max_passes=1, pass_budget_s=0.0, min_repeats=2, max_repeats=3,
                    budget_s=0.0, kv_budget_bytes=1e8, copy_pool_bytes=1 << 16, overhead_batches=(1,),
                    overhead_pairs=1, reject_tokens=(1, 4))
    base = compose_scenario(["model=mini_qwen"]).model
    target = replace(base, name="tiny_target", hidden_size=64, expert_intermediate_size=32, num_experts=4, top_k=2,
                     shared_expert_intermediate_size=64, num_attention_heads=2, num_kv_heads=2, head_dim=32,
                     vocab_size=64, num_layers=2)
    draft = replace(compose_scenario(["model=mini_draft"]).model, name="tiny_draft", hidden_size=32,
                    dense_intermediate_size=48, num_attention_heads=2, num_kv_heads=1, head_dim=16, vocab_size=64)
    rp.run_profile([target, draft], "cpu", tmp_path, sweep=tiny)
    rows = pd.read_parquet(tmp_path / "profile.parquet")
    dense_ops = set(rows.loc[rows["model"] == "tiny_draft", "op"])
    assert {"attention", "dense_ffn", "embed", "lm_head", "layer_overhead", "rejection_sampling",
            "draft_pass_overhead"} <= dense_ops   # drafting for tiny_target (same vocabulary)
    assert not dense_ops & {"expert", "router", "combine", "copy_overhead", "host_run_overhead"}
    table = Table(tmp_path)
    table.check(draft)
    assert table.expert_s(draft, 4) == table.router_s(draft, 4) == table.combine_s(draft, 4) == 0.0
    from sim.speculation import Drafter

    spec_cfg = compose_scenario(["policy/speculation=static", "policy.speculation.draft_model=mini_draft"]).speculation
    drafter = Drafter.build(spec_cfg, target, draft, table)
    assert drafter.round_s([10, 12], [3, 1], 3) > drafter.round_s([10, 12], [1, 1], 1) > 0
    assert drafter.prefill_s([8]) > 0
    sc = compose_scenario(["hw=this_cpu", f"hw.profile_dir={tmp_path}", "policy/speculation=static",
                           "policy.speculation.draft_model=mini_draft", "policy.speculation.k=2",
                           "workload.num_requests=2", "workload.prompt_len=8", "workload.output_len=6",
                           "sim.progress=false"])
    res = simulate(replace(sc, model=target, draft_model=draft))
    assert res.summary["spec_rounds"] > 0 and res.summary["draft_round_s"] > 0 and res.summary["reject_round_s"] > 0

    # recalibrate: both models' executor-overhead rows again (the drafter's draft_pass_overhead
    # drafting for the target), every op row as profiled, the input profile untouched.
    before = (tmp_path / "profile.parquet").read_bytes()
    with pytest.raises(ConfigError, match="new directory"):
        rp.recalibrate(tmp_path, [draft, target], tmp_path, sweep=tiny)
    said: list[str] = []
    out = rp.recalibrate(tmp_path, [draft, target], tmp_path / "recalibrated", sweep=tiny, log=said.append)
    assert any("tiny_draft: draft_pass_overhead" in line and "drafting for tiny_target" in line for line in said)
    assert any(line.startswith("tiny_target: executor overheads") for line in said)
    assert (tmp_path / "profile.parquet").read_bytes() == before
    new = pd.read_parquet(out / "profile.parquet")
    overheads = rows["op"].isin(rp.EXECUTOR_OVERHEAD_OPS)
    key = ["model", "op", "phase", "tokens", "batch", "context", "bytes"]
    pd.testing.assert_frame_equal(rows[~overheads].sort_values(key, na_position="first").reset_index(drop=True),
                                  new[~new["op"].isin(rp.EXECUTOR_OVERHEAD_OPS)]
                                  .sort_values(key, na_position="first").reset_index(drop=True), check_dtype=False)
    count = lambda d: d[d["op"].isin(rp.EXECUTOR_OVERHEAD_OPS)].groupby(["model", "op"]).size().to_dict()  # noqa: E731
    assert count(new) == count(rows) and ("tiny_draft", "draft_pass_overhead") in count(new)
    assert json.loads((out / "profile.json").read_text())["recalibrated"]["models"] == ["tiny_target", "tiny_draft"]


def test_hw_never_imports_torch():
    code = "import sys, hw.table, hw.system, sim.engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parents[1])
                          ).returncode == 0
