"""Rank-value encoding of raw counts, identical to helical 3.1.4's ``TranscriptomeTokenizer``.

For each cell: counts of vocabulary genes are divided by the cell's total counts (``n_counts``),
multiplied by 10,000 and divided by the gene's non-zero median; non-zero genes are ordered by that
value, highest first (ties ordered by ``numpy.argsort`` of the negated values in column order, as
helical does); the sequence is truncated to the model input size (V2: ``<cls>`` + first
``input_size - 2`` genes + ``<eos>``).

Gene identifiers are Ensembl ids, collapsed through the mapping dictionary when one is given: ids
that collapse onto the same vocabulary gene have their counts summed (Geneformer's semantics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.dictionaries import GeneVocabulary

LOGGER = logging.getLogger(__name__)

TARGET_SUM = 10_000


class TokenizationError(ValueError):
    """Input counts or gene identifiers cannot be tokenized; the message says which and where."""


@dataclass(frozen=True)
class GeneColumns:
    """Vocabulary genes of an input gene panel.

    ``aggregation`` is a sparse [n_input_genes, n_kept] 0/1 matrix summing input columns that collapse
    onto the same vocabulary gene; ``tokens`` [n_kept] int64 and ``medians`` [n_kept] float64 describe
    the kept genes in order of first appearance; ``n_unknown`` counts input ids outside the vocabulary.
    """

    aggregation: sp.csr_matrix
    tokens: np.ndarray
    medians: np.ndarray
    n_unknown: int
    identity: bool


def resolve_gene_columns(gene_ids: Sequence[str], vocabulary: GeneVocabulary) -> GeneColumns:
    """Match input gene ids (Ensembl ids, "" = none) to vocabulary genes, collapsing duplicates."""
    ids = pd.Index([str(g) for g in gene_ids])
    if vocabulary.gene_mapping is not None:
        collapsed = pd.Series(ids.str.upper()).map(vocabulary.gene_mapping)
        # ids outside the mapping keep their own name (helical looks them up unmapped)
        collapsed = collapsed.where(collapsed.notna(), pd.Series(ids)).to_numpy(dtype=object)
    else:
        collapsed = ids.to_numpy(dtype=object)
    token_lookup = pd.Series(vocabulary.token_ids)
    tokens = pd.Series(collapsed).map(token_lookup)
    special = pd.Series(collapsed).isin(["<pad>", "<mask>", "<cls>", "<eos>"])
    known = tokens.notna().to_numpy() & ~special.to_numpy()
    input_columns = np.flatnonzero(known)
    known_tokens = tokens.to_numpy()[known].astype(np.int64)
    unique_tokens, first_index, inverse = np.unique(known_tokens, return_index=True, return_inverse=True)
    # order kept genes by first appearance in the input (column order, as helical iterates var)
    order = np.argsort(first_index, kind="stable")
    rank_of_unique = np.empty_like(order)
    rank_of_unique[order] = np.arange(len(order))
    kept_tokens = unique_tokens[order]
    aggregation = sp.csr_matrix(
        (np.ones(len(input_columns), dtype=np.float32), (input_columns, rank_of_unique[inverse])),
        shape=(len(ids), len(kept_tokens)),
    )
    medians = pd.Series(collapsed[input_columns[first_index[order]]]).map(vocabulary.gene_medians)
    n_unknown = int(np.sum([bool(g) for g in np.asarray(ids)[~known]]))
    return GeneColumns(
        aggregation=aggregation,
        tokens=kept_tokens,
        medians=medians.to_numpy(dtype=np.float64),
        n_unknown=n_unknown,
        identity=len(kept_tokens) == len(input_columns),
    )


def check_counts(counts: sp.spmatrix | np.ndarray, where: str = "counts") -> None:
    """Raise ``TokenizationError`` on NaN, infinite or negative counts, naming the first bad cell."""
    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    bad = ~np.isfinite(values) | (values < 0)
    if not bad.any():
        return
    if sp.issparse(counts):
        coo = sp.coo_matrix(counts)
        cell = int(coo.row[np.flatnonzero(bad)[0]])
    else:
        cell = int(np.argwhere(bad)[0][0]) if np.ndim(values) > 1 else 0
    kinds = []
    if np.isnan(values).any():
        kinds.append("NaN")
    if np.isinf(values).any():
        kinds.append("infinite")
    if (values < 0).any():
        kinds.append("negative")
    raise TokenizationError(
        f"{where}: {int(bad.sum())} {'/'.join(kinds)} values (first in cell {cell}); raw counts must be finite and >= 0"
    )


def rank_value_tokenize(
    counts: sp.spmatrix | np.ndarray,
    gene_ids: Sequence[str],
    vocabulary: GeneVocabulary,
    model_input_size: int,
    special_tokens: bool,
    n_counts: np.ndarray | None = None,
    cell_names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Tokenize raw counts [n_cells, n_genes] into one int64 token-id array per cell.

    ``n_counts`` [n_cells] is each cell's total counts (default: row sums over all input genes, as
    helical computes them). Raises ``TokenizationError`` for bad counts, for a cell whose total is not
    positive, and for a cell with no expressed vocabulary gene (named by ``cell_names`` or index).
    """
    if special_tokens and not vocabulary.has_special_tokens:
        raise TokenizationError("special_tokens=True needs <cls> and <eos> in the token dictionary (V2 dictionaries)")
    matrix = sp.csr_matrix(counts)
    if matrix.shape[1] != len(gene_ids):
        raise TokenizationError(f"counts have {matrix.shape[1]} genes but {len(gene_ids)} gene ids were given")
    check_counts(matrix)
    columns = resolve_gene_columns(gene_ids, vocabulary)
    if len(columns.tokens) == 0:
        raise TokenizationError(
            f"none of the {len(gene_ids)} gene ids is in the model's vocabulary ({len(vocabulary)} tokens); "
            "Geneformer expects human Ensembl gene ids (map symbols first)"
        )
    # Arithmetic follows helical (scipy 1.13 sparse division = multiplication by reciprocals) exactly:
    # counts * (1 / n_counts) * 10,000 in the promoted dtype of the two arrays (float32 for float32
    # data), then * (1 / median) in float64. The order of near-tied genes depends on it.
    totals = np.asarray(matrix.sum(axis=1)).ravel() if n_counts is None else np.asarray(n_counts).ravel()
    if totals.shape[0] != matrix.shape[0]:
        raise TokenizationError(f"n_counts has {totals.shape[0]} values for {matrix.shape[0]} cells")
    names = list(cell_names) if cell_names is not None else [str(i) for i in range(matrix.shape[0])]
    bad_totals = np.flatnonzero(~(totals > 0))
    if len(bad_totals):
        raise TokenizationError(f"cell {names[bad_totals[0]]!r} has total counts {totals[bad_totals[0]]!r}; it must be > 0 (empty cell?)")
    vocab_counts = matrix if columns.identity and columns.aggregation.shape[0] == len(columns.tokens) else None
    if vocab_counts is None:
        vocab_counts = sp.csr_matrix(matrix @ columns.aggregation.astype(matrix.dtype))
    vocab_counts.sort_indices()
    reciprocal_totals = np.true_divide(1.0, totals)
    reciprocal_medians = np.true_divide(1.0, columns.medians)
    cells = []
    max_genes = model_input_size - 2 if special_tokens else model_input_size
    for row in range(vocab_counts.shape[0]):
        start, stop = vocab_counts.indptr[row], vocab_counts.indptr[row + 1]
        raw = vocab_counts.data[start:stop]
        genes = vocab_counts.indices[start:stop]
        nonzero = raw != 0
        raw, genes = raw[nonzero], genes[nonzero]
        if len(raw) == 0:
            raise TokenizationError(f"cell {names[row]!r} expresses no gene of the model's vocabulary")
        normalized = raw * reciprocal_totals[row : row + 1] * TARGET_SUM * reciprocal_medians[genes]
        ranked = columns.tokens[genes[np.argsort(-normalized)]][:max_genes]
        if special_tokens:
            ranked = np.concatenate(([vocabulary.cls_id], ranked, [vocabulary.eos_id]))
        cells.append(ranked.astype(np.int64))
    return cells


def pad_token_batch(cells: Sequence[np.ndarray], pad_id: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token arrays to ``length`` (default: longest) -> (input_ids, attention_mask), [B, L] int64."""
    longest = max(len(c) for c in cells)
    length = longest if length is None else length
    if longest > length:
        raise TokenizationError(f"a cell has {longest} tokens, more than the padded length {length}")
    input_ids = np.full((len(cells), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(cells), length), dtype=np.int64)
    for row, cell in enumerate(cells):
        input_ids[row, : len(cell)] = cell
        attention_mask[row, : len(cell)] = 1
    return input_ids, attention_mask
