"""Rank-value encoding of raw counts, identical to helical 3.1.4's ``TranscriptomeTokenizer``.

For each cell: counts of vocabulary genes are scaled by 10,000 / the cell's total counts
(``n_counts``) and by 1 / the gene's non-zero median; non-zero genes are ordered by that value,
highest first (ties in ``numpy.argsort`` order of the negated values in input gene order, as helical
does); the sequence is truncated to the model input size (V2: ``<cls>`` + first ``input_size - 2``
genes + ``<eos>``).

Arithmetic follows helical exactly (its scipy sparse division is a multiplication by reciprocals):
counts * (1 / n_counts) * 10,000 in the promoted dtype of counts and n_counts (float32 for float32
data), then * (1 / median) in float64. The order of near-tied genes depends on it.

Gene identifiers are Ensembl ids, collapsed through the mapping dictionary when one is given; ids that
collapse onto the same vocabulary gene within a cell have their counts summed (Geneformer's semantics).
Known divergence: helical 3.1.4 applies the mapping only when it finds ids to collapse, and then drops
the summed genes (their ``ensembl_id`` becomes NaN after its concat); we always map and keep the sums.
With the real V1/V2 dictionaries on the celltypist sample both give identical tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.core.dictionaries import SPECIAL_TOKENS, GeneVocabulary

LOGGER = logging.getLogger(__name__)

TARGET_SUM = 10_000
UNKNOWN = -1


class TokenizationError(ValueError):
    """Input counts or gene identifiers cannot be tokenized; the message says which and where."""


def check_counts(values: np.ndarray, where: str) -> None:
    """Raise ``TokenizationError`` if ``values`` holds NaN, infinite or negative counts."""
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        kinds = [k for k, m in (("NaN", np.isnan(values)), ("infinite", np.isinf(values)), ("negative", values < 0)) if m.any()]
        raise TokenizationError(f"{where}: {int(bad.sum())} {'/'.join(kinds)} count values; raw counts must be finite and >= 0")


@dataclass
class RankValueTokenizer:
    """Tokenizer for one vocabulary and model input size (2,048 for V1, 4,096 with special tokens)."""

    vocabulary: GeneVocabulary
    model_input_size: int
    special_tokens: bool
    _lookup: pd.Series = field(init=False, repr=False)
    _mapping: Optional[pd.Series] = field(init=False, repr=False)  # the mapping dictionary, built once (not per call)
    _reciprocal_medians: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.special_tokens and not self.vocabulary.has_special_tokens:
            raise TokenizationError("special_tokens=True needs <cls> and <eos> in the token dictionary (V2 dictionaries)")
        genes = {g: t for g, t in self.vocabulary.token_ids.items() if g not in SPECIAL_TOKENS}
        self._lookup = pd.Series(genes, dtype=np.int64)
        mapping = self.vocabulary.gene_mapping
        self._mapping = None if mapping is None else pd.Series(mapping, dtype=object)
        reciprocal = np.zeros(max(self.vocabulary.token_ids.values()) + 1, dtype=np.float64)
        tokens = np.fromiter(genes.values(), dtype=np.int64, count=len(genes))
        medians = np.array([self.vocabulary.gene_medians[g] for g in genes], dtype=np.float64)
        reciprocal[tokens] = np.true_divide(1.0, medians)
        self._reciprocal_medians = reciprocal

    @property
    def max_genes(self) -> int:
        return self.model_input_size - 2 if self.special_tokens else self.model_input_size

    def gene_tokens(self, gene_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Token id of each gene id (``UNKNOWN`` = -1 for ids outside the vocabulary or ""), int64.

        Ids go through the mapping dictionary (upper-cased) when one is loaded; ids it does not know
        are looked up as they are, as helical does.
        """
        ids = pd.Series(np.asarray(gene_ids, dtype=object)).astype(str)
        if self._mapping is not None:
            mapped = ids.str.upper().map(self._mapping)
            ids = mapped.where(mapped.notna(), ids)
        return ids.map(self._lookup).fillna(UNKNOWN).to_numpy(dtype=np.int64)

    def rank_cell(self, tokens: np.ndarray, counts: np.ndarray, n_counts: np.ndarray, where: str) -> np.ndarray:
        """Rank one cell's genes. ``tokens`` int64 and ``counts`` [G] in input order (UNKNOWN ignored),
        ``n_counts`` a 1-element array of the cell's total counts. Returns int64 token ids."""
        keep = (tokens != UNKNOWN) & (counts != 0)
        tokens, counts = tokens[keep], counts[keep]
        if len(tokens) == 0:
            raise TokenizationError(f"{where} expresses no gene of the model's vocabulary")
        unique, first, inverse = np.unique(tokens, return_index=True, return_inverse=True)
        if len(unique) < len(tokens):  # ids collapsing onto one gene: sum, keep first-appearance order
            summed = np.zeros(len(unique), dtype=counts.dtype)
            np.add.at(summed, inverse, counts)
            order = np.argsort(first, kind="stable")
            tokens, counts = unique[order], summed[order]
        normalized = counts * np.true_divide(1.0, n_counts) * TARGET_SUM * self._reciprocal_medians[tokens]
        ranked = tokens[np.argsort(-normalized)][: self.max_genes]
        if self.special_tokens:
            ranked = np.concatenate(([self.vocabulary.cls_id], ranked, [self.vocabulary.eos_id]))
        return ranked.astype(np.int64)

    def _totals(self, totals: np.ndarray, names: Sequence[str]) -> np.ndarray:
        bad = np.flatnonzero(~(totals > 0))
        if len(bad):
            raise TokenizationError(f"{names[bad[0]]} has total counts {totals[bad[0]]!r}; it must be > 0 (empty cell?)")
        return totals

    def tokenize_matrix(
        self,
        counts: sp.spmatrix | np.ndarray,
        gene_ids: Sequence[str],
        n_counts: np.ndarray | None = None,
        cell_names: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Tokenize raw counts [n_cells, n_genes] whose columns are ``gene_ids`` (an AnnData's var).

        ``n_counts`` [n_cells] defaults to row sums over all genes (helical's default when ``obs`` has
        no ``n_counts``). Raises ``TokenizationError`` naming the cell for bad counts, an empty cell, or
        a cell without vocabulary genes, and when no gene id at all is in the vocabulary.
        """
        matrix = sp.csr_matrix(counts)
        if matrix.shape[1] != len(gene_ids):
            raise TokenizationError(f"counts have {matrix.shape[1]} genes but {len(gene_ids)} gene ids were given")
        names = [f"cell {n!r}" for n in cell_names] if cell_names is not None else [f"cell {i}" for i in range(matrix.shape[0])]
        check_counts(matrix.data, "counts")
        tokens = self.gene_tokens(gene_ids)
        if not (tokens != UNKNOWN).any():
            raise TokenizationError(
                f"none of the {len(gene_ids)} gene ids is in the model's vocabulary ({len(self.vocabulary)} tokens); "
                "Geneformer expects human Ensembl gene ids (map symbols first)"
            )
        totals = np.asarray(matrix.sum(axis=1)).ravel() if n_counts is None else np.asarray(n_counts).ravel()
        if totals.shape[0] != matrix.shape[0]:
            raise TokenizationError(f"n_counts has {totals.shape[0]} values for {matrix.shape[0]} cells")
        totals = self._totals(totals, names)
        matrix.sort_indices()
        cells = []
        for row in range(matrix.shape[0]):
            start, stop = matrix.indptr[row], matrix.indptr[row + 1]
            columns = matrix.indices[start:stop]
            cells.append(self.rank_cell(tokens[columns], matrix.data[start:stop], totals[row : row + 1], names[row]))
        return cells

    def tokenize_gene_lists(
        self,
        gene_ids: np.ndarray,
        counts: np.ndarray,
        n_counts: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Tokenize cells given as rows of gene ids [B, G] (str/bytes, "" = padding) and counts [B, G].

        This is the wire format of the Triton tokenizer: each row lists one cell's genes (e.g. its
        non-zero genes in the dataset's gene order). ``n_counts`` [B] defaults to row sums.
        """
        gene_ids = np.asarray(gene_ids, dtype=object)
        counts = np.asarray(counts)
        if gene_ids.ndim != 2 or gene_ids.shape != counts.shape:
            raise TokenizationError(
                f"gene_ids {list(gene_ids.shape)} and counts {list(counts.shape)} must have the same [cells, genes] shape"
            )
        flat = gene_ids.ravel()
        if flat.size and isinstance(flat[0], bytes):
            flat = np.array([g.decode("utf-8", "replace") for g in flat], dtype=object)
        tokens = self.gene_tokens(flat).reshape(gene_ids.shape)
        names = [f"cell {i}" for i in range(counts.shape[0])]
        for row in range(counts.shape[0]):
            check_counts(counts[row], names[row])
        totals = counts.sum(axis=1) if n_counts is None else np.asarray(n_counts).reshape(-1)
        if totals.shape[0] != counts.shape[0]:
            raise TokenizationError(f"n_counts has {totals.shape[0]} values for {counts.shape[0]} cells")
        totals = self._totals(totals, names)
        cells = []
        for row in range(counts.shape[0]):
            if not (tokens[row] != UNKNOWN).any():
                examples = [str(g) for g in flat.reshape(gene_ids.shape)[row] if g][:3]
                raise TokenizationError(f"{names[row]}: none of its gene ids is in the vocabulary (e.g. {examples})")
            cells.append(self.rank_cell(tokens[row], counts[row], totals[row : row + 1], names[row]))
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
