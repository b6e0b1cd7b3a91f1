"""Tensor parallelism: a cost model for a model split across ``p`` GPUs, Megatron style, as vLLM runs
it with ``--tensor-parallel-size p`` (MoESD's Qwen2-57B-A14B on 2xH800, REFERENCE.md section 1).

Every GPU holds ``ModelSpec.tensor_shard(p)`` (heads, KV heads, every expert's, the shared
experts' and the dense FFNs' intermediate dimension, and the vocabulary split ``p`` ways; router
and norms replicated) and runs the same ops on its shard at the same time, so an op takes what the
*inner* cost model says it takes on the shard. On top come the collectives vLLM issues:

* **all-reduce of the hidden states** (``tokens * H * act_bytes_per_elem`` bytes) after the
  attention block's row-parallel output projection, and after the FFN of each layer (the MoE
  block's output -- routed plus shared experts, one all-reduce, as vLLM's ``FusedMoE`` with
  ``reduce_results`` -- or the dense FFN's row-parallel down projection); also one after the
  vocab-parallel embedding lookup (each GPU holds ``V/p`` rows and contributes zeros for the rest).
* **gather of the logits** after the vocab-parallel LM head: each GPU has ``sequences * V/p``
  logits and the sampler needs all ``V`` (vLLM gathers them to the driver rank; an all-gather
  moves the same bytes into each receiver), ``sequences * V * act_bytes_per_elem`` bytes gathered.

Collectives are timed as NCCL's ring algorithms on the routes they take through the machine's
``hw.system.System`` (``hw.collectives``: ``ring_all_reduce`` = reduce-scatter then all-gather,
2(p-1) phases of n/p bytes to the ring neighbour; ``ring_all_gather`` p-1 phases; every phase's
transfers at once, sharing link bandwidth max-min fairly, ``hw.network``). On an NVSwitch node
(one port per GPU) or an NVLink mesh each phase's p transfers use disjoint links, so the time is
the closed form NCCL's own model gives:

    all-reduce(n bytes)  = 2 (p-1) * (latency + n/p / bandwidth)
    all-gather(n bytes)  =   (p-1) * (latency + n/p / bandwidth)     (n = the gathered total)

and on a fabric where the ring shares links (a PCIe switch tree) the sharing slows it down.
The group is the first ``p`` GPUs of node 0; times are cached per byte count.

Where the engine books them: it adds ``attention_block_s`` once per layer, ``combine_s`` once per
MoE layer and ``dense_ffn_s`` once per dense layer, so the attention all-reduce is inside
``attention_block_s`` and the FFN all-reduce inside ``combine_s`` (MoE layers) and
``dense_ffn_s`` (dense layers); ``embed_s`` and ``lm_head_s`` carry theirs. Exactly two
all-reduces per layer either way. ``all_reduce_s`` / ``all_gather_s`` are public for an engine that
wants to book communication separately.

A host-run expert (Fiddler) is timed on the *full* expert: one host CPU computes what all GPUs'
slices would, and its output joins the all-reduce. Rejection sampling (speculative decoding) runs
once, over the full vocabulary, after the logits gather; so does a draft model's per-pass overhead
(``draft_pass_overhead_s``: the drafter runs unsharded). Copies pass through unchanged (the bytes
an engine copies per GPU are the shard's ``expert_bytes``; every GPU copies its slice over its own
host link at the same time).

``cost_for_system(hw, model)`` is the cost model a ``SystemSpec`` asks for: ``hw.table``'s
``cost_model_for`` when ``hw.tensor_parallel == 1``, else that wrapped in ``TensorParallelCost``.
"""

from __future__ import annotations

from typing import Optional

from workloads.model import ModelSpec
from workloads.validation import ConfigError, require

from .collectives import collective_time_s, ring_all_gather, ring_all_reduce
from .cost import BatchShape, CostModel
from .devices import LinkSpec
from .system import System


class TensorParallelCost:
    """``CostModel`` of ``p``-way tensor parallelism around the cost model of one GPU (``inner``).

    Ask it about the *full* model, as about any cost model; it maps the model to its shard
    (``ModelSpec.tensor_shard(tp)``, cached per model) before asking ``inner``. A shard it made (or
    was told about with ``register``) is recognised and not split again, so a caller that holds the
    shard may pass that too.
    """

    def __init__(self, inner: CostModel, tp: int, system: Optional[System]):
        require(isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1, "hw.tensor_parallel", tp,
                "must be an integer >= 1")
        if tp > 1:
            require(system is not None and system.spec.gpu_link is not None, "hw.gpu_link", None,
                    f"hw.tensor_parallel={tp} needs a gpu_link for its all-reduces")
        self.inner = inner
        self.tp = tp
        self.system = system
        self.group = system.gpus_of_node(0)[:tp] if system is not None else []
        self._collective_s: dict[tuple[str, float], float] = {}
        self._shards: dict[ModelSpec, ModelSpec] = {}   # full model -> its shard
        self._full: dict[ModelSpec, ModelSpec] = {}     # shard -> the full model
        self._by_id: dict[int, tuple[ModelSpec, ModelSpec]] = {}  # id(asked) -> (asked, shard): no hashing per op

    # -------------------------------------------------------------- shards and collectives
    def register(self, model: ModelSpec, shard: ModelSpec) -> None:
        """Tell the cost model that ``shard`` is ``model``'s per-GPU shard (computed elsewhere)."""
        self._shards[model] = shard
        self._full[shard] = model

    def shard(self, model: ModelSpec) -> ModelSpec:
        """The part of ``model`` one GPU holds (``model`` itself if it is already a shard of ours)."""
        hit = self._by_id.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        if model in self._full:
            s = model
        else:
            s = self._shards.get(model)
            if s is None:
                s = model.tensor_shard(self.tp)
                self.register(model, s)
        self._by_id[id(model)] = (model, s)
        return s

    def full(self, model: ModelSpec) -> ModelSpec:
        """The whole model ``model`` is a shard of (``model`` itself if it is not a known shard)."""
        return self._full.get(model, model)

    def all_reduce_s(self, nbytes: float) -> float:
        """Ring all-reduce of ``nbytes`` (each GPU's buffer) among the ``tp`` GPUs (module docstring)."""
        return self._timed(ring_all_reduce, nbytes)

    def all_gather_s(self, nbytes: float) -> float:
        """Ring all-gather with a result of ``nbytes`` among the ``tp`` GPUs."""
        return self._timed(ring_all_gather, nbytes)

    def _timed(self, make, nbytes: float) -> float:
        if self.tp <= 1:
            return 0.0
        key = (make.__name__, nbytes)
        t = self._collective_s.get(key)
        if t is None:
            t = self._collective_s[key] = collective_time_s(self.system, make(self.group, nbytes))
        return t

    def hidden_all_reduce_s(self, model: ModelSpec, tokens: int) -> float:
        """The all-reduce of ``tokens`` hidden states (attention output, FFN output, embedding)."""
        if tokens <= 0:
            return 0.0
        return self.all_reduce_s(tokens * model.hidden_size * model.act_bytes_per_elem)

    def logits_gather_s(self, model: ModelSpec, sequences: int) -> float:
        """Gathering ``sequences`` rows of logits over the full (unsharded) vocabulary of ``model``."""
        if sequences <= 0:
            return 0.0
        return self.all_gather_s(sequences * self.full(model).vocab_size * model.act_bytes_per_elem)

    # -------------------------------------------------------------- CostModel
    def attention_block_s(self, model: ModelSpec, batch: BatchShape) -> float:
        return self.inner.attention_block_s(self.shard(model), batch) + self.hidden_all_reduce_s(model, batch.tokens)

    def router_s(self, model: ModelSpec, tokens: int) -> float:
        return self.inner.router_s(self.shard(model), tokens)

    def expert_s(self, model: ModelSpec, tokens: int) -> float:
        return self.inner.expert_s(self.shard(model), tokens)

    def shared_experts_s(self, model: ModelSpec, tokens: int) -> float:
        return self.inner.shared_experts_s(self.shard(model), tokens)

    def dense_ffn_s(self, model: ModelSpec, tokens: int) -> float:
        """The dense FFN on the shard plus its output all-reduce (a dense layer has no combine)."""
        return self.inner.dense_ffn_s(self.shard(model), tokens) + self.hidden_all_reduce_s(model, tokens)

    def combine_s(self, model: ModelSpec, tokens: int) -> float:
        """The combine on the shard plus the MoE block's output all-reduce."""
        return self.inner.combine_s(self.shard(model), tokens) + self.hidden_all_reduce_s(model, tokens)

    def embed_s(self, model: ModelSpec, tokens: int) -> float:
        return self.inner.embed_s(self.shard(model), tokens) + self.hidden_all_reduce_s(model, tokens)

    def lm_head_s(self, model: ModelSpec, sequences: int) -> float:
        return self.inner.lm_head_s(self.shard(model), sequences) + self.logits_gather_s(model, sequences)

    def host_expert_s(self, model: ModelSpec, tokens: int) -> float:
        return self.inner.host_expert_s(self.full(model), tokens)

    def rejection_sampling_s(self, model: ModelSpec, positions: int) -> float:
        return self.inner.rejection_sampling_s(self.full(model), positions)

    def copy_s(self, nbytes: float, link: LinkSpec) -> float:
        return self.inner.copy_s(nbytes, link)

    @property
    def overheads(self):
        """The inner cost model's executor overheads, asked about the shard (a GPU copies its slice
        of each expert) or, for the drafter (unsharded on one GPU), about the whole draft model."""
        from .overheads import overheads_of

        return _TensorParallelOverheads(overheads_of(self.inner), self)


class _TensorParallelOverheads:
    def __init__(self, inner, tp: TensorParallelCost):
        self.inner, self.tp = inner, tp

    def copy_overhead_s(self, model: ModelSpec) -> float:
        return self.inner.copy_overhead_s(self.tp.shard(model))

    def copy_launch_s(self, link: LinkSpec, engine_idle: bool) -> float:
        return self.inner.copy_launch_s(link, engine_idle)

    def copy_resume_s(self, link: LinkSpec) -> float:
        return self.inner.copy_resume_s(link)

    def copy_contention(self, model: ModelSpec, tokens: int, link: LinkSpec) -> float:
        return self.inner.copy_contention(self.tp.shard(model), tokens, link)

    def draft_pass_overhead_s(self, draft: ModelSpec) -> float:
        return self.inner.draft_pass_overhead_s(self.tp.full(draft))

    def policy_overhead_s(self, model: ModelSpec, policy: str) -> float:
        return self.inner.policy_overhead_s(self.tp.shard(model), policy)   # rank 0 decides


def cost_for_system(hw, model: ModelSpec) -> CostModel:
    """The cost model ``hw`` (a ``SystemSpec``) asks for, for ``model`` (the full model).

    ``hw.tensor_parallel == 1``: ``hw.cost.cost_model_for(hw, model)`` unchanged. Otherwise that
    cost model built for one GPU's shard (a ``Table`` must hold tables measured for the shard's
    shapes) wrapped in ``TensorParallelCost`` on ``hw.gpu_link``. A ``tensor_parallel`` that does
    not split the model (heads not divisible) is a one-line ConfigError.
    """
    from .cost import cost_model_for

    p = int(getattr(hw, "tensor_parallel", 1) or 1)
    if p == 1:
        return cost_model_for(hw, model)
    shard = model.tensor_shard(p, "hw.tensor_parallel")
    try:
        inner = cost_model_for(hw, shard)
    except ConfigError as exc:
        if getattr(hw, "cost_model", "roofline") != "table":
            raise
        raise ConfigError(f"hw.tensor_parallel={p} with hw.cost_model=table needs cost tables measured for one "
                          f"GPU's shard of model={model.name} (ModelSpec.tensor_shard({p})): {exc}") from None
    cost = TensorParallelCost(inner, p, System(hw))
    cost.register(model, shard)
    return cost
