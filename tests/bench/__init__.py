"""Benchmark (run by hand): python -m tests.bench --help."""
