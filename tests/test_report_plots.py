"""moesim-report's plots: titles name what was held fixed, axes carry units, bars are sorted by value,
and a capacity x policy sweep gets TPOT and hit rate against capacity, one line per policy."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from sim.report_plots import KEY_CHOICES, build_figures, fixed_parameters, plot

BASE = {"model": "olmoe_1b_7b", "hw": "h100_pcie", "tensor_parallel": 1, "batch_size": 4, "cache_scope": "per_layer",
        "speculation": "none", "ep": "none", "workload": "synthetic", "routing": "realistic", "seed": 0,
        "spec_k": None, "draft_model": None}


def _row(**kw):
    row = dict(BASE)
    row.update(ttft_s=0.2, throughput_tok_s=100.0, copy_stall_s=0.001)
    row.update(kw)
    return row


@pytest.fixture
def policy_table():
    """One varying key, the prefetch policy (as gather() writes it: override column + summary key)."""
    rows = [_row(**{"policy/prefetch": p, "prefetch": p, "capacity_per_layer": None, "tpot_s": t,
                    "expert_hit_rate": h, "h2d_bytes": b})
            for p, t, h, b in [("fiddler", 0.030, 0.50, 2.0e13), ("lookahead", 0.020, 0.70, 1.5e13),
                               ("lru", 0.040, 0.40, 3.0e13), ("oracle", 0.010, 0.90, 0.5e13)]]
    return pd.DataFrame(rows)


@pytest.fixture
def capacity_table():
    rows = []
    for p, base in [("lru", 0.040), ("oracle", 0.020), ("lfu", 0.030)]:
        for c in (2, 4, 8):
            rows.append(_row(**{"policy/prefetch": p, "policy.prefetch.capacity_per_layer": c, "prefetch": p,
                                "capacity_per_layer": c, "tpot_s": base / c, "expert_hit_rate": 0.1 * c / base / 100,
                                "h2d_bytes": 1e12 / c}))
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _title(fig) -> str:
    return " ".join(t for t in [fig._suptitle.get_text() if fig._suptitle else "",
                                *(ax.get_title() for ax in fig.axes)] if t).replace("\n", " ")


def _bars(ax):
    """(tick labels, bar heights per container) of a bar plot, in drawing order."""
    labels = [t.get_text() for t in ax.get_xticklabels()]
    return labels, [[r.get_height() for r in c] for c in ax.containers]


def test_key_choices_are_the_scenario_choices():
    from sim.config import compose_scenario

    assert set(KEY_CHOICES) == set(compose_scenario([]).choices())


def test_titles_name_the_fixed_parameters_and_not_the_varying_ones(policy_table):
    varying = ["policy/prefetch"]
    fixed = fixed_parameters(policy_table, varying)
    assert fixed["model"] == "olmoe_1b_7b" and fixed["hw"] == "h100_pcie" and fixed["batch_size"] == 4
    assert fixed["speculation"] == "none"
    assert "prefetch" not in fixed and "policy/prefetch" not in fixed        # varies
    assert "spec_k" not in fixed and "capacity_per_layer" not in fixed        # unset (null)
    assert "tensor_parallel" not in fixed and "ep" not in fixed               # trivial on one GPU
    for fig in build_figures(policy_table, varying).values():
        title = _title(fig)
        for part in ("model=olmoe_1b_7b", "hw=h100_pcie", "batch_size=4", "speculation=none"):
            assert part in title, title
        assert "prefetch=" not in title


def test_constant_overrides_show_once_and_varying_ones_not_at_all(policy_table):
    table = policy_table.assign(**{"workload.batch_size": 4, "hw.host_link.bandwidth_bps": 25e9,
                                   "hydra.job.chdir": "true"})
    fixed = fixed_parameters(table, ["policy/prefetch"])
    assert "workload.batch_size" not in fixed                       # batch_size=4 says it already
    assert fixed["hw.host_link.bandwidth_bps"] == 25e9
    assert not any(k.startswith("hydra") for k in fixed)
    title = _title(build_figures(table, ["policy/prefetch"])["report_tpot_s"])
    assert "hw.host_link.bandwidth_bps=2.5e+10" in title


def test_duplicate_columns_from_an_override_and_the_summary_are_tolerated(policy_table):
    # gather() puts both the override `model=...` and the summary's `model` into the table.
    table = pd.concat([policy_table[["model"]], policy_table], axis=1)
    assert list(table.columns).count("model") == 2
    figures = build_figures(table, ["policy/prefetch"])
    assert "model=olmoe_1b_7b" in _title(figures["report_tpot_s"])


def test_y_labels_carry_units_and_values_are_scaled(policy_table):
    figures = build_figures(policy_table, ["policy/prefetch"])
    assert set(figures) == {"report_tpot_s", "report_ttft_s", "report_throughput_tok_s", "report_expert_hit_rate",
                            "report_h2d_bytes", "report_copy_stall_s"}
    units = {"report_tpot_s": "(ms)", "report_ttft_s": "(ms)", "report_copy_stall_s": "(ms)",
             "report_h2d_bytes": "(GB)", "report_expert_hit_rate": "(%)", "report_throughput_tok_s": "(tok/s)"}
    for name, unit in units.items():
        assert figures[name].axes[0].get_ylabel().endswith(unit), (name, figures[name].axes[0].get_ylabel())
    _, (gb,) = _bars(figures["report_h2d_bytes"].axes[0])
    assert sorted(gb) == pytest.approx([5e3, 15e3, 20e3, 30e3])               # GB, not bytes
    _, (ms,) = _bars(figures["report_tpot_s"].axes[0])
    assert sorted(ms) == pytest.approx([10, 20, 30, 40])
    _, (pct,) = _bars(figures["report_expert_hit_rate"].axes[0])
    assert sorted(pct) == pytest.approx([40, 50, 70, 90])
    # No "1e13"-style offset or scientific multiplier on the value axis.
    ax = figures["report_h2d_bytes"].axes[0]
    figures["report_h2d_bytes"].canvas.draw()
    assert ax.yaxis.get_offset_text().get_text() == ""


def test_bars_are_sorted_by_value_best_first(policy_table):
    figures = build_figures(policy_table, ["policy/prefetch"])
    labels, (ms,) = _bars(figures["report_tpot_s"].axes[0])
    assert labels == ["oracle", "lookahead", "fiddler", "lru"]            # lower TPOT is better
    assert ms == sorted(ms)
    labels, (pct,) = _bars(figures["report_expert_hit_rate"].axes[0])
    assert labels == ["oracle", "lookahead", "fiddler", "lru"]            # higher hit rate is better
    assert pct == sorted(pct, reverse=True)
    assert figures["report_tpot_s"].axes[0].get_xlabel() == "prefetch policy"


def test_grouped_bars_sort_categories_by_their_mean(capacity_table):
    figures = build_figures(capacity_table, ["policy/prefetch", "policy.prefetch.capacity_per_layer"])
    ax = figures["report_tpot_s"].axes[0]
    labels, heights = _bars(ax)
    assert labels == ["oracle", "lfu", "lru"]
    assert len(heights) == 3                                             # one bar group per capacity
    means = np.mean(heights, axis=0)
    assert list(means) == sorted(means)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["2", "4", "8"]   # numeric keys keep their order


def test_capacity_plot_has_one_line_per_policy_at_the_swept_capacities(capacity_table, tmp_path):
    varying = ["policy/prefetch", "policy.prefetch.capacity_per_layer"]
    figures = build_figures(capacity_table, varying)
    fig = figures["report_capacity"]
    tpot_ax, hit_ax = fig.axes
    assert tpot_ax.get_ylabel() == "TPOT (ms)" and hit_ax.get_ylabel() == "expert hit rate (%)"
    assert "capacity" in tpot_ax.get_xlabel() and "capacity" in hit_ax.get_xlabel()
    for ax in (tpot_ax, hit_ax):
        lines = ax.get_lines()
        assert sorted(l.get_label() for l in lines) == ["lfu", "lru", "oracle"]
        for line in lines:
            assert list(line.get_xdata()) == [2, 4, 8]
    by_policy = {l.get_label(): list(l.get_ydata()) for l in tpot_ax.get_lines()}
    assert by_policy["lru"] == pytest.approx([20.0, 10.0, 5.0])             # 0.040 s / c, in ms
    hits = {l.get_label(): list(l.get_ydata()) for l in hit_ax.get_lines()}
    assert hits["oracle"] == pytest.approx([100 * 0.1 * c / 0.020 / 100 for c in (2, 4, 8)])
    assert [l.get_label() for l in tpot_ax.get_lines()] == ["oracle", "lfu", "lru"]  # legend best first
    title = _title(fig)
    assert "model=olmoe_1b_7b" in title and "prefetch=" not in title and "capacity_per_layer=" not in title
    written = plot(capacity_table, varying, tmp_path)
    assert tmp_path / "report_capacity.png" in written
    assert all(p.exists() and p.stat().st_size > 5000 for p in written)
    assert len(written) == 7


def test_capacity_plot_from_summary_columns_only_and_other_keys_as_line_styles(capacity_table):
    # A sweep that chose capacity and policy through presets: only the summary keys vary.
    table = capacity_table.drop(columns=["policy/prefetch", "policy.prefetch.capacity_per_layer"])
    table = pd.concat([table, table.assign(batch_size=16, tpot_s=table.tpot_s * 2)], ignore_index=True)
    table["workload.batch_size"] = table["batch_size"]
    fig = build_figures(table, ["workload.batch_size"])["report_capacity"]
    lines = fig.axes[0].get_lines()
    assert len(lines) == 6
    assert {l.get_label() for l in lines} == {f"{p}, batch_size={b}" for p in ("lru", "lfu", "oracle")
                                              for b in (4, 16)}
    assert {l.get_linestyle() for l in lines} == {"-", "--"}


def test_no_capacity_plot_unless_both_capacity_and_policy_vary(policy_table, capacity_table):
    assert "report_capacity" not in build_figures(policy_table, ["policy/prefetch"])
    one_policy = capacity_table[capacity_table.prefetch == "lru"]
    assert "report_capacity" not in build_figures(one_policy, ["policy.prefetch.capacity_per_layer"])


def test_numeric_sweep_is_a_line_per_group_with_plain_ticks():
    rows = [_row(**{"workload.batch_size": b, "batch_size": b, "policy/prefetch": p, "prefetch": p,
                    "tpot_s": 0.01 * b ** 0.5 * (2 if p == "lru" else 1), "expert_hit_rate": 0.5,
                    "h2d_bytes": 1e9})
            for b in (1, 4, 16, 64) for p in ("lru", "oracle")]
    table = pd.DataFrame(rows)
    fig = build_figures(table, ["workload.batch_size", "policy/prefetch"])["report_tpot_s"]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "batch size" and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16", "64"]
    assert [l.get_label() for l in ax.get_lines()] == ["oracle", "lru"]
    assert list(ax.get_lines()[0].get_xdata()) == [1, 4, 16, 64]
    assert "batch_size" not in _title(fig)


def test_single_run_and_extra_varying_keys():
    table = pd.DataFrame([_row(tpot_s=0.01, expert_hit_rate=0.5, h2d_bytes=1e9, run=".")])
    figures = build_figures(table, [])
    assert figures["report_tpot_s"].axes[0].get_xlabel() == "run"
    rows = [_row(**{"a.x": a, "b.y": b, "c.z": c, "tpot_s": 0.001 * c, "expert_hit_rate": 0.1, "h2d_bytes": 1e9})
            for a in ("p", "q") for b in ("u", "v") for c in (1, 2)]
    fig = build_figures(pd.DataFrame(rows), ["a.x", "b.y", "c.z"])["report_tpot_s"]
    assert "mean over c.z" in _title(fig)
    _, heights = _bars(fig.axes[0])
    assert np.allclose(heights, 1.5)                                   # mean of 1 ms and 2 ms


def test_failed_runs_are_left_out_and_counted_in_the_title(capacity_table):
    failed = _row(**{"policy/prefetch": "lru", "policy.prefetch.capacity_per_layer": 16, "prefetch": "lru",
                     "capacity_per_layer": 16, "status": "failed", "tpot_s": np.nan, "expert_hit_rate": np.nan,
                     "h2d_bytes": np.nan, "ttft_s": np.nan, "throughput_tok_s": np.nan, "copy_stall_s": np.nan})
    table = pd.concat([capacity_table.assign(status="ok"), pd.DataFrame([failed])], ignore_index=True)
    figures = build_figures(table, ["policy/prefetch", "policy.prefetch.capacity_per_layer"])
    fig = figures["report_capacity"]
    assert "1 failed run(s) left out" in _title(fig)
    assert all(list(l.get_xdata()) == [2, 4, 8] for l in fig.axes[0].get_lines())
    _, heights = _bars(figures["report_tpot_s"].axes[0])
    assert len(heights) == 3 and not np.isnan(heights).any()
