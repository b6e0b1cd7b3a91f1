"""Synthetic routing: known answers (MoESD N(t)), calibration targets measured from generated data,
features exactly on/off, determinism; and the statistics of a real DeepSeek trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workloads.model import ModelSpec, expected_active_experts
from workloads.requests import WorkloadConfig, build_requests
from workloads.synthetic import (RoutingConfig, generate_routing, generate_weights,
                                 resolve_routing)
from workloads.validation import ConfigError

MIXTRAL = ModelSpec(name="mixtral_8x7b", hidden_size=4096, num_layers=32, num_experts=8, top_k=2,
                    expert_intermediate_size=14336, num_attention_heads=32, num_kv_heads=8,
                    head_dim=128, vocab_size=32000)
QWEN2 = ModelSpec(name="qwen2_57b_a14b", hidden_size=3584, num_layers=28, num_experts=64, top_k=8,
                  expert_intermediate_size=2560, num_attention_heads=28, num_kv_heads=4,
                  head_dim=128, vocab_size=151936, num_shared_experts=1,
                  shared_expert_intermediate_size=20480)
DEEPSEEK_MOE = ModelSpec(name="deepseek_moe_16b", hidden_size=2048, num_layers=28, num_experts=64,
                         top_k=6, expert_intermediate_size=1408, num_attention_heads=16,
                         num_kv_heads=16, head_dim=128, vocab_size=102400, dense_layers=(0,),
                         dense_intermediate_size=10944, num_shared_experts=2,
                         shared_expert_intermediate_size=1408)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


# ------------------------------------------------------------------ measuring code (independent)

def distinct_per_window(reqs, num_experts, t):
    """Mean number of distinct experts hit by t consecutive tokens of one request at one layer."""
    counts = []
    for a in reqs:
        w = a.shape[0] // t
        if w == 0:
            continue
        win = a[:w * t].reshape(w, t, a.shape[1], a.shape[2]).transpose(0, 2, 1, 3)
        win = win.reshape(w * a.shape[1], t * a.shape[2]).astype(np.int64)
        hit = np.zeros((win.shape[0], num_experts), dtype=bool)
        np.put_along_axis(hit, win, True, axis=1)
        counts.append(hit.sum(axis=1))
    return float(np.concatenate(counts).mean())


def popularity_per_layer(reqs, num_experts):
    """Busiest expert's load / mean load, for each MoE layer."""
    a = np.concatenate(reqs)
    loads = np.stack([np.bincount(a[:, m].ravel(), minlength=num_experts) for m in range(a.shape[1])])
    return loads.max(axis=1) / loads.mean(axis=1)


def reuse_prob(seqs):
    """P(an expert of token t was also used by token t-1), seqs: list of [T, ..., K] arrays."""
    hit = total = 0
    for a in seqs:
        cur, prev = a[1:], a[:-1]
        hit += int((cur[..., :, None] == prev[..., None, :]).any(axis=-1).sum())
        total += cur.size
    return hit / total


def best_successor_lift(reqs, num_experts):
    """Mean over layer pairs and experts e of max_e' P(e' at m | e at m-1) / P(e' at m)."""
    a = np.concatenate(reqs).astype(np.int64)
    lifts = []
    for m in range(1, a.shape[1]):
        prev = np.zeros((len(a), num_experts))
        cur = np.zeros((len(a), num_experts))
        np.put_along_axis(prev, a[:, m - 1], 1.0, axis=1)
        np.put_along_axis(cur, a[:, m], 1.0, axis=1)
        cond = (prev.T @ cur) / np.maximum(prev.sum(axis=0), 1.0)[:, None]
        lifts.append((cond / cur.mean(axis=0)).max(axis=1).mean())
    return float(np.mean(lifts))


# ------------------------------------------------------------------ known answers


@pytest.mark.parametrize("model", [MIXTRAL, QWEN2], ids=lambda m: m.name)
def test_uniform_matches_moesd_active_experts(model):
    reqs = generate_routing(model, RoutingConfig(kind="uniform"), [512] * 8, np.random.default_rng(1))
    for t in (1, 4, 16, 64):
        expected = expected_active_experts(t, model.num_experts, model.top_k)
        measured = distinct_per_window(reqs, model.num_experts, t)
        assert measured == pytest.approx(expected, rel=0.02), (t, measured, expected)


def test_shapes_dtype_and_distinct_rows():
    counts = [5, 0, 17, 1]
    reqs = generate_routing(QWEN2, RoutingConfig(), counts, np.random.default_rng(2))
    assert [r.shape for r in reqs] == [(c, QWEN2.num_moe_layers, QWEN2.top_k) for c in counts]
    allrows = np.concatenate(reqs).reshape(-1, QWEN2.top_k)
    assert all(r.dtype == np.int16 for r in reqs)
    assert allrows.min() >= 0 and allrows.max() < QWEN2.num_experts
    srt = np.sort(allrows, axis=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any()


def test_dense_layers_are_not_routed():
    reqs = generate_routing(DEEPSEEK_MOE, RoutingConfig(), [3], np.random.default_rng(0))
    assert reqs[0].shape == (3, 27, 6)


# ------------------------------------------------------------------ calibration targets


@pytest.mark.parametrize("model", [MIXTRAL, QWEN2], ids=lambda m: m.name)
def test_realistic_hits_popularity_and_reuse_targets(model):
    E, K = model.num_experts, model.top_k
    reqs = generate_routing(model, RoutingConfig(kind="realistic"), [600] * 24, np.random.default_rng(3))
    # Default reuse target: Mixtral's measured lift 0.38/0.25 = 1.52 over chance K/E.
    assert reuse_prob(reqs) == pytest.approx(1.52 * K / E, abs=0.01)
    # Expected max/mean is exact; a finite sample reads a little high (max of noisy counts).
    ratio = np.median(popularity_per_layer(reqs, E))
    assert 1.34 * 0.98 <= ratio <= 1.34 * 1.04, ratio


def test_explicit_targets_are_hit():
    cfg = RoutingConfig(kind="temporal", popularity_max_over_mean=2.0, reuse_prob=0.6)
    reqs = generate_routing(MIXTRAL, cfg, [800] * 16, np.random.default_rng(4))
    assert reuse_prob(reqs) == pytest.approx(0.6, abs=0.01)
    assert np.median(popularity_per_layer(reqs, 8)) == pytest.approx(2.0, rel=0.03)


def test_features_that_are_off_are_off():
    E, K = MIXTRAL.num_experts, MIXTRAL.top_k
    counts = [400] * 16
    stats = {}
    for kind in ("uniform", "skewed", "temporal", "affinity", "realistic"):
        reqs = generate_routing(MIXTRAL, RoutingConfig(kind=kind), counts, np.random.default_rng(5))
        stats[kind] = (np.median(popularity_per_layer(reqs, E)), reuse_prob(reqs),
                       best_successor_lift(reqs, E))
    chance = resolve_routing(MIXTRAL, RoutingConfig(kind="skewed")).reuse_chance
    # uniform: no skew, reuse K/E, no cross-layer structure
    assert stats["uniform"][0] < 1.05
    assert stats["uniform"][1] == pytest.approx(K / E, abs=0.006)
    # popularity only where asked; reuse only in temporal/realistic
    for kind in ("skewed", "temporal", "affinity", "realistic"):
        assert stats[kind][0] == pytest.approx(1.34, rel=0.04), kind
    for kind in ("skewed", "affinity"):
        assert stats[kind][1] == pytest.approx(chance, abs=0.008), kind
    for kind in ("temporal", "realistic"):
        assert stats[kind][1] == pytest.approx(0.38, abs=0.01), kind
    # cross-layer affinity: the best successor of an expert is far more likely than its base rate
    noise_floor = stats["skewed"][2]
    assert max(stats["uniform"][2], stats["temporal"][2]) < noise_floor + 0.05
    assert stats["affinity"][2] > noise_floor + 0.8
    assert stats["realistic"][2] > noise_floor + 0.4


def test_affinity_strength_orders_cross_layer_dependence():
    lifts = []
    for strength in (0.0, 0.5, 3.0):
        cfg = RoutingConfig(kind="affinity", affinity_strength=strength)
        reqs = generate_routing(QWEN2, cfg, [300] * 8, np.random.default_rng(6))
        lifts.append(best_successor_lift(reqs, 64))
    assert lifts[0] < lifts[1] < lifts[2]


def test_reuse_never_crosses_requests():
    cfg = RoutingConfig(kind="temporal", popularity_max_over_mean=1.0, reuse_prob=1.0)
    reqs = generate_routing(MIXTRAL, cfg, [20] * 200, np.random.default_rng(7))
    for a in reqs:  # reuse 1: every token repeats the first token's routing
        assert (a == a[0]).all()
    firsts = np.stack([a[0] for a in reqs])  # first tokens of different requests are independent
    assert reuse_prob([firsts]) == pytest.approx(0.25, abs=0.03)


# ------------------------------------------------------------------ determinism, errors, scale


def test_deterministic_in_seed():
    counts = [30, 12, 44]
    a = generate_routing(QWEN2, RoutingConfig(), counts, np.random.default_rng(11))
    b = generate_routing(QWEN2, RoutingConfig(), counts, np.random.default_rng(11))
    c = generate_routing(QWEN2, RoutingConfig(), counts, np.random.default_rng(12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    r1 = build_requests(WorkloadConfig(num_requests=3, length_dist="uniform"), MIXTRAL, seed=5)
    r2 = build_requests(WorkloadConfig(num_requests=3, length_dist="uniform"), MIXTRAL, seed=5)
    assert all(np.array_equal(x.experts, y.experts) and x.prompt_len == y.prompt_len
               for x, y in zip(r1, r2))


@pytest.mark.parametrize("cfg,needle", [
    (RoutingConfig(kind="skewed", popularity_max_over_mean=4.0), "popularity_max_over_mean=4.0"),
    (RoutingConfig(kind="temporal", reuse_prob=0.1), "reuse_prob=0.1"),
    (RoutingConfig(kind="uniform", affinity_strength=-1.0), "affinity_strength=-1.0"),
])
def test_unreachable_targets_are_one_line_config_errors(cfg, needle):
    with pytest.raises(ConfigError) as exc:
        generate_routing(MIXTRAL, cfg, [4], np.random.default_rng(0))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_bad_token_count_is_a_config_error():
    with pytest.raises(ConfigError, match=r"token_counts\[1\]=-3"):
        generate_routing(MIXTRAL, RoutingConfig(), [2, -3], np.random.default_rng(0))


def test_from_workload_copies_routing_knobs():
    wl = WorkloadConfig(routing="affinity", popularity_max_over_mean=1.7, reuse_prob=0.4,
                        affinity_strength=2.5)
    assert RoutingConfig.from_workload(wl) == RoutingConfig("affinity", 1.7, 0.4, 2.5)


def test_generate_weights():
    ex = generate_routing(QWEN2, RoutingConfig(), [50], np.random.default_rng(0))[0]
    w = generate_weights(ex, np.random.default_rng(1))
    assert w.dtype == np.float32 and w.shape == ex.shape
    assert (w > 0).all() and np.allclose(w.sum(axis=-1), 1.0, atol=1e-6)
    assert (np.diff(w, axis=-1) <= 0).all()


def test_long_requests_across_generation_chunks_are_well_formed():
    """Requests much longer than a generation chunk (512 rows for Mixtral, 73 for Qwen2: the
    noise is drawn chunk by chunk, keeps carried across chunk boundaries) come out whole and
    valid. How fast generation runs at these sizes: ``python benchmarks/data_speed.py``."""
    for model, n, t in ((MIXTRAL, 8, 640), (QWEN2, 8, 200)):
        reqs = generate_routing(model, RoutingConfig(), [t] * n, np.random.default_rng(0))
        assert [r.shape for r in reqs] == [(t, model.num_moe_layers, model.top_k)] * n
        assert all(r.dtype == np.int16 for r in reqs)
        rows = np.concatenate(reqs).reshape(-1, model.top_k)
        assert rows.min() >= 0 and rows.max() < model.num_experts
        srt = np.sort(rows, axis=1)
        assert not (srt[:, 1:] == srt[:, :-1]).any()


# ------------------------------------------------------------------ real trace statistics


def _load_moelens(path):
    """{moe layer: [T, K] expert ids in token order} of one MoELens prompt file."""
    doc = json.loads(path.read_text())
    out = {}
    for layer in doc["layers"]:
        if layer.get("is_dense") or not layer.get("tokens"):
            continue
        toks = sorted(layer["tokens"], key=lambda r: r["token_index"])
        out[layer["layer"]] = np.array([r["top_experts"] for r in toks], dtype=np.int64)
    return doc, out


def test_deepseek_trace_statistics():
    folder = TRACES / "moelens" / "DeepSeek" / "deepseek_routing_trace"
    if not (folder / "prompt-0.json").exists():
        pytest.skip(f"{folder} not available")
    prompts = []
    for path in sorted(folder.glob("prompt-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        doc, layers = _load_moelens(path)
        prompts.append((path.name, layers))
    E, K = doc["num_experts"], doc["top_k_experts"]
    layer_ids = sorted(prompts[0][1])
    seqs = [np.stack([layers[m] for m in layer_ids], axis=1) for _, layers in prompts]  # [T, M, K]
    tokens = sum(s.shape[0] for s in seqs)

    reuse = reuse_prob(seqs)
    reuse_no_bos = reuse_prob([s[1:] for s in seqs])  # token 0 is <BOS>
    reuse0 = reuse_prob([seqs[0]])
    per_layer = popularity_per_layer(seqs, E)
    counts = [s.shape[0] for s in seqs]
    uni = generate_routing(DEEPSEEK_MOE, RoutingConfig(kind="uniform"), counts, np.random.default_rng(0))

    def synthetic_reading(target, reps=10):
        """What the skewed generator with this target reads on samples of the trace's size."""
        rng = np.random.default_rng(0)
        cfg = RoutingConfig(kind="skewed", popularity_max_over_mean=target)
        return float(np.mean([np.median(popularity_per_layer(generate_routing(DEEPSEEK_MOE, cfg, counts, rng), E))
                              for _ in range(reps)]))

    # 87 tokens are few: even uniform routing reads max/mean ~1.9. De-noise by finding the target
    # whose synthetic reading at the same sample size matches the measured median.
    grid = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    readings = np.array([synthetic_reading(t) for t in grid])
    measured = float(np.median(per_layer))
    equivalent = float(np.interp(measured, readings, grid))
    print(f"\nDeepSeek-MoE-16B MoELens trace (prefill tokens): {len(seqs)} prompts, {tokens} tokens, "
          f"{len(layer_ids)} MoE layers, E={E}, K={K}; chance reuse K/E={K / E:.3f}")
    print(f"  reuse P(expert of t used by t-1): prompt-0 {reuse0:.3f}; all prompts {reuse:.3f} "
          f"(lift {reuse / (K / E):.2f}); without the BOS->token-1 pair {reuse_no_bos:.3f} "
          f"(lift {reuse_no_bos / (K / E):.2f}); uniform routing, same sizes {reuse_prob(uni):.3f}")
    print(f"  popularity max/mean per layer (all prompts pooled): median {measured:.2f}, "
          f"min {per_layer.min():.2f}, max {per_layer.max():.2f}; uniform routing at this sample "
          f"size reads {readings[0]:.2f}; equivalent popularity_max_over_mean ~ {equivalent:.2f}")
    assert 0.0 <= reuse <= 1.0 and per_layer.min() >= 1.0
