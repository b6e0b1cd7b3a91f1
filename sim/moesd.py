"""MoESD's analytical speedup model of speculative decoding for MoE (arXiv 2505.19645): library and
the ``moesim-moesd`` command.

One speculative round for a batch of B requests drafts gamma tokens, verifies them in one target
pass and rejection-samples; with per-token acceptance rate alpha it commits
``sigma * (gamma + 1)`` tokens per request, so against plain decoding

    speedup = sigma (gamma + 1) / (gamma T_D(B,1)/T_T(B,1) + T_T(B,gamma)/T_T(B,1) + T_reject/T_T(B,1))

and the *target efficiency* ``TE = T_T(B,1) / T_T(B,gamma)`` says how much of the ideal
``sigma (gamma + 1)`` the verify pass lets through. MoESD's Alg. 1 predicts the times from a few
fitted constants: a roofline-shaped curve ``G`` (flat-ish while memory-bound, linear once
compute-bound) and the expected number of distinct experts ``N(t)`` that t tokens touch, which is
why sparse MoEs gain most at medium batch sizes (``fit``, ``predict``).

Verify pass: the paper writes ``T_T(B, gamma)``; moesim models what a real engine runs, a verify
pass carrying ``gamma + 1`` positions per request (the gamma drafted tokens plus the position that
yields the bonus token). So ``T_T(B, gamma)`` here is the forward time of ``B * (gamma + 1)`` tokens.

Usage::

    # measurements: one row per (B, gamma) with columns batch_size, gamma, target_1_s,
    # target_gamma_s, draft_s, reject_s (CSV or Parquet). RP = peak FLOP/s / peak bytes/s,
    # e.g. H800: 989e12 / 3.35e12 = 295.
    moesim-moesd fit measurements.csv --num-experts 64 --top-k 8 --ridge-point 295 -o params.json
    moesim-moesd predict params.json --batch-sizes 1,2,4,...,128 --gamma 4 --alpha 0.9 -o pred.csv

``--batch-sizes`` takes a comma-separated list; ``a,b,c,...,z`` continues the arithmetic or
geometric progression of the three values before ``...`` up to ``z``. From Python::

    from sim.moesd import fit, predict, sigma, speedup
    params = fit(measurements_df, num_experts=64, top_k=8, ridge_point=295.0)
    table = predict(params, [1, 2, 4, 8, 16, 32, 64, 128], gamma=4, alpha=0.9)

Bad input (missing columns, a non-positive batch size, alpha outside [0, 1], an unreadable file)
prints one line ``moesim-moesd: error: ...``, exits with status 2 and writes nothing; outputs are
written atomically (a temporary file renamed into place). ``-o`` never names the command's input,
and an existing ``-o`` file is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, nnls

from workloads.io import FORCE_HELP, atomic_write, check_outputs
from workloads.model import expected_active_experts
from workloads.validation import ConfigError, build, require

PROG = "moesim-moesd"
EXIT_BAD_INPUT = 2

# MoESD's published peak speedups (HumanEval, T=0, gamma=4; REFERENCE.md section 1), by (model, hw)
# as moesim names them; what scripts/moesd_plot.py and scripts/moesd_calibrate.py compare against.
PUBLISHED_PEAKS = {
    ("qwen2_57b_a14b", "2xh800"): 2.29,
    ("qwen2_57b_a14b", "2xa800"): 2.18,
    ("mixtral_8x7b", "2xa800"): 1.79,
    ("qwen2_57b_a14b", "4xa800"): 2.08,
    ("qwen2_57b_a14b", "4xl40"): 2.25,
}

#: measurement columns ``fit`` needs (seconds, except batch_size and gamma)
MEASUREMENT_COLUMNS = ("batch_size", "gamma", "target_1_s", "target_gamma_s", "draft_s", "reject_s")
#: ``predict`` output columns, in order
PREDICTION_COLUMNS = ("batch_size", "gamma", "alpha", "sigma", "target_efficiency", "speedup",
                      "target_1_s", "target_gamma_s", "draft_s", "reject_s")

#: bounds of the fit (see ``fit``): ln(s) per token, and ln G at the knee = ln(s) * lam * RP
LN_S_BOUNDS = (1e-6, 1.0)
LN_G_KNEE_BOUNDS = (1e-6, 50.0)
#: largest ln G anywhere (keeps G finite; far above anything the fit bounds allow)
_MAX_LN_G = 700.0
#: relative residuals divide by max(measured, this) seconds, so a measured 0 is usable
_RESIDUAL_FLOOR_S = 1e-9


# --------------------------------------------------------------------------------------------
# Speculative-decoding arithmetic
# --------------------------------------------------------------------------------------------

def _check_alpha_gamma(alpha, gamma) -> tuple[np.ndarray, int]:
    a = np.asarray(alpha, dtype=float)
    require(bool(np.all(np.isfinite(a)) and np.all((a >= 0) & (a <= 1))), "alpha", _show(alpha),
            "must be in [0, 1] (the per-token acceptance rate)")
    ok = isinstance(gamma, (int, np.integer, float, np.floating)) and not isinstance(gamma, bool) \
        and math.isfinite(gamma) and float(gamma).is_integer() and gamma >= 1
    require(ok, "gamma", _show(gamma), "must be an integer >= 1 (tokens drafted per round)")
    return a, int(gamma)


def _show(value):
    """A value for an error message: scalars as themselves, arrays as a short list."""
    if isinstance(value, np.generic):
        return value.item()
    arr = np.asarray(value)
    if arr.ndim == 0:
        return value
    return arr.tolist() if arr.size <= 8 else f"array of {arr.size} values"


def _out(x: np.ndarray):
    """A 0-d result as a Python float, arrays unchanged."""
    return float(x) if np.ndim(x) == 0 else x


def expected_accepted_tokens(alpha, gamma: int):
    """Expected tokens committed per request per round, bonus token included:
    ``(1 - alpha^(gamma+1)) / (1 - alpha) = 1 + alpha + ... + alpha^gamma`` (``gamma + 1`` at
    alpha = 1). ``alpha`` (per-token acceptance rate, in [0, 1]) may be an array."""
    a, g = _check_alpha_gamma(alpha, gamma)
    total = np.zeros_like(a)
    for _ in range(g + 1):  # Horner: exact at alpha = 0 and 1, no cancellation near 1
        total = total * a + 1.0
    return _out(total)


def sigma(alpha, gamma: int):
    """MoESD's sigma: the fraction of the ``gamma + 1`` positions of a round that are committed,
    ``[(1 - alpha^(gamma+1)) / (1 - alpha)] / (gamma + 1)``; 1 at alpha = 1, ``1/(gamma+1)`` at 0."""
    _, g = _check_alpha_gamma(alpha, gamma)
    return _out(np.asarray(expected_accepted_tokens(alpha, gamma)) / (g + 1))


def _check_times(**times) -> dict[str, np.ndarray]:
    out = {}
    for name, value in times.items():
        v = np.asarray(value, dtype=float)
        positive = name.startswith("t_target")
        ok = bool(np.all(np.isfinite(v)) and (np.all(v > 0) if positive else np.all(v >= 0)))
        require(ok, name, _show(value), "must be a finite time in seconds " + ("> 0" if positive else ">= 0"))
        out[name] = v
    return out


def target_efficiency(t_target_1, t_target_gamma):
    """MoESD's target efficiency ``TE = T_T(B,1) / T_T(B,gamma)`` (dimensionless): a plain decode
    step over a verify pass (both in seconds; the verify pass carries ``gamma + 1`` positions per
    request, see the module docstring). 1 when verifying costs no more than one decode step."""
    t = _check_times(t_target_1=t_target_1, t_target_gamma=t_target_gamma)
    return _out(t["t_target_1"] / t["t_target_gamma"])


def speedup(alpha, gamma: int, t_target_1, t_target_gamma, t_draft_1, t_reject):
    """Speculative decoding's speedup over plain decoding at the same batch size:
    ``sigma (gamma+1) / (gamma t_draft_1/t_target_1 + t_target_gamma/t_target_1 + t_reject/t_target_1)``.

    Times in seconds: ``t_target_1`` one plain decode step of the target (``T_T(B,1)``),
    ``t_target_gamma`` one verify pass (``T_T(B,gamma)``, ``B * (gamma + 1)`` tokens in moesim),
    ``t_draft_1`` one draft step (``T_D(B,1)``; a round runs gamma of them), ``t_reject`` rejection
    sampling once per round. Arguments broadcast like numpy arrays.
    """
    a, g = _check_alpha_gamma(alpha, gamma)
    t = _check_times(t_target_1=t_target_1, t_target_gamma=t_target_gamma, t_draft_1=t_draft_1,
                     t_reject=t_reject)
    t1 = t["t_target_1"]
    cost = (g * t["t_draft_1"] + t["t_target_gamma"] + t["t_reject"]) / t1
    return _out(np.asarray(sigma(a, g)) * (g + 1) / cost)


# --------------------------------------------------------------------------------------------
# The fitted forward-time model (MoESD Alg. 1)
# --------------------------------------------------------------------------------------------

def _ln_g(tokens, ln_s: float, knee_tokens: float) -> np.ndarray:
    t = np.asarray(tokens, dtype=float)
    out = ln_s * np.minimum(t, knee_tokens) + np.log1p(ln_s * np.maximum(t - knee_tokens, 0.0))
    return np.minimum(out, _MAX_LN_G)


def roofline_curve(tokens, s: float, lam: float, ridge_point: float):
    """MoESD's roofline-shaped curve G (dimensionless, G(0) = 1) of a token count t:
    ``s**t`` for ``t <= lam * ridge_point``, else ``s**(lam*RP) * (1 + ln(s) * (t - lam*RP))`` --
    the straight continuation with the same value and slope at the knee ``lam * RP`` tokens.
    ``s > 1`` (growth per token), ``lam > 0``, ``ridge_point`` RP in FLOP/byte. Vectorised in t."""
    require(math.isfinite(s) and s > 1, "s", s, "must be > 1")
    require(math.isfinite(lam) and lam > 0, "lam", lam, "must be > 0")
    require(math.isfinite(ridge_point) and ridge_point > 0, "ridge_point", ridge_point, "must be > 0 FLOP/byte")
    return _out(np.exp(_ln_g(tokens, math.log(s), lam * ridge_point)))


G = roofline_curve  # the paper's name


def active_experts(tokens, num_experts: int, top_k: int):
    """N(t): expected distinct experts t tokens hit (uniform routing, ``workloads.model.
    expected_active_experts``), vectorised in t."""
    t = np.asarray(tokens, dtype=float)
    flat = [expected_active_experts(float(x), num_experts, top_k) for x in t.ravel()]
    return _out(np.asarray(flat, dtype=float).reshape(t.shape))


@dataclass(frozen=True)
class MoESDParams:
    """Fitted constants of MoESD's forward-time model (Alg. 1) plus the model and device constants.

    With ``G`` the roofline curve (``roofline_curve(t, s, lam, ridge_point)``) and
    ``N(t) = E (1 - ((E - K)/E)^t)``, for a batch of B requests:

    * plain decode step ``T_T(B,1) = bias_s + k1_s G(B) + k2_s N(B) + k3_s G(B K / N(B))``;
    * verify pass ``T_T(B,gamma)`` = the same at ``t = B (gamma + 1)`` tokens;
    * one draft step ``T_D(B,1) = draft_bias_s + draft_k_s G(B)``;
    * rejection sampling ``T_reject(B) = reject_bias_s + reject_k_s B``.

    Fields: ``num_experts`` E and ``top_k`` K of the target's MoE layers; ``ridge_point`` RP in
    FLOP/byte (peak FLOP/s / peak bytes/s of the device); ``s`` (> 1, per token) and ``lam`` (> 0;
    the knee of G is at ``lam * RP`` tokens), dimensionless; ``bias_s``, ``k1_s``, ``k3_s`` in
    seconds (per unit of G), ``k2_s`` seconds per active expert, ``draft_bias_s``, ``draft_k_s``
    and ``reject_bias_s`` in seconds, ``reject_k_s`` seconds per request. ``fit_rms_rel_error``:
    root-mean-square relative error of the fit over every measured time (None if not fitted),
    ``fit_rows``: measurements fitted to.
    """

    num_experts: int
    top_k: int
    ridge_point: float
    s: float
    lam: float
    bias_s: float
    k1_s: float
    k2_s: float
    k3_s: float
    draft_bias_s: float
    draft_k_s: float
    reject_bias_s: float
    reject_k_s: float
    fit_rms_rel_error: Optional[float] = None
    fit_rows: int = 0

    def validate(self, key: str = "") -> None:
        p = f"{key}." if key else ""
        require(self.num_experts >= 1, p + "num_experts", self.num_experts, "must be an integer >= 1")
        require(1 <= self.top_k <= self.num_experts, p + "top_k", self.top_k,
                f"must be in [1, num_experts={self.num_experts}]")
        require(math.isfinite(self.ridge_point) and self.ridge_point > 0, p + "ridge_point",
                self.ridge_point, "must be > 0 FLOP/byte")
        require(math.isfinite(self.s) and self.s > 1, p + "s", self.s, "must be > 1")
        require(math.isfinite(self.lam) and self.lam > 0, p + "lam", self.lam, "must be > 0")
        require(math.log(self.s) * self.lam * self.ridge_point <= _MAX_LN_G, p + "lam", self.lam,
                f"s**(lam*ridge_point) must stay finite (ln(s)*lam*ridge_point <= {_MAX_LN_G:g})")
        for name in ("bias_s", "k1_s", "k2_s", "k3_s", "draft_bias_s", "draft_k_s", "reject_bias_s",
                     "reject_k_s"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, p + name, value, "must be a finite number >= 0")
        if self.fit_rms_rel_error is not None:
            require(math.isfinite(self.fit_rms_rel_error) and self.fit_rms_rel_error >= 0,
                    p + "fit_rms_rel_error", self.fit_rms_rel_error, "must be >= 0 or null")
        require(self.fit_rows >= 0, p + "fit_rows", self.fit_rows, "must be >= 0")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def knee_tokens(self) -> float:
        """Token count at G's knee, ``lam * ridge_point``."""
        return self.lam * self.ridge_point

    def to_dict(self) -> dict:
        """Plain mapping (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, mapping, key: str = "") -> "MoESDParams":
        """Build from a plain mapping (ConfigError, one line, naming the key on bad values)."""
        return build(cls, mapping, key)


def _forward_time_s(p: MoESDParams, tokens) -> np.ndarray:
    t = np.asarray(tokens, dtype=float)
    ln_s, knee = math.log(p.s), p.knee_tokens
    n = np.asarray(active_experts(t, p.num_experts, p.top_k))
    return (p.bias_s + p.k1_s * np.exp(_ln_g(t, ln_s, knee)) + p.k2_s * n
            + p.k3_s * np.exp(_ln_g(t * p.top_k / n, ln_s, knee)))


def _check_batch(batch_size) -> np.ndarray:
    b = np.asarray(batch_size, dtype=float)
    ok = b.size > 0 and bool(np.all(np.isfinite(b)) and np.all(b >= 1) and np.all(b == np.round(b)))
    require(ok, "batch_size", _show(batch_size), "must be a positive integer (requests per batch)")
    return b


def ar_time_s(params: MoESDParams, batch_size):
    """T_T(B,1): seconds of one plain (autoregressive) decode step of the target at batch B."""
    return _out(_forward_time_s(params, _check_batch(batch_size)))


def verify_time_s(params: MoESDParams, batch_size, gamma: int):
    """T_T(B,gamma): seconds of one verify pass, ``B * (gamma + 1)`` tokens (see module docstring)."""
    _, g = _check_alpha_gamma(0.0, gamma)
    return _out(_forward_time_s(params, _check_batch(batch_size) * (g + 1)))


def draft_time_s(params: MoESDParams, batch_size):
    """T_D(B,1): seconds of one draft step at batch B (a round runs gamma of them)."""
    b = _check_batch(batch_size)
    return _out(params.draft_bias_s + params.draft_k_s * np.exp(_ln_g(b, math.log(params.s), params.knee_tokens)))


def reject_time_s(params: MoESDParams, batch_size):
    """T_reject(B): seconds of rejection sampling once per round at batch B."""
    return _out(params.reject_bias_s + params.reject_k_s * _check_batch(batch_size))


def predict(params: MoESDParams, batch_sizes, gamma: int, alpha: float) -> pd.DataFrame:
    """Predicted times, sigma, target efficiency and speedup, one row per batch size.

    Columns: ``batch_size, gamma, alpha, sigma, target_efficiency, speedup, target_1_s`` (one plain
    decode step), ``target_gamma_s`` (one verify pass of ``B (gamma+1)`` tokens), ``draft_s`` (one
    draft step), ``reject_s`` (rejection sampling), times in seconds.
    """
    a, g = _check_alpha_gamma(alpha, gamma)
    require(a.ndim == 0, "alpha", _show(alpha), "must be one number")
    b = _check_batch(list(batch_sizes) if not np.isscalar(batch_sizes) else [batch_sizes])
    require(b.ndim == 1, "batch_sizes", _show(batch_sizes), "must be a list of positive integers")
    t1 = np.asarray(ar_time_s(params, b))
    tg = np.asarray(verify_time_s(params, b, g))
    td = np.asarray(draft_time_s(params, b))
    tr = np.asarray(reject_time_s(params, b))
    sig = float(sigma(float(a), g))
    return pd.DataFrame({
        "batch_size": b.astype(int), "gamma": g, "alpha": float(a), "sigma": sig,
        "target_efficiency": t1 / tg, "speedup": np.asarray(speedup(float(a), g, t1, tg, td, tr)),
        "target_1_s": t1, "target_gamma_s": tg, "draft_s": td, "reject_s": tr,
    }, columns=list(PREDICTION_COLUMNS))


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------

def check_measurements(measurements: pd.DataFrame) -> pd.DataFrame:
    """The measurement columns as a clean float frame (ConfigError, one line, on bad input)."""
    if not isinstance(measurements, pd.DataFrame):
        raise ConfigError(f"measurements must be a table (pandas DataFrame), not {type(measurements).__name__}")
    missing = [c for c in MEASUREMENT_COLUMNS if c not in measurements.columns]
    if missing:
        raise ConfigError(f"measurements lack column(s) {', '.join(missing)}; need "
                          f"{', '.join(MEASUREMENT_COLUMNS)}")
    df = pd.DataFrame(index=range(len(measurements)))
    for col in MEASUREMENT_COLUMNS:
        values = pd.to_numeric(measurements[col].reset_index(drop=True), errors="coerce").astype(float)
        bad_num = values.isna() | ~np.isfinite(values)
        if col in ("batch_size", "gamma"):
            bad = bad_num | (values < 1) | (values != values.round())
            allowed = "must be a positive integer"
        elif col.startswith("target"):
            bad = bad_num | (values <= 0)
            allowed = "must be a time in seconds > 0"
        else:
            bad = bad_num | (values < 0)
            allowed = "must be a time in seconds >= 0"
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ConfigError(f"measurements row {i}: {col}={_show(measurements[col].iloc[i])!r} is invalid; {allowed}")
        df[col] = values.to_numpy()
    if len(df) < 3 or df.batch_size.nunique() < 2:
        raise ConfigError(f"measurements have {len(df)} row(s) and {df.batch_size.nunique()} distinct "
                          "batch size(s); the fit needs at least 3 rows and 2 batch sizes")
    return df


def fit(measurements: pd.DataFrame, num_experts: int, top_k: int, ridge_point: float) -> MoESDParams:
    """Fit MoESD's forward-time model (Alg. 1) to measured times; returns ``MoESDParams``.

    ``measurements``: one row per (B, gamma) with ``batch_size``, ``gamma``, ``target_1_s`` (plain
    decode step at batch B), ``target_gamma_s`` (verify pass, ``B (gamma+1)`` tokens),
    ``draft_s`` (one draft step) and ``reject_s`` (rejection sampling), in seconds; other columns
    are ignored. ``num_experts``/``top_k``: the target's E and K; ``ridge_point``: peak FLOP/s /
    peak bytes/s of the device (FLOP/byte).

    Method (deterministic): all four time columns are fitted jointly by bounded nonlinear least
    squares (``scipy.optimize.least_squares``, trust-region reflective) on relative residuals
    ``(model - measured) / measured`` (measured floored at 1 ns), one residual per measured time.
    The unknowns are ``ln s``, ``ln G`` at the knee (``ln(s) * lam * RP``) and the eight linear
    coefficients. Bounds: every bias and k >= 0; ``1e-6 <= ln s <= 1`` (G grows by at most e per
    token); ``1e-6 <= ln s * lam * RP <= 50`` (G rises at most e^50-fold before its knee, so it
    never overflows; a roofline would give about 1). Starts: a fixed grid of (ln s, knee gain)
    where the linear coefficients are solved exactly by non-negative least squares; the three best
    grid points are refined and the lowest-cost result wins. ``fit_rms_rel_error`` is the RMS of
    the relative residuals at the solution.
    """
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
                name, value, "must be an integer >= 1")
    require(top_k <= num_experts, "top_k", top_k, f"must be <= num_experts={num_experts}")
    require(isinstance(ridge_point, (int, float, np.number)) and not isinstance(ridge_point, bool)
            and math.isfinite(ridge_point) and ridge_point > 0, "ridge_point", ridge_point,
            "must be > 0 FLOP/byte (peak FLOP/s / peak bytes/s)")
    df = check_measurements(measurements)
    E, K, RP = int(num_experts), int(top_k), float(ridge_point)

    b = df.batch_size.to_numpy()
    tok_v = b * (df.gamma.to_numpy() + 1)
    t_tok = np.concatenate([b, tok_v])  # target rows: plain decode, then verify
    n_t = np.asarray(active_experts(t_tok, E, K))
    per_expert = t_tok * K / n_t
    y_t = np.concatenate([df.target_1_s.to_numpy(), df.target_gamma_s.to_numpy()])
    y_d, y_r = df.draft_s.to_numpy(), df.reject_s.to_numpy()
    w_t, w_d, w_r = (1.0 / np.maximum(y, _RESIDUAL_FLOOR_S) for y in (y_t, y_d, y_r))

    def designs(ln_s, gain):
        knee = gain / ln_s
        g_t = np.exp(_ln_g(t_tok, ln_s, knee))
        g_e = np.exp(_ln_g(per_expert, ln_s, knee))
        a_t = np.column_stack([np.ones_like(t_tok), g_t, n_t, g_e])
        a_d = np.column_stack([np.ones_like(b), np.exp(_ln_g(b, ln_s, knee))])
        return a_t, a_d

    a_r = np.column_stack([np.ones_like(b), b])

    def residuals(x):
        a_t, a_d = designs(x[0], x[1])
        return np.concatenate([(a_t @ x[2:6] - y_t) * w_t, (a_d @ x[6:8] - y_d) * w_d,
                               (a_r @ x[8:10] - y_r) * w_r])

    def nnls_w(a, y, w):
        try:
            coef, _ = nnls(a * w[:, None], y * w)
        except RuntimeError:  # iteration limit on a degenerate design
            coef = np.zeros(a.shape[1])
        return coef

    coef_r = nnls_w(a_r, y_r, w_r)
    starts = []
    for ln_s in np.logspace(-5, 0, 16):
        for gain in (0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
            a_t, a_d = designs(ln_s, gain)
            x = np.concatenate([[ln_s, gain], nnls_w(a_t, y_t, w_t), nnls_w(a_d, y_d, w_d), coef_r])
            starts.append((float(np.sum(residuals(x) ** 2)), len(starts), x))
    starts.sort(key=lambda item: (item[0], item[1]))

    lower = np.array([LN_S_BOUNDS[0], LN_G_KNEE_BOUNDS[0]] + [0.0] * 8)
    upper = np.array([LN_S_BOUNDS[1], LN_G_KNEE_BOUNDS[1]] + [np.inf] * 8)
    best = None
    for _, _, x0 in starts[:3]:
        x0 = np.clip(x0, lower, upper)
        sol = least_squares(residuals, x0, bounds=(lower, upper), method="trf", x_scale="jac",
                            ftol=1e-14, xtol=1e-14, gtol=1e-14, max_nfev=4000)
        if best is None or sol.cost < best.cost:
            best = sol
    x = best.x
    res = residuals(x)
    ln_s, gain = float(x[0]), float(x[1])
    return MoESDParams(
        num_experts=E, top_k=K, ridge_point=RP, s=math.exp(ln_s), lam=gain / ln_s / RP,
        bias_s=float(x[2]), k1_s=float(x[3]), k2_s=float(x[4]), k3_s=float(x[5]),
        draft_bias_s=float(x[6]), draft_k_s=float(x[7]), reject_bias_s=float(x[8]),
        reject_k_s=float(x[9]), fit_rms_rel_error=float(np.sqrt(np.mean(res ** 2))),
        fit_rows=len(df))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_input_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file")


def read_measurements(path) -> pd.DataFrame:
    """Measurements from a CSV (``.csv``) or Parquet (``.parquet``/``.pq``) file."""
    path = Path(path)
    _check_input_file(path, "measurements")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as exc:  # pandas/pyarrow raise many kinds; any of them means unreadable
        raise ConfigError(f"measurements {path} is not a readable {suffix[1:]} file ({_first_line(exc)})") from None
    raise ConfigError(f"measurements {path} has suffix {suffix or '(none)'!r}; expected .csv or .parquet")


def write_params(path, params: MoESDParams) -> None:
    """Write ``params`` as JSON, atomically."""
    text = json.dumps(params.to_dict(), indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_params(path) -> MoESDParams:
    """``MoESDParams`` from a JSON file written by ``write_params`` / ``moesim-moesd fit``."""
    path = Path(path)
    _check_input_file(path, "params")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"params {path} is not readable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params {path} must hold a JSON object of MoESDParams fields")
    try:
        return MoESDParams.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"params {path}: {exc}") from None


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; ``"1,2,4,...,128"`` continues the geometric (or arithmetic)
    progression of the three values before ``...`` up to the value after it."""
    where = f"--batch-sizes={text!r}"
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{where} is invalid; expected comma-separated positive integers, e.g. 1,2,4")
    out: list[int] = []
    i = 0
    while i < len(items):
        item = items[i]
        if item in ("...", "\u2026"):
            if len(out) < 3 or i + 1 >= len(items) or items[i + 1] in ("...", "\u2026"):
                raise ConfigError(f"{where} is invalid; '...' needs three values before it and one after, "
                                  "e.g. 1,2,4,...,128")
            a, b, c = out[-3:]
            end = _positive_int(items[i + 1], where)
            if b > a and b % a == 0 and c == b * (b // a):
                step = lambda v, r=b // a: v * r  # noqa: E731  geometric
            elif b > a and b - a == c - b:
                step = lambda v, d=b - a: v + d  # noqa: E731  arithmetic
            else:
                raise ConfigError(f"{where} is invalid; {a},{b},{c} is not an increasing arithmetic "
                                  "or integer-ratio geometric progression")
            v = step(c)
            while v < end:
                out.append(v)
                v = step(v)
            if v != end:
                raise ConfigError(f"{where} is invalid; {end} is not on the progression {a},{b},{c},...")
            out.append(end)
            i += 2
            continue
        out.append(_positive_int(item, where))
        i += 1
    return out


def _positive_int(item: str, where: str) -> int:
    try:
        value = int(item)
    except ValueError:
        raise ConfigError(f"{where} is invalid; {item!r} is not an integer") from None
    if value < 1:
        raise ConfigError(f"{where} is invalid; batch sizes must be positive integers, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class _UsageError(Exception):
    """argparse's usage error, reported in one line."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(message)


PARAM_UNITS = {"num_experts": "", "top_k": "", "ridge_point": "FLOP/byte", "s": "per token",
               "lam": "(knee at lam*RP tokens)", "bias_s": "s", "k1_s": "s", "k2_s": "s/expert",
               "k3_s": "s", "draft_bias_s": "s", "draft_k_s": "s", "reject_bias_s": "s",
               "reject_k_s": "s/request", "fit_rms_rel_error": "", "fit_rows": ""}


def _cmd_fit(args) -> int:
    check_outputs([("-o", args.output)], [("MEASUREMENTS", args.measurements)], args.force)
    params = fit(read_measurements(args.measurements), args.num_experts, args.top_k, args.ridge_point)
    write_params(args.output, params)
    for key, value in params.to_dict().items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{key:>18} = {shown:<14} {PARAM_UNITS.get(key, '')}".rstrip())
    print(f"knee of G at {params.knee_tokens:.4g} tokens; fit RMS relative error "
          f"{100 * params.fit_rms_rel_error:.3g}% over {params.fit_rows} measurements")
    print(f"wrote {args.output}")
    return 0


def _cmd_predict(args) -> int:
    check_outputs([("-o", args.output)], [("PARAMS.json", args.params)], args.force)
    params = read_params(args.params)
    table = predict(params, parse_batch_sizes(args.batch_sizes), args.gamma, args.alpha)
    if args.output:
        atomic_write(args.output, lambda tmp: table.to_csv(tmp, index=False))
    fmt = {c: "{:.4f}".format for c in ("sigma", "target_efficiency", "speedup")}
    fmt.update({c: (lambda v: f"{1e3 * v:.4g}") for c in ("target_1_s", "target_gamma_s", "draft_s", "reject_s")})
    shown = table.rename(columns={c: c[:-2] + "_ms" for c in ("target_1_s", "target_gamma_s", "draft_s", "reject_s")})
    fmt = {(k[:-2] + "_ms" if k.endswith("_s") else k): f for k, f in fmt.items()}
    print(shown.to_string(index=False, formatters=fmt))
    peak = table.loc[table.speedup.idxmax()]
    print(f"peak speedup {peak.speedup:.3f}x at batch size {int(peak.batch_size)} "
          f"(sigma {table.sigma.iloc[0]:.4f}, gamma {args.gamma}, alpha {args.alpha:g})")
    if args.output:
        print(f"wrote {args.output}")
    return 0


DESCRIPTION = ("MoESD's analytical speedup model of speculative decoding for MoE (arXiv 2505.19645): "
               "fit its forward-time model to measured step times, then predict speedup and target "
               "efficiency against batch size (see sim/moesd.py).")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description=DESCRIPTION)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    f = subs.add_parser("fit", help="fit MoESD's forward-time model to measured times",
                        description="Fit MoESD's forward-time model (Alg. 1) to measured step times "
                                    "and write the parameters as JSON.")
    f.add_argument("measurements", metavar="MEASUREMENTS", type=Path,
                   help="CSV or Parquet with columns " + ", ".join(MEASUREMENT_COLUMNS))
    f.add_argument("--num-experts", type=int, required=True, metavar="E", help="routed experts per MoE layer")
    f.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    f.add_argument("--ridge-point", type=float, required=True, metavar="RP",
                   help="peak FLOP/s / peak bytes/s of the device (FLOP/byte), e.g. 295 for H800")
    f.add_argument("-o", "--output", type=Path, required=True, metavar="PARAMS.json",
                   help="where to write the fitted parameters (atomically)")
    f.add_argument("--force", action="store_true", help=FORCE_HELP)
    f.set_defaults(func=_cmd_fit)
    p = subs.add_parser("predict", help="predict speedup and target efficiency against batch size",
                        description="Predict times, sigma, target efficiency and speedup per batch size.")
    p.add_argument("params", metavar="PARAMS.json", type=Path, help="parameters from moesim-moesd fit")
    p.add_argument("--batch-sizes", default="1,2,4,...,128", metavar="B1,B2,...",
                   help="batch sizes; 'a,b,c,...,z' continues a progression (default 1,2,4,...,128)")
    p.add_argument("--gamma", type=int, required=True, help="tokens drafted per round (>= 1)")
    p.add_argument("--alpha", type=float, required=True, help="per-token acceptance rate in [0, 1]")
    p.add_argument("-o", "--output", type=Path, metavar="PREDICTIONS.csv", help="also write the table as CSV")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moesim-moesd``; returns the exit status (2 on bad input, after one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except _UsageError as exc:
        msg = str(exc)
    except ConfigError as exc:
        msg = _first_line(exc)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
