"""The operations of an MoE forward pass as plain functions over tensors.

Every operation the simulator's cost model names (``hw.cost.CostModel``) is one function here, and
``real_backend.model.MoEModel`` composes a forward pass from exactly these functions, so what
``moesim-profile`` times is what the executor runs:

=====================  ===============================  ==========================================
CostModel method       function(s) here                 what it does
=====================  ===============================  ==========================================
``embed_s``            ``prepare_pass`` + ``embed``     per-pass bookkeeping (positions, masks,
                                                        RoPE tables) and the embedding lookup
``attention_block_s``  ``attention_block``              input RMSNorm, fused QKV projection, RoPE,
                                                        KV-cache write, attention over the cache,
                                                        output projection, residual add,
                                                        post-attention RMSNorm (one layer)
``router_s``           ``route``                        router GEMM, softmax, top-k (renormalised)
                                                        or forced expert ids, token dispatch
``expert_s``           ``run_expert``                   gather the expert's tokens, SwiGLU FFN
                                                        (``expert_ffn``), scale by routing weights
``shared_experts_s``   ``shared_experts``               the always-active shared experts (fused)
``dense_ffn_s``        ``dense_ffn``                    a dense layer's FFN + residual add
``combine_s``          ``combine``                      scatter-add of the expert outputs (+ shared
                                                        output + residual)
``lm_head_s``          ``lm_head``                      final RMSNorm + LM head on each sequence's
                                                        last token
``copy_s``             ``copy_expert``                  an expert's weights into a device slot
=====================  ===============================  ==========================================

Speculative decoding adds ``rejection_sampling`` (``rejection_sampling_s``: the target's softmax
over every verified position, the accept test against the drafter's probabilities, the residual
distribution) and ``KVCache.truncate`` (the rollback of rejected positions; bookkeeping, no op).

Weights are passed in, never owned: an expert runs from whatever ``w_gate_up [2I, H]`` and
``w_down [H, I]`` it is handed (``torch.nn.functional.linear`` layout, ``out x in``), which is how the
offload runtime runs experts out of its device slots.

Attention is grouped-query attention. The query heads of one KV head are folded into the query
length (``[B, kv_heads, group * T, d]``), so the KV cache is never repeated per query head; a boolean
mask gives causality and per-sequence context lengths (dropped when every query sees every key).
Multi-head latent attention (DeepSeek-V2/V3, ``attention: mla``) is *approximated* by multi-query
attention (one KV head) whose K and V together hold as many elements per token as MLA's compressed
cache (``kv_lora_rank + qk_rope_head_dim``): the KV-cache traffic matches the spec, the projection
shapes and FLOPs do not (see ``AttnGeometry.from_spec``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

#: An in-place all-reduce of a tensor-parallel shard's partial sums (``real_backend.tensor_parallel``).
Reduce = Callable[[torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------- device handling


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """``cuda`` if available and nothing was asked for, else ``cpu``; a CUDA request without CUDA fails."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device} is not supported; use cpu or cuda")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (fast and exact enough), bfloat16 on CUDA (what MoE models are served in)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}

# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class AttnGeometry:
    """Heads of the attention the real model runs: ``num_heads`` query heads sharing ``kv_heads``."""

    num_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_heads

    @property
    def qkv_out(self) -> int:
        return (self.num_heads + 2 * self.kv_heads) * self.head_dim

    @classmethod
    def from_spec(cls, spec) -> "AttnGeometry":
        """GQA as the spec says; MLA approximated by MQA with the spec's KV elements per token."""
        if spec.attention == "mla":
            kv_elems = spec.kv_lora_rank + spec.qk_rope_head_dim
            d = max(2, 2 * math.ceil(kv_elems / 4))  # K and V of d each, d even for RoPE
            return cls(spec.num_attention_heads, 1, d)
        return cls(spec.num_attention_heads, spec.num_kv_heads, spec.head_dim)


# --------------------------------------------------------------------------- small kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


class Rope:
    """Rotary position embedding tables (rotate-half convention, as Hugging Face checkpoints use)."""

    def __init__(self, head_dim: int, theta: float, device: torch.device, max_positions: int = 4096):
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.device = torch.device(device)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, half, dtype=torch.float64) * 2.0 / self.head_dim))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.cos = ang.cos().float().to(self.device)
        self.sin = ang.sin().float().to(self.device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype,
               max_position: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[T, 1, head_dim/2]`` for the given token positions."""
        if max_position is None:
            max_position = int(positions.max().item()) if positions.numel() else 0
        need = max_position + 1
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]))
        return (self.cos.index_select(0, positions).to(dtype)[:, None, :],
                self.sin.index_select(0, positions).to(dtype)[:, None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, d]`` rotated: ``[x1 cos - x2 sin, x2 cos + x1 sin]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """K and V of every layer for up to ``max_seqs`` sequences: ``[max_seqs, kv_heads, capacity, d]``.

    A sequence owns one slot (``allocate``/``release``); ``lengths[slot]`` tokens of it are cached.
    ``MoEModel.forward`` writes the new tokens of every layer and then calls ``advance``. The
    capacity grows (doubling, with a copy) when a sequence outgrows it.
    """

    def __init__(self, num_layers: int, geometry: AttnGeometry, max_seqs: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        self.geometry = geometry
        self.max_seqs = max_seqs
        self.capacity = max(1, capacity)
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (max_seqs, geometry.kv_heads, self.capacity, geometry.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = [0] * max_seqs
        self._free = list(range(max_seqs - 1, -1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"KV cache is full: all {self.max_seqs} sequence slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def ensure_capacity(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        new = max(tokens, 2 * self.capacity)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = torch.zeros(t.shape[0], t.shape[1], new, t.shape[3], device=t.device, dtype=t.dtype)
                grown[:, :, : self.capacity] = t
                store[i] = grown
        self.capacity = new

    def advance(self, slots: Sequence[int], new_tokens: Sequence[int]) -> None:
        for s, n in zip(slots, new_tokens):
            self.lengths[s] += n

    def truncate(self, slot: int, length: int) -> None:
        """Roll sequence ``slot`` back to its first ``length`` cached tokens (speculative decoding
        drops the KV entries of rejected drafts). Nothing is copied: the entries past ``length`` are
        dead -- every pass masks each query's keys past its own position, and the next tokens of the
        sequence are written over them before any query can attend to them."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} back to {length} tokens: it holds {self.lengths[slot]}")
        self.lengths[slot] = length

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# --------------------------------------------------------------------------- per-pass bookkeeping


@dataclass
class PassMeta:
    """What every layer's attention needs to know about the batch; built once per forward pass.

    Tokens are ordered sequence by sequence (all new tokens of sequence 0, then of sequence 1, ...),
    the order router traces and forced routing use.
    """

    num_seqs: int
    num_tokens: int
    max_new: int                       # Tmax: most new tokens of one sequence
    max_context: int                   # Smax: longest context after this pass
    new_tokens: list[int]
    starts: list[int]                  # cached tokens per sequence before this pass
    slots: torch.Tensor                # [B] cache slot per sequence
    slot_range: Optional[tuple[int, int]]  # slots are the contiguous range [a, b)
    positions: torch.Tensor            # [T] position of each new token
    token_slot: torch.Tensor           # [T] cache slot of each new token
    pad_index: Optional[torch.Tensor]  # [T] row of each token in the padded [B * Tmax] layout
    mask: Optional[torch.Tensor]       # [B, 1, group * Tmax, Smax] True = may attend; None = all
    cos: torch.Tensor
    sin: torch.Tensor
    last_index: torch.Tensor           # [B] flat index of each sequence's last new token


def prepare_pass(starts: Sequence[int], new_tokens: Sequence[int], slots: Sequence[int],
                 geometry: AttnGeometry, rope: Rope, device: torch.device, dtype: torch.dtype) -> PassMeta:
    """Positions, padding, attention mask and RoPE tables for a batch of sequences."""
    B = len(new_tokens)
    if B == 0 or len(starts) != B or len(slots) != B:
        raise ValueError(f"a pass needs one start and one slot per sequence (got {len(starts)} starts, "
                         f"{len(slots)} slots, {B} sequences)")
    if min(new_tokens) < 1:
        raise ValueError(f"every sequence in a pass needs at least one new token, got {list(new_tokens)}")
    T = int(sum(new_tokens))
    Tmax = int(max(new_tokens))
    ends = [s + n for s, n in zip(starts, new_tokens)]
    Smax = int(max(ends))
    uniform = all(n == Tmax for n in new_tokens)
    pos_list: list[int] = []
    slot_list: list[int] = []
    pad_list: list[int] = []
    qpos = [[0] * Tmax for _ in range(B)]  # padded queries attend position 0 only (never all masked)
    for b, (s, n, slot) in enumerate(zip(starts, new_tokens, slots)):
        pos_list.extend(range(s, s + n))
        slot_list.extend([slot] * n)
        pad_list.extend(range(b * Tmax, b * Tmax + n))
        qpos[b][:n] = range(s, s + n)
    positions = torch.tensor(pos_list, dtype=torch.long, device=device)
    all_keys = uniform and all(e == Smax for e in ends) and Tmax == 1
    if all_keys:
        mask = None
    else:
        q = torch.tensor(qpos, dtype=torch.long, device=device)                   # [B, Tmax]
        keys = torch.arange(Smax, dtype=torch.long, device=device)
        allowed = keys[None, None, :] <= q[:, :, None]                             # [B, Tmax, Smax]
        mask = allowed.repeat(1, geometry.group, 1).unsqueeze(1)                   # [B, 1, g*Tmax, Smax]
    sl = list(slots)
    contiguous = all(b - a == 1 for a, b in zip(sl, sl[1:]))
    cos, sin = rope.tables(positions, dtype, Smax - 1)
    last = torch.tensor([sum(new_tokens[: b + 1]) - 1 for b in range(B)], dtype=torch.long, device=device)
    return PassMeta(
        num_seqs=B, num_tokens=T, max_new=Tmax, max_context=Smax, new_tokens=list(new_tokens),
        starts=list(starts), slots=torch.tensor(sl, dtype=torch.long, device=device),
        slot_range=(sl[0], sl[0] + B) if contiguous else None, positions=positions,
        token_slot=torch.tensor(slot_list, dtype=torch.long, device=device),
        pad_index=None if uniform else torch.tensor(pad_list, dtype=torch.long, device=device),
        mask=mask, cos=cos, sin=sin, last_index=last)


def embed(token_ids: torch.Tensor, w_embed: torch.Tensor) -> torch.Tensor:
    """``[T]`` token ids -> ``[T, H]`` hidden states."""
    return F.embedding(token_ids, w_embed)


# --------------------------------------------------------------------------- attention


@dataclass
class AttnWeights:
    attn_norm: torch.Tensor   # [H]
    w_qkv: torch.Tensor       # [(nh + 2 kvh) d, H]
    w_o: torch.Tensor         # [H, nh d]
    ffn_norm: torch.Tensor    # [H]  (post-attention norm)


def attention_block(x: torch.Tensor, w: AttnWeights, cache_k: torch.Tensor, cache_v: torch.Tensor,
                    meta: PassMeta, geometry: AttnGeometry, eps: float,
                    reduce: Optional[Reduce] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention for the pass; returns ``(residual stream, its post-attention norm)``.
    ``reduce`` (tensor parallelism): the all-reduce of the output projection's partial sums.

    Writes this layer's K and V of the new tokens into ``cache_k``/``cache_v``
    (``[slots, kv_heads, capacity, d]``, capacity already large enough) at their positions.
    """
    nh, kvh, d, g = geometry.num_heads, geometry.kv_heads, geometry.head_dim, geometry.group
    B, T, Tmax, Smax = meta.num_seqs, meta.num_tokens, meta.max_new, meta.max_context
    xn = rms_norm(x, w.attn_norm, eps)
    qkv = F.linear(xn, w.w_qkv)
    q, k, v = qkv.split((nh * d, kvh * d, kvh * d), dim=-1)
    q = apply_rope(q.view(T, nh, d), meta.cos, meta.sin)
    k = apply_rope(k.view(T, kvh, d), meta.cos, meta.sin)
    cache_k[meta.token_slot, :, meta.positions] = k
    cache_v[meta.token_slot, :, meta.positions] = v.view(T, kvh, d)
    if meta.slot_range is not None:
        a, b = meta.slot_range
        K, V = cache_k[a:b, :, :Smax], cache_v[a:b, :, :Smax]
    else:
        K, V = cache_k[meta.slots, :, :Smax], cache_v[meta.slots, :, :Smax]
    if meta.pad_index is None:
        qp = q.view(B, Tmax, kvh, g, d)
    else:
        qp = q.new_zeros(B * Tmax, nh, d)
        qp[meta.pad_index] = q
        qp = qp.view(B, Tmax, kvh, g, d)
    qp = qp.permute(0, 2, 3, 1, 4).reshape(B, kvh, g * Tmax, d)
    out = F.scaled_dot_product_attention(qp, K, V, attn_mask=meta.mask)       # [B, kvh, g*Tmax, d]
    out = out.view(B, kvh, g, Tmax, d).permute(0, 3, 1, 2, 4).reshape(B * Tmax, nh * d)
    if meta.pad_index is not None:
        out = out.index_select(0, meta.pad_index)
    if reduce is None:
        h = x + F.linear(out, w.w_o)
    else:
        h = x + reduce(F.linear(out, w.w_o))
    return h, rms_norm(h, w.ffn_norm, eps)


# --------------------------------------------------------------------------- routing


@dataclass
class Dispatch:
    """Which tokens go to which expert: distinct experts (ascending) with their tokens and weights."""

    experts: list[int]
    counts: list[int]
    token_idx: list[torch.Tensor]   # per expert: flat token indices
    weights: list[torch.Tensor]     # per expert: [n, 1] routing weights


def router(x: torch.Tensor, w_router: torch.Tensor, top_k: int,
           forced_ids: Optional[torch.Tensor] = None,
           forced_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids ``[T, K]`` and weights for each token.

    Free-running: top-k of the softmax over the router logits, weights renormalised to sum to 1.
    Forced (trace replay): the given ids; the given weights, or else the router's softmax at those
    ids, renormalised. The router GEMM runs either way, so a forced pass costs what a free one does.
    """
    probs = F.linear(x, w_router).float().softmax(dim=-1)
    if forced_ids is None:
        w, ids = probs.topk(top_k, dim=-1)
    else:
        ids = forced_ids
        if forced_weights is not None:
            return ids, forced_weights.to(x.dtype)
        w = probs.gather(-1, ids)
    w = w / w.sum(dim=-1, keepdim=True)
    return ids, w.to(x.dtype)


def dispatch(ids: torch.Tensor, weights: torch.Tensor) -> Dispatch:
    """Group the ``[T, K]`` routing by expert (a stable sort of the flattened ids)."""
    K = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat.index_select(0, order), return_counts=True)
    sizes = counts.tolist()
    tokens = torch.div(order, K, rounding_mode="floor")
    w = weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    return Dispatch(experts.tolist(), sizes, list(tokens.split(sizes)), list(w.split(sizes)))


def route(x: torch.Tensor, w_router: torch.Tensor, top_k: int, forced_ids: Optional[torch.Tensor] = None,
          forced_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
    """The router op: ``router`` then ``dispatch``."""
    ids, w = router(x, w_router, top_k, forced_ids, forced_weights)
    return ids, w, dispatch(ids, w)


# --------------------------------------------------------------------------- FFNs


def expert_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN: ``down(silu(gate(x)) * up(x))`` with ``gate_up`` fused (``H -> 2I``), ``down`` ``I -> H``.

    Two GEMMs, exactly ``ModelSpec.ffn_gemms``: ``[n, H] @ [H, 2I]`` and ``[n, I] @ [I, H]``.
    """
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def run_expert(x: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor,
               w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One routed expert for its ``n`` tokens: gather, FFN, scale by routing weight -> ``[n, H]``."""
    return expert_ffn(x.index_select(0, token_idx), w_gate_up, w_down) * weights


def shared_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The always-active shared experts, fused into one SwiGLU FFN of their total width."""
    return expert_ffn(x, w_gate_up, w_down)


def dense_ffn(x: torch.Tensor, residual: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, reduce: Optional[Reduce] = None) -> torch.Tensor:
    """A dense layer's FFN on the normed stream, added to the residual stream (``reduce``: the
    all-reduce of a tensor-parallel shard's partial output)."""
    if reduce is None:
        return residual + expert_ffn(x, w_gate_up, w_down)
    return residual + reduce(expert_ffn(x, w_gate_up, w_down))


def combine(residual: torch.Tensor, outputs: Sequence[torch.Tensor], token_idx: Sequence[torch.Tensor],
            shared_out: Optional[torch.Tensor] = None, reduce: Optional[Reduce] = None) -> torch.Tensor:
    """Residual + shared output + every expert's weighted output scattered back to its tokens.
    ``reduce`` (tensor parallelism): the FFN output is a shard's partial sum, all-reduced before it
    joins the residual stream."""
    if reduce is None:
        y = residual + shared_out if shared_out is not None else residual.clone()
    else:
        y = shared_out.clone() if shared_out is not None else torch.zeros_like(residual)
    for out, idx in zip(outputs, token_idx):
        y.index_add_(0, idx, out)
    return y if reduce is None else residual + reduce(y)


def lm_head(h: torch.Tensor, last_index: Optional[torch.Tensor], w_norm: torch.Tensor,
            w_lm: torch.Tensor, eps: float) -> torch.Tensor:
    """Final RMSNorm + LM head on the rows ``last_index`` (all rows if None); float32 logits."""
    if last_index is not None:
        h = h.index_select(0, last_index)
    return F.linear(rms_norm(h, w_norm, eps), w_lm).float()


# --------------------------------------------------------------------------- speculative decoding


@dataclass
class Rejection:
    """What ``rejection_sampling`` computed, per verified position (row)."""

    target_probs: torch.Tensor   # [T, V] softmax of the target's logits
    accept: torch.Tensor         # [T] bool: the draft token at this row passes the test (False on bonus rows)
    residual: torch.Tensor       # [T, V] distribution to sample the target's own token from at this row

    def accepted(self, drafts: Sequence[int]) -> list[int]:
        """Accepted drafts per request (the leading run of accepted rows), rows laid out as the
        verify pass's: request ``i`` has ``drafts[i] + 1`` rows."""
        acc = self.accept.tolist()
        out, off = [], 0
        for k in drafts:
            a = 0
            while a < k and acc[off + a]:
                a += 1
            out.append(a)
            off += k + 1
        return out


def rejection_sampling(target_logits: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                       uniforms: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> Rejection:
    """Speculative sampling's verification (Leviathan et al. 2023, Chen et al. 2023) over every
    verified position of a round at once.

    ``target_logits [T, V]``: the verify pass's logits, one row per verified position;
    ``draft_probs [T, V]``: the drafter's distribution the draft token of that row was drawn from
    (a zero row where no draft was proposed: a request's bonus position); ``draft_tokens [T]``: the
    draft token verified at each row (< 0 on bonus rows). Row ``j`` accepts its draft token ``x``
    with probability ``min(1, p(x) / q(x))`` (``u * q(x) <= p(x)``, ``u`` uniform in [0, 1));
    its residual distribution ``norm(max(0, p - q))`` is where the target's own token is sampled
    at the first rejected row (``p`` itself on bonus rows, and where ``p <= q`` everywhere).

    Two vocabulary-wide passes, as ``hw.cost.Roofline.rejection_sampling_s`` models them: the
    softmax, then the residual (reading ``p`` and ``q``)."""
    p = target_logits.float().softmax(dim=-1)
    T = p.shape[0]
    if uniforms is None:
        uniforms = torch.rand(T, generator=generator, device=p.device)
    drafted = draft_tokens >= 0
    idx = draft_tokens.clamp(min=0).unsqueeze(-1)
    p_tok = p.gather(-1, idx).squeeze(-1)
    q_tok = draft_probs.gather(-1, idx).squeeze(-1)
    accept = drafted & (uniforms * q_tok <= p_tok)
    residual = (p - draft_probs).clamp_(min=0.0)
    norm = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(norm > 0, residual / norm.clamp(min=torch.finfo(residual.dtype).tiny), p)
    return Rejection(p, accept, residual)


# --------------------------------------------------------------------------- copies


def copy_expert(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], non_blocking: bool = False) -> None:
    """Copy an expert's tensors into preallocated ``dst`` (a device slot); on CUDA from pinned
    host memory with ``non_blocking=True`` this is an asynchronous H2D copy on the current stream."""
    for d, s in zip(dst, src):
        d.copy_(s, non_blocking=non_blocking)
