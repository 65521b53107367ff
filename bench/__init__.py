"""Benchmarks (importable: ``python -m bench.<module>``)."""
