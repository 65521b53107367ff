"""Fidelity metrics, gates and test weights, in process (no server).

- the metrics on constructed inputs whose answers are known by construction;
- the seeded test weights: every parameter non-trivial, deterministic, cells distinguishable by genes;
- ISP: per-gene shifts of the fp32/fp16 ONNX exports agree with the fp32 reference, and scoring with the
  perturbed gene kept (moved to the lowest rank instead of deleted) fails the ISP gate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from geneformer_triton.core.fidelity import (
    GATES,
    MIN_NEIGHBOUR_CELLS,
    compare_variant,
    embedding_fidelity,
    fidelity_metrics,
    gate_for,
    isp_failures,
    isp_shift_agreement,
)


@pytest.fixture(scope="module")
def cells_like() -> np.ndarray:
    """32 'cells' [32, 64]: a large shared component plus a cell-specific part (like real embeddings)."""
    rng = np.random.default_rng(0)
    return 5.0 + rng.standard_normal((32, 64))


def test_identical_embeddings_are_perfect(cells_like):
    stats = embedding_fidelity(cells_like, cells_like)
    assert stats["cosine_min"] == pytest.approx(1.0) and stats["centred_cosine_min"] == pytest.approx(1.0)
    assert stats["max_abs_err"] == 0.0 and stats["rel_err"] == 0.0
    assert stats["nn_identity"] == 1.0 and stats["knn_overlap"] == 1.0
    assert compare_variant("same", "fp32", cells_like, cells_like).passed


def test_swapped_rows_fail_neighbour_identity_but_not_raw_cosine(cells_like):
    swapped = cells_like[np.roll(np.arange(len(cells_like)), 1)]
    stats = embedding_fidelity(swapped, cells_like)
    assert stats["cosine_min"] > 0.9  # raw cosine barely notices another cell's embedding
    assert stats["nn_identity"] == 0.0 and stats["centred_cosine_min"] < 0.5 and stats["rel_err"] > 0.5
    result = compare_variant("swapped", "fp16", swapped, cells_like)
    assert not result.passed and any(f.startswith("nn_identity") for f in result.failures)


def test_constant_offset_is_seen_after_centring(cells_like):
    gaps = np.linalg.norm(cells_like[:, None] - cells_like[None], axis=-1)
    spread = np.median(gaps[np.triu_indices(len(gaps), 1)])  # median distance between different cells
    offset = cells_like + 0.1 * spread / np.sqrt(cells_like.shape[1])  # 10 % of the gap between cells
    stats = embedding_fidelity(offset, cells_like)
    assert stats["cosine_min"] > 0.9999 and stats["nn_identity"] == 1.0
    assert stats["rel_err"] == pytest.approx(0.1, rel=1e-6)
    assert stats["centred_cosine_min"] < 0.999
    assert compare_variant("offset", "fp32", offset, cells_like).failures


def test_knn_overlap_counts_shared_neighbours():
    reference = np.arange(40, dtype=float)[:, None] * np.ones((1, 4))  # points on a line
    stats = embedding_fidelity(reference.copy(), reference)
    assert stats["knn_overlap"] == 1.0
    scrambled = reference.copy()
    scrambled[:, 0] = np.random.default_rng(1).permutation(40) * 10.0
    assert embedding_fidelity(scrambled, reference)["knn_overlap"] < 0.5


def test_knn_overlap_needs_enough_neighbours_to_be_gated(cells_like):
    """Below MIN_KNN_K neighbours (N < 11 cells) one changed neighbour moves the overlap by >= 0.2: not gated;
    from N = 11 on it is computed (and a scrambled variant fails it)."""
    from geneformer_triton.core.fidelity import MIN_KNN_K

    small = cells_like[: 2 * MIN_KNN_K]
    assert math.isnan(embedding_fidelity(small, small)["knn_overlap"])
    enough = cells_like[: 2 * MIN_KNN_K + 1]
    assert embedding_fidelity(enough, enough)["knn_overlap"] == 1.0
    scrambled = enough[np.random.default_rng(3).permutation(len(enough))]
    assert "knn_overlap" in " ".join(compare_variant("scrambled", "int8", scrambled, enough).failures)


def test_few_cells_skip_between_cell_metrics():
    a = np.ones((MIN_NEIGHBOUR_CELLS - 1, 8))
    stats = embedding_fidelity(a, a)
    assert all(math.isnan(stats[k]) for k in ("centred_cosine_min", "rel_err", "nn_identity", "knn_overlap"))
    assert compare_variant("few", "fp32", a, a).passed
    with pytest.raises(ValueError, match="shape mismatch"):
        embedding_fidelity(a[:, :3], a)


def test_gate_table():
    assert gate_for("fp32") is GATES["fp32"] and gate_for("fp32").min_nn_identity == 1.0
    for precision in ("fp16", "bf16", "int8"):
        gate = gate_for(precision)
        assert gate.min_nn_identity >= 0.99 and gate.min_knn_overlap >= 0.95
        assert gate.min_centred_cosine <= GATES["fp32"].min_centred_cosine
    with pytest.raises(ValueError, match="known: fp32"):
        gate_for("fp4")


def test_fidelity_metrics_row(cells_like):
    row = fidelity_metrics(cells_like[::-1], cells_like, "bf16")
    assert row["passed"] is False and "nn_identity" in row["failures"] and row["nn_identity"] == 0.0


def test_isp_shift_agreement():
    shifts = np.linspace(0.0, 1.0, 50) ** 2
    same = isp_shift_agreement(shifts, shifts)
    assert same["spearman"] == pytest.approx(1.0) and same["top_overlap"] == 1.0 and same["max_abs_err"] == 0.0
    assert same["n_genes"] == 50
    flipped = isp_shift_agreement(shifts[::-1], shifts)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["top_overlap"] == 0.0
    assert isp_failures(flipped, "fp16") and not isp_failures(isp_shift_agreement(shifts, shifts), "fp32")
    with_nan = shifts.copy()
    with_nan[3] = np.nan
    assert isp_shift_agreement(with_nan, shifts)["n_genes"] == 49


# ------------------------------------------------------------------------------- test weights
def test_test_weights_are_non_trivial_and_seeded(loaded_model, v1_vocabulary):
    from geneformer_triton.model.loading import random_geneformer

    params = dict(loaded_model.model.named_parameters())
    for name, value in params.items():
        value = value.detach()
        assert value.abs().max() > 0, name
        if "LayerNorm" in name and name.endswith("weight"):
            assert (value - 1).abs().mean() > 0.1 and value.min() > 0.4, name
        elif name.endswith("bias"):
            assert value.std() > 0.02, name
    pad = loaded_model.model.bert.embeddings.word_embeddings.weight[v1_vocabulary.pad_id]
    assert pad.abs().max() > 0
    again = random_geneformer("gf-6L-10M-i2048", seed=0, vocabulary=v1_vocabulary)
    assert again.weights_sha256 == loaded_model.weights_sha256
    assert random_geneformer("gf-6L-10M-i2048", seed=1, vocabulary=v1_vocabulary).weights_sha256 != again.weights_sha256


def test_cells_are_distinguishable_by_their_genes(reference_encoder, celltypist_tokens):
    """Different cells are far apart (HF's default init gave cosine 0.998-0.9998) and embedding similarity
    follows gene overlap (Jaccard of token sets), not length."""
    from geneformer_triton.model.runtimes import embed_token_cells

    embeddings = embed_token_cells(reference_encoder, celltypist_tokens, batch_size=8)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    upper = np.triu_indices(len(unit), 1)
    cosine = (unit @ unit.T)[upper]
    assert cosine.max() < 0.9990 and np.median(cosine) < 0.995
    sets = [set(t.tolist()) for t in celltypist_tokens]
    jaccard = np.array([[len(a & b) / len(a | b) for b in sets] for a in sets])[upper]
    lengths = np.array([len(t) for t in celltypist_tokens], dtype=float)
    length_gap = -np.abs(lengths[:, None] - lengths[None, :])[upper]
    by_genes, by_length = spearmanr(cosine, jaccard).correlation, spearmanr(cosine, length_gap).correlation
    assert by_genes > 0.6 and by_genes > by_length + 0.4, (by_genes, by_length)


# ------------------------------------------------------------------------------- ISP agreement
ISP_GENES = 48


@pytest.fixture(scope="module")
def isp_cell(celltypist_tokens) -> np.ndarray:
    """The first ISP_GENES genes of a real cell (rank order kept)."""
    return celltypist_tokens[0][:ISP_GENES]


def _delete_shifts(encode, cell, perturb_type="delete", rank_shift=None) -> np.ndarray:
    """Per-gene shift of deleting each gene in turn: 1 - cos(original cell, perturbed cell)."""
    from geneformer_triton.core.perturbation import run_perturbation

    return 1.0 - run_perturbation(encode, cell, perturb_type, "all", rank_shift=rank_shift).cell_shift


@pytest.fixture(scope="module")
def isp_reference(reference_encoder, isp_cell) -> np.ndarray:
    return _delete_shifts(reference_encoder, isp_cell)


@pytest.mark.parametrize("model, precision", [("geneformer_onnx", "fp32"), ("geneformer_onnx_fp16", "fp16")])
def test_exported_isp_shifts_match_reference(exported_repository, isp_cell, isp_reference, model, precision):
    from geneformer_triton.model.runtimes import onnx_encode_fn

    shifts = _delete_shifts(onnx_encode_fn(exported_repository / model / "1" / "model.onnx"), isp_cell)
    agreement = isp_shift_agreement(shifts, isp_reference)
    assert not isp_failures(agreement, precision), agreement


def test_isp_with_perturbed_gene_kept_fails(reference_encoder, isp_cell, isp_reference):
    """Negative control: the 'deleted' gene kept in the sequence (moved to the lowest rank)."""
    kept = _delete_shifts(reference_encoder, isp_cell, "inhibit", rank_shift=ISP_GENES)
    agreement = isp_shift_agreement(kept, isp_reference)
    assert isp_failures(agreement, "fp32") and isp_failures(agreement, "fp16"), agreement
