"""Fit the synthetic router (``workloads.synthetic``) and request lengths to a real router trace.

What is fitted, and how (statistics as defined in ``workloads.trace_stats``):

* ``popularity_max_over_mean`` -- the generator's knob is the *expected* busiest-expert load over
  the mean load; a finite trace reads higher (the maximum of noisy counts; with ~8 tokens per
  expert the bias is large). So the knob is found by simulation at the trace's own sample size:
  the median over layers of max/mean, averaged over ``replicates`` generated copies of the trace's
  request lengths, is brought to the trace's value by a safeguarded secant search on the knob,
  with common random numbers (the same seeds at every evaluation; each replicate is its own
  generator call, so the calibration also averages over the generator's random tables). Temporal reuse is switched on at its
  fitted value while doing so (it makes consecutive tokens alike, which raises the finite-sample
  maximum); affinity is at a nominal strength (it does not change a layer's counts, but the
  generator only draws its affinity tables when it is on, so this keeps the random numbers common).
* ``reuse_prob`` -- the trace's pooled reuse (unbiased at any sample size: the generator hits its
  target exactly in expectation). Switched off when it is not above the chance value the fitted
  popularity alone gives (by two standard errors).
* ``affinity_strength`` -- the affinity *excess* (top-successor probability minus its independence
  baseline) is matched by simulation at the trace's sample size, like popularity, with the two
  other knobs fixed. Off when the trace's excess is within two standard deviations of what the
  generator gives without affinity. Reuse and affinity are matched jointly: the generator's
  temporal keeps follow the cross-layer attachments, so its reuse equals ``reuse_prob`` whatever
  the strength, and full strength makes every layer share the same noise. The excess is still
  bounded (popular experts of consecutive layers are not aligned, and the statistic read at high
  reuse falls somewhat); beyond that bound the fit stops at ``MAX_AFFINITY_STRENGTH`` and says so
  (``fit.notes``, ``fit.saturated``), or with ``priority="affinity"`` lowers ``reuse_prob`` until
  the excess is reachable, or switches reuse off if even that does not reach it (popularity is
  then refitted).
* The routing kind is the ``synthetic.FEATURES`` row of the features switched on (reuse or affinity
  without popularity uses popularity_max_over_mean = 1, i.e. exactly uniform popularity).
* Lengths: ``num_requests``, ``prompt_len`` and ``output_len`` (means rounded half up; ``output_len =
  positions - prompt_len + 1`` as ``workloads.trace`` defines it), ``length_dist=fixed`` when every
  request has the same lengths, else ``uniform`` with ``length_spread = sqrt(3) * std / mean`` (the
  spread of a uniform law with that coefficient of variation), token-weighted over prompt and
  decode positions, capped at 0.95.

Long traces are cut into chunks of at most ``CHUNK_ELEMENTS`` (token, layer, expert) elements; the
sample-size-dependent statistics are averaged over the chunks and the simulation reproduces chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np

from .model import ModelSpec
from .requests import Request, WorkloadConfig, build_requests
from .synthetic import FEATURES, RoutingConfig, generate_routing, resolve_routing
from .trace import RoutedRequest, TraceMeta
from .trace_stats import Routed, affinity, affinity_shifts, flatten, model_for_trace, popularity, reuse
from .validation import ConfigError, build

#: upper end of the affinity_strength search (inheritance probability 1 - e^-8 = 0.9997)
MAX_AFFINITY_STRENGTH = 8.0
#: (token, layer, expert) elements per chunk of a long trace
CHUNK_ELEMENTS = 1 << 21
#: elements generated per calibration evaluation (sets the number of replicates, 8..32)
CALIBRATION_ELEMENTS = 1 << 22
#: shifts of the affinity baseline during calibration (the trace itself uses the default 16)
CALIBRATION_SHIFTS = 6
#: significance (in standard deviations) for switching a feature on
FEATURE_SIGMAS = 2.0

#: the workload.* keys a fit sets, with what they mean (written as comments into params.yaml)
WORKLOAD_KEY_DOCS: dict[str, str] = {
    "kind": "synthetic requests (conf/workload/synthetic.yaml)",
    "routing": "routing kind: features switched on (uniform|skewed|temporal|affinity|realistic)",
    "popularity_max_over_mean": "expected busiest-expert load / mean load per layer (bias-corrected)",
    "reuse_prob": "P(expert of token t also used by token t-1, same layer); null = feature off",
    "affinity_strength": "cross-layer inheritance strength; P(inherit) = 1 - exp(-strength)",
    "num_requests": "requests in the trace",
    "prompt_len": "mean prompt positions (rounded)",
    "output_len": "mean generated tokens (rounded; positions - prompt_len + 1)",
    "length_dist": "fixed (all requests alike) or uniform in len*(1 +- length_spread)",
    "length_spread": "sqrt(3) * coefficient of variation, token-weighted over prompt and decode",
    "max_prefill_tokens": "raised to the longest prompt when that exceeds the default 8192",
}


# ---------------------------------------------------------------------------------------------
# Lengths


@dataclass(frozen=True)
class LengthStats:
    mean: float
    std: float
    min: int
    max: int

    @classmethod
    def of(cls, values: Sequence[int]) -> "LengthStats":
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.mean()), float(v.std()), int(v.min()), int(v.max()))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max}


def request_lengths(requests) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_len, output_len) per request, ``output_len = positions - prompt_len + 1``."""
    prompts = np.array([int(r.prompt_len) for r in requests], dtype=np.int64)
    positions = np.array([np.asarray(r.experts).shape[0] for r in requests], dtype=np.int64)
    return prompts, positions - prompts + 1


def length_workload(requests) -> tuple[dict, dict]:
    """(workload.* length keys, length statistics) of ``requests``."""
    prompts, outputs = request_lengths(requests)
    ps, os_ = LengthStats.of(prompts), LengthStats.of(outputs)
    keys: dict[str, Any] = {"num_requests": int(len(prompts)),
                            "prompt_len": max(1, int(math.floor(ps.mean + 0.5))),
                            "output_len": max(1, int(math.floor(os_.mean + 0.5)))}
    if ps.std == 0 and os_.std == 0:
        keys["length_dist"] = "fixed"
        keys["length_spread"] = 0.0
    else:
        wp, wo = float(prompts.sum()), float((outputs - 1).sum())
        sp = math.sqrt(3.0) * ps.std / ps.mean
        so = math.sqrt(3.0) * os_.std / os_.mean
        spread = (wp * sp + wo * so) / (wp + wo) if wp + wo > 0 else sp
        keys["length_dist"] = "uniform"
        keys["length_spread"] = round(float(min(0.95, spread)), 4)
    if ps.max > 8192:
        keys["max_prefill_tokens"] = int(ps.max)
    stats = {"prompt_len": ps.as_dict(), "output_len": os_.as_dict(),
             "num_requests": int(len(prompts)), "tokens": int((prompts + outputs - 1).sum())}
    return keys, stats


# ---------------------------------------------------------------------------------------------
# Sample units and calibration by simulation


def _chunks(requests, M: int, E: int, budget: int = CHUNK_ELEMENTS) -> list[list[Routed]]:
    """Requests (split if longer than a chunk) grouped into chunks of <= ``budget`` elements."""
    per_token = M * E
    cap = max(1, budget // per_token)
    pieces: list[Routed] = []
    for r in requests:
        ex = np.asarray(r.experts)
        for a in range(0, ex.shape[0], cap):
            part = ex[a:a + cap]
            pieces.append(Routed(part, max(1, min(int(r.prompt_len) - a, part.shape[0]))))
    chunks: list[list[Routed]] = [[]]
    size = 0
    for p in pieces:
        t = p.experts.shape[0]
        if chunks[-1] and size + t > cap:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += t
    if len(chunks) > 1 and sum(p.experts.shape[0] for p in chunks[-1]) < cap // 2:
        last = chunks.pop()  # a short tail would read a different bias: fold it into the previous
        chunks[-1].extend(last)
    return chunks


def _sample_stats(pieces: Sequence[Routed], E: int, shifts: Optional[int] = None,
                  with_affinity: bool = True) -> dict:
    f = flatten(pieces, E)
    out = {"popularity": popularity(f, E).median, "reuse": reuse(f, E).overall}
    if with_affinity:
        aff = affinity(f, E, None if shifts is None else affinity_shifts(f.lengths, shifts))
        out.update({"affinity": aff.overall, "affinity_baseline": aff.baseline,
                    "affinity_excess": aff.excess})
    return out


class _Simulator:
    """Statistics of generated replicates of the trace's chunks."""

    def __init__(self, model: ModelSpec, chunks: list[list[Routed]], replicates: int, seed: int):
        self.model = model
        self.units = [[p.experts.shape[0] for p in chunks[i % len(chunks)]] for i in range(replicates)]
        self.seed = seed
        self.evaluations = 0

    def run(self, cfg: RoutingConfig, with_affinity: bool = True) -> dict:
        """Mean and sd over replicates. Each replicate is its own generator call (own popularity
        and affinity tables: the statistics depend on how the tables fall, and the trace is one
        draw of them), seeded ``[seed, i]`` at every evaluation (common random numbers)."""
        self.evaluations += 1
        rows = []
        for i, unit in enumerate(self.units):
            routing = generate_routing(self.model, cfg, unit, np.random.default_rng([self.seed, i]))
            part = [Routed(x, x.shape[0]) for x in routing]
            rows.append(_sample_stats(part, self.model.num_experts, CALIBRATION_SHIFTS, with_affinity))
        out = {}
        for key in rows[0]:
            v = np.array([r[key] for r in rows], dtype=np.float64)
            out[key] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            out[key + "_sd"] = float(np.nanstd(v)) if np.isfinite(v).sum() > 1 else 0.0
        return out


def _kind(popularity_on: bool, reuse_on: bool, affinity_on: bool) -> str:
    if not (popularity_on or reuse_on or affinity_on):
        return "uniform"
    want = (True, reuse_on, affinity_on)  # every kind with reuse/affinity also has popularity
    for kind, feats in FEATURES.items():
        if feats == want:
            return kind
    raise AssertionError(want)


def _routing(p: float, q: Optional[float], s: float) -> RoutingConfig:
    kind = _kind(p > 1.0, q is not None, s > 0.0)
    return RoutingConfig(kind=kind, popularity_max_over_mean=max(1.0, p), reuse_prob=q,
                         affinity_strength=s if s > 0 else 0.0)


@dataclass
class _Solution:
    x: float
    value: float        # fn at (or interpolated at) x
    slope: float        # d fn / dx near the solution (nan if unknown)
    saturated: bool     # the target lies above fn(hi)


def _solve(fn, lo: float, hi: float, target: float, f_lo: float, x0: float, xtol: float,
           max_evals: int = 10) -> _Solution:
    """x in [lo, hi] with f(x) == target for an increasing f (``f(lo) = f_lo`` is known).

    ``fn(x)`` returns (f(x), tolerance): the Monte Carlo error of that evaluation, below which
    more precision means nothing. Safeguarded secant from ``x0``: secant steps through the two
    latest points, bisection when a step leaves the bracket; stops when |f(x) - target| <=
    tolerance or the bracket is narrower than xtol. Few evaluations: fn is a simulation.
    """
    if f_lo >= target:
        return _Solution(lo, f_lo, float("nan"), False)
    pts = [(lo, f_lo)]
    a, fa = lo, f_lo
    b: Optional[float] = None
    fb = float("nan")
    x = min(max(x0, lo), hi)
    ftol = 0.0
    for _ in range(max_evals):
        fx, ftol = fn(x)
        pts.append((x, fx))
        if fx < target:
            a, fa = x, fx
        else:
            b, fb = x, fx
        if abs(fx - target) <= ftol:
            break
        if b is None and x >= hi:
            slope = (fx - pts[-2][1]) / (x - pts[-2][0]) if x != pts[-2][0] else float("nan")
            return _Solution(hi, fx, slope, True)
        if b is not None and b - a <= xtol:
            break
        (x1, f1), (x2, f2) = pts[-2], pts[-1]
        upper = b if b is not None else hi
        nx = x2 + (target - f2) * (x2 - x1) / (f2 - f1) if f2 != f1 else float("nan")
        if not (a < nx < upper):
            nx = 0.5 * (a + upper) if b is not None or not (nx >= upper) else hi
        x = nx
    if b is not None and abs(pts[-1][1] - target) > ftol and fb != fa:
        x = a + (target - fa) * (b - a) / (fb - fa)
        value = target
    else:
        x, value = min(pts[1:], key=lambda pt: abs(pt[1] - target))
    near = sorted(pts, key=lambda pt: abs(pt[0] - x))[:2]
    (x1, f1), (x2, f2) = near
    slope = (f2 - f1) / (x2 - x1) if x2 != x1 else float("nan")
    return _Solution(float(x), float(value), float(slope), False)


def _strength(beta: float) -> float:
    return -math.log1p(-beta) if beta > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The fit


@dataclass
class FitResult:
    """Fitted generator knobs, lengths and model identity, with what they were fitted to.

    ``observed``: the trace's statistics (sample-size dependent ones averaged over chunks);
    ``expected``: the same statistics of generated replicates under the fitted knobs (mean and
    standard deviation over replicates); ``notes``: one line per caveat.
    """

    model: dict
    routing: RoutingConfig
    lengths: dict
    length_stats: dict
    observed: dict
    expected: dict
    details: dict
    notes: list[str] = field(default_factory=list)

    def workload(self) -> dict:
        """The ``workload.*`` keys of the fitted synthetic workload."""
        r = self.routing
        return {"kind": "synthetic", "routing": r.kind,
                "popularity_max_over_mean": round(float(r.popularity_max_over_mean), 4),
                "reuse_prob": None if r.reuse_prob is None else round(float(r.reuse_prob), 4),
                "affinity_strength": round(float(r.affinity_strength), 4), **self.lengths}

    def params(self) -> dict:
        """Plain containers for params.yaml: ``model``, ``workload`` and ``fit`` sections."""
        return {"model": dict(self.model), "workload": self.workload(),
                "fit": {"observed": self.observed, "expected": self.expected,
                        "lengths": self.length_stats, **self.details, "notes": list(self.notes)}}


PRIORITIES = ("reuse", "affinity")


def fit_trace(requests, meta: TraceMeta, *, seed: int = 0, replicates: Optional[int] = None,
              xtol: float = 0.005, priority: str = "reuse") -> FitResult:
    """Fit the synthetic generator's knobs and the request lengths to ``requests`` (see module doc).

    ``requests``: RoutedRequest-like objects (``experts [T, M, K]``, ``prompt_len``) of a trace
    with metadata ``meta``. ``replicates``: generated copies of the trace's sample unit per
    evaluation (default: as many as fit in ``CALIBRATION_ELEMENTS``, 8..32). ``priority``: only
    when the trace's affinity is beyond the generator's reach at the trace's reuse (which lowers
    the reach somewhat), keep the reuse (``reuse``, default: it drives expert-cache hit rates) or
    lower it until the affinity is reachable (``affinity``). Deterministic in seed.
    """
    if priority not in PRIORITIES:
        raise ConfigError(f"priority={priority!r} is not allowed; choose one of: {', '.join(PRIORITIES)}")
    requests = list(requests)
    meta.validate("trace")
    E, K, M = meta.num_experts, meta.top_k, len(meta.moe_layers)
    flat = flatten(requests, E)
    if flat.M != M or flat.K != K:
        raise ConfigError(f"trace routing has {flat.M} MoE layers and top_k={flat.K}; its metadata says "
                          f"{M} and {K}")
    model = model_for_trace(meta.model or "trace", E, K, meta.num_layers, meta.moe_layers)
    lengths, length_stats = length_workload(requests)
    chunks = _chunks(requests, M, E)
    unit_tokens = int(np.mean([sum(p.experts.shape[0] for p in c) for c in chunks]))
    if replicates is None:
        replicates = int(np.clip(CALIBRATION_ELEMENTS // max(1, unit_tokens * M * E), 8, 32))
    if replicates < 1:
        raise ConfigError(f"replicates={replicates} is invalid; must be >= 1")
    sim = _Simulator(model, chunks, replicates, seed)
    notes: list[str] = []

    rows = [_sample_stats(c, E) for c in chunks]
    obs_pop = float(np.mean([r["popularity"] for r in rows]))
    obs_exc = float(np.nanmean([r["affinity_excess"] for r in rows])) if M > 1 else float("nan")
    obs_aff = float(np.nanmean([r["affinity"] for r in rows])) if M > 1 else float("nan")
    obs_base = float(np.nanmean([r["affinity_baseline"] for r in rows])) if M > 1 else float("nan")
    reu = reuse(flat, E)
    q_obs = reu.overall
    # standard error of the pooled reuse, conservatively counting one layer's worth of trials
    # (layers of one token are correlated)
    q_se = math.sqrt(max(q_obs * (1 - q_obs), 1e-9) / max(1, reu.pairs * K)) if reu.pairs else float("inf")
    observed = {"popularity_median": obs_pop, "reuse": None if math.isnan(q_obs) else q_obs,
                "reuse_chance_uniform": K / E,
                "affinity": None if math.isnan(obs_aff) else obs_aff,
                "affinity_independent": None if math.isnan(obs_base) else obs_base,
                "affinity_excess": None if math.isnan(obs_exc) else obs_exc,
                "chunks": len(chunks), "chunk_tokens": unit_tokens}

    def chance(p: float) -> float:
        return resolve_routing(model, RoutingConfig("skewed", max(1.0, p))).reuse_chance

    def reuse_for(p: float, q_target: float) -> Optional[float]:
        if math.isnan(q_target) or q_target <= chance(p) + FEATURE_SIGMAS * q_se:
            return None
        return float(min(q_target, 1.0))

    def evaluate(cfg: RoutingConfig, key: str, with_affinity: bool = True) -> tuple[float, float]:
        """(mean of the statistic over replicates, half its Monte Carlo standard error)."""
        run = sim.run(cfg, with_affinity)
        return run[key], 0.5 * run[key + "_sd"] / math.sqrt(replicates)

    def intrinsic(run: dict, key: str) -> float:
        """Sampling sd of the trace's statistic (its chunks averaged), as the generator has it."""
        return run[key + "_sd"] / math.sqrt(len(chunks))

    def fit_popularity(q_target: float, s_at: float, x0: Optional[float] = None) -> tuple[float, float]:
        """(popularity_max_over_mean matching the trace, d statistic / d knob there); reuse at
        q_target, affinity at strength s_at; the search starts at x0 (default: the trace's value)."""
        p_hi = E / K * 0.97
        if p_hi <= 1.0 + 1e-6:
            return 1.0, float("nan")

        def pop_at(x: float) -> tuple[float, float]:
            return evaluate(_routing(x, reuse_for(x, q_target), s_at), "popularity", False)

        base = sim.run(_routing(1.0, reuse_for(1.0, q_target), s_at), False)
        if obs_pop <= base["popularity"] + FEATURE_SIGMAS * intrinsic(base, "popularity"):
            return 1.0, float("nan")
        sol = _solve(pop_at, 1.0, p_hi, obs_pop, base["popularity"],
                     min(obs_pop if x0 is None else x0, p_hi), xtol)
        if sol.saturated:
            sat.append("popularity_max_over_mean")
            notes.append(f"popularity: the trace's median max/mean {obs_pop:.3f} is beyond what "
                         f"popularity_max_over_mean={p_hi:.3f} (just under E/K) gives at this sample "
                         f"size ({sol.value:.3f}); using that")
        return sol.x, sol.slope

    beta_max = 1.0 - math.exp(-MAX_AFFINITY_STRENGTH)

    def excess_at(p: float, q: Optional[float], beta: float) -> tuple[float, float]:
        return evaluate(_routing(p, q, _strength(beta)), "affinity_excess")

    def fit_affinity(p: float, q: Optional[float]) -> _Solution:
        """Solution in beta = 1 - exp(-strength) (the inheritance probability)."""
        off = sim.run(_routing(p, q, 0.0))
        if not obs_exc > off["affinity_excess"] + FEATURE_SIGMAS * intrinsic(off, "affinity_excess"):
            return _Solution(0.0, off["affinity_excess"], float("nan"), False)
        return _solve(lambda b: excess_at(p, q, b), 0.0, beta_max, obs_exc, off["affinity_excess"],
                      0.5, 1e-3)

    sat: list[str] = []
    # Affinity does not change a layer's counts in distribution, but it changes which numbers a
    # replicate draws: popularity is searched at a nominal strength first, and again (warm
    # started) at the fitted strength, so that the final knobs are consistent draw for draw.
    s_nominal = 1.0 if M > 1 else 0.0
    p, p_slope = fit_popularity(q_obs, s_nominal)
    q = reuse_for(p, q_obs)
    if q is None and not math.isnan(q_obs):
        notes.append(f"reuse: {q_obs:.3f} is not above the chance value {chance(p):.3f} of the fitted "
                     f"popularity (by {FEATURE_SIGMAS:g} standard errors): temporal reuse off")
    beta, beta_slope = 0.0, float("nan")
    if M > 1 and not math.isnan(obs_exc):
        sol = fit_affinity(p, q)
        if sol.saturated and priority == "affinity" and q is not None:
            # lower reuse until the excess is reachable (the reachable excess falls as reuse rises)
            q_min = chance(p) + FEATURE_SIGMAS * q_se + 1e-4
            f_min = excess_at(p, reuse_for(p, q_min), beta_max)[0] if q_min < q else float("-inf")
            if f_min < obs_exc:
                q_new = None
            else:
                def neg_excess(v: float) -> tuple[float, float]:
                    value, tol = excess_at(p, reuse_for(p, v), beta_max)
                    return -value, tol

                lowered = _solve(neg_excess, q_min, q, -obs_exc, -f_min, 0.5 * (q_min + q), 1e-3)
                q_new = reuse_for(p, lowered.x - 1e-3)
            notes.append(f"priority=affinity: reuse_prob lowered from {q_obs:.3f} to "
                         f"{'chance (off)' if q_new is None else format(q_new, '.3f')} so that the "
                         f"trace's affinity excess {obs_exc:.3f} is reachable"
                         + (" (it is not even then: this gets closest)" if f_min < obs_exc else ""))
            p, p_slope = fit_popularity(q_new if q_new is not None else float("nan"), s_nominal, p)
            q = reuse_for(p, q_new if q_new is not None else float("nan"))
            sol = fit_affinity(p, q)
        beta, beta_slope = sol.x, sol.slope
        if sol.saturated:
            sat.append("affinity_strength")
            notes.append(
                f"affinity: the trace's excess {obs_exc:.3f} is beyond the generator's reach with "
                f"reuse_prob={q if q is None else round(q, 3)} and this popularity: "
                f"affinity_strength={MAX_AFFINITY_STRENGTH:g} (every layer sharing its noise) gives "
                f"{sol.value:.3f}; using that"
                + (" (priority=affinity trades reuse for affinity)" if priority == "reuse" and q else ""))
    s = _strength(beta)
    if p > 1.0 and s != s_nominal:
        p, p_slope = fit_popularity(q if q is not None else float("nan"), s, p)
    routing = _routing(p, q, s)
    routing.validate()
    final = sim.run(routing)
    plan = resolve_routing(model, routing)
    expected = {"popularity_median": final["popularity"], "popularity_median_sd": final["popularity_sd"],
                "reuse": q if q is not None else plan.reuse_chance, "reuse_sd": final["reuse_sd"],
                "affinity": final["affinity"], "affinity_sd": final["affinity_sd"],
                "affinity_independent": final["affinity_baseline"],
                "affinity_excess": final["affinity_excess"],
                "affinity_excess_sd": final["affinity_excess_sd"],
                "reuse_chance": plan.reuse_chance}
    expected = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in expected.items()}
    # Standard errors: the sampling sd of each statistic at the trace's size (spread of the
    # replicates at the fitted knobs) over the statistic's slope in the knob.
    p_se = intrinsic(final, "popularity") / p_slope if p_slope > 0 else float("nan")
    reuse_se = intrinsic(final, "reuse") if q is not None else float("nan")
    beta_se = (intrinsic(final, "affinity_excess") / beta_slope
               if beta > 0 and beta_slope > 0 and "affinity_strength" not in sat else float("nan"))
    uncertainty = {"popularity_max_over_mean": p_se, "reuse_prob": reuse_se,
                   "affinity_strength": beta_se / (1.0 - beta), "affinity_inherit_prob": beta_se}
    uncertainty = {k: (None if isinstance(v, float) and math.isnan(v) else float(v))
                   for k, v in uncertainty.items()}
    details = {"uncertainty": uncertainty, "seed": seed, "replicates": replicates,
               "priority": priority, "evaluations": sim.evaluations, "saturated": sat,
               "trace_model": meta.model, "source": meta.source}
    model_id = {"name": meta.model, "num_experts": E, "top_k": K, "num_layers": meta.num_layers,
                "moe_layers": [int(v) for v in meta.moe_layers]}
    return FitResult(model_id, routing, lengths, length_stats, observed, expected, details, notes)


# ---------------------------------------------------------------------------------------------
# Params: validation and generation


@dataclass(frozen=True)
class ParamsModel:
    """The ``model`` section of params.yaml (``catalog``: name is a moesim catalog model)."""

    name: str
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: tuple[int, ...]
    catalog: bool = False
    trace_model: str = ""

    def validate(self, key: str = "model") -> None:
        TraceMeta(self.name, self.num_experts, self.top_k, self.num_layers, self.moe_layers).validate(
            f"params {key}")

    def spec(self) -> ModelSpec:
        """A ModelSpec with these routing shapes (placeholder sizes)."""
        return model_for_trace(self.name, self.num_experts, self.top_k, self.num_layers, self.moe_layers)


_WORKLOAD_FIELDS = {f.name for f in fields(WorkloadConfig)}


def params_model(params: dict) -> ParamsModel:
    """The validated ``model`` section of a params mapping (ConfigError naming the key)."""
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise ConfigError("params: model is required (a mapping with name, num_experts, top_k, "
                          "num_layers, moe_layers)")
    return build(ParamsModel, params["model"], "model")


def params_workload(params: dict, **overrides) -> WorkloadConfig:
    """The validated synthetic ``WorkloadConfig`` of a params mapping; ``overrides`` (not None)
    replace keys (e.g. num_requests=1000)."""
    wl = params.get("workload") if isinstance(params, dict) else None
    if not isinstance(wl, dict):
        raise ConfigError("params: workload is required (the workload.* keys written by moesim-trace fit)")
    values = {k: v for k, v in wl.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "lookahead_accuracy" in _WORKLOAD_FIELDS and "lookahead_accuracy" not in values:
        values["lookahead_accuracy"] = None  # a trace fit has no lookahead predictions to imitate
    if values.get("kind", "synthetic") != "synthetic":
        raise ConfigError(f"workload.kind={values['kind']!r} is invalid; params describe a synthetic workload")
    return build(WorkloadConfig, values, "workload")


def generate_requests(params: dict, model: ModelSpec, *, num_requests: Optional[int] = None,
                      prompt_len: Optional[int] = None, output_len: Optional[int] = None,
                      seed: int = 0) -> list[Request]:
    """Requests (lengths and routing) of the params' synthetic workload, exactly as
    ``moesim`` builds them for the same workload keys and seed (``workloads.requests``)."""
    cfg = params_workload(params, num_requests=num_requests, prompt_len=prompt_len,
                          output_len=output_len)
    return build_requests(cfg, model, seed)


def generate_routed(params: dict, model: ModelSpec, lengths: Sequence[tuple[int, int]],
                    seed: int = 0) -> list[RoutedRequest]:
    """Routing of the params' knobs for given (prompt_len, output_len) pairs (e.g. a trace's own)."""
    cfg = params_workload(params)
    routing_cfg = RoutingConfig.from_workload(cfg)
    counts = [int(p) + int(o) - 1 for p, o in lengths]
    routing = generate_routing(model, routing_cfg, counts, np.random.default_rng(seed))
    return [RoutedRequest(i, int(p), int(o), r) for i, ((p, o), r) in enumerate(zip(lengths, routing))]


def moesim_overrides(params: dict, catalog_name: Optional[str] = None) -> list[str]:
    """``moesim`` command-line overrides equivalent to the params (``model=`` when a catalog
    model is named, otherwise ``model.*`` shape overrides to apply on a model of your choice)."""
    m = params_model(params)
    out = []
    if catalog_name or m.catalog:
        out.append(f"model={catalog_name or m.name}")
    else:
        dense = [i for i in range(m.num_layers) if i not in set(m.moe_layers)]
        out += [f"model.num_experts={m.num_experts}", f"model.top_k={m.top_k}",
                f"model.num_layers={m.num_layers}", f"model.dense_layers=[{','.join(map(str, dense))}]"]
    out.append("workload=synthetic")
    for key, value in params["workload"].items():
        if key == "kind":
            continue
        text = "null" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        out.append(f"workload.{key}={text}")
    return out
