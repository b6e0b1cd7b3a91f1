"""The counter invariants, property-tested on the simulator over random valid scenarios.

Hypothesis draws a model (mini_mixtral, mini_qwen, olmoe_1b_7b, deepseek_v2_lite), a system
(h100_pcie, t4, a6000, or this_cpu on the roofline: the host is the device), batch size 1-4, a small expert cache per layer or the HBM budget's, the
cache scope, every registered prefetch policy (from the ``sim.policies.base`` registry), the
synthetic routing kind, arrivals, seed, and speculation (none, or ``static`` with k 1-3 and a
model or ngram drafter), with a tiny workload. On every run (``sim.engine.simulate``):

* precision and recall in [0, 1] (and useful prefetches never outrun prefetches issued so far);
* per pass: ``prefetch_bytes == prefetches x expert bytes``, ``demand_bytes == demand_loads x
  expert bytes``, wasted bytes a whole number of experts;
* ``h2d_bytes == demand + prefetch + activation bytes``, the activation bytes counted here from the
  policy's own ``on_miss`` answers (a spy: each host-run expert's output, tokens x hidden x bytes
  per element, comes back to the GPU);
* ``misses == demand_loads + late_prefetches + host_runs``;
* the time parts of each pass (attention, expert, other compute, copy stall, host stall, draft,
  reject) add up to its duration (relative 1e-9: float summation of a few hundred terms); where
  the host is the device, host-run experts' time is the stream's ``host_stall_s``.

``Spy``, ``check_invariants`` and ``check_sim_time`` are shared with
``tests/test_counter_contract.py`` (which runs them on the real executor too).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import compose_scenario
from sim.engine import simulate
from sim.policies.base import PREFETCH_POLICIES, prefetch_policy_class
from workloads.requests import build_requests

prefetch_policy_class("lru")   # imports sim.policies.prefetch: registers the built-in policies
POLICIES = sorted(PREFETCH_POLICIES.classes)

TIME_PARTS = ["attention_s", "expert_compute_s", "other_compute_s", "copy_stall_s", "host_stall_s", "draft_s",
              "reject_s"]


class Spy:
    """Wraps a policy object's ``on_step_begin`` and ``on_miss`` (instance attributes: the engines
    call them, the class is untouched) to record, per pass, the tokens of each expert the policy
    sent to the host and how many prefetches it planned at step begin."""

    def __init__(self, policy):
        self.policy = policy
        self.host_tokens: dict[int, list[int]] = {}
        self.step_begin_prefetches = 0
        self._step = -1
        begin, miss = policy.on_step_begin, policy.on_miss

        def on_step_begin(info, cache):
            self._step = info.step
            plan = begin(info, cache)
            self.step_begin_prefetches += len(plan)
            return plan

        def on_miss(layer, expert, tokens, cache):
            answer = miss(layer, expert, tokens, cache)
            if answer == "host":
                self.host_tokens.setdefault(self._step, []).append(int(tokens))
            return answer

        policy.on_step_begin, policy.on_miss = on_step_begin, on_miss

    @classmethod
    def for_scenario(cls, sc) -> "Spy":
        return cls(prefetch_policy_class(sc.prefetch.name)(sc.prefetch))

    def activation_bytes(self, steps: pd.Series, model) -> np.ndarray:
        """Per pass (``steps``: the step column), bytes of host-run experts' outputs."""
        per_token = model.hidden_size * model.act_bytes_per_elem
        return np.array([sum(self.host_tokens.get(int(s), ())) * per_token for s in steps], dtype=float)


def check_invariants(res, expert_bytes: float, activation_bytes: np.ndarray, engine: str = "sim") -> None:
    """The counter invariants every run satisfies, simulated or real (module docstring)."""
    st_, s = res.steps, res.summary
    for k in ("prefetch_precision", "prefetch_recall"):
        assert s[k] is None or 0.0 <= s[k] <= 1.0, (engine, k, s[k])
    assert (s["prefetch_precision"] is None) == (s["prefetches"] == 0), engine
    assert (st_["useful_prefetches"].cumsum() <= st_["prefetches"].cumsum()).all(), engine
    assert (st_["prefetch_bytes"] == st_["prefetches"] * expert_bytes).all(), engine
    assert (st_["demand_bytes"] == st_["demand_loads"] * expert_bytes).all(), engine
    assert (st_["wasted_prefetch_bytes"] % expert_bytes == 0).all(), engine
    assert (st_["wasted_prefetch_bytes"].sum() <= st_["prefetch_bytes"].sum()), engine
    assert (st_["h2d_bytes"] == st_["demand_bytes"] + st_["prefetch_bytes"] + activation_bytes).all(), engine
    assert (st_["misses"] == st_["demand_loads"] + st_["late_prefetches"] + st_["host_runs"]).all(), engine
    assert (st_["late_prefetches"] <= st_["useful_prefetches"]).all(), engine   # a late prefetch is used
    assert s["prefetches"] == st_["prefetches"].sum() and s["prefetch_bytes"] == st_["prefetch_bytes"].sum()
    assert (st_[TIME_PARTS + ["host_expert_s"]] >= 0).all().all(), engine
    assert (st_.loc[st_["host_runs"] == 0, "host_expert_s"] == 0).all(), engine
    assert (st_.loc[st_["spec_k"] == 0, "reject_s"] == 0).all(), engine


def check_sim_time(res) -> None:
    """The parts of each simulated pass add up to its duration."""
    steps = res.steps
    np.testing.assert_allclose(steps[TIME_PARTS].sum(axis=1), steps["duration_s"], rtol=1e-9, atol=0)


@st.composite
def scenarios(draw) -> list[str]:
    """Overrides of a random valid scenario with a tiny workload."""
    policy = draw(st.sampled_from(POLICIES))
    hw = draw(st.sampled_from(["h100_pcie", "t4", "a6000", "this_cpu"]))
    models = ["mini_mixtral", "mini_qwen"] + ([] if hw == "this_cpu" else ["olmoe_1b_7b", "deepseek_v2_lite"])
    ov = [f"model={draw(st.sampled_from(models))}",   # this_cpu's 1 GB "HBM" holds only the mini models
          f"hw={hw}",
          f"policy/prefetch={policy}",
          f"workload.batch_size={draw(st.integers(1, 4))}",
          f"workload.num_requests={draw(st.integers(1, 4))}",
          f"workload.prompt_len={draw(st.integers(1, 6))}",
          f"workload.output_len={draw(st.integers(1, 5))}",
          f"workload.routing={draw(st.sampled_from(['uniform', 'skewed', 'temporal', 'affinity', 'realistic']))}",
          f"workload.arrival={draw(st.sampled_from(['all_at_once', 'poisson']))}",
          "workload.arrival_rate_per_s=2000",
          f"policy.prefetch.cache_scope={draw(st.sampled_from(['per_layer', 'global']))}",
          f"seed={draw(st.integers(0, 3))}",
          "sim.progress=false"]
    if hw == "this_cpu":   # its cost tables are measured by moesim-profile; the roofline needs none
        ov.append("hw.cost_model=roofline")
    cap = draw(st.sampled_from([None, 1, 2, 3, 4]))
    if cap is not None:
        ov.append(f"policy.prefetch.capacity_per_layer={cap}")
    if policy == "fiddler":
        crossover = draw(st.sampled_from([None, 1, 2, 4, 8]))
        if crossover is not None:
            ov.append(f"policy.prefetch.crossover_tokens={crossover}")
    if draw(st.booleans()):
        ov += ["policy/speculation=static", f"policy.speculation.k={draw(st.integers(1, 3))}",
               f"policy.speculation.drafter={draw(st.sampled_from(['model', 'ngram']))}"]
        if hw == "this_cpu":
            ov.append("policy.speculation.draft_model=mini_draft")   # the default draft model takes 1 GB
    return ov


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=scenarios())
def test_counter_invariants_hold_on_random_scenarios(overrides):
    sc = compose_scenario(overrides)
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    spy = Spy.for_scenario(sc)
    res = simulate(sc, reqs, policy=spy.policy)
    expert_bytes = res.memory.expert_slot_bytes
    assert expert_bytes == sc.model.expert_bytes   # one GPU: a slot holds a whole expert
    check_invariants(res, expert_bytes, spy.activation_bytes(res.steps["step"], sc.model))
    check_sim_time(res)
    if sc.hw.host_is_device:   # host-run experts are the stream's own time
        np.testing.assert_allclose(res.steps["host_stall_s"], res.steps["host_expert_s"], rtol=1e-9, atol=0)
