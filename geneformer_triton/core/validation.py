"""Input validation shared by every served model (numpy cores; the Triton ``model.py`` files are thin
adapters that turn :class:`InputValidationError` into ``INVALID_ARGUMENT`` / HTTP 400).

Every message names the tensor, the row (batch row = cell) and what is allowed, so a client can fix
its request without reading server logs. Limits:

* counts: finite, ``>= 0`` and ``<= MAX_COUNT`` (1e9 per gene and cell: far above any sequencing depth,
  low enough that float32 sums and the rank-value normalization stay exact enough);
* ``n_counts``: finite, ``> 0`` and ``<= MAX_TOTAL_COUNTS`` (1e12);
* gene ids: UTF-8 (undecodable bytes are refused, not replaced);
* token ids: integers in ``[0, vocab_size)``; attention mask: only 0 and 1, at least one 1 per row;
  at most ``max_length`` tokens;
* ISP ``rank_shift``: finite and either a fraction in ``(0, 1)`` or a whole number of positions in
  ``[1, max_positions]``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

__all__ = [
    "InputValidationError",
    "MAX_COUNT",
    "MAX_TOTAL_COUNTS",
    "check_counts",
    "check_n_counts",
    "decode_gene_ids",
    "check_token_batch",
    "check_rank_shift",
    "validate_cell_inputs",
]

#: Largest raw count accepted for one gene of one cell.
MAX_COUNT = 1e9
#: Largest total count (``n_counts``) accepted for one cell.
MAX_TOTAL_COUNTS = 1e12


class InputValidationError(ValueError):
    """A request's input is outside what the model accepts; the message says what, where and what is allowed."""


def _rows(array: np.ndarray) -> np.ndarray:
    """``array`` as [rows, columns] (a 1-D array is one row)."""
    return array.reshape(1, -1) if array.ndim <= 1 else array.reshape(array.shape[0], -1)


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    row, column = np.argwhere(mask)[0]
    return int(row), int(column)


def check_counts(counts: np.ndarray, name: str = "counts") -> None:
    """Raw counts [B, G] (or [G]): finite, >= 0, <= :data:`MAX_COUNT`. Names the first bad row and column."""
    values = _rows(np.asarray(counts))
    if values.dtype.kind not in "fiu":
        raise InputValidationError(f"{name} must be numeric (FP32), got {values.dtype}")
    values = values.astype(np.float64, copy=False)
    for label, bad in (("NaN", np.isnan(values)), ("infinite", np.isinf(values)), ("negative", values < 0),
                       (f"above {MAX_COUNT:g}", np.isfinite(values) & (values > MAX_COUNT))):
        if bad.any():
            row, column = _first_bad(bad)
            per_row = int(bad[row].sum())
            raise InputValidationError(
                f"{name}, cell {row}: {per_row} {label} count value(s) (first at gene column {column}: "
                f"{values[row, column]!r}); raw counts must be finite, >= 0 and <= {MAX_COUNT:g}"
            )


def check_n_counts(n_counts: Optional[np.ndarray], rows: int, name: str = "n_counts") -> None:
    """Total counts, one per cell: finite, > 0, <= :data:`MAX_TOTAL_COUNTS`; ``None`` (omitted) passes."""
    if n_counts is None:
        return
    values = np.asarray(n_counts).reshape(-1)
    if values.dtype.kind not in "fiu":
        raise InputValidationError(f"{name} must be numeric (FP32), got {values.dtype}")
    if values.size != rows:
        raise InputValidationError(f"{name} has {values.size} values for {rows} cells; send one total per cell")
    values = values.astype(np.float64, copy=False)
    bad = ~np.isfinite(values) | (values <= 0) | (values > MAX_TOTAL_COUNTS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputValidationError(
            f"{name}, cell {row}: {values[row]!r}; a cell's total counts must be finite, > 0 and "
            f"<= {MAX_TOTAL_COUNTS:g} (omit n_counts to use the sum of the cell's counts)"
        )


def decode_gene_ids(gene_ids: np.ndarray, name: str = "gene_ids") -> np.ndarray:
    """Gene ids [B, G] (or [G]) as str, same shape; bytes must be UTF-8. ``""`` stays a padding entry."""
    array = np.asarray(gene_ids, dtype=object)
    flat = array.reshape(-1)
    width = _rows(array).shape[1] if array.size else 1
    decoded = np.empty(flat.shape, dtype=object)
    for index, value in enumerate(flat):
        if isinstance(value, (bytes, np.bytes_)):
            try:
                decoded[index] = bytes(value).decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputValidationError(
                    f"{name}, cell {index // width}, gene column {index % width}: {bytes(value)[:40]!r} is not "
                    f"UTF-8 ({error.reason}); send Ensembl gene ids as UTF-8 strings"
                ) from None
        else:
            decoded[index] = str(value)
    return decoded.reshape(array.shape)


def check_token_batch(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    vocab_size: Optional[int] = None,
    max_length: Optional[int] = None,
    names: tuple[str, str] = ("input_ids", "attention_mask"),
) -> None:
    """Encoder inputs, int [B, L] each: ids in ``[0, vocab_size)``, mask 0/1 with >= 1 one per row,
    ``L <= max_length``. ``None`` limits are not checked."""
    ids_name, mask_name = names
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    for name, array in ((ids_name, ids), (mask_name, mask)):
        if array.dtype.kind not in "iu":
            raise InputValidationError(f"{name} must be integers (INT64), got {array.dtype}")
        if array.ndim != 2:
            raise InputValidationError(f"{name} must be [batch, tokens], got shape {list(array.shape)}")
    if ids.shape != mask.shape:
        raise InputValidationError(
            f"{ids_name} {list(ids.shape)} and {mask_name} {list(mask.shape)} must have the same [batch, tokens] shape"
        )
    if ids.shape[1] == 0:
        raise InputValidationError(f"{ids_name} has zero tokens per row; every cell needs at least one token")
    if max_length is not None and ids.shape[1] > max_length:
        raise InputValidationError(
            f"{ids_name} has {ids.shape[1]} tokens per row, more than the model's input size {max_length}; "
            "send at most that many (the tokenizer keeps a cell's top-ranked genes)"
        )
    low = ids < 0
    high = ids >= vocab_size if vocab_size is not None else np.zeros_like(low)
    if low.any() or high.any():
        row, column = _first_bad(low | high)
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise InputValidationError(
            f"{ids_name}, row {row}, token {column}: id {int(ids[row, column])} is outside the vocabulary; "
            f"token ids must be in {allowed}"
        )
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        row, column = _first_bad(bad)
        raise InputValidationError(
            f"{mask_name}, row {row}, token {column}: value {int(mask[row, column])}; only 0 (padding) and 1 (token) are allowed"
        )
    empty = ~mask.any(axis=1)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise InputValidationError(f"{mask_name}, row {row}: all zeros; every cell needs at least one token with mask 1")


def check_rank_shift(value: Optional[float], max_positions: int, name: str = "rank_shift") -> None:
    """ISP ``rank_shift``: a fraction in (0, 1) or whole positions in [1, ``max_positions``]; ``None`` passes."""
    if value is None:
        return
    allowed = f"a fraction of the cell's genes in (0, 1) or a whole number of positions in [1, {max_positions}]"
    if not math.isfinite(value) or value <= 0 or value > max_positions or (value >= 1 and value != int(value)):
        raise InputValidationError(f"{name}: {value!r} is out of range; allowed: {allowed}")


def validate_cell_inputs(get: Callable[[str], Optional[np.ndarray]]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Check a cell request's ``gene_ids``, ``counts`` and optional ``n_counts`` (``get(name)`` returns an
    input as numpy or ``None``). Returns (decoded gene ids, counts, n_counts) with the wire shapes."""
    gene_ids, counts, n_counts = get("gene_ids"), get("counts"), get("n_counts")
    if gene_ids is None or counts is None:
        raise InputValidationError("gene_ids and counts are required (each cell's Ensembl gene ids and raw counts)")
    if np.asarray(gene_ids).size == 0:
        raise InputValidationError("gene_ids is empty: send each cell's expressed genes with their counts")
    decoded = decode_gene_ids(gene_ids)
    check_counts(counts)
    rows = _rows(np.asarray(counts)).shape[0] if np.asarray(counts).ndim > 1 else 1
    check_n_counts(n_counts, rows)
    return decoded, np.asarray(counts), n_counts
