"""The standard plots of ``moesim-report``.

* ``report_METRIC.png`` for TPOT, TTFT, throughput, expert hit rate, bytes over PCIe and copy stall:
  the metric (in ms, GB or %) against the first varying key of the sweep, one line (numeric key) or
  bar group (categorical key) per value of the second. Bars are sorted by value, best first.
* ``report_capacity.png`` when a sweep varies both the expert-cache capacity
  (``policy.prefetch.capacity_per_layer``) and the prefetch policy: TPOT and hit rate against
  capacity, one line per policy.

Every figure is titled with the parameters held fixed across the sweep (the key choices of
``summary.json`` that are the same in every run, and the constant overrides), so a plot pasted out of
its folder still says what it shows. :func:`build_figures` returns the figures without writing them
(tests read their titles, labels and data); :func:`plot` writes and closes them.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd


@dataclass(frozen=True)
class Metric:
    column: str
    label: str          # y-axis label, with its unit
    scale: float        # plotted value = column value * scale
    higher_is_better: bool


METRICS = [
    Metric("tpot_s", "TPOT (ms)", 1e3, False),
    Metric("ttft_s", "TTFT (ms)", 1e3, False),
    Metric("throughput_tok_s", "throughput (tok/s)", 1.0, True),
    Metric("expert_hit_rate", "expert hit rate (%)", 100.0, True),
    Metric("h2d_bytes", "bytes over PCIe, H2D (GB)", 1e-9, False),
    Metric("copy_stall_s", "copy stall (ms)", 1e3, False),
]
_BY_COLUMN = {m.column: m for m in METRICS}

# summary.json's key choices (sim.scenario.Scenario.choices), in the order a title names them.
KEY_CHOICES = ["model", "hw", "tensor_parallel", "prefetch", "capacity_per_layer", "cache_scope", "batch_size",
               "scheduler", "speculation", "spec_k", "drafter", "draft_model", "spec_alpha", "ep", "workload", "routing",
               "trace_path", "num_requests", "prompt_len", "output_len", "seed"]

# Axis and legend names of common sweep keys (by the key's last component).
KEY_LABELS = {
    "capacity_per_layer": "expert cache capacity (experts per layer)",
    "prefetch": "prefetch policy",
    "batch_size": "batch size",
    "cache_scope": "cache scope",
    "speculation": "speculation",
    "bandwidth_bps": "host link bandwidth (B/s)",
    "num_requests": "requests",
    "prompt_len": "prompt length (tokens)",
    "output_len": "output length (tokens)",
    "run": "run",
}

# Shorter names for legend titles.
LEGEND_LABELS = {"capacity_per_layer": "capacity / layer", "prefetch": "policy", "batch_size": "batch size"}

# Key choices whose value only restates the hardware (one GPU, no expert parallelism) and would
# crowd every title: left out when they hold these values.
TRIVIAL = {"tensor_parallel": 1, "ep": "none", "scheduler": "continuous"}

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

CAPACITY_KEYS = ["policy.prefetch.capacity_per_layer", "capacity_per_layer"]
POLICY_KEYS = ["policy/prefetch", "policy.prefetch.name", "prefetch"]


def _leaf(key: str) -> str:
    return key.replace("/", ".").rsplit(".", 1)[-1]


def key_label(key: str) -> str:
    return KEY_LABELS.get(_leaf(key), key)


def legend_label(key: str) -> str:
    return LEGEND_LABELS.get(_leaf(key), key_label(key))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{int(value)}" if value.is_integer() and abs(value) < 1e6 else f"{value:g}"
    text = str(value)
    return Path(text).name if "/" in text and len(text) > 30 else text


def _constant(series: pd.Series) -> Optional[Any]:
    values = series.dropna()
    if len(values) != len(series) or values.astype(str).nunique() != 1:
        return None
    return values.iloc[0]


def _dedup(table: pd.DataFrame) -> pd.DataFrame:
    # An override such as ``model=X`` and the summary's ``model`` key can both land in the table.
    return table.loc[:, ~table.columns.duplicated()]


def fixed_parameters(table: pd.DataFrame, varying: list[str]) -> dict[str, Any]:
    """What is held fixed across the sweep: the key choices that are the same (and set) in every
    run, then the constant overrides (dotted or ``group/option`` keys) that no key choice already names."""
    table = _dedup(table)
    fixed: dict[str, Any] = {}
    for key in KEY_CHOICES:
        if key in table and key not in varying:
            value = _constant(table[key])
            if value is not None and not (key in TRIVIAL and str(value) == str(TRIVIAL[key])):
                fixed[key] = value
    for key in table.columns:
        if key in varying or key in fixed or not ("." in key or "/" in key) or key.startswith("hydra"):
            continue
        value = _constant(table[key])
        if value is None:
            continue
        leaf = _leaf(key)
        if leaf in TRIVIAL and str(value) == str(TRIVIAL[leaf]):
            continue
        if leaf in fixed and str(fixed[leaf]) == str(value):
            continue   # e.g. workload.batch_size=4 is already batch_size=4
        if leaf == "name" and _leaf(key.rsplit(".", 1)[0]) in fixed:
            continue   # policy.prefetch.name=lru is prefetch=lru
        fixed[key] = value
    return fixed


def title_text(fixed: Mapping[str, Any], note: str = "", width: int = 90) -> str:
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in fixed.items())
    if note:
        text = f"{text}; {note}" if text else note
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _column(table: pd.DataFrame, candidates: list[str], varying: list[str]) -> Optional[str]:
    """The first candidate that is a varying key, else the first that differs between rows."""
    for key in candidates:
        if key in varying and key in table:
            return key
    for key in candidates:
        if key in table and table[key].astype(str).nunique() > 1:
            return key
    return None


def _style(ax, metric: Metric, bars: bool = False) -> None:
    ax.set_ylabel(metric.label)
    ax.grid(alpha=0.3, axis="y" if bars else "both")
    ax.set_ylim(bottom=0)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.05)
    if metric.column == "expert_hit_rate":
        top = ax.get_ylim()[1]
        ax.set_ylim(top=min(max(top, 1.0), 102.0))
    try:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    except AttributeError:
        pass


def _numeric_xticks(ax, values: list) -> None:
    """Log2 axis for values spanning 16x or more; ticks at the swept values, plainly written."""
    if values and values[0] > 0 and values[-1] / values[0] >= 16:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    if 0 < len(values) <= 12:
        ax.set_xticks([float(v) for v in values])
        ax.set_xticklabels([_fmt(float(v)) for v in values])


def _legend(ax, key: str) -> None:
    ax.legend(title=legend_label(key), fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)


def _best_first(means: pd.Series, metric: Metric) -> list:
    return list(means.sort_values(ascending=not metric.higher_is_better, kind="stable").index)


def _metric_figure(table: pd.DataFrame, varying: list[str], metric: Metric, fixed: Mapping[str, Any],
                   note: str = ""):
    import matplotlib.pyplot as plt

    x = varying[0] if varying else "run"
    if x not in table:
        table = table.assign(run=[str(i) for i in range(len(table))])
    group = varying[1] if len(varying) > 1 else None
    rest = varying[2:]
    data = table[[c for c in dict.fromkeys([x, group, *rest]) if c]].copy()
    data["_value"] = pd.to_numeric(table[metric.column], errors="coerce") * metric.scale
    numeric_x = pd.api.types.is_numeric_dtype(data[x])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    if numeric_x:
        groups = [(None, data)] if group is None else list(data.groupby(group, sort=True))
        if group is not None and not pd.api.types.is_numeric_dtype(data[group]):
            means = pd.Series({name: sub._value.mean() for name, sub in groups})
            order = _best_first(means, metric)
            groups = sorted(groups, key=lambda g: order.index(g[0]))
        for i, (name, sub) in enumerate(groups):
            line = sub.groupby(x, sort=True)._value.mean()
            ax.plot(line.index, line.values, marker=MARKERS[i % len(MARKERS)],
                    label=None if name is None else _fmt(name))
        _numeric_xticks(ax, sorted(data[x].dropna().unique()))
        if group is not None:
            _legend(ax, group)
    else:
        data[x] = data[x].astype(str)
        if group is None:
            means = data.groupby(x, sort=False)._value.mean()
            order = _best_first(means, metric)
            ax.bar(range(len(order)), [means[k] for k in order], color="C0")
        else:
            pivot = data.pivot_table(index=x, columns=group, values="_value", aggfunc="mean")
            order = _best_first(pivot.mean(axis=1), metric)
            columns = list(pivot.columns)
            if not pd.api.types.is_numeric_dtype(data[group]):
                columns = _best_first(pivot.mean(axis=0), metric)
            width = 0.8 / len(columns)
            for i, col in enumerate(columns):
                offsets = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(order))]
                ax.bar(offsets, [pivot.loc[k, col] for k in order], width=width, label=_fmt(col))
            _legend(ax, group)
        ax.set_xticks(range(len(order)))
        crowded = len(order) * max(len(s) for s in order) > 48
        ax.set_xticklabels(order, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlabel(key_label(x))
    _style(ax, metric, bars=not numeric_x)
    notes = [n for n in (f"mean over {', '.join(rest)}" if rest else "", note) if n]
    ax.set_title(title_text(fixed, "; ".join(notes)), fontsize=8)
    return fig


def _capacity_figure(table: pd.DataFrame, varying: list[str], capacity: str, policy: str,
                     fixed: Mapping[str, Any], note: str = ""):
    import matplotlib.pyplot as plt

    others = [k for k in varying if k not in (capacity, policy)
              and _leaf(k) not in (_leaf(capacity), _leaf(policy))]
    data = table[list(dict.fromkeys([capacity, policy, *others]))].copy()
    data["_capacity"] = pd.to_numeric(data[capacity], errors="coerce")
    data["_policy"] = data[policy].astype(str)
    panels = [_BY_COLUMN["tpot_s"], _BY_COLUMN["expert_hit_rate"]]
    for m in panels:
        data[m.column] = pd.to_numeric(table[m.column], errors="coerce") * m.scale
    dropped = int(data["_capacity"].isna().sum())
    data = data[data["_capacity"].notna()]
    # Policies in the legend best first by TPOT; one colour per policy, one line style per
    # combination of any other varying keys.
    order = _best_first(data.groupby("_policy").tpot_s.mean(), panels[0])
    combos = [()] if not others else sorted({tuple(r) for r in data[others].astype(str).itertuples(index=False)})
    styles = dict(zip(combos, cycle(["-", "--", ":", "-."])))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, layout="constrained")
    for i, name in enumerate(order):
        sub = data[data["_policy"] == name]
        for combo in combos:
            part = sub if not others else sub[(sub[others].astype(str) == list(combo)).all(axis=1)]
            if part.empty:
                continue
            linestyle, marker = styles[combo], MARKERS[i % len(MARKERS)]
            label = name if not others else f"{name}, " + ", ".join(f"{_leaf(k)}={v}" for k, v in zip(others, combo))
            for ax, m in zip(axes, panels):
                line = part.groupby("_capacity", sort=True)[m.column].mean()
                ax.plot(line.index, line.values, color=f"C{i % 10}", linestyle=linestyle, marker=marker,
                        label=label)
    caps = sorted(data["_capacity"].unique())
    for ax, m in zip(axes, panels):
        _numeric_xticks(ax, caps)
        ax.set_xlabel(key_label("capacity_per_layer"))
        _style(ax, m)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title=legend_label("prefetch"), fontsize=8, title_fontsize=8,
               loc="outside right upper")
    notes = [n for n in (note, f"{dropped} run(s) with capacity=null left out" if dropped else "") if n]
    fig.suptitle(title_text(fixed, "; ".join(notes), width=120), fontsize=8.5)
    return fig


def build_figures(table: pd.DataFrame, varying: list[str],
                  fixed: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """{file stem: matplotlib Figure}, not saved (the caller closes them). ``fixed`` overrides what the
    titles name as held fixed (default :func:`fixed_parameters`)."""
    import matplotlib

    matplotlib.use("Agg")
    table = _dedup(table).reset_index(drop=True)
    varying = [k for k in varying if k in table]
    fixed = fixed_parameters(table, varying) if fixed is None else dict(fixed)
    # Runs that failed (a summary with status=failed and no metrics) are left out of every plot.
    ok = pd.to_numeric(table["tpot_s"], errors="coerce").notna() if "tpot_s" in table \
        else pd.Series(True, index=table.index)
    if "status" in table:
        ok &= table["status"].astype(str) != "failed"
    failed = int((~ok).sum())
    note = f"{failed} failed run(s) left out" if failed else ""
    table = table[ok].reset_index(drop=True)
    if table.empty:
        return {}
    figures: dict[str, Any] = {}
    for metric in METRICS:
        if metric.column not in table or pd.to_numeric(table[metric.column], errors="coerce").isna().all():
            continue
        figures[f"report_{metric.column}"] = _metric_figure(table, varying, metric, fixed, note)
    capacity = _column(table, CAPACITY_KEYS, varying)
    policy = _column(table, POLICY_KEYS, varying)
    if (capacity and policy and "tpot_s" in table and "expert_hit_rate" in table
            and pd.to_numeric(table[capacity], errors="coerce").notna().any()):
        figures["report_capacity"] = _capacity_figure(table, varying, capacity, policy, fixed, note)
    return figures


def plot(table: pd.DataFrame, varying: list[str], out_dir: Path,
         fixed: Optional[Mapping[str, Any]] = None, dpi: int = 150) -> list[Path]:
    """Write the figures of :func:`build_figures` as ``out_dir/NAME.png``; returns their paths."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in build_figures(table, varying, fixed).items():
        path = Path(out_dir) / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written
