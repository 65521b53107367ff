"""Model control and repository APIs are closed by default: a real tritonserver started by
LocalTritonServer refuses load, unload, upload-with-files (code execution) and config override without
the admin key over HTTP and gRPC, and nothing changes; with the key the same calls work. Our client
reports the refusal as PermissionDeniedError at once (gRPC says UNAVAILABLE: it must not be retried)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import one_model_repository

from geneformer_triton.client.triton_client import GeneformerClient, PermissionDeniedError, RetryPolicy
from geneformer_triton.serving.security import ApiAccess
from geneformer_triton.serving.server import LocalTritonServer

ECHO_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.factor = float(config["parameters"]["factor"]["string_value"])

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * np.float32(self.factor))]) for r in requests]
'''

ECHO_CONFIG = '''name: "echo"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
parameters [ { key: "factor" value: { string_value: "2" } } ]
'''

# Uploaded by a "client": its initialize() would run arbitrary code on the server (here: write a file).
EVIL_MODEL = '''
import pathlib
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pathlib.Path({marker!r}).write_text("code ran on the server")

    def execute(self, requests):
        return []
'''
EVIL_CONFIG = {"name": "evil", "backend": "python", "max_batch_size": 0,
               "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
               "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}


@pytest.fixture(autouse=True)
def _no_keys_in_environment(monkeypatch):
    monkeypatch.delenv("GFTRITON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("GFTRITON_INFERENCE_KEY", raising=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return one_model_repository(tmp_path_factory.mktemp("secure_repo"), "echo", ECHO_MODEL, ECHO_CONFIG)


@pytest.fixture(scope="module")
def server(repo):
    os.environ.pop("GFTRITON_ADMIN_KEY", None)  # module scope: the autouse fixture is not active yet
    with LocalTritonServer(repo, models=["echo"], exit_timeout_s=10) as srv:
        yield srv


def _client(server, protocol: str, **keys) -> GeneformerClient:
    url = server.http_url if protocol == "http" else server.grpc_url
    return GeneformerClient(url, protocol, retry=RetryPolicy(attempts=4, backoff_s=0.5), **keys)


def _echo(client: GeneformerClient) -> np.ndarray:
    return client.infer("echo", {"x": np.array([[1.0, 3.0]], dtype=np.float32)}, ["y"])["y"]


def _factor(client: GeneformerClient) -> str:
    client._metadata.clear()
    return client.model_config("echo")["parameters"]["factor"]["string_value"]


def _echo_config(factor: str) -> str:
    return json.dumps({"name": "echo", "backend": "python", "max_batch_size": 4,
                       "parameters": {"factor": {"string_value": factor}},
                       "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}],
                       "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]}]})


def _attacks(marker: Path) -> dict:
    evil_files = {"file:1/model.py": EVIL_MODEL.format(marker=str(marker)).encode()}
    override = _echo_config("1000")
    return {
        "unload": lambda c: c.unload_model("echo"),
        "load": lambda c: c.load_model("echo"),
        "upload_with_files": lambda c: c.load_model("evil", config=json.dumps(EVIL_CONFIG), files=evil_files),
        "config_override": lambda c: c.load_model("echo", config=override),
        "repository_index": lambda c: c._with_retry("index", lambda: c._client().get_model_repository_index()),
    }


@pytest.mark.parametrize("protocol", ("http", "grpc"))
@pytest.mark.parametrize("attack", ("unload", "load", "upload_with_files", "config_override", "repository_index"))
def test_admin_api_without_key_is_refused_and_changes_nothing(server, tmp_path, protocol, attack):
    marker = tmp_path / "pwned"
    with _client(server, protocol) as client:
        before = _echo(client)
        started = time.monotonic()
        with pytest.raises(PermissionDeniedError, match=r"(?i)restricted.*admin-key"):
            _attacks(marker)[attack](client)
        assert time.monotonic() - started < 2.0, "a refusal must not be retried as an unavailable server"
        assert client._client().is_model_ready("echo")
        np.testing.assert_array_equal(_echo(client), before)
        assert _factor(client) == "2"
        assert not client._client().is_model_ready("evil")
    assert not marker.exists(), "the uploaded model's code ran on the server"


@pytest.mark.parametrize("protocol", ("http", "grpc"))
def test_wrong_key_is_refused(server, protocol):
    with _client(server, protocol, admin_key="0" * 32) as client, pytest.raises(PermissionDeniedError):
        client.unload_model("echo")
    with _client(server, protocol) as client:
        assert client._client().is_model_ready("echo")


@pytest.mark.parametrize("protocol", ("http", "grpc"))
def test_admin_apis_work_with_the_key(server, tmp_path, protocol):
    """Positive control: the refused calls are real, working APIs; the key is what unlocks them."""
    marker = tmp_path / "pwned"
    attacks = _attacks(marker)
    with _client(server, protocol, admin_key=server.admin_key) as client:
        assert client.ready_models() == ["echo"]  # the model index
        attacks["upload_with_files"](client)
        assert marker.read_text() == "code ran on the server" and client._client().is_model_ready("evil")
        client.unload_model("evil")
        attacks["config_override"](client)
        assert _factor(client) == "1000"
        np.testing.assert_array_equal(_echo(client), [[1000.0, 3000.0]])
        client.load_model("echo", config=_echo_config("2"))  # an override persists: restore the original
        assert _factor(client) == "2"
        client.unload_model("echo")
        deadline = time.monotonic() + 10
        while client._client().is_model_ready("echo") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client._client().is_model_ready("echo")
        client.load_model("echo")
        np.testing.assert_array_equal(_echo(client), [[2.0, 6.0]])


def test_ready_models_without_key_probes_known_names(server):
    """The model index is an admin API; without the key the client still finds ready models."""
    with _client(server, "grpc") as client:
        assert client.ready_models(candidates=("echo", "geneformer_onnx")) == ["echo"]


def test_generated_key_is_private_never_logged_and_removed_at_stop(repo, tmp_path):
    srv = LocalTritonServer(repo, models=["echo"], work_dir=tmp_path / "work", exit_timeout_s=10)
    with srv:
        key_file = srv.admin_key_file
        assert key_file is not None and key_file.parent == tmp_path / "work"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_text().strip() == srv.admin_key and len(srv.admin_key) >= 32
        assert any(srv.admin_key in part for part in srv.command)  # Triton takes it on its command line
        log = srv.log_path.read_text()
        assert "--http-restricted-api=model-repository,shared-memory,trace,logging:admin-key=***" in log
        assert srv.admin_key not in log
    assert not key_file.exists()


def test_key_from_environment_and_key_file(repo, tmp_path, monkeypatch):
    key = "k" * 24
    key_file = tmp_path / "admin.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        LocalTritonServer(repo, models=["echo"], access=ApiAccess(admin_key_file=key_file)).start()
    key_file.chmod(0o600)
    monkeypatch.setenv("GFTRITON_ADMIN_KEY", "e" * 24)
    with LocalTritonServer(repo, models=["echo"], access=ApiAccess(admin_key_file=key_file), exit_timeout_s=10) as srv:
        assert srv.admin_key == key and srv.admin_key_file is None  # the file wins over the environment
    with LocalTritonServer(repo, models=["echo"], exit_timeout_s=10) as srv:
        assert srv.admin_key == "e" * 24
        with GeneformerClient(srv.grpc_url, "grpc") as client:  # the client reads the same variable
            assert client.ready_models(candidates=()) == ["echo"]


@pytest.mark.parametrize("protocol", ("http", "grpc"))
def test_protect_inference(repo, protocol):
    with LocalTritonServer(repo, models=["echo"], access=ApiAccess(protect_inference=True), exit_timeout_s=10) as srv:
        assert srv.inference_key and srv.inference_key != srv.admin_key
        with _client(srv, protocol) as client:
            assert client._client().is_server_ready()  # health stays open
            with pytest.raises(PermissionDeniedError, match="inference-key.*GFTRITON_INFERENCE_KEY"):
                _echo(client)
        with _client(srv, protocol, inference_key=srv.admin_key) as client, pytest.raises(PermissionDeniedError):
            _echo(client)  # the admin key is not the inference key
        with _client(srv, protocol, inference_key=srv.inference_key) as client:
            np.testing.assert_array_equal(_echo(client), [[2.0, 6.0]])


def test_docker_compose_restricts_admin_apis_with_the_clients_header_and_drains():
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
    server = compose["services"]["tritonserver"]
    command = server["command"]
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        spec = next(c for c in command if c.startswith(flag + "=")).split("=", 1)[1]
        apis, _, key = spec.partition(":")
        assert set(apis.split(",")) >= {"model-repository", "shared-memory", "trace", "logging"}
        assert key.startswith("admin-key=${TRITON_ADMIN_KEY:?"), "the header our client sends is admin-key"
    exit_timeout = int(next(c for c in command if c.startswith("--exit-timeout-secs=")).split("=")[1])
    assert exit_timeout >= 60 and int(server["stop_grace_period"].rstrip("s")) > exit_timeout
