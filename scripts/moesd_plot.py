"""Speculative decoding on MoE against batch size, as MoESD (arXiv 2505.19645) plots it.

Gathers one or more ``moesim -m +experiment=moesd_*`` sweeps (each a ``multirun/DATE/TIME``
folder), and for every setup in them (model, hw, drafter, top-k, gamma) plots the simulated speedup of
speculative decoding against batch size, with MoESD's analytical model (``sim/moesd.py``) fitted to
the same runs' step times drawn next to it. Also prints (and writes as CSV) each setup's peak next
to the published one.

    moesim -m +experiment=moesd_qwen2_2xh800
    moesim -m +experiment=moesd_qwen2_2xh800 model.top_k=1,2,4,8      # the sparsity sweep
    moesim -m +experiment=moesd_qwen2_2xh800 policy.speculation.k=2,3,4 \
        policy.speculation.sigma=null policy.speculation.alpha=0.947   # gamma 2..4, the drafter's alpha fixed
    python scripts/moesd_plot.py multirun/DATE/TIME [more sweeps ...] -o moesd.png

Writes ``moesd.png`` (speedup and target efficiency against batch size; a star marks the published
peak's height at the simulated peak's batch size), ``moesd.csv`` (one row
per run: setup, batch size, simulated speedup, TE, and the fitted model's prediction) and
``moesd_measurements.csv`` (the step times ``moesim-moesd fit`` takes, with a ``setup`` column).
The fit uses every run of a setup (at least three batch sizes): ``target_1_s`` is the baseline's
mean decode pass, ``target_gamma_s`` the mean verify pass, ``draft_s`` one draft step (the round's
drafting divided by k), ``reject_s`` the rejection sampling per round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from sim.moesd import PUBLISHED_PEAKS


def load(sweeps: list[Path]) -> pd.DataFrame:
    from sim.report import gather

    frames = []
    for d in sweeps:
        if not d.is_dir():
            raise SystemExit(f"moesd_plot: error: {d} is not a directory (give multirun/DATE/TIME folders)")
        table, _, _ = gather(d)
        if table.empty:
            raise SystemExit(f"moesd_plot: error: {d} holds no summary.json")
        frames.append(table)
    df = pd.concat(frames, ignore_index=True)
    need = {"speedup", "baseline_decode_step_full_batch_s", "verify_step_full_batch_s", "draft_round_full_batch_s",
            "reject_round_full_batch_s", "spec_k"}
    missing = need - set(df.columns)
    if missing:
        raise SystemExit(f"moesd_plot: error: runs without speculation results (missing {sorted(missing)}); "
                         f"sweep an experiment=moesd_* preset")
    top_k = df["model.top_k"] if "model.top_k" in df else pd.Series([None] * len(df), index=df.index)  # sparsity sweeps
    df["top_k"] = top_k.fillna("").astype(str)
    df["setup"] = df["model"] + " " + df["hw"] + " " + df["drafter"].astype(str) + \
        df["top_k"].map(lambda k: f" top-k={k}" if k else "")
    if df["spec_k"].nunique() > 1:   # a gamma sweep (policy.speculation.k=2,3,4): one curve per gamma
        df["setup"] = df["setup"] + df["spec_k"].map(lambda k: f" gamma={int(k)}")
    return df.sort_values(["setup", "batch_size"])


def measurements(g: pd.DataFrame) -> pd.DataFrame:
    """One setup's runs as ``moesim-moesd fit`` input (its columns, one row per batch size): the
    passes at each run's full batch, as MoESD's T_T(B, 1) and T_T(B, gamma) are defined at B."""
    k = int(g.iloc[0]["spec_k"])
    return pd.DataFrame({"batch_size": g["batch_size"].astype(int), "gamma": k,
                         "target_1_s": g["baseline_decode_step_full_batch_s"],
                         "target_gamma_s": g["verify_step_full_batch_s"],
                         "draft_s": g["draft_round_full_batch_s"] / k, "reject_s": g["reject_round_full_batch_s"]})


def fit_and_predict(g: pd.DataFrame) -> pd.Series:
    """MoESD's model fitted to one setup's runs; its predicted speedup per run (NaN if it cannot fit)."""
    from sim.config import compose_scenario
    from sim.moesd import fit, predict

    if g["batch_size"].nunique() < 3:
        return pd.Series(float("nan"), index=g.index)
    first = g.iloc[0]
    overrides = [f"model={first['model']}", f"hw={first['hw']}"]
    if first["top_k"]:
        overrides.append(f"model.top_k={first['top_k']}")
    sc = compose_scenario(overrides)
    gpu = sc.hw.gpu
    k = int(first["spec_k"])
    meas = measurements(g)
    # A dense model is one expert that every token uses (N(t) = 1).
    params = fit(meas, max(1, sc.model.num_experts), max(1, sc.model.top_k), gpu.peak_flops / gpu.mem_bw_bps)
    pred = predict(params, g["batch_size"].astype(int).tolist(), k, float(first["spec_alpha"]))
    return pd.Series(pred["speedup"].to_numpy(), index=g.index)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moesd_plot", description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="multirun/DATE/TIME folders of moesd_* sweeps")
    p.add_argument("-o", "--output", type=Path, default=Path("moesd.png"), help="plot file (CSV beside it)")
    args = p.parse_args(argv)
    df = load(args.sweeps)
    df["moesd_model_speedup"] = float("nan")
    for _, g in df.groupby("setup"):
        df.loc[g.index, "moesd_model_speedup"] = fit_and_predict(g)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 7))
    peaks = []
    for i, (setup, g) in enumerate(df.groupby("setup")):
        color = f"C{i % 10}"
        ax1.plot(g["batch_size"], g["speedup"], "o-", color=color, label=f"{setup} (sim)")
        if g["moesd_model_speedup"].notna().any():
            ax1.plot(g["batch_size"], g["moesd_model_speedup"], "--", color=color, alpha=0.7,
                     label=f"{setup} (MoESD model fit)")
        ax2.plot(g["batch_size"], g["target_efficiency"], "o-", color=color, label=setup)
        best = g.loc[g["speedup"].idxmax()]
        published_setup = not best["top_k"] and int(best["spec_k"]) == 4   # the published peaks are at gamma 4
        pub = PUBLISHED_PEAKS.get((best["model"], best["hw"])) if published_setup else None
        if pub:   # MoESD gives the peak's height; drawn at the simulated peak's batch size
            ax1.plot([best["batch_size"]], [pub], "*", color=color, ms=13, mec="black",
                     label=f"{setup} (published peak)")
        peaks.append({"setup": setup, "peak_batch_size": int(best["batch_size"]),
                      "sim_peak_speedup": round(float(best["speedup"]), 3),
                      "published_peak_speedup": pub,
                      "gap_pct": round(100 * (float(best["speedup"]) / pub - 1), 1) if pub else None})
    for ax, ylabel in ((ax1, "speedup over no speculation"), (ax2, "target efficiency T_T(B,1)/T_T(B,K)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)   # below: the curves need the room
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    cols = ["setup", "batch_size", "speedup", "target_efficiency", "spec_utility", "committed_tokens_per_round",
            "moesd_model_speedup", "tpot_s", "baseline_tpot_s"]
    df[[c for c in cols if c in df]].to_csv(args.output.with_suffix(".csv"), index=False)
    meas_path = args.output.with_name(args.output.stem + "_measurements.csv")
    pd.concat([measurements(g).assign(setup=setup) for setup, g in df.groupby("setup")]).to_csv(meas_path, index=False)
    print(pd.DataFrame(peaks).to_string(index=False))
    print(f"wrote {args.output}, {args.output.with_suffix('.csv')} and {meas_path} "
          f"(moesim-moesd fit input, one setup per file after filtering on 'setup')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
