"""Composing the Hydra config outside the CLI (tests, notebooks, benchmarks) and checking group names.

``compose_scenario(["model=qwen2_57b_a14b", "workload.batch_size=8"])`` returns the same typed
``Scenario`` the ``moesim`` command would run with those overrides.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from importlib import resources
from typing import Any, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from hw.system import SystemSpec
from workloads.model import ModelSpec
from workloads.requests import WorkloadConfig
from workloads.validation import ConfigError

from .policies.speculation import SpeculationConfig
from .schedulers import SchedulerConfig
from .scenario import NamedPolicyConfig, Scenario, SimConfig, build_scenario

CONFIG_MODULE = "conf"
CONFIG_NAME = "config"
# Config groups a user picks an option of on the command line (DESIGN.md).
GROUPS = ("model", "hw", "hw/gpu", "hw/cpu", "hw/link", "workload", "scheduler", "policy/prefetch",
          "policy/speculation", "policy/ep", "experiment")


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (the YAML files in ``conf/GROUP/``)."""
    root = resources.files(CONFIG_MODULE)
    folder = root.joinpath(*group.split("/"))
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _nested_dataclass(tp: Any) -> Optional[type]:
    """The dataclass a field holds (``Spec`` or ``Optional[Spec]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def schema_node(cls: type) -> type:
    """A Hydra structured-config node with every init field of the typed dataclass ``cls``.

    Each key exists with the dataclass's default (``???`` where it has none), so ``KEY=VALUE``
    works on the command line for every documented key without Hydra's ``+``, and a misspelt key is
    still refused (struct mode). Values are typed ``Any`` here: ``workloads.validation.build`` does
    the typing and checking with moesim's one-line errors. Nested specs (``hw.gpu``,
    ``hw.host_link``, an optional ``hw.gpu_link``) become nested nodes.
    """
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        nested = _nested_dataclass(hints[f.name])
        if nested is not None:
            node = schema_node(nested)
            if f.default is None:
                fields.append((f.name, Optional[node], dataclasses.field(default=None)))
            else:
                fields.append((f.name, node, dataclasses.field(default_factory=node)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, Any, dataclasses.field(default_factory=f.default_factory)))
        else:
            default = MISSING if f.default is dataclasses.MISSING else f.default
            fields.append((f.name, Any, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Node", fields)


SCHEMA_NAME = "moesim_schema"


def _root_schema() -> type:
    """The whole config's schema: every typed node but ``policy.prefetch``, whose keys depend on the
    policy (each ``conf/policy/prefetch/NAME.yaml`` lists all of its policy's keys; a test checks)."""
    def nested(name: str, node: type) -> tuple:
        return name, node, dataclasses.field(default_factory=node)

    policy = dataclasses.make_dataclass("PolicyNode", [
        ("prefetch", Any, dataclasses.field(default=None)),
        nested("speculation", schema_node(SpeculationConfig)),
        nested("ep", schema_node(NamedPolicyConfig)),
    ])
    return dataclasses.make_dataclass("MoesimNode", [
        *[nested(name, schema_node(cls)) for name, cls in
          (("model", ModelSpec), ("hw", SystemSpec), ("workload", WorkloadConfig), ("sim", SimConfig),
           ("scheduler", SchedulerConfig))],
        nested("policy", policy),
        ("seed", Any, dataclasses.field(default=0)),
    ])


def register_schema() -> None:
    """Put the schema into Hydra's ConfigStore (``conf/config.yaml`` lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=_root_schema())


register_schema()   # on import: the CLI, compose_scenario and launcher workers all import this module


_SWEEP_FN = re.compile(r"^(choice)\((.*)\)$")


def check_group_overrides(args: Sequence[str]) -> None:
    """Raise a one-line ConfigError for ``GROUP=OPTION`` arguments naming an option that does not exist.

    Understands plain values, comma-separated sweeps and ``choice(a,b)``; other sweep functions and
    interpolations are left to Hydra.
    """
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        name, value = arg.split("=", 1)
        group = name.lstrip("+~").split("@")[0]
        if group not in GROUPS or "${" in value or "(" in value and not _SWEEP_FN.match(value):
            continue
        m = _SWEEP_FN.match(value)
        values = (m.group(2) if m else value).split(",")
        options = group_options(group)
        for v in values:
            v = v.strip().strip("'\"")
            if v and v != "null" and v not in options:
                label = group.split("/")[-1] if group.startswith("policy/") else group
                raise ConfigError(f"{group}={v} is not a known {label} option; choose one of: {', '.join(options)}")


def to_plain(cfg: Any) -> dict:
    """Resolve a DictConfig into plain containers; a missing mandatory value is a one-line error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a key"
        raise ConfigError(f"{key} is required but was not set; add {key}=VALUE to the command line") from None


def compose_scenario(overrides: Sequence[str] = ()) -> Scenario:
    """The typed scenario ``moesim OVERRIDES`` would run (no output directory is created)."""
    from hydra import compose, initialize_config_module

    check_group_overrides(overrides)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    return build_scenario(to_plain(cfg))
