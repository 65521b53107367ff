"""Benchmarks (importable: ``python -m geneformer_triton.bench.<module>``)."""
