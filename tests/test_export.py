"""Exported encoders (ONNX fp32/fp16, TorchScript) vs the fp32 PyTorch reference on real cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest

from geneformer_triton.core.contract import EXPORTED_VARIANTS, PACKED_GRAPH
from geneformer_triton.core.fidelity import compare_variant
from geneformer_triton.core.tokenizer import pad_token_batch
from geneformer_triton.export.formats import EMBEDDING_FORMATS
from geneformer_triton.export.onnx_export import OPSET, PORTABLE_NAME, onnx_input_names
from geneformer_triton.model.runtimes import embed_token_cells, onnx_encode_fn, torchscript_encode_fn

SHAPES = [(1, 2048), (5, 2048), (1, 17), (5, 64)]  # (batch, length): maximum and short lengths


def _runtime(repository, name):
    fmt = EXPORTED_VARIANTS[name]
    folder = repository / fmt.model / "1"
    return (onnx_encode_fn(folder / "model.onnx") if fmt.kind == "onnx" else torchscript_encode_fn(folder / "model.pt")), fmt


@pytest.mark.parametrize("name", sorted(EMBEDDING_FORMATS))
def test_exported_encoder_fidelity_on_real_cells(exported_repository, reference_encoder, loaded_model, celltypist_tokens, name):
    encode, fmt = _runtime(exported_repository, name)
    if fmt.emb_layer is not None:  # a variant exported at a fixed layer (geneformer_onnx_isp)
        from geneformer_triton.model.runtimes import torch_encode_fn

        reference_encoder = torch_encode_fn(loaded_model.encoder(emb_layer=fmt.emb_layer))
    cells = celltypist_tokens[:24]
    reference = embed_token_cells(reference_encoder, cells, batch_size=8)
    for batch_size in (1, 8):
        result = compare_variant(name, fmt.precision, embed_token_cells(encode, cells, batch_size), reference)
        assert result.passed, result
    for batch, length in SHAPES:
        cells = [cell[:length] for cell in celltypist_tokens[:batch]]
        ids, mask = pad_token_batch(cells)
        cell, tokens = encode(ids, mask)
        ref_cell, ref_tokens = reference_encoder(ids, mask)
        assert cell.shape == ref_cell.shape == (batch, 256)
        assert tokens is None if fmt.graph == PACKED_GRAPH else tokens.shape == (batch, ids.shape[1], 256)  # packed: cells only
        assert compare_variant(name, fmt.precision, cell, ref_cell).passed, (batch, length)


def test_onnx_files_are_valid_and_dynamic(exported_repository):
    for model in ("geneformer_onnx", "geneformer_onnx_fp16"):
        path = exported_repository / model / "1" / "model.onnx"
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
        ops = {n.op_type for n in graph.node}
        assert "Attention" in ops, "onnxruntime attention fusion did not happen"
    portable = exported_repository / "geneformer_onnx" / "1" / PORTABLE_NAME
    model = onnx.load(str(portable))
    assert model.opset_import[0].version == OPSET >= 17
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "portable graph must use standard ops only"
    assert onnx_input_names(portable) == ["input_ids", "attention_mask"]
    fp16_types = {t.data_type for t in onnx.load(str(exported_repository / "geneformer_onnx_fp16" / "1" / "model.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in fp16_types


def test_manifests_record_provenance(exported_repository, loaded_model):
    for fmt in EXPORTED_VARIANTS.values():
        manifest = json.loads((exported_repository / fmt.model / "1" / "manifest.json").read_text())
        assert manifest["model_name"] == "gf-6L-10M-i2048"
        assert manifest["precision"] == fmt.precision
        assert manifest["weights_sha256"] == loaded_model.weights_sha256
        assert manifest["config_sha256"] == loaded_model.config_sha256()
        assert manifest["random_weights"] is True
        assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(manifest["tool_versions"])
        assert (manifest["opset"] == OPSET) == (fmt.kind == "onnx")
    tokenizer = exported_repository / "geneformer_tokenizer" / "1"
    assert json.loads((tokenizer / "token_dictionary.json").read_text())["<pad>"] == 0


def test_tensorrt_command_says_what_is_missing(exported_repository, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "geneformer_triton.cli", "export-tensorrt",
         "--onnx", str(exported_repository / "geneformer_onnx" / "1" / PORTABLE_NAME), "--plan", str(tmp_path / "model.plan")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "tensorrt" in (result.stdout + result.stderr).lower()
    assert not (tmp_path / "model.plan").exists()


def _gftriton(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    from conftest import REPO_ROOT

    return subprocess.run([sys.executable, "-m", "geneformer_triton.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT))


@pytest.mark.e2e
def test_cli_export_into_a_new_folder_is_served(tmp_path):
    """`gftriton export --random-weights --repository NEW` then `gftriton serve --repository NEW` serves the
    ensembles and the ISP model through the real backends (ONNX + TorchScript here, to keep it short)."""
    from conftest import REPO_ROOT
    from test_security_lifecycle import _wait_for

    from geneformer_triton.client.triton_client import GeneformerClient
    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.serving.server import free_port

    repository = tmp_path / "new" / "repo"
    result = _gftriton("export", "--random-weights", "--repository", str(repository), "--formats", "onnx,torchscript")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM" in result.stderr
    tokenizer = repository / "geneformer_tokenizer" / "1"
    for name in ("token_dictionary.json", "gene_median_dictionary.json", "gene_name_id_dict.json", "manifest.json", "model.py"):
        assert (tokenizer / name).is_file(), name
    assert (repository / "geneformer_isp" / "1" / "model.py").is_file()
    assert not (repository / "geneformer_embed_onnx_fp16").exists()  # only the exported formats' ensembles

    ports = (free_port(), free_port(), free_port())
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("GFTRITON_ADMIN_KEY", None)
    command = [sys.executable, "-m", "geneformer_triton.cli", "serve", "--repository", str(repository),
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
    try:
        _wait_for(r"tritonserver ready", log, proc, timeout_s=180)
        vocabulary = load_vocabulary(tokenizer)
        symbols = sorted(vocabulary.gene_name_to_id)[:40]
        genes = np.array([vocabulary.symbols_to_ensembl(symbols)], dtype=object)
        counts = np.arange(1, len(symbols) + 1, dtype=np.float32)[None, :]
        with GeneformerClient(f"127.0.0.1:{ports[1]}", "grpc") as client:
            for ensemble in ("geneformer_embed_onnx", "geneformer_embed_torchscript"):
                embedding = client.embed_cells_batch(genes, counts, model=ensemble)
                assert embedding.shape == (1, 256) and np.isfinite(embedding).all(), ensemble
            assert "geneformer_isp" in client.ready_models()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


def test_export_of_another_size_leaves_the_checked_in_tree_unchanged(tmp_path):
    """A 12-layer, 512-wide model exported into the checked-in repository is refused before anything is
    written (its configs are golden files of the default model); into its own folder it gets its own configs."""
    from conftest import REPO_ROOT
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    def tracked_status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "model_repository", "deploy"],
                              capture_output=True, text=True, check=True, cwd=str(REPO_ROOT)).stdout

    def tree_state() -> dict:
        return {p: p.stat().st_mtime_ns for p in (REPO_ROOT / "model_repository").rglob("*") if p.is_file()}

    before, files_before = tracked_status(), tree_state()
    result = _gftriton("export", "--model", "gf-12L-40M-i2048", "--random-weights", "--formats", "torchscript",
                       "--repository", str(REPO_ROOT / "model_repository"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--repository NEW_DIR" in result.stderr and "hidden 512" in result.stderr
    assert tracked_status() == before and tree_state() == files_before

    own = tmp_path / "gf12"
    result = _gftriton("export", "--model", "gf-12L-40M-i2048", "--random-weights", "--formats", "torchscript",
                       "--repository", str(own))
    assert result.returncode == 0, result.stderr[-2000:]
    config = text_format.Parse((own / "geneformer_torchscript" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [list(o.dims) for o in config.output] == [[512], [-1, 512]]
    ensemble = text_format.Parse((own / "geneformer_embed_torchscript" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(ensemble.output[0].dims) == [512]
    assert json.loads((own / "geneformer_torchscript" / "1" / "manifest.json").read_text())["num_hidden_layers"] == 12
    assert tracked_status() == before
