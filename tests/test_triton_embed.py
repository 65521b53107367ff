"""Served Geneformer on a real tritonserver: every ensemble and encoder over HTTP and gRPC vs the local
fp32 PyTorch reference on real celltypist cells, server-side vs client-side tokens, the ``embed`` and
``check`` CLIs end to end, and resuming an ``embed`` run after the server crashed mid-run.

Cost on 2 CPU cores is dominated by the encoders: the model comparisons use a few short real cells
(all sent in one request, so every backend sees the same shapes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import MODEL_NAME, SHARED

from geneformer_triton.cli import main
from geneformer_triton.client.check import discover_models
from geneformer_triton.client.outputs import OBSM_KEY, PartialStore, ResumeMismatchError, partial_dir
from geneformer_triton.client.triton_client import GeneformerClient, pack_cells
from geneformer_triton.core.cell_inputs import InputError, read_cells
from geneformer_triton.core.contract import EMBEDDING_MODELS, VARIANT_OF_MODEL
from geneformer_triton.core.fidelity import compare_variant
from geneformer_triton.model.runtimes import embed_token_cells

SUBSET = [14, 29, 30, 44]  # real celltypist cells of 448, 413, 400 and 574 tokens (fast on CPU)
V1 = SHARED / "geneformer" / "v1"
ENSEMBLES = {"geneformer_embed_onnx": "fp32", "geneformer_embed_onnx_fp16": "fp16", "geneformer_embed_torchscript": "fp32"}
ENCODERS = {"geneformer_onnx": "fp32", "geneformer_onnx_fp16": "fp16", "geneformer_torchscript": "fp32"}
PROTOCOLS = ("http", "grpc")


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.fixture(scope="module")
def subset_cells(celltypist_cells):
    return celltypist_cells[SUBSET].copy()


@pytest.fixture(scope="module")
def subset_reference(reference_encoder, celltypist_tokens) -> np.ndarray:
    return embed_token_cells(reference_encoder, [celltypist_tokens[i] for i in SUBSET], batch_size=len(SUBSET))


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, triton_server):
    with GeneformerClient(_url(triton_server, request.param), request.param) as client:
        yield client


def _run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


# ------------------------------------------------------------------------------- served models
def test_server_tokens_equal_client_tokens(client, celltypist_cells, celltypist_tokens):
    """The tokenizer model, asked directly, gives the client-side tokens for all sample cells."""
    adata = celltypist_cells
    gene_ids, counts = pack_cells(adata.X, list(adata.var["ensembl_id"]))
    out = client.infer("geneformer_tokenizer", {"gene_ids": gene_ids, "counts": counts,
                                                 "n_counts": adata.obs["n_counts"].to_numpy(np.float32).reshape(-1, 1)},
                       ["input_ids", "attention_mask", "length"])
    assert out["input_ids"].shape[0] == len(celltypist_tokens)
    for row, expected in enumerate(celltypist_tokens):
        mask = out["attention_mask"][row].astype(bool)
        assert out["length"][row, 0] == len(expected) == mask.sum()
        np.testing.assert_array_equal(out["input_ids"][row][mask], expected)
        assert not out["input_ids"][row][~mask].any()  # right padding with pad id 0


@pytest.mark.parametrize("model", list(ENSEMBLES))
def test_ensemble_matches_reference(client, model, subset_cells, subset_reference):
    gene_ids, counts = pack_cells(subset_cells.X, list(subset_cells.var["ensembl_id"]))
    embeddings = client.embed_cells(gene_ids, counts, subset_cells.obs["n_counts"].to_numpy(), model)
    result = compare_variant(f"{model} ({client.protocol})", ENSEMBLES[model], embeddings, subset_reference)
    assert embeddings.shape == subset_reference.shape and embeddings.dtype == np.float32
    assert result.passed, result


@pytest.mark.parametrize("model", list(ENCODERS))
def test_encoder_matches_reference(client, model, celltypist_tokens, subset_reference):
    embeddings = client.embed_tokens([celltypist_tokens[i] for i in SUBSET], model)
    result = compare_variant(f"{model} ({client.protocol})", ENCODERS[model], embeddings, subset_reference)
    assert embeddings.shape == subset_reference.shape
    assert result.passed, result


def test_discovery_finds_every_encoder_and_ensemble(client, exported_repository):
    from geneformer_triton.client.check import local_manifests

    found = {m.name: m for m in discover_models(client)}
    expected = {**{n: ("ensemble", p) for n, p in ENSEMBLES.items()}, **{n: ("encoder", p) for n, p in ENCODERS.items()}}
    assert {n: (found[n].kind, found[n].precision) for n in expected if n in found} == expected
    assert "geneformer_tokenizer" not in found
    assert found["geneformer_embed_torchscript"].encoder == "geneformer_torchscript"
    with_manifests = {m.name: m.precision for m in discover_models(client, local_manifests(exported_repository))}
    assert with_manifests["geneformer_onnx_fp16"] == "fp16"


# ------------------------------------------------------------------------------- embed CLI
def _symbols_h5ad(subset_cells, path, empty_cell: bool = False):
    """Cells with gene symbols only (no var['ensembl_id'], no obs['n_counts']), like a user's file."""
    X = subset_cells.X.toarray()
    obs = pd.DataFrame({"donor": ["a", "b", "c", "d"][: len(X)]}, index=list(subset_cells.obs_names))
    if empty_cell:
        X = np.vstack([X, np.zeros((1, X.shape[1]), np.float32)])
        obs = pd.concat([obs, pd.DataFrame({"donor": ["e"]}, index=["empty_cell"])])
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=subset_cells.var_names.copy()))
    adata.write_h5ad(path)
    return adata


def test_embed_cli_h5ad_server_tokenization(triton_server, subset_cells, subset_reference, tmp_path):
    source = _symbols_h5ad(subset_cells, tmp_path / "cells.h5ad", empty_cell=True)
    out = tmp_path / "embedded.h5ad"
    rc = _run_cli("embed", tmp_path / "cells.h5ad", "-o", out, "--url", triton_server.grpc_url, "--protocol", "grpc",
                  "--dictionaries", V1, "--batch-size", 2, "--concurrency", 2, "--no-progress")
    assert rc == 0
    result = ad.read_h5ad(out)
    assert list(result.obs_names) == list(source.obs_names) and list(result.obs["donor"]) == list(source.obs["donor"])
    assert (result.X != source.X).nnz == 0
    embeddings = result.obsm[OBSM_KEY]
    assert embeddings.shape == (len(SUBSET) + 1, 256) and embeddings.dtype == np.float32
    assert np.isnan(embeddings[-1]).all()  # the empty cell cannot be embedded
    assert compare_variant("embed h5ad", "fp32", embeddings[:-1], subset_reference).passed
    assert result.uns["geneformer"]["model"] == "geneformer_embed_onnx"
    assert not partial_dir(out).exists()


def test_embed_cli_csv_client_tokenization_parquet(triton_server, subset_cells, subset_reference, exported_repository,
                                                   tmp_path):
    csv = tmp_path / "cells.csv"
    frame = pd.DataFrame(subset_cells.X.toarray(), index=subset_cells.obs_names, columns=subset_cells.var_names)
    frame.to_csv(csv)
    out = tmp_path / "embedded.parquet"
    rc = _run_cli("embed", csv, "-o", out, "--url", triton_server.http_url, "--protocol", "http", "--client-tokenize",
                  "--encoder", "geneformer_onnx", "--repository", exported_repository, "--max-cells", 3, "--no-progress")
    assert rc == 0
    table = pd.read_parquet(out)
    assert table.index.name == "cell_id" and list(table.index) == list(subset_cells.obs_names[:3])
    assert table.shape == (3, 256)
    assert compare_variant("embed csv", "fp32", table.to_numpy(), subset_reference[:3]).passed


def test_embed_cli_client_dictionaries_must_match_the_server(triton_server, subset_cells, tmp_path, caplog):
    """Client-side tokenization with other gene medians than the served tokenizer's is refused."""
    folder = tmp_path / "dictionaries"
    folder.mkdir()
    for name in ("token_dictionary.json", "gene_name_id_dict.json"):
        (folder / name).write_text((V1 / name).read_text())
    medians = json.loads((V1 / "gene_median_dictionary.json").read_text())
    shuffled = np.random.default_rng(0).permutation(list(medians.values()))
    (folder / "gene_median_dictionary.json").write_text(json.dumps(dict(zip(medians, shuffled.tolist()))))
    _symbols_h5ad(subset_cells, tmp_path / "cells.h5ad")
    rc = _run_cli("embed", tmp_path / "cells.h5ad", "-o", tmp_path / "o.npy", "--url", triton_server.grpc_url,
                  "--client-tokenize", "--dictionaries", folder, "--no-progress")
    assert rc == 2
    assert "differs from the served geneformer_tokenizer's" in caplog.text
    assert not (tmp_path / "o.npy").exists() and not partial_dir(tmp_path / "o.npy").exists()


def test_embed_cli_input_errors(subset_cells, tmp_path, caplog):
    _symbols_h5ad(subset_cells, tmp_path / "cells.h5ad")
    # Gene symbols without a symbol dictionary: a clear error before any request (no server needed).
    assert _run_cli("embed", tmp_path / "cells.h5ad", "-o", tmp_path / "o.npy", "--url", "127.0.0.1:9") == 2
    assert "gene_name_id_dict.json" in caplog.text and "--dictionaries" in caplog.text
    assert _run_cli("embed", tmp_path / "cells.h5ad", "-o", tmp_path / "o.txt") == 2
    assert "unsupported format" in caplog.text
    bad = subset_cells.copy()
    bad.X = bad.X.toarray()
    bad.X[1, :3] = [np.nan, -1, 2]
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(InputError, match=r"NaN/negative values in 1 cells, e.g. .*\(row 1\).*raw counts must be finite"):
        read_cells(tmp_path / "bad.h5ad")


def test_partial_store_resume_and_torn_record(tmp_path):
    out = tmp_path / "x.npy"
    store = PartialStore(out)
    meta = {"input": "abc", "model": "m", "hidden_size": 4, "n_cells": 5}
    assert store.open(meta) == 0
    store.append(np.array([3, 1]), np.ones((2, 4)))
    store.append(np.array([0]), np.full((1, 4), 2.0))
    store.close()
    with open(store.data_path, "ab") as handle:  # a crash in the middle of writing the next record
        handle.write(b"GFE1\x02\x00\x00\x00")
    again = PartialStore(out)
    assert again.open(meta) == 3
    np.testing.assert_array_equal(again.done_rows(), [0, 1, 3])
    with pytest.raises(RuntimeError, match="2 of 5 cells have no embedding"):
        again.assemble(5)
    again.append(np.array([2, 4]), np.zeros((2, 4)))
    np.testing.assert_array_equal(again.assemble(5)[:, 0], [2, 1, 0, 1, 0])
    again.close()
    with pytest.raises(ResumeMismatchError, match="--restart"):
        PartialStore(out).open({**meta, "model": "other"})
    assert PartialStore(out).open({**meta, "model": "other"}, restart=True) == 0


def test_embed_resumes_after_server_crash(triton_server, exported_repository, subset_cells, subset_reference,
                                          tmp_path, caplog):
    """A server killed mid-run: the finished batches survive; a rerun embeds only the rest."""
    from geneformer_triton.serving.server import LocalTritonServer

    _symbols_h5ad(subset_cells, tmp_path / "cells.h5ad")
    out = tmp_path / "embedded.h5ad"
    common = ["embed", tmp_path / "cells.h5ad", "-o", out, "--dictionaries", V1, "--batch-size", 1,
              "--concurrency", 1, "--retries", 1, "--retry-backoff", 0.1, "--no-progress"]
    doomed = LocalTritonServer(exported_repository, model_config_name="cpu",
                               models=["geneformer_tokenizer", "geneformer_onnx", "geneformer_embed_onnx"])
    doomed.start(timeout_s=120)
    try:
        codes = []
        worker = threading.Thread(target=lambda: codes.append(_run_cli(*common, "--url", doomed.grpc_url)))
        worker.start()
        data = partial_dir(out) / "embeddings.bin"
        deadline = time.monotonic() + 120
        while not (data.is_file() and data.stat().st_size > 0) and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.01)
        os.killpg(doomed.pid, signal.SIGKILL)  # crash: no graceful shutdown
        worker.join(timeout=120)
    finally:
        doomed.stop()
    assert codes == [3], caplog.text  # server unavailable after the retries
    assert "rerun to resume" in caplog.text and not out.exists()
    meta = json.loads((partial_dir(out) / "meta.json").read_text())
    assert meta["n_cells"] == len(SUBSET)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _run_cli(*common, "--url", triton_server.grpc_url) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming:")]
    assert len(resumed) == 1
    already = int(resumed[0].split()[1])
    assert 1 <= already < len(SUBSET), resumed
    embedded_now = [r.getMessage() for r in caplog.records if "embedded now" in r.getMessage()]
    assert f"({len(SUBSET) - already} embedded now" in embedded_now[0]
    result = ad.read_h5ad(out)
    assert result.n_obs == len(SUBSET) and list(result.obs_names) == list(subset_cells.obs_names)
    assert compare_variant("embed resumed", "fp32", result.obsm[OBSM_KEY], subset_reference).passed
    assert not partial_dir(out).exists()


# ------------------------------------------------------------------------------- check CLI
def test_check_cli_passes(triton_server, tmp_path, capsys):
    rc = _run_cli("check", "--url", triton_server.grpc_url, "--protocol", "grpc", "--cells", 1, "--model", MODEL_NAME,
                  "--random-weights", "--seed", 0, "--dictionaries", V1, "--out", tmp_path)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # every exported embedding model of the contract (each at its precision's gate); not the ISP-layer encoder
    served = {m.name for m in EMBEDDING_MODELS.values() if VARIANT_OF_MODEL[m.encoder].exported}
    assert set(ENSEMBLES) | set(ENCODERS) <= served and "geneformer_onnx_isp" not in served
    for model in served:
        assert model in printed
    assert "geneformer_tokenizer: 1 of 1 cells tokenized identically" in printed and "PASSED" in printed
    report = json.loads((tmp_path / "served_fidelity.json").read_text())
    assert {r["variant"] for r in report} == served and all(r["passed"] for r in report)


def test_check_cli_fails_on_other_weights(triton_server, exported_repository, tmp_path, capsys):
    """A reference with other weights than the served export: exit 1, and the manifests say why."""
    rc = _run_cli("check", "--url", triton_server.http_url, "--protocol", "http", "--cells", 1,
                  "--models", "geneformer_onnx", "--random-weights", "--seed", 1, "--dictionaries", V1,
                  "--repository", exported_repository, "--out", tmp_path)
    printed = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in printed and "served weights differ from the reference" in printed and "FAILED" in printed
    [row] = json.loads((tmp_path / "served_fidelity.json").read_text())
    assert not row["passed"] and row["cosine_min"] < 0.9  # the embeddings themselves fail, too
