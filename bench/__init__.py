"""Benchmarks: bench/run.py (see docs/performance.md)."""
