"""Negative controls of the fidelity gates through a real tritonserver, and the positive control.

One server serves, from one temporary repository, the correct fp32 and fp16 ONNX exports and every broken
variant of ``fidelity_variants`` (each a separate model). ``gftriton check`` must exit 1 on the broken ones
(each row failing its gate) and 0 on the correct ones; a corrupted export (one LayerNorm bias of
``model.onnx`` shifted by 0.02) must make both ``gftriton check`` and ``gftriton fidelity`` exit 1.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MODEL_NAME, SHARED
from fidelity_variants import ENCODER_MODEL, LAST_LN_BIAS, TYPICAL_BIAS_SHIFT, build_variant_repository, edit_initializer

from geneformer_triton.cli import main as gftriton

POSITIVE = [ENCODER_MODEL, f"{ENCODER_MODEL}_fp16"]
CHECK_CELLS = 16
MODEL_ARGS = ["--model", MODEL_NAME, "--random-weights", "--dictionaries", str(SHARED / "geneformer" / "v1"),
              "--seed", "0"]


@pytest.fixture(scope="module")
def variant_server(exported_repository, loaded_model, tmp_path_factory):
    from geneformer_triton.serving.server import LocalTritonServer

    repository = tmp_path_factory.mktemp("variants") / "model_repository"
    broken = build_variant_repository(exported_repository, loaded_model, repository)
    with LocalTritonServer(repository, model_config_name="cpu") as server:
        yield server, broken


def _check(server, models: list[str], out) -> tuple[int, dict[str, dict]]:
    # small requests: the unfused variants materialize [batch, heads, L, L] attention scores
    code = gftriton(["check", "--url", server.grpc_url, "--protocol", "grpc", "--models", ",".join(models),
                     "--cells", str(CHECK_CELLS), "--batch-size", "4", "--out", str(out), *MODEL_ARGS])
    rows = json.loads((out / "served_fidelity.json").read_text())
    return code, {row["variant"]: row for row in rows}


@pytest.fixture(scope="module")
def all_variants_checked(variant_server, tmp_path_factory):
    server, broken = variant_server
    return _check(server, POSITIVE + broken, tmp_path_factory.mktemp("check_all")), broken


def test_every_broken_variant_fails_its_gate(all_variants_checked):
    (code, rows), broken = all_variants_checked
    assert code == 1
    for name in broken:
        assert not rows[name]["passed"] and rows[name]["failures"], (name, rows[name])
    for name in POSITIVE:
        assert rows[name]["passed"], rows[name]


def test_gates_catch_what_min_cosine_alone_misses(all_variants_checked):
    """Swapped Q/K and the reversed gene order keep a raw cosine (0.99998, 0.9998 measured) that the old
    reduced-precision threshold (0.999) accepted; the centred-cosine / relative-error gates reject them."""
    (_, rows), _ = all_variants_checked
    for name in ("broken_qk_swapped", "broken_genes_reversed"):
        assert rows[name]["cosine_min"] >= 0.999 and not rows[name]["passed"], rows[name]
        assert "centred_cosine_min" in rows[name]["failures"] or "rel_err" in rows[name]["failures"]
    assert rows["broken_rows_shuffled"]["nn_identity"] < 0.5


def test_correct_exports_pass_through_the_same_server(variant_server, tmp_path):
    server, _ = variant_server
    code, rows = _check(server, POSITIVE, tmp_path)
    assert code == 0 and all(row["passed"] for row in rows.values()), rows


def test_shifted_layer_norm_bias_fails_check(variant_server, tmp_path):
    """Done-when: one LayerNorm bias of model.onnx shifted by 0.02 -> `gftriton check` exits 1."""
    server, _ = variant_server
    code, rows = _check(server, ["broken_ln_bias_shifted"], tmp_path)
    assert code == 1 and not rows["broken_ln_bias_shifted"]["passed"]


def test_shifted_layer_norm_bias_fails_fidelity(exported_repository, tmp_path):
    """`gftriton fidelity` (in process, no server) on a repository whose model.onnx has the shifted bias."""
    repository = tmp_path / "model_repository"
    shutil.copytree(exported_repository / ENCODER_MODEL, repository / ENCODER_MODEL)
    shutil.copytree(exported_repository / "geneformer_tokenizer", repository / "geneformer_tokenizer")
    model = repository / ENCODER_MODEL / "1" / "model.onnx"
    edit_initializer(model, model, LAST_LN_BIAS, lambda b: b + TYPICAL_BIAS_SHIFT)
    args = ["fidelity", "--repository", str(repository), "--formats", "onnx", "--cells", str(CHECK_CELLS),
            "--out", str(tmp_path / "out"), *MODEL_ARGS]
    assert gftriton(args) == 1
    rows = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert rows and not any(row["passed"] for row in rows)
    shutil.copy(exported_repository / ENCODER_MODEL / "1" / "model.onnx", model)
    assert gftriton(args) == 0  # positive control: the same command on the correct export
