"""What a client reads when a served TorchScript model fails: what failed, never a traceback or a path of
the server (``core.triton_errors.public_message``); the full text stays in the server log. The failures
are real: a traced encoder given a token id beyond its embedding table, in process and behind
``geneformer_isp`` on a real tritonserver with Triton's C++ pytorch backend."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from geneformer_triton.client.isp_spec import infer_cell
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError
from geneformer_triton.core.contract import ENCODER_VARIANTS, ISP_MODEL
from geneformer_triton.core.triton_errors import public_message
from geneformer_triton.export.repository import export_model_repository
from geneformer_triton.export.torchscript_export import export_torchscript
from geneformer_triton.model.encoder import GeneformerEncoder
from geneformer_triton.serving.server import LocalTritonServer

TORCHSCRIPT = ENCODER_VARIANTS["torchscript"]
TINY_VOCAB = 64
WHAT = "index out of range in self"  # libtorch's message for an id beyond the embedding table
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[\w.+@-]+/")


def leaks(message: str) -> list[str]:
    """The traceback markers and absolute paths in ``message`` ([] when a client may read it)."""
    return [marker for marker in ("Traceback", 'File "') if marker in message] + ABSOLUTE_PATH.findall(message)


def tiny_encoder(hidden: int = 16, heads: int = 2) -> GeneformerEncoder:
    """The real GeneformerEncoder around a 1-layer random BertModel with a TINY_VOCAB-row embedding table."""
    config = transformers.BertConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                     intermediate_size=32, max_position_embeddings=2048, hidden_act="relu")
    torch.manual_seed(0)
    return GeneformerEncoder(transformers.BertModel(config, add_pooling_layer=False), attention="math").eval()


def failure_text(model_path: Path) -> str:
    """The error text of ``model_path`` run on a token id beyond its table (what a pytorch backend relays)."""
    module = torch.jit.load(str(model_path))
    ids = torch.tensor([[5, TINY_VOCAB + 10, 7]])
    with pytest.raises(RuntimeError) as info:
        module(ids, torch.ones_like(ids))
    return str(info.value)


def test_a_torchscript_failure_is_cut_to_what_failed(tmp_path):
    encoder = tiny_encoder()
    ids = torch.randint(2, TINY_VOCAB, (2, 8))
    with torch.no_grad():
        traced = torch.jit.trace(encoder, (ids, torch.ones_like(ids)), check_trace=False)
    traced.save(str(tmp_path / "model.pt"))  # a plain torch.jit.save: the archive keeps its debug records
    raw = failure_text(tmp_path / "model.pt")
    assert "Traceback of TorchScript" in raw and ABSOLUTE_PATH.search(raw), raw  # the leak is real
    public = public_message(raw)
    assert not leaks(public), public
    assert public.endswith(f"RuntimeError: {WHAT}"), public
    assert public.startswith("The following operation failed in the TorchScript interpreter."), public


def test_plain_messages_are_kept_and_paths_dropped():
    """Negative control: our own messages (no traceback, no absolute path) come back unchanged."""
    plain = [
        "counts must be finite, >= 0 and <= 1e9; cell 0 holds -1.0 at gene 3",
        "attention_mask must be 0/1 with a 1 in every row (row 2 has none)",
        "dictionary_dir ../geneformer_tokenizer/1 is read at load; HTTP 400 / INVALID_ARGUMENT",
    ]
    for message in plain:
        assert public_message(message) == message
    assert public_message("[Errno 2] No such file or directory: '/srv/models/geneformer_isp/1/x.json'") == (
        "[Errno 2] No such file or directory: '<path>'")
    python = 'Traceback (most recent call last):\n  File "/srv/app/model.py", line 3, in f\n    1 / 0\nZeroDivisionError: division by zero'
    assert public_message("batch failed\n" + python) == "batch failed ZeroDivisionError: division by zero"


def test_exported_torchscript_carries_no_exporter_paths(tmp_path):
    encoder = tiny_encoder()
    path = export_torchscript(encoder, tmp_path / "1")
    records = zipfile.ZipFile(path).namelist()
    assert records and not [r for r in records if r.endswith(".debug_pkl")], records
    assert [p.name for p in (tmp_path / "1").iterdir()] == ["model.pt"]  # no work files left
    ids = torch.randint(2, TINY_VOCAB, (3, 9))
    with torch.no_grad():
        expected = encoder(ids, torch.ones_like(ids))[0]
        got = torch.jit.load(str(path))(ids, torch.ones_like(ids))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    raw = failure_text(path)
    assert WHAT in raw and not ABSOLUTE_PATH.search(raw), raw  # only the archive's own code/__torch__ frames


@pytest.fixture(scope="module")
def failing_torchscript_server(tmp_path_factory, loaded_model):
    """A real tritonserver serving geneformer_isp over a geneformer_torchscript whose table has TINY_VOCAB
    rows: every real gene token is beyond it (the same hidden size as the model the configs are for)."""
    root = tmp_path_factory.mktemp("failing")
    repository = root / "model_repository"
    export_model_repository(loaded_model, repository, formats=["torchscript"])
    version = repository / TORCHSCRIPT.model / "1"
    (version / "model.pt").unlink()
    hidden = loaded_model.config.hidden_size
    shutil.move(export_torchscript(tiny_encoder(hidden, heads=4), root / "tiny"), version / "model.pt")
    with LocalTritonServer(repository, models=[ISP_MODEL, TORCHSCRIPT.model], model_config_name="cpu") as server:
        assert server.backend_choice.kind == "real", server.backend_choice.reason
        yield server


@pytest.mark.e2e
def test_isp_relays_a_torchscript_failure_without_traceback_or_paths(failing_torchscript_server, v1_vocabulary):
    server = failing_torchscript_server
    genes = [g for g, token in sorted(v1_vocabulary.token_ids.items(), key=lambda item: item[1]) if token > TINY_VOCAB][:5]
    cell = {"gene_ids": np.array([g.encode() for g in genes], dtype=object), "counts": np.arange(5, 0, -1, dtype=np.float32),
            "n_counts": np.array([15.0], np.float32), "perturbation": np.array([b"delete"], dtype=object),
            "semantics": np.array([b"ours"], dtype=object), "encoder_model": np.array([TORCHSCRIPT.model.encode()], dtype=object)}
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with GeneformerClient(url, protocol, concurrency=1, timeout_s=120) as client:
            client.wait_ready(60, ISP_MODEL)
            with pytest.raises(InferenceError) as info:
                infer_cell(client, ISP_MODEL, cell, ["cell_shift"])  # one cell, batch dim 1 added
        message = str(info.value)
        assert f"encoder model '{TORCHSCRIPT.model}' failed a batch" in message and WHAT in message, message
        assert not leaks(message), message

    # what the sanitizer had to cut: the backend's own text, as a client of the raw encoder reads it
    direct = httpclient.InferenceServerClient(server.http_url)
    try:
        tensors = []
        ids = np.array([[5, TINY_VOCAB + 10, 7]], dtype=np.int64)
        for name, array in ((TORCHSCRIPT.tensors.input_ids, ids), (TORCHSCRIPT.tensors.attention_mask, np.ones_like(ids))):
            tensor = httpclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        with pytest.raises(InferenceServerException) as raw:
            direct.infer(TORCHSCRIPT.model, tensors)
    finally:
        direct.close()
    assert "Traceback of TorchScript" in raw.value.message() and WHAT in raw.value.message(), raw.value.message()
    assert "Traceback of TorchScript" in server.log_tail(400)  # the full text is in the server log
