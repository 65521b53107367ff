"""Real tritonserver tests for geneformer_triton.serving.server and the local stand-in backends.

A tiny encoder with the same tensor names and dtypes as the Geneformer encoders (docs/DESIGN.md)
is exported to ONNX and TorchScript into a temporary model repository, served by the real
tritonserver 2.51 from nvidia-pytriton, once through Triton's real C++ ``onnxruntime`` and ``pytorch``
backends (built by ``make backends``; a missing build fails) and once through the Python-based
stand-ins (the fallback), and compared with the same files run in-process.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from geneformer_triton.core.contract import PLAIN_TENSORS, TORCHSCRIPT_TENSORS
from geneformer_triton.serving.server import (
    GpuNotAvailableError,
    LocalTritonServer,
    TritonServerError,
    find_tritonserver,
    host_has_gpu,
)

HIDDEN = 8
VOCAB = 64
MAX_BATCH = 8
RTOL, ATOL = 1e-5, 1e-6

ONNX_IN, ONNX_OUT = PLAIN_TENSORS.inputs, PLAIN_TENSORS.outputs
TS_IN, TS_OUT = TORCHSCRIPT_TENSORS.inputs, TORCHSCRIPT_TENSORS.outputs
MODELS = {"enc_onnx": (ONNX_IN, ONNX_OUT), "enc_ts": (TS_IN, TS_OUT)}


class TinyEncoder(torch.nn.Module):
    """Embedding + linear + tanh; masked mean over tokens (same I/O contract as the encoders)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        tokens = torch.tanh(self.proj(self.emb(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        cell = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return cell, tokens


def _config(name: str, platform: str, inputs, outputs, filename: str | None = None) -> str:
    ins = ", ".join(f'{{ name: "{n}" data_type: TYPE_INT64 dims: [ -1 ] }}' for n in inputs)
    outs = (
        f'{{ name: "{outputs[0]}" data_type: TYPE_FP32 dims: [ {HIDDEN} ] }}, '
        f'{{ name: "{outputs[1]}" data_type: TYPE_FP32 dims: [ -1, {HIDDEN} ] }}'
    )
    threads = "intra_op_thread_count" if platform == "onnxruntime_onnx" else "INTRA_OP_THREAD_COUNT"
    extra = f'default_model_filename: "{filename}"\n' if filename else ""
    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {MAX_BATCH}\n{extra}'
        f"input [ {ins} ]\noutput [ {outs} ]\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        # A long queue delay so that concurrent requests meet in one execute().
        "dynamic_batching { max_queue_delay_microseconds: 100000 }\n"
        f'parameters [ {{ key: "{threads}" value: {{ string_value: "1" }} }} ]\n'
    )


def _export_onnx(model: torch.nn.Module, path: Path) -> None:
    ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            "cell_embedding": {0: "batch"}, "token_embeddings": {0: "batch", 1: "length"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter is fast (0.2 s) ...
            torch.onnx.export(model, (ids, mask), str(path), input_names=list(ONNX_IN),
                              output_names=list(ONNX_OUT), dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        except Exception:  # ... fall back to the torch.export-based one where it is gone
            batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
            torch.onnx.export(model, (ids, mask), str(path), input_names=list(ONNX_IN),
                              output_names=list(ONNX_OUT),
                              dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
                              dynamo=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    (root / "enc_onnx" / "1").mkdir(parents=True)
    _export_onnx(model, root / "enc_onnx" / "1" / "model.onnx")
    (root / "enc_onnx" / "config.pbtxt").write_text(_config("enc_onnx", "onnxruntime_onnx", ONNX_IN, ONNX_OUT))
    (root / "enc_ts" / "1").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = (torch.randint(0, VOCAB, (2, 5)), torch.ones(2, 5, dtype=torch.int64))
        # a non-default file name exercises default_model_filename
        torch.jit.trace(model, example).save(str(root / "enc_ts" / "1" / "encoder.pt"))
    (root / "enc_ts" / "config.pbtxt").write_text(
        _config("enc_ts", "pytorch_libtorch", TS_IN, TS_OUT, filename="encoder.pt")
    )
    return root


@pytest.fixture(scope="module")
def reference(repo):
    """In-process runners: name -> f(ids, mask) -> (cell, tokens)."""
    session = ort.InferenceSession(str(repo / "enc_onnx" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(repo / "enc_ts" / "1" / "encoder.pt"))

    def run_onnx(ids, mask):
        return tuple(session.run(list(ONNX_OUT), {"input_ids": ids, "attention_mask": mask}))

    def run_ts(ids, mask):
        with torch.no_grad():
            cell, tokens = scripted(torch.from_numpy(ids), torch.from_numpy(mask))
        return cell.numpy(), tokens.numpy()

    return {"enc_onnx": run_onnx, "enc_ts": run_ts}


@pytest.fixture(scope="module", params=["real", "stand-in"])
def server(repo, tmp_path_factory, request):
    srv = LocalTritonServer(repo, work_dir=tmp_path_factory.mktemp("triton_work"), backends=request.param)
    srv.start(timeout_s=90)
    yield srv
    srv.stop()


def _cells(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (pad id 0) and the matching attention mask, int64 [batch, length]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for row in range(batch):
        keep = int(rng.integers(1, length + 1))
        ids[row, keep:] = 0
        mask[row, keep:] = 0
    return ids, mask


def _inputs(module, names, ids, mask, dtype: str = "INT64"):
    tensors = []
    for name, array in zip(names, (ids, mask)):
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------
def test_find_tritonserver_is_the_bundled_binary():
    binary = find_tritonserver()
    assert binary.name == "tritonserver" and os.access(binary, os.X_OK)


@pytest.mark.skipif(host_has_gpu(), reason="this host has a GPU")
def test_gpu_only_options_on_cpu_host_say_so(repo):
    with pytest.raises(GpuNotAvailableError, match="no NVIDIA GPU"):
        LocalTritonServer(repo, model_config_name="gpu").start(timeout_s=5)
    with pytest.raises(GpuNotAvailableError, match="allow_gpu_metrics"):
        LocalTritonServer(repo, allow_gpu_metrics=True).start(timeout_s=5)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_http_matches_in_process(server, reference, model):
    inputs, outputs = MODELS[model]
    ids, mask = _cells(3, 7, seed=1)
    want_cell, want_tokens = reference[model](ids, mask)
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer(model, _inputs(httpclient, inputs, ids, mask))
        _assert_close(result.as_numpy(outputs[0]), want_cell)
        _assert_close(result.as_numpy(outputs[1]), want_tokens)
        # only the requested output comes back
        only = client.infer(model, _inputs(httpclient, inputs, ids, mask),
                            outputs=[httpclient.InferRequestedOutput(outputs[0])])
        assert [o["name"] for o in only.get_response()["outputs"]] == [outputs[0]]
        _assert_close(only.as_numpy(outputs[0]), want_cell)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_grpc_matches_in_process(server, reference, model):
    inputs, outputs = MODELS[model]
    ids, mask = _cells(2, 11, seed=2)
    want_cell, want_tokens = reference[model](ids, mask)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_model_ready(model)
        result = client.infer(model, _inputs(grpcclient, inputs, ids, mask))
        _assert_close(result.as_numpy(outputs[0]), want_cell)
        _assert_close(result.as_numpy(outputs[1]), want_tokens)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_concurrent_requests_are_batched_in_one_execute(server, reference, model):
    inputs, outputs = MODELS[model]
    length = 6
    # 5 requests of 1, 2, 1, 2, 1 rows: 7 rows fit in one batch of max_batch_size 8
    cells = [_cells(1 + i % 2, length, seed=10 + i) for i in range(5)]
    with httpclient.InferenceServerClient(server.http_url, concurrency=len(cells)) as client:
        before = client.get_inference_statistics(model)["model_stats"][0]
        # async_infer sends all requests at once (the HTTP client is gevent-based, not thread-safe)
        pending = [client.async_infer(model, _inputs(httpclient, inputs, ids, mask))
                   for ids, mask in cells]
        results = [p.get_result() for p in pending]
        after = client.get_inference_statistics(model)["model_stats"][0]
    for (ids, mask), result in zip(cells, results):
        want_cell, want_tokens = reference[model](ids, mask)
        _assert_close(result.as_numpy(outputs[0]), want_cell)
        _assert_close(result.as_numpy(outputs[1]), want_tokens)
    executions = int(after["execution_count"]) - int(before["execution_count"])
    rows = int(after["inference_count"]) - int(before["inference_count"])
    assert rows == sum(ids.shape[0] for ids, _ in cells)
    # fewer execute() calls than requests: several requests were run in one execute()
    assert executions < len(cells), (executions, len(cells))


# what each backend answers to input_ids [2, 5] with attention_mask [2, 4]
BACKEND_ERRORS = {
    ("stand-in", "enc_onnx"): "local python stand-in",
    ("stand-in", "enc_ts"): "local python stand-in",
    ("real", "enc_onnx"): "onnx runtime error 1: .*Attempting to broadcast an axis",
    ("real", "enc_ts"): "PyTorch execute failure",
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_bad_requests_get_errors_and_the_model_keeps_serving(server, reference, model):
    inputs, outputs = MODELS[model]
    ids, mask = _cells(2, 5, seed=3)
    with httpclient.InferenceServerClient(server.http_url) as client:
        # wrong dtype over the wire: rejected by Triton against the config
        with pytest.raises(InferenceServerException, match="(?i)data-?type"):
            client.infer(model, _inputs(httpclient, inputs, ids.astype(np.int32),
                                        mask.astype(np.int32), dtype="INT32"))
        # right dtype, inconsistent lengths: reaches the backend, which answers an error
        bad_mask = np.ones((2, 4), dtype=np.int64)
        with pytest.raises(InferenceServerException, match=BACKEND_ERRORS[server.backend_choice.kind, model]):
            client.infer(model, _inputs(httpclient, inputs, ids, bad_mask))
        result = client.infer(model, _inputs(httpclient, inputs, ids, mask))
    want_cell, _ = reference[model](ids, mask)
    _assert_close(result.as_numpy(outputs[0]), want_cell)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException):
            client.infer(model, _inputs(grpcclient, inputs, ids.astype(np.int32),
                                        mask.astype(np.int32), dtype="INT32"))
        result = client.infer(model, _inputs(grpcclient, inputs, ids, mask))
    _assert_close(result.as_numpy(outputs[0]), want_cell)


@pytest.mark.parametrize("backends, says", [("stand-in", "model file not found"), ("real", "failed to stat file")])
def test_missing_model_file_fails_start_with_log_tail(repo, tmp_path, backends, says):
    broken = tmp_path / "repo"
    (broken / "enc_missing" / "1").mkdir(parents=True)
    (broken / "enc_missing" / "config.pbtxt").write_text(
        _config("enc_missing", "onnxruntime_onnx", ONNX_IN, ONNX_OUT)
    )
    srv = LocalTritonServer(broken, work_dir=tmp_path / "work", backends=backends)
    with pytest.raises(TritonServerError) as info:
        srv.start(timeout_s=60)
    message = str(info.value)
    assert "enc_missing" in message
    assert says in message  # from the backend, via the log
    assert "last lines of the tritonserver log" in message
    assert not srv.is_alive()
    assert srv.shm_files() == []


def test_stop_leaves_no_process_and_no_shm_files(repo, tmp_path):
    # the stand-ins run in the python backend, whose shared-memory files must be cleaned up
    srv = LocalTritonServer(repo, models=["enc_onnx"], work_dir=tmp_path / "work", backends="stand-in")
    with srv:
        pid = srv.pid
        assert pid is not None and srv.is_alive()
        ids, mask = _cells(1, 4, seed=4)
        with httpclient.InferenceServerClient(srv.http_url) as client:
            assert client.is_model_ready("enc_onnx")
            assert not client.is_model_ready("enc_ts")  # only the listed model was loaded
            client.infer("enc_onnx", _inputs(httpclient, ONNX_IN, ids, mask))
        assert srv.shm_files(), "the python backend should have shm regions with our prefix"
    assert not srv.is_alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # neither the server nor a stub of its group is left
    assert srv.shm_files() == []
    assert not list(Path("/dev/shm").glob(srv.shm_prefix + "*"))
    assert "tritonserver" in srv.log_path.read_text()
    srv.stop()  # idempotent
