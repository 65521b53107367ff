"""``gftriton evaluate``: downstream metrics of every served backend vs the fp32 PyTorch reference.

Real data (scanpy's pbmc68k_reduced, counts recovered, labels ``bulk_labels``), a real tritonserver
(shared ``triton_server`` fixture) serving the exported random-weight gf-6L-10M-i2048. The served run
uses a stratified subset of N_SERVED cells: the full 700 cells through the reference and three served
backends take ~4 min on 2 shared CPU cores, 300 cells ~1.5-2 min.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import MODEL_NAME, SHARED

from geneformer_triton.core.fidelity import FP32_MIN_COSINE, REDUCED_MIN_COSINE
from geneformer_triton.evaluation.backends import (
    REFERENCE,
    EvaluationOptions,
    LabelledCells,
    evaluate_backends,
    load_labelled_cells,
    stratified_subsample,
)
from geneformer_triton.evaluation.metrics import METRIC_DIRECTIONS

N_SERVED = 300
N_SMALL = 60
SERVED_METHODS = ["pytorch_fp32", "triton_onnx_fp32", "triton_onnx_fp16", "triton_torchscript_fp32"]
CONTROL = "CD14+ Monocyte"


@pytest.fixture(scope="module")
def pbmc_cells(v1_vocabulary) -> LabelledCells:
    return load_labelled_cells(v1_vocabulary, dataset="pbmc68k")


@pytest.fixture(scope="module")
def served(triton_server, exported_repository, loaded_model, v1_vocabulary, pbmc_cells, tmp_path_factory):
    """One served evaluation (gRPC, every backend, N_SERVED cells) shared by the tests below."""
    from geneformer_triton.client.triton_client import GeneformerClient

    cells = pbmc_cells.subset(stratified_subsample(pbmc_cells.labels, N_SERVED, seed=0))
    out = tmp_path_factory.mktemp("evaluate_served")
    with GeneformerClient(triton_server.grpc_url, "grpc") as client:
        options = EvaluationOptions(["onnx", "onnx_fp16", "torchscript"], repository=exported_repository, out_dir=out,
                                    save_embeddings=True)
        result = evaluate_backends(loaded_model, cells, options, client=client, vocabulary=v1_vocabulary)
    print("\n" + result.table[["accuracy", "f1_weighted", "silhouette", "knn_consistency", "ari", "nmi",
                               "delta_accuracy", "cosine_min", "embed_seconds"]].to_string())
    return result


# ------------------------------------------------------------------------------------ subsample
def test_stratified_subsample_keeps_proportions_and_every_label(pbmc_cells):
    labels = pbmc_cells.labels
    index = stratified_subsample(labels, N_SERVED, seed=0)
    assert len(index) == N_SERVED and len(set(index)) == N_SERVED and np.all(np.diff(index) > 0)
    assert np.array_equal(index, stratified_subsample(labels, N_SERVED, seed=0))
    assert not np.array_equal(index, stratified_subsample(labels, N_SERVED, seed=1))
    full = pd.Series(labels).value_counts()
    sub = pd.Series(labels[index]).value_counts()
    assert set(sub.index) == set(full.index)
    assert (sub >= 2).all()
    share = full * N_SERVED / len(labels)
    assert (abs(sub - share[sub.index]) <= 2).all()
    assert len(stratified_subsample(labels, 0)) == len(labels)
    with pytest.raises(ValueError, match="cannot hold"):
        stratified_subsample(labels, 5)


def test_pbmc_cells_are_raw_counts_with_vocabulary_genes(pbmc_cells):
    assert pbmc_cells.n_cells == 700
    assert pbmc_cells.notes["genes_in_vocabulary"] >= 650
    assert all(g.startswith("ENSG") for g in pbmc_cells.gene_ids)
    assert np.array_equal(pbmc_cells.counts.data, np.round(pbmc_cells.counts.data))
    # n_counts is the original total (all genes), larger than the recovered row sums
    assert (pbmc_cells.n_counts > np.asarray(pbmc_cells.counts.sum(axis=1)).ravel()).all()


# ------------------------------------------------------------------------------------ served run
def test_report_files_exist(served):
    paths = served.paths
    for kind in ("csv", "json", "markdown", "png", "embeddings"):
        assert paths[kind].is_file() and paths[kind].stat().st_size > 0, kind
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(paths["csv"], index_col="method")
    assert list(table.index) == SERVED_METHODS
    payload = json.loads(paths["json"].read_text())
    assert set(payload["methods"]) == set(SERVED_METHODS)
    saved = np.load(paths["embeddings"])
    assert saved[REFERENCE].shape == (N_SERVED, 256)


def test_every_backend_row_has_every_metric(served):
    table = served.table
    assert list(table.index) == SERVED_METHODS
    assert list(table["precision"]) == ["fp32", "fp32", "fp16", "fp32"]
    for metric in METRIC_DIRECTIONS:
        if metric == "control_separation":  # no control label in this run
            assert table[metric].isna().all()
            continue
        assert np.isfinite(table[metric]).all(), metric
        assert np.isfinite(table[f"delta_{metric}"]).all(), metric
    assert (table["n_cells"] == N_SERVED).all() and (table["n_labels"] == 10).all()
    assert (table.loc[REFERENCE, [f"delta_{m}" for m in METRIC_DIRECTIONS if m != "control_separation"]] == 0).all()


def test_fp32_backends_agree_within_one_accuracy_point(served):
    table = served.table
    for method in ("triton_onnx_fp32", "triton_torchscript_fp32"):
        assert abs(table.loc[method, "accuracy"] - table.loc[REFERENCE, "accuracy"]) <= 0.01, method
        assert abs(table.loc[method, "delta_f1_weighted"]) <= 0.01, method
    # fp16 is reported (a row with its own accuracy and delta), not held to the fp32 tolerance
    assert math.isfinite(table.loc["triton_onnx_fp16", "delta_accuracy"])
    assert served.checks["passed"] and served.checks["fp32_accuracy_ok"]
    assert served.checks["reduced_precision_max_abs_delta_accuracy"] is not None


def test_fidelity_above_thresholds(served):
    table = served.table
    assert table.loc["triton_onnx_fp32", "cosine_min"] >= FP32_MIN_COSINE
    assert table.loc["triton_torchscript_fp32", "cosine_min"] >= FP32_MIN_COSINE
    assert table.loc["triton_onnx_fp16", "cosine_min"] >= REDUCED_MIN_COSINE
    assert table["fidelity_passed"].all() and not table["fidelity_failures"].any()
    assert (table["nn_identity"] == 1.0).all() and (table["knn_overlap"] >= 0.95).all()
    assert served.metadata["server_tokens_checked"].startswith("0 of")


def test_report_says_random_weights(served):
    text = served.paths["markdown"].read_text()
    assert "randomly initialized" in text and "near chance" in text
    payload = json.loads(served.paths["json"].read_text())
    assert payload["random_weights"] is True
    assert payload["checks"]["passed"] is True and payload["checks"]["fp32_max_abs_delta_accuracy"] <= 0.01
    assert "## Backends" in text and "PASS" in text


# ------------------------------------------------------------------------------------ CLI, local mode, errors
@pytest.fixture(scope="module")
def small_h5ad(pbmc_cells, tmp_path_factory):
    """N_SMALL pbmc cells as a user .h5ad: gene symbols as var_names, counts in X, n_counts in obs."""
    import anndata as ad

    from geneformer_triton.core.data.pbmc68k import load_pbmc68k_counts

    adata = load_pbmc68k_counts()
    index = stratified_subsample(adata.obs["bulk_labels"].astype(str).to_numpy(), N_SMALL, seed=0)
    small = adata[index].copy()
    small.obs = small.obs.rename(columns={"bulk_labels": "cell_type"})
    path = tmp_path_factory.mktemp("h5ad") / "pbmc_small.h5ad"
    ad.AnnData(X=small.X, obs=small.obs, var=small.var).write_h5ad(path)
    return path


def test_cli_http_with_a_checkpoint_and_a_control_label(triton_server, loaded_model, small_h5ad, tmp_path, capsys):
    """A user .h5ad, a checkpoint folder (not random by construction), HTTP, no repository: the fidelity
    columns are the weights check, and the report does not claim random weights."""
    from geneformer_triton.cli import main

    checkpoint = tmp_path / "checkpoint"
    loaded_model.model.save_pretrained(checkpoint)
    out = tmp_path / "report"
    code = main(["evaluate", str(small_h5ad), "--label-key", "cell_type", "--control-label", CONTROL,
                 "--url", triton_server.http_url, "--protocol", "http", "--backends", "onnx",
                 "--model", str(checkpoint), "--dictionaries", str(SHARED / "geneformer" / "v1"),
                 "--cache-dir", str(tmp_path), "--max-cells", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "triton_onnx_fp32" in printed and "PASS" in printed and "RANDOM WEIGHTS" not in printed
    table = pd.read_csv(out / "embedding_eval.csv", index_col="method")
    assert list(table.index) == ["pytorch_fp32", "triton_onnx_fp32"]
    assert (table["n_cells"] == N_SMALL).all()
    assert np.isfinite(table["control_separation"]).all()
    assert table.loc["triton_onnx_fp32", "cosine_min"] >= FP32_MIN_COSINE
    payload = json.loads((out / "embedding_eval.json").read_text())
    assert payload["random_weights"] is False
    assert "randomly initialized" not in (out / "embedding_eval.md").read_text()


def test_local_mode_runs_exported_files_in_process(exported_repository, loaded_model, v1_vocabulary, pbmc_cells, tmp_path):
    cells = pbmc_cells.subset(stratified_subsample(pbmc_cells.labels, N_SMALL, seed=0))
    options = EvaluationOptions(["onnx", "torchscript"], repository=exported_repository, local=True,
                                control_label=CONTROL, out_dir=tmp_path)
    result = evaluate_backends(loaded_model, cells, options, vocabulary=v1_vocabulary)
    table = result.table
    assert list(table.index) == ["pytorch_fp32", "local_onnx_fp32", "local_torchscript_fp32"]
    assert table["fidelity_passed"].all() and result.passed
    assert np.isfinite(table["control_separation"]).all()
    assert (tmp_path / "embedding_eval.md").is_file()


def test_other_weights_than_the_served_ones_are_refused(exported_repository, v1_vocabulary, pbmc_cells):
    from geneformer_triton.model.loading import random_geneformer

    other = random_geneformer(MODEL_NAME, seed=1, vocabulary=v1_vocabulary)
    cells = pbmc_cells.subset(np.arange(20))
    with pytest.raises(ValueError, match="other weights"):
        evaluate_backends(other, cells, EvaluationOptions(["onnx"], repository=exported_repository, local=True),
                          vocabulary=v1_vocabulary)


def test_bad_inputs_are_reported(v1_vocabulary, pbmc_cells, small_h5ad, exported_repository, loaded_model):
    with pytest.raises(ValueError, match="label column"):
        load_labelled_cells(v1_vocabulary, path=small_h5ad, label_key="bulk_labels")
    with pytest.raises(ValueError, match="either"):
        load_labelled_cells(v1_vocabulary, path=small_h5ad, dataset="pbmc68k", label_key="cell_type")
    cells = pbmc_cells.subset(np.arange(20))
    with pytest.raises(ValueError, match="control label"):
        evaluate_backends(loaded_model, cells, EvaluationOptions(["onnx"], repository=exported_repository, local=True,
                                                                 control_label="no such cells"))
    with pytest.raises(ValueError, match="--repository"):
        evaluate_backends(loaded_model, cells, EvaluationOptions(["onnx"], local=True))
