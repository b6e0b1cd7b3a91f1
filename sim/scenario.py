"""A ``Scenario``: the typed, validated form of a composed config (model + hw + workload + policies).

``build_scenario`` is the single place where a Hydra config becomes typed objects; every value is
checked there, so a bad value fails before any simulation runs, with one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from hw.system import SystemSpec
from workloads.model import ModelSpec
from workloads.requests import WorkloadConfig, synthetic_request_count
from workloads.validation import ConfigError, build, require

from .policies.base import PrefetchConfig, prefetch_policy_class
from .policies.speculation import SpeculationConfig
from .schedulers import SchedulerConfig


@dataclass(frozen=True)
class SimConfig:
    """The ``sim`` node: engine options that are not part of the modelled system."""

    timeline: bool = False
    progress: Union[bool, Literal["auto"]] = "auto"
    gpu: int = 0
    initial_residency: Literal["fill", "empty"] = "fill"
    kv_cache_tokens: Optional[int] = None
    activation_bytes: Optional[float] = None
    # Host-side time per forward pass the GPU waits for, beyond the kernels: the serving engine's
    # scheduling, input preparation, sampling (vLLM's own profile of v0.5.3 found the GPU idle for
    # most of a Llama-3-8B decode step on an H100). 0 = an ideal engine. Charged once per target
    # pass (other_compute_s) and once per draft-model pass (draft_s).
    pass_overhead_s: float = 0.0

    def validate(self, key: str = "sim") -> None:
        require(self.gpu >= 0, f"{key}.gpu", self.gpu, "must be >= 0")
        if self.kv_cache_tokens is not None:
            require(self.kv_cache_tokens >= 0, f"{key}.kv_cache_tokens", self.kv_cache_tokens, "must be >= 0")
        require(self.pass_overhead_s >= 0, f"{key}.pass_overhead_s", self.pass_overhead_s, "must be >= 0 (seconds)")
        if self.activation_bytes is not None:
            require(self.activation_bytes >= 0, f"{key}.activation_bytes", self.activation_bytes, "must be >= 0")


@dataclass(frozen=True)
class NamedPolicyConfig:
    """Policy groups that have only ``none`` so far (EP: a later issue)."""

    name: str = "none"


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    hw: SystemSpec
    workload: WorkloadConfig
    prefetch: PrefetchConfig
    speculation: SpeculationConfig
    ep: NamedPolicyConfig
    sim: SimConfig
    seed: int = 0
    draft_model: Optional[ModelSpec] = None   # policy.speculation.draft_model, resolved (drafter=model)
    scheduler: SchedulerConfig = SchedulerConfig()   # scheduler=NAME (sim/schedulers.py)

    def choices(self) -> dict[str, Any]:
        """The composed config's key choices, as they go into summary.json."""
        return {
            "model": self.model.name,
            "scheduler": self.scheduler.name,
            "hw": self.hw.name,
            "tensor_parallel": self.hw.tensor_parallel,
            "workload": self.workload.kind,
            "batch_size": self.workload.batch_size,
            "num_requests": (synthetic_request_count(self.workload) if self.workload.kind == "synthetic"
                             else self.workload.num_requests),
            "prompt_len": self.workload.prompt_len,
            "output_len": self.workload.output_len,
            "routing": self.workload.routing if self.workload.kind == "synthetic" else None,
            "trace_path": self.workload.path,
            "prefetch": self.prefetch.name,
            "capacity_per_layer": self.prefetch.capacity_per_layer,
            "cache_scope": self.prefetch.cache_scope,
            "speculation": self.speculation.name,
            "spec_k": self.speculation.k if self.speculation.name != "none" else None,
            "drafter": self.speculation.drafter if self.speculation.name != "none" else None,
            "spec_alpha": (self.speculation.iid_alpha if self.speculation.name != "none"
                           and self.speculation.acceptance == "iid" else None),
            "draft_model": self.draft_model.name if self.draft_model is not None else None,
            "ep": self.ep.name,
            "seed": self.seed,
        }


def _ep_config(cfg: Mapping[str, Any] | None, key: str) -> NamedPolicyConfig:
    from .policies.ep import EP_PLACEMENTS

    out = build(NamedPolicyConfig, cfg or {}, key)
    EP_PLACEMENTS.get(out.name)
    return out


def build_scenario(cfg: Mapping[str, Any]) -> Scenario:
    """Typed scenario from a plain mapping (e.g. ``OmegaConf.to_container(cfg, resolve=True)``)."""
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    allowed = {"model", "hw", "workload", "policy", "scheduler", "sim", "seed"}
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
    model.tensor_shard(hw.tensor_parallel)   # a split the heads do not allow fails here, naming the key
    speculation = build(SpeculationConfig, policy.get("speculation") or {}, "policy.speculation")
    draft = None
    if speculation.name != "none" and speculation.drafter == "model":
        draft = load_model_spec(speculation.draft_model, "policy.speculation.draft_model")
    scheduler = build(SchedulerConfig, cfg.get("scheduler"), "scheduler")
    return Scenario(model, hw, workload, prefetch, speculation, _ep_config(policy.get("ep"), "policy.ep"), sim,
                    seed, draft, scheduler)


def load_model_spec(name: str, key: str = "model") -> ModelSpec:
    """The ModelSpec of ``conf/model/NAME.yaml`` (a draft model named by a string key)."""
    from importlib import resources

    from omegaconf import OmegaConf

    folder = resources.files("conf").joinpath("model")
    options = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    require(name in options, key, name, f"not a known model; choose one of: {', '.join(options)}")
    cfg = OmegaConf.to_container(OmegaConf.create(folder.joinpath(f"{name}.yaml").read_text()), resolve=True)
    return build(ModelSpec, cfg, key)
