"""MoE (and dense) model shapes (``ModelSpec``) and the operations one forward pass is made of.

Values for the built-in models come from the public ``config.json`` of each model (see
``conf/model/*.yaml``, which cite them). A ModelSpec knows shapes only; how long an operation takes
is the cost model's business (``hw.cost``).

Conventions
-----------
* Layers are numbered ``0 .. num_layers-1`` as in the checkpoint. A layer listed in
  ``dense_layers`` has a dense FFN; every other layer is an MoE layer. Router traces use the same
  absolute layer numbers.
* A fully dense model (OPT, Qwen2-0.5B: speculative-decoding targets and drafts) says
  ``num_experts: 0`` with ``top_k: 0`` and ``expert_intermediate_size: 0``. Then every layer is
  dense: ``dense_layers`` defaults to all of them (listing every layer is also accepted, any other
  list is an error), ``moe_layers`` is empty and there are no expert bytes. ``num_experts: 0`` is
  the only way to say "dense": an MoE model keeps needing >= 1 expert, 1 <= top_k <= num_experts
  and at least one MoE layer.
* A dense FFN, like an expert, is modelled as SwiGLU (3 matrices ``H x I``). A 2-matrix MLP
  (OPT's ReLU ``H -> F -> H``) is represented by ``dense_intermediate_size = 2F/3``, which gives
  the same parameters, bytes and GEMM FLOPs (``conf/model/opt_*.yaml``).
* An expert is a SwiGLU FFN: gate and up projections ``H x I`` and a down projection ``I x H``,
  so ``expert_params = 3 * H * I``.
* Shared experts (always active) are modelled as one fused SwiGLU FFN of width
  ``num_shared_experts * shared_expert_intermediate_size``, as DeepSeek and Qwen implement them.
* Byte sizes: ``weight_bytes_per_param`` for non-expert weights, ``expert_bytes_per_param`` for
  routed experts (e.g. 0.53 for MXFP4), ``kv_bytes_per_elem`` for the KV cache,
  ``act_bytes_per_elem`` for activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal, NamedTuple, Optional

from .validation import ConfigError, positive, require


class Gemm(NamedTuple):
    """A matrix multiply ``[m, k] @ [k, n]`` whose ``[k, n]`` operand is a weight."""

    name: str
    m: int  # tokens
    n: int
    k: int
    weight_bytes_per_param: float

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    @property
    def weight_bytes(self) -> float:
        return self.n * self.k * self.weight_bytes_per_param


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only MoE transformer (one entry of REFERENCE.md section 5), or of a
    dense one (``num_experts=0``; see the module docstring)."""

    name: str
    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int = 0
    attention: Literal["gqa", "mla"] = "gqa"
    # Multi-head latent attention (DeepSeek-V2/V3); ignored for gqa.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    tie_word_embeddings: bool = False
    weight_bytes_per_param: float = 2.0
    expert_bytes_per_param: Optional[float] = None
    kv_bytes_per_elem: float = 2.0
    act_bytes_per_elem: float = 2.0
    hf_id: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # A dense model (num_experts=0) has every layer dense unless dense_layers says otherwise
        # (which validate() then rejects).
        if self.num_experts == 0 and not self.dense_layers and self.num_layers > 0:
            object.__setattr__(self, "dense_layers", tuple(range(self.num_layers)))

    # ------------------------------------------------------------------ validation
    def validate(self, key: str = "model") -> None:
        positive(self, key, "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                 "vocab_size", "weight_bytes_per_param", "kv_bytes_per_elem", "act_bytes_per_elem")
        require(self.num_experts >= 0, f"{key}.num_experts", self.num_experts,
                "must be >= 1 (an MoE model) or 0 (a dense model)")
        if self.is_dense:
            dense = "must be 0 for a dense model (num_experts=0)"
            require(self.top_k == 0, f"{key}.top_k", self.top_k, dense)
            require(self.expert_intermediate_size == 0, f"{key}.expert_intermediate_size",
                    self.expert_intermediate_size, dense)
            require(self.num_shared_experts == 0, f"{key}.num_shared_experts", self.num_shared_experts, dense)
            require(set(self.dense_layers) == set(range(self.num_layers)), f"{key}.dense_layers",
                    list(self.dense_layers), "a dense model (num_experts=0) has every layer dense; "
                    "leave dense_layers unset")
            require(self.dense_intermediate_size > 0, f"{key}.dense_intermediate_size",
                    self.dense_intermediate_size, "must be > 0 for a dense model (num_experts=0)")
        else:
            positive(self, key, "top_k", "expert_intermediate_size")
            require(self.top_k <= self.num_experts, f"{key}.top_k", self.top_k,
                    f"must be between 1 and num_experts={self.num_experts}")
        require(self.num_attention_heads % self.num_kv_heads == 0, f"{key}.num_kv_heads",
                self.num_kv_heads, f"must divide num_attention_heads={self.num_attention_heads}")
        for layer in self.dense_layers:
            require(0 <= layer < self.num_layers, f"{key}.dense_layers", list(self.dense_layers),
                    f"layer indices must be in [0, {self.num_layers})")
        if not self.is_dense:
            require(len(self.moe_layers) > 0, f"{key}.dense_layers", list(self.dense_layers),
                    "at least one layer must be an MoE layer (for a dense model set num_experts=0)")
        if self.dense_layers:
            require(self.dense_intermediate_size > 0, f"{key}.dense_intermediate_size",
                    self.dense_intermediate_size, "must be > 0 when dense_layers is set")
        if self.num_shared_experts:
            require(self.shared_expert_intermediate_size > 0,
                    f"{key}.shared_expert_intermediate_size", self.shared_expert_intermediate_size,
                    "must be > 0 when num_shared_experts > 0")
        if self.attention == "mla":
            positive(self, key, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.expert_bytes_per_param is not None:
            positive(self, key, "expert_bytes_per_param")

    @property
    def is_dense(self) -> bool:
        """No routed experts at all (``num_experts == 0``): every layer has a dense FFN."""
        return self.num_experts == 0

    # ------------------------------------------------------------------ layers
    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Absolute indices of the MoE layers, ascending."""
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_layers) if i not in dense)

    @cached_property
    def moe_layer_index(self) -> dict[int, int]:
        """Absolute layer index -> position among MoE layers."""
        return {layer: i for i, layer in enumerate(self.moe_layers)}

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    # ------------------------------------------------------------------ sizes
    @property
    def expert_param_bytes(self) -> float:
        return self.expert_bytes_per_param if self.expert_bytes_per_param is not None else self.weight_bytes_per_param

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert's weights (what an offloaded expert costs to copy)."""
        return self.expert_params * self.expert_param_bytes

    @property
    def total_expert_bytes(self) -> float:
        """Bytes of every routed expert of every MoE layer (0 for a dense model)."""
        return self.expert_bytes * self.num_experts * self.num_moe_layers

    @property
    def shared_intermediate_total(self) -> int:
        return self.num_shared_experts * self.shared_expert_intermediate_size

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        """KV-cache bytes one token adds to one layer (MLA caches the compressed latent + rope key)."""
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_bytes_per_elem
        return 2 * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def attention_gemms(self, tokens: int) -> list[Gemm]:
        """Projections of one attention block for ``tokens`` tokens (not the score/softmax part)."""
        H, nh, b = self.hidden_size, self.num_attention_heads, self.weight_bytes_per_param
        if self.attention == "mla":
            q_out = nh * self.q_head_dim
            g = []
            if self.q_lora_rank:
                g += [Gemm("q_a_proj", tokens, self.q_lora_rank, H, b),
                      Gemm("q_b_proj", tokens, q_out, self.q_lora_rank, b)]
            else:
                g.append(Gemm("q_proj", tokens, q_out, H, b))
            g += [Gemm("kv_a_proj", tokens, self.kv_lora_rank + self.qk_rope_head_dim, H, b),
                  Gemm("kv_b_proj", tokens, nh * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank, b),
                  Gemm("o_proj", tokens, H, nh * self.v_head_dim, b)]
            return g
        qkv = (nh + 2 * self.num_kv_heads) * self.head_dim
        return [Gemm("qkv_proj", tokens, qkv, H, b), Gemm("o_proj", tokens, H, nh * self.head_dim, b)]

    def router_gemm(self, tokens: int) -> Gemm:
        return Gemm("router", tokens, self.num_experts, self.hidden_size, self.weight_bytes_per_param)

    def ffn_gemms(self, tokens: int, intermediate: int, bytes_per_param: float, name: str) -> list[Gemm]:
        """A SwiGLU FFN as two GEMMs: fused gate+up (``H -> 2I``) and down (``I -> H``)."""
        H = self.hidden_size
        return [Gemm(f"{name}.gate_up", tokens, 2 * intermediate, H, bytes_per_param),
                Gemm(f"{name}.down", tokens, H, intermediate, bytes_per_param)]

    def expert_gemms(self, tokens: int) -> list[Gemm]:
        return self.ffn_gemms(tokens, self.expert_intermediate_size, self.expert_param_bytes, "expert")

    def shared_expert_gemms(self, tokens: int) -> list[Gemm]:
        if not self.num_shared_experts:
            return []
        return self.ffn_gemms(tokens, self.shared_intermediate_total, self.weight_bytes_per_param, "shared_expert")

    def dense_ffn_gemms(self, tokens: int) -> list[Gemm]:
        return self.ffn_gemms(tokens, self.dense_intermediate_size, self.weight_bytes_per_param, "dense_ffn")

    def lm_head_gemm(self, sequences: int) -> Gemm:
        return Gemm("lm_head", sequences, self.vocab_size, self.hidden_size, self.weight_bytes_per_param)

    def attention_core_flops(self, query_tokens: int, context_tokens: int) -> float:
        """FLOPs of QK^T and PV for ``query_tokens`` queries each attending to ``context_tokens`` keys
        (pass the sum over queries of their context length as ``context_tokens * query_tokens``)."""
        per_pair = 2 * self.num_attention_heads * (self.q_head_dim + self.v_dim)
        return float(per_pair) * query_tokens * context_tokens

    @cached_property
    def non_expert_bytes(self) -> float:
        """Weights that stay on the GPU: embeddings, attention, routers, shared experts, dense FFNs, norms."""
        H = self.hidden_size
        per_layer_attn = sum(g.weight_bytes for g in self.attention_gemms(1))
        router = self.router_gemm(1).weight_bytes
        shared = sum(g.weight_bytes for g in self.shared_expert_gemms(1))
        num_dense = self.num_layers - self.num_moe_layers
        dense = sum(g.weight_bytes for g in self.dense_ffn_gemms(1)) if num_dense else 0.0
        norms = 2 * H * self.weight_bytes_per_param
        embed = self.vocab_size * H * self.weight_bytes_per_param * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * (per_layer_attn + norms)
                + self.num_moe_layers * (router + shared)
                + num_dense * dense + embed)

    @property
    def total_bytes(self) -> float:
        return self.non_expert_bytes + self.total_expert_bytes

    # ------------------------------------------------------------------ tensor parallelism
    def tensor_shard(self, p: int, key: str = "hw.tensor_parallel") -> "ModelSpec":
        """The part of the model one GPU holds under ``p``-way tensor parallelism, as vLLM (Megatron
        style) splits it; ``p == 1`` returns ``self``.

        * attention: query heads ``/ p`` (column-parallel QKV, row-parallel output projection);
          KV heads ``/ p`` when there are at least ``p`` of them, else one per GPU (replicated), as
          vLLM's ``QKVParallelLinear`` does. MLA: heads ``/ p``; the low-rank ``q_a``/``kv_a``
          projections and the latent KV cache are replicated (``kv_lora_rank`` unchanged);
        * routed experts: each expert's intermediate dimension ``/ p`` (vLLM's fused MoE shards
          every expert across all ranks; every GPU holds every expert's slice), so ``expert_bytes``
          is ``1/p`` of the full expert; shared experts and dense FFNs: intermediate ``/ p``;
        * vocabulary ``/ p`` for the LM head and the embedding (``VocabParallelEmbedding``,
          ``ParallelLMHead``); router, norms and ``hidden_size`` replicated.

        A dimension that ``p`` does not divide is rounded up (vLLM pads the vocabulary; our
        2/3-width stand-in for a 2-matrix MLP need not divide). ``p`` must divide
        ``num_attention_heads`` and, with more KV heads than ``p``, ``num_kv_heads`` (else ``p``
        must be a multiple of it); a one-line ConfigError names ``key`` otherwise. The shard keeps
        the model's name (it is the same model, one GPU's part of it).
        """
        require(isinstance(p, int) and not isinstance(p, bool) and p >= 1, key, p, "must be an integer >= 1")
        if p == 1:
            return self
        nh, kv = self.num_attention_heads, self.num_kv_heads
        require(nh % p == 0, key, p, f"must divide model.num_attention_heads={nh} (attention heads are split "
                                     f"across the GPUs)")
        if kv >= p:
            require(kv % p == 0, key, p, f"must divide model.num_kv_heads={kv}")
            kv_shard = kv // p
        else:
            require(p % kv == 0, key, p, f"must be a multiple of model.num_kv_heads={kv} when it exceeds it")
            kv_shard = 1

        def split(n: int) -> int:
            return -(-n // p) if n > 0 else n

        return replace(
            self,
            num_attention_heads=nh // p,
            num_kv_heads=kv_shard,
            expert_intermediate_size=split(self.expert_intermediate_size),
            shared_expert_intermediate_size=split(self.shared_expert_intermediate_size),
            dense_intermediate_size=split(self.dense_intermediate_size),
            vocab_size=split(self.vocab_size),
        )


def expected_active_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """MoESD's N(t) = E * (1 - ((E - K)/E)^t): distinct experts hit by t tokens under uniform routing
    (0 for a dense model, ``num_experts == 0``)."""
    if tokens < 0:
        raise ConfigError(f"tokens={tokens} is invalid; must be >= 0")
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - ((num_experts - top_k) / num_experts) ** tokens)
