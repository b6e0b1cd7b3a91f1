"""The README's own command lines and documented keys work as written (so the docs cannot drift).

Every ``moesim ...`` line in the code blocks of README "Running" and "Configuration" is composed
point by point (sweeps expanded) and its first point simulated with small sizes appended; ``--help``
and ``--cfg`` lines run the real command. Every ``KEY=VALUE`` example and every key listed in a
``PREFIX.*`` row of the Configuration table must compose as written (no Hydra ``+`` needed).
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sim.config import compose_scenario
from sim.engine import simulate
from workloads.requests import build_requests
from workloads.trace import TraceMeta, requests_to_frame, write_trace

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["workload.num_requests=2", "workload.prompt_len=16", "workload.output_len=3", "sim.progress=false"]


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def moesim_lines(text: str) -> list[str]:
    """``moesim ...`` lines of the section's bash code blocks (continuation lines joined)."""
    lines, in_block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            in_block = raw.strip() == "```bash"
            continue
        if not in_block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line == "moesim" or line.startswith("moesim "):
            lines.append(line)
    return lines


def sweep_points(args: list[str]) -> list[list[str]]:
    """The points of a ``-m`` sweep: comma lists expanded (not inside [..] lists), Hydra's own
    keys (launchers) dropped: they do not change the scenario and tests/test_sweeps.py runs them."""
    axes = []
    for a in args:
        if a in ("-m", "--multirun") or a.startswith("hydra"):
            continue
        key, _, value = a.partition("=")
        if "," in value and "[" not in value:
            axes.append([f"{key}={v}" for v in value.split(",")])
        else:
            axes.append([a])
    return [list(p) for p in itertools.product(*axes)]


LINES = moesim_lines(section("Running")) + moesim_lines(section("Configuration"))


def test_the_sections_have_command_lines():
    assert len(LINES) >= 8, LINES


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    sc = compose_scenario(SMALL)  # the default model: what a bare `workload=trace` line replays
    path = tmp_path_factory.mktemp("readme") / "trace.parquet"
    write_trace(path, requests_to_frame(build_requests(sc.workload, sc.model, sc.seed), sc.model),
                TraceMeta.for_model(sc.model, "test"))
    return path


@pytest.mark.parametrize("line", LINES, ids=[l.split("#")[0].strip() for l in LINES])
def test_readme_command_line_works_as_written(line, tiny_trace, tmp_path):
    args = shlex.split(line, comments=True)[1:]
    if "--help" in args or "--cfg" in args:
        out = subprocess.run([sys.executable, "-m", "sim.cli", *args], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr
        assert ("model" in out.stdout), out.stdout[:500]
        return
    args = [f"workload.path={tiny_trace}" if a.startswith("workload.path=") else a for a in args]
    points = sweep_points(args)
    scenarios = [compose_scenario(p + SMALL) for p in points]
    result = simulate(scenarios[0])
    assert result.summary["decode_tokens"] > 0


def _documented_examples() -> list[str]:
    """Backticked ``KEY=VALUE`` examples in the Configuration table (group choices included)."""
    found = re.findall(r"`([a-z_/@.]+=[^`\s]+)`", section("Configuration"))
    return sorted({f for f in found if not f.startswith(("policy/speculation", "policy/ep"))} |
                  {f for f in found if f.startswith("policy/speculation=static")})


def _documented_keys() -> list[tuple[str, str]]:
    """(prefix, key) for each key named at parenthesis depth 0 in a ``PREFIX.*`` table row."""
    out = []
    for row in section("Configuration").splitlines():
        m = re.match(r"\| `([a-z_.]+)\.\*` \| (.*) \|$", row)
        if not m:
            continue
        prefix, text, depth, plain = m.group(1), m.group(2), 0, []
        for ch in text:
            depth += ch == "("
            depth -= ch == ")"
            plain.append(ch if depth == 0 else " ")
        for key in re.findall(r"`([a-z_]+)`", "".join(plain)):
            out.append((prefix, key))
    return out


def test_the_configuration_table_documents_keys():
    keys = _documented_keys()
    assert ("hw.gpu", "mem_efficiency") in keys and ("workload", "batch_size") in keys, keys
    assert "hw.gpu.mem_efficiency=0.9" in _documented_examples()


@pytest.mark.parametrize("example", _documented_examples())
def test_documented_example_composes_without_plus(example):
    extra = ["hw=2xh800"] if example.startswith("hw.tensor_parallel") else []
    compose_scenario(extra + [example])


@pytest.mark.parametrize("prefix,key", _documented_keys())
def test_every_documented_key_exists_in_the_composed_config(prefix, key):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config")
    node = OmegaConf.select(cfg, prefix)
    assert node is not None and key in node, f"{prefix}.{key} is documented but not a config key"
