"""scanpy's bundled ``pbmc68k_reduced`` as integer counts with cell-type labels.

The file ships inside the scanpy wheel (no download): 700 cells x 765 genes, gene symbols,
``obs["bulk_labels"]`` (10 cell types, 8 to 240 cells each). ``X`` is scaled (z-scores) and
``.raw.X`` is log-normalized: ``raw.X = log1p(counts / n_counts * 1e4)`` with the cell's original
total ``obs["n_counts"]``, stored rounded to 3 decimals. Counts are recovered as::

    counts = round(expm1(raw.X) * n_counts / 1e4)

Caveats (checked by :func:`check_recovery`, stored in ``uns["count_recovery"]``):

* ``.raw`` holds the same **765 genes** as ``X``, not the full transcriptome (the original data
  has ~1,000-2,600 detected genes per cell; here each cell keeps only 183-409 nonzero genes, and
  the recovered counts add up to only ~20 % of ``n_counts``). Geneformer therefore sees ~240
  tokens per cell instead of ~1,000+: a real but small, HVG-biased input. Use it for labelled
  comparisons between backends, not as a benchmark of Geneformer's biology.
* ``obs["n_counts"]`` is the cell's **original** total (all genes); it is kept, as it is the
  right normalizer. (Rank-value tokenization divides every gene of a cell by the same total, so
  the choice does not change the token order.) ``obs["n_counts_recovered"]`` is the row sum.
* Because ``raw.X`` is rounded to 3 decimals, ``expm1(raw.X) * n_counts / 1e4`` deviates from an
  integer by up to ~0.1 for the largest counts; rounding recovers the integers (normalizing them
  back reproduces ``raw.X`` to ~5e-4, its storage precision).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

LOGGER = logging.getLogger(__name__)

LABEL_KEY = "bulk_labels"
TARGET_SUM = 1e4


def check_recovery(counts: sp.spmatrix | np.ndarray, log_norm: sp.spmatrix | np.ndarray, n_counts: np.ndarray) -> dict[str, float]:
    """Check recovered counts against the log-normalized matrix they came from.

    Args:
        counts: ``[n_cells, n_genes]`` recovered counts (any numeric dtype).
        log_norm: ``[n_cells, n_genes]`` the original ``raw.X``.
        n_counts: ``[n_cells]`` totals used for normalization.

    Returns:
        ``max_non_integer`` (max |x - round(x)| of the counts), ``min_count``,
        ``max_lognorm_error`` (max |log1p(counts / n_counts * 1e4) - raw.X|),
        ``max_unrounded_deviation`` (max distance of ``expm1(raw.X) * n_counts / 1e4`` to the
        nearest integer), ``fraction_of_n_counts`` (median of row sums / n_counts).
    """
    c = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    c = c.astype(np.float64)
    x = log_norm.toarray() if sp.issparse(log_norm) else np.asarray(log_norm)
    x = x.astype(np.float64)
    tot = np.asarray(n_counts, dtype=np.float64).reshape(-1, 1)
    unrounded = np.expm1(x) * tot / TARGET_SUM
    return {
        "max_non_integer": float(np.abs(c - np.round(c)).max()),
        "min_count": float(c.min()),
        "max_lognorm_error": float(np.abs(np.log1p(c / tot * TARGET_SUM) - x).max()),
        "max_unrounded_deviation": float(np.abs(unrounded - np.round(unrounded)).max()),
        "fraction_of_n_counts": float(np.median(c.sum(axis=1) / tot.ravel())),
    }


def load_pbmc68k_counts(symbol_to_ensembl: Mapping[str, str] | None = None, check: bool = True) -> ad.AnnData:
    """pbmc68k_reduced with recovered raw counts.

    Args:
        symbol_to_ensembl: optional symbol -> Ensembl id map (e.g. Geneformer's
            ``gene_name_id_dict.json``); when given, ``var["ensembl_id"]`` is added (unique; ""
            where unmapped or a duplicate). With the V1 dictionary 701 of 765 symbols map.
        check: verify the recovery (integers, non-negative, ``raw.X`` reproduced within 1e-3)
            and raise ``ValueError`` otherwise.

    Returns:
        AnnData ``[700 cells, 765 genes]``: ``X`` float32 CSR integer counts, ``var_names`` gene
        symbols, ``obs`` with ``bulk_labels`` (str category), ``n_counts`` (original totals,
        float64) and ``n_counts_recovered`` (row sums of ``X``), ``uns["count_recovery"]`` the
        :func:`check_recovery` report.
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    if src.raw is None:
        raise ValueError("pbmc68k_reduced has no .raw (scanpy changed its bundled file?)")
    raw_x = src.raw.X
    raw_x = raw_x.tocsr() if sp.issparse(raw_x) else sp.csr_matrix(raw_x)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)

    counts = raw_x.astype(np.float64)  # copy; zeros stay structural zeros since expm1(0) = 0
    counts.data = np.round(np.expm1(counts.data) * np.repeat(n_counts, np.diff(counts.indptr)) / TARGET_SUM)
    counts.eliminate_zeros()
    counts = counts.astype(np.float32)

    report = check_recovery(counts, raw_x, n_counts)
    LOGGER.info("pbmc68k_reduced counts recovered: %s", report)
    if check:
        problems = []
        if report["max_non_integer"] > 0:
            problems.append(f"non-integer counts ({report['max_non_integer']})")
        if report["min_count"] < 0:
            problems.append(f"negative counts ({report['min_count']})")
        if report["max_lognorm_error"] > 1e-3:
            problems.append(f"normalizing back misses raw.X by {report['max_lognorm_error']:.2e}")
        if problems:
            raise ValueError("pbmc68k_reduced count recovery failed: " + "; ".join(problems))

    obs = pd.DataFrame(index=src.obs_names.astype(str))
    obs[LABEL_KEY] = pd.Categorical(src.obs[LABEL_KEY].astype(str))
    obs["n_counts"] = n_counts
    obs["n_counts_recovered"] = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    var = pd.DataFrame(index=pd.Index(src.raw.var_names.astype(str)))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    if symbol_to_ensembl is not None:
        ensembl = pd.Series([symbol_to_ensembl.get(s, "") for s in adata.var_names], index=adata.var_names)
        ensembl[ensembl.duplicated() & (ensembl != "")] = ""
        adata.var["ensembl_id"] = ensembl.to_numpy().astype(str)
        LOGGER.info("pbmc68k: %d of %d symbols mapped to Ensembl ids", int((ensembl != "").sum()), adata.n_vars)
    adata.uns["count_recovery"] = report
    LOGGER.info("pbmc68k: %d cells x %d genes (raw holds only these genes), %d labels",
                adata.n_obs, adata.n_vars, obs[LABEL_KEY].nunique())
    return adata
