"""Dask worker plugin: each worker starts its own ``tritonserver`` and stops it at teardown.

``setup`` starts ``geneformer_triton.serving.server.LocalTritonServer`` on free loopback ports (in a thread, so
the worker's event loop keeps its heartbeats), waits until the requested models are READY, and starts
a watchdog process (``geneformer_triton.client.triton_watchdog``) that stops the server if the worker dies without a
teardown (SIGKILL). ``teardown`` stops the server (SIGTERM, then its process group) and removes its
work folder. Tasks find the server with ``get_worker().plugins[PLUGIN_NAME]``
(``geneformer_triton.client.dask_engine.server_targets``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from distributed import WorkerPlugin

from geneformer_triton.client.dask_engine import PLUGIN_NAME, ClusterError, ServerTarget

LOGGER = logging.getLogger(__name__)


class TritonServerPlugin(WorkerPlugin):
    """A ``LocalTritonServer`` per worker (see the module docstring).

    ``repository``: the model repository to serve; ``model_config_name`` / ``models``: as
    ``LocalTritonServer`` takes them (``None`` models = all); ``start_timeout_s``: readiness wait, s.
    """

    name = PLUGIN_NAME

    def __init__(self, repository: Path, model_config_name: Optional[str], models: Optional[Sequence[str]],
                 start_timeout_s: float) -> None:
        self.repository = Path(repository).resolve()
        self.model_config_name = model_config_name
        self.models = "*" if not models or models == "*" else list(models)
        self.start_timeout_s = float(start_timeout_s)
        self.server = None
        self.work_dir: Optional[Path] = None
        self._watchdog: Optional[subprocess.Popen] = None
        self._ready = threading.Event()

    def __getstate__(self) -> dict:  # sent to the workers: settings only, no process or lock
        return {k: v for k, v in self.__dict__.items() if k in ("repository", "model_config_name", "models", "start_timeout_s")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["repository"], state["model_config_name"], state["models"], state["start_timeout_s"])

    def _start(self) -> None:
        from geneformer_triton.serving.server import LocalTritonServer

        self.work_dir = Path(tempfile.mkdtemp(prefix="gftriton-worker-"))
        server = LocalTritonServer(self.repository, models=self.models, model_config_name=self.model_config_name,
                                   work_dir=self.work_dir)
        try:
            server.start(self.start_timeout_s)
        except Exception:
            server.stop()
            shutil.rmtree(self.work_dir / "backends", ignore_errors=True)  # the log stays for reading
            raise
        self.server = server
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "geneformer_triton.client.triton_watchdog", "--parent", str(os.getpid()), "--group", str(server.pid),
             "--shm-prefix", server.shm_prefix, "--remove", str(self.work_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        self._ready.set()
        LOGGER.info("worker %s: tritonserver pid %s at grpc %s / http %s", os.getpid(), server.pid,
                    server.grpc_url, server.http_url)

    async def setup(self, worker: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._start)

    def _stop(self) -> None:
        self._ready.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)  # exits once the server group is gone
            if self._watchdog.poll() is None:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    async def teardown(self, worker: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop)

    def target(self, protocol: str) -> ServerTarget:
        """This worker's server (waits up to the start timeout while it is still starting)."""
        self._ready.wait(self.start_timeout_s)
        if self.server is None or not self.server.is_alive():
            raise ClusterError(f"this worker's tritonserver is not running (log: {getattr(self.server, 'log_path', None)})")
        return ServerTarget(self.server.grpc_url if protocol == "grpc" else self.server.http_url, protocol)
