"""Benchmarks: side-by-side measurements against baselines, with the machine recorded."""
