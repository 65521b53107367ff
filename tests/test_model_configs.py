"""Generated Triton configs: the checked-in ones are golden files of export/model_configs.py.

Every config.pbtxt and configs/{cpu,gpu}.pbtxt under model_repository/ (and the TensorRT ones under
deploy/) is regenerated from geneformer_triton/core/contract.py and compared byte for byte; a changed spec
must make the comparison fail. Each generated file parses with Triton's own ModelConfig protobuf.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from geneformer_triton.core import contract, isp_service
from geneformer_triton.export import model_configs as gen
from geneformer_triton.model.specs import DEFAULT_MODEL, MODEL_SPECS

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"
GOLDEN = [(REPOSITORY, g) for g in gen.repository_configs()] + [(ROOT / "deploy", g) for g in gen.deploy_configs()]


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


@pytest.mark.parametrize("folder,generated", GOLDEN, ids=[g.path for _, g in GOLDEN])
def test_checked_in_config_is_the_generated_one(folder, generated):
    path = folder / generated.path
    assert path.is_file(), f"{path} missing: run python -m geneformer_triton.export.model_configs --write"
    assert path.read_text() == generated.text(), f"{path} differs from the contract: python -m geneformer_triton.export.model_configs --write"
    assert parse(path.read_text()) == generated.config


def test_every_checked_in_config_is_generated():
    """No hand-written config hides beside the generated ones."""
    on_disk = {p.relative_to(REPOSITORY).as_posix() for p in REPOSITORY.glob("*/config.pbtxt")}
    on_disk |= {p.relative_to(REPOSITORY).as_posix() for p in REPOSITORY.glob("*/configs/*.pbtxt")}
    assert on_disk == {g.path for g in gen.repository_configs()}


def test_a_changed_spec_fails_the_comparison(tmp_path):
    """Negative controls: another size, another precision, a stray edit: the golden comparison must fail."""
    gen.write_configs(tmp_path, gen.repository_configs())
    assert gen.stale_configs(tmp_path, gen.repository_configs()) == []
    wider = gen.repository_configs(dataclasses.replace(contract.DEFAULT_SHAPE, hidden_size=512))
    stale = gen.stale_configs(tmp_path, wider)
    assert "geneformer_onnx/config.pbtxt" in stale and "geneformer_embed_torchscript/config.pbtxt" in stale
    assert "geneformer_tokenizer/config.pbtxt" not in stale  # the tokenizer does not depend on the hidden size
    longer = gen.stale_configs(tmp_path, gen.repository_configs(dataclasses.replace(contract.DEFAULT_SHAPE, input_size=4096)))
    assert {"geneformer_tokenizer/config.pbtxt", "geneformer_isp/config.pbtxt", "geneformer_onnx/configs/gpu.pbtxt"} <= set(longer)
    fp16 = dataclasses.replace(contract.ENCODER_VARIANTS["onnx"], precision="fp16")
    changed = gen.encoder_config(fp16, contract.DEFAULT_SHAPE, "gpu")
    assert changed.text() != (REPOSITORY / changed.path).read_text()
    edited = tmp_path / "geneformer_onnx" / "config.pbtxt"
    edited.write_text(edited.read_text().replace("1000", "100"))
    assert gen.stale_configs(tmp_path, gen.repository_configs()) == ["geneformer_onnx/config.pbtxt"]
    assert gen.main([]) == 0  # the checked-in tree is current


def test_default_shape_is_the_default_model():
    spec = MODEL_SPECS[DEFAULT_MODEL]
    assert DEFAULT_MODEL == "gf-6L-10M-i2048"
    assert contract.DEFAULT_SHAPE == spec.shape == contract.ServedShape(256, 2048, False)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_every_model_size_generates_valid_configs(name):
    spec = MODEL_SPECS[name]
    shape = spec.shape
    for generated in gen.repository_configs(shape) + gen.deploy_configs(shape):
        config = parse(generated.text())  # Triton's schema: unknown fields and bad enums are rejected
        assert config.name == generated.path.split("/")[0]
        for output in config.output:
            if output.name in contract.cell_embedding_outputs():
                assert list(output.dims) == [spec.hidden_size]
        params = {k: v.string_value for k, v in config.parameters.items()}
        if contract.PARAM_INPUT_SIZE in params:
            assert params[contract.PARAM_INPUT_SIZE] == str(spec.input_size)
            assert params[contract.PARAM_SPECIAL_TOKENS] == str(spec.special_tokens).lower()
        for warm in config.model_warmup:
            assert all(list(t.dims) == [spec.input_size] for t in warm.inputs.values())


def test_ensembles_wire_their_encoder_tensors():
    for variant in contract.EXPORTED_VARIANTS.values():
        if not variant.embeds:
            continue
        config = parse((REPOSITORY / variant.ensemble / "config.pbtxt").read_text())
        tokenizer, encoder = config.ensemble_scheduling.step
        assert tokenizer.model_name == contract.TOKENIZER_MODEL and encoder.model_name == variant.model
        encoder_config = parse((REPOSITORY / variant.model / "config.pbtxt").read_text())
        assert set(encoder.input_map) == {t.name for t in encoder_config.input}
        assert set(encoder.output_map) <= {t.name for t in encoder_config.output}
        assert dict(tokenizer.output_map).keys() == {"input_ids", "attention_mask"}


def test_isp_config_carries_encoder_signatures_and_isp_tensors():
    config = parse((REPOSITORY / contract.ISP_MODEL / "config.pbtxt").read_text())
    assert tuple(t.name for t in config.input) == isp_service.INPUTS
    assert tuple(t.name for t in config.output) == isp_service.OUTPUTS
    # one cell per request, several requests per execute (issue 15): batching on, every input ragged
    assert config.max_batch_size > 1 and config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    assert all(t.allow_ragged_batch for t in config.input)
    params = {k: v.string_value for k, v in config.parameters.items()}
    allowed = params[contract.PARAM_ALLOWED_ENCODERS].split(",")
    assert params[contract.PARAM_ENCODER_MODEL] in allowed
    for model in allowed:
        signature = json.loads(params[contract.PARAM_ENCODER_SIGNATURE + model])
        if model == contract.ENCODER_VARIANTS["trt"].model:
            encoder = parse((ROOT / "deploy" / model / "config.pbtxt").read_text())
        else:
            encoder = parse((REPOSITORY / model / "config.pbtxt").read_text())
        names = contract.tensor_names(model)
        extra_inputs, outputs = ((contract.ISP_REDUCED_INPUTS, contract.ISP_REDUCED_OUTPUTS)
                                 if signature["graph"] == contract.ISP_REDUCED_GRAPH else ((), ("cell_embedding", "token_embeddings")))
        assert signature["graph"] == contract.VARIANT_OF_MODEL[model].graph
        assert ([t.name for t in encoder.input] == [signature[k] for k in ("input_ids", "attention_mask", *extra_inputs)]
                == [*names.inputs, *extra_inputs])
        assert [t.name for t in encoder.output] == [signature[k] for k in outputs]
        assert signature["max_batch_size"] == encoder.max_batch_size
        assert [signature["hidden_size"]] == list(encoder.output[0].dims)


def test_contract_names_are_consistent():
    assert len(set(contract.SERVED_MODELS)) == len(contract.SERVED_MODELS)
    assert contract.TORCHSCRIPT_TENSORS.as_dict()["input_ids"] == "input_ids__0"
    assert contract.ENSEMBLE_FOR["geneformer_onnx"] == "geneformer_embed_onnx"
    assert "geneformer_onnx_isp" not in contract.ENSEMBLE_FOR  # fixed-layer ISP encoder: no ensemble
    assert contract.encoder_variant("geneformer_torchscript_bf16").precision == "bf16"
    with pytest.raises(ValueError, match="unknown encoder variant"):
        contract.encoder_variant("geneformer_onnx_fp8")
