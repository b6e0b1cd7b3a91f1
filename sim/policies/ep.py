"""Expert-parallel policies: where experts live (placement) and where tokens go (token scheduling).

Pure decision logic, like every policy (no simpy, no torch). Two families, each a registry
(``workloads.registry``):

* **EP placement** (``EP_PLACEMENTS``, ``policy/ep=NAME``): which device holds each expert (and
  its replicas). Only ``none`` exists so far: the model runs on one GPU (or tensor parallel), no
  expert parallelism. Contiguous, round-robin and DeepSeek EPLB placement (REFERENCE.md section
  4) register here with the expert-parallel layer.
* **EP token scheduling** (``TOKEN_SCHEDULERS``): which device each token's expert work is sent
  to (speculative token shuffling); empty until the expert-parallel layer exists.
"""

from __future__ import annotations

from workloads.registry import Registry

EP_PLACEMENTS = Registry("policy.ep.name", "EP placement policy")
TOKEN_SCHEDULERS = Registry("policy.ep.token_scheduler", "EP token scheduler")


@EP_PLACEMENTS.register("none")
class NoExpertParallelism:
    """Every expert on the model's GPU (or sharded with it under tensor parallelism)."""

    def __init__(self, config=None):
        self.config = config
