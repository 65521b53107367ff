"""Read cells to embed: an ``.h5ad`` of raw counts or a CSV/TSV cell x gene table.

Gene identifiers are resolved to Ensembl ids (what the Geneformer tokenizer expects), in this order:
``var[gene_column]`` (default ``ensembl_id``) when present; ``var_names`` when they are Ensembl ids
(version suffixes such as ``.5`` are dropped); otherwise ``var_names`` are gene symbols mapped through a
``gene_name_id_dict.json`` (Geneformer's symbol -> Ensembl id dictionary). Unmapped genes get "" and
are ignored; when several symbols map to one Ensembl id only the first keeps it (as
``geneformer_triton.data.celltypist_sample`` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.dictionaries import GENE_NAME_ID_FILE

LOGGER = logging.getLogger(__name__)

ENSEMBL_COLUMN = "ensembl_id"
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


class InputError(ValueError):
    """The input file cannot be embedded as given; the message says why and what to do."""


@dataclass
class CellMatrix:
    """Raw counts of the cells to embed.

    ``counts`` float32 CSR [n_cells, n_genes]; ``gene_ids`` Ensembl ids of the columns ("" = unknown,
    ignored); ``cell_ids`` obs names; ``n_counts`` each cell's total counts over all genes (or
    ``obs["n_counts"]``); ``adata`` the input as AnnData (for writing an ``.h5ad`` copy).
    """

    counts: sp.csr_matrix
    gene_ids: list[str]
    cell_ids: list[str]
    n_counts: np.ndarray
    adata: ad.AnnData = field(repr=False)
    source: str = ""

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    def fingerprint(self) -> str:
        """sha256 of the cells, genes and counts (identifies the input for resuming)."""
        digest = hashlib.sha256()
        for part in (self.cell_ids, self.gene_ids):
            digest.update("\x1f".join(part).encode())
            digest.update(b"\x1e")
        matrix = self.counts
        for array in (matrix.indptr, matrix.indices, matrix.data, self.n_counts):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def named_nonzero(self) -> np.ndarray:
        """Number of non-zero genes with a known Ensembl id per cell, int64 [n_cells]."""
        named = np.array([g != "" for g in self.gene_ids])
        nonzero = self.counts.copy()
        nonzero.data = (nonzero.data != 0).astype(np.float32)
        return np.asarray(nonzero @ named.astype(np.float32)).ravel().astype(np.int64)


def load_symbol_map(*folders: str | Path | None) -> dict[str, str] | None:
    """``gene_name_id_dict.json`` from the first folder that has it (None if none does)."""
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / GENE_NAME_ID_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def looks_like_ensembl(names: Sequence[str]) -> bool:
    """Whether most names are Ensembl gene ids (``ENSG...``, ``ENSMUSG...``)."""
    names = [str(n) for n in names]
    return bool(names) and sum(n.upper().startswith("ENS") for n in names) >= 0.5 * len(names)


def clean_ensembl(value: object) -> str:
    """An Ensembl id without version suffix, upper-case; "" for missing values."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip()
    if text.lower() in ("", "nan", "none"):
        return ""
    return text.split(".")[0].upper() if text.upper().startswith("ENS") else text


def map_symbols(symbols: Sequence[str], symbol_to_id: Mapping[str, str]) -> list[str]:
    """Gene symbols -> Ensembl ids ("" where unknown; a duplicated id is kept by its first symbol)."""
    ids = pd.Series([clean_ensembl(symbol_to_id.get(str(s), "")) for s in symbols])
    ids[ids.duplicated() & (ids != "")] = ""
    return ids.tolist()


def resolve_gene_ids(
    var: pd.DataFrame, symbol_to_id: Mapping[str, str] | None, gene_column: str | None = None
) -> tuple[list[str], str]:
    """Ensembl id of every column of an AnnData's ``var``; returns (ids, how they were found)."""
    if gene_column is not None and gene_column not in var.columns:
        raise InputError(f"var has no column {gene_column!r} (columns: {list(var.columns)[:10]})")
    column = gene_column or (ENSEMBL_COLUMN if ENSEMBL_COLUMN in var.columns else None)
    if column is not None:
        return [clean_ensembl(v) for v in var[column].tolist()], f"var[{column!r}]"
    names = [str(n) for n in var.index]
    if looks_like_ensembl(names):
        return [clean_ensembl(n) for n in names], "var_names (Ensembl ids)"
    if symbol_to_id is None:
        raise InputError(
            f"genes are neither Ensembl ids in var[{ENSEMBL_COLUMN!r}] nor in var_names (e.g. {names[:3]}); "
            f"to map gene symbols give --dictionaries DIR or --repository DIR holding {GENE_NAME_ID_FILE}"
        )
    ids = map_symbols(names, symbol_to_id)
    return ids, f"gene symbols mapped with {GENE_NAME_ID_FILE}"


def _read_table(path: Path, max_cells: int | None) -> ad.AnnData:
    sep = "\t" if any(path.name.endswith(s) for s in (".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
    frame = pd.read_csv(path, index_col=0, sep=sep, nrows=max_cells)
    if frame.shape[1] == 0:
        raise InputError(f"{path}: no gene columns found (expected cells as rows, genes as columns, sep {sep!r})")
    try:
        values = frame.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: counts must be numbers (cells as rows, genes as columns): {error}") from error
    return ad.AnnData(
        X=sp.csr_matrix(values),
        obs=pd.DataFrame(index=frame.index.astype(str)),
        var=pd.DataFrame(index=frame.columns.astype(str)),
    )


def read_cells(
    path: str | Path,
    symbol_to_id: Mapping[str, str] | None = None,
    max_cells: int | None = None,
    layer: str | None = None,
    gene_column: str | None = None,
) -> CellMatrix:
    """Read raw counts of cells from ``.h5ad`` (``X`` or ``layers[layer]``) or a CSV/TSV cell x gene table.

    Raises ``InputError`` for an unknown format, genes that cannot be resolved to Ensembl ids, or
    counts that are negative or not finite (naming the first bad cells).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    name = path.name.lower()
    if name.endswith(".h5ad"):
        adata = ad.read_h5ad(path)
        if max_cells is not None:
            adata = adata[:max_cells].copy()
        if layer is not None and layer not in adata.layers:
            raise InputError(f"{path} has no layer {layer!r} (layers: {list(adata.layers)})")
        matrix = adata.layers[layer] if layer is not None else adata.X
    elif any(name.endswith(s) for s in CSV_SUFFIXES):
        if layer is not None:
            raise InputError("--layer applies to .h5ad input only")
        adata = _read_table(path, max_cells)
        matrix = adata.X
    else:
        raise InputError(f"{path}: unsupported input format; give an .h5ad file or a CSV/TSV cell x gene table")
    if matrix is None:
        raise InputError(f"{path} has no count matrix (X is empty)")
    counts = sp.csr_matrix(matrix, dtype=np.float32)
    counts.sum_duplicates()
    if counts.shape[0] == 0:
        raise InputError(f"{path} holds no cells")

    cell_ids = [str(c) for c in adata.obs_names]
    _check_counts(counts, cell_ids, path)
    gene_ids, how = resolve_gene_ids(adata.var, symbol_to_id, gene_column)
    known = sum(g != "" for g in gene_ids)
    if known == 0:
        raise InputError(f"{path}: none of the {len(gene_ids)} genes could be resolved to an Ensembl id ({how})")
    if "n_counts" in adata.obs.columns:
        n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float32)
    else:
        n_counts = np.asarray(counts.sum(axis=1), dtype=np.float32).ravel()
    if counts.data.size and np.any(counts.data != np.round(counts.data)):
        LOGGER.warning("%s: counts are not all integers; Geneformer expects raw counts (not normalized data)", path)
    LOGGER.info("%s: %d cells x %d genes, %d with an Ensembl id (%s)", path, counts.shape[0], counts.shape[1], known, how)
    return CellMatrix(counts=counts, gene_ids=gene_ids, cell_ids=cell_ids, n_counts=n_counts, adata=adata, source=str(path))


def _check_counts(counts: sp.csr_matrix, cell_ids: list[str], path: Path) -> None:
    bad = ~np.isfinite(counts.data) | (counts.data < 0)
    if not bad.any():
        return
    rows = np.unique(np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))[bad])
    kinds = [k for k, m in (("NaN", np.isnan(counts.data)), ("infinite", np.isinf(counts.data)),
                            ("negative", counts.data < 0)) if m.any()]
    raise InputError(
        f"{path}: {int(bad.sum())} {'/'.join(kinds)} count values in {len(rows)} cells "
        f"(e.g. {[cell_ids[r] for r in rows[:3]]}); raw counts must be finite and >= 0"
    )
