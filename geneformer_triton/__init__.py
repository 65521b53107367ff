"""Geneformer on Triton: loading, rank-value tokenization, encoder-only export and fidelity checks."""

__version__ = "0.1.0"
