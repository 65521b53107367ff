"""Upstream-semantics planner for V2 cells (``<cls>``/``<eos>``), hand-written expectations (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from geneformer_triton.core.isp_upstream import UpstreamPlanError, cell_vector, plan_upstream, score

CLS, EOS = 2, 3
CELL = np.array([CLS, 10, 11, 12, 13, EOS])
SPECIAL = (CLS, EOS)


def test_delete_all_never_touches_cls_or_eos():
    plan = plan_upstream(CELL, "delete", "all", max_len=16, special=SPECIAL)
    assert [p.label for p in plan.perturbations] == [(10,), (11,), (12,), (13,)]
    first = plan.perturbations[0]
    assert first.sequence.tolist() == [CLS, 11, 12, 13, EOS]
    assert first.orig_pos.tolist() == [2, 3, 4] and first.pert_pos.tolist() == [1, 2, 3]  # genes only


def test_overexpress_all_moves_the_gene_right_after_cls():
    plan = plan_upstream(CELL, "overexpress", "all", max_len=16, special=SPECIAL)
    assert [p.label for p in plan.perturbations] == [(11,), (12,), (13,)]  # the first gene is already first
    p = plan.perturbations[-1]
    assert p.sequence.tolist() == [CLS, 13, 10, 11, 12, EOS]
    assert CELL[p.orig_pos].tolist() == p.sequence[p.pert_pos].tolist() == [10, 11, 12]


def test_overexpress_list_truncation_keeps_eos():
    """8-token input: <cls> + 2 inserted genes + the 4 genes that fit + <eos>; the original is cut alike."""
    cell = np.array([CLS, 10, 11, 12, 13, 14, 15, EOS])
    plan = plan_upstream(cell, "overexpress", [98, 99], max_len=8, special=SPECIAL)
    (p,) = plan.perturbations
    assert p.sequence.tolist() == [CLS, 98, 99, 10, 11, 12, 13, EOS]
    assert plan.original(p.original_length).tolist() == [CLS, 10, 11, 12, 13, EOS]
    assert cell[p.orig_pos].tolist() == p.sequence[p.pert_pos].tolist() == [10, 11, 12, 13]


def test_anchor_combination_on_v2():
    plan = plan_upstream(CELL, "delete", "all", anchor=11, max_len=16, special=SPECIAL)
    assert [p.label for p in plan.perturbations] == [(10,), (12,), (13,)]
    assert plan.perturbations[1].sequence.tolist() == [CLS, 10, 13, EOS]


@pytest.mark.parametrize("cell", [[10, 11, 12], [CLS, 10, 11, 12], [CLS, 10, CLS, 11, EOS], [CLS, 10, EOS]])
def test_malformed_v2_cells_are_refused(cell):
    with pytest.raises(UpstreamPlanError):
        plan_upstream(np.array(cell), "delete", "all", max_len=16, special=SPECIAL)


def test_v2_scores_use_cls_and_v1_scores_do_not():
    """The <cls> row alone decides the V2 cell value; V1 averages the gene cosines."""
    rng = np.random.default_rng(0)
    plan = plan_upstream(CELL, "delete", "all", max_len=16, special=SPECIAL)
    p = plan.perturbations[0]
    original = rng.normal(size=(CELL.size, 8))
    perturbed = original[np.r_[0, p.orig_pos, CELL.size - 1]].copy()
    perturbed[0] = -original[0]  # flip <cls> only
    v2 = score(p, original, perturbed, special=True)
    assert v2.cell_emb_shift == pytest.approx(-1.0) and np.allclose(v2.gene_cos, 1.0)
    assert score(p, original, perturbed).cell_emb_shift == pytest.approx(1.0)
    assert np.allclose(cell_vector(original, special=True), original[0])
    assert np.allclose(cell_vector(original), original.mean(axis=0))
