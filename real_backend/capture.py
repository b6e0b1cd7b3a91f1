"""Router-trace capture from Hugging Face transformers MoE models (``moesim-capture``).

A model runs one request at a time (batch 1, so every routing decision belongs to exactly one
request): a prefill of the prompt, then greedy decoding, each generated token fed back through the
KV cache. Forward hooks on the models' own router modules record, for every token position and
every MoE layer, the top-k expert ids and weights **as the router produced them**: nothing is
recomputed from logits, so softmax vs. sigmoid scoring, group-limited selection, correction biases,
renormalisation, scaling and dtype casts are whatever the installed transformers does. The rows
follow ``workloads.trace`` (DESIGN.md "Router trace schema") and are written with
:func:`workloads.trace.write_trace`.

What is hooked (transformers >= 5.13; verified with 5.13.0 and 5.23.0)
-----------------------------------------------------------------------
Every supported MoE block calls its router as ``_, weights, ids = self.gate(hidden)`` and passes
``(hidden, ids, weights)`` unchanged to ``self.experts``, which sums ``weights[t, j] *
expert[ids[t, j]](hidden[t])``. We register a forward hook on that router,
``model.layers[i].mlp.gate``, and record outputs 2 (``ids``) and 1 (``weights``):

=============== ================================ ===================================================
``model_type``  router module (``mlp.gate``)     what it computes (installed source)
=============== ================================ ===================================================
``mixtral``     ``MixtralTopKRouter``            softmax (float32) over the logits, top-k, weights
                                                 renormalised to sum 1 (always); float32
``qwen2_moe``   ``Qwen2MoeTopKRouter``           softmax (float32), top-k, renormalised iff
                                                 ``norm_topk_prob``, cast to the model dtype. The
                                                 sigmoid-gated shared expert is not routed and not
                                                 recorded
``qwen3_moe``   ``Qwen3MoeTopKRouter``           as qwen2_moe, no shared expert
``olmoe``       ``OlmoeTopKRouter``              softmax (float32), top-k, renormalised iff
                                                 ``norm_topk_prob``, cast to the model dtype
``deepseek_v2`` ``DeepseekV2TopkRouter``         float32 logits, softmax, ``topk_method`` greedy or
                                                 group_limited_greedy (``n_group`` groups ranked by
                                                 their best expert, ``topk_group`` kept), weights x
                                                 ``routed_scaling_factor`` (this router does not
                                                 renormalise)
``deepseek_v3`` ``DeepseekV3TopkRouter``         float32 logits, sigmoid; choice score = sigmoid +
                                                 ``e_score_correction_bias``; ``n_group`` groups
                                                 ranked by the sum of their top-2 choice scores,
                                                 ``topk_group`` kept; top-k by choice score; weights
                                                 = the chosen sigmoid scores (no bias), renormalised
                                                 iff ``norm_topk_prob``, x ``routed_scaling_factor``
=============== ================================ ===================================================

Before capturing, every router is probed once (a zero input) to check that it returns
``(logits, weights, ids)``; older transformers releases route inside the MoE block instead
(mixtral/qwen/olmoe before 5.0, deepseek_v2/v3 before 5.13) and are refused with a one-line error.

Row order within ``experts``: the DeepSeek routers use ``topk(..., sorted=False)``, whose order is
unspecified, so each row's (id, weight) pairs are sorted by weight, highest first (stable: ties keep
the router's order). The pairs themselves are exactly the router's. For the softmax routers this is
the router's own order.

MoE layers are the layers whose ``mlp`` is an MoE block; they must equal what the config says
(``first_k_dense_replace`` for DeepSeek; ``mlp_only_layers`` and ``decoder_sparse_step`` for
Qwen; all layers for Mixtral and OLMoE). Layers are absolute indices; dense layers get no rows.

Lookahead prediction (``predict="lookahead"``)
----------------------------------------------
For MoE layer ``l`` with next MoE layer ``n``, the hook also applies layer ``n``'s router module
(``layers[n].mlp.gate.forward``, hooks bypassed) to the tensor layer ``l``'s router received: the
output of layer ``l``'s ``post_attention_layernorm``, i.e. the normalised input of layer ``l``'s MoE
block (not the residual stream, and not re-normalised with layer ``n``'s norm). Its ids, sorted by
its weights (highest first), are ``predicted_experts`` of layer ``l``'s row; the last MoE layer's
rows hold null. This is the gate-lookahead predictor (the next gate on the current state), run
with the next router's full routing code (groups and correction bias included).

Token positions: ``token_index`` is the position in the request, prompt positions (phase
``prefill``) first, then each generated token that is fed back (phase ``decode``). With
``max_new_tokens = N`` the model emits N tokens; the last is never fed back, so a request has
``prompt_len + N - 1`` positions (fewer if an end-of-sequence token stops it), matching the
``output_len`` convention of ``workloads.trace``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from workloads.model import ModelSpec
from workloads.trace import TraceMeta, write_trace
from workloads.validation import ConfigError, build

PREDICT_CHOICES = ("lookahead",)
DTYPES = ("bfloat16", "float32")
DEVICES = ("cpu", "cuda")
#: first transformers release whose six supported routers all return (logits, weights, ids)
MIN_TRANSFORMERS = "5.13"


class CaptureError(ConfigError):
    """Capture cannot run on this input. The message is one line."""


# ---------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class _Arch:
    model_type: str
    router: str  # class name of the router module, for messages and docs
    mla: bool = False


ARCHITECTURES: dict[str, _Arch] = {
    "mixtral": _Arch("mixtral", "MixtralTopKRouter"),
    "qwen2_moe": _Arch("qwen2_moe", "Qwen2MoeTopKRouter"),
    "qwen3_moe": _Arch("qwen3_moe", "Qwen3MoeTopKRouter"),
    "olmoe": _Arch("olmoe", "OlmoeTopKRouter"),
    "deepseek_v2": _Arch("deepseek_v2", "DeepseekV2TopkRouter", mla=True),
    "deepseek_v3": _Arch("deepseek_v3", "DeepseekV3TopkRouter", mla=True),
}


def _arch(config) -> _Arch:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise CaptureError(f"model_type {mt!r} is not a supported Mixture-of-Experts architecture; "
                           f"moesim-capture supports: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[mt]


def _get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _num_experts(config) -> int:
    if config.model_type.startswith("deepseek"):
        return int(_get(config, "n_routed_experts", default=0))
    return int(_get(config, "num_local_experts", "num_experts", default=0))


def config_moe_layers(config) -> tuple[int, ...]:
    """Absolute indices of the MoE layers, from the HF config alone (see module docstring)."""
    arch = _arch(config)
    L = int(config.num_hidden_layers)
    if _num_experts(config) <= 0:
        return ()
    if arch.model_type in ("mixtral", "olmoe"):
        return tuple(range(L))
    if arch.model_type in ("qwen2_moe", "qwen3_moe"):
        only = set(getattr(config, "mlp_only_layers", None) or ())
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        return tuple(i for i in range(L) if i not in only and (i + 1) % step == 0)
    first = int(getattr(config, "first_k_dense_replace", 0) or 0)
    return tuple(range(first, L))


def spec_from_config(config, name: Optional[str] = None) -> ModelSpec:
    """A ``ModelSpec`` with the shapes of HF ``config`` (named ``name``, default: model_type)."""
    arch = _arch(config)
    moe = config_moe_layers(config)
    if not moe:
        raise CaptureError(f"model_type {arch.model_type!r} config has no MoE layer (num_experts="
                           f"{_num_experts(config)}); nothing to capture")
    L = int(config.num_hidden_layers)
    H = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    dense = tuple(i for i in range(L) if i not in set(moe))
    kw: dict[str, Any] = dict(
        name=name or arch.model_type, hidden_size=H, num_layers=L, num_experts=_num_experts(config),
        top_k=int(config.num_experts_per_tok), num_attention_heads=heads,
        vocab_size=int(config.vocab_size), dense_layers=dense,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        hf_id=str(getattr(config, "_name_or_path", "") or ""))
    if arch.model_type in ("mixtral", "olmoe"):
        kw["expert_intermediate_size"] = int(config.intermediate_size)
    else:
        kw["expert_intermediate_size"] = int(config.moe_intermediate_size)
    if dense:
        kw["dense_intermediate_size"] = int(config.intermediate_size)
    if arch.model_type == "qwen2_moe" and int(_get(config, "shared_expert_intermediate_size", default=0)):
        kw.update(num_shared_experts=1,
                  shared_expert_intermediate_size=int(config.shared_expert_intermediate_size))
    if arch.mla:
        shared = int(_get(config, "n_shared_experts", default=0) or 0)
        if shared:
            kw.update(num_shared_experts=shared,
                      shared_expert_intermediate_size=int(config.moe_intermediate_size))
        kw.update(attention="mla", num_kv_heads=heads, head_dim=int(config.v_head_dim),
                  kv_lora_rank=int(config.kv_lora_rank), q_lora_rank=int(config.q_lora_rank or 0),
                  qk_nope_head_dim=int(config.qk_nope_head_dim),
                  qk_rope_head_dim=int(config.qk_rope_head_dim), v_head_dim=int(config.v_head_dim))
    else:
        kw["num_kv_heads"] = int(_get(config, "num_key_value_heads", default=heads))
        kw["head_dim"] = int(_get(config, "head_dim", default=H // heads))
    try:
        spec = ModelSpec(**kw)
        spec.validate("model")
    except ConfigError as exc:
        raise CaptureError(f"config of model_type {arch.model_type!r} gives invalid shapes: {exc}") from None
    return spec


_MATCH_FIELDS = ("hidden_size", "num_layers", "num_experts", "top_k", "expert_intermediate_size",
                 "num_attention_heads", "vocab_size", "moe_layers", "num_shared_experts",
                 "shared_expert_intermediate_size", "attention")
_GQA_FIELDS = ("num_kv_heads", "head_dim")
_MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def catalog_models() -> dict[str, ModelSpec]:
    """The built-in model catalog (``conf/model/*.yaml``) as ModelSpecs; unreadable entries are skipped."""
    import yaml
    from importlib import resources

    out: dict[str, ModelSpec] = {}
    folder = resources.files("conf").joinpath("model")
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        try:
            spec = build(ModelSpec, yaml.safe_load(entry.read_text()), "model")
        except (ConfigError, yaml.YAMLError, TypeError, ValueError):
            continue
        out[spec.name] = spec
    return out


def catalog_name(spec: ModelSpec) -> Optional[str]:
    """The catalog model with the same architecture and shapes as ``spec``, if any."""
    fields = _MATCH_FIELDS + (_MLA_FIELDS if spec.attention == "mla" else _GQA_FIELDS)
    for name, cand in catalog_models().items():
        if all(getattr(cand, f) == getattr(spec, f) for f in fields) and (
                not spec.dense_layers or cand.dense_intermediate_size == spec.dense_intermediate_size):
            return name
    return None


def model_name(config) -> str:
    """Trace model name: a catalog name if shapes match, else ``_name_or_path``, else model_type."""
    spec = spec_from_config(config)
    found = catalog_name(spec)
    if found:
        return found
    path = str(getattr(config, "_name_or_path", "") or "").rstrip("/")
    return path or config.model_type


# ---------------------------------------------------------------------------------------------
# Model inspection


@dataclass
class MoEModelInfo:
    """Where the routers of a loaded model are and what they produce."""

    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    routers: dict[int, Any]  # absolute layer -> router module (layers[i].mlp.gate)


def _decoder_layers(model):
    for cand in (getattr(model, "base_model", None), getattr(model, "model", None), model):
        layers = getattr(cand, "layers", None) if cand is not None else None
        if layers is not None:
            return layers
    raise CaptureError(f"{type(model).__name__} has no decoder layer list (model.layers)")


def inspect_model(model) -> MoEModelInfo:
    """Find the MoE routers of ``model`` and check they return ``(logits, weights, ids)``."""
    import torch

    config = model.config
    arch = _arch(config)
    expected = config_moe_layers(config)
    if not expected:
        raise CaptureError(f"model_type {arch.model_type!r} model has no MoE layer; nothing to capture")
    layers = _decoder_layers(model)
    if len(layers) != int(config.num_hidden_layers):
        raise CaptureError(f"model has {len(layers)} decoder layers but config.num_hidden_layers="
                           f"{config.num_hidden_layers}")
    found = tuple(i for i, layer in enumerate(layers)
                  if hasattr(getattr(layer, "mlp", None), "gate") and hasattr(layer.mlp, "experts"))
    if found != expected:
        raise CaptureError(f"MoE blocks sit at layers {list(found)} but the {arch.model_type} config "
                           f"implies {list(expected)}; this transformers version builds the model "
                           f"differently from what moesim-capture knows")
    E, K = _num_experts(config), int(config.num_experts_per_tok)
    routers = {i: layers[i].mlp.gate for i in found}
    import transformers

    for i, gate in routers.items():
        weight = getattr(gate, "weight", None)
        if weight is None or tuple(weight.shape) != (E, int(config.hidden_size)):
            raise CaptureError(f"layer {i}: router {type(gate).__name__} has no [{E}, hidden] weight")
        with torch.no_grad():
            out = gate.forward(torch.zeros(1, int(config.hidden_size), dtype=weight.dtype,
                                           device=_device_of(gate)))
        ok = (isinstance(out, tuple) and len(out) == 3
              and tuple(out[1].shape) == (1, K) and tuple(out[2].shape) == (1, K)
              and not out[2].dtype.is_floating_point)
        if not ok:
            raise CaptureError(
                f"transformers {transformers.__version__}: the {arch.model_type} router "
                f"{type(gate).__name__} (layer {i}) does not return (logits, weights, ids) with "
                f"top_k={K} like {arch.router}; moesim-capture needs transformers >= "
                f"{MIN_TRANSFORMERS}, whose routers do")
    return MoEModelInfo(arch.model_type, int(config.num_hidden_layers), E, K, found, routers)


# ---------------------------------------------------------------------------------------------
# Recording


def _device_of(module):
    """Where ``module`` computes: accelerate's execution device when it dispatched the model
    (``device_map``), else the device of its weight (cpu for weights offloaded to "meta")."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


def _to_host(tensors, tokens: int, dtype):
    """Stack per-layer ``[tokens, K]`` tensors to one ``[tokens, M, K]`` host array: gathered on the
    first tensor's device (layers may sit on different GPUs under a device map), then one copy to
    the host instead of one synchronising copy per layer."""
    import torch

    dev = tensors[0].device
    stacked = torch.stack([t.reshape(tokens, -1).to(dev, dtype) for t in tensors], dim=1)
    return stacked.cpu().numpy()


def _sort_rows(ids: np.ndarray, weights: np.ndarray):
    """Each (token, layer) row's pairs sorted by weight, highest first (stable: ties keep order)."""
    order = np.argsort(-weights, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


class _Recorder:
    """Forward hooks on the routers; ``begin()`` before and ``end(tokens)`` after each forward pass."""

    def __init__(self, info: MoEModelInfo, hidden_size: int, lookahead: bool):
        self.info = info
        self.hidden = hidden_size
        self.lookahead = lookahead
        self.handles: list = []
        self.calls: Optional[dict[int, list]] = None
        nxt = dict(zip(info.moe_layers, info.moe_layers[1:]))
        for layer, gate in info.routers.items():
            nxt_gate = info.routers[nxt[layer]] if lookahead and layer in nxt else None
            self.handles.append(gate.register_forward_hook(self._hook(layer, nxt_gate), with_kwargs=True))

    def _hook(self, layer: int, next_gate):
        def hook(module, args, kwargs, output):
            if self.calls is None:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            pred = None
            if next_gate is not None:
                # Module.forward bypasses hooks (no recursion, no recording); under a device map it
                # is accelerate's wrapper, which moves x to the next router's device.
                out = next_gate.forward(x)
                pred = (out[2], out[1])
            # keep tensors on their device until the pass ends (no sync inside the forward)
            self.calls[layer].append((x.numel() // self.hidden, output[2].detach(),
                                      output[1].detach(), pred))
            return None

        return hook

    def begin(self) -> None:
        self.calls = {layer: [] for layer in self.info.moe_layers}

    def end(self, tokens: int):
        """Arrays for the pass just run: ids, weights [tokens, M, K]; predicted or None."""
        import torch

        calls, self.calls = self.calls, None
        for layer in self.info.moe_layers:
            got = calls[layer]
            if len(got) != 1 or got[0][0] != tokens:
                seen = [c[0] for c in got]
                raise CaptureError(
                    f"layer {layer}: expected the router to run once on {tokens} token(s) in this "
                    f"forward pass, saw calls on {seen} (batch must be 1; a fused MoE kernel that "
                    f"bypasses the router module cannot be captured)")
        got = [calls[layer][0] for layer in self.info.moe_layers]
        ids, w = _sort_rows(_to_host([g[1] for g in got], tokens, torch.int64),
                            _to_host([g[2] for g in got], tokens, torch.float32))
        pred = None
        if self.lookahead:
            M, K = len(got), self.info.top_k
            pred = np.full((tokens, M, K), -1, np.int64)
            if M > 1:  # the last MoE layer has no next router
                pred[:, :-1] = _sort_rows(_to_host([g[3][0] for g in got[:-1]], tokens, torch.int64),
                                          _to_host([g[3][1] for g in got[:-1]], tokens, torch.float32))[0]
        return ids, w, pred

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------
# Capture


@dataclass
class CaptureResult:
    """A captured trace: ``frame`` (schema of ``workloads.trace``), ``meta``, and what was generated."""

    frame: pd.DataFrame
    meta: TraceMeta
    prompt_lens: list[int]
    generated: list[list[int]] = field(default_factory=list)

    def write(self, path) -> None:
        write_trace(path, self.frame, self.meta)


def _eos_ids(model) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if v is None:
            continue
        ids.update(int(t) for t in (v if isinstance(v, (list, tuple)) else [v]))
    return ids


def _frame(request_ids, prompt_lens, ids, weights, preds, moe_layers, K) -> pd.DataFrame:
    M = len(moe_layers)
    T = np.asarray([a.shape[0] for a in ids], dtype=np.int64)
    n = int(T.sum()) * M
    token = np.concatenate([np.repeat(np.arange(t, dtype=np.int64), M) for t in T])
    prefill = token < np.repeat(np.asarray(prompt_lens, dtype=np.int64), T * M)
    offsets = pa.array(np.arange(0, n * K + 1, K, dtype=np.int32))
    cols = {
        "request_id": pa.array(np.repeat(np.asarray(request_ids, dtype=np.int64), T * M)),
        "token_index": pa.array(token),
        "phase": pa.array(np.where(prefill, "prefill", "decode").astype(object), type=pa.string()),
        "layer": pa.array(np.tile(np.asarray(moe_layers, dtype=np.int32), int(T.sum()))),
        "experts": pa.ListArray.from_arrays(
            offsets, pa.array(np.concatenate([a.reshape(-1) for a in ids]).astype(np.int16))),
        "weights": pa.ListArray.from_arrays(
            offsets, pa.array(np.concatenate([a.reshape(-1) for a in weights]).astype(np.float32))),
    }
    if preds is not None:
        flat = np.concatenate([a.reshape(-1, K) for a in preds])  # [n, K], -1 rows = no prediction
        valid = flat[:, 0] >= 0
        lengths = np.where(valid, K, 0)
        poff = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        cols["predicted_experts"] = pa.ListArray.from_arrays(
            poff, pa.array(flat[valid].reshape(-1).astype(np.int16)), mask=pa.array(~valid))
    table = pa.table(cols)
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)


def capture(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
            predict: Optional[str] = None, stop_at_eos: bool = True,
            request_ids: Optional[Sequence[int]] = None, name: Optional[str] = None,
            source: Optional[str] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> CaptureResult:
    """Capture the router trace of ``model`` (a transformers causal LM) on token-id ``prompts``.

    Each prompt runs alone: a prefill, then greedy (argmax) decoding of up to ``max_new_tokens``
    tokens through the KV cache, stopping early at an end-of-sequence token if ``stop_at_eos``.
    ``predict="lookahead"`` adds ``predicted_experts`` (module docstring). ``name`` overrides the
    trace's model name (default :func:`model_name`), ``source`` its source (default: the config's
    ``_name_or_path`` and the transformers version). ``progress(done, total)`` is called after each
    request. The model is put in eval mode for the capture and restored afterwards.
    """
    import torch
    import transformers

    if predict is not None and predict not in PREDICT_CHOICES:
        raise CaptureError(f"predict={predict!r} is not allowed; choose one of: {', '.join(PREDICT_CHOICES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise CaptureError(f"max_new_tokens={max_new_tokens!r} is invalid; must be an integer >= 0")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise CaptureError("no prompts given; need at least one")
    rids = list(range(len(prompts))) if request_ids is None else [int(r) for r in request_ids]
    if len(rids) != len(prompts) or len(set(rids)) != len(rids):
        raise CaptureError("request_ids must be distinct, one per prompt")
    config = model.config
    info = inspect_model(model)
    vocab = int(config.vocab_size)
    for r, p in zip(rids, prompts):
        if not p:
            raise CaptureError(f"prompt of request {r} has no tokens")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise CaptureError(f"prompt of request {r} has token id {bad[0]} outside the vocabulary "
                               f"[0, {vocab})")
    eos = _eos_ids(model) if stop_at_eos else set()
    device = _device_of(model.get_input_embeddings())
    was_training = model.training
    model.eval()
    rec = _Recorder(info, int(config.hidden_size), predict == "lookahead")
    all_ids, all_w, all_pred, generated = [], [], [], []
    try:
        with torch.no_grad():
            for prompt in prompts:
                rec.begin()
                out = model(input_ids=torch.tensor([prompt], dtype=torch.long, device=device),
                            use_cache=True, logits_to_keep=1)
                parts = [rec.end(len(prompt))]
                past = out.past_key_values
                gen: list[int] = []
                for step in range(max_new_tokens):
                    tok = int(out.logits[0, -1].argmax())
                    gen.append(tok)
                    if step + 1 == max_new_tokens or tok in eos:
                        break
                    rec.begin()
                    out = model(input_ids=torch.tensor([[tok]], dtype=torch.long, device=device),
                                past_key_values=past, use_cache=True)
                    parts.append(rec.end(1))
                    past = out.past_key_values
                del past, out
                generated.append(gen)
                all_ids.append(np.concatenate([p[0] for p in parts]))
                all_w.append(np.concatenate([p[1] for p in parts]))
                if predict:
                    all_pred.append(np.concatenate([p[2] for p in parts]))
                if progress is not None:
                    progress(len(generated), len(prompts))
    finally:
        rec.calls = None
        rec.remove()
        model.train(was_training)
    frame = _frame(rids, [len(p) for p in prompts], all_ids, all_w, all_pred if predict else None,
                   info.moe_layers, info.top_k)
    if source is None:
        where = str(getattr(config, "_name_or_path", "") or "").rstrip("/") or f"in-memory {info.model_type} model"
        source = f"moesim-capture of {where} (transformers {transformers.__version__})"
    meta = TraceMeta(model=name or model_name(config), num_experts=info.num_experts, top_k=info.top_k,
                     num_layers=info.num_layers, moe_layers=info.moe_layers, source=source)
    meta.validate("captured trace")
    return CaptureResult(frame, meta, [len(p) for p in prompts], generated)


# ---------------------------------------------------------------------------------------------
# Files: prompts, models, tokenizers


def read_prompts(path) -> list[str]:
    """Prompts from a text file (one per non-blank line) or, for ``.jsonl``/``.ndjson``, from JSON
    lines each holding an object with a string ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"prompts file {path} does not exist" if not path.exists()
                           else f"prompts file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptureError(f"prompts file {path} cannot be read ({exc})") from None
    prompts: list[str] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise CaptureError(f"prompts file {path} line {n} is not JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise CaptureError(f"prompts file {path} line {n} has no string 'prompt' field")
            prompts.append(obj["prompt"])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CaptureError(f"prompts file {path} holds no prompt")
    return prompts


def load_config(path):
    """The HF config of a local model directory (no network); CaptureError if absent or unsupported."""
    path = Path(path)
    if not path.exists():
        raise CaptureError(f"model path {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CaptureError(f"model path {path} is not a model directory (no config.json)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CaptureError(f"model config in {path} cannot be read ({_first_line(exc)})") from None
    spec_from_config(config)  # supported architecture with at least one MoE layer
    return config


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def resolve_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise CaptureError(f"device={device!r} is not allowed; choose one of: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CaptureError("device=cuda was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: Optional[str], device: str):
    import torch

    if dtype is None:
        dtype = "bfloat16" if device == "cuda" else "float32"
    if dtype not in DTYPES:
        raise CaptureError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(path, device: str = "cpu", dtype=None):
    """Load a local causal-LM checkpoint for capture (no network). On CUDA with ``accelerate``
    installed the weights are spread with ``device_map="auto"``; otherwise moved to ``device``.
    Missing router weights (a checkpoint that does not fit the architecture) are an error."""
    from transformers import AutoModelForCausalLM

    load_config(path)
    kwargs: dict[str, Any] = dict(local_files_only=True, output_loading_info=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    use_map = False
    if device == "cuda":
        try:
            import accelerate  # noqa: F401
            use_map = True
            kwargs["device_map"] = "auto"
        except ImportError:
            pass
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CaptureError(f"model in {path} cannot be loaded ({_first_line(exc)})") from None
    missing = [k for k in (info or {}).get("missing_keys", ()) if ".mlp.gate." in k]
    if missing:
        raise CaptureError(f"checkpoint in {path} lacks router weights ({missing[0]}, ...); the "
                           f"routers would be random")
    if not use_map:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaptureError(f"tokenizer in {path} cannot be loaded ({_first_line(exc)})") from None


def tokenize(tokenizer, prompts: Iterable[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's default special tokens (no chat template)."""
    out = []
    for n, text in enumerate(prompts):
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise CaptureError(f"prompt {n} tokenizes to no token")
        out.append([int(t) for t in ids])
    return out


def describe_source(path, dtype, device: str, max_new_tokens: int, predict: Optional[str]) -> str:
    import torch
    import transformers

    name = str(dtype).replace("torch.", "")
    return (f"moesim-capture of {path} (transformers {transformers.__version__}, torch "
            f"{torch.__version__}, {name} on {device}, greedy, max_new_tokens={max_new_tokens}"
            f"{', predict=' + predict if predict else ''})")


__all__ = ["ARCHITECTURES", "CaptureError", "CaptureResult", "MoEModelInfo", "capture",
           "catalog_models", "catalog_name", "config_moe_layers", "inspect_model", "load_config",
           "load_model", "load_tokenizer", "model_name", "read_prompts", "resolve_device",
           "resolve_dtype", "spec_from_config", "tokenize", "describe_source"]

