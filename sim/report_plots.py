"""The standard plots of ``moesim-report``: each metric against the first varying key of a sweep."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

METRICS = [("tpot_s", "TPOT (s)"), ("throughput_tok_s", "throughput (tok/s)"),
           ("expert_hit_rate", "expert hit rate"), ("h2d_bytes", "bytes over PCIe (H2D)"),
           ("copy_stall_s", "copy stall (s)")]


def plot(table: pd.DataFrame, varying: list[str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    x = varying[0] if varying else "run"
    group = varying[1] if len(varying) > 1 else None
    numeric_x = pd.api.types.is_numeric_dtype(table[x])
    for metric, label in METRICS:
        if metric not in table or table[metric].isna().all():
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        groups = table.groupby(group, sort=True) if group else [(None, table)]
        if numeric_x:
            for name, sub in groups:
                ax.plot(sub[x], sub[metric], marker="o", label=None if name is None else f"{group}={name}")
            if table[x].min() > 0 and table[x].max() / table[x].min() >= 16:
                ax.set_xscale("log", base=2)
        else:
            pivot = table.pivot_table(index=x, columns=group, values=metric, aggfunc="mean") if group \
                else table.set_index(x)[[metric]]
            pivot.plot.bar(ax=ax, rot=30, legend=bool(group))
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        if group and numeric_x:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"report_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
