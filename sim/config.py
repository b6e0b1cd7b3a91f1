"""Composing the Hydra config outside the CLI (tests, notebooks, benchmarks) and checking group names.

``compose_scenario(["model=qwen2_57b_a14b", "workload.batch_size=8"])`` returns the same typed
``Scenario`` the ``moesim`` command would run with those overrides.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from workloads.validation import ConfigError

from .scenario import Scenario, build_scenario

CONFIG_MODULE = "conf"
CONFIG_NAME = "config"
# Config groups a user picks an option of on the command line (DESIGN.md).
GROUPS = ("model", "hw", "hw/gpu", "hw/cpu", "hw/link", "workload", "policy/prefetch", "policy/speculation",
          "policy/ep", "experiment")


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (the YAML files in ``conf/GROUP/``)."""
    root = resources.files(CONFIG_MODULE)
    folder = root.joinpath(*group.split("/"))
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


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
