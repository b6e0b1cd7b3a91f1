"""Router-trace capture from transformers MoE models (real_backend.capture, moesim-capture).

Tiny randomly initialised models of the six supported architectures are built from configs (no
download: HF_HUB_OFFLINE=1). The captured ids and weights are checked against what the MoE blocks
themselves hand to their experts (hooks of our own on ``mlp.experts``), and by re-running each
block's experts with the captured routing and getting a bit-identical output.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from real_backend import capture as cap  # noqa: E402
from real_backend.capture_cli import main  # noqa: E402
from workloads.trace import load_trace_requests, read_trace, validate_trace  # noqa: E402
from packaging.version import Version  # noqa: E402

if Version(transformers.__version__) < Version(cap.MIN_TRANSFORMERS):
    pytest.skip(f"moesim-capture needs transformers >= {cap.MIN_TRANSFORMERS}",
                allow_module_level=True)

E, K, VOCAB = 8, 2, 100
PROMPTS = [[1, 5, 7, 9, 11, 13], [3, 4, 60]]
NEW = 4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts_per_tok=K)
MLA = dict(COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
           n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


def _configs():
    from transformers import (DeepseekV2Config, DeepseekV3Config, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    return {
        "mixtral": MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=E),
        # layer 1 dense via mlp_only_layers; softmax weights not renormalised; shared expert
        "qwen2_moe": Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, num_experts=E,
                                    mlp_only_layers=[1], norm_topk_prob=False),
        # 4 layers, every second one MoE (decoder_sparse_step=2): MoE layers 1 and 3
        "qwen3_moe": Qwen3MoeConfig(**dict(COMMON, num_hidden_layers=4), intermediate_size=48,
                                    moe_intermediate_size=16, num_experts=E, decoder_sparse_step=2,
                                    norm_topk_prob=True, head_dim=8),
        "olmoe": OlmoeConfig(**COMMON, intermediate_size=16, num_experts=E, norm_topk_prob=False),
        # one dense first layer; group-limited greedy over 4 groups of 2, scaled weights
        "deepseek_v2": DeepseekV2Config(**MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                                        n_group=4, topk_group=2, routed_scaling_factor=1.5),
        # sigmoid + correction bias, 4 groups keep 2, renormalised and scaled; q-LoRA
        "deepseek_v3": DeepseekV3Config(**MLA, q_lora_rank=24, n_group=4, topk_group=2,
                                        norm_topk_prob=True, routed_scaling_factor=2.5),
    }


MOE_LAYERS = {"mixtral": (0, 1, 2), "qwen2_moe": (0, 2), "qwen3_moe": (1, 3), "olmoe": (0, 1, 2),
              "deepseek_v2": (1, 2), "deepseek_v3": (1, 2)}
ARCHS = tuple(MOE_LAYERS)


@functools.lru_cache(maxsize=None)
def tiny(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]).eval()
    if arch == "deepseek_v3":  # a bias large enough to change choices (zeros at init)
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return model


class Spy:
    """Our own hooks on every MoE layer: router input/output, the experts' inputs and output, and
    the post-attention norm's output (in call order, one entry per forward pass)."""

    def __init__(self, model, moe_layers):
        self.rec = {k: {l: [] for l in moe_layers} for k in
                    ("gate_in", "gate_out", "experts_args", "experts_out", "norm_out")}
        self.handles = []
        for l in moe_layers:
            layer = model.model.layers[l]
            self.handles += [
                layer.mlp.gate.register_forward_hook(functools.partial(self._gate, l)),
                layer.mlp.experts.register_forward_hook(functools.partial(self._experts, l)),
                layer.post_attention_layernorm.register_forward_hook(functools.partial(self._norm, l)),
            ]

    def _gate(self, l, mod, args, out):
        self.rec["gate_in"][l].append(args[0].detach().clone())
        self.rec["gate_out"][l].append(tuple(t.detach().clone() for t in out))

    def _experts(self, l, mod, args, out):
        self.rec["experts_args"][l].append(tuple(a.detach().clone() for a in args))
        self.rec["experts_out"][l].append(out.detach().clone())

    def _norm(self, l, mod, args, out):
        self.rec["norm_out"][l].append(out.detach().clone())

    def remove(self):
        for h in self.handles:
            h.remove()


def _lists(col, width=K) -> np.ndarray:
    return np.stack([np.asarray(v) for v in col]).reshape(-1, width)


def _layer_rows(df, layer):
    return df[df.layer == layer].sort_values(["request_id", "token_index"], kind="stable")


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_records_what_the_moe_block_uses(arch, tmp_path):
    model = tiny(arch)
    moe = MOE_LAYERS[arch]
    assert cap.config_moe_layers(model.config) == moe
    spy = Spy(model, moe)
    try:
        res = cap.capture(model, PROMPTS, max_new_tokens=NEW, predict="lookahead", stop_at_eos=False)
    finally:
        spy.remove()
    df, meta, M = res.frame, res.meta, len(moe)

    # shape of the trace: tokens x MoE layers, prefill then decode, absolute layers
    T = [len(p) + NEW - 1 for p in PROMPTS]
    assert len(df) == sum(T) * M
    assert meta.moe_layers == moe and meta.num_layers == model.config.num_hidden_layers
    assert (meta.num_experts, meta.top_k, meta.model) == (E, K, arch)
    assert [len(g) for g in res.generated] == [NEW, NEW]
    for r, p in enumerate(PROMPTS):
        rows = df[df.request_id == r]
        assert sorted(set(rows.token_index)) == list(range(T[r]))
        assert (rows.phase == "prefill").sum() == len(p) * M
        assert (rows.phase == "decode").sum() == (NEW - 1) * M
        assert (rows[rows.phase == "decode"].token_index >= len(p)).all()
        assert set(rows.layer) == set(moe)

    ids, w = _lists(df.experts), _lists(df.weights)
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids[:, 0] != ids[:, 1]).all()
    assert (np.diff(w, axis=1) <= 0).all()  # highest weight first

    # one router call and one experts call per MoE layer per forward pass: 1 prefill + NEW-1 decodes
    passes = len(PROMPTS) * NEW
    for l in moe:
        assert len(spy.rec["experts_args"][l]) == passes
        rows = _layer_rows(df, l)
        got_ids, got_w = _lists(rows.experts), _lists(rows.weights)
        args = spy.rec["experts_args"][l]
        blk_ids = torch.cat([a[1] for a in args]).numpy()
        blk_w = torch.cat([a[2] for a in args]).float().numpy()
        # the router output is what the block passed to its experts, unchanged
        for (_, gw, gi), a in zip(spy.rec["gate_out"][l], args):
            assert torch.equal(gi, a[1]) and torch.equal(gw, a[2])
        # captured (id, weight) pairs == the block's own pairs, exactly (compare in id order)
        o1, o2 = np.argsort(got_ids, axis=1), np.argsort(blk_ids, axis=1)
        np.testing.assert_array_equal(np.take_along_axis(got_ids, o1, 1), np.take_along_axis(blk_ids, o2, 1))
        np.testing.assert_array_equal(np.take_along_axis(got_w, o1, 1), np.take_along_axis(blk_w, o2, 1))

        # forcing the captured routing through the block's experts reproduces its output bit for bit
        experts = model.model.layers[l].mlp.experts
        start = 0
        with torch.no_grad():
            for a, out in zip(args, spy.rec["experts_out"][l]):
                n = a[0].shape[0]
                forced = experts(a[0], torch.as_tensor(got_ids[start:start + n], dtype=a[1].dtype),
                                 torch.as_tensor(got_w[start:start + n], dtype=a[2].dtype))
                assert torch.equal(forced, out)
                start += n
        assert start == len(rows)

    # lookahead: the next MoE layer's router on this layer's router input (= post-attention norm output)
    H = model.config.hidden_size
    for l, nxt in zip(moe, moe[1:] + (None,)):
        rows = _layer_rows(df, l)
        if nxt is None:
            assert rows.predicted_experts.isna().all()
            continue
        gate = model.model.layers[nxt].mlp.gate
        expect = []
        with torch.no_grad():
            for x, normed in zip(spy.rec["gate_in"][l], spy.rec["norm_out"][l]):
                assert torch.equal(x.reshape(-1, H), normed.reshape(-1, H))
                _, pw, pi = gate(x)
                order = torch.argsort(pw, dim=1, descending=True, stable=True)
                expect.append(torch.gather(pi, 1, order))
        np.testing.assert_array_equal(_lists(rows.predicted_experts), torch.cat(expect).numpy())

    # the trace validates and replays against a ModelSpec of the same shapes
    path = tmp_path / f"{arch}.parquet"
    res.write(path)
    back, meta2 = read_trace(path)
    assert meta2 == meta
    spec = cap.spec_from_config(model.config, name=meta.model)
    assert validate_trace(back, meta2, spec).ok()
    reqs = load_trace_requests(path, spec)
    assert [(q.prompt_len, q.output_len) for q in reqs] == [(len(p), NEW) for p in PROMPTS]
    np.testing.assert_array_equal(reqs[0].experts.reshape(-1, K), ids[:T[0] * M])


def test_decode_rows_match_a_full_prefill_and_hf_greedy_generate():
    """Decode routing (through the KV cache) equals prefill routing of the same sequence, and the
    greedy tokens equal transformers' own greedy generate."""
    for arch in ("mixtral", "deepseek_v3"):
        model = tiny(arch)
        res = cap.capture(model, PROMPTS[:1], max_new_tokens=NEW, stop_at_eos=False)
        full = PROMPTS[0] + res.generated[0][:-1]
        ref = cap.capture(model, [full], max_new_tokens=0)
        assert (ref.frame.phase == "prefill").all() and len(ref.frame) == len(res.frame)
        np.testing.assert_array_equal(_lists(ref.frame.experts), _lists(res.frame.experts))
        np.testing.assert_allclose(_lists(ref.frame.weights), _lists(res.frame.weights), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            prompt = torch.tensor([PROMPTS[0]])
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, len(PROMPTS[0]):].tolist() == res.generated[0]


def test_deepseek_v3_choice_uses_the_correction_bias():
    """The captured choice is the router's (bias-corrected, group-limited), not a top-k of its
    sigmoid scores: with a bias some rows differ from that naive top-k."""
    model = tiny("deepseek_v3")
    spy = Spy(model, (1,))
    try:
        res = cap.capture(model, PROMPTS, max_new_tokens=NEW, stop_at_eos=False)
    finally:
        spy.remove()
    gate = model.model.layers[1].mlp.gate
    x = torch.cat([t.reshape(-1, model.config.hidden_size) for t in spy.rec["gate_in"][1]])
    with torch.no_grad():
        naive = torch.topk(torch.sigmoid(x.float() @ gate.weight.float().T), K, dim=1).indices.numpy()
    got = _lists(_layer_rows(res.frame, 1).experts)
    differs = [set(a) != set(b) for a, b in zip(got, naive)]
    assert any(differs)


def test_bfloat16_weights_are_the_router_values():
    model = tiny("qwen2_moe")
    m16 = type(model)(model.config)
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16).eval()
    spy = Spy(m16, (0, 2))
    try:
        res = cap.capture(m16, PROMPTS[:1], max_new_tokens=2, stop_at_eos=False)
    finally:
        spy.remove()
    rows = _layer_rows(res.frame, 2)
    blk = torch.cat([a[2] for a in spy.rec["experts_args"][2]])
    assert blk.dtype == torch.bfloat16
    np.testing.assert_array_equal(np.sort(_lists(rows.weights), 1), np.sort(blk.float().numpy(), 1))


def test_eos_stops_a_request():
    model = tiny("olmoe")
    free = cap.capture(model, PROMPTS[:1], max_new_tokens=NEW, stop_at_eos=False)
    first = free.generated[0][0]
    cfg = model.config
    old = cfg.eos_token_id, model.generation_config.eos_token_id
    cfg.eos_token_id = model.generation_config.eos_token_id = first
    try:
        res = cap.capture(model, PROMPTS[:1], max_new_tokens=NEW)
    finally:
        cfg.eos_token_id, model.generation_config.eos_token_id = old
    assert res.generated == [[first]] and (res.frame.phase == "prefill").all()


def test_router_that_only_returns_logits_is_refused():
    """Older transformers route inside the MoE block (the gate is a Linear giving logits)."""
    model = tiny("mixtral")
    layer = model.model.layers[1].mlp
    saved = layer.gate
    layer.gate = torch.nn.Linear(model.config.hidden_size, E, bias=False)
    try:
        with pytest.raises(cap.CaptureError, match=r"transformers >= 5\.13"):
            cap.capture(model, PROMPTS[:1], max_new_tokens=1)
    finally:
        layer.gate = saved


def test_catalog_names_and_specs():
    from transformers import (DeepseekV2Config, DeepseekV3Config, MixtralConfig, OlmoeConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    cases = {
        "mixtral_8x7b": MixtralConfig(),
        "deepseek_v3": DeepseekV3Config(),
        "qwen1_5_moe_a2_7b": Qwen2MoeConfig(),
        "qwen3_30b_a3b": Qwen3MoeConfig(num_hidden_layers=48, num_attention_heads=32, head_dim=128,
                                        num_key_value_heads=4, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8),
        "olmoe_1b_7b": OlmoeConfig(intermediate_size=1024),
        "deepseek_v2_lite": DeepseekV2Config(vocab_size=102400, hidden_size=2048, num_hidden_layers=27,
                                             num_attention_heads=16, n_routed_experts=64,
                                             num_experts_per_tok=6, moe_intermediate_size=1408,
                                             n_shared_experts=2, first_k_dense_replace=1,
                                             intermediate_size=10944, q_lora_rank=None),
    }
    catalog = cap.catalog_models()
    for name, config in cases.items():
        assert cap.model_name(config) == name
        spec = cap.spec_from_config(config, name=name)
        assert spec.moe_layers == catalog[name].moe_layers
    assert cap.config_moe_layers(DeepseekV3Config()) == tuple(range(3, 61))
    assert cap.model_name(tiny("qwen3_moe").config) == "qwen3_moe"
    cfg = Qwen2MoeConfig(**dict(COMMON, num_hidden_layers=2), mlp_only_layers=[0, 1], num_experts=E)
    with pytest.raises(cap.CaptureError, match="no MoE layer"):
        cap.spec_from_config(cfg)


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond one\n")
    assert cap.read_prompts(txt) == ["first prompt", "second one"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a b", "id": 3}\n\n{"prompt": "c"}\n')
    assert cap.read_prompts(jl) == ["a b", "c"]
    jl.write_text('{"text": "a"}\n')
    with pytest.raises(cap.CaptureError, match="line 1 has no string 'prompt'"):
        cap.read_prompts(jl)


# ---------------------------------------------------------------------------------------------
# The command line


WORDS = ["[UNK]", "[PAD]", "[EOS]"] + "the a cat dog sat on mat ran fast big red blue".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2-MoE checkpoint (one dense layer) with a word-level tokenizer built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_qwen2_moe")
    tiny("qwen2_moe").save_pretrained(d)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(d)
    return d


def test_cli_captures_a_saved_model(model_dir, tmp_path, capsys):
    prompts = ["the cat sat on the mat", "a big red dog ran"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "trace.parquet"
    rc = main(["--model", str(model_dir), "--prompts", str(txt), "-o", str(out), "--max-new-tokens", "3",
               "--predict", "lookahead", "--device", "cpu", "--dtype", "float32", "--ignore-eos"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    df, meta = read_trace(out)
    assert meta.model == str(model_dir) and "transformers " + transformers.__version__ in meta.source
    spec = cap.spec_from_config(tiny("qwen2_moe").config, name="x")
    reqs = load_trace_requests(out, spec)
    assert [(q.prompt_len, q.output_len) for q in reqs] == [(6, 3), (5, 3)]
    # the same as capturing the in-memory model on the tokenizer's ids
    ids = [[WORDS.index(w) for w in p.split()] for p in prompts]
    ref = cap.capture(tiny("qwen2_moe"), ids, max_new_tokens=3, predict="lookahead", stop_at_eos=False)
    np.testing.assert_array_equal(_lists(df.experts), _lists(ref.frame.experts))
    np.testing.assert_array_equal(_lists(df.weights), _lists(ref.frame.weights))
    assert df.predicted_experts.isna().sum() == ref.frame.predicted_experts.isna().sum()

    # a JSONL prompts file gives the same trace
    jl = tmp_path / "prompts.jsonl"
    jl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out2 = tmp_path / "trace2.parquet"
    assert main(["--model", str(model_dir), "--prompts", str(jl), "-o", str(out2), "--max-new-tokens", "3",
                 "--predict", "lookahead", "--ignore-eos"]) == 0
    df2, _ = read_trace(out2)
    np.testing.assert_array_equal(_lists(df2.experts), _lists(df.experts))


def _bad(tmp_path, capfd, argv):
    out = tmp_path / "out" / "t.parquet"
    rc = main([*argv, "-o", str(out)])
    err = capfd.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim-capture: error: "), err
    assert not out.exists() and not list(tmp_path.rglob("*.parquet*"))
    return lines[0]


def test_cli_bad_input(model_dir, tmp_path, capfd):
    from transformers import LlamaConfig, Qwen2MoeConfig

    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n")
    ok = ["--prompts", str(prompts)]
    assert "does not exist" in _bad(tmp_path, capfd, ["--model", str(tmp_path / "nope"), *ok])
    dense = tmp_path / "llama"
    LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}).save_pretrained(dense)
    assert "not a supported Mixture-of-Experts" in _bad(tmp_path, capfd, ["--model", str(dense), *ok])
    no_moe = tmp_path / "qwen_dense"
    Qwen2MoeConfig(**COMMON, num_experts=E, mlp_only_layers=[0, 1, 2]).save_pretrained(no_moe)
    assert "no MoE layer" in _bad(tmp_path, capfd, ["--model", str(no_moe), *ok])
    assert "invalid choice: 'oracle'" in _bad(tmp_path, capfd, ["--model", str(model_dir), *ok,
                                                                 "--predict", "oracle"])
    assert "--max-new-tokens" in _bad(tmp_path, capfd, ["--model", str(model_dir), *ok,
                                                        "--max-new-tokens", "-1"])
    assert "prompts file" in _bad(tmp_path, capfd, ["--model", str(model_dir), "--prompts",
                                                    str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert "holds no prompt" in _bad(tmp_path, capfd, ["--model", str(model_dir), "--prompts", str(empty)])
    assert "required" in _bad(tmp_path, capfd, ["--model", str(model_dir)])
    assert main(["--help"]) == 0
