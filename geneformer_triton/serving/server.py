"""Launch a real local ``tritonserver`` (2.51.0, from the ``nvidia-pytriton`` wheel) without Docker.

The ``nvidia-pytriton`` wheel bundles the ``tritonserver`` binary, the python backend
(``libtriton_python.so`` + ``triton_python_backend_utils.py``) and one python-backend stub per
Python minor version. It does NOT bundle Triton's C++ ``onnxruntime``, ``pytorch`` (libtorch) or
``tensorrt`` backends. :class:`LocalTritonServer` therefore assembles a backend directory::

    <work_dir>/backends/
        python/        libtriton_python.so, triton_python_backend_utils.py, triton_python_backend_stub
        onnxruntime/   libtriton_onnxruntime.so + libonnxruntime.so.1   (real, from `make backends`)
                       or model.py (Python-based stand-in, geneformer_triton/serving/local_backends/onnxruntime)
        pytorch/       libtriton_pytorch.so (real) or model.py (stand-in, local_backends/pytorch)

and starts ``tritonserver`` with it, so model configurations that say
``platform: "onnxruntime_onnx"`` or ``platform: "pytorch_libtorch"`` are served unchanged (the same
``config.pbtxt`` runs on the real C++ backends in the NGC container). Triton's real C++ backends are
used whenever ``scripts/build_backends.sh`` built them for this venv; the stand-ins are a fallback
that logs a WARNING (:mod:`geneformer_triton.serving.backend_build`, ``$GFTRITON_BACKENDS``). See
``docs/runtime.md`` for the verified facts this module relies on.

Typical use::

    with LocalTritonServer("model_repository", models=["geneformer_onnx"]) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
        ...

Security: the model-repository, shared-memory, trace and logging APIs are restricted to requests
carrying the admin key (:mod:`geneformer_triton.serving.security`; a key is generated into
``<work_dir>/admin.key``, mode 0600, when none is given); ``server.admin_headers("http"|"grpc")``
gives the headers. Shutdown drains: SIGTERM, then Triton finishes in-flight requests for up to
``exit_timeout_s``. A work dir or shared-memory region left by a killed run is removed at the next
start (:mod:`geneformer_triton.serving.leftovers`).

All durations are in seconds, sizes in bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from geneformer_triton.serving.backend_build import BackendChoice, choose_backends
from geneformer_triton.serving.leftovers import OWNER_FILE, WORK_DIR_PREFIX, remove_stale_leftovers, write_owner_file
from geneformer_triton.serving.security import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    INFERENCE_HEADER,
    INFERENCE_KEY_ENV,
    ApiAccess,
    ResolvedKey,
    grpc_header,
    redact,
    resolve_key,
    restriction_args,
)

__all__ = [
    "TritonServerError",
    "TritonNotInstalledError",
    "GpuNotAvailableError",
    "LocalTritonServer",
    "find_tritonserver",
    "pytriton_server_dir",
    "build_backend_directory",
    "host_has_gpu",
    "free_port",
    "LOCAL_BACKENDS_DIR",
    "SHM_REGION_PREFIX",
]

logger = logging.getLogger(__name__)

#: Folder holding our Python-based stand-ins for the C++ backends (one sub-folder per backend name).
LOCAL_BACKENDS_DIR = Path(__file__).resolve().parent / "local_backends"

#: Default name prefix of the python backend's shared-memory regions in /dev/shm.
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"

_SHM_DIR = Path("/dev/shm")
_PIP_HINT = (
    "the 'nvidia-pytriton' package (which bundles tritonserver 2.51.0) is not installed in this "
    "Python environment ({python}); install it with: pip install nvidia-pytriton==0.7.0"
)


class TritonServerError(RuntimeError):
    """The local Triton server could not be started, did not become ready or failed while running.

    Attributes:
        log_tail: the last lines of the server log (empty if there was no log yet).
        log_path: path of the server log file, or ``None``.
    """

    def __init__(self, message: str, *, log_tail: str = "", log_path: Path | None = None) -> None:
        self.log_tail = log_tail
        self.log_path = log_path
        full = message
        if log_tail:
            where = f" ({log_path})" if log_path else ""
            full += f"\n--- last lines of the tritonserver log{where} ---\n{log_tail.rstrip()}\n---"
        super().__init__(full)


class TritonNotInstalledError(TritonServerError):
    """The ``tritonserver`` binary (package ``nvidia-pytriton``) or one of its parts is missing."""


class GpuNotAvailableError(TritonServerError):
    """A GPU-only setting was asked for on a host without an NVIDIA GPU."""


# ----------------------------------------------------------------------------------------------
# Locating the bundled server
# ----------------------------------------------------------------------------------------------
def pytriton_server_dir() -> Path:
    """Return ``<site-packages>/pytriton/tritonserver`` of the installed ``nvidia-pytriton`` wheel.

    Raises:
        TritonNotInstalledError: ``nvidia-pytriton`` is not installed (message names the package).
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalledError(_PIP_HINT.format(python=sys.executable))
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "tritonserver"
        if candidate.is_dir():
            return candidate
    raise TritonNotInstalledError(
        "found a 'pytriton' package without its bundled 'tritonserver' folder; "
        + _PIP_HINT.format(python=sys.executable)
    )


def find_tritonserver() -> Path:
    """Return the path of the ``tritonserver`` executable bundled in ``nvidia-pytriton``.

    Raises:
        TritonNotInstalledError: ``nvidia-pytriton`` is not installed or its binary is missing.
    """
    binary = pytriton_server_dir() / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotInstalledError(
            f"tritonserver binary not found at {binary}; " + _PIP_HINT.format(python=sys.executable)
        )
    if not os.access(binary, os.X_OK):
        raise TritonNotInstalledError(f"{binary} is not executable (check the nvidia-pytriton install)")
    return binary


def _pytriton_libs_dir(server_dir: Path) -> Path:
    """``<site-packages>/nvidia_pytriton.libs`` (shared libraries the binary links against)."""
    libs = server_dir.parent.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise TritonNotInstalledError(
            f"{libs} is missing; " + _PIP_HINT.format(python=sys.executable)
        )
    return libs


def _venv_python_version(venv: Path) -> str:
    """Python ``major.minor`` of ``venv`` (from its ``pyvenv.cfg``), else of this interpreter."""
    cfg = venv / "pyvenv.cfg"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() in ("version_info", "version"):
                parts = value.strip().split(".")
                if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                    return f"{parts[0]}.{parts[1]}"
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def build_backend_directory(
    dest: str | os.PathLike[str],
    *,
    python_version: str | None = None,
    local_backends: Iterable[str] = ("onnxruntime", "pytorch"),
    real_backends: Path | None = None,
) -> Path:
    """Assemble a Triton backend directory at ``dest`` and return it.

    ``dest/python/`` receives ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the
    python-backend stub for ``python_version`` (default: this interpreter's ``major.minor``).
    For each name in ``local_backends``, ``dest/<name>/`` receives the real C++ backend
    ``real_backends/<name>/`` (a folder built by ``scripts/build_backends.sh``) when ``real_backends``
    is given, else the Python-based stand-in ``model.py`` from :data:`LOCAL_BACKENDS_DIR`. Files are
    copied (symlinks stay symlinks), so later edits do not affect a running server.

    Raises:
        TritonNotInstalledError: a bundled part or the stub for this Python version is missing.
    """
    server_dir = pytriton_server_dir()
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    dest = Path(dest)
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)

    backend_src = server_dir / "backends" / "python"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (server_dir / "python_backend_stubs").glob("*"))
        raise TritonNotInstalledError(
            f"nvidia-pytriton has no python-backend stub for Python {version} "
            f"(available: {', '.join(available) or 'none'}); use a venv with one of those versions"
        )
    for src in (backend_src / "libtriton_python.so", backend_src / "triton_python_backend_utils.py", stub):
        if not src.is_file():
            raise TritonNotInstalledError(f"{src} is missing; " + _PIP_HINT.format(python=sys.executable))
        shutil.copy2(src, python_dir / src.name)

    for name in local_backends:
        shutil.rmtree(dest / name, ignore_errors=True)  # a reused dest must not keep the other kind
        if real_backends is not None:
            if not (real_backends / name).is_dir():
                raise TritonServerError(f"built backend '{name}' not found at {real_backends / name}")
            shutil.copytree(real_backends / name, dest / name, symlinks=True)
            continue
        src = LOCAL_BACKENDS_DIR / name / "model.py"
        if not src.is_file():
            raise TritonServerError(f"local stand-in backend '{name}' not found at {src}")
        (dest / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name / "model.py")
    return dest


# ----------------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------------
def host_has_gpu() -> bool:
    """True if this host exposes an NVIDIA GPU (a ``/dev/nvidia<N>`` device node)."""
    return any(p.name[len("nvidia"):].isdigit() for p in Path("/dev").glob("nvidia*"))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path | None, lines: int = 40, max_bytes: int = 64_000) -> str:
    """Last ``lines`` lines (at most ``max_bytes`` bytes read) of a text file, '' if unreadable."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _http_get_status(url: str, timeout_s: float) -> int:
    """HTTP status of a GET to ``url`` (0 when the connection fails)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (loopback only)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def _http_post_json(url: str, payload: object, timeout_s: float, headers: Mapping[str, str] | None = None) -> object:
    """POST JSON to ``url`` (with extra ``headers``) and return the decoded JSON answer."""
    req = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Connection": "close", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (loopback only)
        return json.loads(resp.read() or b"null")


_LIVE_SERVERS: "set[LocalTritonServer]" = set()  # running servers, stopped at exit


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM the server when the thread that started it dies (a SIGKILLed owner):
    the server then drains and exits instead of running on unowned. Start servers from a thread
    that lives as long as the server (e.g. the main thread)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@atexit.register
def _stop_live_servers() -> None:  # pragma: no cover - interpreter shutdown path
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------
class LocalTritonServer:
    """A real ``tritonserver`` process on loopback addresses, usable as a context manager.

    Args:
        model_repository: path of the Triton model repository.
        models: ``"*"`` (every model of the repository) or the names to load
            (``--model-control-mode=explicit --load-model=...``).
        model_config_name: per-host config name (``--model-config-name``): Triton reads
            ``<model>/configs/<name>.pbtxt`` where it exists, ``config.pbtxt`` otherwise.
            ``"gpu"`` on a host without a GPU raises :class:`GpuNotAvailableError`.
        host: address the HTTP, gRPC and metrics endpoints bind to (loopback by default).
        http_port, grpc_port, metrics_port: TCP ports; ``None`` picks a free one.
        work_dir: folder for the backend directory and the log; when ``None``, a fresh temporary
            folder whose copied backends :meth:`stop` removes (the log is kept for reading).
        log_path: server log file (stdout and stderr of the server and its python stubs);
            default ``<work_dir>/tritonserver.log``.
        log_verbose: ``--log-verbose`` level (0 = off).
        exit_timeout_s: ``--exit-timeout-secs``: how long the server waits for in-flight requests
            on shutdown, in seconds (HTTP connections and inferences share it: an idle keep-alive
            connection uses it up; when it runs out with inferences in flight, tritonserver 2.51
            exits non-zero or crashes with signal 11).
        access: which APIs need a key and the keys (:class:`~geneformer_triton.serving.security.ApiAccess`);
            default: admin APIs restricted, inference open, admin key from ``$GFTRITON_ADMIN_KEY``
            or generated.
        allow_gpu_metrics: ``--allow-gpu-metrics``; asking for it on a host without a GPU raises
            :class:`GpuNotAvailableError`.
        allow_metrics: serve Prometheus metrics (``--allow-metrics``).
        backend_config: extra ``--backend-config`` settings, ``{backend: {key: value}}``; for the
            python backend and the Python-based stand-ins use the ``"python"`` key (for instance
            ``{"python": {"shm-default-byte-size": str(64 * 2**20)}}``, in bytes).
        extra_args: further command-line arguments appended as given.
        env: extra environment variables for the server process.
        venv: Python environment the python stubs use (its ``bin/`` goes first on ``PATH``);
            default: the running interpreter's environment (``sys.prefix``).
        backends: ``"auto"`` (real C++ onnxruntime/pytorch backends when built, else the Python
            stand-ins with a WARNING), ``"real"`` (fail when not built) or ``"stand-in"``; ``None``
            reads ``$GFTRITON_BACKENDS`` (default ``auto``). The choice made at :meth:`start` is
            :attr:`backend_choice`.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        models: str | Sequence[str] = "*",
        model_config_name: str | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        exit_timeout_s: int = 30,
        allow_gpu_metrics: bool = False,
        allow_metrics: bool = True,
        backend_config: Mapping[str, Mapping[str, str]] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        venv: str | os.PathLike[str] | None = None,
        access: ApiAccess | None = None,
        backends: str | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if isinstance(models, str):
            self.models: list[str] | None = None if models == "*" else [models]
        else:
            self.models = list(models)
            if not self.models:
                raise ValueError("models must be '*' or a non-empty list of model names")
        self.model_config_name = model_config_name
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = self._requested_ports
        self._own_work_dir = work_dir is None
        self._work_dir_arg = Path(work_dir).resolve() if work_dir is not None else None
        self.work_dir: Path | None = self._work_dir_arg
        self._log_path_arg = Path(log_path).resolve() if log_path is not None else None
        self.log_path: Path | None = self._log_path_arg
        self.log_verbose = int(log_verbose)
        self.exit_timeout_s = int(exit_timeout_s)
        self.allow_gpu_metrics = bool(allow_gpu_metrics)
        self.allow_metrics = bool(allow_metrics)
        self.backend_config = {k: dict(v) for k, v in (backend_config or {}).items()}
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.venv = Path(venv).resolve() if venv is not None else Path(sys.prefix)
        self.access = access or ApiAccess()
        self._admin_key: ResolvedKey | None = None
        self._inference_key: ResolvedKey | None = None
        self.backends_mode = backends
        #: The backends :meth:`start` chose (real C++ or stand-ins); ``None`` before the first start.
        self.backend_choice: BackendChoice | None = None
        #: Unique prefix of this server's python-backend shared-memory regions in /dev/shm.
        self.shm_prefix = f"{SHM_REGION_PREFIX}gft{os.getpid()}_{secrets.token_hex(4)}_"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self._log_offset = 0
        self.command: list[str] = []

    # -- addresses ------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (what ``tritonclient.http`` takes as ``url``)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (what ``tritonclient.grpc`` takes as ``url``)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page, ``http://host:port/metrics``."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of the running server (also its process-group id), or ``None``."""
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        """True while the server process runs."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ('' before the first start)."""
        return _tail(self.log_path, lines)

    @property
    def admin_key(self) -> str | None:
        """The admin key of the running (or last) server; ``None`` before the first start."""
        return self._admin_key.value if self._admin_key else None

    @property
    def admin_key_file(self) -> Path | None:
        """Where a generated admin key was written (mode 0600), else ``None``."""
        return self._admin_key.file if self._admin_key else None

    @property
    def inference_key(self) -> str | None:
        """The inference key when ``access.protect_inference``, else ``None``."""
        return self._inference_key.value if self._inference_key else None

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """Request headers that unlock the restricted admin APIs over ``protocol`` ("http" or "grpc")."""
        return self._headers(protocol, ADMIN_HEADER, self.admin_key)

    def inference_headers(self, protocol: str = "http") -> dict[str, str]:
        """Request headers for inference (empty unless ``access.protect_inference``)."""
        return self._headers(protocol, INFERENCE_HEADER, self.inference_key)

    @staticmethod
    def _headers(protocol: str, header: str, key: str | None) -> dict[str, str]:
        if key is None:
            return {}
        return {grpc_header(header) if protocol == "grpc" else header: key}

    def _resolve_keys(self) -> None:
        assert self.work_dir is not None
        access = self.access
        self._admin_key = resolve_key(access.admin_key, access.admin_key_file, ADMIN_KEY_ENV,
                                      self.work_dir / "admin.key")
        self._inference_key = (
            resolve_key(access.inference_key, access.inference_key_file, INFERENCE_KEY_ENV,
                        self.work_dir / "inference.key")
            if access.protect_inference else None
        )
        for what, key in (("admin", self._admin_key), ("inference", self._inference_key)):
            if key is not None:
                where = f"generated into {key.file} (mode 0600)" if key.file else f"from {key.source}"
                logger.info("%s key %s", what, where)

    def _secrets(self) -> list[str]:
        return [k.value for k in (self._admin_key, self._inference_key) if k is not None]

    def shm_files(self) -> list[Path]:
        """This server's python-backend shared-memory files currently present in /dev/shm."""
        return sorted(_SHM_DIR.glob(self.shm_prefix + "*")) if _SHM_DIR.is_dir() else []

    # -- command line and environment -----------------------------------------------------------
    def _check_gpu_requests(self) -> None:
        if host_has_gpu():
            return
        if self.model_config_name is not None and self.model_config_name.lower().startswith("gpu"):
            raise GpuNotAvailableError(
                f"model_config_name={self.model_config_name!r} selects the GPU configs "
                "(configs/gpu.pbtxt, KIND_GPU instances), but this host has no NVIDIA GPU "
                "(no /dev/nvidia<N>); use model_config_name='cpu' (or None) here"
            )
        if self.allow_gpu_metrics:
            raise GpuNotAvailableError(
                "allow_gpu_metrics=True asks for NVML/DCGM GPU metrics, but this host has no NVIDIA "
                "GPU (no /dev/nvidia<N>); leave allow_gpu_metrics=False here"
            )

    def _environment(self, server_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ld_parts = [str(_pytriton_libs_dir(server_dir)), libdir, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld_parts if p)
        env["PATH"] = os.pathsep.join(p for p in (str(self.venv / "bin"), env.get("PATH", "")) if p)
        # The stub must use the venv's own interpreter settings, not an inherited override.
        env.pop("PYTHONHOME", None)
        return env

    def _command(self, binary: Path, backend_dir: Path) -> list[str]:
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--allow-metrics={'true' if self.allow_metrics else 'false'}",
            f"--allow-gpu-metrics={'true' if self.allow_gpu_metrics else 'false'}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.allow_metrics:
            cmd += [f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        if not host_has_gpu():
            # No CUDA here: skip the pinned host-memory pool (it needs the CUDA driver).
            cmd.append("--pinned-memory-pool-byte-size=0")
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        for name in self.models or ["*"]:
            cmd.append(f"--load-model={name}")
        for backend, settings in self.backend_config.items():
            for key, value in settings.items():
                cmd.append(f"--backend-config={backend},{key}={value}")
        cmd += restriction_args(self.admin_key or "", self.inference_key)
        cmd += self.extra_args
        return cmd

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "LocalTritonServer":
        """Start the server and wait until it and the requested models are ready.

        Args:
            timeout_s: longest wait for readiness, in seconds.

        Returns:
            ``self``.

        Raises:
            TritonNotInstalledError: ``nvidia-pytriton`` (or a part of it) is missing.
            GpuNotAvailableError: a GPU-only option was asked for on a host without a GPU.
            TritonServerError: the process exited, a model failed to load, or readiness timed out;
                the message carries the tail of the server log. The process is stopped first.
        """
        if self.is_alive():
            raise TritonServerError(f"server already running (pid {self.pid})")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        self._check_gpu_requests()
        binary = find_tritonserver()
        server_dir = pytriton_server_dir()
        remove_stale_leftovers()

        if self._work_dir_arg is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX))
        else:
            self.work_dir = self._work_dir_arg
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_path_arg or (self.work_dir / "tritonserver.log")
        try:
            write_owner_file(self.work_dir, None, self.shm_prefix)
            self._resolve_keys()
            gpu_configs = (self.model_config_name or "").lower().startswith("gpu")
            self.backend_choice = choose_backends(self.backends_mode, venv=self.venv, gpu=gpu_configs)
            backend_dir = build_backend_directory(
                self.work_dir / "backends", python_version=_venv_python_version(self.venv),
                real_backends=self.backend_choice.directory,
            )
            env = self._environment(server_dir)
        except BaseException:
            self._cleanup_files()
            raise

        auto_ports = any(p is None for p in self._requested_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(1, attempts + 1):
            self._pick_ports()
            self.command = self._command(binary, backend_dir)
            self._launch(env)
            try:
                self._wait_ready(timeout_s)
                return self
            except TritonServerError:
                port_clash = "address already in use" in self._log_since_launch().lower()
                self._terminate()
                if port_clash and attempt < attempts:
                    logger.warning("tritonserver port clash, retrying with other ports")
                    continue
                self._cleanup_files()
                raise
            except BaseException:  # KeyboardInterrupt and the like: leave nothing running
                self._terminate()
                self._cleanup_files()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        ports = []
        for requested in self._requested_ports:
            port = requested
            while port is None or port in taken:
                port = free_port(self.host)
            taken.add(port)
            ports.append(port)
        self.http_port, self.grpc_port, self.metrics_port = ports

    def _launch(self, env: Mapping[str, str]) -> None:
        assert self.log_path is not None and self.work_dir is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append mode: the server, its stubs and retries all write to the same file safely.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in _terminate)
        self._log_offset = self._log_file.tell()
        self._log_file.write(("\n$ " + " ".join(redact(self.command, self._secrets())) + "\n").encode())
        self._log_file.flush()
        logger.info(
            "starting tritonserver: repository=%s models=%s http=%s grpc=%s log=%s",
            self.model_repository, self.models or "*", self.http_url, self.grpc_url, self.log_path,
        )
        # stdout/stderr go to the log file, never to a pipe: the python stubs inherit them and a
        # pipe nobody reads would block them (and communicate() would hang).
        self._proc = subprocess.Popen(  # noqa: S603 (fixed binary, our own arguments)
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(self.work_dir),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        write_owner_file(self.work_dir, self._proc.pid, self.shm_prefix)
        _LIVE_SERVERS.add(self)

    def _log_since_launch(self, max_bytes: int = 1_000_000) -> str:
        """Text this launch wrote to the log (the last ``max_bytes`` bytes of it)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                end = fh.tell()
                fh.seek(max(self._log_offset, end - max_bytes))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _error(self, message: str, cls: type[TritonServerError] = TritonServerError) -> TritonServerError:
        """An exception carrying Triton's error lines and the tail of this launch's log."""
        text = self._log_since_launch()
        lines = text.splitlines()
        lowered = text.lower()
        if not host_has_gpu() and ("kind_gpu" in lowered or "no cuda-capable device" in lowered
                                   or "no gpus are available" in lowered):
            message += (
                " (the log mentions GPU instances, but this host has no NVIDIA GPU: use "
                "model_config_name='cpu' or a config without KIND_GPU)"
            )
        # Triton's error-level lines ("E1126 ...") and load failures, wherever they are in the log.
        errors = [
            line for line in lines
            if (len(line) > 1 and line[0] == "E" and line[1].isdigit()
                and "CudaDriverHelper has not been initialized" not in line)
            or "failed to load" in line or line.startswith("error:")
        ]
        if errors:
            message += "\nerrors in the log:\n  " + "\n  ".join(errors[-10:])
        # The tail without Triton's wide ASCII tables (backends, models, options).
        tail = "\n".join([ln for ln in lines if not ln.startswith(("+", "|"))][-40:])
        return cls(message, log_tail=tail, log_path=self.log_path)

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._proc is not None
        base = f"http://{self.host}:{self.http_port}"
        deadline = time.monotonic() + float(timeout_s)
        delay = 0.05
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise self._error(
                    f"tritonserver exited with code {rc} during start-up "
                    f"(repository {self.model_repository}, models {self.models or '*'})"
                )
            if _http_get_status(f"{base}/v2/health/ready", timeout_s=2.0) == 200:
                self._check_models(base)
                logger.info("tritonserver ready (pid %s) at %s", self._proc.pid, self.http_url)
                return
            if time.monotonic() > deadline:
                raise self._error(f"tritonserver not ready after {timeout_s:.1f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _check_models(self, base: str) -> None:
        """Raise if a requested model is not READY (the index gives Triton's reason)."""
        try:
            index = _http_post_json(f"{base}/v2/repository/index", {}, timeout_s=5.0,
                                    headers=self.admin_headers("http"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self._error(f"could not read the model repository index: {exc}") from exc
        states = {}
        for entry in index if isinstance(index, list) else []:
            name = entry.get("name")
            # Several versions may be listed: a model counts as ready if any version is.
            if states.get(name, ("", ""))[0] != "READY":
                states[name] = (entry.get("state", ""), entry.get("reason", ""))
        wanted = self.models if self.models is not None else list(states)
        bad = {
            name: states.get(name, ("NOT FOUND", "not in the repository index"))
            for name in wanted
            if states.get(name, ("",))[0] != "READY"
        }
        if bad:
            detail = "; ".join(f"{n}: {s} {r}".strip() for n, (s, r) in sorted(bad.items()))
            raise self._error(f"model(s) failed to load: {detail}")

    def _terminate(self) -> None:
        """Stop the process group: SIGTERM, wait, then SIGKILL the group. Closes the log."""
        proc = self._proc
        if proc is not None:
            pgid = proc.pid  # start_new_session=True: the server leads its own group
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.exit_timeout_s + 5)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver (pid %s) ignored SIGTERM; killing its group", pgid)
            # The server and any python stub left in its group (stubs exit on their own once the
            # server is gone; a crashed server may leave them behind).
            self._kill_group(pgid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            _LIVE_SERVERS.discard(self)
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - group reused by someone else
            return False
        return True

    def _kill_group(self, pgid: int) -> None:
        deadline = time.monotonic() + 3.0
        while self._group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)  # stubs notice the parent is gone and exit by themselves
        if self._group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 3.0
            while self._group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _cleanup_files(self) -> None:
        for path in self.shm_files():
            with contextlib.suppress(OSError):
                path.unlink()
                logger.debug("removed leftover shared-memory file %s", path)
        if self.work_dir is not None:
            generated = [k.file for k in (self._admin_key, self._inference_key) if k is not None and k.file]
            for path in generated + [self.work_dir / OWNER_FILE]:
                with contextlib.suppress(OSError):
                    path.unlink()
        if self._own_work_dir and self.work_dir is not None:
            log_inside = self.log_path is not None and self.work_dir in self.log_path.parents
            if log_inside:
                # Keep only the log so a failure can still be read; drop the copied backends.
                shutil.rmtree(self.work_dir / "backends", ignore_errors=True)
            else:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server (SIGTERM, wait up to ``exit_timeout_s`` + 5 s, then kill its process group)
        and remove this server's leftover ``/dev/shm`` files. Safe to call more than once.

        Close every client first: an open HTTP keep-alive connection makes Triton wait out its
        exit timeout.
        """
        if self._proc is None:
            return
        rc_before = self._proc.poll()
        self._terminate()
        self._cleanup_files()
        if rc_before is not None and rc_before != 0:
            logger.warning("tritonserver had already exited with code %s; log: %s", rc_before, self.log_path)
        else:
            logger.info("tritonserver stopped (log: %s)", self.log_path)
        self._proc = None

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "LocalTritonServer":
        if not self.is_alive():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_alive() else "stopped"
        return f"LocalTritonServer({str(self.model_repository)!r}, http={self.http_url}, {state})"
