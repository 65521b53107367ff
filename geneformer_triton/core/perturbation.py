"""In-silico perturbation (ISP) of tokenized cells: perturbed sequences, scores, reference runner.

The semantics follow Geneformer's ``InSilicoPerturber`` (delete / overexpress, cell- and gene-embedding
shifts, goal-state shift); ``inhibit`` / ``activate``, which Geneformer lists but has not implemented,
get the definition below. This module is split so that a Triton python (BLS) model can reuse it:

* pure numpy: :func:`plan_perturbations` / :class:`PerturbationPlan` (perturbed token sequences and the
  gene alignment), :func:`perturb_sequence`, :func:`chunk_by_token_budget`, :func:`geneformer_triton.core.tokenizer.pad_token_batch`,
  :func:`reduce_scores`; importing the module does not import torch;
* packed, reduced batches (upstream semantics, ``isp_upstream_service.UpstreamJob``): :class:`EncoderRow`,
  :func:`pack_rows` (rows of several cells share batches under a token budget, each batch carrying the
  originals its rows are compared with), :func:`reduce_token_rows` (the reduction of
  ``export/isp_reduction_export.py``'s graph, on the host), :class:`PackedRun` / :func:`run_packed` (the
  driver; a bad cell fails alone);
* :func:`run_plan` / :func:`run_perturbation`: drive any ``encode(input_ids, attention_mask) ->
  (cell_embedding [B,H], token_embeddings [B,L,H])`` callable (numpy int64 in, numpy or torch out),
  e.g. :func:`geneformer_triton.model.runtimes.torch_encode_fn` around :class:`geneformer_triton.model.encoder.GeneformerEncoder`, or a
  function that calls the served encoder.

Cell layout
    A cell is a 1-D array of token ids in rank-value order, unpadded. With ``cls_token_id`` /
    ``eos_token_id`` given (V2 models), a leading ``<cls>`` and a trailing ``<eos>`` stay in place;
    special tokens anywhere else, the pad id, negative ids and repeated genes are errors. The
    "genes" of a cell are its tokens without the special ones; ``n`` is their number (n >= 2).

Perturbation types (``genes`` = the set perturbed at once, ``p`` = a gene's 0-based rank among genes)
    * ``delete``: the genes are removed (length - len(genes)).
    * ``overexpress``: the genes are moved to the front (right after ``<cls>``), in set order
      (anchor genes first, then the targets as given); other genes keep their order. Length unchanged.
    * ``inhibit`` / ``activate`` with ``rank_shift`` (required, > 0): ``k`` positions where
      ``rank_shift >= 1`` (must be an integer) or ``k = max(1, floor(rank_shift * n + 0.5))`` where
      ``0 < rank_shift < 1`` (a fraction of the cell's gene count, 0.25 ~ one quartile).
      Each gene is given the sort key ``p + k + 0.5`` (inhibit) or ``p - k - 0.5`` (activate), other
      genes keep key ``p``, and genes are stably re-sorted by key. For one gene this moves it to rank
      ``min(p + k, n - 1)`` (inhibit) or ``max(p - k, 0)`` (activate), shifting the genes in between
      by one; moves are clipped to the gene block (never past ``<cls>`` / ``<eos>``). Length unchanged.

Targets
    * ``"all"``: one perturbation per gene of the cell, in rank order (anchor genes skipped). No-op
      perturbations (overexpressing / activating the first gene, inhibiting the last) are kept, so
      results line up with the cell's genes (their scores are ~1 / ~0).
    * a list of gene token ids, ``group=False``: one perturbation per entry, in list order.
    * a list with ``group=True``: one perturbation of the whole set at once.
    * ``anchor`` (token id or list): perturbed together with every perturbation above (Geneformer's
      ``combos=1`` + ``anchor_gene``, generalised to any type and mode). Set order: anchors, then
      target(s). A target equal to an anchor is an error (``"all"`` skips anchors instead).
    Each perturbation set must leave at least one unperturbed gene (len(set) < n).

Scores (per perturbation, float32, in target order; cosine similarities, 1 = unchanged)
    * ``cell_shift``: cos(original cell embedding, perturbed cell embedding); cell embeddings are the
      encoder's ``cell_embedding`` output (mean over non-pad, non-special tokens for
      ``GeneformerEncoder(pooling="mean", excluded_token_ids=(cls, eos))``).
    * ``goal_shift`` = cos(perturbed, goal) - cos(original, goal) when ``goal_state`` is given,
      ``start_shift`` likewise for ``start_state`` (positive = towards that state).
    * ``gene_shift``: mean over the genes NOT in the perturbation set of cos(token embedding in the
      original cell, token embedding in the perturbed cell), genes matched by token id (for delete the
      deleted positions are dropped from the original; for overexpress/inhibit/activate the moved
      genes are excluded and the others compared wherever they now sit). Special tokens excluded.
    * optional ``gene_cos`` [P, n]: those per-gene cosines in the original gene order, NaN for the
      perturbed genes (Geneformer's gene-embedding shifts, reduced to one value per gene).
    Token embeddings of a chunk are reduced right after its forward pass; nothing of size
    [perturbations x length x hidden] is kept.

Batching
    The original cell and then every perturbed sequence (target order) are cut, in that order, into
    consecutive chunks with ``batch * padded_length <= max_tokens`` (and ``batch <= max_batch``; a
    single sequence longer than the budget gets a chunk of its own), right-padded with ``pad_token_id``
    and an ``attention_mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from geneformer_triton.core.encode_fn import EncodeFn, to_numpy
from geneformer_triton.core.tokenizer import pad_token_batch

PERTURB_TYPES = ("delete", "overexpress", "inhibit", "activate")


DEFAULT_MAX_TOKENS = 16384


class PerturbationError(ValueError):
    """Invalid perturbation request (bad cell, target, anchor, type or option)."""


# ----------------------------------------------------------------------------- cell layout


@dataclass(frozen=True)
class _Layout:
    ids: np.ndarray  # full cell, int64
    prefix: int  # 1 when a leading <cls> is kept in place
    suffix: int  # 1 when a trailing <eos> is kept in place

    @property
    def genes(self) -> np.ndarray:
        return self.ids[self.prefix : len(self.ids) - self.suffix]


def _as_int_array(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == bool or (arr.size > 0 and arr.dtype.kind not in "iu"):
        raise PerturbationError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _layout(
    input_ids: Any, cls_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None
) -> _Layout:
    ids = _as_int_array(input_ids, "input_ids")
    if ids.ndim != 1:
        raise PerturbationError(f"input_ids must be a 1-D array of one cell's token ids, got shape {ids.shape}")
    prefix = int(cls_token_id is not None and ids.size > 0 and ids[0] == cls_token_id)
    suffix = int(eos_token_id is not None and ids.size > prefix and ids[-1] == eos_token_id)
    specials = {t: name for t, name in ((cls_token_id, "<cls>"), (eos_token_id, "<eos>")) if t is not None}
    seen: dict[int, int] = {}
    for i in range(prefix, ids.size - suffix):
        tok = int(ids[i])
        if tok < 0:
            raise PerturbationError(f"input_ids[{i}]={tok} is negative")
        if pad_token_id is not None and tok == pad_token_id:
            raise PerturbationError(
                f"input_ids[{i}]={tok} is the pad id; pass the unpadded cell (input_ids[:length])"
            )
        if tok in specials:
            raise PerturbationError(
                f"input_ids[{i}]={tok} is the {specials[tok]} token; special tokens may only be "
                "first (<cls>) or last (<eos>)"
            )
        if tok in seen:
            raise PerturbationError(
                f"gene token {tok} occurs twice in the cell (input_ids[{seen[tok]}] and input_ids[{i}])"
            )
        seen[tok] = i
    n = ids.size - prefix - suffix
    if n < 2:
        raise PerturbationError(f"cell has {n} gene token(s); perturbation needs at least 2")
    return _Layout(ids, prefix, suffix)


def _check_type(perturb_type: Any) -> str:
    if isinstance(perturb_type, (bytes, np.bytes_)):
        perturb_type = perturb_type.decode()
    if perturb_type not in PERTURB_TYPES:
        raise PerturbationError(f"unknown perturb_type {perturb_type!r}; expected one of {', '.join(PERTURB_TYPES)}")
    return str(perturb_type)


def resolve_rank_shift(perturb_type: str, rank_shift: float | None, n_genes: int) -> int | None:
    """Positions ``k`` an inhibit/activate moves a gene for a cell of ``n_genes`` genes (None otherwise).

    ``rank_shift >= 1`` is a whole number of positions; ``0 < rank_shift < 1`` a fraction of ``n_genes``
    (``k = max(1, floor(rank_shift * n_genes + 0.5))``).
    """
    perturb_type = _check_type(perturb_type)
    if perturb_type in ("delete", "overexpress"):
        if rank_shift is not None:
            raise PerturbationError(f"rank_shift applies to inhibit/activate only, not to {perturb_type!r}")
        return None
    if rank_shift is None:
        raise PerturbationError(f"perturb_type {perturb_type!r} needs rank_shift (positions >= 1, or a fraction in (0, 1))")
    shift = float(rank_shift)
    if not math.isfinite(shift) or shift <= 0:
        raise PerturbationError(f"rank_shift must be > 0, got {rank_shift!r}")
    if shift >= 1:
        if shift != int(shift):
            raise PerturbationError(f"rank_shift >= 1 counts positions and must be a whole number, got {rank_shift!r}")
        return int(shift)
    return max(1, int(math.floor(shift * n_genes + 0.5)))


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PerturbationPlan:
    """All perturbations of one cell; sequences and alignments are built on demand (numpy only).

    ``perturbed_genes`` [P, m]: token ids perturbed together in each perturbation (anchors first).
    """

    original_ids: np.ndarray
    perturb_type: str
    perturbed_genes: np.ndarray
    shift: int | None
    prefix: int
    suffix: int
    _gene_index: dict[int, int] = field(repr=False, compare=False)

    @property
    def num_perturbations(self) -> int:
        return int(self.perturbed_genes.shape[0])

    @property
    def set_size(self) -> int:
        return int(self.perturbed_genes.shape[1])

    @property
    def genes(self) -> np.ndarray:
        """The cell's gene tokens (no special tokens), rank order."""
        return self.original_ids[self.prefix : len(self.original_ids) - self.suffix]

    @property
    def n_genes(self) -> int:
        return len(self.original_ids) - self.prefix - self.suffix

    def lengths(self) -> np.ndarray:
        """Length of every perturbed sequence [P]."""
        length = len(self.original_ids) - (self.set_size if self.perturb_type == "delete" else 0)
        return np.full(self.num_perturbations, length, dtype=np.int64)

    def build(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Perturbation ``i``: (sequence [L'], original positions [K], perturbed positions [K]).

        The two position arrays (K = n - m) locate each unperturbed gene, in original rank order, in
        the original and in the perturbed sequence (same token id at both).
        """
        genes = self.genes
        n, m, pre = self.n_genes, self.set_size, self.prefix
        pos = np.fromiter((self._gene_index[int(t)] for t in self.perturbed_genes[i]), np.int64, m)
        kept = np.delete(np.arange(n), pos)
        if self.perturb_type == "delete":
            new_genes = genes[kept]
            new_pos = np.arange(n - m)
        elif self.perturb_type == "overexpress":
            new_genes = np.concatenate([genes[pos], genes[kept]])
            new_pos = np.arange(m, n)
        else:
            keys = np.arange(n, dtype=np.float64)
            step = self.shift + 0.5
            keys[pos] += step if self.perturb_type == "inhibit" else -step
            order = np.argsort(keys, kind="stable")
            new_genes = genes[order]
            inverse = np.empty(n, dtype=np.int64)
            inverse[order] = np.arange(n)
            new_pos = inverse[kept]
        seq = np.concatenate([self.original_ids[:pre], new_genes, self.original_ids[len(self.original_ids) - self.suffix :]])
        return seq.astype(np.int64, copy=False), kept + pre, new_pos + pre

    def sequence(self, i: int) -> np.ndarray:
        """Perturbed token sequence ``i`` (special tokens kept in place)."""
        return self.build(i)[0]


def plan_perturbations(
    input_ids: Any,
    perturb_type: str = "delete",
    targets: str | int | Sequence[int] = "all",
    *,
    group: bool = False,
    anchor: int | Sequence[int] | None = None,
    rank_shift: float | None = None,
    cls_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = 0,
) -> PerturbationPlan:
    """Validate a request and list the perturbations of one cell (see the module docstring)."""
    perturb_type = _check_type(perturb_type)
    lay = _layout(input_ids, cls_token_id, eos_token_id, pad_token_id)
    genes = lay.genes
    n = genes.size
    index = {int(t): i for i, t in enumerate(genes)}
    shift = resolve_rank_shift(perturb_type, rank_shift, n)

    def check_in_cell(arr: np.ndarray, what: str) -> None:
        for j, tok in enumerate(arr):
            tok = int(tok)
            if tok not in index:
                special = " (a special token, never perturbed)" if tok in (cls_token_id, eos_token_id) else ""
                raise PerturbationError(f"{what}[{j}]={tok} is not a gene of the cell{special} ({n} genes)")

    anchors = np.zeros(0, dtype=np.int64) if anchor is None else _as_int_array(anchor, "anchor").reshape(-1)
    check_in_cell(anchors, "anchor")
    if len(set(anchors.tolist())) != anchors.size:
        raise PerturbationError(f"anchor lists a gene twice: {anchors.tolist()}")
    anchor_set = set(anchors.tolist())

    if isinstance(targets, str):
        if targets != "all":
            raise PerturbationError(f"targets must be 'all' or a list of gene token ids, got {targets!r}")
        if group:
            raise PerturbationError("group=True needs an explicit target list (grouping 'all' perturbs every gene)")
        target_arr = np.array([t for t in genes if int(t) not in anchor_set], dtype=np.int64)
    else:
        target_arr = _as_int_array(targets, "targets").reshape(-1)
        if target_arr.size == 0:
            raise PerturbationError("targets is empty; give at least one gene token id or 'all'")
        check_in_cell(target_arr, "targets")
        for j, tok in enumerate(target_arr):
            if int(tok) in anchor_set:
                raise PerturbationError(f"targets[{j}]={int(tok)} is also an anchor gene")
        if group and len(set(target_arr.tolist())) != target_arr.size:
            raise PerturbationError(f"gene set lists a gene twice: {target_arr.tolist()}")

    if group:
        sets = np.concatenate([anchors, target_arr])[None, :]
    else:
        sets = np.concatenate([np.broadcast_to(anchors, (target_arr.size, anchors.size)), target_arr[:, None]], axis=1)
    m = sets.shape[1]
    if m >= n:
        raise PerturbationError(
            f"perturbation set of {m} gene(s) (anchors + targets) leaves no unperturbed gene in a cell "
            f"of {n} genes; it must be smaller than the cell's gene count"
        )
    if sets.shape[0] == 0:
        raise PerturbationError("no gene left to perturb: every gene of the cell is an anchor")
    return PerturbationPlan(
        original_ids=lay.ids.copy(),
        perturb_type=perturb_type,
        perturbed_genes=np.ascontiguousarray(sets, dtype=np.int64),
        shift=shift,
        prefix=lay.prefix,
        suffix=lay.suffix,
        _gene_index=index,
    )


def perturb_sequence(
    input_ids: Any,
    genes: int | Sequence[int],
    perturb_type: str,
    *,
    rank_shift: float | None = None,
    cls_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = 0,
) -> np.ndarray:
    """One cell with ``genes`` perturbed together (a gene set, in the given order)."""
    plan = plan_perturbations(
        input_ids, perturb_type, np.atleast_1d(_as_int_array(genes, "genes")), group=True,
        rank_shift=rank_shift, cls_token_id=cls_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return plan.sequence(0)


# ----------------------------------------------------------------------------- batching


def chunk_by_token_budget(lengths: Sequence[int], max_tokens: int, max_batch: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` chunks with ``count * max(length) <= max_tokens`` and ``count <= max_batch``."""
    if max_tokens < 1:
        raise PerturbationError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch is not None and max_batch < 1:
        raise PerturbationError(f"max_batch must be >= 1, got {max_batch}")
    chunks: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        longest_with = max(longest, int(length))
        count = i - start + 1
        if count > 1 and (count * longest_with > max_tokens or (max_batch is not None and count > max_batch)):
            chunks.append((start, i))
            start, longest_with = i, int(length)
        longest = longest_with
    if len(lengths) > start:
        chunks.append((start, len(lengths)))
    return chunks




# ----------------------------------------------------------------------------- packed, reduced encoder batches


@dataclass(frozen=True)
class EncoderRow:
    """One sequence of a job to encode for the reduced ISP protocol.

    ``sequence`` [L] int64 token ids; ``original``: index (in the same job's row list) of the row this one
    is compared with, or -1 for a row that is itself an original; ``position_map`` [L] int64: for each
    token of ``sequence``, the position of the same gene in the original row, -1 = not compared (None
    for originals: nothing is compared).
    """

    sequence: np.ndarray
    original: int = -1
    position_map: np.ndarray | None = None


@dataclass(frozen=True)
class PackedBatch:
    """Encoder inputs of one packed batch and which job row each batch row is.

    ``members`` [B] (job index, row index); ``input_ids`` / ``attention_mask`` / ``position_map`` [B, L]
    int64 (map -1 on padding and original rows); ``original_offset`` [B, 1] int64: rows back from each row
    to its original in this batch (0 for original rows). Offsets are relative, so batches concatenated
    by a batcher stay valid.
    """

    members: list[tuple[int, int]]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    original_offset: np.ndarray
    position_map: np.ndarray

    @property
    def tokens(self) -> int:
        """Padded tokens of the batch (rows x padded length)."""
        return int(self.input_ids.size)


def _assemble(rows: Sequence[Sequence[EncoderRow]], members: list[tuple[int, int]], pad_token_id: int) -> PackedBatch:
    where = {member: b for b, member in enumerate(members)}
    items = [rows[j][r] for j, r in members]
    ids, mask = pad_token_batch([row.sequence for row in items], pad_token_id)
    position_map = np.full(ids.shape, -1, dtype=np.int64)
    offset = np.zeros((len(items), 1), dtype=np.int64)
    for b, ((j, _), row) in enumerate(zip(members, items)):
        if row.original >= 0:
            offset[b, 0] = b - where[(j, row.original)]
            position_map[b, : row.sequence.size] = row.position_map
    return PackedBatch(members, ids, mask, offset, position_map)


def pack_rows(
    rows: Sequence[Sequence[EncoderRow]], max_tokens: int, max_batch: int | None = None, pad_token_id: int = 0
) -> list[PackedBatch]:
    """Pack the rows of several jobs (cells) into encoder batches with ``rows x padded length <= max_tokens``.

    Jobs and their rows keep their order. Every compared row shares its batch with its original: an
    original is added to a batch right before the first row of that batch needing it (so a long job's
    original is re-encoded once per batch it spans); originals that no row of a batch needs are packed
    where they come. A row that does not fit even alone with its original gets a batch of its own.
    """
    if max_tokens < 1:
        raise PerturbationError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch is not None and max_batch < 2:
        raise PerturbationError(f"max_batch must be >= 2 (a row and its original), got {max_batch}")
    batches: list[PackedBatch] = []
    members: list[tuple[int, int]] = []
    longest = 0

    def fits(extra: list[tuple[int, int]]) -> bool:
        count = len(members) + len(extra)
        length = max([longest] + [rows[j][r].sequence.size for j, r in extra])
        return count * length <= max_tokens and (max_batch is None or count <= max_batch)

    for j, job_rows in enumerate(rows):
        for r, row in enumerate(job_rows):
            present = set(members)
            if (j, r) in present:
                continue
            extra = [(j, r)] if row.original < 0 or (j, row.original) in present else [(j, row.original), (j, r)]
            if members and not fits(extra):
                batches.append(_assemble(rows, members, pad_token_id))
                members, longest = [], 0
                extra = [(j, r)] if row.original < 0 else [(j, row.original), (j, r)]
            members += extra
            longest = max([longest] + [rows[a][b].sequence.size for a, b in extra])
    if members:
        batches.append(_assemble(rows, members, pad_token_id))
    return batches


def reduce_token_rows(
    token_embeddings: np.ndarray, attention_mask: np.ndarray, original_offset: np.ndarray, position_map: np.ndarray,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """The reduced ISP outputs from token embeddings, on the host (for encoders that return tokens).

    ``token_embeddings`` [B, L, H] (any float), the other inputs as in :class:`PackedBatch`. Returns
    ``token_mean`` [B, H] (mean over each row's tokens) and ``gene_cos`` [B, L] (cos(token, the same gene's
    token in the row's original), den = max(|a| |b|, eps); 0 where ``position_map`` is -1), float64. The
    exported graph (``export/isp_reduction_export.py``) computes the same in float32.
    """
    tokens = np.asarray(token_embeddings, dtype=np.float64)
    mask = np.asarray(attention_mask, dtype=np.float64)[..., None]
    means = (tokens * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
    rows = np.arange(tokens.shape[0]) - np.asarray(original_offset).reshape(-1)
    index = np.maximum(position_map, 0)
    aligned = tokens[rows[:, None], index]
    den = np.maximum(np.linalg.norm(tokens, axis=-1) * np.linalg.norm(aligned, axis=-1), eps)
    cos = np.where(position_map >= 0, np.sum(tokens * aligned, axis=-1) / den, 0.0)
    return means, cos


#: ``encode(batch) -> (token_mean [B, H], gene_cos [B, L])`` of a packed batch (a reduced encoder, or
#: token embeddings reduced by :func:`reduce_token_rows`).
ReducedEncodeFn = Callable[[PackedBatch], tuple[np.ndarray, np.ndarray]]


def token_reduced_encode(encode: EncodeFn) -> ReducedEncodeFn:
    """A :data:`ReducedEncodeFn` over a plain ``encode(ids, mask) -> (cell, tokens)`` encoder (wrap a torch
    module with :func:`geneformer_triton.model.runtimes.torch_encode_fn` first)."""

    def reduced(batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
        _, tokens = encode(batch.input_ids, batch.attention_mask)
        return reduce_token_rows(to_numpy(tokens), batch.attention_mask, batch.original_offset, batch.position_map)

    return reduced


class PackedRun:
    """The packed batches of several jobs and the delivery of their results (drivers: :func:`run_packed`,
    the ``geneformer_isp`` model's async loop).

    A job has ``rows() -> list[EncoderRow]`` and ``accumulate_row(r, token_mean [H], gene_cos [L])``.
    ``errors[j]`` is None or the error that failed job ``j``: a failing batch fails only the jobs in it; a
    job whose accumulation fails gets no further rows; the other jobs go on. Batches are independent
    (each holds the originals its rows need), so they may be encoded concurrently and delivered in any order.
    """

    def __init__(self, jobs: Sequence[Any], max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int | None = None,
                 pad_token_id: int = 0) -> None:
        self.jobs = list(jobs)
        self.rows = [job.rows() for job in self.jobs]
        self.batches = pack_rows(self.rows, max_tokens, max_batch, pad_token_id)
        self.errors: list[BaseException | None] = [None] * len(self.jobs)

    def live(self, batch: PackedBatch) -> bool:
        """Whether any job of ``batch`` has not failed (a batch of failed jobs need not be encoded)."""
        return any(self.errors[j] is None for j, _ in batch.members)

    def fail(self, batch: PackedBatch, error: BaseException) -> None:
        """The encoder failed ``batch``: every job in it fails with ``error``."""
        for j, _ in batch.members:
            if self.errors[j] is None:
                self.errors[j] = error

    def deliver(self, batch: PackedBatch, token_mean: np.ndarray, gene_cos: np.ndarray) -> None:
        """Hand each row of ``batch`` its ``token_mean`` [B, H] and ``gene_cos`` [B, L] values."""
        if token_mean.shape[0] != len(batch.members) or gene_cos.shape != batch.input_ids.shape:
            self.fail(batch, PerturbationError(
                f"encoder returned token_mean {list(token_mean.shape)} and gene_cos {list(gene_cos.shape)} for a "
                f"batch of {list(batch.input_ids.shape)} tokens"))
            return
        for b, (j, r) in enumerate(batch.members):
            if self.errors[j] is not None:
                continue
            try:
                self.jobs[j].accumulate_row(r, token_mean[b], gene_cos[b, : self.rows[j][r].sequence.size])
            except Exception as error:  # noqa: BLE001 - this job fails alone
                self.errors[j] = error


def run_packed(
    jobs: Sequence[Any], encode: ReducedEncodeFn, max_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int | None = None,
    pad_token_id: int = 0,
) -> list[BaseException | None]:
    """Encode the rows of several jobs in shared packed batches, in order (see :class:`PackedRun`).

    Returns one entry per job: None (the job is complete) or the error that failed it.
    """
    run = PackedRun(jobs, max_tokens, max_batch, pad_token_id)
    for batch in run.batches:
        if not run.live(batch):
            continue
        try:
            token_mean, gene_cos = encode(batch)
        except Exception as error:  # noqa: BLE001 - the jobs of this batch fail, the others go on
            run.fail(batch, error)
            continue
        run.deliver(batch, np.asarray(token_mean), np.asarray(gene_cos))
    return run.errors


# ----------------------------------------------------------------------------- scores


def cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity along the last axis (float64, broadcasting)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
    return np.sum(a * b, axis=-1) / (na * nb)


def reduce_scores(
    original_cell: np.ndarray,
    original_tokens: np.ndarray,
    cell_embs: np.ndarray,
    token_embs: np.ndarray,
    orig_pos: np.ndarray,
    pert_pos: np.ndarray,
    start_state: np.ndarray | None = None,
    goal_state: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Scores of b perturbations from their embeddings (float64 arrays).

    original_cell [H], original_tokens [L0, H], cell_embs [b, H], token_embs [b, L, H],
    orig_pos / pert_pos [b, K] (from :meth:`PerturbationPlan.build`). Returns ``cell_shift`` [b],
    ``gene_cos`` [b, K], ``gene_shift`` [b], and ``goal_shift`` / ``start_shift`` [b] when given.
    """
    cell_embs = np.asarray(cell_embs)
    rows = np.arange(cell_embs.shape[0])[:, None]
    gene_cos = cosine(np.asarray(original_tokens)[orig_pos], np.asarray(token_embs)[rows, pert_pos])
    out = {
        "cell_shift": cosine(cell_embs, original_cell[None, :]),
        "gene_cos": gene_cos,
        "gene_shift": gene_cos.mean(axis=1),
    }
    for name, state in (("goal_shift", goal_state), ("start_shift", start_state)):
        if state is not None:
            out[name] = cosine(cell_embs, state[None, :]) - cosine(original_cell, state)
    return out


@dataclass
class PerturbationResult:
    """Reduced ISP scores of one cell, one row per perturbation in target order (float32)."""

    perturb_type: str
    perturbed_genes: np.ndarray  # [P, m] int64
    lengths: np.ndarray  # [P] int64, perturbed sequence lengths
    cell_shift: np.ndarray  # [P]
    gene_shift: np.ndarray  # [P]
    goal_shift: np.ndarray | None = None  # [P]
    start_shift: np.ndarray | None = None  # [P]
    gene_cos: np.ndarray | None = None  # [P, n], NaN at perturbed genes
    original_cell_embedding: np.ndarray | None = None  # [H]
    num_forward_passes: int = 0

    def as_dict(self) -> dict[str, np.ndarray]:
        """Array fields that are set (for a server response)."""
        names = ("perturbed_genes", "lengths", "cell_shift", "gene_shift", "goal_shift", "start_shift", "gene_cos")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


# ----------------------------------------------------------------------------- runners






def _state(vec: Any, hidden: int, name: str) -> np.ndarray | None:
    if vec is None:
        return None
    arr = np.asarray(to_numpy(vec), dtype=np.float64).reshape(-1)
    if arr.size != hidden:
        raise PerturbationError(f"{name} has {arr.size} values; the encoder's hidden size is {hidden}")
    return arr


def run_plan(
    encode: EncodeFn,
    plan: PerturbationPlan,
    *,
    start_state: Any = None,
    goal_state: Any = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int | None = None,
    pad_token_id: int = 0,
    return_gene_cos: bool = False,
) -> PerturbationResult:
    """Encode the original cell and every perturbation of ``plan`` in token-budget chunks and reduce."""
    P, n = plan.num_perturbations, plan.n_genes
    lengths = np.concatenate([[len(plan.original_ids)], plan.lengths()])
    chunks = chunk_by_token_budget(lengths, max_tokens, max_batch)

    scores: dict[str, np.ndarray] = {}
    gene_cos = np.full((P, n), np.nan, dtype=np.float32) if return_gene_cos else None
    original_cell = original_tokens = None
    start = goal = None
    for c_start, c_stop in chunks:
        items = [(i - 1,) + plan.build(i - 1) if i > 0 else None for i in range(c_start, c_stop)]
        seqs = [plan.original_ids if it is None else it[1] for it in items]
        ids, mask = pad_token_batch(seqs, pad_token_id)
        cell_out, tok_out = encode(ids, mask)
        cell_out, tok_out = to_numpy(cell_out), to_numpy(tok_out)
        if cell_out.ndim != 2 or cell_out.shape[0] != len(seqs) or tok_out.shape[:2] != ids.shape or tok_out.ndim != 3:
            raise PerturbationError(
                f"encode returned cell_embedding {cell_out.shape} and token_embeddings {tok_out.shape} "
                f"for input_ids {ids.shape}; expected [B, H] and [B, L, H]"
            )
        first = 0
        if items[0] is None:  # chunk 0 starts with the original cell
            original_cell = cell_out[0].astype(np.float64)
            original_tokens = tok_out[0, : len(plan.original_ids)]
            start = _state(start_state, original_cell.size, "start_state")
            goal = _state(goal_state, original_cell.size, "goal_state")
            first = 1
        if first == len(items):
            continue
        idx = np.array([it[0] for it in items[first:]])
        orig_pos = np.stack([it[2] for it in items[first:]])
        pert_pos = np.stack([it[3] for it in items[first:]])
        part = reduce_scores(original_cell, original_tokens, cell_out[first:], tok_out[first:], orig_pos, pert_pos, start, goal)
        for key, val in part.items():
            if key == "gene_cos":
                if gene_cos is not None:
                    gene_cos[idx[:, None], orig_pos - plan.prefix] = val
                continue
            scores.setdefault(key, np.empty(P, dtype=np.float32))[idx] = val
    return PerturbationResult(
        perturb_type=plan.perturb_type,
        perturbed_genes=plan.perturbed_genes,
        lengths=plan.lengths(),
        cell_shift=scores["cell_shift"],
        gene_shift=scores["gene_shift"],
        goal_shift=scores.get("goal_shift"),
        start_shift=scores.get("start_shift"),
        gene_cos=gene_cos,
        original_cell_embedding=None if original_cell is None else original_cell.astype(np.float32),
        num_forward_passes=len(chunks),
    )


def run_perturbation(
    encode: EncodeFn,
    input_ids: Any,
    perturb_type: str = "delete",
    targets: str | int | Sequence[int] = "all",
    *,
    group: bool = False,
    anchor: int | Sequence[int] | None = None,
    rank_shift: float | None = None,
    cls_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    start_state: Any = None,
    goal_state: Any = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int | None = None,
    return_gene_cos: bool = False,
) -> PerturbationResult:
    """In-silico perturbation of one cell: :func:`plan_perturbations` then :func:`run_plan`."""
    plan = plan_perturbations(
        input_ids, perturb_type, targets, group=group, anchor=anchor, rank_shift=rank_shift,
        cls_token_id=cls_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return run_plan(
        encode, plan, start_state=start_state, goal_state=goal_state, max_tokens=max_tokens,
        max_batch=max_batch, pad_token_id=pad_token_id, return_gene_cos=return_gene_cos,
    )


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "PERTURB_TYPES",
    "PerturbationError",
    "PerturbationPlan",
    "PerturbationResult",
    "EncoderRow",
    "PackedBatch",
    "PackedRun",
    "ReducedEncodeFn",
    "chunk_by_token_budget",
    "cosine",
    "perturb_sequence",
    "pack_rows",
    "plan_perturbations",
    "reduce_scores",
    "reduce_token_rows",
    "resolve_rank_shift",
    "run_perturbation",
    "run_packed",
    "run_plan",
    "token_reduced_encode",
]
