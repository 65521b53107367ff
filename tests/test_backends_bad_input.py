"""What Triton's real C++ backends answer to malformed encoder input (raw ``geneformer_onnx`` through
``libtriton_onnxruntime.so``, ``geneformer_torchscript`` through ``libtriton_pytorch.so``), pinned so that
the table in docs/deployment.md §9 stays true. Neither backend validates token ids or mask values against
the model: Triton core checks only dtype and shape against the config; everything else is whatever the
graph does (an out-of-range Gather fails with HTTP 500, a mask value other than 0/1 is used as given).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from geneformer_triton.core.contract import ENCODER_VARIANTS

MODELS = {kind: (v.model, v.tensors.input_ids, v.tensors.attention_mask, v.tensors.cell_embedding)
          for kind, v in ((k, ENCODER_VARIANTS[k]) for k in ("onnx", "torchscript"))}
IDS = np.array([[5, 6, 7, 8]], dtype=np.int64)
MASK = np.ones_like(IDS)
TORCH_INDEX = r"RuntimeError: index out of range in self"


@pytest.fixture(scope="module")
def infer(triton_server, v1_vocabulary):
    assert triton_server.backend_choice.kind == "real", triton_server.backend_choice.reason

    client = httpclient.InferenceServerClient(triton_server.http_url)

    def run(kind: str, ids: np.ndarray, mask: np.ndarray, dtype: str = "INT64") -> np.ndarray:
        model, ids_name, mask_name, output = MODELS[kind]
        tensors = []
        for name, array in ((ids_name, ids), (mask_name, mask)):
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array.astype(np.int32 if dtype == "INT32" else np.int64))
            tensors.append(tensor)
        return client.infer(model, tensors).as_numpy(output)

    yield run
    client.close()


def _error(run, *args) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        run(*args)
    return info.value


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_wrong_dtype_is_refused_by_triton_core_with_400(infer, kind):
    error = _error(infer, kind, IDS, MASK, "INT32")
    assert error.status() == "400"
    assert f"data-type is 'INT32', but model '{MODELS[kind][0]}' expects 'INT64'" in error.message()


def test_id_at_vocab_size_onnx_500_names_the_range(infer, v1_vocabulary):
    vocab = len(v1_vocabulary)
    error = _error(infer, "onnx", np.array([[5, vocab, 7, 8]]), MASK)
    assert error.status() == "500"
    assert f"indices element out of data bounds, idx={vocab} must be within the inclusive range [-{vocab},{vocab - 1}]" in error.message()


def test_negative_id_onnx_is_accepted_and_wraps_to_the_last_vocabulary_row(infer, v1_vocabulary):
    """ONNX Gather takes negative indices from the end: -1 silently embeds the last token of the vocabulary."""
    vocab = len(v1_vocabulary)
    got = infer("onnx", np.array([[5, -1, 7, 8]]), MASK)
    np.testing.assert_allclose(got, infer("onnx", np.array([[5, vocab - 1, 7, 8]]), MASK), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, infer("onnx", IDS, MASK), atol=1e-3)


@pytest.mark.parametrize("ids", [[5, -1, 7, 8], [5, 25426, 7, 8], [5, 10**12, 7, 8]], ids=["negative", "vocab", "huge"])
def test_out_of_range_ids_torchscript_500_without_exporter_paths(infer, ids):
    error = _error(infer, "torchscript", np.array([ids]), MASK)
    assert error.status() == "500"
    message = error.message()
    assert message.startswith("PyTorch execute failure") and TORCH_INDEX in message
    # the backend relays TorchScript's traceback; the export dropped the archive's debug records, so it shows
    # the archive's own code/__torch__ frames but no path or line of the exporting machine's Python files
    assert "Traceback of TorchScript" in message and 'File "code/__torch__' in message
    assert ".py(" not in message and not re.search(r"(?<![\w.])/[\w.+@-]+/", message), message


def test_too_long_input_500_from_the_position_embeddings(infer):
    long = np.full((1, 2049), 5, dtype=np.int64)
    onnx_error = _error(infer, "onnx", long, np.ones_like(long))
    assert onnx_error.status() == "500"
    assert "/position_embeddings/Gather" in onnx_error.message()
    assert "idx=2048 must be within the inclusive range [-2048,2047]" in onnx_error.message()
    torch_error = _error(infer, "torchscript", long, np.ones_like(long))
    assert torch_error.status() == "500" and TORCH_INDEX in torch_error.message()


def test_mask_value_2_onnx_acts_as_1_torchscript_weights_the_token(infer):
    mask2 = np.array([[1, 2, 1, 1]])
    np.testing.assert_allclose(infer("onnx", IDS, mask2), infer("onnx", IDS, MASK), rtol=1e-5, atol=1e-6)
    assert not np.allclose(infer("torchscript", IDS, mask2), infer("torchscript", IDS, MASK), atol=1e-3)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mask_minus_one_is_accepted_and_changes_the_embedding(infer, kind):
    got = infer(kind, IDS, np.array([[1, -1, 1, 1]]))
    assert np.isfinite(got).all()
    assert not np.allclose(got, infer(kind, IDS, MASK), atol=1e-3)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_all_zero_mask_gives_a_zero_embedding(infer, kind):
    got = infer(kind, IDS, np.zeros_like(IDS))
    assert got.shape == (1, 256) and np.all(got == 0.0)
