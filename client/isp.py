"""In-silico perturbation over many cells through the ``geneformer_isp`` Triton model.

One request per cell (its expressed genes with Ensembl ids and raw counts + the perturbation spec),
``concurrency`` requests in flight (:class:`geneformer_triton.client.triton_client.GeneformerClient`: one connection per
worker thread, retries while the server is unreachable). Results are appended as cells finish:

* Parquet (default): ``OUT.parquet/`` is a Parquet dataset of part files ``part-<batch>.parquet``, each
  written to a hidden temporary file, fsynced and renamed into place (atomic): a part is there whole or
  not at all, and a cell's rows are never split across parts. One flushed block of cells (a batch) writes
  up to three parts (gene cosines in ``_genes/``, rows, ``_errors/``) and then commits them all at once
  with an empty marker ``_commits/<batch>`` (fsynced, renamed into place): parts without a marker (a run
  killed mid-batch) are never read and are deleted when the output is reopened, so a resumed run redoes
  those cells without duplicating any row. (An output written before markers existed is adopted whole.)
* CSV: ``OUT.csv`` gets whole cells appended in one ``write`` + fsync; on the next run a torn last
  block (a kill mid-write) is cut off and cells with fewer rows than their ``n_perturbations`` dropped.

A rerun with the same output skips the cells already there (and the cells the server rejected, kept
in ``_errors/`` resp. ``OUT.errors.csv``; ``retry_errors`` reruns those), so killing the client and
rerunning yields every cell exactly once. The run's settings are stored with the output
(``_run.json`` / ``OUT.run.json``); resuming with other settings is refused. A lock file keeps two
runs from writing the same output.

One row per cell x perturbation: ``cell_id``, ``perturbation``, ``gene_id`` (Ensembl ids, a set joined
with "+"), ``gene_symbol``, ``target_index``, ``n_perturbations``, ``cell_shift`` (cosine of the cell
embeddings; 1 = no shift), ``gene_embedding_shift``, ``goal_shift``, ``start_shift`` (NaN when not
computed), ``cell_emb_shift`` (upstream Geneformer's ``cell_emb`` value, semantics "upstream") and one
``state_shift_<state>`` per cell state (upstream's value with ``cell_states_to_model``). With emb_mode
``cell_and_gene`` every (perturbed, affected) gene cosine goes to ``OUT.parquet/_genes/`` (one Parquet part
per flushed block of cells, committed with those cells' rows). :func:`summarize` ranks genes by mean shift
over cells; :func:`plot_top_shifts` draws them.

Modules (this one holds the input cells and re-exports every public name): :mod:`geneformer_triton.core.isp_schema`
(names, columns, folders), :mod:`geneformer_triton.client.isp_spec` (:class:`IspSpec`, state embeddings),
:mod:`geneformer_triton.client.isp_store` (:class:`ResultStore`), :mod:`geneformer_triton.client.isp_run` (:func:`run_isp`),
:mod:`geneformer_triton.client.isp_summary` (:func:`summarize`, :func:`plot_top_shifts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.client.isp_run import RunStats, cell_rows, gene_rows, run_isp
from geneformer_triton.client.isp_spec import IspSpec, state_embedding, upstream_state_embedding
from geneformer_triton.client.isp_store import ResultStore
from geneformer_triton.client.isp_summary import format_summary, plot_top_shifts, summarize
from geneformer_triton.core.isp_schema import (
    COLUMNS,
    COMMIT_FOLDER,
    EMBED_MODEL_FOR,
    ERROR_COLUMNS,
    GENE_COLUMNS,
    GENE_FOLDER,
    ISP_MODEL,
    PERTURBATIONS,
    RANK_BY,
    SCORE_OUTPUTS,
    STATE_PREFIX,
    UPSTREAM_SCORE,
    IspRunError,
)

LOGGER = logging.getLogger(__name__)

__all__ = [
    "COLUMNS", "COMMIT_FOLDER", "EMBED_MODEL_FOR", "ERROR_COLUMNS", "GENE_COLUMNS", "GENE_FOLDER", "ISP_MODEL",
    "PERTURBATIONS", "RANK_BY", "SCORE_OUTPUTS", "STATE_PREFIX", "UPSTREAM_SCORE",
    "CellTable", "IspRunError", "IspSpec", "ResultStore", "RunStats",
    "cell_rows", "cell_table_from_anndata", "format_summary", "gene_rows", "load_cells", "plot_top_shifts",
    "run_isp", "select_cells", "state_embedding", "summarize", "upstream_state_embedding",
]


# ----------------------------------------------------------------------------- cells


@dataclass
class CellTable:
    """Cells to perturb: raw counts (CSR), Ensembl id per column, totals, ids and symbols."""

    counts: sp.csr_matrix
    gene_ids: np.ndarray  # object [genes], "" = not usable
    n_counts: np.ndarray  # float64 [cells]
    cell_ids: list[str]
    symbols: dict[str, str] = field(default_factory=dict)  # Ensembl id -> symbol
    obs: Optional[pd.DataFrame] = None  # cell annotations (to pick reference cells)

    def __len__(self) -> int:
        return self.counts.shape[0]

    def cell(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The cell's expressed genes (Ensembl ids, non-zero counts) in column order."""
        start, stop = self.counts.indptr[row], self.counts.indptr[row + 1]
        columns, values = self.counts.indices[start:stop], self.counts.data[start:stop]
        ids = self.gene_ids[columns]
        keep = (ids != "") & (values != 0)
        return ids[keep], values[keep].astype(np.float32)

    def symbol(self, gene: str) -> str:
        return "+".join(self.symbols.get(g, g) for g in gene.split("+"))


def _looks_ensembl(values: Iterable[str]) -> bool:
    sample = [str(v) for v in list(values)[:200]]
    return bool(sample) and sum(v.upper().startswith("ENS") for v in sample) > 0.8 * len(sample)


TOTAL_COUNT_COLUMNS = ("n_counts", "ncounts", "total_counts")


def _raw_counts(counts: sp.csr_matrix, adata, total_column: Optional[str], allow_non_integer: bool) -> sp.csr_matrix:
    """Raw counts from ``counts``: as is when integer; recovered as ``round(expm1(X) * total / 1e4)`` from
    log-normalized data (``uns['log1p']`` and a total-counts obs column); else refused unless allowed."""
    data = counts.data
    if data.size == 0 or np.all(data == np.round(data)):
        return counts
    if "log1p" in adata.uns and total_column is not None:
        totals = adata.obs[total_column].to_numpy(dtype=np.float64)
        recovered = counts.copy().astype(np.float64)
        recovered.data = np.expm1(recovered.data)
        recovered = sp.csr_matrix(sp.diags(totals / 1e4) @ recovered)
        recovered.data = np.round(recovered.data)
        recovered.eliminate_zeros()
        LOGGER.warning("X is log-normalized (uns['log1p']): raw counts recovered as round(expm1(X) * %s / 1e4)", total_column)
        out = recovered.astype(np.float32)
        out.sort_indices()
        return out
    if allow_non_integer:
        LOGGER.warning("X holds non-integer values; tokenizing them as counts (--allow-non-integer)")
        return counts
    raise IspRunError("X holds non-integer values and raw counts cannot be recovered (no uns['log1p'] with a "
                      f"total-counts column {'/'.join(TOTAL_COUNT_COLUMNS)}): give raw counts (--counts-layer) "
                      "or pass --allow-non-integer to tokenize the values as they are")


def select_cells(cells: "CellTable", filters: Sequence[str] = (), max_cells: Optional[int] = None,
                 index_range: Optional[tuple[int, int]] = None) -> list[int]:
    """Rows to perturb: ``filters`` ``COL=V1[,V2]`` (upstream ``filter_data``: obs value among the listed),
    then ``max_cells`` (upstream ``max_ncells``: when more cells remain they are shuffled with
    ``numpy.random.default_rng(42).permutation``, as ``datasets.Dataset.shuffle(seed=42)``, and the first
    ``max_cells`` kept), then ``index_range`` [start, end) of those rows in file order."""
    rows = np.arange(len(cells))
    for selector in filters:
        column, sep, values = selector.partition("=")
        if not sep or cells.obs is None or column not in cells.obs:
            columns = [] if cells.obs is None else list(cells.obs.columns)
            raise IspRunError(f"--cells takes OBS_COLUMN=VALUE[,VALUE] with a column of obs ({columns}), got {selector!r}")
        wanted = set(values.split(","))
        rows = rows[np.isin(cells.obs[column].astype(str).to_numpy()[rows], list(wanted))]
        if rows.size == 0:
            raise IspRunError(f"no cell has {column} in {sorted(wanted)}")
    if max_cells is not None and rows.size > max_cells:
        rows = np.sort(rows[np.random.default_rng(42).permutation(rows.size)[:max_cells]])
    if index_range is not None:
        start, end = index_range
        if start >= rows.size:
            raise IspRunError(f"--cell-index-range starts at {start} but only {rows.size} cells are selected")
        rows = rows[start:end]
    return [int(r) for r in rows]


def cell_table_from_anndata(adata, gene_column: Optional[str] = None, symbol_to_ensembl: Optional[dict] = None,
                            counts_layer: Optional[str] = None, allow_non_integer: bool = False) -> CellTable:
    """Build a :class:`CellTable` from an AnnData of raw counts.

    Ensembl ids come from ``var[gene_column]`` (default: ``var["ensembl_id"]`` if present, else the
    var names when they are Ensembl ids, else the var names mapped through ``symbol_to_ensembl``).
    ``obs["n_counts"]`` is used as the cell totals when present (else row sums over all genes).
    """
    matrix = adata.layers[counts_layer] if counts_layer else adata.X
    counts = sp.csr_matrix(matrix, dtype=np.float32)
    counts.sort_indices()
    names = [str(v) for v in adata.var_names]
    if gene_column is None and "ensembl_id" in adata.var:
        gene_column = "ensembl_id"
    if gene_column is not None:
        if gene_column not in adata.var:
            raise IspRunError(f"var has no column {gene_column!r} (columns: {list(adata.var.columns)})")
        ids = [str(v) if isinstance(v, str) else "" for v in adata.var[gene_column]]
        symbols = {e: s for e, s in zip(ids, names) if e and not _looks_ensembl([s])}
    elif _looks_ensembl(names):
        ids, symbols = [n.split(".")[0] for n in names], {}
    elif symbol_to_ensembl:
        ids = [symbol_to_ensembl.get(n, "") for n in names]
        symbols = {e: s for e, s in zip(ids, names) if e}
    else:
        raise IspRunError("var names are not Ensembl ids: name the var column that holds them (--gene-column) "
                          "or give gene dictionaries (--dictionaries) to map symbols")
    gene_ids = np.array(ids, dtype=object)
    duplicated = pd.Series(gene_ids).duplicated() & (gene_ids != "")
    if duplicated.any():
        LOGGER.warning("%d duplicated Ensembl ids in var: their columns are ignored", int(duplicated.sum()))
        gene_ids[duplicated.to_numpy()] = ""
    if (gene_ids != "").sum() == 0:
        raise IspRunError("no column has an Ensembl gene id")
    total_column = next((c for c in TOTAL_COUNT_COLUMNS if c in adata.obs), None)
    counts = _raw_counts(counts, adata, total_column, allow_non_integer)
    if total_column is not None:
        totals = adata.obs[total_column].to_numpy(dtype=np.float64)
    else:
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    cell_ids = [str(c) for c in adata.obs_names]
    if len(set(cell_ids)) != len(cell_ids):
        raise IspRunError("obs names (cell ids) are not unique; results are keyed by cell id (adata.obs_names_make_unique())")
    return CellTable(counts, gene_ids, totals, cell_ids, symbols, adata.obs.copy())


def load_cells(h5ad: Optional[str], n_cells: Optional[int] = None, gene_column: Optional[str] = None,
               symbol_to_ensembl: Optional[dict] = None, counts_layer: Optional[str] = None,
               allow_non_integer: bool = False) -> CellTable:
    """Cells of an .h5ad file (``None``: the celltypist sample, 559 real PBMC cells)."""
    if h5ad is None:
        from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

        adata = load_celltypist_sample(n_cells=n_cells, symbol_to_ensembl=symbol_to_ensembl)
    else:
        import anndata

        if not Path(h5ad).is_file():
            raise FileNotFoundError(f"no such .h5ad file: {h5ad}")
        adata = anndata.read_h5ad(h5ad)
        if n_cells is not None:
            adata = adata[:n_cells].copy()
    return cell_table_from_anndata(adata, gene_column, symbol_to_ensembl, counts_layer, allow_non_integer)
