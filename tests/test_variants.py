"""Shippable precision variants: ``gftriton export --precision int8|bf16`` writes servable models (encoder,
ensemble, manifest) that a real tritonserver serves over HTTP and gRPC and that pass their fidelity gate
against the fp32 PyTorch reference on real celltypist cells.

Gate: ``geneformer_triton.client.check.check_server`` with its per-precision thresholds (``geneformer_triton.core.fidelity``:
min cosine >= 0.999 below fp32). Negative controls: the same served embeddings against the reference of
other weights must fail the gate, and a manifest of other weights must be reported.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from conftest import MODEL_NAME, REPO_ROOT, SHARED

from geneformer_triton.cli import main
from geneformer_triton.client.check import check_server, discover_models, local_manifests
from geneformer_triton.client.triton_client import GeneformerClient
from geneformer_triton.core.contract import EXPORTED_VARIANTS
from geneformer_triton.core.fidelity import compare_variant
from geneformer_triton.export.formats import formats_for
from geneformer_triton.model.runtimes import embed_token_cells, torch_encode_fn

VARIANTS = {"int8": "onnx_int8", "bf16": "torchscript_bf16"}
N_CELLS = 6


@pytest.fixture(scope="module")
def variant_repository(tmp_path_factory):
    """A copy of model_repository/ holding only what ``gftriton export --precision int8,bf16`` wrote."""
    repository = tmp_path_factory.mktemp("variants") / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository,
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "__pycache__"))
    code = main(["export", "--model", MODEL_NAME, "--random-weights", "--seed", "0",
                 "--dictionaries", str(SHARED / "geneformer" / "v1"), "--repository", str(repository),
                 "--precision", ",".join(VARIANTS)])
    assert code == 0
    return repository


def _served_models() -> list[str]:
    models = ["geneformer_tokenizer"]
    for name in VARIANTS.values():
        models += [EXPORTED_VARIANTS[name].model, EXPORTED_VARIANTS[name].ensemble]
    return models


@pytest.fixture(scope="module")
def variant_server(variant_repository):
    from geneformer_triton.serving.server import LocalTritonServer

    with LocalTritonServer(variant_repository, models=_served_models(), model_config_name="cpu") as server:
        yield server


def test_precision_option_selects_formats():
    assert formats_for(["int8"]) == ["onnx_isp_reduced_int8", "onnx_int8", "onnx_int8_packed"]
    assert formats_for(["bf16", "fp32"]) == ["onnx", "onnx_isp", "onnx_isp_reduced", "onnx_packed", "torchscript",
                                             "torchscript_bf16"]
    with pytest.raises(ValueError, match="unknown precisions"):
        formats_for(["int4"])
    with pytest.raises(ValueError, match="no export format"):
        formats_for(["int8"], ["onnx", "torchscript"])


def test_export_writes_only_the_requested_precisions(variant_repository, loaded_model):
    for precision, name in VARIANTS.items():
        fmt = EXPORTED_VARIANTS[name]
        version = variant_repository / fmt.model / "1"
        manifest = json.loads((version / "manifest.json").read_text())
        assert manifest["precision"] == precision and manifest["triton_model"] == fmt.model
        assert manifest["weights_sha256"] == loaded_model.weights_sha256
        assert (version / fmt.filename).is_file()
        assert (variant_repository / fmt.ensemble / "config.pbtxt").is_file()
    assert not (variant_repository / "geneformer_onnx" / "1" / "model.onnx").exists()  # fp32 not asked for
    int8 = onnx.load(str(variant_repository / "geneformer_onnx_int8" / "1" / "model.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"DynamicQuantizeMatMul"} & ops or {"MatMulInteger"} & ops, ops
    assert onnx.TensorProto.INT8 in {t.data_type for t in int8.graph.initializer}
    assert not (variant_repository / "geneformer_onnx_int8" / "1" / "model.portable.onnx").exists()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_variants_pass_their_fidelity_gate(variant_server, variant_repository, loaded_model, protocol):
    url = variant_server.http_url if protocol == "http" else variant_server.grpc_url
    manifests = local_manifests(variant_repository)
    with GeneformerClient(url, protocol) as client:
        models = discover_models(client, manifests, only=_served_models()[1:])
        assert {m.name: m.precision for m in models} == {
            **{EXPORTED_VARIANTS[n].model: p for p, n in VARIANTS.items()},
            **{EXPORTED_VARIANTS[n].ensemble: p for p, n in VARIANTS.items()}}
        report = check_server(client, loaded_model, n_cells=N_CELLS, models=models, manifests=manifests)
    assert report.token_mismatches == 0
    assert report.passed, [str(r) for r in report.results]
    assert all(r.cosine_min >= 0.999 for r in report.results)


def test_gate_rejects_other_weights(variant_server, variant_repository, celltypist_tokens, v1_vocabulary):
    """Negative control: the served int8 embeddings checked against another model's reference fail, and a
    manifest claiming other weights is reported even when the embeddings would pass."""
    from geneformer_triton.client.check import manifest_problems
    from geneformer_triton.model.loading import random_geneformer

    other = random_geneformer(MODEL_NAME, seed=1, vocabulary=v1_vocabulary)
    cells = celltypist_tokens[:N_CELLS]
    with GeneformerClient(variant_server.http_url, "http") as client:
        served = client.embed_tokens(cells, "geneformer_onnx_int8")
        models = discover_models(client, local_manifests(variant_repository), only=["geneformer_onnx_int8"])
    wrong_reference = embed_token_cells(torch_encode_fn(other.encoder()), cells, batch_size=8)
    assert not compare_variant("int8 vs other weights", "int8", served, wrong_reference).passed
    assert "geneformer_onnx_int8" in manifest_problems(models, local_manifests(variant_repository), other)
