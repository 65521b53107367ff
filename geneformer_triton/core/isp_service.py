"""Server side of in-silico perturbation (ISP): what the ``geneformer_isp`` Triton model does, minus Triton.

One request = one cell (raw counts of its genes) + one perturbation spec. The flow is

    parse_request (wire tensors -> IspRequest, shape/type checks)
      -> IspEngine.prepare (rank-value tokenization with the model's dictionaries, gene ids -> tokens,
         plan_perturbations, token-budget chunks)
      -> IspJob.batch(k) / encoder / IspJob.accumulate(k, ...)   (any encoder: BLS, in-process...)
      -> IspJob.outputs()   (scores only: one value per perturbation)

Everything here is numpy (no torch, no Triton), so the model's python stub imports it cheaply and the
tests drive it in-process. Perturbation semantics, chunking and score formulas are the ones of
:mod:`geneformer_triton.core.perturbation` (``plan_perturbations``, ``chunk_by_token_budget``,
``reduce_scores``); the chunking is identical to :func:`~geneformer_triton.core.perturbation.run_plan`
(original cell first, then the perturbations in target order).

Two semantics, chosen by the ``semantics`` input: ``upstream`` (default; Geneformer ``InSilicoPerturber``'s
numbers: :meth:`IspEngine.prepare_upstream` -> :class:`geneformer_triton.core.isp_upstream_service.UpstreamJob`,
whose module documents its extra inputs and outputs; its rows are packed with other cells' by
:class:`geneformer_triton.core.perturbation.PackedRun`) and ``ours`` (:meth:`IspEngine.prepare` ->
:class:`IspJob`, described here). Targets that cannot be perturbed in a cell are dropped for that cell
and listed in the ``target_errors`` output (BYTES [E]).

Wire contract (``model_repository/geneformer_isp/config.pbtxt``): one cell per request, every tensor with a
leading batch dimension of 1 (shapes below are per cell, after it: ``gene_ids`` travels as BYTES [1, G]);
``max_batch_size`` > 0 with dynamic batching and ragged inputs, so Triton hands concurrent requests of any
sizes to one ``execute``, where their rows share encoder batches. :func:`one_cell_inputs` removes the batch
dimension on the server (a request whose batch dimension is not 1 fails alone), :func:`batched` adds it to
outputs and to a client's inputs, :func:`unbatched` removes it from a response.

inputs
    ``gene_ids`` BYTES [G] Ensembl ids (""=ignored), ``counts`` FP32 [G] raw counts, optional
    ``n_counts`` FP32 [1] (cell total; default sum of ``counts``), ``perturbation`` BYTES [1]
    (delete | overexpress | inhibit | activate), optional ``targets`` BYTES [T] (absent or ["all"]:
    every gene of the cell; an empty list is an error), optional ``target_mode`` BYTES [1]
    (each | set), optional ``anchor_genes`` BYTES [A], optional ``rank_shift`` FP32 [1]
    (inhibit/activate), optional ``goal_embedding`` / ``start_embedding`` FP32 [H], optional
    ``return_gene_shift`` BOOL [1], optional ``encoder_model`` BYTES [1] (one of the model's
    ``allowed_encoder_models``).
outputs (one value per perturbation, target order)
    ``perturbed_genes`` BYTES [P] (vocabulary Ensembl ids, a set joined with "+", anchors first),
    ``cell_shift`` FP32 [P] (cosine original vs perturbed cell embedding; 1 = no shift),
    ``gene_embedding_shift`` FP32 [P] (mean cosine of the unperturbed genes' embeddings; only when
    computed), ``goal_shift`` / ``start_shift`` FP32 [P] (only when that state is given),
    ``original_embedding`` FP32 [H].

The gene-embedding shift needs the encoder's ``token_embeddings`` ([batch, length, hidden]) and is
computed only when asked: ``return_gene_shift`` true, or, with ``return_gene_shift`` absent, when the
client requests the ``gene_embedding_shift`` output (Triton requests every output when a client names
none, so plain requests get Geneformer's default: cell and gene shifts). Token embeddings are reduced
chunk by chunk; nothing of size [perturbations x length x hidden] is kept or returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from geneformer_triton.core.dictionaries import GeneVocabulary
from geneformer_triton.core.perturbation import (
    PERTURB_TYPES,
    PerturbationError,
    PerturbationPlan,
    chunk_by_token_budget,
    cosine,
    plan_perturbations,
    reduce_scores,
)
from geneformer_triton.core.tokenizer import UNKNOWN, RankValueTokenizer, TokenizationError, pad_token_batch

if TYPE_CHECKING:
    from geneformer_triton.core.isp_upstream_service import UpstreamJob

TARGET_MODES = ("each", "set")
ALL_TARGETS = "all"
SET_SEPARATOR = "+"

#: Request inputs (all optional ones may be absent).
INPUTS = (
    "gene_ids", "counts", "n_counts", "perturbation", "targets", "target_mode", "anchor_genes",
    "rank_shift", "goal_embedding", "start_embedding", "return_gene_shift", "encoder_model",
    "semantics", "emb_layer", "emb_mode", "state_embeddings", "embed_only",
)
#: Response outputs.
OUTPUTS = ("perturbed_genes", "cell_shift", "gene_embedding_shift", "goal_shift", "start_shift", "original_embedding",
           "cell_emb_shift", "state_shift", "cell_genes", "gene_perturbation", "gene_affected", "gene_cos", "target_errors")
#: ``semantics`` input: upstream Geneformer's InSilicoPerturber (default) or ours (isp_service's own job).
SEMANTICS = ("upstream", "ours")


class IspInputError(ValueError):
    """A request the ISP model cannot serve; the message tells the client what to change."""


# ----------------------------------------------------------------------------- request parsing


def _decode(value: object) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _strings(array: Optional[np.ndarray], name: str) -> Optional[list[str]]:
    if array is None:
        return None
    arr = np.asarray(array)
    if arr.ndim > 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind not in "OSU":
        raise IspInputError(f"{name} must be a BYTES (string) tensor, got {arr.dtype}")
    return [_decode(v).strip() for v in arr.reshape(-1)]


def _scalar_string(array: Optional[np.ndarray], name: str, default: Optional[str]) -> Optional[str]:
    values = _strings(array, name)
    if values is None:
        return default
    if len(values) != 1:
        raise IspInputError(f"{name} must hold exactly one value, got {len(values)}")
    return values[0]


def _vector(array: Optional[np.ndarray], name: str) -> Optional[np.ndarray]:
    if array is None:
        return None
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise IspInputError(f"{name} must be numeric (FP32), got {arr.dtype}")
    arr = arr.astype(np.float64).reshape(-1)
    if arr.size == 0:
        raise IspInputError(f"{name} is empty; omit it or send the full embedding")
    if not np.all(np.isfinite(arr)):
        raise IspInputError(f"{name} holds NaN or infinite values")
    if not np.any(arr):
        raise IspInputError(f"{name} is all zeros (a cosine with it is undefined)")
    return arr


@dataclass(frozen=True)
class IspRequest:
    """One validated ISP request (see the module docstring for each field's meaning)."""

    gene_ids: np.ndarray  # object array of str, [G]
    counts: np.ndarray  # float32 [G]
    n_counts: Optional[float]
    perturbation: str
    targets: Optional[tuple[str, ...]]  # None = every gene of the cell
    target_mode: str = "each"
    anchor_genes: tuple[str, ...] = ()
    rank_shift: Optional[float] = None
    goal_embedding: Optional[np.ndarray] = None
    start_embedding: Optional[np.ndarray] = None
    return_gene_shift: Optional[bool] = None
    encoder_model: Optional[str] = None
    semantics: str = "upstream"
    emb_layer: int = -1  # upstream ISP convention (hidden_states[n_layers + emb_layer])
    emb_mode: str = "cell"
    state_embeddings: Optional[np.ndarray] = None  # [S, H]
    embed_only: bool = False


def _one(array: Optional[np.ndarray], name: str, kinds: str, what: str) -> Optional[object]:
    """The single value of an optional one-value input (None when absent); ``kinds``: allowed numpy dtype
    kinds, ``what``: the allowed value in words (for the message)."""
    if array is None:
        return None
    values = np.asarray(array).reshape(-1)
    if values.size != 1 or values.dtype.kind not in kinds:
        raise IspInputError(f"{name} must hold one value ({what}), got {values.size} of {values.dtype}")
    return values[0].item()


def _flag(array: Optional[np.ndarray], name: str) -> Optional[bool]:
    value = _one(array, name, "biu", "a BOOL")
    return None if value is None else bool(value)


def _parse_upstream_fields(get: Callable[[str], Optional[np.ndarray]], perturbation: str, target_mode: str) -> dict:
    """``semantics``, ``emb_layer``, ``emb_mode``, ``state_embeddings``, ``embed_only`` of a request."""
    semantics = (_scalar_string(get("semantics"), "semantics", "upstream") or "upstream").lower()
    if semantics not in SEMANTICS:
        raise IspInputError(f"unknown semantics {semantics!r}; expected 'upstream' (Geneformer's InSilicoPerturber) or 'ours'")
    layer = get("emb_layer")
    value = _one(layer, "emb_layer", "iu", "an integer; upstream ISP convention: 0 = last layer, -1 = second-to-last")
    emb_layer = -1 if value is None else int(value)
    emb_mode = (_scalar_string(get("emb_mode"), "emb_mode", "cell") or "cell").lower()
    if emb_mode not in ("cell", "cell_and_gene"):
        raise IspInputError(f"unknown emb_mode {emb_mode!r}; expected 'cell' or 'cell_and_gene'")
    states = get("state_embeddings")
    if states is not None:
        states = np.asarray(states)
        if states.dtype.kind not in "fiu" or states.ndim != 2 or 0 in states.shape:
            raise IspInputError(f"state_embeddings must be FP32 [states, hidden], got {states.dtype} {list(states.shape)}")
        states = states.astype(np.float64)
        if not np.all(np.isfinite(states)) or not np.all(np.any(states, axis=1)):
            raise IspInputError("state_embeddings hold NaN/infinite values or an all-zero state")
    if semantics == "upstream":
        if perturbation not in ("delete", "overexpress"):
            raise IspInputError(f"perturbation {perturbation!r} exists only with semantics 'ours' (upstream has not "
                                "implemented it): send semantics='ours'")
        if target_mode == "each" and get("target_mode") is not None:
            raise IspInputError("target_mode 'each' (one perturbation per listed gene) is ours: send semantics='ours'; "
                                "upstream perturbs a list jointly")
    elif states is not None or emb_mode != "cell" or layer is not None:
        raise IspInputError("emb_layer, emb_mode and state_embeddings belong to semantics 'upstream'; "
                            "semantics 'ours' uses goal_embedding/start_embedding and the encoder's layer")
    return {"semantics": semantics, "emb_layer": emb_layer, "emb_mode": emb_mode, "state_embeddings": states,
            "embed_only": bool(_flag(get("embed_only"), "embed_only"))}


def parse_request(get: Callable[[str], Optional[np.ndarray]]) -> IspRequest:
    """Validate the wire tensors of one request; ``get(name)`` returns an input as numpy or None."""
    gene_ids = _strings(get("gene_ids"), "gene_ids")
    counts = get("counts")
    if gene_ids is None or counts is None:
        raise IspInputError("gene_ids and counts are required (the cell's genes as Ensembl ids and their raw counts)")
    counts = np.asarray(counts)
    if counts.dtype.kind not in "fiu":
        raise IspInputError(f"counts must be numeric (FP32), got {counts.dtype}")
    counts = counts.astype(np.float32).reshape(-1)
    if len(gene_ids) == 0 or not any(gene_ids):
        raise IspInputError("gene_ids is empty: send the cell's expressed genes (Ensembl ids) with their counts")
    if len(gene_ids) != counts.size:
        raise IspInputError(f"gene_ids has {len(gene_ids)} entries but counts has {counts.size}; they must match")

    n_counts = _one(get("n_counts"), "n_counts", "fiu", "the cell's total counts, FP32")
    if n_counts is not None:
        n_counts = float(n_counts)
        if not math.isfinite(n_counts) or n_counts <= 0:
            raise IspInputError(f"n_counts must be a finite number > 0, got {n_counts!r}")

    perturbation = _scalar_string(get("perturbation"), "perturbation", None)
    if perturbation is None or perturbation == "":
        raise IspInputError(f"perturbation is required: one of {', '.join(PERTURB_TYPES)}")
    perturbation = perturbation.lower()
    if perturbation not in PERTURB_TYPES:
        raise IspInputError(f"unknown perturbation {perturbation!r}; expected one of {', '.join(PERTURB_TYPES)}")

    target_mode = (_scalar_string(get("target_mode"), "target_mode", "each") or "each").lower()
    if target_mode not in TARGET_MODES:
        raise IspInputError(f"unknown target_mode {target_mode!r}; expected 'each' (one perturbation per gene) or 'set' (all together)")

    raw_targets = _strings(get("targets"), "targets")
    targets: Optional[tuple[str, ...]]
    if raw_targets is None:
        targets = None
    else:
        if len(raw_targets) == 0 or all(t == "" for t in raw_targets):
            raise IspInputError("targets is empty: list Ensembl gene ids, send ['all'], or omit targets for every gene")
        if any(t.lower() == ALL_TARGETS for t in raw_targets):
            if len(raw_targets) != 1:
                raise IspInputError("targets mixes 'all' with gene ids; send either ['all'] or a list of genes")
            targets = None
        else:
            if any(t == "" for t in raw_targets):
                raise IspInputError(f"targets[{raw_targets.index('')}] is an empty string")
            targets = tuple(raw_targets)
    if target_mode == "set" and targets is None:
        raise IspInputError("target_mode 'set' perturbs the listed genes together: give an explicit gene list, not 'all'")

    anchors_raw = _strings(get("anchor_genes"), "anchor_genes") or []
    anchors = tuple(a for a in anchors_raw if a != "")

    rank_shift = _one(get("rank_shift"), "rank_shift", "fiu", "FP32 positions or fraction")
    rank_shift = None if rank_shift is None else float(rank_shift)
    if perturbation in ("inhibit", "activate") and rank_shift is None:
        raise IspInputError(
            f"perturbation {perturbation!r} needs rank_shift: whole positions (>= 1) or a fraction of the cell's genes in (0, 1)"
        )
    if perturbation in ("delete", "overexpress") and rank_shift is not None:
        raise IspInputError(f"rank_shift applies to inhibit/activate only, not to {perturbation!r}; omit it")

    return_gene_shift = _flag(get("return_gene_shift"), "return_gene_shift")
    upstream = _parse_upstream_fields(get, perturbation, target_mode)

    encoder_model = _scalar_string(get("encoder_model"), "encoder_model", None) or None
    return IspRequest(
        gene_ids=np.array(gene_ids, dtype=object),
        counts=counts,
        n_counts=n_counts,
        perturbation=perturbation,
        targets=targets,
        target_mode=target_mode,
        anchor_genes=anchors,
        rank_shift=rank_shift,
        goal_embedding=_vector(get("goal_embedding"), "goal_embedding"),
        start_embedding=_vector(get("start_embedding"), "start_embedding"),
        return_gene_shift=return_gene_shift,
        encoder_model=encoder_model,
        **upstream,
    )


def _without_batch_dim(name: str, value: np.ndarray, error: Callable[[str], Exception]) -> np.ndarray:
    """``value[0]`` of a ``[1, ...]`` tensor; any other shape raises ``error("<name> has shape [...]")``."""
    if value.ndim == 0 or value.shape[0] != 1:
        raise error(f"{name} has shape {list(value.shape)}")
    return value[0]


def one_cell_inputs(get: Callable[[str], Optional[np.ndarray]]) -> Callable[[str], Optional[np.ndarray]]:
    """``get`` of a served request (every tensor [1, ...]: one cell per request) as the per-cell ``get`` that
    :func:`parse_request` reads (the leading batch dimension removed). An input whose batch dimension is not 1
    fails the request with the input's name and shape."""

    def not_one_cell(where: str) -> IspInputError:
        return IspInputError(f"{where}: geneformer_isp takes one cell per request, so every input needs a leading "
                             "batch dimension of 1 (send cells as separate, concurrent requests; Triton merges them)")

    def cell_input(name: str) -> Optional[np.ndarray]:
        value = get(name)
        return None if value is None else _without_batch_dim(name, np.asarray(value), not_one_cell)

    return cell_input


def batched(tensors: dict[str, Optional[np.ndarray]]) -> dict[str, Optional[np.ndarray]]:
    """One cell's tensors with the leading batch dimension of 1 the served model's inputs and outputs carry
    (client: per-cell inputs -> wire; server: per-cell outputs -> wire). None stays None."""
    return {name: None if value is None else np.asarray(value)[np.newaxis] for name, value in tensors.items()}


def unbatched(tensors: dict[str, Optional[np.ndarray]]) -> dict[str, Optional[np.ndarray]]:
    """The inverse of :func:`batched` for a response (client side): ``[1, ...]`` -> ``[...]``."""

    def not_one_cell(where: str) -> ValueError:
        return ValueError(f"{where}; a geneformer_isp output has batch dimension 1")

    return {name: None if value is None else _without_batch_dim(name, np.asarray(value), not_one_cell)
            for name, value in tensors.items()}


def wants_gene_shift(request: IspRequest, requested_outputs: Sequence[str]) -> bool:
    """Whether to compute the gene-embedding shift (see the module docstring)."""
    if request.return_gene_shift is not None:
        return request.return_gene_shift
    return "gene_embedding_shift" in set(requested_outputs)


# ----------------------------------------------------------------------------- job


@dataclass
class IspJob:
    """One cell's perturbations, their encoder chunks and the scores gathered so far.

    Chunk ``k`` covers rows ``chunks[k]`` of [original cell, perturbation 0, 1, ...]; chunk 0 starts
    with the original cell and must be accumulated first (the others in any order).
    """

    plan: PerturbationPlan
    labels: list[str]
    chunks: list[tuple[int, int]]
    gene_shift: bool
    goal: Optional[np.ndarray] = None
    start: Optional[np.ndarray] = None
    pad_token_id: int = 0
    notes: list = field(default_factory=list)  # targets dropped for this cell, with the reason
    original_cell: Optional[np.ndarray] = field(default=None, repr=False)
    original_tokens: Optional[np.ndarray] = field(default=None, repr=False)
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    done: set = field(default_factory=set, repr=False)

    @property
    def num_perturbations(self) -> int:
        return self.plan.num_perturbations

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``input_ids`` / ``attention_mask`` [b, L] int64 of chunk ``k``."""
        start, stop = self.chunks[k]
        seqs = [self.plan.original_ids if i == 0 else self.plan.build(i - 1)[0] for i in range(start, stop)]
        return pad_token_batch(seqs, self.pad_token_id)

    def _check_state(self, state: Optional[np.ndarray], name: str, hidden: int) -> None:
        if state is not None and state.size != hidden:
            raise IspInputError(f"{name} has {state.size} values; the encoder's hidden size is {hidden}")

    def accumulate(self, k: int, cell_embedding: np.ndarray, token_embeddings: Optional[np.ndarray]) -> None:
        """Reduce chunk ``k``'s encoder outputs (cell [b, H], tokens [b, L, H] or None) into scores."""
        start, stop = self.chunks[k]
        cell = np.asarray(cell_embedding, dtype=np.float32)
        if cell.ndim != 2 or cell.shape[0] != stop - start:
            raise RuntimeError(f"encoder returned cell_embedding {list(cell.shape)} for a chunk of {stop - start} sequences")
        if self.gene_shift:
            if token_embeddings is None:
                raise RuntimeError("the gene-embedding shift needs token_embeddings from the encoder")
            tokens = np.asarray(token_embeddings, dtype=np.float32)
            if tokens.ndim != 3 or tokens.shape[0] != stop - start:
                raise RuntimeError(f"encoder returned token_embeddings {list(tokens.shape)} for a chunk of {stop - start} sequences")
        first = 0
        if start == 0:
            self.original_cell = cell[0].astype(np.float64)
            hidden = self.original_cell.size
            self._check_state(self.goal, "goal_embedding", hidden)
            self._check_state(self.start, "start_embedding", hidden)
            if self.gene_shift:
                self.original_tokens = tokens[0, : len(self.plan.original_ids)]
            first = 1
        elif self.original_cell is None:
            raise RuntimeError("chunk 0 (with the original cell) must be accumulated first")
        self.done.add(k)
        if first == stop - start:
            return
        idx = np.arange(start + first, stop) - 1  # perturbation indices
        if self.gene_shift:
            built = [self.plan.build(int(i)) for i in idx]
            orig_pos = np.stack([b[1] for b in built])
            pert_pos = np.stack([b[2] for b in built])
            part = reduce_scores(self.original_cell, self.original_tokens, cell[first:], tokens[first:],
                                 orig_pos, pert_pos, self.start, self.goal)
            part.pop("gene_cos")
        else:
            embs = cell[first:]
            part = {"cell_shift": cosine(embs, self.original_cell[None, :])}
            for name, state in (("goal_shift", self.goal), ("start_shift", self.start)):
                if state is not None:
                    part[name] = cosine(embs, state[None, :]) - cosine(self.original_cell, state)
        for key, values in part.items():
            self.scores.setdefault(key, np.full(self.num_perturbations, np.nan, dtype=np.float32))[idx] = values

    def outputs(self) -> dict[str, np.ndarray]:
        """Response tensors: ``perturbed_genes`` and the scores computed (float32, target order)."""
        missing = sorted(set(range(len(self.chunks))) - self.done)
        if missing:
            raise RuntimeError(f"chunks {missing} were not accumulated")
        out: dict[str, np.ndarray] = {
            "perturbed_genes": np.array([s.encode() for s in self.labels], dtype=object),
            "cell_shift": self.scores["cell_shift"],
            "original_embedding": self.original_cell.astype(np.float32),
            "target_errors": np.array([n.encode() for n in self.notes], dtype=object),
        }
        if self.gene_shift:
            out["gene_embedding_shift"] = self.scores["gene_shift"]
        if self.goal is not None:
            out["goal_shift"] = self.scores["goal_shift"]
        if self.start is not None:
            out["start_shift"] = self.scores["start_shift"]
        return out


def run_job(job: IspJob, encode: Callable[[np.ndarray, np.ndarray, bool], tuple[np.ndarray, Optional[np.ndarray]]]) -> dict[str, np.ndarray]:
    """Run every chunk of ``job`` in order through ``encode(ids, mask, want_tokens)`` (synchronous helper)."""
    for k in range(len(job.chunks)):
        ids, mask = job.batch(k)
        cell, tokens = encode(ids, mask, job.gene_shift)
        job.accumulate(k, cell, tokens)
    return job.outputs()


# ----------------------------------------------------------------------------- engine


class IspEngine:
    """Tokenizer + vocabulary + batching limits of one served model; turns requests into jobs."""

    def __init__(
        self,
        vocabulary: GeneVocabulary,
        model_input_size: int,
        special_tokens: bool,
        max_tokens_per_batch: int = 32768,
        max_batch: Optional[int] = 64,
        max_perturbations: int = 16384,
    ) -> None:
        if max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
        self.vocabulary = vocabulary
        self.tokenizer = RankValueTokenizer(vocabulary, model_input_size, special_tokens)
        self.model_input_size = model_input_size
        self.special_tokens = special_tokens
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_batch = max_batch
        self.max_perturbations = max_perturbations
        self.cls_id = vocabulary.cls_id if special_tokens else None
        self.eos_id = vocabulary.eos_id if special_tokens else None

    def tokenize(self, request: IspRequest) -> np.ndarray:
        """The cell's token ids (rank-value order, truncated to the model input size)."""
        n_counts = None if request.n_counts is None else np.array([request.n_counts], dtype=np.float64)
        try:
            (cell,) = self.tokenizer.tokenize_gene_lists(request.gene_ids[None, :], request.counts[None, :], n_counts)
        except TokenizationError as error:
            raise IspInputError(str(error).replace("cell 0", "the cell")) from error
        return cell

    def _gene_tokens(self, genes: Sequence[str], what: str, cell_index: dict, request: IspRequest) -> np.ndarray:
        tokens = self.tokenizer.gene_tokens(list(genes))
        expressed = None
        for j, (gene, tok) in enumerate(zip(genes, tokens)):
            if tok == UNKNOWN:
                raise IspInputError(f"{what}[{j}]={gene!r} is not in the model's gene vocabulary (Ensembl gene ids expected)")
            if int(tok) not in cell_index:
                if expressed is None:
                    mask = request.counts > 0
                    known = self.tokenizer.gene_tokens(list(request.gene_ids[mask]))
                    expressed = set(int(t) for t in known)
                why = (f"it is expressed but ranked beyond the model input size ({self.tokenizer.max_genes} genes)"
                       if int(tok) in expressed else "it is not expressed in the cell")
                raise IspInputError(f"{what}[{j}]={gene!r} is not a gene of the cell: {why} ({len(cell_index)} genes)")
        return tokens

    def prepare(
        self,
        request: IspRequest,
        gene_shift: bool,
        max_batch: Optional[int] = None,
        hidden_size: Optional[int] = None,
    ) -> IspJob:
        """Tokenize, map targets, plan the perturbations and cut them into encoder chunks."""
        if hidden_size is not None:
            for name, state in (("goal_embedding", request.goal_embedding), ("start_embedding", request.start_embedding)):
                if state is not None and state.size != hidden_size:
                    raise IspInputError(f"{name} has {state.size} values; the encoder's hidden size is {hidden_size}")
        cell = self.tokenize(request)
        specials = {t for t in (self.cls_id, self.eos_id) if t is not None}
        genes = [int(t) for t in cell if int(t) not in specials]
        if len(genes) < 2:
            raise IspInputError(
                f"the cell has {len(genes)} gene(s) of the model's vocabulary; in-silico perturbation needs at least 2"
            )
        index = {t: i for i, t in enumerate(genes)}
        if request.targets is not None and request.target_mode == "set" and len(request.targets) + len(request.anchor_genes) >= len(genes):
            raise IspInputError(
                f"gene set of {len(request.targets) + len(request.anchor_genes)} genes (targets + anchors) is not smaller "
                f"than the cell ({len(genes)} genes): at least one gene must stay unperturbed"
            )
        anchors = self._gene_tokens(request.anchor_genes, "anchor_genes", index, request) if request.anchor_genes else None
        notes: list[str] = []
        if request.targets is not None and request.target_mode == "each":
            kept = []
            for gene, tok in zip(request.targets, self.tokenizer.gene_tokens(list(request.targets))):
                if tok == UNKNOWN:
                    notes.append(f"target {gene} dropped: not in the model's gene vocabulary")
                elif int(tok) not in index:
                    notes.append(f"target {gene} dropped: {self._absent_reason(request, int(tok))}")
                else:
                    kept.append(gene)
            if not kept:
                raise IspInputError(f"no target can be perturbed in this cell ({'; '.join(notes)})")
            request = replace(request, targets=tuple(kept))
        targets = "all" if request.targets is None else self._gene_tokens(request.targets, "targets", index, request)
        count = (len(genes) - (0 if anchors is None else len(anchors))) if request.targets is None else (
            1 if request.target_mode == "set" else len(request.targets))
        if count > self.max_perturbations:
            raise IspInputError(f"request asks for {count} perturbations, more than this model's limit {self.max_perturbations}")
        try:
            plan = plan_perturbations(
                cell, request.perturbation, targets, group=request.target_mode == "set",
                anchor=None if anchors is None or len(anchors) == 0 else anchors,
                rank_shift=request.rank_shift, cls_token_id=self.cls_id, eos_token_id=self.eos_id,
                pad_token_id=self.vocabulary.pad_id,
            )
        except PerturbationError as error:
            raise IspInputError(self._readable(str(error))) from error
        labels = [SET_SEPARATOR.join(self.vocabulary.genes_for_tokens(row)) for row in plan.perturbed_genes]
        lengths = np.concatenate([[len(plan.original_ids)], plan.lengths()])
        limits = [b for b in (self.max_batch, max_batch) if b]
        batch_limit = min(limits) if limits else None
        chunks = chunk_by_token_budget(lengths, self.max_tokens_per_batch, batch_limit)
        return IspJob(
            plan=plan, labels=labels, chunks=chunks, gene_shift=gene_shift,
            goal=request.goal_embedding, start=request.start_embedding, pad_token_id=self.vocabulary.pad_id,
            notes=notes,
        )

    def _absent_reason(self, request: IspRequest, token: int) -> str:
        expressed = set(int(t) for t in self.tokenizer.gene_tokens(list(request.gene_ids[request.counts > 0])))
        if token in expressed:
            return f"expressed but ranked beyond the model input size ({self.tokenizer.max_genes} genes)"
        return "not expressed in the cell"

    def prepare_upstream(self, request: IspRequest, max_batch: Optional[int] = None,
                         hidden_size: Optional[int] = None) -> "UpstreamJob":
        """Tokenize and plan one cell with upstream Geneformer's semantics (:mod:`geneformer_triton.core.isp_upstream`).

        Targets outside the vocabulary are dropped (listed in ``target_errors``); a joint delete of genes
        the cell does not carry skips the cell with the reason (upstream filters such cells out).
        """
        from geneformer_triton.core.isp_upstream import UpstreamPlan, UpstreamPlanError, plan_upstream
        from geneformer_triton.core.isp_upstream_service import UpstreamJob

        if request.state_embeddings is not None and hidden_size is not None and request.state_embeddings.shape[1] != hidden_size:
            raise IspInputError(f"state_embeddings have {request.state_embeddings.shape[1]} values per state; "
                                f"the encoder's hidden size is {hidden_size}")
        cell = self.tokenize(request)
        special = (self.cls_id, self.eos_id) if self.special_tokens else None
        notes: list[str] = []
        genes: object = "all"
        if request.targets is not None and not request.embed_only:
            tokens = self.tokenizer.gene_tokens(list(request.targets))
            known = [int(t) for t, g in zip(tokens, request.targets) if t != UNKNOWN]
            notes += [f"target {g} dropped: not in the model's gene vocabulary" for t, g in zip(tokens, request.targets) if t == UNKNOWN]
            if not known:
                raise IspInputError(f"no target is in the model's gene vocabulary ({', '.join(notes)})")
            genes = known
        anchor = None
        if request.anchor_genes:
            if len(request.anchor_genes) != 1:
                raise IspInputError("upstream semantics take one anchor gene (combos=1); send semantics='ours' for more")
            (anchor_token,) = self.tokenizer.gene_tokens(list(request.anchor_genes))
            if anchor_token == UNKNOWN:
                raise IspInputError(f"anchor_genes[0]={request.anchor_genes[0]!r} is not in the model's gene vocabulary")
            if int(anchor_token) not in set(int(t) for t in cell):
                raise IspInputError(f"anchor_genes[0]={request.anchor_genes[0]!r} is "
                                    f"{self._absent_reason(request, int(anchor_token))}")
            anchor = int(anchor_token)
        if isinstance(genes, list) and request.perturbation == "delete":
            present = set(int(t) for t in cell)
            for gene, token in zip(request.targets, self.tokenizer.gene_tokens(list(request.targets))):
                if token != UNKNOWN and int(token) not in present:
                    raise IspInputError(f"target {gene} is {self._absent_reason(request, int(token))}: a joint delete "
                                        "needs every listed gene in the cell (upstream skips such cells)")
        try:
            if request.embed_only:
                whole = plan_upstream(cell, "delete", "all", max_len=self.model_input_size, special=special)
                plan = UpstreamPlan(whole.cell, "delete", [], whole.special)
            else:
                plan = plan_upstream(cell, request.perturbation, genes, anchor=anchor, max_len=self.model_input_size,
                                     special=special)
        except UpstreamPlanError as error:
            raise IspInputError(str(error)) from error
        if len(plan.perturbations) > self.max_perturbations:
            raise IspInputError(f"request asks for {len(plan.perturbations)} perturbations, more than this model's "
                                f"limit {self.max_perturbations}")
        labels = [SET_SEPARATOR.join(self.vocabulary.genes_for_tokens(np.asarray(p.label))) for p in plan.perturbations]
        limits = [b for b in (self.max_batch, max_batch) if b]
        return UpstreamJob(
            plan=plan, labels=labels, cell_genes=self.vocabulary.genes_for_tokens(cell), emb_mode=request.emb_mode,
            states=request.state_embeddings, max_tokens=self.max_tokens_per_batch,
            max_batch=min(limits) if limits else None, pad_token_id=self.vocabulary.pad_id, notes=notes,
        )

    def _readable(self, message: str) -> str:
        """Replace token ids in a perturbation error by Ensembl ids where they are quoted as ``name[j]=id``."""
        import re

        def swap(match: "re.Match[str]") -> str:
            token = int(match.group(2))
            try:
                return f"{match.group(1)}={self.vocabulary.gene_for_token(token)}"
            except KeyError:
                return match.group(0)

        return re.sub(r"(\w+\[\d+\])=(\d+)", swap, message)


__all__ = [
    "ALL_TARGETS",
    "INPUTS",
    "OUTPUTS",
    "IspEngine",
    "IspInputError",
    "IspJob",
    "IspRequest",
    "TARGET_MODES",
    "batched",
    "one_cell_inputs",
    "parse_request",
    "run_job",
    "unbatched",
    "wants_gene_shift",
]
