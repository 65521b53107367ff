"""Rank-value tokenizer: hand-checkable semantics, bad input, and the Triton wire format."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from geneformer_triton.core.dictionaries import GeneVocabulary, build_vocabulary_from_counts
from geneformer_triton.core.tokenizer import RankValueTokenizer, TokenizationError, pad_token_batch


@pytest.fixture()
def tiny_vocabulary() -> GeneVocabulary:
    genes = {"ENSG1": 2, "ENSG2": 3, "ENSG3": 4, "ENSG4": 5}
    return GeneVocabulary(
        token_ids={"<pad>": 0, "<mask>": 1, **genes},
        gene_medians={"ENSG1": 1.0, "ENSG2": 2.0, "ENSG3": 0.5, "ENSG4": 4.0},
        gene_mapping={"ENSG1": "ENSG1", "ENSG2": "ENSG2", "ENSG3": "ENSG3", "ENSG4": "ENSG4", "ALIAS3": "ENSG3"},
    )


@pytest.fixture()
def tiny_v2_vocabulary() -> GeneVocabulary:
    return GeneVocabulary(
        token_ids={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG1": 4, "ENSG2": 5, "ENSG3": 6},
        gene_medians={"ENSG1": 1.0, "ENSG2": 2.0, "ENSG3": 0.5},
    )


def test_rank_value_order_by_count_over_median(tiny_vocabulary):
    # normalized values (counts / total * 1e4 / median): ENSG1 4/1=4, ENSG2 6/2=3, ENSG3 1/0.5=2, ENSG4 0
    counts = np.array([[4.0, 6.0, 1.0, 0.0]], dtype=np.float32)
    tokenizer = RankValueTokenizer(tiny_vocabulary, model_input_size=2048, special_tokens=False)
    cells = tokenizer.tokenize_matrix(counts, ["ENSG1", "ENSG2", "ENSG3", "ENSG4"])
    assert cells[0].tolist() == [2, 3, 4]  # ENSG4 has zero counts: not in the cell


def test_truncation_and_special_tokens(tiny_v2_vocabulary):
    counts = np.array([[4.0, 6.0, 1.0]], dtype=np.float32)
    tokenizer = RankValueTokenizer(tiny_v2_vocabulary, model_input_size=4, special_tokens=True)
    (cell,) = tokenizer.tokenize_matrix(counts, ["ENSG1", "ENSG2", "ENSG3"])
    assert cell.tolist() == [2, 4, 5, 3]  # <cls>, two best genes (input size 4 - 2), <eos>
    tokenizer_v1 = RankValueTokenizer(tiny_v2_vocabulary, model_input_size=2, special_tokens=False)
    assert tokenizer_v1.tokenize_matrix(counts, ["ENSG1", "ENSG2", "ENSG3"])[0].tolist() == [4, 5]


def test_unknown_ids_ignored_but_count_in_total(tiny_vocabulary):
    tokenizer = RankValueTokenizer(tiny_vocabulary, 2048, False)
    counts = np.array([[1.0, 1.0, 100.0]], dtype=np.float32)
    (cell,) = tokenizer.tokenize_matrix(counts, ["ENSG1", "ENSG2", "NOT_A_GENE"])
    assert cell.tolist() == [2, 3]


def test_ids_collapsing_onto_one_gene_are_summed(tiny_vocabulary):
    # ALIAS3 maps to ENSG3: 1 + 3 = 4 counts / median 0.5 = 8 > ENSG1 (5 / 1)
    counts = np.array([[5.0, 1.0, 3.0]], dtype=np.float32)
    tokenizer = RankValueTokenizer(tiny_vocabulary, 2048, False)
    (cell,) = tokenizer.tokenize_matrix(counts, ["ENSG1", "ENSG3", "alias3"])
    assert cell.tolist() == [4, 2]


@pytest.mark.parametrize(
    "counts, message",
    [
        ([[np.nan, 1.0]], "NaN"),
        ([[-1.0, 1.0]], "negative"),
        ([[np.inf, 1.0]], "infinite"),
    ],
)
def test_bad_counts_raise(tiny_vocabulary, counts, message):
    tokenizer = RankValueTokenizer(tiny_vocabulary, 2048, False)
    with pytest.raises(TokenizationError, match=message):
        tokenizer.tokenize_matrix(np.array(counts, dtype=np.float32), ["ENSG1", "ENSG2"])
    with pytest.raises(TokenizationError, match=message):
        tokenizer.tokenize_gene_lists(np.array([[b"ENSG1", b"ENSG2"]], dtype=object), np.array(counts, dtype=np.float32))


def test_empty_cell_and_no_vocabulary_gene_raise_naming_the_cell(tiny_vocabulary):
    tokenizer = RankValueTokenizer(tiny_vocabulary, 2048, False)
    with pytest.raises(TokenizationError, match="cell 'b'.*total counts"):
        tokenizer.tokenize_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]), ["ENSG1", "ENSG2"], cell_names=["a", "b"])
    with pytest.raises(TokenizationError, match="cell 1 expresses no gene"):
        tokenizer.tokenize_matrix(np.array([[1.0, 0.0], [0.0, 5.0]]), ["ENSG1", "OTHER"])
    with pytest.raises(TokenizationError, match="none of the 2 gene ids"):
        tokenizer.tokenize_matrix(np.array([[1.0, 2.0]]), ["A", "B"])
    with pytest.raises(TokenizationError, match="cell 0: none of its gene ids.*MOUSE"):
        tokenizer.tokenize_gene_lists(np.array([[b"MOUSE", b""]], dtype=object), np.array([[3.0, 0.0]], dtype=np.float32))


def test_shape_mismatches_raise(tiny_vocabulary):
    tokenizer = RankValueTokenizer(tiny_vocabulary, 2048, False)
    with pytest.raises(TokenizationError, match="3 genes but 2 gene ids"):
        tokenizer.tokenize_matrix(np.ones((1, 3)), ["ENSG1", "ENSG2"])
    with pytest.raises(TokenizationError, match=r"gene_ids \[1, 2\] and counts \[1, 3\]"):
        tokenizer.tokenize_gene_lists(np.array([[b"ENSG1", b"ENSG2"]], dtype=object), np.ones((1, 3), dtype=np.float32))
    with pytest.raises(TokenizationError, match="special_tokens=True needs"):
        RankValueTokenizer(tiny_vocabulary, 2048, special_tokens=True)


def test_wire_format_equals_matrix_path_on_real_cells(celltypist_cells, v1_vocabulary, celltypist_tokens):
    """Each cell sent as its non-zero genes in var order gives the AnnData path's tokens."""
    from geneformer_triton.client.triton_client import pack_cells

    adata = celltypist_cells
    ids, counts = pack_cells(adata.X, list(adata.var["ensembl_id"]))
    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    wire = tokenizer.tokenize_gene_lists(ids, counts, adata.obs["n_counts"].to_numpy())
    assert len(wire) == len(celltypist_tokens)
    for a, b in zip(wire, celltypist_tokens):
        np.testing.assert_array_equal(a, b)
    assert max(len(c) for c in celltypist_tokens) == 2048  # the sample reaches the V1 input size


def test_pad_token_batch():
    ids, mask = pad_token_batch([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(TokenizationError, match="more than the padded length"):
        pad_token_batch([np.arange(5)], length=3)


def test_build_vocabulary_from_counts_medians():
    counts = sp.csr_matrix(np.array([[1.0, 0.0, 9.0], [3.0, 5.0, 2.0], [0.0, 0.0, 10.0]]))
    vocabulary = build_vocabulary_from_counts(counts, ["G1", "G2", "G3"], special_tokens=True)
    assert vocabulary.token_ids == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "G1": 4, "G2": 5, "G3": 6}
    # cell totals 10, 10, 10 -> x 1000; medians over non-zero cells only
    assert vocabulary.gene_medians["G1"] == pytest.approx(np.median([1000.0, 3000.0]))
    assert vocabulary.gene_medians["G2"] == pytest.approx(5000.0)
    assert vocabulary.gene_medians["G3"] == pytest.approx(np.median([9000.0, 2000.0, 10000.0]))
