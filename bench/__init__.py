"""Benchmarks for whereabouts-py (`make bench`); results are appended to bench/RESULTS.md."""
