"""moesim's Hydra sweeper (``hydra/sweeper=moesim``, the default of ``conf/config.yaml``).

Lives in the ``hydra_plugins`` namespace because Hydra only instantiates plugins from there; see
:mod:`hydra_plugins.moesim_sweeper.moesim_sweeper`.
"""
