"""In-silico perturbation: token orders, scores against a brute-force reference, batching, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from geneformer_triton.core.perturbation import (
    PerturbationError,
    chunk_by_token_budget,
    perturb_sequence,
    plan_perturbations,
    resolve_rank_shift,
    run_perturbation,
)
from geneformer_triton.core.tokenizer import pad_token_batch
from geneformer_triton.model.encoder import GeneformerEncoder
from geneformer_triton.model.runtimes import torch_encode_fn

CLS, EOS = 2, 3
V1 = [5, 6, 7, 8]
V2 = [CLS, 5, 6, 7, 8, EOS]
HIDDEN = 32


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=48, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, hidden_act="relu", pad_token_id=0, initializer_range=0.5,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def enc_v1(bert) -> GeneformerEncoder:
    return GeneformerEncoder(bert).eval()


@pytest.fixture(scope="module")
def enc_v2(bert) -> GeneformerEncoder:
    return GeneformerEncoder(bert, excluded_token_ids=(CLS, EOS)).eval()


def seqs(plan) -> list[list[int]]:
    return [plan.sequence(i).tolist() for i in range(plan.num_perturbations)]


# ----------------------------------------------------------------------------- token orders


def test_delete_all_v1_and_v2():
    assert seqs(plan_perturbations(V1, "delete")) == [[6, 7, 8], [5, 7, 8], [5, 6, 8], [5, 6, 7]]
    plan = plan_perturbations(V2, "delete", cls_token_id=CLS, eos_token_id=EOS)
    assert seqs(plan) == [[2, 6, 7, 8, 3], [2, 5, 7, 8, 3], [2, 5, 6, 8, 3], [2, 5, 6, 7, 3]]
    assert plan.perturbed_genes.tolist() == [[5], [6], [7], [8]]
    assert plan.lengths().tolist() == [5, 5, 5, 5]


def test_overexpress_list_and_group():
    assert seqs(plan_perturbations(V1, "overexpress", [7, 5])) == [[7, 5, 6, 8], [5, 6, 7, 8]]
    assert seqs(plan_perturbations(V2, "overexpress", [7], cls_token_id=CLS, eos_token_id=EOS)) == [[2, 7, 5, 6, 8, 3]]
    group = plan_perturbations(V1, "overexpress", [8, 6], group=True)
    assert seqs(group) == [[8, 6, 5, 7]]
    assert group.perturbed_genes.tolist() == [[8, 6]]
    assert perturb_sequence(V2, [8, 6], "overexpress", cls_token_id=CLS, eos_token_id=EOS).tolist() == [2, 8, 6, 5, 7, 3]
    assert perturb_sequence(V1, [6, 8], "delete").tolist() == [5, 7]


def test_inhibit_activate_single_gene():
    inhibit = lambda shift, cell=V1, **kw: perturb_sequence(cell, 6, "inhibit", rank_shift=shift, **kw).tolist()  # noqa: E731
    assert inhibit(1) == [5, 7, 6, 8]
    assert inhibit(2) == [5, 7, 8, 6]
    assert inhibit(5) == [5, 7, 8, 6]  # clipped to the last gene
    assert inhibit(0.25) == [5, 7, 6, 8]  # 0.25 * 4 genes = 1 position
    assert inhibit(3, V2, cls_token_id=CLS, eos_token_id=EOS) == [2, 5, 7, 8, 6, 3]  # <eos> stays last
    activate = lambda g, shift, cell=V1, **kw: perturb_sequence(cell, g, "activate", rank_shift=shift, **kw).tolist()  # noqa: E731
    assert activate(7, 1) == [5, 7, 6, 8]
    assert activate(7, 0.5) == [7, 5, 6, 8]  # 0.5 * 4 = 2 positions
    assert activate(8, 10, V2, cls_token_id=CLS, eos_token_id=EOS) == [2, 8, 5, 6, 7, 3]  # <cls> stays first
    assert activate(5, 1) == V1  # already first: no-op
    assert resolve_rank_shift("inhibit", 0.1, 4) == 1  # never below one position
    assert resolve_rank_shift("inhibit", 0.3, 10) == 3


def test_inhibit_activate_all_and_groups():
    assert seqs(plan_perturbations(V1, "inhibit", rank_shift=1)) == [
        [6, 5, 7, 8], [5, 7, 6, 8], [5, 6, 8, 7], [5, 6, 7, 8],
    ]
    assert seqs(plan_perturbations(V1, "activate", rank_shift=2)) == [
        [5, 6, 7, 8], [6, 5, 7, 8], [7, 5, 6, 8], [5, 8, 6, 7],
    ]
    # set keys: p + k + 0.5 / p - k - 0.5 for the set, p for the others, stable sort
    assert perturb_sequence(V1, [5, 6], "inhibit", rank_shift=1).tolist() == [5, 7, 6, 8]
    assert perturb_sequence(V1, [7, 8], "activate", rank_shift=2).tolist() == [7, 5, 8, 6]


def test_anchor_combos():
    plan = plan_perturbations(V1, "delete", anchor=8)
    assert plan.perturbed_genes.tolist() == [[8, 5], [8, 6], [8, 7]]
    assert seqs(plan) == [[6, 7], [5, 7], [5, 6]]
    assert seqs(plan_perturbations(V1, "overexpress", [6], anchor=8)) == [[8, 6, 5, 7]]
    plan = plan_perturbations(V2, "overexpress", [5, 7], anchor=[8], cls_token_id=CLS, eos_token_id=EOS)
    assert seqs(plan) == [[2, 8, 5, 6, 7, 3], [2, 8, 7, 5, 6, 3]]
    assert seqs(plan_perturbations(V1, "delete", [5], group=True, anchor=7)) == [[6, 8]]


def test_alignment_matches_token_ids():
    rng = np.random.default_rng(1)
    cell = rng.permutation(np.arange(4, 30))[:15]
    for ptype, shift in (("delete", None), ("overexpress", None), ("inhibit", 4), ("activate", 0.3)):
        plan = plan_perturbations(cell, ptype, rank_shift=shift, anchor=int(cell[3]))
        for i in range(plan.num_perturbations):
            seq, opos, ppos = plan.build(i)
            assert sorted(seq.tolist()) == sorted(cell.tolist()) or ptype == "delete"
            np.testing.assert_array_equal(cell[opos], seq[ppos])
            assert not set(plan.perturbed_genes[i].tolist()) & set(cell[opos].tolist())
            assert len(opos) == len(cell) - 2


# ----------------------------------------------------------------------------- scores vs brute force


def _np_cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _encode_alone(enc, seq):
    with torch.no_grad():
        ids = torch.tensor([list(seq)], dtype=torch.long)
        cell, tokens = enc(ids, torch.ones_like(ids))
    return cell[0].numpy(), tokens[0].numpy()


def _ref_sequence(cell, pset, ptype, k, specials):
    """Independent list manipulation of one perturbation (single gene for inhibit/activate)."""
    pre = [t for t in cell[:1] if t in specials]
    post = [t for t in cell[-1:] if t in specials]
    genes = [t for t in cell if t not in specials]
    others = [g for g in genes if g not in pset]
    if ptype == "delete":
        return pre + others + post
    if ptype == "overexpress":
        return pre + list(pset) + others + post
    (gene,) = pset
    p = genes.index(gene)
    genes.remove(gene)
    new = min(p + k, len(genes)) if ptype == "inhibit" else max(p - k, 0)
    genes.insert(new, gene)
    return pre + genes + post


def _brute_force(enc, cell, sets, ptype, k, specials, goal=None, start=None):
    oc, ot = _encode_alone(enc, cell)
    keep = [i for i, t in enumerate(cell) if t not in specials]
    np.testing.assert_allclose(oc, ot[keep].mean(axis=0), atol=1e-5)  # cell emb = mean over genes
    out = {"cell": [], "gene": [], "goal": [], "start": [], "seq": []}
    for pset in sets:
        seq = _ref_sequence(list(cell), list(pset), ptype, k, specials)
        pc, pt = _encode_alone(enc, seq)
        where = {t: j for j, t in enumerate(seq)}
        gene_cos = [_np_cos(ot[i], pt[where[t]]) for i, t in enumerate(cell) if t not in specials and t not in pset]
        out["seq"].append(seq)
        out["cell"].append(_np_cos(oc, pc))
        out["gene"].append(np.mean(gene_cos))
        if goal is not None:
            out["goal"].append(_np_cos(pc, goal) - _np_cos(oc, goal))
        if start is not None:
            out["start"].append(_np_cos(pc, start) - _np_cos(oc, start))
    return out


CASES = [
    ("delete", None, 0, "all", None),
    ("overexpress", None, 0, "all", None),
    ("inhibit", 3, 3, "all", None),
    ("activate", 0.25, None, [11, 4, 30], None),
    ("delete", None, 0, [20, 11], 9),
    ("overexpress", None, 0, "all", 9),
]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("ptype,rank_shift,k,targets,anchor", CASES)
def test_scores_match_brute_force(request, v2, ptype, rank_shift, k, targets, anchor):
    enc = request.getfixturevalue("enc_v2" if v2 else "enc_v1")
    genes = [9, 11, 4, 20, 17, 30, 25, 13, 6, 40, 33, 15]
    cell = [CLS, *genes, EOS] if v2 else genes
    specials = {CLS, EOS} if v2 else set()
    rng = np.random.default_rng(7)
    goal, start = rng.normal(size=HIDDEN), rng.normal(size=HIDDEN)
    kw = dict(cls_token_id=CLS, eos_token_id=EOS) if v2 else {}
    res = run_perturbation(
        torch_encode_fn(enc), cell, ptype, targets, anchor=anchor, rank_shift=rank_shift, goal_state=goal, start_state=start,
        max_tokens=30, return_gene_cos=True, **kw,
    )
    plan = plan_perturbations(cell, ptype, targets, anchor=anchor, rank_shift=rank_shift, **kw)
    if k is None:
        k = plan.shift
    target_list = [g for g in genes if g != anchor] if targets == "all" else targets
    sets = [([anchor] if anchor is not None else []) + [t] for t in target_list]
    assert res.perturbed_genes.tolist() == sets
    ref = _brute_force(enc, cell, sets, ptype, k, specials, goal, start)
    assert seqs(plan) == ref["seq"]
    np.testing.assert_allclose(res.cell_shift, ref["cell"], atol=1e-5)
    np.testing.assert_allclose(res.gene_shift, ref["gene"], atol=1e-5)
    np.testing.assert_allclose(res.goal_shift, ref["goal"], atol=1e-5)
    np.testing.assert_allclose(res.start_shift, ref["start"], atol=1e-5)
    assert res.cell_shift.dtype == np.float32 and res.cell_shift.shape == (len(sets),)
    # per-gene cosines: NaN exactly at the perturbed genes, their mean is gene_shift
    for row, pset in zip(res.gene_cos, sets):
        assert [genes[j] for j in np.flatnonzero(np.isnan(row))] == sorted(pset, key=genes.index)
        assert np.nanmean(row) == pytest.approx(float(res.gene_shift[sets.index(pset)]), abs=1e-5)
    assert res.num_forward_passes > 1


def test_gene_set_scores_match_brute_force(enc_v2):
    cell = [CLS, 9, 11, 4, 20, 17, 30, EOS]
    for ptype in ("delete", "overexpress"):
        res = run_perturbation(torch_encode_fn(enc_v2), cell, ptype, [20, 11], group=True, cls_token_id=CLS, eos_token_id=EOS)
        ref = _brute_force(enc_v2, cell, [[20, 11]], ptype, 0, {CLS, EOS})
        np.testing.assert_allclose(res.cell_shift, ref["cell"], atol=1e-5)
        np.testing.assert_allclose(res.gene_shift, ref["gene"], atol=1e-5)
        assert res.goal_shift is None and res.start_shift is None and res.gene_cos is None


def test_scores_detect_wrong_alignment(enc_v1):
    """A positional (not identity) comparison for overexpress gives different numbers: the test has teeth."""
    cell = [9, 11, 4, 20, 17, 30]
    res = run_perturbation(torch_encode_fn(enc_v1), cell, "overexpress", [17])
    oc, ot = _encode_alone(enc_v1, cell)
    pc, pt = _encode_alone(enc_v1, [17, 9, 11, 4, 20, 30])
    positional = np.mean([_np_cos(ot[i], pt[i]) for i in range(len(cell)) if i != 4])
    assert abs(float(res.gene_shift[0]) - positional) > 1e-3


# ----------------------------------------------------------------------------- batching


def test_chunk_by_token_budget():
    assert chunk_by_token_budget([4, 3, 3, 3], 8) == [(0, 2), (2, 4)]
    assert chunk_by_token_budget([4, 3, 3, 3], 12) == [(0, 3), (3, 4)]
    assert chunk_by_token_budget([4, 3, 3, 3], 100, max_batch=3) == [(0, 3), (3, 4)]
    assert chunk_by_token_budget([5, 5], 2) == [(0, 1), (1, 2)]  # over budget alone: own chunk
    assert chunk_by_token_budget([], 8) == []
    ids, mask = pad_token_batch([np.array([5, 6, 7]), np.array([8])])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_chunking_gives_same_scores(enc_v2):
    rng = np.random.default_rng(3)
    cell = [CLS, *rng.permutation(np.arange(4, 48))[:20].tolist(), EOS]
    goal = rng.normal(size=HIDDEN)
    calls: list[tuple[tuple[int, int], list[int]]] = []
    base = torch_encode_fn(enc_v2)

    def spy(ids, mask):
        assert ids.dtype == mask.dtype == np.int64
        assert np.all(ids[mask == 0] == 0) and np.all(np.diff(mask, axis=1) <= 0)  # right-padded with 0
        calls.append((ids.shape, mask.sum(axis=1).tolist()))
        return base(ids, mask)

    kw = dict(cls_token_id=CLS, eos_token_id=EOS, goal_state=goal, return_gene_cos=True)
    big = run_perturbation(torch_encode_fn(enc_v2), cell, "delete", max_tokens=10**6, **kw)
    assert big.num_forward_passes == 1
    for max_tokens, max_batch in ((1, None), (3 * 22, None), (10**6, 4)):
        calls.clear()
        small = run_perturbation(spy, cell, "delete", max_tokens=max_tokens, max_batch=max_batch, **kw)
        assert all(shape[0] * shape[1] <= max_tokens or shape[0] == 1 for shape, _ in calls)
        assert sum(len(lens) for _, lens in calls) == 21  # original + 20 deletions, each once
        assert calls[0][1][0] == 22  # original first
        for name in ("cell_shift", "gene_shift", "goal_shift", "gene_cos"):
            np.testing.assert_allclose(getattr(small, name), getattr(big, name), atol=1e-5, err_msg=name)
    assert len(calls) == 6  # (10**6, max_batch=4): ceil(21 / 4)


def test_encode_may_return_torch_tensors(enc_v1):
    def encode(ids, mask):
        with torch.no_grad():
            return enc_v1(torch.from_numpy(ids), torch.from_numpy(mask))

    a = run_perturbation(encode, V1, "delete")
    b = run_perturbation(torch_encode_fn(enc_v1), V1, "delete")
    np.testing.assert_allclose(a.cell_shift, b.cell_shift, atol=1e-6)
    assert set(a.as_dict()) == {"perturbed_genes", "lengths", "cell_shift", "gene_shift"}


def test_numpy_part_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import geneformer_triton.core.perturbation as p\n"
        "print(p.perturb_sequence([5, 6, 7, 8], 7, 'overexpress').tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[7, 5, 6, 8]"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=[9]), r"targets\[0\]=9 is not a gene of the cell"),
        (dict(targets=[5, 42]), r"targets\[1\]=42"),
        (dict(perturb_type="knockout"), "unknown perturb_type 'knockout'"),
        (dict(targets=[]), "targets is empty"),
        (dict(targets=[5, 6, 7, 8], group=True), "perturbation set of 4 gene"),
        (dict(targets=[5, 6, 7], group=True, anchor=8), "perturbation set of 4 gene"),
        (dict(input_ids=[5]), "cell has 1 gene"),
        (dict(input_ids=[CLS, 5, EOS]), "cell has 1 gene"),
        (dict(anchor=9), r"anchor\[0\]=9 is not a gene of the cell"),
        (dict(targets=[6], anchor=6), r"targets\[0\]=6 is also an anchor"),
        (dict(targets=[CLS]), r"special token"),
        (dict(targets=[6, 6], group=True), "twice"),
        (dict(targets="some"), "must be 'all'"),
        (dict(group=True), "explicit target list"),
        (dict(targets=["6"]), "integer token ids"),
        (dict(perturb_type="inhibit"), "needs rank_shift"),
        (dict(perturb_type="activate", rank_shift=1.5), "whole number"),
        (dict(perturb_type="activate", rank_shift=-1), "must be > 0"),
        (dict(perturb_type="delete", rank_shift=1), "inhibit/activate only"),
        (dict(input_ids=[5, 6, 0]), r"input_ids\[2\]=0 is the pad id"),
        (dict(input_ids=[5, 6, 5]), "occurs twice"),
        (dict(input_ids=[5, CLS, 6, EOS]), r"input_ids\[1\]=2 is the <cls> token"),
        (dict(input_ids=[[5, 6, 7]]), "1-D"),
    ],
)
def test_errors(kwargs, match):
    args = dict(input_ids=V2, perturb_type="delete", targets="all", cls_token_id=CLS, eos_token_id=EOS)
    args.update(kwargs)
    with pytest.raises(PerturbationError, match=match) as info:
        plan_perturbations(**args)
    assert isinstance(info.value, ValueError)


def test_runner_errors(enc_v1):
    with pytest.raises(PerturbationError, match="goal_state has 3 values"):
        run_perturbation(torch_encode_fn(enc_v1), V1, "delete", goal_state=np.zeros(3))
    with pytest.raises(PerturbationError, match="max_tokens must be >= 1"):
        run_perturbation(torch_encode_fn(enc_v1), V1, "delete", max_tokens=0)
    with pytest.raises(PerturbationError, match=r"expected \[B, H\] and \[B, L, H\]"):
        run_perturbation(lambda i, m: (np.zeros((len(i), 4)), np.zeros((len(i), 4))), V1, "delete")
    with pytest.raises(PerturbationError, match="every gene of the cell is an anchor|leaves no unperturbed"):
        plan_perturbations([5, 6], "delete", anchor=[5, 6])


# ----------------------------------------------------------------------------- upstream semantics (isp_upstream)


def test_upstream_all_plans_by_hand():
    from geneformer_triton.core.isp_upstream import plan_upstream

    cell = np.array([10, 11, 12, 13])
    delete = plan_upstream(cell, "delete", "all").perturbations
    assert [p.label for p in delete] == [(10,), (11,), (12,), (13,)]
    assert delete[1].sequence.tolist() == [10, 12, 13] and delete[1].orig_pos.tolist() == [0, 2, 3]
    over = plan_upstream(cell, "overexpress", "all").perturbations
    assert [p.label for p in over] == [(11,), (12,), (13,)]  # position 0 is already first: upstream skips it
    assert over[1].sequence.tolist() == [12, 10, 11, 13]
    assert over[1].orig_pos.tolist() == [0, 1, 3] and over[1].pert_pos.tolist() == [1, 2, 3]
    anchored = plan_upstream(cell, "delete", "all", anchor=12).perturbations
    assert [p.label for p in anchored] == [(10,), (11,), (13,)]
    assert anchored[0].sequence.tolist() == [11, 13]


def test_upstream_list_plans_by_hand():
    from geneformer_triton.core.isp_upstream import UpstreamPlanError, plan_upstream

    cell = np.array([10, 11, 12, 13, 14])
    (joint,) = plan_upstream(cell, "delete", [13, 11]).perturbations
    assert joint.label == (13, 11) and joint.sequence.tolist() == [10, 12, 14]
    with pytest.raises(UpstreamPlanError, match="every gene to delete"):
        plan_upstream(cell, "delete", [13, 99])
    # overexpress a gene the cell lacks (99) with one it has (12): both in front in list order
    (oe,) = plan_upstream(cell, "overexpress", [99, 12], max_len=16).perturbations
    assert oe.sequence.tolist() == [99, 12, 10, 11, 13, 14]
    assert oe.original_length == 5 and oe.orig_pos.tolist() == [0, 1, 3, 4] and oe.pert_pos.tolist() == [2, 3, 4, 5]
    # a full cell (max_len - 1 tokens) + one absent gene: the perturbed cell fits, the original stays whole
    (fit,) = plan_upstream(cell, "overexpress", [99], max_len=6).perturbations
    assert fit.sequence.tolist() == [99, 10, 11, 12, 13, 14] and fit.original_length == 5
    # at max_len: truncated, compared against the original cut to the genes that still fit
    (cut,) = plan_upstream(cell, "overexpress", [99, 98], max_len=5).perturbations
    assert cut.sequence.tolist() == [99, 98, 10, 11, 12] and cut.original_length == 3
    with pytest.raises(UpstreamPlanError, match="combines with 'all'"):
        plan_upstream(cell, "delete", [11], anchor=12)


def test_upstream_scores_by_hand():
    from geneformer_triton.core.isp_upstream import Perturbation, layer_index, score

    original = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    perturbed = np.array([[1.0, 0.0], [1.0, 1.0]])  # gene 1 deleted, gene 0 unchanged, gene 2 unchanged
    p = Perturbation((11,), np.array([10, 12]), 3, np.array([0, 2]), np.array([0, 1]))
    states = np.array([[1.0, 0.0]])
    s = score(p, original, perturbed, states)
    assert s.gene_cos.tolist() == pytest.approx([1.0, 1.0]) and s.cell_emb_shift == pytest.approx(1.0)
    mean_o, mean_p = original.mean(0), perturbed.mean(0)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert s.state_shift[0] == pytest.approx(cos(mean_p, states[0]) - cos(mean_o, states[0]))
    assert s.cell_shift == pytest.approx(cos(mean_o, mean_p))
    assert layer_index(6, -1) == 5 and layer_index(6, 0) == 6
    with pytest.raises(ValueError, match="outside"):
        layer_index(6, 1)
