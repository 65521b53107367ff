"""Server side of ISP with upstream Geneformer's semantics (``semantics="upstream"``, the default).

Two ways to feed a job: the packed, reduced protocol the served model and the benchmark use
(``rows()`` / ``accumulate_row(r, token_mean, gene_cos)``, driven by
:class:`geneformer_triton.core.perturbation.PackedRun` together with other cells' jobs; scores by
:func:`score_reduced`), and the chunk life cycle of :class:`geneformer_triton.core.isp_service.IspJob`
(``chunks``, ``batch(k)``, ``accumulate(k, cell, tokens)``; scores from ``token_embeddings`` by
:mod:`geneformer_triton.core.isp_upstream`; the first ``leading_chunks`` chunks hold only originals and must be
accumulated before the others). Sequences are [originals..., perturbed...]; ``outputs()`` serves both.

Extra request inputs (``isp_service.INPUTS``): ``emb_layer`` INT32 [1] (upstream's ISP convention:
``hidden_states[n_layers + emb_layer]``), ``emb_mode`` BYTES [1] (``cell`` | ``cell_and_gene``),
``state_embeddings`` FP32 [S, H], ``embed_only`` BOOL [1] (no perturbation: only ``original_embedding``,
used to build state embeddings as upstream's ``get_state_embs``).
Outputs: ``perturbed_genes`` BYTES [P], ``cell_emb_shift`` FP32 [P] (upstream's ``cell_emb`` value
without states), ``cell_shift`` FP32 [P] (ours: cosine of the mean-pooled sequences), ``state_shift``
FP32 [P, S] (with states), ``original_embedding`` FP32 [H] (the cell's vector: mean over all its tokens for V1, its ``<cls>`` for V2),
``cell_genes`` BYTES [n] (the cell's tokens, rank order; V2: with ``<cls>``/``<eos>``), and for ``cell_and_gene``: ``gene_perturbation``
INT32 [N], ``gene_affected`` INT32 [N] (index into ``cell_genes``), ``gene_cos`` FP32 [N].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from geneformer_triton.core.isp_upstream import Perturbation, Scores, UpstreamPlan, cell_vector, score
from geneformer_triton.core.perturbation import EncoderRow, chunk_by_token_budget, cosine
from geneformer_triton.core.tokenizer import pad_token_batch

EMB_MODES = ("cell", "cell_and_gene")


@dataclass
class UpstreamJob:
    """One cell's upstream-semantics perturbations, chunked for the encoder (see the module docstring)."""

    plan: UpstreamPlan
    labels: list[str]
    cell_genes: list[str]
    emb_mode: str
    states: Optional[np.ndarray]
    max_tokens: int
    max_batch: Optional[int]
    pad_token_id: int = 0
    notes: list = field(default_factory=list)  # targets dropped for this cell, with the reason
    gene_shift: bool = field(default=True, init=False)  # token embeddings are always needed
    chunks: list[tuple[int, int]] = field(init=False)
    leading_chunks: int = field(init=False)
    _originals: dict = field(default_factory=dict, init=False, repr=False)
    _means: dict = field(default_factory=dict, init=False, repr=False)  # original length -> mean over its tokens [H]
    _rows: Optional[list] = field(default=None, init=False, repr=False)
    _scores: dict = field(default_factory=dict, init=False, repr=False)
    _genes: list = field(default_factory=list, init=False, repr=False)
    done: set = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._lengths = self.plan.original_lengths
        orig = chunk_by_token_budget(self._lengths, self.max_tokens, self.max_batch)
        pert = chunk_by_token_budget([p.sequence.size for p in self.plan.perturbations], self.max_tokens, self.max_batch)
        offset = len(self._lengths)
        self.chunks = orig + [(a + offset, b + offset) for a, b in pert]
        self.leading_chunks = len(orig)

    @property
    def num_perturbations(self) -> int:
        return len(self.plan.perturbations)

    def _sequence(self, i: int) -> np.ndarray:
        n = len(self._lengths)
        return self.plan.original(self._lengths[i]) if i < n else self.plan.perturbations[i - n].sequence

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``input_ids`` / ``attention_mask`` [b, L] int64 of chunk ``k``."""
        start, stop = self.chunks[k]
        return pad_token_batch([self._sequence(i) for i in range(start, stop)], self.pad_token_id)

    def accumulate(self, k: int, cell_embedding: np.ndarray, token_embeddings: Optional[np.ndarray]) -> None:
        """Reduce chunk ``k``'s token embeddings [b, L, H] (``cell_embedding`` is not used)."""
        start, stop = self.chunks[k]
        if token_embeddings is None:
            raise RuntimeError("upstream semantics need token_embeddings from the encoder")
        tokens = np.asarray(token_embeddings, dtype=np.float32)
        if tokens.ndim != 3 or tokens.shape[0] != stop - start:
            raise RuntimeError(f"encoder returned token_embeddings {list(tokens.shape)} for a chunk of {stop - start} sequences")
        n = len(self._lengths)
        if k >= self.leading_chunks and len(self._originals) < n:
            raise RuntimeError("the chunks with the original cell must be accumulated first")
        for row, i in enumerate(range(start, stop)):
            seq_len = self._sequence(i).size
            emb = tokens[row, :seq_len]
            if i < n:
                self._originals[self._lengths[i]] = emb
                self._means[self._lengths[i]] = cell_vector(emb, self.special)
                continue
            j = i - n
            pert = self.plan.perturbations[j]
            self._record(j, score(pert, self._originals[pert.original_length], emb, self.states, self.special))
        self.done.add(k)

    def _record(self, j: int, result: Scores) -> None:
        self._scores[j] = result
        if self.emb_mode == "cell_and_gene":
            pert = self.plan.perturbations[j]
            self._genes.append((j, pert.orig_pos.astype(np.int32), result.gene_cos.astype(np.float32)))

    @property
    def special(self) -> bool:
        """V2 cells (``<cls>`` first, ``<eos>`` last): scored on the ``<cls>`` vector, so by the token protocol."""
        return self.plan.special is not None

    @property
    def packable(self) -> bool:
        """True when the reduced, packed protocol (:meth:`rows`) can score this job: V1 cells (the reduced
        rows carry the mean over all tokens, not the ``<cls>`` vector V2 cells are scored on)."""
        return not self.special

    # ------------------------------------------------------------------ reduced, packed protocol (perturbation.run_packed)
    def rows(self) -> list[EncoderRow]:
        """Originals (longest first), then every perturbation aligned with its original (cached)."""
        if self._rows is None:
            originals = {length: i for i, length in enumerate(self._lengths)}
            self._rows = [EncoderRow(self.plan.cell[:length]) for length in self._lengths]
            for pert in self.plan.perturbations:
                position_map = np.full(pert.sequence.size, -1, dtype=np.int64)
                position_map[pert.pert_pos] = pert.orig_pos
                self._rows.append(EncoderRow(pert.sequence, originals[pert.original_length], position_map))
        return self._rows

    def accumulate_row(self, r: int, token_mean: np.ndarray, gene_cos: np.ndarray) -> None:
        """Row ``r`` of :meth:`rows`: its mean over tokens [H] and per-position cosines with its original [L]."""
        if not self.packable:
            raise RuntimeError("V2 cells are scored on the <cls> vector: run them by the token protocol (chunks)")
        n = len(self._lengths)
        if r < n:
            self._means.setdefault(self._lengths[r], np.asarray(token_mean, dtype=np.float64))
            return
        j = r - n
        if j in self._scores:  # a row is encoded once; its original may be re-encoded per batch
            return
        pert = self.plan.perturbations[j]
        self._record(j, score_reduced(pert, self._means[pert.original_length], token_mean, gene_cos, self.states))

    def outputs(self) -> dict[str, np.ndarray]:
        """Response tensors (see the module docstring)."""
        missing = sorted(set(range(self.num_perturbations)) - set(self._scores))
        if missing or self.plan.cell.size not in self._means:
            raise RuntimeError(f"{len(missing)} perturbations (first: {missing[:3]}) or the original cell were not encoded")
        order = range(self.num_perturbations)
        out: dict[str, np.ndarray] = {
            "perturbed_genes": np.array([s.encode() for s in self.labels], dtype=object),
            "cell_emb_shift": np.array([self._scores[j].cell_emb_shift for j in order], dtype=np.float32),
            "cell_shift": np.array([self._scores[j].cell_shift for j in order], dtype=np.float32),
            "original_embedding": self._means[self.plan.cell.size].astype(np.float32),
            "cell_genes": np.array([g.encode() for g in self.cell_genes], dtype=object),
            "target_errors": np.array([n.encode() for n in self.notes], dtype=object),
        }
        if self.states is not None:
            out["state_shift"] = np.array([self._scores[j].state_shift for j in order], dtype=np.float32).reshape(
                self.num_perturbations, self.states.shape[0])
        if self.emb_mode == "cell_and_gene":
            parts = sorted(self._genes, key=lambda item: item[0])
            out["gene_perturbation"] = np.concatenate([np.full(p.size, j, np.int32) for j, p, _ in parts] or [np.zeros(0, np.int32)])
            out["gene_affected"] = np.concatenate([p for _, p, _ in parts] or [np.zeros(0, np.int32)])
            out["gene_cos"] = np.concatenate([c for _, _, c in parts] or [np.zeros(0, np.float32)])
        return out


def score_reduced(perturbation: Perturbation, original_mean: np.ndarray, perturbed_mean: np.ndarray,
                  gene_cos: np.ndarray, states: Optional[np.ndarray] = None) -> Scores:
    """:func:`geneformer_triton.core.isp_upstream.score` from reduced encoder outputs: the means over all tokens
    of the original / perturbed sequence [H] and the perturbed row's cosines with its original [L]."""
    cos = np.asarray(gene_cos, dtype=np.float64)[perturbation.pert_pos]
    mean_o = np.asarray(original_mean, dtype=np.float64)
    mean_p = np.asarray(perturbed_mean, dtype=np.float64)
    shifts = np.zeros(0) if states is None else cosine(mean_p[None, :], states) - cosine(mean_o[None, :], states)
    return Scores(cos, float(cos.mean()), float(cosine(mean_o, mean_p)), shifts)


__all__ = ["EMB_MODES", "UpstreamJob", "score_reduced"]
