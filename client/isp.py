"""In-silico perturbation over many cells through the ``geneformer_isp`` Triton model.

One request per cell (its expressed genes with Ensembl ids and raw counts + the perturbation spec),
``concurrency`` requests in flight (:class:`client.triton_client.GeneformerClient`: one connection per
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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from client.outputs import fsync_dir
from client.triton_client import GeneformerClient, InferenceError

LOGGER = logging.getLogger(__name__)

ISP_MODEL = "geneformer_isp"
PERTURBATIONS = ("delete", "overexpress", "inhibit", "activate")
SCORE_OUTPUTS = ("cell_shift", "gene_embedding_shift", "goal_shift", "start_shift")
#: upstream's per-perturbation value (InSilicoPerturber's ``(perturbed, "cell_emb")`` without cell states)
UPSTREAM_SCORE = "cell_emb_shift"
COLUMNS = (
    "cell_id", "perturbation", "gene_id", "gene_symbol", "target_index", "n_perturbations",
    *SCORE_OUTPUTS, UPSTREAM_SCORE,
)
#: Parquet dataset of every (perturbed, affected) gene cosine (emb_mode cell_and_gene), inside the output
GENE_FOLDER = "_genes"
COMMIT_FOLDER = "_commits"  # one empty marker per committed batch of parts
GENE_COLUMNS = ("cell_id", "gene_id", "affected_gene_id", "affected_symbol", "cos")
STATE_PREFIX = "state_shift_"  # + state name: upstream's value with cell_states_to_model
ERROR_COLUMNS = ("cell_id", "error")
#: encoder -> embedding ensemble built on it (to embed reference cells for goal/start states)
EMBED_MODEL_FOR = {
    "geneformer_onnx": "geneformer_embed_onnx",
    "geneformer_onnx_fp16": "geneformer_embed_onnx_fp16",
    "geneformer_torchscript": "geneformer_embed_torchscript",
    "geneformer_trt": "geneformer_embed_trt",
}
RANK_BY = {  # summary ranking -> score column it is based on
    "cell": "cell_shift",
    "gene": "gene_embedding_shift",
    "goal": "goal_shift",
}


class IspRunError(RuntimeError):
    """The run cannot proceed (bad options, output written with other settings, server gone)."""


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
        from geneformer_triton.data.celltypist_sample import load_celltypist_sample

        adata = load_celltypist_sample(n_cells=n_cells, symbol_to_ensembl=symbol_to_ensembl)
    else:
        import anndata

        if not Path(h5ad).is_file():
            raise FileNotFoundError(f"no such .h5ad file: {h5ad}")
        adata = anndata.read_h5ad(h5ad)
        if n_cells is not None:
            adata = adata[:n_cells].copy()
    return cell_table_from_anndata(adata, gene_column, symbol_to_ensembl, counts_layer, allow_non_integer)


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class IspSpec:
    """What to perturb in every cell (the same for the whole run)."""

    perturbation: str = "delete"
    targets: Optional[tuple[str, ...]] = None  # None = every gene of each cell
    target_mode: str = "each"
    anchor_genes: tuple[str, ...] = ()
    rank_shift: Optional[float] = None
    gene_shift: bool = False
    goal_embedding: Optional[tuple[float, ...]] = None
    start_embedding: Optional[tuple[float, ...]] = None
    encoder_model: Optional[str] = None
    model: str = ISP_MODEL
    strict_targets: bool = False  # send targets a cell does not express (the server rejects the cell)
    semantics: str = "upstream"  # upstream Geneformer's InSilicoPerturber, or "ours" (target_mode, inhibit/activate)
    emb_layer: int = -1  # upstream ISP convention: hidden_states[n_layers + emb_layer]
    emb_mode: str = "cell"  # "cell_and_gene": also every (perturbed, affected) gene cosine
    state_names: tuple[str, ...] = ()  # cell_states_to_model: start, goal, alt... (upstream order)
    state_embeddings: Optional[tuple[tuple[float, ...], ...]] = None

    def __post_init__(self) -> None:
        if self.perturbation not in PERTURBATIONS:
            raise IspRunError(f"unknown perturbation {self.perturbation!r}; expected one of {', '.join(PERTURBATIONS)}")
        if self.target_mode not in ("each", "set"):
            raise IspRunError(f"target_mode must be 'each' or 'set', got {self.target_mode!r}")
        if self.target_mode == "set" and not self.targets:
            raise IspRunError("target_mode 'set' needs an explicit list of target genes")
        if self.targets is not None and len(self.targets) == 0:
            raise IspRunError("the target list is empty (give genes, or 'all')")
        if self.semantics not in ("upstream", "ours"):
            raise IspRunError(f"semantics must be 'upstream' or 'ours', got {self.semantics!r}")
        if self.semantics == "upstream" and self.perturbation not in ("delete", "overexpress"):
            raise IspRunError(f"{self.perturbation} is ours (upstream has not implemented it): add --semantics ours")
        if self.semantics == "ours" and (self.state_embeddings is not None or self.emb_mode != "cell"):
            raise IspRunError("cell states and --emb-mode cell_and_gene are upstream semantics; drop --semantics ours")

    @property
    def upstream(self) -> bool:
        return self.semantics == "upstream"

    def columns(self) -> tuple[str, ...]:
        """Row columns of this run (COLUMNS + one ``state_shift_<state>`` per cell state)."""
        return COLUMNS + tuple(STATE_PREFIX + name for name in self.state_names)

    def fingerprint(self) -> dict:
        """Settings that must match to resume an output (goal/start states by hash)."""
        data = asdict(self)
        for key in ("goal_embedding", "start_embedding"):
            if data[key] is not None:
                data[key] = hashlib.sha256(np.asarray(data[key], dtype=np.float32).tobytes()).hexdigest()[:16]
        data.pop("strict_targets")
        if data["state_embeddings"] is not None:
            data["state_embeddings"] = hashlib.sha256(np.asarray(data["state_embeddings"], dtype=np.float32).tobytes()).hexdigest()[:16]
        return data

    def request_inputs(self, gene_ids: np.ndarray, counts: np.ndarray, n_counts: float) -> Optional[dict]:
        """Wire inputs for one cell; ``None`` when the cell expresses no target (nothing to do)."""
        inputs = {
            "gene_ids": np.array([str(g).encode() for g in gene_ids], dtype=object),
            "counts": np.ascontiguousarray(counts, dtype=np.float32),
            "n_counts": np.array([n_counts], dtype=np.float32),
            "perturbation": np.array([self.perturbation.encode()], dtype=object),
            "semantics": np.array([self.semantics.encode()], dtype=object),
        }
        if self.upstream:
            inputs["emb_layer"] = np.array([self.emb_layer], dtype=np.int32)
            inputs["emb_mode"] = np.array([self.emb_mode.encode()], dtype=object)
            if self.state_embeddings is not None:
                inputs["state_embeddings"] = np.asarray(self.state_embeddings, dtype=np.float32)
        else:
            inputs["target_mode"] = np.array([self.target_mode.encode()], dtype=object)
            inputs["return_gene_shift"] = np.array([self.gene_shift], dtype=bool)
        expressed = set(str(g) for g in gene_ids)
        if self.targets is not None:
            targets = list(self.targets)
            if not self.upstream and self.target_mode == "each" and not self.strict_targets:
                targets = [t for t in targets if t in expressed]
                if not targets:
                    return None
            inputs["targets"] = np.array([t.encode() for t in targets], dtype=object)
        if self.anchor_genes:
            inputs["anchor_genes"] = np.array([a.encode() for a in self.anchor_genes], dtype=object)
        if self.rank_shift is not None:
            inputs["rank_shift"] = np.array([self.rank_shift], dtype=np.float32)
        if self.goal_embedding is not None:
            inputs["goal_embedding"] = np.asarray(self.goal_embedding, dtype=np.float32)
        if self.start_embedding is not None:
            inputs["start_embedding"] = np.asarray(self.start_embedding, dtype=np.float32)
        if self.encoder_model:
            inputs["encoder_model"] = np.array([self.encoder_model.encode()], dtype=object)
        return inputs

    def outputs(self) -> list[str]:
        if self.upstream:
            names = ["perturbed_genes", "cell_emb_shift", "cell_shift", "target_errors"]
            if self.state_embeddings is not None:
                names.append("state_shift")
            if self.emb_mode == "cell_and_gene":
                names += ["cell_genes", "gene_perturbation", "gene_affected", "gene_cos"]
            return names
        names = ["perturbed_genes", "cell_shift", "target_errors"]
        if self.gene_shift:
            names.append("gene_embedding_shift")
        if self.goal_embedding is not None:
            names.append("goal_shift")
        if self.start_embedding is not None:
            names.append("start_shift")
        return names


def upstream_state_embedding(client: GeneformerClient, cells: CellTable, rows: Sequence[int], spec: "IspSpec",
                             concurrency: int = 4) -> np.ndarray:
    """A cell state's embedding as upstream's ``EmbExtractor.get_state_embs`` computes it: the mean over the
    state's cells of each cell's mean over all its tokens at ``spec.emb_layer`` (``embed_only`` requests)."""
    if len(rows) == 0:
        raise IspRunError("no cell selected for a state embedding")

    def one(row: int) -> np.ndarray:
        gene_ids, counts = cells.cell(row)
        inputs = {
            "gene_ids": np.array([str(g).encode() for g in gene_ids], dtype=object),
            "counts": np.ascontiguousarray(counts, dtype=np.float32),
            "n_counts": np.array([cells.n_counts[row]], dtype=np.float32),
            "perturbation": np.array([b"delete"], dtype=object),
            "emb_layer": np.array([spec.emb_layer], dtype=np.int32),
            "embed_only": np.array([True], dtype=bool),
        }
        if spec.encoder_model:
            inputs["encoder_model"] = np.array([spec.encoder_model.encode()], dtype=object)
        return client.infer(spec.model, inputs, ["original_embedding"])["original_embedding"]

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        means = list(pool.map(one, rows))
    return np.asarray(means, dtype=np.float64).mean(axis=0)


def state_embedding(client: GeneformerClient, cells: CellTable, rows: Sequence[int], embed_model: str) -> np.ndarray:
    """Mean cell embedding of reference cells (a start or goal state) through an embedding ensemble."""
    from client.triton_client import pack_cells

    if len(rows) == 0:
        raise IspRunError("no reference cell selected for the state embedding")
    packed_ids, packed_counts = pack_cells(cells.counts[list(rows)], list(cells.gene_ids))
    embeddings = client.embed_cells(packed_ids, packed_counts, cells.n_counts[list(rows)], model=embed_model)
    return embeddings.astype(np.float64).mean(axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- result stores


def _empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


class ResultStore:
    """Append-only, resumable store of per-perturbation rows (Parquet dataset folder or one CSV file)."""

    def __init__(self, path: str | Path, spec_fingerprint: dict, overwrite: bool = False,
                 columns: Sequence[str] = COLUMNS) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.csv = self.path.suffix.lower() == ".csv"
        if overwrite:
            self._remove()
        if self.csv:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.errors_path = self.path.with_suffix(".errors.csv")
            self.run_path = self.path.with_suffix(".run.json")
            lock_path = self.path.with_suffix(".lock")
        else:
            if self.path.exists() and not self.path.is_dir():
                raise IspRunError(f"{self.path} exists and is not a Parquet dataset folder")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "_errors").mkdir(exist_ok=True)
            (self.path / GENE_FOLDER).mkdir(exist_ok=True)
            self.errors_path = self.path / "_errors"
            self.genes_path = self.path / GENE_FOLDER
            self.commits_path = self.path / COMMIT_FOLDER
            self.run_path = self.path / "_run.json"
            lock_path = self.path / "_lock"
        self._lock = open(lock_path, "w")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise IspRunError(f"another run is writing {self.path} (lock {lock_path})") from None
        self._check_settings(spec_fingerprint)
        self._write_lock = threading.Lock()
        self._recover()

    # -- housekeeping
    def _remove(self) -> None:
        import shutil

        if self.path.is_dir():
            shutil.rmtree(self.path)
        for suffix in ("", ".errors.csv", ".run.json"):
            target = self.path if suffix == "" else self.path.with_suffix(suffix)
            if target.is_file():
                target.unlink()

    def _check_settings(self, fingerprint: dict) -> None:
        if self.run_path.is_file():
            stored = json.loads(self.run_path.read_text())
            if stored != json.loads(json.dumps(fingerprint)):
                diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != json.loads(json.dumps(fingerprint)).get(k))
                raise IspRunError(
                    f"{self.path} holds results of a run with other settings ({', '.join(diff)}); "
                    "use another output or overwrite it"
                )
        else:
            tmp = self.run_path.with_name("." + self.run_path.name + ".tmp")
            tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.run_path)

    def _part_folders(self) -> tuple[Path, Path, Path]:
        return self.path, self.errors_path, self.genes_path

    @staticmethod
    def _batch(part: Path) -> str:
        return part.name[len("part-"): -len(".parquet")]

    def _committed(self) -> set[str]:
        return {marker.name for marker in self.commits_path.iterdir() if not marker.name.startswith(".")}

    def _parts(self, folder: Path) -> list[Path]:
        """Committed part files of ``folder`` (rows, ``_errors`` or ``_genes``), in write order."""
        committed = self._committed()
        return [p for p in sorted(folder.glob("part-*.parquet")) if self._batch(p) in committed]

    def _commit(self, batch: str) -> None:
        tmp = self.commits_path / f".{batch}.tmp"
        with open(tmp, "wb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.commits_path / batch)
        fsync_dir(self.commits_path)

    def _recover(self) -> None:
        """Remove leftovers of a killed run: temporary and uncommitted parts (Parquet), torn or partial
        cells (CSV)."""
        if not self.csv:
            if not self.commits_path.is_dir():  # written before commit markers: adopt every part
                self.commits_path.mkdir()
                for batch in sorted({self._batch(p) for f in self._part_folders() for p in f.glob("part-*.parquet")}):
                    self._commit(batch)
            for folder in (*self._part_folders(), self.commits_path):
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink()
            committed = self._committed()
            stale = [p for f in self._part_folders() for p in f.glob("part-*.parquet") if self._batch(p) not in committed]
            if stale:
                LOGGER.warning("%s: deleting %d uncommitted part(s) of an interrupted run (those cells are redone)",
                               self.path, len(stale))
                for part in stale:
                    part.unlink()
            return
        for file, columns in ((self.path, self.columns), (self.errors_path, ERROR_COLUMNS)):
            if not file.is_file() or file.stat().st_size == 0:
                continue
            data = file.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                LOGGER.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", file, len(data) - cut)
                with open(file, "r+b") as handle:
                    handle.truncate(cut)
            if file == self.path and cut > 0:
                frame = pd.read_csv(file, dtype={"cell_id": str})
                counts = frame.groupby("cell_id")["n_perturbations"].agg(["size", "first"])
                partial = counts.index[counts["size"] != counts["first"]]
                if len(partial):
                    LOGGER.warning("%s: dropping %d incomplete cell(s) of an interrupted run", file, len(partial))
                    self._rewrite_csv(frame[~frame["cell_id"].isin(partial)], file)

    @staticmethod
    def _rewrite_csv(frame: pd.DataFrame, file: Path) -> None:
        tmp = file.with_name("." + file.name + ".tmp")
        frame.to_csv(tmp, index=False)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, file)
        fsync_dir(file.parent)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading
    def read(self) -> pd.DataFrame:
        """Every stored row (empty frame with the columns when none)."""
        if self.csv:
            if not self.path.is_file() or self.path.stat().st_size == 0:
                return _empty_frame(self.columns)
            return pd.read_csv(self.path, dtype={"cell_id": str, "gene_id": str, "gene_symbol": str})
        parts = self._parts(self.path)
        if not parts:
            return _empty_frame(self.columns)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def read_genes(self) -> pd.DataFrame:
        """Every stored (perturbed, affected) gene cosine (emb_mode cell_and_gene; Parquet outputs only)."""
        parts = [] if self.csv else self._parts(self.genes_path)
        if not parts:
            return _empty_frame(GENE_COLUMNS)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def read_errors(self) -> pd.DataFrame:
        if self.csv:
            if not self.errors_path.is_file() or self.errors_path.stat().st_size == 0:
                return _empty_frame(ERROR_COLUMNS)
            return pd.read_csv(self.errors_path, dtype={"cell_id": str})
        parts = self._parts(self.errors_path)
        if not parts:
            return _empty_frame(ERROR_COLUMNS)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def finished(self, include_errors: bool = True) -> set[str]:
        done = set(self.read()["cell_id"].astype(str))
        if include_errors:
            done |= set(self.read_errors()["cell_id"].astype(str))
        return done

    def forget_errors(self) -> None:
        """Drop the recorded server-rejected cells so that they are retried."""
        if self.csv:
            if self.errors_path.is_file():
                self.errors_path.unlink()
        else:
            for part in self.errors_path.glob("part-*.parquet"):
                part.unlink()

    # -- writing
    def _write_parquet(self, frame: pd.DataFrame, folder: Path, batch: str) -> Path:
        """Write ``frame`` as ``folder/part-<batch>.parquet`` (atomic; read only once ``batch`` is committed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{batch}.parquet"
        tmp = folder / f".{name}.tmp"
        table = pa.Table.from_pandas(frame, preserve_index=False)
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / name)
        fsync_dir(folder)
        return folder / name

    def _append_csv(self, frame: pd.DataFrame, file: Path, columns: Sequence[str]) -> None:
        header = not file.is_file() or file.stat().st_size == 0
        buffer = io.StringIO()
        frame.reindex(columns=list(columns)).to_csv(buffer, index=False, header=header)
        data = buffer.getvalue().encode()
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, rows: pd.DataFrame, errors: pd.DataFrame, genes: Optional[Sequence[pd.DataFrame]] = None) -> None:
        """Persist finished cells as one batch: ``rows`` (whole cells only), ``errors`` (rejected cells,
        dropped targets) and ``genes`` (gene-cosine frames of those cells); Parquet: committed together."""
        genes = [g for g in genes or () if len(g)]
        with self._write_lock:
            if self.csv:
                if genes:
                    raise IspRunError("gene cosines (emb_mode cell_and_gene) are written to Parquet outputs only")
                if len(rows):
                    self._append_csv(rows, self.path, self.columns)
                if len(errors):
                    self._append_csv(errors, self.errors_path, ERROR_COLUMNS)
                return
            batch = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            parts = [(pd.concat(genes, ignore_index=True) if genes else None, self.genes_path),
                     (rows, self.path), (errors, self.errors_path)]
            written = [self._write_parquet(frame, folder, batch) for frame, folder in parts
                       if frame is not None and len(frame)]
            if written:
                self._commit(batch)


# ----------------------------------------------------------------------------- running


def cell_rows(cell_id: str, spec: IspSpec, result: dict[str, np.ndarray], cells: CellTable) -> pd.DataFrame:
    """The rows of one finished cell (every score column present; NaN where not computed)."""
    genes = [g.decode() if isinstance(g, bytes) else str(g) for g in result["perturbed_genes"]]
    n = len(genes)
    frame = pd.DataFrame({
        "cell_id": [cell_id] * n,
        "perturbation": [spec.perturbation] * n,
        "gene_id": genes,
        "gene_symbol": [cells.symbol(g) for g in genes],
        "target_index": np.arange(n, dtype=np.int64),
        "n_perturbations": np.full(n, n, dtype=np.int64),
    })
    for name in SCORE_OUTPUTS + (UPSTREAM_SCORE,):
        value = result.get(name)
        frame[name] = np.asarray(value, dtype=np.float32) if value is not None else np.full(n, np.nan, dtype=np.float32)
    if spec.state_names:
        shifts = np.asarray(result["state_shift"], dtype=np.float32).reshape(n, len(spec.state_names))
        for k, name in enumerate(spec.state_names):
            frame[STATE_PREFIX + name] = shifts[:, k]
    return frame


def gene_rows(cell_id: str, result: dict[str, np.ndarray], cells: CellTable) -> Optional[pd.DataFrame]:
    """One cell's (perturbed, affected) gene cosines (emb_mode cell_and_gene), or None when not returned."""
    if "gene_cos" not in result:
        return None
    decode = lambda values: [v.decode() if isinstance(v, bytes) else str(v) for v in values]  # noqa: E731
    perturbed = np.array(decode(result["perturbed_genes"]), dtype=object)
    genes = np.array(decode(result["cell_genes"]), dtype=object)
    affected = genes[np.asarray(result["gene_affected"], dtype=np.int64)]
    return pd.DataFrame({
        "cell_id": cell_id,
        "gene_id": perturbed[np.asarray(result["gene_perturbation"], dtype=np.int64)],
        "affected_gene_id": affected,
        "affected_symbol": [cells.symbols.get(g, g) for g in affected],
        "cos": np.asarray(result["gene_cos"], dtype=np.float32),
    })


@dataclass
class RunStats:
    cells_total: int = 0
    cells_skipped_done: int = 0
    cells_done: int = 0
    cells_rejected: int = 0
    cells_without_targets: int = 0
    perturbations: int = 0
    seconds: float = 0.0

    @property
    def perturbations_per_s(self) -> float:
        return self.perturbations / self.seconds if self.seconds > 0 else 0.0


def run_isp(
    client: GeneformerClient,
    cells: CellTable,
    spec: IspSpec,
    store: ResultStore,
    concurrency: int = 4,
    flush_every: int = 8,
    flush_seconds: float = 10.0,
    rows: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> RunStats:
    """Perturb every cell not yet in ``store``; rows are appended in whole-cell blocks as cells finish."""
    from tqdm.auto import tqdm

    stats = RunStats()
    selected = list(range(len(cells))) if rows is None else list(rows)
    stats.cells_total = len(selected)
    finished = store.finished()
    todo = [r for r in selected if cells.cell_ids[r] not in finished]
    stats.cells_skipped_done = len(selected) - len(todo)
    if stats.cells_skipped_done:
        LOGGER.info("resuming: %d of %d cells already in %s", stats.cells_skipped_done, len(selected), store.path)
    outputs = spec.outputs()
    buffer: list[pd.DataFrame] = []
    genes: list[pd.DataFrame] = []
    errors: list[dict] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal buffer, errors, genes, last_flush
        store.append(pd.concat(buffer, ignore_index=True) if buffer else _empty_frame(store.columns),
                     pd.DataFrame(errors, columns=list(ERROR_COLUMNS)), genes)
        buffer, errors, genes, last_flush = [], [], [], time.monotonic()

    def work(row: int):
        gene_ids, counts = cells.cell(row)
        inputs = spec.request_inputs(gene_ids, counts, float(cells.n_counts[row]))
        if inputs is None:
            return row, None, "skipped: the cell expresses none of the targets"
        try:
            return row, client.infer(spec.model, inputs, outputs), None
        except InferenceError as error:  # the server rejected this cell's request
            return row, None, str(error)

    started = time.perf_counter()
    pending: set[Future] = set()
    queue = iter(todo)
    exhausted = False
    fatal: Optional[BaseException] = None
    with ThreadPoolExecutor(max(1, concurrency)) as pool, tqdm(total=len(todo), unit="cell", disable=not progress) as bar:
        try:
            while True:
                while not exhausted and fatal is None and len(pending) < 2 * max(1, concurrency):
                    row = next(queue, None)
                    if row is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(work, row))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        row, result, message = future.result()
                    except Exception as error:  # server gone after retries, or a client-side failure
                        fatal = fatal or error
                        continue
                    cell_id = cells.cell_ids[row]
                    if result is None:
                        errors.append({"cell_id": cell_id, "error": message})
                        if message.startswith("skipped"):
                            stats.cells_without_targets += 1
                        else:
                            stats.cells_rejected += 1
                            LOGGER.warning("cell %s rejected: %s", cell_id, message)
                    else:
                        frame = cell_rows(cell_id, spec, result, cells)
                        buffer.append(frame)
                        gene_frame = gene_rows(cell_id, result, cells)
                        if gene_frame is not None:
                            genes.append(gene_frame)
                        for note in result.get("target_errors", []):
                            errors.append({"cell_id": cell_id, "error": note.decode() if isinstance(note, bytes) else str(note)})
                        stats.cells_done += 1
                        stats.perturbations += len(frame)
                    bar.update(1)
                pending_cells = len(buffer) + len(errors)
                if pending_cells >= flush_every or (pending_cells and time.monotonic() - last_flush >= flush_seconds):
                    flush()
        finally:
            for future in pending:
                future.cancel()
            if buffer or errors:
                flush()
    stats.seconds = time.perf_counter() - started
    if fatal is not None:
        raise IspRunError(f"stopped: {fatal}; finished cells are saved in {store.path}, rerun to resume") from fatal
    return stats


# ----------------------------------------------------------------------------- summary


def summarize(rows: pd.DataFrame, rank_by: str = "cell", min_cells: int = 1) -> pd.DataFrame:
    """Per perturbed gene (or gene set): cells, mean/std of each score, sorted strongest first.

    ``shift`` columns are ``1 - cosine`` (0 = no change) for ``cell`` and ``gene``; ``goal`` ranks by
    the mean goal shift (positive = towards the goal state). Genes seen in fewer than ``min_cells``
    cells are left out.
    """
    if rank_by not in RANK_BY:
        raise IspRunError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    column = RANK_BY[rank_by]
    if rows.empty:
        return pd.DataFrame(columns=["gene_id", "gene_symbol", "n_cells"])
    if rows[column].isna().all():
        raise IspRunError(f"no {column} values in the results: rank by another score (the run did not compute it)")
    frame = rows.copy()
    frame["cell_shift_distance"] = 1.0 - frame["cell_shift"].astype(np.float64)
    frame["gene_embedding_shift_distance"] = 1.0 - frame["gene_embedding_shift"].astype(np.float64)
    grouped = frame.groupby("gene_id", sort=False)
    summary = pd.DataFrame({
        "gene_symbol": grouped["gene_symbol"].first(),
        "n_cells": grouped["cell_id"].nunique(),
        "mean_cell_shift": grouped["cell_shift_distance"].mean(),
        "std_cell_shift": grouped["cell_shift_distance"].std(ddof=0),
        "mean_cell_cosine": grouped["cell_shift"].mean(),
        "mean_gene_embedding_shift": grouped["gene_embedding_shift_distance"].mean(),
        "mean_goal_shift": grouped["goal_shift"].mean(),
        "mean_start_shift": grouped["start_shift"].mean(),
    }).reset_index()
    summary = summary[summary["n_cells"] >= min_cells]
    if summary.empty:  # no gene in min_cells cells: keep the columns (dropna would drop every one of them)
        return summary.reset_index(drop=True)
    key = {"cell": "mean_cell_shift", "gene": "mean_gene_embedding_shift", "goal": "mean_goal_shift"}[rank_by]
    summary = summary.sort_values([key, "n_cells"], ascending=[False, False], kind="stable").reset_index(drop=True)
    return summary.dropna(axis=1, how="all")


def format_summary(summary: pd.DataFrame, top: int = 20) -> str:
    if summary.empty:
        return "(no results)"
    shown = summary.head(top).copy()
    for column in shown.columns:
        if column.startswith(("mean_", "std_")):
            shown[column] = shown[column].map(lambda v: f"{v:.6f}")
    return shown.to_string(index=False)


def plot_top_shifts(summary: pd.DataFrame, path: str | Path, rank_by: str = "cell", top: int = 20,
                    title: Optional[str] = None) -> Path:
    """Horizontal bar chart of the ``top`` genes' mean shift (error bars: std over cells) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = {"cell": "mean_cell_shift", "gene": "mean_gene_embedding_shift", "goal": "mean_goal_shift"}[rank_by]
    label = {"cell": "mean cell-embedding shift (1 - cosine)", "gene": "mean gene-embedding shift (1 - cosine)",
             "goal": "mean goal-state shift (cosine gain)"}[rank_by]
    shown = summary.head(top).iloc[::-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.32 * len(shown) + 1.2)))
    error = shown["std_cell_shift"] if rank_by == "cell" and "std_cell_shift" in shown else None
    names = [f"{s} ({n})" for s, n in zip(shown["gene_symbol"].astype(str), shown["n_cells"])]
    ax.barh(names, shown[key], xerr=error, color="#4477aa", ecolor="#999999", capsize=2)
    ax.set_xlabel(label)
    ax.set_ylabel("gene (cells)")
    ax.set_title(title or f"Top {len(shown)} in-silico perturbations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
