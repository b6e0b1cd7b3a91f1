"""Synthetic router traces: which top-k experts each token picks at each MoE layer.

Three measurable properties of real routing can be switched on independently:

* **popularity** -- some experts of a layer get more tokens than others. Target:
  ``popularity_max_over_mean`` = expected load of the busiest expert / mean load, per layer.
* **temporal reuse** -- token t tends to reuse the experts token t-1 used at the same layer.
  Target: ``reuse_prob`` = P(a given expert of token t was also used by token t-1, same layer,
  same request) = mean of |S_t ∩ S_{t-1}| / K.
* **cross-layer affinity** -- the experts a token picks at one MoE layer make some experts of the
  next MoE layer more likely (``affinity_strength``).

========== ========== ===== ========
kind       popularity reuse affinity
========== ========== ===== ========
uniform    -          -     -
skewed     yes        -     -
temporal   yes        yes   -
affinity   yes        -     yes
realistic  yes        yes   yes
========== ========== ===== ========

A feature that is off is exactly off; ``uniform`` is i.i.d. uniform top-k without replacement, so
t tokens hit MoESD's ``N(t) = E(1 - ((E-K)/E)^t)`` distinct experts on average.

Mechanism
---------
Selection (an exponential race, which is Gumbel-top-k sampling). Each (token, MoE layer m) has a
noise vector ``X[e] ~ Exp(1)``, i.i.d. over the E experts. The token picks the K experts with the
smallest ``X[e] / w_m[e]`` (ascending, so column 0 is the expert with the highest router score).
This is sampling K experts without replacement with probabilities proportional to ``w_m``
(Plackett-Luce), the same as taking the top-k of ``log w_m[e] + Gumbel noise``.

Popularity. ``log w_m = sigma * z[perm_m]``: ``z`` are the E standard-normal quantiles
``Phi^-1((i + 0.5) / E)`` (a log-normal popularity profile) and ``perm_m`` is a random permutation
per layer (drawn from ``rng``), so every layer has the same profile but different popular experts.
``sigma`` is found by bisection so that the exact inclusion probability of the busiest expert under
top-k sampling without replacement (computed by quadrature over its Gumbel value with a truncated
Poisson-binomial count of the experts that beat it) equals ``popularity_max_over_mean * K / E``.
Hence every layer's *expected* max/mean load equals the target exactly; a finite sample reads
higher (the maximum of noisy counts). The target must be below E/K (the busiest expert cannot be
picked by more than every token). Without popularity, ``w_m = 1``.

Temporal reuse and affinity act on the noise, never on ``w``, in a way that keeps every token's
noise vector i.i.d. Exp(1); each layer's marginal routing is therefore exactly the Plackett-Luce
law above, whatever the other features do (popularity stays on target). Layer m (m >= 1) has a
random bijection ``partner_m`` from its experts to the experts of MoE layer m-1 (drawn from
``rng``); element ``X[t, m, e]``'s partner is ``X[t, m-1, partner_m[e]]``. Per element:

* Attach (affinity): at m >= 1 the element is *attached* to its partner with probability
  ``beta = 1 - exp(-affinity_strength)`` (its own coin; layer 0 never attaches).
* Keep (reuse): the first token of a request keeps nothing. For t > 0 an unattached element (and
  every element of layer 0) is kept from token t-1 (same layer, same expert) with probability
  ``eta`` (its own coin); an attached element is kept iff its partner is kept.
* Value: a kept element takes its value at token t-1. A renewed element takes its partner's value
  if attached (the partner renewed too, so that value was first drawn at token t), else a fresh
  Exp(1) draw.
* Why it is exact: each copy runs along a fixed lineage (same expert in time, ``partner`` across
  layers), and different experts of one (token, layer) have different lineages, so their values
  are independent Exp(1) draws and their coins are independent. By induction over layers every
  element (t > 0) is kept with probability exactly ``eta``, and a renewed element only ever holds a
  value first drawn at token t. So between tokens t-1 and t of one layer an element is identical
  with probability exactly ``eta`` (independently over experts) and otherwise independent,
  whatever ``beta`` is: ``reuse_prob`` depends on ``eta`` and the popularity profile only; ``eta``
  is found by bisection on a fixed-seed Monte Carlo of exactly this pair law (about 0.5M noise
  elements; error ~0.002 or less).
* Affinity: a token that chose expert ``partner_m[e]`` at layer m-1 had a small noise value there,
  which makes expert e likely at layer m when the two elements are equal: each expert of layer m-1
  has one preferred successor in layer m. An element equals its partner with probability
  ``v_t``: ``v_0 = beta`` at a request's first token and ``v_t = beta (1 - eta) + (beta eta +
  (1 - beta) eta^2) v_{t-1}`` (an attached element that renews is equal; a kept element whose
  partner is kept too -- always so when attached -- is equal iff it was at t-1; any other is not),
  which tends to ``beta (1 - eta) / (1 - beta eta - (1 - beta) eta^2)``. At ``beta -> 1`` every
  layer carries the same noise (up to the partner relabelling) whatever ``eta`` is, so reuse does
  not cap the cross-layer coupling (the affinity statistic read on a finite sample still falls
  somewhat at high reuse, with fewer independent tokens per sample).
  ``affinity_strength`` is this attachment strength (0 = off, 1 -> beta = 0.63, large -> 1); what
  it gives in the affinity *statistic* (``trace_stats``) depends on the popularity profiles and
  the sample, and is matched by simulation (``workloads.fit``), not in closed form.

Reuse target. ``reuse_prob=None`` means the public Mixtral-8x7B measurement (traces/SOURCES.md):
reuse 0.38 where chance is K/E = 0.25, a lift of 1.52 over chance; we use
``q = min(0.95, max(1.52 * K / E, chance))``, where chance is the reuse popularity alone gives
(``eta = 0``). An explicit ``reuse_prob`` below chance cannot be produced (it would need
anti-correlation) and is a ConfigError.

Calibration is deterministic (fixed internal seed, independent of ``rng``, which it does not
consume) and cached per (E, K, targets). Generation works on chunks of ~131k noise elements
(tokens of all requests back to back); inside a chunk everything is vectorised except one select
per layer (affinity on: a bitwise select on a layer-major copy; with reuse too, one boolean select
for the keep coins) and one masked copy per token (reuse on); the top k of rows wider than 64
come from a partition of the key values (an index partition only where the k-th key ties). Cost
is about 10-25 ns per (token, MoE layer, expert) noise element, about half of it the two random
draws: Qwen3-30B-A3B (48 layers x 128 experts) ~145 us per token position with every feature on
(was ~215 us before the selects and the value partition; the arrays are the same), Mixtral (32 x
8) ~10 us.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, Optional

import numpy as np

from .model import ModelSpec
from .validation import ConfigError, require

RoutingKind = Literal["uniform", "skewed", "temporal", "affinity", "realistic"]

#: kind -> (popularity, reuse, affinity)
FEATURES: dict[str, tuple[bool, bool, bool]] = {
    "uniform": (False, False, False),
    "skewed": (True, False, False),
    "temporal": (True, True, False),
    "affinity": (True, False, True),
    "realistic": (True, True, True),
}

#: Reuse lift over chance measured on public Mixtral-8x7B-Instruct traces (0.38 vs K/E = 0.25).
MIXTRAL_REUSE_LIFT = 0.38 / 0.25
#: Cap of the default reuse target (a model with K/E > 0.62 would otherwise ask for reuse ~1).
MAX_DEFAULT_REUSE = 0.95

_CALIBRATION_SEED = 0x6D6F6573  # fixed: calibration must not depend on (or consume) the caller's rng
_CHUNK_ELEMENTS = 1 << 17       # noise elements per generation chunk (1 MB of float64: cache-sized)


@dataclass(frozen=True)
class RoutingConfig:
    """Knobs of the synthetic router (see the module docstring for their exact meaning).

    ``popularity_max_over_mean``: expected load of a layer's busiest expert over the mean load
    (dimensionless, >= 1, < E/K). ``reuse_prob``: target P(an expert of token t was used by token
    t-1 at the same layer), None = derived from the Mixtral measurement. ``affinity_strength``:
    cross-layer attachment strength (>= 0; the probability is ``1 - exp(-affinity_strength)``).
    """

    kind: RoutingKind = "realistic"
    popularity_max_over_mean: float = 1.34
    reuse_prob: Optional[float] = None
    affinity_strength: float = 1.0

    def validate(self, key: str = "workload") -> None:
        require(self.kind in FEATURES, f"{key}.routing", self.kind,
                f"choose one of: {', '.join(FEATURES)}")
        require(self.popularity_max_over_mean >= 1.0, f"{key}.popularity_max_over_mean",
                self.popularity_max_over_mean, "must be >= 1 (1 = no skew)")
        if self.reuse_prob is not None:
            require(0.0 <= self.reuse_prob <= 1.0, f"{key}.reuse_prob", self.reuse_prob,
                    "must be in [0, 1]")
        require(self.affinity_strength >= 0.0, f"{key}.affinity_strength",
                self.affinity_strength, "must be >= 0")

    @classmethod
    def from_workload(cls, cfg) -> "RoutingConfig":
        """The routing knobs of a ``WorkloadConfig`` (``cfg.routing`` becomes ``kind``)."""
        return cls(kind=cfg.routing, popularity_max_over_mean=cfg.popularity_max_over_mean,
                   reuse_prob=cfg.reuse_prob, affinity_strength=cfg.affinity_strength)


@dataclass(frozen=True)
class RoutingPlan:
    """``RoutingConfig`` resolved for one model: the generator's actual parameters.

    ``popularity_scale``: sigma of the log-popularity profile (0 = uniform).
    ``reuse_target``: the reuse probability aimed at (None when reuse is off).
    ``reuse_chance``: the reuse popularity alone gives (K/E without popularity).
    ``keep_prob``: eta, P(a noise element is kept from token t-1).
    ``inherit_prob``: beta, P(a noise element is attached to its partner in layer m-1).
    """

    kind: str
    num_experts: int
    top_k: int
    popularity_max_over_mean: float
    popularity_scale: float
    reuse_target: Optional[float]
    reuse_chance: float
    keep_prob: float
    inherit_prob: float


# ---------------------------------------------------------------------------------------------
# Calibration


@functools.lru_cache(maxsize=None)
def _profile(num_experts: int) -> np.ndarray:
    """Standard-normal quantiles ``Phi^-1((i + 0.5)/E)``, ascending (read-only)."""
    nd = NormalDist()
    z = np.array([nd.inv_cdf((i + 0.5) / num_experts) for i in range(num_experts)])
    z.setflags(write=False)
    return z


def _top_inclusion(sigma: float, num_experts: int, top_k: int) -> float:
    """P(the most popular expert is in the top-k) under Plackett-Luce with ``log w = sigma * z``.

    The top expert with logit s* and Gumbel noise g is picked iff fewer than K others exceed
    s* + g; other j exceeds value x with probability ``1 - exp(-exp(s_j - x))``. Integrate the
    Gumbel density of g against the truncated Poisson-binomial P(count <= K-1) (trapezoid rule,
    step 0.02, g in [-5, 45]).
    """
    if top_k >= num_experts:
        return 1.0
    s = sigma * _profile(num_experts)
    g = np.arange(-5.0, 45.0, 0.02)
    density = np.exp(-g - np.exp(-g))
    dist = np.zeros((top_k, g.size))  # dist[c] = P(exactly c others beat the top expert)
    dist[0] = 1.0
    top = s[-1]
    for sj in s[:-1]:
        p = -np.expm1(-np.exp(sj - top - g))
        q = 1.0 - p
        dist[1:] = dist[1:] * q + dist[:-1] * p
        dist[0] *= q
    return float(np.trapezoid(density * dist.sum(axis=0), g))


@functools.lru_cache(maxsize=256)
def popularity_scale(num_experts: int, top_k: int, max_over_mean: float) -> float:
    """sigma such that the busiest expert's expected load / mean load == ``max_over_mean``."""
    if max_over_mean <= 1.0 or top_k >= num_experts:
        if max_over_mean > 1.0:
            raise ConfigError(
                f"workload.popularity_max_over_mean={max_over_mean!r} is unreachable with "
                f"top_k={top_k} of num_experts={num_experts} (every expert is always picked); use 1")
        return 0.0
    goal = max_over_mean * top_k / num_experts
    limit = num_experts / top_k
    if goal >= 1.0 - 1e-9:
        raise ConfigError(
            f"workload.popularity_max_over_mean={max_over_mean!r} is unreachable for "
            f"num_experts={num_experts}, top_k={top_k}; must be in [1, {limit:g}) (E/K)")
    lo, hi = 0.0, 1.0
    while _top_inclusion(hi, num_experts, top_k) < goal:
        lo, hi = hi, hi * 2.0
        if hi > 256.0:
            raise ConfigError(
                f"workload.popularity_max_over_mean={max_over_mean!r} is too close to E/K={limit:g} "
                f"for num_experts={num_experts}, top_k={top_k}; use a smaller value")
    while hi - lo > 1e-7 * hi:
        mid = 0.5 * (lo + hi)
        if _top_inclusion(mid, num_experts, top_k) < goal:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _member(keys: np.ndarray, top_k: int) -> np.ndarray:
    """Boolean mask of the ``top_k`` smallest keys of each row."""
    if top_k >= keys.shape[-1]:
        return np.ones(keys.shape, dtype=bool)
    kth = np.partition(keys, top_k - 1, axis=-1)[..., top_k - 1:top_k]
    return keys <= kth


def _shared_picks(first: np.ndarray, keys1: np.ndarray, keys2: np.ndarray, in1: np.ndarray,
                  top_k: int) -> np.ndarray:
    """Per row: how many of token t-1's picks (``in1``) token t also picks, token t taking the
    key of t-1 where ``first`` and its own elsewhere."""
    return np.count_nonzero(in1 & _member(np.where(first, keys1, keys2), top_k), axis=1)


class _ReusePairs:
    """Fixed-seed Monte Carlo of (token t-1, token t) at one layer: elements identical w.p. eta."""

    def __init__(self, num_experts: int, top_k: int, sigma: float) -> None:
        rng = np.random.default_rng(_CALIBRATION_SEED)
        n = max(4096, (1 << 19) // num_experts)
        self.top_k = top_k
        inv_w = np.exp(-sigma * _profile(num_experts))
        x1 = rng.standard_exponential((n, num_experts))
        x2 = rng.standard_exponential((n, num_experts))
        self.u = rng.random((n, num_experts))
        self.keys1, self.keys2 = x1 * inv_w, x2 * inv_w
        self.in1 = _member(self.keys1, top_k)
        self.n = n

    def reuse(self, eta: float) -> float:
        return float(_shared_picks(self.u < eta, self.keys1, self.keys2, self.in1, self.top_k).sum()) \
            / (self.n * self.top_k)

    def solve(self, target: float, steps: int) -> float:
        """Bisect eta in [0, 1] for ``reuse(eta) == target`` (``steps`` halvings).

        A row whose uniforms all lie outside [lo, hi) draws the same keys at every eta in between,
        so each step re-evaluates only the rows with a uniform inside the interval and keeps the
        others' counts at ``lo``: the same counts, hence the same eta, as evaluating every row.
        """
        lo, hi = 0.0, 1.0
        u, keys1, keys2, in1 = self.u, self.keys1, self.keys2, self.in1
        shared_lo = _shared_picks(u < lo, keys1, keys2, in1, self.top_k)
        total_lo = int(shared_lo.sum())
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            keep = ((u >= lo) & (u < hi)).any(axis=1)
            u, keys1, keys2, in1, shared_lo = u[keep], keys1[keep], keys2[keep], in1[keep], shared_lo[keep]
            shared_mid = _shared_picks(u < mid, keys1, keys2, in1, self.top_k)
            total_mid = total_lo + int(shared_mid.sum()) - int(shared_lo.sum())
            if float(total_mid) / (self.n * self.top_k) < target:
                lo, total_lo, shared_lo = mid, total_mid, shared_mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def stderr(self, q: float) -> float:
        return math.sqrt(max(q * (1.0 - q), 1e-6) / (self.n * self.top_k))


@functools.lru_cache(maxsize=2)
def _reuse_pairs(num_experts: int, top_k: int, sigma: float) -> _ReusePairs:
    """One Monte Carlo per model shape, shared by the chance level and the bisection."""
    return _ReusePairs(num_experts, top_k, sigma)


@functools.lru_cache(maxsize=256)
def _chance_reuse(num_experts: int, top_k: int, sigma: float) -> tuple[float, float]:
    """(reuse with independent tokens, Monte Carlo standard error); exact K/E when sigma == 0."""
    if sigma == 0.0:
        return top_k / num_experts, 0.0
    pairs = _reuse_pairs(num_experts, top_k, sigma)
    chance = pairs.reuse(0.0)
    return chance, pairs.stderr(chance)


@functools.lru_cache(maxsize=256)
def keep_probability(num_experts: int, top_k: int, sigma: float, reuse: float) -> float:
    """eta such that the reuse statistic equals ``reuse`` (0 if chance already reaches it)."""
    chance, _ = _chance_reuse(num_experts, top_k, sigma)
    if reuse <= chance:
        return 0.0
    if reuse >= 1.0:
        return 1.0
    return _reuse_pairs(num_experts, top_k, sigma).solve(reuse, steps=18)  # eta to ~4e-6


def resolve_routing(model: ModelSpec, cfg: RoutingConfig) -> RoutingPlan:
    """Turn targets into generator parameters for ``model`` (ConfigError if unreachable; a dense
    model has nothing to route: ``generate_routing`` handles it without a plan)."""
    cfg.validate()
    E, K = model.num_experts, model.top_k
    require(E > 0, "model.num_experts", E, f"model {model.name} is dense: it has no routing to resolve")
    require(1 <= K <= E, "model.top_k", K, f"must be between 1 and num_experts={E}")
    require(E <= np.iinfo(np.int16).max, "model.num_experts", E, "must be <= 32767 (int16 ids)")
    popularity, reuse, affinity = FEATURES[cfg.kind]
    target = cfg.popularity_max_over_mean if popularity else 1.0
    sigma = popularity_scale(E, K, float(target))
    chance, err = _chance_reuse(E, K, sigma)
    q: Optional[float] = None
    eta = 0.0
    if reuse:
        if cfg.reuse_prob is None:
            q = min(MAX_DEFAULT_REUSE, max(MIXTRAL_REUSE_LIFT * K / E, chance))
        else:
            q = float(cfg.reuse_prob)
            if q < chance - 3.0 * err - 1e-3:
                raise ConfigError(
                    f"workload.reuse_prob={cfg.reuse_prob!r} is below chance: independent tokens "
                    f"already reuse {chance:.3f} (num_experts={E}, top_k={K}, "
                    f"popularity_max_over_mean={target:g}); must be in [{chance:.3f}, 1]")
        eta = keep_probability(E, K, sigma, q)
    beta = 1.0 - math.exp(-cfg.affinity_strength) if affinity else 0.0
    return RoutingPlan(kind=cfg.kind, num_experts=E, top_k=K, popularity_max_over_mean=float(target),
                       popularity_scale=sigma, reuse_target=q, reuse_chance=chance,
                       keep_prob=eta, inherit_prob=beta)


# ---------------------------------------------------------------------------------------------
# Generation


def _smallest_k(keys: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the ``top_k`` smallest keys along the last axis, in ascending key order (int16)."""
    if top_k == 1:
        return np.argmin(keys, axis=-1)[..., None].astype(np.int16)
    if keys.shape[-1] <= 64:  # a full sort of short rows beats partition + sort
        return np.argsort(keys, axis=-1)[..., :top_k].astype(np.int16)
    if top_k >= keys.shape[-1]:
        return np.argsort(keys, axis=-1).astype(np.int16)
    rows = keys.reshape(-1, keys.shape[-1])
    # The k-th smallest key of each row (a partition of values is ~3x cheaper than of indices); the
    # keys at or below it are the row's top k unless it ties with another key of its row.
    kth = np.partition(rows, top_k - 1, axis=-1)[:, top_k - 1:top_k]
    # Flat positions of the chosen keys, row by row (a 1-D nonzero: ~13x cheaper than the 2-D one).
    flat = np.flatnonzero(rows <= kth)
    if flat.size != rows.shape[0] * top_k:   # a tie at the k-th key: let argpartition break it
        cols = np.argpartition(rows, top_k - 1, axis=-1)[:, :top_k]
    else:
        cols = flat.reshape(rows.shape[0], top_k) - (np.arange(rows.shape[0]) * rows.shape[1])[:, None]
    order = np.argsort(np.take_along_axis(rows, cols, axis=-1), axis=-1)
    return np.take_along_axis(cols, order, axis=-1).astype(np.int16).reshape(keys.shape[:-1] + (top_k,))


def _token_counts(token_counts: Sequence[int]) -> np.ndarray:
    counts = []
    for i, c in enumerate(token_counts):
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ConfigError(f"token_counts[{i}]={c!r} is invalid; must be an integer >= 0")
        counts.append(int(c))
    return np.asarray(counts, dtype=np.int64)


def generate_routing(model: ModelSpec, cfg: RoutingConfig, token_counts: Sequence[int],
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Synthetic routing for requests of the given lengths (in token positions).

    Returns one int16 array ``[token_counts[i], model.num_moe_layers, model.top_k]`` per request:
    the top-k expert ids (distinct within a row, highest router score first) of each token position
    at each MoE layer (ordinal m; absolute layer = ``model.moe_layers[m]``). Tokens of one request
    are in order; temporal reuse runs along them and never crosses requests. All requests share
    the layers' popularity and affinity tables (drawn from ``rng`` first). Deterministic in
    (model, cfg, token_counts, rng state). ``RoutingStream`` builds the same arrays lazily.

    A dense model (``num_experts == 0``, no MoE layers) gets empty ``[n, 0, 0]`` arrays and
    ``rng`` is not used.
    """
    stream = RoutingStream(model, cfg, token_counts, rng)
    return [stream.request(i) for i in range(stream.num_requests)]


class RoutingStream:
    """The synthetic routing of a workload, generated in order only as far as it is read.

    The rows of all requests form one stream (request 0's positions, then request 1's, ...),
    drawn chunk by chunk from ``rng`` exactly as ``generate_routing`` draws them, so
    ``request(i)`` is the same array whenever it is first asked for: reading request i generates
    the stream up to its last position (requests are admitted roughly in arrival order, so a run
    builds routing as it goes, and never builds what it never reads). The stream owns ``rng``
    from here on: nothing else may draw from it.
    """

    def __init__(self, model: ModelSpec, cfg: RoutingConfig, token_counts: Sequence[int],
                 rng: np.random.Generator):
        counts = _token_counts(token_counts)
        self.num_requests = len(counts)
        self._bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._dense = model.num_moe_layers == 0 or model.num_experts == 0
        self.build_cpu_s = 0.0          # CPU seconds spent generating (for benchmarks/serving_speed.py)
        if self._dense:
            cfg.validate()
            return
        plan = resolve_routing(model, cfg)
        E, K, M = model.num_experts, model.top_k, model.num_moe_layers
        self._rng, self._shape = rng, (M, E, K)
        self._eta, self._beta = plan.keep_prob, plan.inherit_prob
        # Per-layer tables, drawn in a fixed order. Noise is stored in *lineage order*: column j of
        # layer m holds expert lineage[m, j], and lineage[m, j]'s partner in layer m-1 is
        # lineage[m-1, j], so inheriting is a same-column copy (no gather).
        inv_w = np.ones((M, E))
        if plan.popularity_scale > 0.0:
            z = _profile(E)
            for m in range(M):
                inv_w[m] = np.exp(-plan.popularity_scale * z[rng.permutation(E)])
        lineage = np.tile(np.arange(E, dtype=np.int16), (M, 1))
        if self._beta > 0.0:
            for m in range(1, M):
                lineage[m] = rng.permutation(E)
            inv_w = np.take_along_axis(inv_w, lineage.astype(np.intp), axis=1)
        self._inv_w = inv_w
        self._column_to_expert = lineage.reshape(-1)
        self._layer_offset = (np.arange(M) * E)[:, None]
        total = int(self._bounds[-1])
        self._out = np.empty((total, M, K), dtype=np.int16)
        self._first = np.zeros(total, dtype=bool)  # row is the first token of its request
        self._first[self._bounds[:-1][counts > 0]] = True
        self._rows_per_chunk = max(1, _CHUNK_ELEMENTS // (M * E))
        self._carry = np.zeros((M, E))  # noise of the previous row (for keeps across a chunk boundary)
        self._done = 0                  # rows generated so far

    def positions(self, i: int) -> int:
        """Token positions of request ``i``."""
        return int(self._bounds[i + 1] - self._bounds[i])

    def request(self, i: int) -> np.ndarray:
        """Request ``i``'s routing ``[positions, M, K]`` (a view of the stream's buffer)."""
        lo, hi = int(self._bounds[i]), int(self._bounds[i + 1])
        if self._dense:
            return np.empty((hi - lo, 0, 0), dtype=np.int16)
        if self._done < hi:
            t0 = time.process_time()
            while self._done < hi:
                self._next_chunk()
            self.build_cpu_s += time.process_time() - t0
        return self._out[lo:hi]

    def _next_chunk(self) -> None:
        M, E, K = self._shape
        eta, beta, rng = self._eta, self._beta, self._rng
        r0 = self._done
        n = min(self._rows_per_chunk, self._out.shape[0] - r0)
        x = rng.standard_exponential((n, M, E))  # renewal values
        keep = None
        if eta > 0.0 or beta > 0.0:
            u = rng.random((n, M, E))
            attach = None
            if beta > 0.0:
                attach = u < beta
                attach[:, 0] = False  # layer 0 has no partner
            if eta > 0.0:
                # own keep coin: P(u < eta) at layer 0; given no attachment (u >= beta) at the
                # other layers, P(u < beta + (1-beta) eta) = eta
                keep = u < eta
                if beta > 0.0:
                    keep[:, 1:] = ~attach[:, 1:] & (u[:, 1:] < beta + (1.0 - beta) * eta)
                    inherited = np.empty((n, E), dtype=bool)
                    for m in range(1, M):  # an attached element keeps iff its partner keeps (it is False
                        np.bitwise_and(attach[:, m], keep[:, m - 1], out=inherited)   # here so far)
                        np.bitwise_or(keep[:, m], inherited, out=keep[:, m])
                keep[self._first[r0:r0 + n]] = False
            if beta > 0.0:
                # an attached element that renews takes its partner's renewal value (the partner
                # renews too); an attached element that keeps is overwritten with token t-1's value
                # below, so what it inherits here does not matter: ``attach`` is the mask
                _inherit_along_layers(x, attach)
        if keep is not None:
            # Kept elements take token t-1's value (row -1 of this chunk is the carry).
            np.copyto(x[0], self._carry, where=keep[0])
            for i in range(1, n):
                np.copyto(x[i], x[i - 1], where=keep[i])
        self._carry = x[-1].copy()
        columns = _smallest_k(x * self._inv_w, K)
        if beta > 0.0:
            self._out[r0:r0 + n] = self._column_to_expert[self._layer_offset + columns]
        else:
            self._out[r0:r0 + n] = columns
        self._done = r0 + n


def _inherit_along_layers(x: np.ndarray, mask: np.ndarray) -> None:
    """``x[:, m] = x[:, m - 1]`` where ``mask[:, m]``, for m = 1, 2, ... in order (so a value can pass
    down several layers), on ``x [rows, M, E]`` in place. Done on a layer-major copy as a select on
    the float64 bits (``b ^ ((b ^ a) & -mask)``): bit-exact, and a third of a masked ``copyto``'s time."""
    layers = np.ascontiguousarray(x.transpose(1, 0, 2))
    bits = layers.view(np.int64)
    select = -mask.transpose(1, 0, 2).astype(np.int64, order="C")   # all ones where mask, else 0
    diff = np.empty(bits.shape[1:], dtype=np.int64)
    for m in range(1, bits.shape[0]):
        np.bitwise_xor(bits[m], bits[m - 1], out=diff)
        np.bitwise_and(diff, select[m], out=diff)
        np.bitwise_xor(bits[m], diff, out=bits[m])
    x[...] = layers.transpose(1, 0, 2)


def generate_weights(experts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Router weights for routing ``experts`` (``[..., K]``), for writing traces.

    Each row is a uniform draw from the K-simplex sorted descending (so column 0, the top expert,
    has the largest weight): float32, positive, summing to 1. The ids themselves are not used;
    the weights carry no information about the routing.
    """
    experts = np.asarray(experts)
    if experts.ndim == 0:
        raise ConfigError(f"experts has shape {experts.shape}; expected [..., top_k]")
    w = rng.standard_exponential(experts.shape) + 1e-12
    w = -np.sort(-w, axis=-1)
    w /= w.sum(axis=-1, keepdims=True)
    return w.astype(np.float32)


def lookahead_predictions(experts: np.ndarray, accuracy: float, num_experts: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Gate-lookahead predictions for a routed request, from an accuracy model.

    ``experts`` is ``[T, M, K]``. Returns int16 ``[T, M, K]`` where row ``[t, m]`` is the prediction,
    made at MoE layer m, of layer m+1's experts: each of layer m+1's true experts is kept with
    probability ``accuracy``, otherwise replaced by a uniformly random expert outside the true set
    (and distinct within the row). The last MoE layer predicts nothing (-1). This stands in for
    applying layer m+1's router to layer m's hidden state when no captured trace is at hand.
    """
    T, M, K = experts.shape
    out = np.full((T, M, K), -1, dtype=np.int16)
    if M < 2 or T == 0:
        return out
    true = experts[:, 1:, :].astype(np.int64)              # [T, M-1, K]
    pred = true.copy()
    wrong = rng.random(true.shape) >= accuracy
    if num_experts > K and wrong.any():
        rows = true.reshape(-1, K)
        p = pred.reshape(-1, K)
        w = wrong.reshape(-1, K)
        for r in np.flatnonzero(w.any(axis=1)):
            taken = set(rows[r].tolist())
            for k in np.flatnonzero(w[r]):
                free = num_experts - len(taken)
                if free <= 0:
                    break
                # the j-th expert (ascending) that is not taken, j uniform
                j = int(rng.integers(free))
                cand = next(x for i, x in enumerate(x for x in range(num_experts) if x not in taken) if i == j)
                p[r, k] = cand
                taken.add(cand)
    out[:, :-1, :] = pred
    return out
