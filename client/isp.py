"""In-silico perturbation over many cells through the ``geneformer_isp`` Triton model.

One request per cell (its expressed genes with Ensembl ids and raw counts + the perturbation spec, with a
leading batch dimension of 1: :func:`geneformer_triton.client.isp_spec.infer_cell`), ``concurrency`` requests
in flight (merged by the server's dynamic batcher into shared encoder batches;
:class:`geneformer_triton.client.triton_client.GeneformerClient`: one connection per worker thread, retries
while the server is unreachable). Results are appended as cells finish:

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

Modules (this one holds the input cells: :class:`CellTable`, :func:`select_cells`): :mod:`geneformer_triton.core.isp_schema`
(names, columns, folders), :mod:`geneformer_triton.client.isp_spec` (:class:`IspSpec`, state embeddings),
:mod:`geneformer_triton.client.isp_store` (:class:`ResultStore`), :mod:`geneformer_triton.client.isp_run` (:func:`run_isp`),
:mod:`geneformer_triton.client.isp_summary` (:func:`summarize`, :func:`plot_top_shifts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.core.cell_inputs import CellMatrix, InputOptions, SymbolMap, cells_from_anndata
from geneformer_triton.core.isp_schema import IspRunError

__all__ = ["CellTable", "cell_table", "cell_table_from_anndata", "select_cells"]


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


def cell_table(matrix: CellMatrix) -> CellTable:
    """The :class:`CellTable` of cells read by the input layer (:mod:`geneformer_triton.core.cell_inputs`:
    one gene-identifier, total-count and integer rule for every command)."""
    return CellTable(matrix.counts, np.array(matrix.gene_ids, dtype=object), matrix.n_counts.astype(np.float64),
                     list(matrix.cell_ids), dict(matrix.symbols), matrix.obs.copy())


def cell_table_from_anndata(adata, options: InputOptions = InputOptions(), symbols: Optional[SymbolMap] = None,
                            source: str = "anndata") -> CellTable:
    """:func:`cell_table` of an in-memory AnnData (:func:`geneformer_triton.core.cell_inputs.cells_from_anndata`)."""
    return cell_table(cells_from_anndata(adata, options, symbols, source))


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
