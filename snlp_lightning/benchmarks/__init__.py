"""Benchmarks: ``python -m snlp_lightning.benchmarks.regularizer_overhead``."""
