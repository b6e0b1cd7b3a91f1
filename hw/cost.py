"""Cost models: how long each operation of an MoE forward pass takes on a device.

The simulator never measures; it asks a cost model. The interface is at the level of the
operations an MoE layer is made of (attention block, router, one routed expert for ``n`` tokens,
shared experts, dense FFN, LM head, a copy), so a measured table (issue 4) and the analytic
``Roofline`` answer the same questions.

``Roofline`` times one kernel as ``max(flops / (peak * flops_eff), bytes / (bw * mem_eff)) + launch``
and an operation as the sum of its kernels:

* attention block (per layer) = input norm + projections (GEMMs) + attention core + output norm;
  the attention core reads the KV cache (``kv_tokens * kv_bytes_per_token_per_layer``) and does
  ``attention_core_flops`` for the attended (query, key) pairs;
* router = router GEMM + a top-k/softmax kernel over ``tokens * num_experts`` logits;
* expert FFN for ``n`` tokens = gate_up GEMM + SwiGLU kernel + down GEMM (weights read once);
* combine = one kernel that reads each token's ``top_k`` expert outputs and writes the sum.

How the routed experts are launched is the serving engine's choice (``hw.moe_kernels``):
``per_expert`` (default) launches each active expert's three kernels on its own, as a PyTorch loop
over experts and the offloading engines do (and as the real executor does); ``fused`` runs a layer's
experts as grouped GEMMs, as vLLM's ``fused_moe`` Triton kernel does (``moe_align_block_size``,
``fused_moe`` for w13, the activation, ``fused_moe`` for w2): an expert's ops then carry no launch of
their own and the layer pays ``FUSED_MOE_KERNELS`` launches once, booked with its combine (vLLM's
``moe_sum``). The bytes and FLOPs are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from workloads.model import Gemm, ModelSpec
from workloads.registry import Registry
from workloads.validation import require

from .devices import CpuSpec, GpuSpec, LinkSpec

MoeKernels = Literal["per_expert", "fused"]
MOE_KERNEL_CHOICES = ("per_expert", "fused")
FUSED_MOE_KERNELS = 4   # vLLM fused_moe per layer: moe_align_block_size, w13 GEMM, activation, w2 GEMM


def check_moe_kernels(value: str, key: str = "hw.moe_kernels") -> None:
    """A one-line ConfigError unless ``value`` is one of ``MOE_KERNEL_CHOICES``."""
    require(value in MOE_KERNEL_CHOICES, key, value, f"must be one of {', '.join(MOE_KERNEL_CHOICES)}")


@dataclass(frozen=True)
class BatchShape:
    """What one forward pass carries through a layer.

    tokens: query tokens in the pass (all prompt tokens in prefill, one per request in decode).
    sequences: requests in the pass.
    attended_pairs: sum over query tokens of the keys each attends to (causal in prefill).
    kv_tokens: KV-cache entries read per layer (sum of the requests' context lengths).
    """

    tokens: int
    sequences: int
    attended_pairs: int
    kv_tokens: int


class CostModel(Protocol):
    """What the engine asks. All answers in seconds."""

    def attention_block_s(self, model: ModelSpec, batch: BatchShape) -> float: ...
    def router_s(self, model: ModelSpec, tokens: int) -> float: ...
    def expert_s(self, model: ModelSpec, tokens: int) -> float: ...
    def shared_experts_s(self, model: ModelSpec, tokens: int) -> float: ...
    def dense_ffn_s(self, model: ModelSpec, tokens: int) -> float: ...
    def combine_s(self, model: ModelSpec, tokens: int) -> float: ...
    def embed_s(self, model: ModelSpec, tokens: int) -> float: ...
    def lm_head_s(self, model: ModelSpec, sequences: int) -> float: ...
    def host_expert_s(self, model: ModelSpec, tokens: int) -> float: ...
    def copy_s(self, nbytes: float, link: LinkSpec) -> float: ...
    def rejection_sampling_s(self, model: ModelSpec, positions: int) -> float: ...


class Roofline:
    """Analytic cost model from a device spec's peaks and efficiency factors."""

    def __init__(self, gpu: GpuSpec, cpu: CpuSpec, moe_kernels: MoeKernels = "per_expert"):
        check_moe_kernels(moe_kernels)
        self.gpu = gpu
        self.cpu = cpu
        self.moe_kernels = moe_kernels
        fused = moe_kernels == "fused"
        self._expert_launch_s = 0.0 if fused else gpu.kernel_launch_s      # per kernel of one expert
        self._moe_layer_launch_s = FUSED_MOE_KERNELS * gpu.kernel_launch_s if fused else 0.0  # per MoE layer
        self._flops_per_s = gpu.peak_flops * gpu.flops_efficiency
        self._bytes_per_s = gpu.mem_bw_bps * gpu.mem_efficiency
        self._cpu_flops_per_s = cpu.peak_flops * cpu.flops_efficiency
        self._cpu_bytes_per_s = cpu.dram_bw_bps * cpu.mem_efficiency

    # -------------------------------------------------------------- kernels
    def kernel_s(self, flops: float, nbytes: float, launch_s: float | None = None) -> float:
        """One GPU kernel: the slower of its compute and its memory traffic, plus its launch
        (``gpu.kernel_launch_s`` unless ``launch_s`` says otherwise)."""
        launch = self.gpu.kernel_launch_s if launch_s is None else launch_s
        return max(flops / self._flops_per_s, nbytes / self._bytes_per_s) + launch

    def gemm_s(self, g: Gemm, act_bytes_per_elem: float, launch_s: float | None = None) -> float:
        nbytes = g.weight_bytes + (g.m * g.k + g.m * g.n) * act_bytes_per_elem
        return self.kernel_s(g.flops, nbytes, launch_s)

    def elementwise_s(self, nbytes: float, launch_s: float | None = None) -> float:
        """A memory-bound kernel moving ``nbytes`` (reads + writes)."""
        return self.kernel_s(0.0, nbytes, launch_s)

    # -------------------------------------------------------------- operations
    def _gemms_s(self, model: ModelSpec, gemms: list[Gemm], launch_s: float | None = None) -> float:
        return sum(self.gemm_s(g, model.act_bytes_per_elem, launch_s) for g in gemms)

    def attention_block_s(self, model: ModelSpec, batch: BatchShape) -> float:
        act = model.act_bytes_per_elem
        norm = self.elementwise_s(2 * batch.tokens * model.hidden_size * act)
        proj = self._gemms_s(model, model.attention_gemms(batch.tokens))
        core_flops = model.attention_core_flops(1, batch.attended_pairs)
        q_out_bytes = batch.tokens * model.num_attention_heads * (model.q_head_dim + model.v_dim) * act
        core_bytes = batch.kv_tokens * model.kv_bytes_per_token_per_layer + q_out_bytes
        return 2 * norm + proj + self.kernel_s(core_flops, core_bytes)

    def router_s(self, model: ModelSpec, tokens: int) -> float:
        topk = self.elementwise_s(tokens * model.num_experts * 4.0)  # fp32 logits
        return self.gemm_s(model.router_gemm(tokens), model.act_bytes_per_elem) + topk

    def _ffn_s(self, model: ModelSpec, gemms: list[Gemm], tokens: int, intermediate: int,
               launch_s: float | None = None) -> float:
        swiglu = self.elementwise_s(3 * tokens * intermediate * model.act_bytes_per_elem, launch_s)
        return self._gemms_s(model, gemms, launch_s) + swiglu

    def expert_s(self, model: ModelSpec, tokens: int) -> float:
        """One routed expert for ``tokens`` tokens; with ``moe_kernels=fused`` without launches
        (the layer's fused kernels are launched once, in ``combine_s``)."""
        return self._ffn_s(model, model.expert_gemms(tokens), tokens, model.expert_intermediate_size,
                           self._expert_launch_s)

    def shared_experts_s(self, model: ModelSpec, tokens: int) -> float:
        if not model.num_shared_experts:
            return 0.0
        return self._ffn_s(model, model.shared_expert_gemms(tokens), tokens, model.shared_intermediate_total)

    def dense_ffn_s(self, model: ModelSpec, tokens: int) -> float:
        return self._ffn_s(model, model.dense_ffn_gemms(tokens), tokens, model.dense_intermediate_size)

    def combine_s(self, model: ModelSpec, tokens: int) -> float:
        """The weighted sum of each token's expert outputs; with ``moe_kernels=fused`` also the
        launches of the layer's fused expert kernels."""
        nbytes = (model.top_k + 1) * tokens * model.hidden_size * model.act_bytes_per_elem
        return self.elementwise_s(nbytes) + self._moe_layer_launch_s

    def embed_s(self, model: ModelSpec, tokens: int) -> float:
        return self.elementwise_s(2 * tokens * model.hidden_size * model.act_bytes_per_elem)

    def lm_head_s(self, model: ModelSpec, sequences: int) -> float:
        final_norm = self.elementwise_s(2 * sequences * model.hidden_size * model.act_bytes_per_elem)
        return final_norm + self.gemm_s(model.lm_head_gemm(sequences), model.act_bytes_per_elem)

    def host_expert_s(self, model: ModelSpec, tokens: int) -> float:
        """One routed expert run on the host CPU for ``tokens`` tokens (weights read from DRAM)."""
        flops = sum(g.flops for g in model.expert_gemms(tokens))
        nbytes = model.expert_bytes + 2 * tokens * model.hidden_size * model.act_bytes_per_elem
        t = max(flops / self._cpu_flops_per_s, nbytes / self._cpu_bytes_per_s)
        return t + 3 * self.cpu.op_overhead_s

    def rejection_sampling_s(self, model: ModelSpec, positions: int) -> float:
        """Speculative decoding's rejection sampling over ``positions`` verified positions: softmax
        of the target's logits, then one pass reading the target's and the drafter's
        probabilities and writing the residual distribution (fp32, vocabulary wide): two
        memory-bound kernels."""
        row_bytes = positions * model.vocab_size * 4.0
        return self.elementwise_s(2 * row_bytes) + self.elementwise_s(3 * row_bytes)

    def copy_s(self, nbytes: float, link: LinkSpec) -> float:
        return link.transfer_s(nbytes)


def _load_builtin_cost_models() -> None:
    from . import table  # noqa: F401  (registers "table")


COST_MODELS = Registry("hw.cost_model", "cost model", set_name=False, loader=_load_builtin_cost_models)
"""Cost models by name (``hw.cost_model``): ``(hw: SystemSpec, model: ModelSpec) -> CostModel``."""


@COST_MODELS.register("roofline")
def _roofline(hw, model: ModelSpec) -> Roofline:
    return Roofline(hw.gpu, hw.cpu, getattr(hw, "moe_kernels", "per_expert"))


def cost_model_for(hw, model: ModelSpec) -> CostModel:
    """The cost model a ``SystemSpec`` names (``hw.cost_model``, the ``COST_MODELS`` registry) for
    one GPU running ``model``; ``hw.parallel.cost_for_system`` adds tensor parallelism."""
    return COST_MODELS.get(getattr(hw, "cost_model", "roofline"))(hw, model)
