"""Speculative decoding's mechanism, as the engine runs it (policies decide K: ``sim/policies/speculation.py``).

A round, for a decode pass of B requests with K drafts asked for:

1. **Draft.** Request ``r`` drafts ``k_r = min(K, tokens it still has to generate - 1)`` tokens (a
   request never drafts past its end). The drafter runs ``max k_r`` sequential passes; pass ``j``
   carries the requests with ``k_r > j``, each attending to its context so far. Drafters:
   ``model`` (a small model of its own, e.g. Qwen2-0.5B, whole on the target's GPU: its weights
   and KV cache come off the expert budget), ``eagle`` (an EAGLE head: one decoder layer at the
   target's hidden size plus the target's LM head), ``ngram`` (prompt lookup on the host: a
   fixed ``ngram_lookup_s`` per round, no GPU time) and ``self`` (SpecMoE: the target drafts
   through its own non-expert layers and the experts resident on the GPU; a draft token routed to
   a non-resident expert is remapped to a resident one -- SpecMoE picks the nearest by weight
   distance; the simulator needs only that it is resident, which makes the pass cost the same --
   so drafting moves no weights. A draft pass is timed as the target's forward pass with each
   layer's distinct experts capped at the experts resident per layer; it shares the target's KV
   cache, so there is no draft prefill and no extra memory. SpecMoE refreshes the draft set with
   the hottest experts of each verify pass; with offloading, the expert cache after a verify pass
   holds what that pass used (LRU), which is that refresh). Model and EAGLE drafters also prefill each
   prompt. At K=0 with ``draft_keeps_running`` the drafter still runs one pass so its KV cache
   stays current (Cascade measures this at 2-3%).
2. **Verify.** One target pass carries ``k_r + 1`` positions per request (the last committed token
   and the drafts), so its MoE layers see the union of experts over ``sum(k_r + 1)`` tokens; every
   missing expert is fetched once for the whole round. MoESD writes this pass as ``T_T(B, gamma)``;
   moesim runs the ``gamma + 1`` positions a real engine (vLLM) verifies. The LM head runs on every
   position.
3. **Rejection sampling** on the target's and the drafter's probabilities:
   ``cost.rejection_sampling_s(model, sum(k_r + 1))``.
4. **Commit and roll back.** ``a_r`` drafts are accepted (``workloads/acceptance.py``), ``a_r + 1``
   tokens are committed, and the KV entries of the rejected positions are dropped: the next
   round's context is the committed one.

Routing of the verify pass: position ``pos + j`` of request ``r`` (``j = 0..k_r``) routes as the
trace's token at that position when ``j <= a_r`` (the accepted drafts *are* the trace's next
tokens). A rejected position (``j > a_r``) routes by ``rejected_routing``: ``trace`` (the same row:
a wrong token that routes like the right one, the optimistic bound) or ``random`` (top-k uniform
at random, seeded: a wrong token routes anywhere, the pessimistic bound).

Approximation: when a request accepted all ``k_r`` drafts, a real drafter also feeds its last
draft in the next round's first pass; moesim does not charge that one extra token.

Each pass of a draft *model* (``drafter=model``: the draft prefill, every round pass, the K=0
keep-alive pass) also costs ``overheads_of(cost).draft_pass_overhead_s(draft)`` (``hw.overheads``): what a drafter pass costs
beyond its ops (``Table``: measured by ``moesim-profile`` from real speculation runs -- the draft
runs with the caches the target's verify pass left, plus the executor's host work per draft pass;
``Roofline``: 0). The measured value is a signed residual (negative where the draft runs faster in
the executor than its tables say; on a busy machine, of any size), so the pass's total is floored
at its layers' attention blocks: a pass that does work never costs nothing.
The other drafters do not get it: ``ngram`` runs no passes (a fixed ``ngram_lookup_s``); ``self``
drafts through the target's own layers, whose tables were calibrated running the target; an
``eagle`` head has no tables or calibration of its own (the real executor does not run one), so
there is nothing measured to charge. ``sim.pass_overhead_s`` (the serving engine's host time per
pass) is separate and added to every drafter pass as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from hw.cost import BatchShape, CostModel
from hw.overheads import overheads_of
from workloads.model import ModelSpec, expected_active_experts

from workloads.registry import Registry

from .policies.speculation import SpeculationConfig


def eagle_head_spec(target: ModelSpec, intermediate_size: Optional[int] = None) -> ModelSpec:
    """An EAGLE head for ``target``: one dense decoder layer at the target's hidden size, attention
    shaped as the target's, FFN of ``intermediate_size`` (default: the target's widest FFN, e.g.
    14336 for Mixtral-8x7B as in EAGLE's released Mixtral head), sharing the target's LM head.
    EAGLE's input projection (2H -> H) is counted as a third of an FFN of width H (3·H·H params
    would be a SwiGLU of width H; it is 2·H·H), added to the FFN width."""
    width = intermediate_size or max(target.expert_intermediate_size, target.dense_intermediate_size,
                                     target.shared_intermediate_total)
    fc_as_ffn = -(-2 * target.hidden_size // 3)
    return ModelSpec(
        name=f"{target.name}-eagle", hidden_size=target.hidden_size, num_layers=1, num_experts=0, top_k=0,
        expert_intermediate_size=0, num_attention_heads=target.num_attention_heads,
        num_kv_heads=target.num_kv_heads, head_dim=target.head_dim, vocab_size=target.vocab_size,
        dense_layers=(0,), dense_intermediate_size=width + fc_as_ffn,
        weight_bytes_per_param=target.weight_bytes_per_param, kv_bytes_per_elem=target.kv_bytes_per_elem,
        act_bytes_per_elem=target.act_bytes_per_elem, tie_word_embeddings=True)


def resident_forward_s(cost: CostModel, spec: ModelSpec, shape: BatchShape, lm_positions: int,
                       max_experts_per_layer: Optional[int] = None) -> float:
    """One forward pass of a model whose weights are all on the GPU (a draft model): embed, each
    layer (attention; dense FFN, or router + the expected distinct experts under uniform routing
    with their expected tokens + shared experts + combine), LM head over ``lm_positions``.
    ``max_experts_per_layer``: at most this many distinct experts per layer (SpecMoE's drafting
    through the resident experts)."""
    T = shape.tokens
    attn = cost.attention_block_s(spec, shape)
    dense = cost.dense_ffn_s(spec, T) if spec.dense_layers else 0.0
    moe = 0.0
    if spec.num_moe_layers:
        n = expected_active_experts(T, spec.num_experts, spec.top_k)
        if max_experts_per_layer is not None:
            n = min(n, float(max_experts_per_layer))
        per_expert = max(1, round(T * spec.top_k / n)) if n > 0 else 0
        moe = (cost.router_s(spec, T) + n * cost.expert_s(spec, per_expert) + cost.shared_experts_s(spec, T)
               + cost.combine_s(spec, T))
    return (cost.embed_s(spec, T) + spec.num_layers * attn + len(spec.dense_layers) * dense
            + spec.num_moe_layers * moe + cost.lm_head_s(spec, lm_positions))


def decode_shape(contexts: list[int]) -> BatchShape:
    """A pass feeding one token per request, request ``i`` attending to ``contexts[i]`` keys."""
    total = int(sum(contexts))
    return BatchShape(tokens=len(contexts), sequences=len(contexts), attended_pairs=total, kv_tokens=total)


def verify_shape(positions: list[int], drafts: list[int]) -> BatchShape:
    """The verify pass: request ``i`` feeds positions ``positions[i] .. positions[i] + drafts[i]``
    (each attends causally to everything before it and itself)."""
    tokens = sum(k + 1 for k in drafts)
    pairs = sum((k + 1) * (p + 1) + k * (k + 1) // 2 for p, k in zip(positions, drafts))
    kv = sum(p + k + 1 for p, k in zip(positions, drafts))
    return BatchShape(tokens=tokens, sequences=len(drafts), attended_pairs=pairs, kv_tokens=kv)


DRAFTERS = Registry("policy.speculation.drafter", "drafter", set_name=False)
"""Drafters by name: ``(config, target, draft_model) -> ModelSpec`` of what the drafter runs, or
None for a drafter that runs no passes (the module docstring says what each one is)."""


@DRAFTERS.register("model")
def _draft_model(config: SpeculationConfig, target: ModelSpec, draft_model: Optional[ModelSpec]):
    return draft_model


@DRAFTERS.register("eagle")
def _eagle_head(config: SpeculationConfig, target: ModelSpec, draft_model: Optional[ModelSpec]):
    return eagle_head_spec(target, config.eagle_intermediate_size)


@DRAFTERS.register("self")
def _self_draft(config: SpeculationConfig, target: ModelSpec, draft_model: Optional[ModelSpec]):
    return target


@DRAFTERS.register("ngram")
def _ngram(config: SpeculationConfig, target: ModelSpec, draft_model: Optional[ModelSpec]):
    return None


@dataclass
class Drafter:
    """Times the draft side of a round on a cost model (module docstring)."""

    config: SpeculationConfig
    spec: Optional[ModelSpec]          # the draft model or EAGLE head; None for ngram
    cost: CostModel
    pass_overhead_s: float = 0.0       # the serving engine's host time per drafter pass (sim.pass_overhead_s)
    resident_experts_per_layer: Optional[int] = None   # drafter=self: experts it can draft through

    @classmethod
    def build(cls, config: SpeculationConfig, target: ModelSpec, draft_model: Optional[ModelSpec],
              cost: CostModel, pass_overhead_s: float = 0.0) -> "Drafter":
        """The drafter ``config.drafter`` names (``DRAFTERS``: what it runs as a model spec)."""
        spec = DRAFTERS.get(config.drafter)(config, target, draft_model)
        return cls(config, spec, cost, pass_overhead_s)

    @property
    def resident_bytes(self) -> float:
        """GPU memory the drafter's weights take (the EAGLE head shares the target's embeddings and
        LM head, so only its layer counts)."""
        if self.spec is None or self.config.drafter == "self":
            return 0.0
        if self.config.drafter == "eagle":
            s = self.spec
            return s.non_expert_bytes - s.vocab_size * s.hidden_size * s.weight_bytes_per_param
        return self.spec.total_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.spec.kv_bytes_per_token if self.spec is not None and self.config.drafter != "self" else 0.0

    def _pass_s(self, shape: BatchShape, lm_positions: int) -> float:
        """One drafter pass on the device: its ops, plus (``drafter=model``) the cost model's
        ``draft_pass_overhead_s``, the total floored at the pass's attention blocks (module
        docstring; ``Table`` floors each block at a measured positive time)."""
        ops = resident_forward_s(self.cost, self.spec, shape, lm_positions,
                                 self.resident_experts_per_layer if self.config.drafter == "self" else None)
        if self.config.drafter != "model":
            return ops
        floor = self.spec.num_layers * self.cost.attention_block_s(self.spec, shape)
        return max(floor, ops + overheads_of(self.cost).draft_pass_overhead_s(self.spec))

    def round_passes(self, drafts: list[int], k: int) -> int:
        """Drafter passes one round runs (``round_s``): ``max drafts``; with every draft zero, one
        keep-alive pass if ``k == 0`` and ``draft_keeps_running``, else none. ``ngram``: 0."""
        if self.spec is None:
            return 0
        kmax = max(drafts, default=0)
        if kmax == 0:
            return 1 if k == 0 and self.config.draft_keeps_running else 0
        return kmax

    def prefill_s(self, prompt_lens: list[int]) -> float:
        if self.spec is None or self.config.drafter == "self":   # self: the target's prefill is the drafter's
            return 0.0
        tokens = int(sum(prompt_lens))
        pairs = sum(n * (n + 1) // 2 for n in prompt_lens)
        shape = BatchShape(tokens=tokens, sequences=len(prompt_lens), attended_pairs=pairs, kv_tokens=tokens)
        return self._pass_s(shape, len(prompt_lens)) + self.pass_overhead_s

    def round_s(self, positions: list[int], drafts: list[int], k: int) -> float:
        """Draft time of one round: request ``i`` at next position ``positions[i]`` drafts
        ``drafts[i]`` tokens; ``k``: what the policy asked for (K=0: one keep-alive pass if
        ``draft_keeps_running``; drafts all zero because every request is at its end: nothing)."""
        keep_alive = k == 0 and self.config.draft_keeps_running
        if self.spec is None:
            return self.config.ngram_lookup_s if any(drafts) or keep_alive else 0.0
        kmax = max(drafts, default=0)
        if kmax == 0:
            if not keep_alive:
                return 0.0
            return self._pass_s(decode_shape([p + 1 for p in positions]), len(positions)) + self.pass_overhead_s
        total = 0.0
        for j in range(kmax):
            ctx = [p + j + 1 for p, k in zip(positions, drafts) if k > j]
            total += self._pass_s(decode_shape(ctx), len(ctx)) + self.pass_overhead_s
        return total


class RejectedRouting:
    """Per-request generators for ``rejected_routing=random``, seeded by ``(seed, request_id)`` so
    both engines draw the same rows whatever shares the batch."""

    def __init__(self, seed: int):
        self.seed = seed
        self._rngs: dict[int, np.random.Generator] = {}

    def rng(self, request_id: int) -> np.random.Generator:
        rng = self._rngs.get(request_id)
        if rng is None:
            rng = self._rngs[request_id] = np.random.default_rng([self.seed, int(request_id), 0x4E1EC7])
        return rng

    def forget(self, request_id: int) -> None:
        self._rngs.pop(request_id, None)

    def rows(self, experts: np.ndarray, pos: int, drafts: int, accepted: int, rejected_routing: str,
             num_experts: int, request_id: int) -> np.ndarray:
        """``verify_rows`` with this request's generator."""
        rng = self.rng(request_id) if rejected_routing == "random" else None
        return verify_rows(experts, pos, drafts, accepted, rejected_routing, num_experts, rng)


def verify_rows(experts: np.ndarray, pos: int, drafts: int, accepted: int, rejected_routing: str,
                num_experts: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Routing rows ``[drafts + 1, moe_layers, top_k]`` of one request's verify positions
    (module docstring: accepted positions from the trace, rejected ones by ``rejected_routing``)."""
    rows = np.array(experts[pos: pos + drafts + 1])
    if rejected_routing == "random" and accepted < drafts:
        n_rej, M, K = drafts - accepted, rows.shape[1], rows.shape[2]
        keys = rng.random((n_rej, M, num_experts))
        rows[accepted + 1:] = np.argsort(keys, axis=-1)[..., :K]
    return rows


@dataclass
class Round:
    """One speculation round's plan: K asked for, drafts and accepted drafts per request (in the
    pass's request order)."""

    k: int
    drafts: list[int]
    accepted: list[int]

    def committed(self, request_ids: list[int]) -> dict[int, int]:
        """Tokens each request commits (accepted drafts + one), for ``BatchScheduler.complete``."""
        return {rid: a + 1 for rid, a in zip(request_ids, self.accepted)}


def plan_round(policy, sampler, batch: list, step: int, max_k: int) -> Round:
    """Both engines' round planning: K from the speculation ``policy``, each request's drafts
    (``min(K, tokens left - 1)``: never past its end) and accepted drafts from the acceptance
    ``sampler`` (``workloads.acceptance.AcceptanceSampler``). ``batch``: the pass's
    ``RunningRequest``s."""
    k = int(policy.choose_k(step, len(batch)))
    if not 0 <= k <= max_k:
        raise ValueError(f"speculation policy chose k={k}; allowed 0..{max_k}")
    drafts = [min(k, r.req.output_len - r.generated - 1) for r in batch]
    accepted = [sampler.accepted(r.req.request_id, d) for r, d in zip(batch, drafts)]
    return Round(k, drafts, accepted)


def spec_columns(batch_size: int, rnd: Optional[Round], draft_s: float, reject_s: float) -> dict:
    """The speculation columns of a step record (``sim.metrics``); a pass without speculation
    commits one token per request."""
    if rnd is None:
        return {"spec_k": 0, "drafting_requests": 0, "draft_tokens": 0, "accepted_tokens": 0,
                "committed_tokens": batch_size, "draft_s": draft_s, "reject_s": reject_s}
    return {"spec_k": rnd.k, "drafting_requests": sum(1 for d in rnd.drafts if d > 0),
            "draft_tokens": sum(rnd.drafts), "accepted_tokens": sum(rnd.accepted),
            "committed_tokens": sum(rnd.accepted) + batch_size, "draft_s": draft_s, "reject_s": reject_s}


def without_speculation(config: SpeculationConfig) -> SpeculationConfig:
    """The same config with speculation off (the baseline a speedup is measured against)."""
    return replace(config, name="none")
