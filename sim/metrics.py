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


def _mean(values) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _pct(values, q: float) -> float:
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q)) if x.size else float("nan")


def _total(values) -> float:
    """Sum skipping NaN, as a float."""
    return float(np.nansum(np.asarray(values, dtype=np.float64)))


def _round_times(steps, rows: np.ndarray) -> dict[str, float]:
    """Mean verify pass (a drafting round minus its drafting and rejection sampling), drafting and
    rejection-sampling time per drafting round, over the ``rows`` (a mask) of ``steps``."""
    draft, reject = np.asarray(steps["draft_s"])[rows], np.asarray(steps["reject_s"])[rows]
    return {"verify_step": _mean(np.asarray(steps["duration_s"])[rows] - draft - reject),
            "draft_round": _mean(draft), "reject_round": _mean(reject)}


def summarize(steps, requests) -> dict[str, Any]:
    """Summary metrics (summary.json's keys, DESIGN.md) computed from the records alone: ``steps`` and
    ``requests`` are ``sim.records.Records`` or DataFrames (anything whose ``[column]`` numpy reads).

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
    def col(name: str) -> np.ndarray:   # a step column
        return np.asarray(steps[name])

    def req(name: str) -> np.ndarray:   # a request column
        return np.asarray(requests[name])

    prefetches, useful, demand = (_total(col(n)) for n in ("prefetches", "useful_prefetches", "demand_loads"))
    phase = np.asarray(steps["phase"], dtype=object)
    decode, prefill = phase == "decode", phase == "prefill"
    batch = col("batch_size")
    full_size = int(batch[decode].max()) if decode.any() else None
    full = decode & (batch == full_size) if decode.any() else decode   # decode passes at the full batch
    hits = _total(col("hits"))
    accesses = hits + _total(col("misses"))
    span = float(np.nanmax(req("finish_s")) - np.nanmin(req("arrival_s"))) if len(requests) else 0.0
    generated = _total(req("output_len"))
    duration = col("duration_s")
    out = {
        "tpot_s": _mean(req("tpot_s")),
        "tpot_p50_s": _pct(req("tpot_s"), 50),
        "tpot_p99_s": _pct(req("tpot_s"), 99),
        "ttft_s": _mean(req("ttft_s")),
        "ttft_p50_s": _pct(req("ttft_s"), 50),
        "ttft_p99_s": _pct(req("ttft_s"), 99),
        "throughput_tok_s": generated / span if span > 0 else float("nan"),
        "decode_tokens": int(np.sum(col("committed_tokens" if "committed_tokens" in steps else "batch_size")[decode])),
        "requests": int(len(requests)),
        "iterations": int(len(steps)),
        "simulated_time_s": float(np.nanmax(col("end_s"))) if len(steps) else 0.0,
        "decode_step_s": _mean(duration[decode]),
        "full_batch_size": full_size,
        "decode_step_full_batch_s": _mean(duration[full]),
        "expert_hit_rate": hits / accesses if accesses else float("nan"),
        "h2d_bytes": _total(col("h2d_bytes")),
        "demand_bytes": _total(col("demand_bytes")),
        "prefetch_bytes": _total(col("prefetch_bytes")),
        "wasted_prefetch_bytes": _total(col("wasted_prefetch_bytes")),
        "copy_stall_s": _total(col("copy_stall_s")),
        "host_stall_s": _total(col("host_stall_s")),
        "host_runs": int(_total(col("host_runs"))),
        "prefetches": int(prefetches),
        "prefetch_precision": useful / prefetches if prefetches else float("nan"),
        "prefetch_recall": useful / (useful + demand) if useful + demand else float("nan"),
        "attention_s": _total(col("attention_s")),
        "expert_compute_s": _total(col("expert_compute_s")),
        "mean_active_experts": _mean(col("active_experts_mean")[decode]),
        "mean_active_experts_prefill": _mean(col("active_experts_mean")[prefill]),
    }
    if "draft_tokens" in steps and _total(col("draft_tokens")) > 0:
        drafted = decode & (col("draft_tokens") > 0)
        accepted = _total(col("accepted_tokens")[drafted])
        out.update({
            "spec_rounds": int(drafted.sum()),
            "mean_spec_k": _mean(col("spec_k")[decode]),
            "acceptance_rate": accepted / _total(col("draft_tokens")[drafted]),
            "accepted_tokens_per_round": accepted / _total(col("drafting_requests")[drafted]),
            "committed_tokens_per_round": _total(col("committed_tokens")[decode]) / _total(batch[decode]),
            **{f"{name}_s": value for name, value in _round_times(steps, drafted).items()},
            **{f"{name}_full_batch_s": value for name, value in _round_times(steps, drafted & full).items()},
            "draft_s": _total(col("draft_s")),
            "reject_s": _total(col("reject_s")),
        })
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
