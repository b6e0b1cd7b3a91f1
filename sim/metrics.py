"""Records -> summary metrics. Both engines emit the same record schema, so one summariser serves both.

Step records (``steps.parquet``), one row per forward pass:
    step, phase (prefill|decode), start_s, end_s, duration_s, batch_size, tokens,
    attention_s, expert_compute_s (routed experts on the GPU), other_compute_s, copy_stall_s (GPU
    idle waiting for copies), host_stall_s (GPU idle waiting for experts run on the host; these five
    add up to duration_s), host_expert_s (CPU time of host-run experts), h2d_bytes (issued in the
    step: demand + prefetch + activations coming back from the host), demand_bytes,
    prefetch_bytes, hits (needed experts resident when the layer routed), misses, late_prefetches
    (misses already being prefetched), prefetches (issued), useful_prefetches (prefetched experts
    used before eviction), demand_loads, host_runs, wasted_prefetch_bytes (prefetched experts
    evicted unused), active_experts_mean, active_experts_per_layer (list, one per MoE layer);
    speculative decoding (``sim/speculation.py``): spec_k (K the policy chose; 0 = plain decode),
    drafting_requests (requests that drafted at least one token), draft_tokens, accepted_tokens,
    committed_tokens (tokens the pass committed: accepted drafts + one per request; a prefill pass
    commits each request's first token), draft_s (drafter time on the compute stream, ngram
    lookups included), reject_s (rejection sampling). attention_s + expert_compute_s +
    other_compute_s + copy_stall_s + host_stall_s + draft_s + reject_s = duration_s.
Request records (``requests.parquet``), one row per request:
    request_id, arrival_s, prompt_len, output_len, first_token_s, finish_s, ttft_s, tpot_s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def _mean(series: pd.Series) -> float:
    s = series.dropna()
    return float(s.mean()) if len(s) else float("nan")


def _pct(series: pd.Series, q: float) -> float:
    s = series.dropna()
    return float(np.percentile(s, q)) if len(s) else float("nan")


def full_batch(rows: pd.DataFrame, decode: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows at the largest batch size of ``decode`` (default: of ``rows`` themselves)."""
    ref = rows if decode is None else decode
    return rows[rows["batch_size"] == ref["batch_size"].max()] if len(ref) else rows


def _round_times(drafted: pd.DataFrame) -> dict[str, float]:
    """Mean verify pass (a drafting round minus its drafting and rejection sampling), drafting and
    rejection-sampling time per drafting round."""
    return {"verify_step": _mean(drafted["duration_s"] - drafted["draft_s"] - drafted["reject_s"]),
            "draft_round": _mean(drafted["draft_s"]), "reject_round": _mean(drafted["reject_s"])}


def summarize(steps: pd.DataFrame, requests: pd.DataFrame) -> dict[str, Any]:
    """Summary metrics (summary.json's keys, DESIGN.md) computed from the records alone.

    tpot_s: mean over requests of (finish - first token) / (output_len - 1), requests with
        output_len > 1 only. ttft_s: mean over requests of first token - arrival.
    throughput_tok_s: generated tokens (all requests, first tokens included) / (last finish - first arrival).
    decode_tokens: tokens produced by decode passes. expert_hit_rate: hits / (hits + misses) over
    all passes, an access being one (layer, expert) a pass needs. mean_active_experts: distinct
    experts per MoE layer per decode pass, averaged over decode passes (prefill passes are in
    mean_active_experts_prefill). prefetch_precision: useful prefetches / prefetches issued;
    prefetch_recall: useful prefetches / (useful prefetches + demand loads), i.e. the share of
    needed-but-not-resident experts that a prefetch had asked for.

    Speculative decoding (present when the records carry draft tokens): spec_rounds (decode passes
    that drafted), mean_spec_k (K chosen, averaged over decode passes), acceptance_rate (accepted /
    drafted tokens), accepted_tokens_per_round (accepted drafts per request per drafting round),
    committed_tokens_per_round (tokens committed per request per decode pass: Cascade's ETR),
    verify_step_s (mean decode pass minus its drafting and rejection sampling: the target's
    T_T(B, K)), draft_round_s and reject_round_s (mean drafting and rejection-sampling time per
    drafting round), draft_s, reject_s (totals over the run, prefill drafting included).

    Full batch: ``full_batch_size`` is the largest decode batch of the run (``workload.batch_size``
    whenever the workload can fill it) and ``decode_step_full_batch_s`` the mean decode pass at that
    batch; with speculation, ``verify_step_full_batch_s``, ``draft_round_full_batch_s`` and
    ``reject_round_full_batch_s`` are the same means over the drafting rounds at that batch. The
    tail of a run, where only a few stragglers are left, has smaller batches; MoESD's target
    efficiency is defined at one batch size, so it is computed from these (``speculation_gains``).
    """
    prefetches = float(steps["prefetches"].sum())
    useful = float(steps["useful_prefetches"].sum())
    demand = float(steps["demand_loads"].sum())
    decode = steps[steps["phase"] == "decode"]
    prefill = steps[steps["phase"] == "prefill"]
    accesses = float(steps["hits"].sum() + steps["misses"].sum())
    span = float(requests["finish_s"].max() - requests["arrival_s"].min()) if len(requests) else 0.0
    generated = float(requests["output_len"].sum())
    out = {
        "tpot_s": _mean(requests["tpot_s"]),
        "tpot_p50_s": _pct(requests["tpot_s"], 50),
        "tpot_p99_s": _pct(requests["tpot_s"], 99),
        "ttft_s": _mean(requests["ttft_s"]),
        "ttft_p50_s": _pct(requests["ttft_s"], 50),
        "ttft_p99_s": _pct(requests["ttft_s"], 99),
        "throughput_tok_s": generated / span if span > 0 else float("nan"),
        "decode_tokens": int(decode["committed_tokens"].sum() if "committed_tokens" in decode
                             else decode["batch_size"].sum()),
        "requests": int(len(requests)),
        "iterations": int(len(steps)),
        "simulated_time_s": float(steps["end_s"].max()) if len(steps) else 0.0,
        "decode_step_s": _mean(decode["duration_s"]),
        "full_batch_size": int(decode["batch_size"].max()) if len(decode) else None,
        "decode_step_full_batch_s": _mean(full_batch(decode)["duration_s"]),
        "expert_hit_rate": float(steps["hits"].sum()) / accesses if accesses else float("nan"),
        "h2d_bytes": float(steps["h2d_bytes"].sum()),
        "demand_bytes": float(steps["demand_bytes"].sum()),
        "prefetch_bytes": float(steps["prefetch_bytes"].sum()),
        "wasted_prefetch_bytes": float(steps["wasted_prefetch_bytes"].sum()),
        "copy_stall_s": float(steps["copy_stall_s"].sum()),
        "host_stall_s": float(steps["host_stall_s"].sum()),
        "host_runs": int(steps["host_runs"].sum()),
        "prefetches": int(prefetches),
        "prefetch_precision": useful / prefetches if prefetches else float("nan"),
        "prefetch_recall": useful / (useful + demand) if useful + demand else float("nan"),
        "attention_s": float(steps["attention_s"].sum()),
        "expert_compute_s": float(steps["expert_compute_s"].sum()),
        "mean_active_experts": _mean(decode["active_experts_mean"]),
        "mean_active_experts_prefill": _mean(prefill["active_experts_mean"]),
    }
    if "draft_tokens" in steps and steps["draft_tokens"].sum() > 0:
        drafted = decode[decode["draft_tokens"] > 0]
        out.update({
            "spec_rounds": int(len(drafted)),
            "mean_spec_k": _mean(decode["spec_k"]),
            "acceptance_rate": float(drafted["accepted_tokens"].sum() / drafted["draft_tokens"].sum()),
            "accepted_tokens_per_round": float(drafted["accepted_tokens"].sum() / drafted["drafting_requests"].sum()),
            "committed_tokens_per_round": float(decode["committed_tokens"].sum() / decode["batch_size"].sum()),
            **{f"{name}_s": value for name, value in _round_times(drafted).items()},
            **{f"{name}_full_batch_s": value for name, value in _round_times(full_batch(drafted, decode)).items()},
            "draft_s": float(steps["draft_s"].sum()),
            "reject_s": float(steps["reject_s"].sum()),
        })
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
