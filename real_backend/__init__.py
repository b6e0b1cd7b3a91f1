"""The real PyTorch side that keeps the simulator honest (needs ``pip install -e '.[real]'``).

The MoE model built from a ModelSpec (``model``, ``ops``), the expert offload runtime (``offload``),
the executor that runs the simulator's scenarios with the same scheduler, policy objects, forced
routing and speculation rounds (``executor``), router-trace capture from Hugging Face models
(``capture``), the cost-table profiler (``profile``, ``moesim-profile``) and side-by-side
validation (``validate``, ``moesim-validate``). Nothing in ``sim``, ``hw`` or ``workloads`` imports
this package.
"""
