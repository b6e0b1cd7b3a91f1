"""Speculative decoding's acceptance models: how many of a round's K draft tokens the target accepts.

One round per request: the drafter proposes ``k`` tokens, the target verifies them in one pass and
rejection sampling accepts a prefix of ``a`` of them (0 <= a <= k); the round commits ``a + 1``
tokens (the accepted drafts plus the target's own token at the first rejection, or its bonus token
after ``k`` accepted drafts).

Three models, chosen by ``policy.speculation.acceptance``:

* ``iid``: each draft position is accepted with probability ``alpha``, independently, until the
  first rejection. Expected committed tokens ``(1 - alpha^(k+1)) / (1 - alpha)`` (MoESD's
  ``sigma * (k+1)``, REFERENCE.md section 1). ``policy.speculation.sigma`` instead gives MoESD's
  sigma at ``k`` and alpha is solved from it (``alpha_from_sigma``).
* ``per_position``: position ``j`` (1-based) is accepted with probability ``position_alphas[j-1]``
  given that positions ``1..j-1`` were (EAGLE-style drafters are better on early positions). Past
  the list's end its last value holds.
* ``replay``: recorded accept lengths (``accept_lengths``, e.g. from a vLLM run's spec-decode
  metrics), consumed in order per request (request ``i`` starts at offset ``i`` of the list, so
  requests do not replay in lockstep) and cycled; a recorded length above this round's ``k`` is
  clipped to ``k``.

Randomness: every request draws from its own generator seeded by ``(seed, request_id)``, so a
request's acceptance does not depend on which requests share its batch, and runs are bit-for-bit
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional

import numpy as np

from .validation import require

_SALT = 0x5BEC


@dataclass(frozen=True)
class AcceptanceConfig:
    """The acceptance part of ``policy.speculation`` (see the module docstring)."""

    acceptance: Literal["iid", "per_position", "replay"] = "iid"
    alpha: Optional[float] = 0.8                       # iid: per-token acceptance rate (null: given another way)
    position_alphas: Optional[tuple[float, ...]] = None  # per_position: P(accept j | accepted 1..j-1)
    accept_lengths: Optional[tuple[int, ...]] = None   # replay: recorded accepted drafts per round

    def validate(self, key: str = "policy.speculation") -> None:
        if self.alpha is not None:
            require(0.0 <= self.alpha <= 1.0, f"{key}.alpha", self.alpha, "must be in [0, 1]")
        if self.acceptance == "per_position":
            require(bool(self.position_alphas), f"{key}.position_alphas", self.position_alphas,
                    "acceptance=per_position needs a non-empty list of probabilities in [0, 1]")
            for a in self.position_alphas:
                require(0.0 <= a <= 1.0, f"{key}.position_alphas", list(self.position_alphas),
                        "every probability must be in [0, 1]")
        if self.acceptance == "replay":
            require(bool(self.accept_lengths), f"{key}.accept_lengths", self.accept_lengths,
                    "acceptance=replay needs a non-empty list of recorded accept lengths (integers >= 0)")
            for n in self.accept_lengths:
                require(isinstance(n, int) and n >= 0, f"{key}.accept_lengths", list(self.accept_lengths),
                        "every recorded accept length must be an integer >= 0")

    def position_prob(self, j: int) -> float:
        """P(draft position ``j`` (1-based) accepted | positions before it accepted)."""
        if self.acceptance == "per_position":
            p = self.position_alphas
            return p[min(j, len(p)) - 1]
        return self.iid_alpha

    @property
    def iid_alpha(self) -> float:
        """The per-token acceptance rate of ``iid`` (subclasses may derive it, e.g. from MoESD's sigma)."""
        return self.alpha

    def expected_committed(self, k: int) -> float:
        """Expected tokens one round commits with ``k`` drafts (accepted + 1); replay: the mean of
        the recorded lengths clipped to ``k``, plus 1."""
        if self.acceptance == "replay":
            return float(np.mean(np.minimum(self.accept_lengths, k))) + 1.0
        total, survive = 1.0, 1.0
        for j in range(1, k + 1):
            survive *= self.position_prob(j)
            total += survive
        return total


@lru_cache(maxsize=256)
def alpha_from_sigma(sigma: float, k: int) -> float:
    """The per-token rate alpha whose MoESD ``sigma = [(1 - alpha^(k+1)) / (1 - alpha)] / (k+1)``
    equals ``sigma`` (bisection; sigma is increasing in alpha, from 1/(k+1) at 0 to 1 at 1)."""
    if not 1.0 / (k + 1) <= sigma <= 1.0:
        raise ValueError(f"sigma={sigma} is outside [1/(k+1), 1] = [{1.0 / (k + 1):.4f}, 1] for k={k}")

    def sig(a: float) -> float:
        return (k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)) / (k + 1)

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sig(mid) < sigma else (lo, mid)
    return 0.5 * (lo + hi)


class AcceptanceSampler:
    """Draws each request's accepted-draft count per round (module docstring)."""

    def __init__(self, config: AcceptanceConfig, seed: int):
        self.config = config
        self.seed = seed
        self._rngs: dict[int, np.random.Generator] = {}
        self._replay_pos: dict[int, int] = {}

    def _rng(self, request_id: int) -> np.random.Generator:
        rng = self._rngs.get(request_id)
        if rng is None:
            rng = self._rngs[request_id] = np.random.default_rng([self.seed, int(request_id), _SALT])
        return rng

    def accepted(self, request_id: int, k: int) -> int:
        """Accepted drafts (0..k) of request ``request_id``'s next round with ``k`` drafts."""
        if k <= 0:
            return 0
        cfg = self.config
        if cfg.acceptance == "replay":
            lengths = cfg.accept_lengths
            i = self._replay_pos.get(request_id, int(request_id) % len(lengths))
            self._replay_pos[request_id] = i + 1
            return min(int(lengths[i % len(lengths)]), k)
        draws = self._rng(request_id).random(k)   # always k draws: the stream does not depend on outcomes
        for j in range(1, k + 1):
            if draws[j - 1] >= cfg.position_prob(j):
                return j - 1
        return k

    def forget(self, request_id: int) -> None:
        self._rngs.pop(request_id, None)
        self._replay_pos.pop(request_id, None)
