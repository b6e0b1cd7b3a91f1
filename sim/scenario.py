"""A ``Scenario``: the typed, validated form of a composed config (model + hw + workload + policies).

``build_scenario`` is the single place where a Hydra config becomes typed objects; every value is
checked there, so a bad value fails before any simulation runs, with one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from hw.system import SystemSpec
from workloads.model import ModelSpec
from workloads.requests import WorkloadConfig
from workloads.validation import ConfigError, build, require

from .policies.base import PrefetchConfig, prefetch_policy_class


@dataclass(frozen=True)
class SimConfig:
    """The ``sim`` node: engine options that are not part of the modelled system."""

    timeline: bool = False
    progress: Union[bool, Literal["auto"]] = "auto"
    gpu: int = 0
    initial_residency: Literal["fill", "empty"] = "fill"
    kv_cache_tokens: Optional[int] = None
    activation_bytes: Optional[float] = None

    def validate(self, key: str = "sim") -> None:
        require(self.gpu >= 0, f"{key}.gpu", self.gpu, "must be >= 0")
        if self.kv_cache_tokens is not None:
            require(self.kv_cache_tokens >= 0, f"{key}.kv_cache_tokens", self.kv_cache_tokens, "must be >= 0")
        if self.activation_bytes is not None:
            require(self.activation_bytes >= 0, f"{key}.activation_bytes", self.activation_bytes, "must be >= 0")


@dataclass(frozen=True)
class NamedPolicyConfig:
    """Policy groups that have only ``none`` so far (speculation: issue 5, EP: later issues)."""

    name: str = "none"


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    hw: SystemSpec
    workload: WorkloadConfig
    prefetch: PrefetchConfig
    speculation: NamedPolicyConfig
    ep: NamedPolicyConfig
    sim: SimConfig
    seed: int = 0

    def choices(self) -> dict[str, Any]:
        """The composed config's key choices, as they go into summary.json."""
        return {
            "model": self.model.name,
            "hw": self.hw.name,
            "workload": self.workload.kind,
            "batch_size": self.workload.batch_size,
            "num_requests": self.workload.num_requests,
            "prompt_len": self.workload.prompt_len,
            "output_len": self.workload.output_len,
            "routing": self.workload.routing if self.workload.kind == "synthetic" else None,
            "trace_path": self.workload.path,
            "prefetch": self.prefetch.name,
            "capacity_per_layer": self.prefetch.capacity_per_layer,
            "cache_scope": self.prefetch.cache_scope,
            "speculation": self.speculation.name,
            "ep": self.ep.name,
            "seed": self.seed,
        }


def _only_none(cfg: Mapping[str, Any] | None, key: str) -> NamedPolicyConfig:
    out = build(NamedPolicyConfig, cfg or {}, key)
    require(out.name == "none", f"{key}.name", out.name, "not available yet; choose one of: none")
    return out


def build_scenario(cfg: Mapping[str, Any]) -> Scenario:
    """Typed scenario from a plain mapping (e.g. ``OmegaConf.to_container(cfg, resolve=True)``)."""
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    allowed = {"model", "hw", "workload", "policy", "sim", "seed"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a known top-level key; allowed: {', '.join(sorted(allowed))}")
    model = build(ModelSpec, cfg.get("model"), "model")
    hw = build(SystemSpec, cfg.get("hw"), "hw")
    workload = build(WorkloadConfig, cfg.get("workload"), "workload")
    policy = dict(cfg.get("policy") or {})
    unknown = sorted(set(policy) - {"prefetch", "speculation", "ep"})
    if unknown:
        raise ConfigError(f"policy.{unknown[0]} is not a known policy group; allowed: ep, prefetch, speculation")
    prefetch_cfg = dict(policy.get("prefetch") or {"name": "lru"})
    policy_cls = prefetch_policy_class(str(prefetch_cfg.get("name", "lru")))
    prefetch = build(policy_cls.Config, prefetch_cfg, "policy.prefetch")
    sim = build(SimConfig, cfg.get("sim"), "sim")
    seed = cfg.get("seed", 0)
    require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "seed", seed,
            "must be a non-negative integer")
    require(sim.gpu < hw.num_gpus, "sim.gpu", sim.gpu, f"hw={hw.name} has GPUs 0..{hw.num_gpus - 1}")
    return Scenario(model, hw, workload, prefetch, _only_none(policy.get("speculation"), "policy.speculation"),
                    _only_none(policy.get("ep"), "policy.ep"), sim, seed)
