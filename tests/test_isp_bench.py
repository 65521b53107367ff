"""ISP benchmarks: the fast paths give the reference's scores (bench/isp_fastpath.py), and the benchmark
against upstream Geneformer itself (bench/isp_upstream_bench.py, quick mode) reports equal numbers and
rejects unequal ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from geneformer_triton.bench.isp_bench import rank_preserving_counts
from geneformer_triton.bench.isp_fastpath import DeleteAllRunner, baseline_delete_all
from geneformer_triton.core.perturbation import plan_perturbations, run_plan
from geneformer_triton.core.tokenizer import RankValueTokenizer
from geneformer_triton.model.encoder import GeneformerEncoder
from geneformer_triton.model.runtimes import torch_encode_fn


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


# ----------------------------------------------------------------------------- vs upstream itself (quick mode)


@pytest.fixture(scope="module")
def upstream_quick(tmp_path_factory):
    """``geneformer_triton.bench.isp_upstream_bench --mode quick``: real upstream InSilicoPerturber, ours in process and served."""
    from geneformer_triton.bench.isp_upstream_bench import BenchOptions, prepare, run_benchmark

    root = tmp_path_factory.mktemp("isp_upstream")
    options = BenchOptions(mode="quick", out=str(root / "out"), work=str(root / "work"))
    context = prepare(options)
    return run_benchmark(options, context), context


def test_quick_report_structure_and_equal_numbers(upstream_quick):
    report, context = upstream_quick
    out = context.out
    for name in ("isp_upstream.csv", "isp_upstream.json", "report.md", "isp_upstream.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "isp_upstream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "isp_upstream.json").read_text())["results"]
    assert [(r["method"], r["emb_mode"], r["median_perturbations_per_s"]) for r in written] == [
        (r["method"], r["emb_mode"], r["median_perturbations_per_s"]) for r in report["results"]]
    table = pd.read_csv(out / "isp_upstream.csv")
    assert sorted(zip(table["method"], table["emb_mode"])) == sorted(
        (m, e) for m in ("upstream", "inprocess", "served") for e in ("cell", "cell_and_gene"))
    assert [c["tokens"] for c in report["cells"]] == [64]
    expected_perturbations = sum(c["tokens"] for c in report["cells"])  # delete all: one per gene
    for row in report["results"]:
        where = f"{row['method']}/{row['emb_mode']}"
        assert row["repeats"] == 3, where
        assert row["perturbations"] == expected_perturbations, where
        assert row["min_perturbations_per_s"] <= row["median_perturbations_per_s"] <= row["max_perturbations_per_s"], where
        assert row["peak_rss_mib"] > 100, where  # a Python process with torch: sampling really ran
        assert row["agrees_with_upstream"] is True, (where, report["details"][where].get("agreement_problems"))
        assert row["max_abs_diff_cell_emb"] < 1e-5, where
        if row["emb_mode"] == "cell_and_gene":
            assert row["max_abs_diff_gene_cos"] < 1e-5, where
            assert row["compared_values"] == expected_perturbations + 64 * 63, where  # + every (perturbed, affected)
        else:
            assert np.isnan(row["max_abs_diff_gene_cos"]) and row["compared_values"] == expected_perturbations, where
        if row["method"] == "upstream":
            assert row["x_upstream"] == 1.0
    assert report["details"]["upstream/cell"]["layer_to_quant"] == 5  # emb_layer -1 of 6 layers
    assert "stand-in" in report["descriptions"]["served/cell"] or "C++" in report["descriptions"]["served/cell"]
    assert set(report["target"]["served_x_upstream"]) == {"cell", "cell_and_gene"}
    assert report["profile"]["served"]["encoder_calls"] >= 1
    text = (out / "report.md").read_text()
    assert "x upstream" in text and "CPU target: served >= 5x upstream" in text and "Load average before" in text
    assert "\n## Results\n" in text  # the table README quotes whole (tests/test_readme_figures.py)
    assert report["note"] in text
    assert report["environment"]["processor"] and report["environment"]["processor"] in text  # ratios move with the CPU


def test_the_report_says_what_the_load_when_it_started_means():
    """The note follows the recorded 1-minute load (it once said "shared with other jobs" on every run)."""
    import os

    from geneformer_triton.bench.isp_upstream_report import load_note

    cpus = os.cpu_count()
    assert load_note({"before": {"load_average": [0.1, 1.0, 1.0]}}, cpus).startswith("The machine was otherwise idle")
    busy = load_note({"before": {"load_average": [cpus * 1.2, 0.1, 0.1]}}, cpus)
    assert busy.startswith("Other work was running") and "noisy" in busy


def test_agreement_check_rejects_wrong_numbers(upstream_quick):
    """Negative controls: our side at the wrong emb_layer (0 = last layer) fails the agreement check, and so
    do values nudged by 1e-4 or missing one perturbation."""
    from geneformer_triton.bench.isp_upstream_bench import agreement, load_upstream_values, worker_run
    from geneformer_triton.bench.isp_worker import run_inprocess

    _, context = upstream_quick
    theirs = load_upstream_values(context, "cell_and_gene")
    wrong_layer = worker_run(context, "inprocess", ("cell_and_gene",), emb_layer=0)  # the worker's plan, run here
    (_, values), = run_inprocess(json.loads((wrong_layer.folder / "plan.json").read_text())).values()
    check = agreement(values, theirs, 1e-5)
    assert not check.ok and check.max_abs_diff_cell_emb > 1e-5, check
    right = dict(np.load(context.work / "inprocess" / "cell+cell_and_gene_layer-1" / "values_cell_and_gene.npz"))
    assert agreement(right, theirs, 1e-5).ok
    nudged = {**right, "cell_cos": right["cell_cos"] + np.eye(1, right["cell_cos"].size, 7)[0] * 1e-4}
    assert not agreement(nudged, theirs, 1e-5).ok
    dropped = {**right, "cell_keys": right["cell_keys"][1:], "cell_cos": right["cell_cos"][1:]}
    assert any("only upstream's" in p for p in agreement(dropped, theirs, 1e-5).problems)


def test_precision_comparison_scores_rankings(exported_repository, celltypist_tokens, v1_vocabulary):
    """bench/isp_precision.py: int8 vs fp32 reduced ISP encoders on a real cell; the ranking metrics give 1 for
    identical outputs and reject a reversed ranking (negative control)."""
    from geneformer_triton.bench.isp_precision import TOP, compare, run_delete_all
    from geneformer_triton.model.runtimes import onnx_session

    cell = np.asarray(celltypist_tokens[0][:40], dtype=np.int64)
    outputs = {}
    for model in ("geneformer_onnx_isp_reduced", "geneformer_onnx_isp_reduced_int8"):
        session = onnx_session(exported_repository / model / "1" / "model.onnx")
        _, (outputs[model],) = run_delete_all(session, [cell], v1_vocabulary, 4096)
    fp32, int8 = outputs.values()
    same = compare(fp32, fp32)
    assert same["spearman"] == pytest.approx(1.0) and same[f"top{TOP}_overlap"] == 1.0 and same["max_abs_diff_gene_cos"] == 0
    measured = compare(fp32, int8)
    assert measured["genes"] == cell.size and 0 < measured["max_abs_diff_cell_emb_shift"] < 0.5
    assert -1 <= measured["spearman"] <= 1
    reversed_ = dict(fp32, cell_emb_shift=-fp32["cell_emb_shift"])
    bad = compare(fp32, reversed_)
    assert bad["spearman"] == pytest.approx(-1.0) and bad[f"top{TOP}_overlap"] == 0.0


# ----------------------------------------------------------------------------- cells merged per execute


def test_multicell_bench_runs_and_its_values_are_upstreams(tmp_path):
    """``bench/isp_multicell_bench.py`` (its figures are in the README) on 3 real Norman cells: both served modes
    and upstream's InSilicoPerturber run, and the served values are upstream's (same keys, max abs diff <= 1e-5)."""
    from geneformer_triton.bench.isp_multicell_bench import MulticellOptions, run

    report = run(MulticellOptions(cells=3, concurrency=3, cases=("overexpress_KLF1",), out=str(tmp_path / "out"),
                                  work=str(tmp_path / "work")))
    case = report["cases"]["overexpress_KLF1"]
    assert set(case) >= {"one_at_a_time", "merged", "upstream"}
    for mode in ("one_at_a_time", "merged"):
        assert case[mode]["perturbations"] == 3, mode  # KLF1 is in no cell: one overexpression each
        assert case[mode]["max_abs_diff_vs_upstream"] <= 1e-5, mode
        assert case[mode]["triton"]["geneformer_isp"]["inferences"] == 3.0, mode
    assert case["merged"]["max_abs_diff_vs_one_at_a_time"] <= 1e-5
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "isp_multicell.json").is_file()
