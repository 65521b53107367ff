"""One input layer: raw counts of cells from an ``.h5ad`` or a CSV/TSV table, the same for every command.

``gftriton embed``, ``isp``, ``evaluate``, ``check`` and the benchmarks read cells through
:func:`read_cells` / :func:`cells_from_anndata` and so apply the same rules:

**Matrix.** ``.h5ad``: ``X`` (``layer`` None or ``"X"``), ``.raw.X`` with ``.raw.var`` (``layer="raw"``)
or ``layers[NAME]``. CSV/TSV (``.csv``, ``.tsv``, ``.txt``, optionally ``.gz``): cells as rows, genes
as columns, the first column holds the cell ids (no ``layer``).

**Gene identifiers.** ``var[gene_column]`` when given (it must exist), else ``var["ensembl_id"]``
when present, else the var names (``.raw.var_names`` with ``layer="raw"``). Each identifier is judged
on its own: one that matches :data:`ENSEMBL_GENE_ID` (``ENS`` + species letters + ``G`` + digits,
e.g. ``ENSG00000139618``, ``ENSMUSG00000017167``; a version suffix ``.5`` is dropped) is an Ensembl
id; any other is a gene symbol, mapped to an Ensembl id with the symbol dictionary
(``gene_name_id_dict.json``: the one of the served model repository's tokenizer,
``<repository>/geneformer_tokenizer/1/``, or of ``--dictionaries``; :func:`find_symbol_map`).
Symbols it does not know get "" (ignored). When several columns carry one Ensembl id, the first keeps
it and the others are ignored. An input where no column gets an Ensembl id is refused; symbols
without a dictionary are refused when they are all there is, else ignored with a warning.

**Totals.** ``n_counts`` per cell (the tokenizer's normalizer) comes from ``obs[n_counts_key]``
(default ``n_counts``; a column named explicitly must exist). When the default column is absent,
``obs["ncounts"]`` or ``obs["total_counts"]`` (in that order) is used, else the sum of the cell's
counts over every gene of the matrix.

**Counts.** Values must be finite and >= 0. Non-integer values are refused, naming the cells, unless
they are log1p-normalized counts that can be recovered exactly: ``uns["log1p"]`` is set (scanpy's
mark of ``log1p``) and, in every cell, ``expm1(x)`` divided by the cell's smallest ``expm1(x)`` lies
times the smallest k in 1..:data:`MAX_SMALLEST_COUNT` (the cell's smallest count) lies within
:data:`RECOVERY_TOLERANCE` of an integer (``x = log1p(count * scale)`` with one scale per cell, whatever
the normalization target); those integers are then the counts.
``allow_non_integer`` tokenizes other non-integer values as they are (with a warning).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.core.dictionaries import GENE_NAME_ID_FILE

LOGGER = logging.getLogger(__name__)

ENSEMBL_COLUMN = "ensembl_id"
DEFAULT_N_COUNTS_KEY = "n_counts"
#: obs columns tried, in order, when the default ``n_counts`` column is absent
N_COUNTS_ALIASES = ("ncounts", "total_counts")
#: an Ensembl gene id (upper-cased, version suffix removed)
ENSEMBL_GENE_ID = re.compile(r"^ENS[A-Z]*G\d+$")
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
TAB_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz")
#: recovered counts must lie within max(abs, rel * value) of an integer: absolute, relative
RECOVERY_TOLERANCE = (0.01, 1e-4)
#: log1p recovery: a cell's smallest count is taken as the smallest of 1..this that makes it consistent
MAX_SMALLEST_COUNT = 4
TOKENIZER_FOLDER = Path("geneformer_tokenizer") / "1"


class InputError(ValueError):
    """The input cannot be read as raw counts; the message says why and what to do."""


@dataclass(frozen=True)
class InputOptions:
    """How to read the cells (the command-line options of :func:`add_input_arguments`).

    ``layer``: None/"X", "raw" or a layer name; ``gene_column``: var column with the gene identifiers;
    ``n_counts_key``: obs column with each cell's total counts; ``allow_non_integer``: tokenize
    non-integer values as they are; ``max_cells``: only the first N cells.
    """

    layer: str | None = None
    gene_column: str | None = None
    n_counts_key: str = DEFAULT_N_COUNTS_KEY
    allow_non_integer: bool = False
    max_cells: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, layer_attribute: str = "layer") -> "InputOptions":
        return cls(layer=getattr(args, layer_attribute, None), gene_column=getattr(args, "gene_column", None),
                   n_counts_key=getattr(args, "n_counts_key", None) or DEFAULT_N_COUNTS_KEY,
                   allow_non_integer=bool(getattr(args, "allow_non_integer", False)),
                   max_cells=getattr(args, "max_cells", None))


@dataclass(frozen=True)
class SymbolMap:
    """Gene symbol -> Ensembl id (``gene_name_id_dict.json``) and where it came from (for messages)."""

    mapping: Mapping[str, str]
    source: str

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SymbolMap | None":
        path = Path(folder) / GENE_NAME_ID_FILE
        return cls(json.loads(path.read_text()), str(path)) if path.is_file() else None


def find_symbol_map(dictionaries: str | Path | None = None, repository: str | Path | None = None) -> SymbolMap | None:
    """The symbol dictionary of ``dictionaries`` (a folder), else of the model repository's tokenizer
    (``<repository>/geneformer_tokenizer/1/gene_name_id_dict.json``: what the server tokenizes with);
    None when neither has one."""
    folders = [Path(dictionaries)] if dictionaries else []
    if repository:
        folders.append(Path(repository) / TOKENIZER_FOLDER)
    for folder in folders:
        found = SymbolMap.from_folder(folder)
        if found is not None:
            return found
    return None


def add_input_arguments(group: argparse._ActionsContainer, layer: bool = True) -> None:
    """The input options every command shares: ``--layer``, ``--gene-column``, ``--n-counts-key``,
    ``--allow-non-integer`` (read back with :meth:`InputOptions.from_args`)."""
    if layer:
        group.add_argument("--layer", help="raw counts of an .h5ad: 'X' (default), 'raw' (.raw.X) or a layer name")
    group.add_argument("--gene-column", help="var column with the gene identifiers (default var['ensembl_id'] when "
                       "present, else var names); Ensembl ids are used as is, symbols mapped with gene_name_id_dict.json")
    group.add_argument("--n-counts-key", default=DEFAULT_N_COUNTS_KEY,
                       help="obs column with each cell's total counts (default %(default)s; when absent: obs ncounts "
                       "or total_counts, else the sum of the cell's counts)")
    group.add_argument("--allow-non-integer", action="store_true",
                       help="tokenize non-integer values as counts (default: refused unless log-normalized counts with "
                       "uns['log1p'] and obs totals can be recovered exactly)")


# ----------------------------------------------------------------------------------------- identifiers
def ensembl_id(value: object) -> str:
    """``value`` as an Ensembl gene id (upper-case, no version suffix), "" when it is not one."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip().upper().split(".")[0]
    return text if ENSEMBL_GENE_ID.match(text) else ""


@dataclass
class GeneIds:
    """Ensembl id of every column ("" = ignored), its display symbol where known, and how they were found."""

    ids: list[str]
    symbols: dict[str, str]
    how: str


def resolve_gene_ids(identifiers: Sequence[object], symbol_map: SymbolMap | None,
                     names: Sequence[object] | None = None, where: str = "var_names") -> GeneIds:
    """Apply the identifier rule (module docstring) to ``identifiers``; ``names`` (var names beside a
    gene column) give display symbols for ids."""
    texts = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in identifiers]
    ids = [ensembl_id(t) for t in texts]
    symbol_columns = [i for i, (t, e) in enumerate(zip(texts, ids)) if not e and t and t.lower() not in ("nan", "none")]
    symbols: dict[str, str] = {}
    how = f"{where} (Ensembl ids)"
    if symbol_columns and symbol_map is None:
        examples = [texts[i] for i in symbol_columns[:3]]
        if len(symbol_columns) == len(texts) or not any(ids):
            raise InputError(
                f"the genes in {where} are symbols (e.g. {examples}) and no gene_name_id_dict.json is at hand to map "
                "them to Ensembl ids: give --repository DIR (the served model repository, whose tokenizer holds it), "
                "--dictionaries DIR, or a var column of Ensembl ids (--gene-column)")
        LOGGER.warning("%d identifiers in %s are not Ensembl ids and no symbol dictionary is at hand: ignored (e.g. %s)",
                       len(symbol_columns), where, examples)
    elif symbol_columns:
        for i in symbol_columns:
            ids[i] = ensembl_id(symbol_map.mapping.get(texts[i], ""))
            if ids[i]:
                symbols.setdefault(ids[i], texts[i])
        how = f"{where}: {len(texts) - len(symbol_columns)} Ensembl ids, {len(symbol_columns)} symbols mapped with {symbol_map.source}"
    if names is not None:
        for gene, name in zip(ids, names):
            if gene and not ensembl_id(name):
                symbols.setdefault(gene, str(name))
    series = pd.Series(ids)
    duplicated = (series.duplicated() & (series != "")).to_numpy()
    if duplicated.any():
        LOGGER.info("%d columns repeat an Ensembl id of an earlier column: ignored", int(duplicated.sum()))
        ids = ["" if d else g for g, d in zip(ids, duplicated)]
    if not any(ids):
        raise InputError(f"none of the {len(texts)} genes in {where} has an Ensembl id (e.g. {texts[:3]}; {how})")
    return GeneIds(ids, symbols, how)


# ----------------------------------------------------------------------------------------- cells
@dataclass
class CellMatrix:
    """Raw counts of cells as read by the input layer.

    ``counts`` float32 CSR [n_cells, n_genes] (sorted indices); ``gene_ids`` [n_genes] Ensembl ids ("" =
    ignored); ``cell_ids`` obs names; ``n_counts`` float32 [n_cells] each cell's total counts (see the
    module docstring); ``symbols`` Ensembl id -> symbol where the input names one; ``adata`` the input as
    AnnData (obs annotations, writing an ``.h5ad`` copy); ``notes`` how genes, totals and counts were found.
    """

    counts: sp.csr_matrix
    gene_ids: list[str]
    cell_ids: list[str]
    n_counts: np.ndarray
    adata: ad.AnnData = field(repr=False)
    source: str = ""
    symbols: dict[str, str] = field(default_factory=dict, repr=False)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def obs(self) -> pd.DataFrame:
        return self.adata.obs

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

    def to_anndata(self) -> ad.AnnData:
        """The counts as AnnData: ``X`` counts, ``var["ensembl_id"]``, ``obs["n_counts"]`` (+ the input's obs)."""
        obs = self.adata.obs.copy()
        obs[DEFAULT_N_COUNTS_KEY] = self.n_counts
        var_names = self.adata.raw.var_names if self.notes.get("layer") == "raw" else self.adata.var_names
        var = pd.DataFrame({ENSEMBL_COLUMN: self.gene_ids}, index=pd.Index(var_names.astype(str)))
        return ad.AnnData(X=self.counts.copy(), obs=obs, var=var)


def _read_table(path: Path, max_cells: int | None) -> ad.AnnData:
    sep = "\t" if path.name.lower().endswith(TAB_SUFFIXES) else ","
    frame = pd.read_csv(path, index_col=0, sep=sep, nrows=max_cells)
    if frame.shape[1] == 0:
        raise InputError(f"{path}: no gene columns found (expected cells as rows, genes as columns, sep {sep!r})")
    try:
        values = frame.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: counts must be numbers (cells as rows, genes as columns): {error}") from error
    return ad.AnnData(X=sp.csr_matrix(values), obs=pd.DataFrame(index=frame.index.astype(str)),
                      var=pd.DataFrame(index=frame.columns.astype(str)))


def read_anndata(path: str | Path, max_cells: int | None = None) -> ad.AnnData:
    """An ``.h5ad`` file or a CSV/TSV cell x gene table as AnnData (the first ``max_cells`` cells)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    name = path.name.lower()
    if name.endswith(".h5ad"):
        adata = ad.read_h5ad(path)
        return adata[:max_cells].copy() if max_cells is not None else adata
    if name.endswith(CSV_SUFFIXES):
        return _read_table(path, max_cells)
    raise InputError(f"{path}: unsupported input format; give an .h5ad file or a CSV/TSV cell x gene table")


def _matrix(adata: ad.AnnData, layer: str | None, where: str) -> tuple[Any, pd.DataFrame, str]:
    """(matrix, its var, its name) for ``layer``."""
    if layer in (None, "", "X"):
        return adata.X, adata.var, "X"
    if layer == "raw":
        if adata.raw is None:
            raise InputError(f"{where} has no .raw (--layer raw); layers: {list(adata.layers)}")
        return adata.raw.X, adata.raw.var, ".raw.X"
    if layer not in adata.layers:
        raise InputError(f"{where} has no layer {layer!r} (layers: {list(adata.layers)}; 'X' and 'raw' also work)")
    return adata.layers[layer], adata.var, f"layers[{layer!r}]"


def _rows(counts: sp.csr_matrix, bad: np.ndarray) -> np.ndarray:
    """Rows holding a flagged stored value (``bad`` is a mask over ``counts.data``)."""
    return np.unique(np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))[bad])


def _cells(rows: np.ndarray, cell_ids: Sequence[str]) -> str:
    shown = ", ".join(f"{cell_ids[r]!r} (row {r})" for r in rows[:3])
    return f"{len(rows)} cells, e.g. {shown}"


def _check_finite(counts: sp.csr_matrix, cell_ids: Sequence[str], where: str) -> None:
    data = counts.data
    bad = ~np.isfinite(data) | (data < 0)
    if not bad.any():
        return
    kinds = [k for k, m in (("NaN", np.isnan(data)), ("infinite", np.isinf(data)), ("negative", data < 0)) if m.any()]
    raise InputError(f"{where}: {int(bad.sum())} {'/'.join(kinds)} values in {_cells(_rows(counts, bad), cell_ids)}; "
                     "raw counts must be finite and >= 0 (choose the raw counts with --layer)")


def _totals(adata: ad.AnnData, key: str) -> tuple[np.ndarray | None, str | None]:
    """(totals from obs, column) per the rule of the module docstring; (None, None) without a column."""
    if key != DEFAULT_N_COUNTS_KEY and key not in adata.obs:
        raise InputError(f"obs has no column {key!r} (--n-counts-key); columns: {list(adata.obs.columns)}")
    column = next((c for c in (key, *N_COUNTS_ALIASES) if c in adata.obs), None)
    if column is None:
        return None, None
    totals = pd.to_numeric(adata.obs[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(totals) | (totals < 0)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(f"obs[{column!r}] (total counts) is missing, negative or not a number for "
                         f"{_cells(rows, [str(c) for c in adata.obs_names])}")
    return totals, column


def _recover_log1p(counts: sp.csr_matrix) -> tuple[sp.csr_matrix | None, np.ndarray]:
    """Counts behind ``x = log1p(count * scale_of_the_cell)``: ``expm1(x)`` divided by the cell's smallest
    ``expm1(x)``, times the smallest count k in 1..:data:`MAX_SMALLEST_COUNT` that makes every value of the
    cell an integer. Returns (counts or None, rows with no such k)."""
    values = np.expm1(counts.data.astype(np.float64))
    lengths = np.diff(counts.indptr)
    row_of = np.repeat(np.arange(counts.shape[0]), lengths)
    smallest = np.ones(counts.shape[0])
    smallest[lengths > 0] = np.minimum.reduceat(values, counts.indptr[:-1][lengths > 0])
    ratios = values / smallest[row_of]
    absolute, relative = RECOVERY_TOLERANCE
    recovered = np.full(values.shape, np.nan)
    open_rows = np.ones(counts.shape[0], dtype=bool)
    for k in range(1, MAX_SMALLEST_COUNT + 1):
        scaled = ratios * k
        rounded = np.round(scaled)
        off = np.abs(scaled - rounded) > np.maximum(absolute, relative * rounded)
        fits = open_rows & (np.bincount(row_of, weights=off, minlength=counts.shape[0]) == 0)
        take = fits[row_of]
        recovered[take] = rounded[take]
        open_rows &= ~fits
    if open_rows.any():
        return None, np.flatnonzero(open_rows)
    out = sp.csr_matrix((recovered.astype(np.float32), counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)
    out.eliminate_zeros()
    return out, np.zeros(0, dtype=np.int64)


def _integer_counts(counts: sp.csr_matrix, adata: ad.AnnData, options: InputOptions, where: str,
                    notes: dict[str, Any]) -> sp.csr_matrix:
    non_integer = counts.data != np.round(counts.data)
    if not non_integer.any():
        return counts
    cell_ids = [str(c) for c in adata.obs_names]
    recover = "values without uns['log1p'] are not taken for log1p-normalized counts"
    if "log1p" in adata.uns:
        recovered, off_rows = _recover_log1p(counts)
        if recovered is not None:
            LOGGER.warning("%s is log1p-normalized (uns['log1p']): raw counts recovered as integer multiples of "
                           "each cell's smallest expm1(x)", where)
            notes["counts"] = "recovered from log1p-normalized values"
            return recovered
        recover = (f"uns['log1p'] is set but expm1(x) is not a multiple of one scale per cell in "
                   f"{_cells(off_rows, cell_ids)}, so the counts cannot be recovered")
    detail = (f"{where} holds {int(non_integer.sum())} non-integer values in {_cells(_rows(counts, non_integer), cell_ids)} "
              f"(max {float(counts.data.max()):.4g}): is it normalized?")
    if options.allow_non_integer:
        LOGGER.warning("%s; tokenizing the values as counts (--allow-non-integer)", detail)
        notes["counts"] = "non-integer values used as they are (--allow-non-integer)"
        return counts
    raise InputError(f"{detail} Geneformer needs raw counts: choose them with --layer NAME or --layer raw ({recover}); "
                     "or pass --allow-non-integer to tokenize the values as they are")


def cells_from_anndata(adata: ad.AnnData, options: InputOptions = InputOptions(), symbol_map: SymbolMap | None = None,
                       source: str = "anndata") -> CellMatrix:
    """Raw counts of an AnnData read by the rules of the module docstring (``options.max_cells`` is not
    applied here: slice ``adata`` first). Raises :class:`InputError` saying what is wrong and what to do."""
    matrix, var, where = _matrix(adata, options.layer, source)
    if matrix is None:
        raise InputError(f"{source} has no count matrix ({where} is empty)")
    counts = sp.csr_matrix(matrix, dtype=np.float32)
    counts.sum_duplicates()
    counts.sort_indices()
    if counts.shape[0] == 0:
        raise InputError(f"{source} holds no cells")
    cell_ids = [str(c) for c in adata.obs_names]
    if len(set(cell_ids)) != len(cell_ids):
        raise InputError(f"{source}: obs names (cell ids) are not unique; results are keyed by cell id "
                         "(adata.obs_names_make_unique())")
    _check_finite(counts, cell_ids, f"{source} {where}")

    column = options.gene_column or (ENSEMBL_COLUMN if ENSEMBL_COLUMN in var.columns else None)
    if options.gene_column is not None and options.gene_column not in var.columns:
        raise InputError(f"{source}: var of {where} has no column {options.gene_column!r} (--gene-column); "
                         f"columns: {list(var.columns)[:10]}")
    if column is not None:
        genes = resolve_gene_ids(var[column].tolist(), symbol_map, names=list(var.index), where=f"var[{column!r}]")
    else:
        genes = resolve_gene_ids(list(var.index), symbol_map, where="var names")

    notes: dict[str, Any] = {"layer": options.layer or "X", "genes": genes.how}
    counts = _integer_counts(counts, adata, options, f"{source} {where}", notes)
    totals, totals_column = _totals(adata, options.n_counts_key)
    if totals is None:
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        notes["n_counts"] = f"sum of each cell's counts in {where} (no obs {options.n_counts_key!r})"
    else:
        notes["n_counts"] = f"obs[{totals_column!r}]"
    known = sum(g != "" for g in genes.ids)
    LOGGER.info("%s: %d cells x %d genes from %s, %d with an Ensembl id (%s); n_counts from %s", source,
                counts.shape[0], counts.shape[1], where, known, genes.how, notes["n_counts"])
    return CellMatrix(counts=counts, gene_ids=genes.ids, cell_ids=cell_ids, n_counts=totals.astype(np.float32),
                      adata=adata, source=source, symbols=genes.symbols, notes=notes)


def read_cells(path: str | Path, options: InputOptions = InputOptions(), symbol_map: SymbolMap | None = None) -> CellMatrix:
    """Raw counts of the cells of an ``.h5ad`` or CSV/TSV file (rules: module docstring)."""
    path = Path(path)
    if options.layer not in (None, "", "X") and not path.name.lower().endswith(".h5ad"):
        raise InputError("--layer applies to .h5ad input only")
    return cells_from_anndata(read_anndata(path, options.max_cells), options, symbol_map, str(path))


__all__ = [
    "InputError", "InputOptions", "SymbolMap", "find_symbol_map", "add_input_arguments", "ensembl_id", "GeneIds",
    "resolve_gene_ids", "CellMatrix", "read_anndata", "cells_from_anndata", "read_cells",
]
