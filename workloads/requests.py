"""Requests a serving run handles: arrival times, prompt and output lengths, and per-token routing.

``WorkloadConfig`` is the ``workload`` node of the Hydra config (``conf/workload/*.yaml``).
``build_requests`` turns it into a list of :class:`Request`, either from the synthetic routing
generator (``kind: synthetic``) or from a router trace on disk (``kind: trace``). For a dense
model (``num_experts: 0``) the synthetic workload has the same arrivals and lengths and empty
routing (``experts`` of shape ``[positions, 0, 0]``); a router trace does not apply to it.

Lengths: ``output_len`` counts generated tokens. The first one comes out of the prefill pass, so a
request runs ``output_len - 1`` decode iterations and its routing holds ``prompt_len + output_len - 1``
token positions (the last generated token is never fed back).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from .model import ModelSpec
from .validation import ConfigError, positive, require


@dataclass(frozen=True)
class WorkloadConfig:
    """What arrives and how it routes. Lengths in tokens, rates in requests per second."""

    kind: Literal["synthetic", "trace"] = "synthetic"
    batch_size: int = 1                 # maximum requests decoded together (continuous batching)
    # synthetic: how many (null = max(8, 2 x batch_size), so a batch always fills); trace: the
    # first N requests (null = all)
    num_requests: Optional[int] = None
    prompt_len: int = 128
    output_len: int = 64
    length_dist: Literal["fixed", "uniform"] = "fixed"
    length_spread: float = 0.5          # uniform: lengths drawn in [len*(1-spread), len*(1+spread)]
    arrival: Literal["all_at_once", "poisson"] = "all_at_once"
    arrival_rate_per_s: float = 1.0     # poisson only
    max_prefill_tokens: int = 8192      # tokens one prefill iteration may carry (chunking not modelled)
    # Synthetic routing (see workloads/synthetic.py for the exact meaning of each knob).
    routing: Literal["uniform", "skewed", "temporal", "affinity", "realistic"] = "realistic"
    popularity_max_over_mean: float = 1.34
    reuse_prob: Optional[float] = None  # null = derived from the Mixtral measurement (see synthetic.py)
    affinity_strength: float = 1.0
    # Gate-lookahead predictions stored with synthetic routing (read by policy/prefetch=lookahead):
    # chance each expert of layer l+1 is among those predicted at layer l; null = none stored.
    # 0.85: mixtral-offloading (arXiv 2312.17238) reports guesses one layer ahead right 80-90% of the time.
    lookahead_accuracy: Optional[float] = 0.85
    # Trace replay.
    path: Optional[str] = None
    on_ragged: Literal["error", "truncate"] = "error"

    def validate(self, key: str = "workload") -> None:
        positive(self, key, "batch_size", "prompt_len", "output_len", "max_prefill_tokens",
                 "popularity_max_over_mean")
        if self.num_requests is not None:
            positive(self, key, "num_requests")
        if self.arrival == "poisson":
            positive(self, key, "arrival_rate_per_s")
        require(0.0 <= self.length_spread < 1.0, f"{key}.length_spread", self.length_spread,
                "must be in [0, 1)")
        require(self.popularity_max_over_mean >= 1.0, f"{key}.popularity_max_over_mean",
                self.popularity_max_over_mean, "must be >= 1 (1 = no skew)")
        if self.reuse_prob is not None:
            require(0.0 <= self.reuse_prob <= 1.0, f"{key}.reuse_prob", self.reuse_prob, "must be in [0, 1]")
        require(self.affinity_strength >= 0.0, f"{key}.affinity_strength", self.affinity_strength, "must be >= 0")
        if self.lookahead_accuracy is not None:
            require(0.0 <= self.lookahead_accuracy <= 1.0, f"{key}.lookahead_accuracy", self.lookahead_accuracy,
                    "must be in [0, 1] or null")
        if self.kind == "trace":
            if not self.path:
                raise ConfigError(f"{key}.path is required with workload=trace; add {key}.path=FILE "
                                  f"(a router-trace Parquet file)")
        require(self.prompt_len <= self.max_prefill_tokens, f"{key}.prompt_len", self.prompt_len,
                f"must be <= workload.max_prefill_tokens={self.max_prefill_tokens}")


@dataclass
class Request:
    """One request: when it arrives, its lengths and the experts each of its tokens picks.

    ``experts[t, m, :]`` are the top-k expert ids of token position ``t`` at the ``m``-th MoE layer
    (``model.moe_layers[m]``); positions ``0 .. prompt_len-1`` are the prompt.
    """

    request_id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    # int16 [prompt_len + output_len - 1, num_moe_layers, top_k] ([.., 0, 0] if dense), or a
    # ``LazyRouting`` that builds it on first read of ``experts``
    _experts: "np.ndarray | LazyRouting"
    # Optional: at [t, m, :] the experts predicted for MoE layer m+1 from layer m's state (-1 = none).
    # Read it through ``predictions()``: synthetic workloads build it on first read (``_source``).
    predicted: Optional[np.ndarray] = None
    _source: Optional["SyntheticPredictions"] = field(default=None, repr=False, compare=False)

    @property
    def experts(self) -> np.ndarray:
        """The routing (see the class docstring); synthetic routing is generated on first read."""
        x = self._experts
        if not isinstance(x, np.ndarray):
            x = self._experts = x.build()
        return x

    @property
    def positions(self) -> int:
        """Token positions of the routing (``prompt_len + output_len - 1``), without building it."""
        x = self._experts
        return int(x.shape[0]) if isinstance(x, np.ndarray) else x.positions

    @property
    def has_predictions(self) -> bool:
        """Whether ``predictions()`` gives an array (a trace with them, or a synthetic workload)."""
        return self.predicted is not None or self._source is not None

    def predictions(self) -> Optional[np.ndarray]:
        """The gate-lookahead predictions (``predicted``), built now if they are synthetic and unread."""
        if self.predicted is None and self._source is not None:
            self._source.build()
        return self.predicted

    def __post_init__(self) -> None:
        expected = self.prompt_len + self.output_len - 1
        if self.positions != expected:
            raise ConfigError(
                f"request {self.request_id}: routing has {self.positions} token positions, "
                f"expected prompt_len + output_len - 1 = {expected}")


class LazyRouting:
    """Request ``index``'s rows of a ``workloads.synthetic.RoutingStream``, built when first read."""

    __slots__ = ("stream", "index", "positions")

    def __init__(self, stream, index: int):
        self.stream, self.index = stream, index
        self.positions = stream.positions(index)

    def build(self) -> np.ndarray:
        return self.stream.request(self.index)


class SyntheticPredictions:
    """Gate-lookahead predictions of a synthetic workload, built only when a policy reads them.

    A policy without ``uses_predictions`` (LRU, ...) never does, so a serving-size run does not pay
    for them (~1 ms per token position for Qwen3-30B-A3B). All requests' predictions come from
    one stream, in request order, on the first read of any of them: the same arrays whenever and
    in whatever order they are read.
    """

    def __init__(self, requests: Sequence["Request"], accuracy: float, num_experts: int, seed: int):
        self._requests = list(requests)
        self.accuracy = accuracy
        self.num_experts = num_experts
        self.seed = seed
        self.built = False

    def build(self) -> None:
        if self.built:
            return
        from .synthetic import lookahead_predictions

        pred_rng = np.random.default_rng([self.seed, 0x10A4])  # its own stream: routing stays as without it
        for r in self._requests:
            r.predicted = lookahead_predictions(r.experts, self.accuracy, self.num_experts, pred_rng)
            r._source = None
        self._requests = []
        self.built = True


MIN_DEFAULT_REQUESTS = 8   # synthetic workloads with num_requests=null: at least this many


def synthetic_request_count(cfg: WorkloadConfig) -> int:
    """Requests a synthetic workload builds: ``num_requests``, or max(8, 2 x batch_size) when null
    (twice the batch so that full batches run and requests also arrive into running batches)."""
    if cfg.num_requests is not None:
        return cfg.num_requests
    return max(MIN_DEFAULT_REQUESTS, 2 * cfg.batch_size)


def routing_bytes_estimate(cfg: WorkloadConfig, model: ModelSpec) -> float:
    """Bytes a synthetic workload's routing takes in memory: every token's top-k ids at every MoE
    layer as int16 (``workloads.synthetic``), twice with gate-lookahead predictions (built only if a
    policy reads them, counted anyway), plus ~2 KB of Python objects per request. An upper bound,
    also for ``length_dist=uniform``."""
    n = synthetic_request_count(cfg)
    stretch = 1.0 + (cfg.length_spread if cfg.length_dist == "uniform" else 0.0)
    tokens = n * (min(cfg.prompt_len * stretch, cfg.max_prefill_tokens) + cfg.output_len * stretch)
    copies = 2 if cfg.lookahead_accuracy is not None else 1
    return tokens * model.num_moe_layers * model.top_k * 2 * copies + 2048.0 * n


def available_memory_bytes() -> Optional[float]:
    """Memory this machine can still give (``MemAvailable`` of /proc/meminfo), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(cfg: WorkloadConfig, model: ModelSpec, key: str = "workload") -> None:
    """Refuse, with the estimate, a synthetic workload whose routing would not fit in memory."""
    need = routing_bytes_estimate(cfg, model)
    tokens_each = cfg.prompt_len + cfg.output_len
    have = available_memory_bytes()
    if have is not None and need > 0.8 * have:
        raise ConfigError(
            f"{key}.num_requests={synthetic_request_count(cfg)} needs about {need / 1e9:.3g} GB for its routing "
            f"(up to {tokens_each:.0f} tokens each x {model.num_moe_layers} MoE layers x top-{model.top_k} "
            f"expert ids), "
            f"more than the {have / 1e9:.3g} GB available; use fewer or shorter requests")


def _lengths(base: int, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    if cfg.length_dist == "fixed":
        return np.full(n, base, dtype=np.int64)
    lo = max(1, int(round(base * (1 - cfg.length_spread))))
    hi = max(lo, int(round(base * (1 + cfg.length_spread))))
    return rng.integers(lo, hi + 1, size=n)


def arrival_times_s(n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Arrival time of each request: all at t=0, or a Poisson process of the configured rate."""
    if cfg.arrival == "all_at_once":
        return np.zeros(n)
    gaps = rng.exponential(1.0 / cfg.arrival_rate_per_s, size=n)
    return np.cumsum(gaps) - gaps[0]  # first request at t=0


def build_requests(cfg: WorkloadConfig, model: ModelSpec, seed: int) -> list[Request]:
    """Requests for a run; deterministic in (cfg, model, seed)."""
    rng = np.random.default_rng(seed)
    if cfg.kind == "trace":
        require(not model.is_dense, "workload", "trace",
                f"model={model.name} is dense (num_experts=0): router traces do not apply; use workload=synthetic")
        from .trace import load_trace_requests

        routed = load_trace_requests(cfg.path, model, on_ragged=cfg.on_ragged, limit=cfg.num_requests)
        arrivals = arrival_times_s(len(routed), cfg, rng)
        return [Request(r.request_id, float(a), r.prompt_len, r.output_len, r.experts, r.predicted)
                for r, a in zip(routed, arrivals)]

    from .synthetic import RoutingConfig, RoutingStream

    check_fits_in_memory(cfg, model)
    n = synthetic_request_count(cfg)
    prompt = _lengths(cfg.prompt_len, n, cfg, rng)
    output = _lengths(cfg.output_len, n, cfg, rng)
    prompt = np.minimum(prompt, cfg.max_prefill_tokens)
    arrivals = arrival_times_s(n, cfg, rng)
    routing_cfg = RoutingConfig.from_workload(cfg)
    # Routing is generated as far as it is read (requests in arrival order, one stream): the
    # first passes run before the last request's routing exists. The stream owns rng from here.
    stream = RoutingStream(model, routing_cfg, [int(p + o - 1) for p, o in zip(prompt, output)], rng)
    requests = [Request(i, float(arrivals[i]), int(prompt[i]), int(output[i]), LazyRouting(stream, i))
                for i in range(n)]
    if cfg.lookahead_accuracy is not None:
        source = SyntheticPredictions(requests, cfg.lookahead_accuracy, model.num_experts, seed)
        for r in requests:
            r._source = source
    return requests
