"""Fidelity of exported/served encoders against the fp32 PyTorch reference.

Every variant (backend x precision) embeds the same real cells as the reference; agreement is
reported as min/mean cosine similarity per cell and max/mean absolute error over all elements.
Thresholds: fp32 variants min cosine >= 0.99999, reduced precision (fp16/bf16/int8) >= 0.999.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

LOGGER = logging.getLogger(__name__)

FP32_MIN_COSINE = 0.99999
REDUCED_MIN_COSINE = 0.999


def min_cosine_threshold(precision: str) -> float:
    """Documented minimum cosine for a precision ("fp32" -> 0.99999, anything lower -> 0.999)."""
    return FP32_MIN_COSINE if precision == "fp32" else REDUCED_MIN_COSINE


def embedding_fidelity(embeddings: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-cell agreement of ``embeddings`` with ``reference`` (both ``[n_cells, H]``, same order).

    Returns ``cosine_min`` / ``cosine_mean`` of the row-wise cosine similarity (a zero-norm row
    counts 1 if both rows are zero, else 0), ``max_abs_err`` and ``mean_abs_err`` over all
    elements.
    """
    a = np.asarray(embeddings, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"shape mismatch: {a.shape} vs reference {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), (na == nb).astype(float))
    cos = np.clip(cos, -1.0, 1.0)
    err = np.abs(a - b)
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_err": float(err.max()),
        "mean_abs_err": float(err.mean()),
    }


@dataclass
class FidelityResult:
    """Agreement of one variant with the reference on ``n_cells`` cells."""

    variant: str
    precision: str
    n_cells: int
    cosine_min: float
    cosine_mean: float
    max_abs_err: float
    mean_abs_err: float
    threshold: float
    passed: bool
    detail: str = ""


def compare_variant(
    variant: str, precision: str, embeddings: np.ndarray, reference: np.ndarray, detail: str = ""
) -> FidelityResult:
    """Compare ``embeddings`` [N, H] with ``reference`` [N, H] against the precision's threshold."""
    stats = embedding_fidelity(embeddings, reference)
    threshold = min_cosine_threshold(precision)
    result = FidelityResult(
        variant=variant,
        precision=precision,
        n_cells=int(reference.shape[0]),
        threshold=threshold,
        passed=stats["cosine_min"] >= threshold,
        detail=detail,
        **stats,
    )
    level = logging.INFO if result.passed else logging.ERROR
    LOGGER.log(level, "%s (%s): min cos %.7f, mean cos %.7f, max abs %.2e -> %s", variant, precision,
               result.cosine_min, result.cosine_mean, result.max_abs_err, "ok" if result.passed else "FAIL")
    return result


def fidelity_table(results: Iterable[FidelityResult]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in results])


def write_fidelity_report(results: Iterable[FidelityResult], out_dir: str | Path, stem: str = "fidelity") -> dict[str, Path]:
    """Write ``<stem>.csv`` and ``<stem>.json``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = fidelity_table(results)
    paths = {"csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json"}
    table.to_csv(paths["csv"], index=False)
    paths["json"].write_text(json.dumps(table.to_dict(orient="records"), indent=2) + "\n")
    return paths


def format_fidelity_table(results: Iterable[FidelityResult]) -> str:
    """A fixed-width text table for terminals."""
    lines = [f"{'variant':<34} {'prec':<5} {'cells':>5} {'min cos':>12} {'mean cos':>12} {'max abs':>9}  result"]
    for r in results:
        lines.append(
            f"{r.variant:<34} {r.precision:<5} {r.n_cells:>5} {r.cosine_min:>12.9f} {r.cosine_mean:>12.9f} "
            f"{r.max_abs_err:>9.2e}  {'ok' if r.passed else 'FAIL (< ' + str(r.threshold) + ')'}"
        )
    return "\n".join(lines)
