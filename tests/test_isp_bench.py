"""The ISP benchmark's two compute paths give the reference's scores (bench/isp_fastpath.py)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from bench.isp_bench import rank_preserving_counts
from bench.isp_fastpath import DeleteAllRunner, baseline_delete_all
from geneformer_triton.encoder import GeneformerEncoder
from geneformer_triton.perturbation import plan_perturbations, run_plan
from geneformer_triton.runtimes import torch_encode_fn
from geneformer_triton.tokenizer import RankValueTokenizer


def reference_shift(encoder, tokens, cls=None, eos=None):
    plan = plan_perturbations(tokens, "delete", "all", cls_token_id=cls, eos_token_id=eos)
    return run_plan(torch_encode_fn(encoder), plan).cell_shift


def test_fast_path_and_baseline_match_the_reference_on_a_real_cell(loaded_model, celltypist_tokens):
    tokens = celltypist_tokens[0][:24]
    expected = reference_shift(loaded_model.encoder(), tokens)
    runner = DeleteAllRunner(loaded_model.encoder(), "cpu", torch.float32, max_tokens=23 * 5)  # 5 rows per chunk
    np.testing.assert_allclose(runner.run_cell(tokens), expected, rtol=0, atol=1e-5)
    model = BertForMaskedLM(BertConfig(**{**loaded_model.config.to_dict(), "attn_implementation": "eager"}))
    model.load_state_dict(loaded_model.model.state_dict())
    np.testing.assert_allclose(baseline_delete_all(model.eval(), tokens, batch_size=10), expected, rtol=0, atol=1e-5)


def test_special_tokens_stay_in_place_and_out_of_the_mean():
    cls, eos = 2, 3
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=32, hidden_act="relu", initializer_range=0.5, attn_implementation="eager")
    model = BertForMaskedLM(config).eval()
    encoder = GeneformerEncoder(model.bert, excluded_token_ids=(cls, eos)).eval()
    tokens = np.array([cls, 9, 14, 5, 30, 22, 7, eos])
    expected = reference_shift(encoder, tokens, cls, eos)
    runner = DeleteAllRunner(encoder, "cpu", torch.float32, max_tokens=14, special_ids=(cls, eos))
    np.testing.assert_allclose(runner.run_cell(tokens), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(baseline_delete_all(model, tokens, special_ids=(cls, eos), batch_size=4), expected, rtol=0, atol=1e-5)


def test_rank_preserving_counts_tokenize_back_to_the_cell(v1_vocabulary, celltypist_tokens):
    tokens = celltypist_tokens[1]
    gene_ids, counts, n_counts = rank_preserving_counts(v1_vocabulary, tokens)
    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    (again,) = tokenizer.tokenize_gene_lists(gene_ids[None], counts[None], np.array([n_counts]))
    assert np.array_equal(again, tokens)
