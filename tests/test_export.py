"""Exported encoders (ONNX fp32/fp16, TorchScript) vs the fp32 PyTorch reference on real cells."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from export.onnx_export import OPSET, PORTABLE_NAME, onnx_input_names
from export.repository import ENCODER_FORMATS
from geneformer_triton.fidelity import compare_variant
from geneformer_triton.runtimes import embed_token_cells, onnx_encode_fn, torchscript_encode_fn
from geneformer_triton.tokenizer import pad_token_batch

SHAPES = [(1, 2048), (5, 2048), (1, 17), (5, 64)]  # (batch, length): maximum and short lengths


def _runtime(repository, name):
    fmt = ENCODER_FORMATS[name]
    folder = repository / fmt.model / "1"
    return (onnx_encode_fn(folder / "model.onnx") if fmt.kind == "onnx" else torchscript_encode_fn(folder / "model.pt")), fmt


@pytest.mark.parametrize("name", sorted(ENCODER_FORMATS))
def test_exported_encoder_fidelity_on_real_cells(exported_repository, reference_encoder, loaded_model, celltypist_tokens, name):
    encode, fmt = _runtime(exported_repository, name)
    if fmt.emb_layer is not None:  # a variant exported at a fixed layer (geneformer_onnx_isp)
        from geneformer_triton.runtimes import torch_encode_fn

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
        assert tokens is None if fmt.packed else tokens.shape == (batch, ids.shape[1], 256)  # packed: cells only
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
    for fmt in ENCODER_FORMATS.values():
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


def test_cli_export_writes_repository(tmp_path):
    """`gftriton export` with random weights and dictionaries from a folder, ONNX only (fast)."""
    from conftest import REPO_ROOT, SHARED
    import shutil

    repository = tmp_path / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository, ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.json"))
    result = subprocess.run(
        [sys.executable, "-m", "geneformer_triton.cli", "export", "--repository", str(repository), "--random-weights",
         "--dictionaries", str(SHARED / "geneformer" / "v1"), "--formats", "onnx"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (repository / "geneformer_onnx" / "1" / "model.onnx").is_file()
    assert (repository / "geneformer_tokenizer" / "1" / "gene_median_dictionary.json").is_file()
    assert "RANDOM" in result.stderr
