"""Benchmarks for kode (run as modules, e.g. ``python -m benchmarks.gradient_memory``)."""
