"""Benchmarks of ToMoE against the dense model and static baselines.

Run from the repository root as modules, e.g. ``python -m benchmarks.sweep``;
``bash benchmarks/run_all.sh`` runs the whole chain and writes ``RESULTS.md``.
"""
