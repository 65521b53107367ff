"""Graceful stop and leftovers, against real tritonserver processes.

* SIGTERM with >= 32 requests in flight: Triton finishes every accepted request (exit code 0, no
  signal 11); requests that arrive while it drains are refused (gRPC UNAVAILABLE "Server is stopping",
  HTTP connection refused) and our client retries them against the restarted server: none is lost.
  Negative controls: without retries the late requests fail; with a 1 s exit timeout Triton gives up
  on in-flight work.
* `gftriton serve` stops cleanly on SIGTERM; SIGKILL of it (and of its tritonserver) leaves its work dir
  and shared-memory regions behind, and the next start removes them, but not a live server's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import one_model_repository

from geneformer_triton.client.triton_client import GeneformerClient, RetryPolicy, ServerUnavailableError
from geneformer_triton.serving.leftovers import OWNER_FILE, pid_alive
from geneformer_triton.serving.server import LocalTritonServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SLOW_MODEL = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.25)
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * np.float32(2))]) for r in requests]
'''
SLOW_CONFIG = '''name: "slow"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
'''
IN_FLIGHT = 48
LATE = 16


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return one_model_repository(tmp_path_factory.mktemp("slow_repo"), "slow", SLOW_MODEL, SLOW_CONFIG)


def _pending(server: LocalTritonServer) -> int:
    """Requests queued or executing in Triton right now (its Prometheus metrics)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    pending = sum(float(v) for v in re.findall(r'^nv_inference_pending_request_count\{[^}]*\} (\S+)', text, re.M))
    return int(pending)


def _server(repo: Path, ports: tuple[int, int, int], exit_timeout_s: int) -> LocalTritonServer:
    return LocalTritonServer(repo, models=["slow"], http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                             exit_timeout_s=exit_timeout_s)


def _sigterm_under_load(repo: Path, protocol: str, retry: RetryPolicy, exit_timeout_s: int):
    """Start a server, put IN_FLIGHT requests in flight, SIGTERM it, send LATE more, restart it on the
    same ports. Returns (outcomes, pending at SIGTERM, done when the first server exited, its rc, its log)."""
    ports = (free_port(), free_port(), free_port())
    first = _server(repo, ports, exit_timeout_s).start()
    second = None
    try:
        url = first.http_url if protocol == "http" else first.grpc_url
        client = GeneformerClient(url, protocol, concurrency=IN_FLIGHT + LATE, timeout_s=60, retry=retry)

        def call(i: int):
            try:
                return float(client.infer("slow", {"x": np.array([[i]], np.float32)}, ["y"])["y"][0, 0])
            except Exception as error:  # noqa: BLE001 - the outcome is what the test inspects
                return error

        with client, ThreadPoolExecutor(IN_FLIGHT + LATE) as pool:
            futures = [pool.submit(call, i) for i in range(IN_FLIGHT)]
            deadline = time.monotonic() + 20
            while (pending := _pending(first)) < 32 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(first.pid, signal.SIGTERM)
            time.sleep(0.3)  # the server is draining now
            futures += [pool.submit(call, IN_FLIGHT + i) for i in range(LATE)]
            rc = first._proc.wait(timeout=exit_timeout_s + 30)
            done_at_exit = sum(1 for f in futures[:IN_FLIGHT] if f.done() and not isinstance(f.result(), Exception))
            log = first.log_path.read_text()
            first.stop()
            second = _server(repo, ports, 10).start()
            outcomes = [f.result() for f in futures]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    return outcomes, pending, done_at_exit, rc, log


@pytest.mark.parametrize("protocol", ("grpc", "http"))
def test_sigterm_with_requests_in_flight_loses_none(repo, protocol):
    """Over HTTP, Triton first waits (up to the exit timeout) for every open connection, idle keep-alive
    ones included, so the restart gap is about the exit timeout: the retry budget (~23 s) covers 10 s."""
    retry = RetryPolicy(attempts=13, backoff_s=0.5, max_backoff_s=2.0)
    outcomes, pending, done_at_exit, rc, log = _sigterm_under_load(repo, protocol, retry, exit_timeout_s=10)
    assert pending >= 32, f"only {pending} requests in flight at SIGTERM"
    assert outcomes == [2.0 * i for i in range(IN_FLIGHT + LATE)], [o for o in outcomes if isinstance(o, Exception)][:3]
    assert done_at_exit >= pending - 4, "in-flight requests must finish on the draining server, not be re-sent"
    assert rc == 0 and "Signal (11)" not in log, log[-3000:]


def test_without_client_retries_late_requests_fail(repo):
    """Negative control: the retries are what covers the restart gap."""
    outcomes, pending, _, rc, _ = _sigterm_under_load(repo, "grpc", RetryPolicy(attempts=1), exit_timeout_s=30)
    assert pending >= 32 and rc == 0
    assert all(o == 2.0 * i for i, o in enumerate(outcomes[:IN_FLIGHT]))  # accepted before SIGTERM: served
    late = outcomes[IN_FLIGHT:]
    assert all(isinstance(o, ServerUnavailableError) for o in late), late


def test_short_exit_timeout_gives_up_on_in_flight_work(repo):
    """Negative control for the exit timeout: 48 requests x 0.25 s / 4 per batch need ~3 s; given 1 s,
    tritonserver exits non-zero with requests still in flight (the failure the long default avoids)."""
    server = _server(repo, (free_port(), free_port(), free_port()), exit_timeout_s=1).start()
    try:
        client = GeneformerClient(server.grpc_url, "grpc", concurrency=IN_FLIGHT, retry=RetryPolicy(attempts=1))
        with client, ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(client.infer, "slow", {"x": np.array([[i]], np.float32)}, ["y"])
                       for i in range(IN_FLIGHT)]
            while _pending(server) < 32:
                time.sleep(0.05)
            os.kill(server.pid, signal.SIGTERM)
            rc = server._proc.wait(timeout=30)
            for future in futures:
                future.exception()
        assert rc != 0, "tritonserver should report that it stopped with inferences in flight"
        assert "Found 1 model versions that have in-flight inferences" in server.log_path.read_text()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ serve
def _serve(repo: Path, log: Path, ports: tuple[int, int, int]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("GFTRITON_ADMIN_KEY", None)
    command = [sys.executable, "-m", "geneformer_triton.cli", "serve", "--repository", str(repo), "--models", "slow",
               "--config-name", "", "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
               "--metrics-port", str(ports[2]), "--exit-timeout", "20"]
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout_s: float = 90) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {log.read_text()}")


def _serve_until_ready(repo: Path, log: Path) -> tuple[subprocess.Popen, Path, int, tuple[int, int, int]]:
    ports = (free_port(), free_port(), free_port())
    proc = _serve(repo, log, ports)
    work_dir = Path(_wait_for(r"admin key generated into (\S+)/admin\.key", log, proc).group(1))
    _wait_for(r"tritonserver ready", log, proc)
    server_pid = int(json.loads((work_dir / OWNER_FILE).read_text())["server_pid"])
    with GeneformerClient(f"127.0.0.1:{ports[1]}", "grpc") as client:  # python backend shm regions exist now
        assert client.infer("slow", {"x": np.array([[3.0]], np.float32)}, ["y"])["y"][0, 0] == 6.0
    return proc, work_dir, server_pid, ports


def _shm_regions(work_dir: Path) -> list[Path]:
    prefix = json.loads((work_dir / OWNER_FILE).read_text())["shm_prefix"]
    return sorted(Path("/dev/shm").glob(prefix + "*"))


def test_serve_stops_cleanly_on_sigterm(repo, tmp_path):
    proc, work_dir, server_pid, _ = _serve_until_ready(repo, tmp_path / "serve.log")
    key = (work_dir / "admin.key").read_text().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "SIGTERM received: draining" in log and key not in log
    assert not pid_alive(server_pid)
    assert not (work_dir / "admin.key").exists() and not (work_dir / "backends").exists()


def test_sigkill_leftovers_are_removed_at_next_start_but_not_a_live_servers(repo, tmp_path):
    # A live server whose files must survive the cleanup.
    live = LocalTritonServer(repo, models=["slow"], exit_timeout_s=10).start()
    try:
        # 1. SIGKILL of `serve` alone: its tritonserver notices (parent-death signal), drains and exits.
        proc, work_dir, server_pid, _ = _serve_until_ready(repo, tmp_path / "serve1.log")
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 40
        while pid_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(server_pid), "tritonserver outlived its SIGKILLed owner"
        assert work_dir.is_dir(), "SIGKILL leaves the work dir behind (nothing could clean it)"

        # 2. SIGKILL of everything (serve, tritonserver and its stubs): shared memory is left too.
        proc2, work_dir2, server_pid2, _ = _serve_until_ready(repo, tmp_path / "serve2.log")
        regions = _shm_regions(work_dir2)
        assert regions
        proc2.kill()
        proc2.wait()
        os.killpg(server_pid2, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(server_pid2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert work_dir2.is_dir() and all(p.exists() for p in regions), "the leftovers to clean up"

        live_files = [live.work_dir / OWNER_FILE] + live.shm_files()
        with LocalTritonServer(repo, models=["slow"], exit_timeout_s=10):
            assert not work_dir.exists() and not work_dir2.exists()
            assert not any(p.exists() for p in regions)
            assert all(p.exists() for p in live_files), "a live server's files were removed"
            assert live.is_alive()
    finally:
        live.stop()
