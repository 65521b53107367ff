"""Exported encoder variants, as the export CLI sees them (no heavy imports: used by CLI parsers).

The variants themselves are stated once, in :mod:`geneformer_triton.core.contract` (``EXPORTED_VARIANTS``: the
variants ``gftriton export`` writes); this module keeps the export's default format list, the formats the
fidelity checks compare and the precision filter of ``gftriton export --precision``.
"""

from __future__ import annotations

from geneformer_triton.core.contract import EXPORTED_VARIANTS, ISP_REDUCED_GRAPH, PRECISIONS

DEFAULT_FORMATS = tuple(EXPORTED_VARIANTS)
#: the exported encoders that return embeddings: what the fidelity checks compare with the reference (the
#: ISP-reduced graphs return per-gene cosines instead; tests/test_isp_reduction.py checks them)
EMBEDDING_FORMATS = {name: f for name, f in EXPORTED_VARIANTS.items() if f.graph != ISP_REDUCED_GRAPH}

__all__ = ["DEFAULT_FORMATS", "EMBEDDING_FORMATS", "formats_for"]


def formats_for(precisions: list[str] | tuple[str, ...], formats: list[str] | tuple[str, ...] = DEFAULT_FORMATS) -> list[str]:
    """The formats among ``formats`` whose precision is one of ``precisions`` (ValueError if none or unknown)."""
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ValueError(f"unknown precisions {unknown}; choose from {list(PRECISIONS)}")
    chosen = [name for name in formats if name in EXPORTED_VARIANTS and EXPORTED_VARIANTS[name].precision in precisions]
    if not chosen:
        raise ValueError(f"no export format among {list(formats)} has precision {list(precisions)}; "
                         f"formats by precision: { {f.name: f.precision for f in EXPORTED_VARIANTS.values()} }")
    return chosen
