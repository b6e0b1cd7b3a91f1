"""The real PyTorch MoE executor (issue 4): not built yet.

It will own the PyTorch MoE model, the expert offload runtime, router-trace capture, the cost-table
profiler and side-by-side validation, and it will drive the same policy objects as ``sim``.
Nothing in ``sim``, ``hw`` or ``workloads`` imports this package.
"""
