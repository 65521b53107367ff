"""Geneformer ``InSilicoPerturber`` semantics (V1 and V2 models) as a numpy planner and score reducer.

This module reproduces upstream's per-perturbation numbers (Geneformer commit 05fcbeb,
``in_silico_perturber.py`` / ``perturber_utils.py``; re-derived from their behaviour, verified against the
unmodified code by ``tests/test_isp_oracle.py``) and corrects upstream where it is wrong (docs/isp.md,
"Where upstream is wrong"). Pure numpy, no torch, so the Triton python model imports it cheaply.

Cell: 1-D token ids in rank-value order, unpadded, at most ``max_len`` tokens, no repeats. V1 models: genes
only. V2 models (``special=(cls, eos)``): ``[<cls>, genes..., <eos>]``; upstream then runs its ``*_special``
code paths (``emb_mode`` ``cls`` / ``cls_and_gene``), and so does this module:
    * the perturbations below act on the genes only: ``<cls>`` stays first, ``<eos>`` last (overexpressed
      genes go right after ``<cls>``; truncation to ``max_len`` keeps ``<eos>`` and drops the last genes);
    * the gene cosines compare genes only (``<cls>``/``<eos>`` excluded), at the same positions as V1 + 1;
    * upstream's per-perturbation value is cos(``<cls>`` of the perturbed, ``<cls>`` of the original) and,
      with states, cos(``<cls>`` perturbed, S) - cos(``<cls>`` original, S) (no mean over tokens);
    * a state's cell vector is the cell's ``<cls>`` embedding (upstream ``get_state_embs`` with
      ``emb_mode="cls"``); our ``cell_shift`` means over the genes only (``<cls>``/``<eos>`` excluded, as
      upstream's ``EmbExtractor`` ``emb_mode="cell"`` does for V2).

Perturbations (``genes`` = "all" or a list of token ids, ``anchor`` = one token id or None)
    * delete all: one perturbation per gene (the gene removed); with an anchor, one per gene other than
      the anchor (both removed; upstream's ``combos=1`` + ``anchor_gene``).
    * overexpress all: one per gene at position >= 1 (upstream skips position 0: it is already first),
      the gene moved to the front; with an anchor, one per gene other than the anchor, both moved to the
      front in their rank order (upstream crashes here; this is our definition).
    * a list, jointly (upstream ``perturb_group``): delete removes every listed gene (a cell must carry
      all of them, else it is skipped, as upstream filters it out); overexpress deletes the listed genes
      the cell expresses, inserts all listed genes at the front in list order and truncates to ``max_len``;
      the original is then the longest prefix of the cell whose non-listed genes fit in the perturbed
      cell (``max_len - len(list)`` of them), re-embedded at that length; nothing is removed from it.
      (Upstream computes that prefix from the already-truncated perturbed length, counting the overflow
      twice: a 2,047-token cell plus one absent gene crashes there.)

Scores (from token embeddings at the chosen layer; float64; one perturbation)
    * gene cosines: cos(original[orig_pos[k]], perturbed[pert_pos[k]]) for every compared gene ``k``
      (the unperturbed genes, in original rank order; ``affected`` token ids = original[orig_pos]);
    * ``cell_emb_shift`` (upstream's ``(perturbed, "cell_emb")`` value without cell states): the mean
      of the gene cosines;
    * with state embeddings ``S_s`` [H]: ``state_shift[s]`` = cos(mean perturbed, S_s) - cos(mean
      original, S_s), means over every token of each sequence (upstream's value with states);
    * ``cell_shift`` (ours, not upstream's): cos(mean original, mean perturbed), the same means.
(V1; V2 as listed above.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

PERTURB_TYPES = ("delete", "overexpress")

Genes = Union[str, Sequence[int], np.ndarray]


class UpstreamPlanError(ValueError):
    """The cell cannot be perturbed as asked; the message says why (the cell is skipped)."""


@dataclass(frozen=True)
class Perturbation:
    """One perturbed sequence and how it lines up with its original.

    ``label``: token ids the perturbation is reported under (the gene for "all", the list otherwise);
    ``original_length``: tokens of the original it is compared with (:meth:`UpstreamPlan.original`);
    ``orig_pos`` / ``pert_pos`` [K] int64: compared positions in the original / perturbed sequence.
    """

    label: tuple[int, ...]
    sequence: np.ndarray
    original_length: int
    orig_pos: np.ndarray
    pert_pos: np.ndarray


@dataclass(frozen=True)
class UpstreamPlan:
    """Every perturbation of one cell (``perturbations``) plus the original prefix lengths they need.

    ``special``: ``(cls, eos)`` token ids for V2 cells, None for V1.
    """

    cell: np.ndarray
    perturb_type: str
    perturbations: list[Perturbation]
    special: Optional[tuple[int, int]] = None

    def original(self, length: int) -> np.ndarray:
        """The original sequence of ``length`` tokens: the cell's first ``length`` tokens (V1), or its
        ``<cls>`` and first ``length - 2`` genes followed by ``<eos>`` (V2)."""
        if self.special is None:
            return self.cell[:length]
        return np.concatenate([self.cell[: length - 1], self.cell[-1:]])

    @property
    def original_lengths(self) -> list[int]:
        """Distinct original prefix lengths to embed (longest first; the whole cell always)."""
        return sorted({self.cell.size} | {p.original_length for p in self.perturbations}, reverse=True)


def _cell(input_ids: object, max_len: int, special: Optional[tuple[int, int]] = None) -> np.ndarray:
    cell = np.asarray(input_ids)
    if cell.ndim != 1 or cell.dtype.kind not in "iu":
        raise UpstreamPlanError(f"a cell must be a 1-D array of integer token ids, got {cell.dtype} {cell.shape}")
    cell = cell.astype(np.int64)
    if special is not None:
        cls, eos = special
        if cell.size < 2 or cell[0] != cls or cell[-1] != eos:
            raise UpstreamPlanError(f"a V2 cell must start with <cls> (token {cls}) and end with <eos> (token {eos})")
        if cls in cell[1:-1] or eos in cell[1:-1]:
            raise UpstreamPlanError("a V2 cell holds <cls>/<eos> only at its ends")
        if cell.size > max_len:
            raise UpstreamPlanError(f"the cell has {cell.size} tokens, more than the model input size {max_len}")
        return _cell(cell[1:-1], max_len - 2)
    if cell.size < 2:
        raise UpstreamPlanError(f"the cell has {cell.size} gene token(s); perturbation needs at least 2")
    if cell.size > max_len:
        raise UpstreamPlanError(f"the cell has {cell.size} tokens, more than the model input size {max_len}")
    if np.unique(cell).size != cell.size:
        raise UpstreamPlanError("the cell lists a gene token twice")
    return cell


def _delete(cell: np.ndarray, positions: np.ndarray, label: tuple[int, ...]) -> Perturbation:
    kept = np.delete(np.arange(cell.size), positions)
    return Perturbation(label, cell[kept], cell.size, kept, np.arange(kept.size))


def _to_front(cell: np.ndarray, positions: np.ndarray, label: tuple[int, ...]) -> Perturbation:
    positions = np.sort(positions)
    kept = np.delete(np.arange(cell.size), positions)
    seq = np.concatenate([cell[positions], cell[kept]])
    return Perturbation(label, seq, cell.size, kept, np.arange(positions.size, cell.size))


def _plan_all(cell: np.ndarray, perturb_type: str, anchor: Optional[int]) -> list[Perturbation]:
    index = {int(t): i for i, t in enumerate(cell)}
    if anchor is None:
        start = 1 if perturb_type == "overexpress" else 0
        sets = [(i, np.array([i])) for i in range(start, cell.size)]
    else:
        if anchor not in index:
            raise UpstreamPlanError(f"the cell does not express the anchor gene (token {anchor})")
        a = index[anchor]
        if cell.size < 3:
            raise UpstreamPlanError("a cell needs at least 3 genes for an anchor combination")
        sets = [(i, np.array([a, i])) for i in range(cell.size) if i != a]
    build = _delete if perturb_type == "delete" else _to_front
    return [build(cell, pos, (int(cell[i]),)) for i, pos in sets]


def _plan_list(cell: np.ndarray, perturb_type: str, genes: np.ndarray, max_len: int) -> list[Perturbation]:
    index = {int(t): i for i, t in enumerate(cell)}
    label = tuple(int(g) for g in genes)
    present = np.array([index[g] for g in label if g in index], dtype=np.int64)
    if perturb_type == "delete":
        missing = [g for g in label if g not in index]
        if missing:
            raise UpstreamPlanError(f"the cell does not carry every gene to delete (missing tokens {missing})")
        if present.size >= cell.size:
            raise UpstreamPlanError("deleting every gene of the cell leaves nothing to compare")
        return [_delete(cell, present, label)]
    if len(label) >= max_len:
        raise UpstreamPlanError(f"overexpressing {len(label)} genes leaves no room in a {max_len}-token input")
    rest = np.delete(np.arange(cell.size), present)
    room = max_len - len(label)
    compared = rest[:room]
    if compared.size == 0:
        raise UpstreamPlanError("the cell has no gene besides the overexpressed ones")
    original_length = int(compared[-1]) + 1 if compared.size < rest.size else cell.size
    seq = np.concatenate([np.asarray(label, dtype=np.int64), cell[compared]])
    return [Perturbation(label, seq, original_length, compared, np.arange(len(label), seq.size))]


def _with_special(p: Perturbation, cls: int, eos: int) -> Perturbation:
    """A genes-only perturbation wrapped as ``[<cls>, ..., <eos>]`` (positions shift by one)."""
    seq = np.concatenate([[cls], p.sequence, [eos]]).astype(np.int64)
    return Perturbation(p.label, seq, p.original_length + 2, p.orig_pos + 1, p.pert_pos + 1)


def plan_upstream(input_ids: object, perturb_type: str, genes: Genes = "all", *, anchor: Optional[int] = None,
                  max_len: int = 2048, special: Optional[tuple[int, int]] = None) -> UpstreamPlan:
    """Plan one cell's perturbations with upstream's semantics (see the module docstring).

    ``special``: ``(cls, eos)`` token ids for V2 models (the cell starts with ``<cls>``, ends with ``<eos>``).
    """
    if perturb_type not in PERTURB_TYPES:
        raise UpstreamPlanError(f"upstream semantics know {', '.join(PERTURB_TYPES)}, not {perturb_type!r}")
    if special is not None:
        cls, eos = (int(t) for t in special)
        body = plan_upstream(_cell(input_ids, max_len, (cls, eos)), perturb_type, genes, anchor=anchor,
                             max_len=max_len - 2)
        return UpstreamPlan(np.concatenate([[cls], body.cell, [eos]]).astype(np.int64), perturb_type,
                            [_with_special(p, cls, eos) for p in body.perturbations], (cls, eos))
    cell = _cell(input_ids, max_len)
    if isinstance(genes, str):
        if genes != "all":
            raise UpstreamPlanError(f"genes must be 'all' or a list of token ids, got {genes!r}")
        perturbations = _plan_all(cell, perturb_type, None if anchor is None else int(anchor))
    else:
        if anchor is not None:
            raise UpstreamPlanError("an anchor gene combines with 'all'; a list is already perturbed jointly "
                                    "(add the anchor to the list)")
        arr = np.asarray(genes, dtype=np.int64).reshape(-1)
        if arr.size == 0 or np.unique(arr).size != arr.size:
            raise UpstreamPlanError(f"the gene list must be non-empty without repeats, got {arr.tolist()}")
        perturbations = _plan_list(cell, perturb_type, arr, max_len)
    return UpstreamPlan(cell, perturb_type, perturbations)


# ----------------------------------------------------------------------------- scores


def _cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), eps)
    return np.sum(a * b, axis=-1) / den


@dataclass(frozen=True)
class Scores:
    """Scores of one perturbation: ``gene_cos`` [K] (compared genes), ``cell_emb_shift``, ``cell_shift``
    (ours) and ``state_shift`` [S] (empty without states)."""

    gene_cos: np.ndarray
    cell_emb_shift: float
    cell_shift: float
    state_shift: np.ndarray


def cell_vector(tokens: np.ndarray, special: bool = False) -> np.ndarray:
    """A sequence's vector [H] float64 as upstream's ISP compares it with states: the mean over every token
    (V1) or the ``<cls>`` token's embedding (V2, ``special``); ``tokens`` [L, H], padding removed."""
    arr = np.asarray(tokens, dtype=np.float64)
    return arr[0] if special else arr.mean(axis=0)


def _gene_mean(tokens: np.ndarray, special: bool) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.float64)
    return (arr[1:-1] if special else arr).mean(axis=0)


def score(perturbation: Perturbation, original_tokens: np.ndarray, perturbed_tokens: np.ndarray,
          states: Optional[np.ndarray] = None, special: bool = False) -> Scores:
    """Reduce one perturbation's token embeddings.

    ``original_tokens`` [original_length, H] (the original embedded alone), ``perturbed_tokens``
    [len(sequence), H] (padding rows removed), ``states`` [S, H] or None, ``special``: V2 cells
    (``<cls>``/``<eos>`` at the ends; see the module docstring).
    """
    gene_cos = _cos(original_tokens[perturbation.orig_pos], perturbed_tokens[perturbation.pert_pos])
    vec_o = cell_vector(original_tokens, special)
    vec_p = cell_vector(perturbed_tokens, special)
    upstream = float(_cos(vec_o, vec_p)) if special else float(gene_cos.mean())
    shifts = np.zeros(0) if states is None else _cos(vec_p[None, :], states) - _cos(vec_o[None, :], states)
    ours = float(_cos(_gene_mean(original_tokens, special), _gene_mean(perturbed_tokens, special)))
    return Scores(gene_cos, upstream, ours, shifts)


def state_embedding(cell_means: np.ndarray) -> np.ndarray:
    """A state's embedding from its cells' :func:`cell_vector` [N, H] (upstream ``get_state_embs``: the mean
    over cells of each cell's mean over all its tokens (V1) or of its ``<cls>`` embedding (V2))."""
    arr = np.asarray(cell_means, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise UpstreamPlanError(f"a state needs at least one cell embedding, got shape {arr.shape}")
    return arr.mean(axis=0)


def layer_index(num_hidden_layers: int, emb_layer: int) -> int:
    """``hidden_states`` index upstream's ISP quantifies: ``num_hidden_layers + emb_layer``.

    ``-1`` is the second-to-last hidden state (upstream's default), ``0`` the last layer's output;
    valid values are ``-num_hidden_layers`` (the embedding output) ... 0.
    """
    if not -num_hidden_layers <= emb_layer <= 0:
        raise UpstreamPlanError(f"emb_layer={emb_layer} is outside [-{num_hidden_layers}, 0] (upstream's ISP "
                                f"convention: 0 = last layer, -1 = second-to-last)")
    return num_hidden_layers + emb_layer


__all__ = [
    "PERTURB_TYPES", "Perturbation", "Scores", "UpstreamPlan", "UpstreamPlanError",
    "cell_vector", "layer_index", "plan_upstream", "score", "state_embedding",
]
