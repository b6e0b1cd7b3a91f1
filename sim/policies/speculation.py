"""Speculative-decoding policies (``policy/speculation=NAME``): how many tokens to draft per round.

| name | what it decides |
|---|---|
| ``none`` | no speculation: one token per request per decode pass |
| ``static`` | a fixed ``k`` drafts per request per round |
| ``cascade`` | Cascade (arXiv 2506.20675, REFERENCE.md section 2): K chosen by measured utility, with test and set phases and back-off |
| ``specmoe`` | SpecMoE (REFERENCE.md section 3): self-assisted drafting through the target's GPU-resident experts, fixed ``k`` |

The engine owns drafting, verification, rejection sampling and the KV rollback (``sim/engine.py``);
a policy is pure decision logic like the prefetch policies (``sim/policies/base.py``):

    reset(ctx)
    for each decode pass:
        k = choose_k(step, batch_size)        # 0 = an ordinary decode pass
        ... the engine drafts k, verifies k + 1 positions per request, commits the accepted ones ...
        on_round_end(RoundResult(...))

Utility (Cascade): ``U(K) = ETR(K) / (t_iter(K) / t_iter(0))``, ETR = tokens committed per request
per iteration. ``t_iter(0)`` is what the policy itself measured on its K=0 iterations (it runs one
at the start and one about every ``baseline_refresh_iterations``), as Cascade does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from workloads.acceptance import AcceptanceConfig, alpha_from_sigma
from workloads.model import ModelSpec
from workloads.validation import require

from workloads.registry import Registry


@dataclass(frozen=True)
class SpeculationConfig(AcceptanceConfig):
    """The ``policy.speculation`` node (README "Speculative decoding" documents every key)."""

    name: str = "none"
    k: int = 4                      # drafts per request per round (static); cascade: the largest K
    # acceptance=iid: MoESD's sigma at this k instead of alpha (alpha is solved from it); null = use alpha
    sigma: Optional[float] = None
    drafter: Literal["model", "eagle", "ngram", "self"] = "model"   # self: SpecMoE (policy/speculation=specmoe)
    draft_model: Optional[str] = None      # drafter=model: a conf/model name (e.g. qwen2_0_5b, opt_350m)
    # drafter=eagle: width of the EAGLE head's FFN (one decoder layer of the target's hidden size on
    # top of the target's features, sharing its LM head); null = the target's largest FFN width.
    eagle_intermediate_size: Optional[int] = None
    ngram_lookup_s: float = 20e-6          # drafter=ngram: host time per round (prompt lookup)
    # How draft positions the target rejects are routed in the verify pass: ``trace`` (as the
    # trace's token at that position, i.e. the draft was wrong but routes like the right token) or
    # ``random`` (top-k uniformly at random: a wrong token routes anywhere).
    rejected_routing: Literal["trace", "random"] = "trace"
    draft_keeps_running: bool = True       # at K=0 the drafter still runs one pass to keep its KV cache
    # cascade
    test_iterations: int = 4               # iterations each candidate K runs in the test phase
    max_candidates: int = 4                # candidates per test phase
    set_iterations: int = 16               # iterations the chosen K runs (doubled per back-off to 0)
    converge_tolerance: float = 0.10       # stop testing when successive utilities are this close
    baseline_refresh_iterations: int = 100  # re-measure t_iter(0) this often

    @property
    def iid_alpha(self) -> float:
        if self.sigma is None:
            return self.alpha
        return alpha_from_sigma(self.sigma, self.k)

    def validate(self, key: str = "policy.speculation") -> None:
        super().validate(key)
        speculation_policy_class(self.name)   # a one-line error naming the known policies
        if self.name == "none":
            return
        require(1 <= self.k <= 64, f"{key}.k", self.k, "must be between 1 and 64")
        if self.sigma is not None:
            require(self.acceptance == "iid", f"{key}.sigma", self.sigma, "applies to acceptance=iid only")
            require(1.0 / (self.k + 1) <= self.sigma <= 1.0, f"{key}.sigma", self.sigma,
                    f"must be in [1/(k+1), 1] = [{1.0 / (self.k + 1):.4f}, 1] for k={self.k}")
            require(self.alpha is None, f"{key}.sigma", self.sigma,
                    f"replaces alpha (alpha is solved from sigma at k), but {key}.alpha={self.alpha} is set "
                    f"too; give one: add {key}.alpha=null, or drop sigma")
        elif self.acceptance == "iid":
            require(self.alpha is not None, f"{key}.alpha", None, "acceptance=iid needs alpha (or sigma)")
        if self.name == "specmoe" or self.drafter == "self":
            require(self.name == "specmoe" and self.drafter == "self", f"{key}.drafter", self.drafter,
                    "drafter=self is SpecMoE's drafting and policy/speculation=specmoe drafts only with it")
        if self.drafter == "model":
            require(bool(self.draft_model), f"{key}.draft_model", self.draft_model,
                    "drafter=model needs a draft model name from conf/model (e.g. qwen2_0_5b, opt_350m)")
        if self.eagle_intermediate_size is not None:
            require(self.eagle_intermediate_size > 0, f"{key}.eagle_intermediate_size",
                    self.eagle_intermediate_size, "must be > 0 (or null)")
        require(self.ngram_lookup_s >= 0, f"{key}.ngram_lookup_s", self.ngram_lookup_s, "must be >= 0")
        for f in ("test_iterations", "max_candidates", "set_iterations", "baseline_refresh_iterations"):
            require(getattr(self, f) >= 1, f"{key}.{f}", getattr(self, f), "must be >= 1")
        require(0 < self.converge_tolerance < 1, f"{key}.converge_tolerance", self.converge_tolerance,
                "must be in (0, 1)")


@dataclass(frozen=True)
class SpecContext:
    """What a speculation policy knows before the run."""

    model: ModelSpec
    max_k: int
    seed: int = 0


@dataclass(frozen=True)
class RoundResult:
    """One decode iteration as the engine ran it.

    k: drafts per request asked for (0 = plain decode); requests: requests in the pass;
    committed_tokens: tokens committed over all requests (accepted drafts + one each);
    duration_s: the whole iteration (drafting, verification, rejection sampling).
    """

    step: int
    k: int
    requests: int
    committed_tokens: int
    duration_s: float

    @property
    def tokens_per_request(self) -> float:
        return self.committed_tokens / self.requests if self.requests else 0.0


class SpeculationPolicy:
    """Base class: never speculates. Subclasses override ``choose_k`` / ``on_round_end``."""

    name = "base"
    Config = SpeculationConfig

    def __init__(self, config: SpeculationConfig):
        self.config = config
        self.ctx: Optional[SpecContext] = None

    def reset(self, ctx: SpecContext) -> None:
        self.ctx = ctx

    def choose_k(self, step: int, batch_size: int) -> int:
        return 0

    def on_round_end(self, result: RoundResult) -> None:
        pass

    def report(self) -> dict:
        """Policy-specific figures for summary.json (keys start with ``policy_``)."""
        return {}


SPECULATION_POLICIES = Registry("policy.speculation.name", "speculation policy")


def register_speculation(name: str):
    """Class decorator: make a speculation policy selectable as ``policy/speculation=NAME``."""
    return SPECULATION_POLICIES.register(name)


def speculation_policy_class(name: str) -> type[SpeculationPolicy]:
    return SPECULATION_POLICIES.get(name)


@register_speculation("none")
class NoSpeculation(SpeculationPolicy):
    """One token per request per decode pass."""


@register_speculation("static")
class Static(SpeculationPolicy):
    """A fixed K (``policy.speculation.k``) every round."""

    def choose_k(self, step: int, batch_size: int) -> int:
        return self.config.k


@register_speculation("specmoe")
class SpecMoE(Static):
    """SpecMoE (REFERENCE.md section 3): a fixed K drafted by the target itself through its
    GPU-resident experts (``drafter=self``; the engine's ``Drafter`` times it), verified like any
    round, which fetches each missing expert once."""


@register_speculation("cascade")
class Cascade(SpeculationPolicy):
    """Utility-driven K (module docstring; REFERENCE.md section 2).

    Phases: ``baseline`` (one K=0 iteration measures ``t_iter(0)``), ``test`` (candidates, each
    ``test_iterations`` iterations, the first being the best non-zero K so far; K=1 with U<1 goes
    straight to K=0; otherwise hill-climb on the sign of the utility change, stopping when successive
    utilities are within ``converge_tolerance``, once a maximum is passed, when K would leave
    ``1..k`` or after ``max_candidates``), ``set`` (the best K for ``set_iterations``, doubled for
    each consecutive choice of K=0: back-off), then test again. ``t_iter(0)`` is re-measured every
    ``baseline_refresh_iterations`` iterations.
    """

    def reset(self, ctx: SpecContext) -> None:
        super().reset(ctx)
        self.phase = "baseline"
        self.t0_s: Optional[float] = None
        self.since_baseline = 0
        self.best_k = 1                  # best non-zero K so far
        self.backoff = 1                 # set length multiplier (doubles per move to K=0)
        self._tested: list[tuple[int, float]] = []   # (k, utility) this test phase, in order
        self._k = 0
        self._samples: list[float] = []
        self._set_left = 0
        self._direction = 1
        self.k_history: list[int] = []
        self.utilities: list[float] = []

    def choose_k(self, step: int, batch_size: int) -> int:
        if self.phase != "baseline" and self.since_baseline >= self.config.baseline_refresh_iterations \
                and not self._samples:
            self.phase, self._resume = "baseline", self.phase
        k = 0 if self.phase == "baseline" else self._k
        self.k_history.append(k)
        return k

    def _start_test(self) -> None:
        self.phase = "test"
        self._tested = []
        self._k = min(self.best_k, self.config.k)
        self._direction = 1
        self._samples = []

    def _finish_test(self) -> None:
        k, u = max(self._tested, key=lambda t: (t[1], -t[0]))
        if u < 1.0:
            k = 0
        self.phase = "set"
        self._k = k
        if k == 0:
            self._set_left = self.config.set_iterations * self.backoff
            self.backoff *= 2
        else:
            self.best_k = k
            self.backoff = 1
            self._set_left = self.config.set_iterations

    def on_round_end(self, r: RoundResult) -> None:
        cfg = self.config
        self.since_baseline += 1
        if self.phase == "baseline":
            self.t0_s = r.duration_s
            self.since_baseline = 0
            resume = getattr(self, "_resume", None)
            self._resume = None
            if resume == "set" and self._set_left > 0:
                self.phase = "set"
            else:
                self._start_test()
            return
        u = r.tokens_per_request / (r.duration_s / self.t0_s) if self.t0_s and r.duration_s > 0 else 0.0
        self.utilities.append(u)
        if self.phase == "set":
            self._set_left -= 1
            if self._set_left <= 0:
                self._start_test()
            return
        self._samples.append(u)
        if len(self._samples) < cfg.test_iterations:
            return
        utility = sum(self._samples) / len(self._samples)
        self._samples = []
        k = self._k
        self._tested.append((k, utility))
        if k == 1 and utility < 1.0:
            self._finish_test()
            return
        if len(self._tested) == 1:
            self._direction = 1 if utility >= 1.0 else -1
        else:
            prev_u = self._tested[-2][1]
            if utility < prev_u:               # passed a maximum
                self._finish_test()
                return
            if abs(utility - prev_u) <= cfg.converge_tolerance * max(prev_u, 1e-12):
                self._finish_test()
                return
        nxt = k + self._direction
        if nxt < 1 or nxt > cfg.k or len(self._tested) >= cfg.max_candidates:
            self._finish_test()
            return
        self._k = nxt

    def report(self) -> dict:
        ks = self.k_history
        return {"policy_mean_k": sum(ks) / len(ks) if ks else None,
                "policy_k_zero_share": sum(1 for k in ks if k == 0) / len(ks) if ks else None}
