"""A PyTorch MoE decoder built from a ``workloads.model.ModelSpec``.

``MoEModel`` holds plain tensors (no ``nn.Module`` tree) and composes a forward pass from the
functions of ``real_backend.ops``, the same functions ``moesim-profile`` times:

    embed -> for each layer: attention_block -> (dense_ffn | route -> shared_experts ->
    run_expert for each selected expert -> combine) -> lm_head

* **Experts are addressable**: ``model.experts[(layer, e)]`` is an ``ExpertWeights(gate_up, down)``
  pair of tensors (``gate_up [2I, H]`` = gate rows then up rows, ``down [H, I]``), ``layer`` the
  absolute layer index. A forward pass fetches each selected expert through ``get_expert(layer,
  e) -> (gate_up, down)`` (default: the model's own store), so an offload runtime can hand it
  the weights held in a device slot, waiting for a copy to land first if it must.
* **Routing** is free-running (top-k of the router softmax, weights renormalised) unless a
  ``routing`` mapping forces it: ``{layer: ids}`` or ``{layer: (ids, weights)}`` with ids
  ``[T, K]`` for the pass's ``T`` tokens in sequence order (trace replay). Either way the pass
  returns the routing it used.
* **Hooks** for an executor: ``on_routed(layer, experts, counts)`` is told each MoE layer's
  routing right after its router and may return the order to run the experts in (e.g. resident
  ones first); ``op_timer(op, layer, expert)`` returns a context manager wrapped around every op.
* **Weights**: random by default (seeded per tensor, normal with ``init_std``, norms = 1), or
  loaded from a local safetensors checkpoint directory with Hugging Face Mixtral names
  (``load_checkpoint``); ``save_checkpoint`` writes the model in the same naming.
* **Dense models** (``num_experts: 0``, e.g. ``mini_draft``, a speculative-decoding drafter): every
  layer is a dense FFN; there are no experts, no routers and no routing (``routing`` may be omitted
  or empty, ``ForwardOutput.routing`` is empty).
* **Devices**: ``device`` cpu or cuda (default: cuda if available), ``dtype`` float32 on CPU and
  bfloat16 on CUDA by default. Experts may live on another device (``expert_device``, e.g. the
  host); then ``get_expert`` must return device-resident copies.

Checkpoint names (``model.layers.{i}.`` prefix for per-layer tensors)::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    input_layernorm.weight, post_attention_layernorm.weight, self_attn.{q,k,v,o}_proj.weight
    block_sparse_moe.gate.weight, block_sparse_moe.experts.{e}.w1|w3|w2.weight   (Mixtral)
      also read: mlp.gate.weight, mlp.experts.{e}.gate_proj|up_proj|down_proj.weight (Qwen2-MoE/OLMoE)
    mlp.shared_expert.{gate,up,down}_proj.weight    (shared experts, Qwen2-MoE names)
    mlp.{gate,up,down}_proj.weight                  (dense layers, Llama/DeepSeek names)

Only Mixtral-architecture checkpoints reproduce their reference model exactly: Qwen's attention
biases and sigmoid shared-expert gate, DeepSeek's MLA and group-limited routing are not modelled.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import numpy as np
import torch

from workloads.model import ModelSpec

from . import ops
from .ops import AttnGeometry, AttnWeights, KVCache, Rope

GetExpert = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
OnRouted = Callable[[int, list[int], list[int]], Optional[Sequence[int]]]
OpTimer = Callable[[str, Optional[int], Optional[int]], ContextManager]


@dataclass
class ExpertWeights:
    gate_up: torch.Tensor   # [2I, H]: gate rows, then up rows
    down: torch.Tensor      # [H, I]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up, self.down

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass
class LayerWeights:
    attn: AttnWeights
    router: Optional[torch.Tensor] = None          # [E, H] (MoE layers)
    shared: Optional[ExpertWeights] = None          # fused shared experts (MoE layers)
    dense: Optional[ExpertWeights] = None           # dense FFN (dense layers)


@dataclass
class ForwardOutput:
    logits: torch.Tensor                                   # [B, V] last token per sequence, or [T, V]
    routing: dict[int, tuple[torch.Tensor, torch.Tensor]]  # MoE layer -> (ids [T, K], weights [T, K])


def random_tensor(shape: Sequence[int], std: float, seed: int, name: str, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """Normal(0, std) values that depend only on (seed, name): any subset of a model can be rebuilt."""
    if std == 0:
        return torch.zeros(tuple(shape), device=device, dtype=dtype)
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFFFFFFFFFF)
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    t.mul_(std)
    return t.to(device=device, dtype=dtype)


class MoEModel:
    """An MoE decoder with the shapes of ``spec`` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, device: Optional[str | torch.device] = None,
                 dtype: Optional[torch.dtype] = None, *, seed: int = 0, init_std: float = 0.02,
                 rope_theta: float = 1e6, rms_norm_eps: float = 1e-5,
                 expert_device: Optional[str | torch.device] = None, experts: bool = True):
        self.spec = spec
        self.device = ops.resolve_device(device)
        self.dtype = dtype or ops.default_dtype(self.device)
        self.expert_device = ops.resolve_device(expert_device) if expert_device is not None else self.device
        self.seed = seed
        self.init_std = init_std
        # Tensor parallelism (real_backend.tensor_parallel): the shard's collectives and slice plan.
        self.tp: Optional[Any] = None
        self.tp_plan: Optional[Any] = None
        self.eps = rms_norm_eps
        self.geometry = AttnGeometry.from_spec(spec)
        self.rope = Rope(self.geometry.head_dim, rope_theta, self.device)
        self.dense_layers = frozenset(spec.dense_layers)
        H, V, g = spec.hidden_size, spec.vocab_size, self.geometry
        self.embed_w = self._rand("embed", (V, H))
        self.final_norm = self._ones(H)
        self.lm_head_w = self.embed_w if spec.tie_word_embeddings else self._rand("lm_head", (V, H))
        self.layers: list[LayerWeights] = []
        self.experts: dict[tuple[int, int], ExpertWeights] = {}
        for layer in range(spec.num_layers):
            attn = AttnWeights(self._ones(H), self._rand(f"{layer}.qkv", (g.qkv_out, H)),
                               self._rand(f"{layer}.o", (H, g.num_heads * g.head_dim)), self._ones(H))
            lw = LayerWeights(attn)
            if layer in self.dense_layers:
                lw.dense = self._ffn(f"{layer}.dense", spec.dense_intermediate_size, self.device)
            else:
                lw.router = self._rand(f"{layer}.router", (spec.num_experts, H))
                if spec.num_shared_experts:
                    lw.shared = self._ffn(f"{layer}.shared", spec.shared_intermediate_total, self.device)
                if experts:
                    for e in range(spec.num_experts):
                        self.experts[(layer, e)] = self.random_expert(layer, e)
            self.layers.append(lw)

    # ------------------------------------------------------------------ construction helpers
    def _rand(self, name: str, shape: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        return random_tensor(shape, self.init_std, self.seed, name, device or self.device, self.dtype)

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, device=self.device, dtype=self.dtype)

    def _ffn(self, name: str, intermediate: int, device: torch.device) -> ExpertWeights:
        H = self.spec.hidden_size
        return ExpertWeights(self._rand(f"{name}.gate_up", (2 * intermediate, H), device),
                             self._rand(f"{name}.down", (H, intermediate), device))

    def random_expert(self, layer: int, expert: int, device: Optional[torch.device] = None) -> ExpertWeights:
        """The random weights of expert ``(layer, expert)`` (the same every time for a given seed)."""
        return self._ffn(f"{layer}.expert{expert}", self.spec.expert_intermediate_size,
                         device or self.expert_device)

    # ------------------------------------------------------------------ access
    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.spec.moe_layers

    def expert_weights(self, layer: int, expert: int) -> ExpertWeights:
        try:
            return self.experts[(layer, expert)]
        except KeyError:
            raise KeyError(f"no weights for expert {expert} of layer {layer} "
                           f"(MoE layers {list(self.moe_layers)}, {self.spec.num_experts} experts)") from None

    def set_expert(self, layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        want = self.expert_shapes
        if tuple(gate_up.shape) != want[0] or tuple(down.shape) != want[1]:
            raise ValueError(f"expert ({layer}, {expert}) shapes {tuple(gate_up.shape)}, {tuple(down.shape)}; "
                             f"expected {want[0]}, {want[1]}")
        self.experts[(layer, expert)] = ExpertWeights(gate_up, down)

    @property
    def expert_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        H, I = self.spec.hidden_size, self.spec.expert_intermediate_size
        return (2 * I, H), (H, I)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one routed expert at the model's dtype."""
        return 3 * self.spec.hidden_size * self.spec.expert_intermediate_size * ops.DTYPE_BYTES[self.dtype]

    def parameter_count(self) -> dict[str, int]:
        tensors = [self.embed_w, self.final_norm]
        if self.lm_head_w is not self.embed_w:
            tensors.append(self.lm_head_w)
        for lw in self.layers:
            tensors += [lw.attn.attn_norm, lw.attn.w_qkv, lw.attn.w_o, lw.attn.ffn_norm]
            if lw.router is not None:
                tensors.append(lw.router)
            for f in (lw.shared, lw.dense):
                if f is not None:
                    tensors += list(f.tensors)
        non_expert = sum(t.numel() for t in tensors)
        expert = sum(w.gate_up.numel() + w.down.numel() for w in self.experts.values())
        return {"non_expert": non_expert, "expert": expert, "total": non_expert + expert}

    def new_cache(self, max_seqs: int = 1, capacity: int = 256) -> KVCache:
        return KVCache(self.spec.num_layers, self.geometry, max_seqs, capacity, self.device, self.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Sequence[Sequence[int]] | Sequence[torch.Tensor], cache: KVCache,
                slots: Sequence[int], *, routing: Optional[Mapping[int, Any]] = None,
                get_expert: Optional[GetExpert] = None, on_routed: Optional[OnRouted] = None,
                op_timer: Optional[OpTimer] = None, all_logits: bool = False) -> ForwardOutput:
        """One forward pass over the new ``tokens`` of each sequence (prefill: the prompt; decode:
        one token), appending to the KV cache of its ``slots``. Returns the last token's logits per
        sequence (every token's with ``all_logits``) and the routing used per MoE layer."""
        spec, geom = self.spec, self.geometry
        timer = op_timer or _no_timer
        seqs = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in tokens]
        new = [int(t.numel()) for t in seqs]
        if len(slots) != len(seqs):
            raise ValueError(f"{len(seqs)} sequences but {len(slots)} cache slots")
        starts = [cache.lengths[s] for s in slots]
        cache.ensure_capacity(max(s + n for s, n in zip(starts, new)))
        T = sum(new)
        forced = self._forced_routing(routing, T)
        tp = self.tp
        reduce = tp.all_reduce if tp is not None else None
        with timer("embed", None, None):
            meta = ops.prepare_pass(starts, new, slots, geom, self.rope, self.device, self.dtype)
            ids = torch.cat(seqs).to(self.device)
            x = ops.embed(ids, self.embed_w) if tp is None else tp.embed(ids, self.embed_w)
        used: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, lw in enumerate(self.layers):
            with timer("attention", layer, None):
                h, xn = ops.attention_block(x, lw.attn, cache.k[layer], cache.v[layer], meta, geom, self.eps,
                                            reduce)
            if lw.dense is not None:
                with timer("dense_ffn", layer, None):
                    x = ops.dense_ffn(xn, h, lw.dense.gate_up, lw.dense.down, reduce)
                continue
            f_ids, f_w = forced.get(layer, (None, None))
            x, ids, w = self.moe(layer, xn, h, f_ids, f_w, get_expert=get_expert, on_routed=on_routed,
                                 op_timer=timer)
            used[layer] = (ids, w)
        cache.advance(slots, new)
        with timer("lm_head", None, None):
            logits = ops.lm_head(x, None if all_logits else meta.last_index, self.final_norm, self.lm_head_w,
                                 self.eps)
            if tp is not None:
                logits = tp.gather_logits(logits)
        return ForwardOutput(logits, used)

    __call__ = forward

    def moe(self, layer: int, xn: torch.Tensor, residual: torch.Tensor,
            forced_ids: Optional[torch.Tensor] = None, forced_weights: Optional[torch.Tensor] = None, *,
            get_expert: Optional[GetExpert] = None, on_routed: Optional[OnRouted] = None,
            op_timer: Optional[OpTimer] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE half of a layer on the normed stream ``xn``: router, shared experts, the selected
        experts, combine into ``residual``. Returns ``(new residual stream, ids, weights)``."""
        timer = op_timer or _no_timer
        lw = self.layers[layer]
        if lw.router is None:
            raise ValueError(f"layer {layer} is a dense layer")
        with timer("router", layer, None):
            ids, w, disp = ops.route(xn, lw.router, self.spec.top_k, forced_ids, forced_weights)
        order = list(range(len(disp.experts)))
        if on_routed is not None:
            wanted = on_routed(layer, list(disp.experts), list(disp.counts))
            if wanted is not None:
                pos = {e: i for i, e in enumerate(disp.experts)}
                order = [pos[e] for e in wanted]
                if sorted(order) != list(range(len(disp.experts))):
                    raise ValueError(f"on_routed for layer {layer} returned {list(wanted)}, "
                                     f"not an ordering of the routed experts {disp.experts}")
        shared_out = None
        if lw.shared is not None:
            with timer("shared_experts", layer, None):
                shared_out = ops.shared_experts(xn, lw.shared.gate_up, lw.shared.down)
        outs, idxs = [], []
        for i in order:
            e = disp.experts[i]
            wgu, wd = get_expert(layer, e) if get_expert is not None else self.experts[(layer, e)].tensors
            with timer("expert", layer, e):
                outs.append(ops.run_expert(xn, disp.token_idx[i], disp.weights[i], wgu, wd))
            idxs.append(disp.token_idx[i])
        with timer("combine", layer, None):
            y = ops.combine(residual, outs, idxs, shared_out, self.tp.all_reduce if self.tp is not None else None)
        return y, ids, w

    def _forced_routing(self, routing: Optional[Mapping[int, Any]], T: int) -> dict:
        if routing is None:
            return {}
        E = self.spec.num_experts
        missing = [l for l in self.moe_layers if l not in routing]
        if missing:
            raise ValueError(f"forced routing has no entry for MoE layer(s) {missing}")
        out = {}
        for layer in self.moe_layers:
            entry = routing[layer]
            ids, w = entry if isinstance(entry, tuple) else (entry, None)
            ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids,
                                  dtype=torch.long).to(self.device)
            if ids.dim() != 2 or ids.shape[0] != T or ids.shape[1] < 1:
                raise ValueError(f"forced routing for layer {layer} has shape {tuple(ids.shape)}; "
                                 f"expected [{T} tokens, K]")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
                raise ValueError(f"forced routing for layer {layer} names experts outside [0, {E})")
            if w is not None:
                w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w).to(self.device)
                if tuple(w.shape) != tuple(ids.shape):
                    raise ValueError(f"forced weights for layer {layer} have shape {tuple(w.shape)}, "
                                     f"ids {tuple(ids.shape)}")
            out[layer] = (ids, w)
        return out

    # ------------------------------------------------------------------ generation (tests, demos)
    @torch.inference_mode()
    def greedy(self, prompt: Sequence[int], steps: int, cache: Optional[KVCache] = None) -> list[int]:
        """Greedy continuation of one prompt (prefill + ``steps - 1`` decode passes)."""
        cache = cache or self.new_cache(1, len(prompt) + steps)
        slot = cache.allocate()
        out = []
        nxt = list(prompt)
        for _ in range(steps):
            logits = self.forward([nxt], cache, [slot]).logits
            tok = int(logits[0].argmax())
            out.append(tok)
            nxt = [tok]
        cache.release(slot)
        return out

    # ------------------------------------------------------------------ checkpoints
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face (Mixtral) names; fused tensors split back into q/k/v, w1/w3."""
        g, I = self.geometry, self.spec.expert_intermediate_size
        sd = {"model.embed_tokens.weight": self.embed_w, "model.norm.weight": self.final_norm}
        if not self.spec.tie_word_embeddings:
            sd["lm_head.weight"] = self.lm_head_w
        for i, lw in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, k, v = lw.attn.w_qkv.split((g.num_heads * g.head_dim, g.kv_heads * g.head_dim,
                                           g.kv_heads * g.head_dim), dim=0)
            sd.update({p + "input_layernorm.weight": lw.attn.attn_norm,
                       p + "post_attention_layernorm.weight": lw.attn.ffn_norm,
                       p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                       p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": lw.attn.w_o})
            if lw.dense is not None:
                sd.update(_ffn_names(p + "mlp.", lw.dense, lw.dense.down.shape[1]))
                continue
            sd[p + "block_sparse_moe.gate.weight"] = lw.router
            if lw.shared is not None:
                sd.update(_ffn_names(p + "mlp.shared_expert.", lw.shared, lw.shared.down.shape[1]))
            for e in range(self.spec.num_experts):
                ew = self.experts.get((i, e))
                if ew is None:
                    continue
                q = f"{p}block_sparse_moe.experts.{e}."
                sd[q + "w1.weight"], sd[q + "w3.weight"] = ew.gate_up[:I], ew.gate_up[I:]
                sd[q + "w2.weight"] = ew.down
        return sd

    def save_checkpoint(self, path: str | Path, max_shard_bytes: float = 2e9) -> Path:
        """Write ``model*.safetensors`` (+ ``config.json``) into directory ``path``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.hf_state_dict().items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += n
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, out / name, {"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
        return out

    def hf_config(self) -> dict[str, Any]:
        s = self.spec
        return {"model_type": "mixtral", "moesim_model": s.name, "hidden_size": s.hidden_size,
                "intermediate_size": s.expert_intermediate_size, "num_hidden_layers": s.num_layers,
                "num_local_experts": s.num_experts, "num_experts_per_tok": s.top_k,
                "num_attention_heads": self.geometry.num_heads, "num_key_value_heads": self.geometry.kv_heads,
                "head_dim": self.geometry.head_dim, "vocab_size": s.vocab_size,
                "rope_theta": self.rope.theta, "rms_norm_eps": self.eps,
                "tie_word_embeddings": s.tie_word_embeddings,
                "shared_expert_intermediate_size": s.shared_intermediate_total,
                "dense_layers": list(s.dense_layers), "dense_intermediate_size": s.dense_intermediate_size}

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, path: str | Path, device: Optional[str | torch.device] = None,
                        dtype: Optional[torch.dtype] = None, **kwargs) -> "MoEModel":
        """A model with ``spec``'s shapes and the weights of the safetensors checkpoint in ``path``
        (RoPE theta and RMSNorm epsilon from its ``config.json`` when present)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            kwargs.setdefault("rope_theta", float(cfg.get("rope_theta", 1e6)))
            kwargs.setdefault("rms_norm_eps", float(cfg.get("rms_norm_eps", 1e-5)))
        model = cls(spec, device, dtype, experts=False, init_std=0.0, **kwargs)
        model.load_checkpoint(path)
        return model

    def load_checkpoint(self, path: str | Path) -> None:
        """Replace every weight with the checkpoint's (shapes checked; extra tensors ignored)."""
        tensors = _CheckpointReader(Path(path))
        g, spec, H = self.geometry, self.spec, self.spec.hidden_size

        def get(name: str, shape: tuple, device=None, *alts: str) -> torch.Tensor:
            t = tensors.get(name, *alts)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(t.shape)}; "
                                 f"model={spec.name} expects {tuple(shape)}")
            return t.to(device=device or self.device, dtype=self.dtype)

        self.embed_w = get("model.embed_tokens.weight", (spec.vocab_size, H))
        self.final_norm = get("model.norm.weight", (H,))
        self.lm_head_w = (self.embed_w if spec.tie_word_embeddings
                          else get("lm_head.weight", (spec.vocab_size, H)))
        I = spec.expert_intermediate_size
        for i, lw in enumerate(self.layers):
            p = f"model.layers.{i}."
            qkv = [get(p + f"self_attn.{n}_proj.weight", (h * g.head_dim, H))
                   for n, h in (("q", g.num_heads), ("k", g.kv_heads), ("v", g.kv_heads))]
            lw.attn = AttnWeights(get(p + "input_layernorm.weight", (H,)), torch.cat(qkv, 0),
                                  get(p + "self_attn.o_proj.weight", (H, g.num_heads * g.head_dim)),
                                  get(p + "post_attention_layernorm.weight", (H,)))
            if lw.dense is not None:
                lw.dense = _read_ffn(get, p + "mlp.", spec.dense_intermediate_size, H, self.device)
                continue
            lw.router = get(p + "block_sparse_moe.gate.weight", (spec.num_experts, H), None, p + "mlp.gate.weight")
            if lw.shared is not None:
                lw.shared = _read_ffn(get, p + "mlp.shared_expert.", spec.shared_intermediate_total, H, self.device)
            for e in range(spec.num_experts):
                a, b = f"{p}block_sparse_moe.experts.{e}.", f"{p}mlp.experts.{e}."
                gate = get(a + "w1.weight", (I, H), self.expert_device, b + "gate_proj.weight")
                up = get(a + "w3.weight", (I, H), self.expert_device, b + "up_proj.weight")
                down = get(a + "w2.weight", (H, I), self.expert_device, b + "down_proj.weight")
                self.experts[(i, e)] = ExpertWeights(torch.cat((gate, up), 0), down)


def _ffn_names(prefix: str, f: ExpertWeights, intermediate: int) -> dict[str, torch.Tensor]:
    return {prefix + "gate_proj.weight": f.gate_up[:intermediate], prefix + "up_proj.weight": f.gate_up[intermediate:],
            prefix + "down_proj.weight": f.down}


def _read_ffn(get, prefix: str, intermediate: int, H: int, device) -> ExpertWeights:
    gate = get(prefix + "gate_proj.weight", (intermediate, H), device)
    up = get(prefix + "up_proj.weight", (intermediate, H), device)
    return ExpertWeights(torch.cat((gate, up), 0), get(prefix + "down_proj.weight", (H, intermediate), device))


@contextlib.contextmanager
def _null():
    yield


def _no_timer(op: str, layer: Optional[int], expert: Optional[int]) -> ContextManager:
    return _null()


# --------------------------------------------------------------------------- safetensors
# The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
# N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
# raw little-endian tensor bytes. The ``safetensors`` package is used when installed; otherwise the
# small reader/writer below (``backend="builtin"``) does the same.

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _have_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Optional[Mapping[str, str]] = None, backend: str = "auto") -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if backend == "auto" and _have_safetensors() or backend == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=dict(metadata or {}))
        return
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for v in tensors.values():
            if v.numel():
                f.write(v.reshape(-1).view(torch.uint8).numpy().tobytes())


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def load_safetensors(path: str | Path, names: Optional[Sequence[str]] = None,
                     backend: str = "auto") -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (all, or ``names``), on the CPU."""
    if backend == "auto" and _have_safetensors() or backend == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}
    header, base = read_safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for k in names if names is not None else header:
            info = header[k]
            dt = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            count = (end - begin) // torch.empty((), dtype=dt).element_size()
            if count == 0:
                out[k] = torch.empty(shape, dtype=dt)
                continue
            out[k] = torch.frombuffer(mm, dtype=dt, count=count, offset=base + begin).reshape(shape).clone()
        del mm
    return out


class _CheckpointReader:
    """Tensor lookup over every ``*.safetensors`` file of a checkpoint directory."""

    def __init__(self, path: Path):
        if not path.is_dir():
            raise ValueError(f"checkpoint directory {path} does not exist")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"checkpoint directory {path} holds no *.safetensors files")
        self.path = path
        self.where: dict[str, Path] = {}
        for f in files:
            for k in read_safetensors_header(f)[0]:
                self.where[k] = f

    def get(self, name: str, *alternatives: str) -> torch.Tensor:
        for n in (name, *alternatives):
            if n is not None and n in self.where:
                return load_safetensors(self.where[n], [n])[n]
        raise ValueError(f"checkpoint {self.path} has no tensor {name}")
