"""The PyTorch MoE model (real_backend.model / ops): forced and free routing, KV-cache decoding,
expert shapes against ModelSpec, safetensors checkpoints. CPU only; float64 where exactness is checked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from real_backend import model as rm  # noqa: E402
from real_backend import ops  # noqa: E402
from real_backend.model import MoEModel  # noqa: E402
from sim.config import compose_scenario  # noqa: E402
from workloads.model import ModelSpec  # noqa: E402

# A tiny model with every kind of layer: a dense first layer, MoE layers with a shared expert, GQA 4:2.
TINY = ModelSpec(name="tiny", hidden_size=32, num_layers=3, num_experts=6, top_k=2, expert_intermediate_size=48,
                 num_attention_heads=4, num_kv_heads=2, head_dim=8, vocab_size=50, num_shared_experts=1,
                 shared_expert_intermediate_size=40, dense_layers=(0,), dense_intermediate_size=64,
                 weight_bytes_per_param=4.0, kv_bytes_per_elem=4.0, act_bytes_per_elem=4.0)


def tiny(dtype=torch.float64, seed=0, **kw) -> MoEModel:
    return MoEModel(TINY, "cpu", dtype, seed=seed, init_std=0.2, **kw)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_defaults_cpu_float32_and_cuda_refused_without_gpu():
    m = MoEModel(TINY, "cpu")
    assert m.dtype == torch.float32 and m.device.type == "cpu"
    assert ops.default_dtype(torch.device("cuda")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            ops.resolve_device("cuda")
    # Random weights are seeded per tensor: the same seed gives the same model, another seed another.
    a, b, c = MoEModel(TINY, "cpu", seed=3), MoEModel(TINY, "cpu", seed=3), MoEModel(TINY, "cpu", seed=4)
    assert torch.equal(a.experts[(1, 2)].gate_up, b.experts[(1, 2)].gate_up)
    assert not torch.equal(a.experts[(1, 2)].gate_up, c.experts[(1, 2)].gate_up)


def _dense_reference_moe(model: MoEModel, layer: int, xn, residual, ids, weights):
    """Hand-written MoE layer from the checkpoint-named tensors: token by token, expert by expert."""
    sd = model.hf_state_dict()
    p = f"model.layers.{layer}."
    out = residual.clone()
    sg, su, sdn = (sd[p + f"mlp.shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down"))
    for t in range(xn.shape[0]):
        x = xn[t]
        out[t] += sdn @ (F.silu(sg @ x) * (su @ x))
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            q = f"{p}block_sparse_moe.experts.{e}."
            w1, w3, w2 = sd[q + "w1.weight"], sd[q + "w3.weight"], sd[q + "w2.weight"]
            out[t] += weights[t, k] * (w2 @ (F.silu(w1 @ x) * (w3 @ x)))
    return out


def test_forced_routing_runs_exactly_the_given_experts():
    m = tiny()
    g = torch.Generator().manual_seed(1)
    T, layer = 7, 1
    xn = torch.randn(T, TINY.hidden_size, generator=g, dtype=torch.float64)
    residual = torch.randn(T, TINY.hidden_size, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0, 5], [5, 0], [3, 3], [1, 2], [2, 1], [4, 0], [0, 4]])  # includes a repeated expert
    weights = torch.rand(T, 2, generator=g, dtype=torch.float64)
    y, got_ids, got_w = m.moe(layer, xn, residual, ids, weights)
    assert torch.equal(got_ids, ids) and torch.equal(got_w, weights)
    torch.testing.assert_close(y, _dense_reference_moe(m, layer, xn, residual, ids, weights), rtol=1e-10, atol=1e-10)

    # Forced ids without weights: the router's softmax at those ids, renormalised.
    _, _, w2 = m.moe(layer, xn, residual, ids)
    probs = (xn @ m.layers[layer].router.T).softmax(-1).gather(-1, ids)
    torch.testing.assert_close(w2, probs / probs.sum(-1, keepdim=True))

    # Through a whole forward pass: the routing used is the forced one, and only those experts matter.
    seqs = prompts([5, 3])
    T = 8
    forced = {l: torch.randint(0, TINY.num_experts, (T, 2), generator=g) for l in TINY.moe_layers}
    forced[2][:, :] = torch.tensor([1, 4])  # layer 2: every token to experts 1 and 4

    def run(mm):
        c = mm.new_cache(2, 8)
        return mm.forward(seqs, c, [c.allocate(), c.allocate()], routing=forced)

    base = run(m)
    for l in TINY.moe_layers:
        assert torch.equal(base.routing[l][0], forced[l])
    unused = {e for e in range(TINY.num_experts)} - set(forced[1].flatten().tolist())
    other = tiny()
    other.experts[(2, 0)] = ExpertWeightsLike(other.experts[(2, 0)], 10.0)     # expert 0 of layer 2 is unused
    for e in unused:
        other.experts[(1, e)] = ExpertWeightsLike(other.experts[(1, e)], 10.0)
    torch.testing.assert_close(run(other).logits, base.logits, rtol=0, atol=0)
    other.experts[(2, 4)] = ExpertWeightsLike(other.experts[(2, 4)], 10.0)     # expert 4 of layer 2 is used
    assert not torch.allclose(run(other).logits, base.logits)


def ExpertWeightsLike(w: rm.ExpertWeights, scale: float) -> rm.ExpertWeights:
    return rm.ExpertWeights(w.gate_up * scale, w.down * scale)


def test_free_routing_is_top_k_of_router_softmax_and_replays_identically():
    m = tiny()
    g = torch.Generator().manual_seed(2)
    xn = torch.randn(9, TINY.hidden_size, generator=g, dtype=torch.float64)
    _, ids, w = m.moe(1, xn, torch.zeros_like(xn))
    probs = (xn @ m.layers[1].router.T).softmax(-1)
    top_w, top_i = probs.topk(TINY.top_k, dim=-1)
    assert torch.equal(ids, top_i)
    torch.testing.assert_close(w, top_w / top_w.sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(9, dtype=torch.float64))

    # A free-running pass's routing, fed back as forced routing, reproduces the pass exactly.
    seqs = prompts([6, 2, 4], seed=3)
    c1 = m.new_cache(3, 8)
    free = m.forward(seqs, c1, [c1.allocate() for _ in seqs], all_logits=True)
    assert set(free.routing) == set(TINY.moe_layers)
    c2 = m.new_cache(3, 8)
    replay = m.forward(seqs, c2, [c2.allocate() for _ in seqs], all_logits=True, routing=free.routing)
    torch.testing.assert_close(replay.logits, free.logits, rtol=0, atol=0)


def test_kv_cache_decode_equals_full_recompute():
    m = tiny()
    seqs = prompts([9, 4, 7], seed=4)
    offsets = [0, 9, 13]
    full_cache = m.new_cache(3, 32)
    full = m.forward(seqs, full_cache, [full_cache.allocate() for _ in seqs], all_logits=True)

    cache = m.new_cache(4, 2)  # small capacity: grows during the run
    spare = cache.allocate()   # slots 1..3 used: not starting at 0
    slots = [cache.allocate() for _ in seqs]
    pre = [s[:3] for s in seqs[:2]] + [seqs[2][:1]]            # ragged prefill (padding path)
    out = m.forward(pre, cache, slots, all_logits=True)
    row = 0
    for b, p in enumerate(pre):
        for i in range(len(p)):
            torch.testing.assert_close(out.logits[row], full.logits[offsets[b] + i], rtol=1e-9, atol=1e-9)
            row += 1
    pos = [len(p) for p in pre]
    steps = 0
    while any(p < len(s) for p, s in zip(pos, seqs)):
        live = [b for b in range(3) if pos[b] < len(seqs[b])]   # finished sequences drop out: slots not contiguous
        o = m.forward([[seqs[b][pos[b]]] for b in live], cache, [slots[b] for b in live])
        for j, b in enumerate(live):
            torch.testing.assert_close(o.logits[j], full.logits[offsets[b] + pos[b]], rtol=1e-9, atol=1e-9)
            pos[b] += 1
        steps += 1
    assert steps == 6 and cache.capacity >= 9 and cache.lengths[spare] == 0
    assert [cache.lengths[s] for s in slots] == [9, 4, 7]

    # Greedy generation through the cache agrees with greedy recompute of the whole sequence.
    prompt = seqs[0][:5]
    gen = m.greedy(prompt, 4)
    seq = list(prompt)
    for _ in range(4):
        c = m.new_cache(1, 16)
        seq.append(int(m.forward([seq], c, [c.allocate()]).logits[0].argmax()))
    assert gen == seq[5:]


def test_on_routed_orders_experts_and_get_expert_supplies_weights():
    m = tiny()
    seen, fetched = [], []

    def on_routed(layer, experts, counts):
        seen.append((layer, list(experts), list(counts)))
        return list(reversed(experts))

    def get_expert(layer, e):
        fetched.append((layer, e))
        return m.experts[(layer, e)].tensors

    c = m.new_cache(1, 8)
    base = m.forward(prompts([5]), m.new_cache(1, 8), [0])
    out = m.forward(prompts([5]), c, [c.allocate()], on_routed=on_routed, get_expert=get_expert)
    torch.testing.assert_close(out.logits, base.logits)
    assert [s[0] for s in seen] == list(TINY.moe_layers)
    for layer, experts, counts in seen:
        assert experts == sorted(experts) and sum(counts) == 5 * TINY.top_k
        assert [e for l, e in fetched if l == layer] == list(reversed(experts))
    with pytest.raises(ValueError, match="not an ordering"):
        m.forward(prompts([5]), m.new_cache(1, 8), [0], on_routed=lambda l, e, c: e[:1])


@pytest.mark.parametrize("name", ["mini_mixtral", "mini_qwen"])
def test_expert_ffn_flops_and_bytes_match_model_spec(name):
    spec = compose_scenario([f"model={name}"]).model
    m = MoEModel(spec, "cpu", torch.float32, experts=False)
    gate_up_shape, down_shape = m.expert_shapes
    gemms = spec.expert_gemms(1)
    # F.linear layout (out x in) of the [k, n] weight operands: gate_up H -> 2I, down I -> H.
    assert gate_up_shape == (gemms[0].n, gemms[0].k) and down_shape == (gemms[1].n, gemms[1].k)
    assert m.expert_nbytes == spec.expert_bytes == sum(g.weight_bytes for g in gemms)
    w = m.random_expert(spec.moe_layers[0], 0)
    assert w.nbytes == spec.expert_bytes
    for n in (1, 7, 64):
        x = torch.randn(n, spec.hidden_size)
        with FlopCounterMode(display=False) as fc:
            y = ops.expert_ffn(x, w.gate_up, w.down)
        assert y.shape == (n, spec.hidden_size)
        assert fc.get_total_flops() == sum(g.flops for g in spec.expert_gemms(n))
    # Shared experts and attention projections too.
    if spec.num_shared_experts:
        lw = m.layers[spec.moe_layers[0]]
        assert sum(t.numel() * 4 for t in lw.shared.tensors) == sum(g.weight_bytes for g in spec.shared_expert_gemms(1))
    attn = m.layers[0].attn
    assert (attn.w_qkv.numel() + attn.w_o.numel()) * 4 == sum(g.weight_bytes for g in spec.attention_gemms(1))
    counts = m.parameter_count()
    assert counts["non_expert"] - spec.hidden_size == spec.non_expert_bytes / 4  # + final norm, not in the spec


@pytest.mark.parametrize("backend", ["builtin", "safetensors"])
def test_safetensors_round_trip(tmp_path, backend):
    if backend == "safetensors":
        pytest.importorskip("safetensors")
    m = tiny(torch.float32, seed=5, rope_theta=5e5, rms_norm_eps=1e-6)
    sd = m.hf_state_dict()
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in sd and "model.layers.0.mlp.up_proj.weight" in sd
    out = tmp_path / "ckpt"
    out.mkdir()
    # Two shards written with the chosen backend, plus config.json as save_checkpoint writes it.
    keys = sorted(sd)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        rm.save_safetensors({k: sd[k] for k in part}, out / f"model-{i}.safetensors", {"format": "pt"},
                            backend=backend)
    import json

    (out / "config.json").write_text(json.dumps(m.hf_config()))
    for k, v in rm.load_safetensors(out / "model-0.safetensors", backend=backend).items():
        assert torch.equal(v, sd[k].cpu())
    loaded = MoEModel.from_checkpoint(TINY, out, "cpu", torch.float32)
    assert loaded.rope.theta == 5e5 and loaded.eps == 1e-6
    assert set(loaded.hf_state_dict()) == set(sd)
    for k, v in loaded.hf_state_dict().items():
        assert torch.equal(v, sd[k]), k
    seqs = prompts([4, 6], seed=6)
    c1, c2 = m.new_cache(2, 8), loaded.new_cache(2, 8)
    a = m.forward(seqs, c1, [c1.allocate(), c1.allocate()])
    b = loaded.forward(seqs, c2, [c2.allocate(), c2.allocate()])
    # The weights round-trip bit for bit (above); the logits need not. The reloaded model's tensors
    # are new buffers (re-fused from the file's tensors, at other addresses and alignments), so the
    # CPU's GEMM kernels may take another code path and sum the products in another order, and fp32
    # addition is not associative. Reordering a dot product of n terms moves it by at most
    # ~n*eps*sum|terms| (eps = 2**-23 = 1.2e-7); TINY's longest dot products have n = 64 (dense
    # FFN), i.e. 7.7e-6 of the terms' magnitude, which here is O(1) (|logits| < 3). Observed: 3.6e-7 to 7e-7 between the two
    # fp32 models, and either fp32 model is 1.9e-6 from the float64 forward pass of the same weights.
    # rtol = atol = 1e-5 sits above all of that; a wrong, swapped or transposed tensor moves logits
    # by O(0.1-1), four orders of magnitude more.
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    for layer in TINY.moe_layers:
        assert torch.equal(a.routing[layer][0], b.routing[layer][0])   # the same experts chosen
        torch.testing.assert_close(b.routing[layer][1], a.routing[layer][1], rtol=1e-5, atol=1e-5)


def test_checkpoint_errors_are_one_line(tmp_path):
    m = tiny(torch.float32)
    d = m.save_checkpoint(tmp_path / "ok")
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    with pytest.raises(ValueError, match="does not exist"):
        MoEModel.from_checkpoint(TINY, tmp_path / "missing")
    sd = m.hf_state_dict()
    sd.pop("model.layers.2.block_sparse_moe.experts.5.w2.weight")
    (tmp_path / "partial").mkdir()
    rm.save_safetensors(sd, tmp_path / "partial" / "model.safetensors", backend="builtin")
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.2\.block_sparse_moe\.experts\.5\.w2\.weight") as e:
        MoEModel.from_checkpoint(TINY, tmp_path / "partial")
    assert "\n" not in str(e.value)
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"expects \(64, 32\)"):
        MoEModel.from_checkpoint(replace(TINY, expert_intermediate_size=64), d)


def test_mla_is_approximated_with_the_spec_kv_size():
    spec = compose_scenario(["model=deepseek_v2_lite"]).model
    g = ops.AttnGeometry.from_spec(spec)
    assert g.kv_heads == 1 and 2 * g.head_dim * 2 == spec.kv_bytes_per_token_per_layer  # K + V, bf16
