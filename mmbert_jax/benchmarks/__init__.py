"""Benchmarks: `python -m mmbert_jax.benchmarks.<name>`."""
