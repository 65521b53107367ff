"""Which backends a local ``tritonserver`` uses: Triton's real C++ ones, or the Python stand-ins.

``scripts/build_backends.sh`` (``make backends``) builds Triton's r24.10 ``libtriton_onnxruntime.so`` and
``libtriton_pytorch.so`` against this venv's pip ``onnxruntime`` and ``torch`` into an ignored folder
(default ``<checkout>/.backends``, or ``$GFTRITON_BACKEND_BUILD``)::

    .backends/
        stamp.json      what the build was made against (see :func:`environment_stamp`)
        backends/       a complete --backend-directory: python/, onnxruntime/, pytorch/
        build/          cmake/ninja trees and logs

The built libraries link into one venv (RUNPATH, a symlink to its ``libonnxruntime.so``) and into the
wheel's renamed ``libtritonserver-<hash>.so``, so they are used only while the stamp's environment part
(venv path, Python, torch and onnxruntime versions, server library hash) still matches.

The choice (``$GFTRITON_BACKENDS`` or an explicit argument):

- ``auto`` (default): the real backends when built and current, else the stand-ins with a WARNING;
- ``real``: the real backends, or :class:`BackendsNotBuiltError` saying how to build them;
- ``stand-in``: the Python stand-ins (``geneformer_triton/serving/local_backends``), for comparisons.

``python -m geneformer_triton.serving.backend_build stamp --source DIR`` prints the full stamp (environment
plus a hash of the source tree and of the build script); the build script uses it to skip a build
whose stamp matches.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKEND_LIBRARIES",
    "BACKENDS_ENV",
    "BUILD_DIR_ENV",
    "BackendChoice",
    "BackendsNotBuiltError",
    "build_dir",
    "check_built_backends",
    "choose_backends",
    "describe_backend_path",
    "log_backend_table",
    "served_backends",
    "environment_stamp",
    "source_tree_hash",
]

logger = logging.getLogger(__name__)

#: Backend name (a config's ``platform``/``backend``) -> the real library built for it.
BACKEND_LIBRARIES = {"onnxruntime": "libtriton_onnxruntime.so", "pytorch": "libtriton_pytorch.so"}
#: Environment variable choosing the backends: ``auto`` (default), ``real`` or ``stand-in``.
BACKENDS_ENV = "GFTRITON_BACKENDS"
#: Environment variable overriding the build folder (default ``<checkout>/.backends``).
BUILD_DIR_ENV = "GFTRITON_BACKEND_BUILD"
MODES = ("auto", "real", "stand-in")
STAMP_FORMAT = 1
_BUILD_HINT = "build them with `make backends` (or `bash scripts/build_backends.sh --source DIR`, docs/deployment.md)"


class BackendsNotBuiltError(RuntimeError):
    """``real`` backends were asked for, but no current build exists (the message says why and how)."""


@dataclass(frozen=True)
class BackendChoice:
    """The backends a server will use.

    Attributes:
        kind: ``"real"`` (Triton's C++ libraries) or ``"stand-in"`` (Python ``model.py`` backends).
        directory: the built ``backends/`` folder holding ``onnxruntime/`` and ``pytorch/`` (real only).
        reason: why this choice was made (shown in logs and the demo summary).
    """

    kind: str
    directory: Path | None
    reason: str


def build_dir() -> Path:
    """The build folder: ``$GFTRITON_BACKEND_BUILD``, else ``.backends`` beside this package's checkout."""
    override = os.environ.get(BUILD_DIR_ENV)
    return Path(override).resolve() if override else Path(__file__).resolve().parents[2] / ".backends"


def _site_packages(venv: Path) -> Path:
    """``<venv>/lib/pythonX.Y/site-packages`` (the one holding ``pytriton``), else this interpreter's."""
    for candidate in sorted(venv.glob("lib/python*/site-packages")):
        if (candidate / "pytriton").is_dir():
            return candidate
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(site_packages: Path, distribution: str) -> str:
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        if (dist.metadata["Name"] or "").lower() == distribution:
            return dist.version
    return "missing"


def environment_stamp(venv: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """What built backends depend on at run time: ``venv`` path, its Python ``major.minor``, the
    ``torch`` and ``onnxruntime`` versions there and the wheel's ``libtritonserver-*.so`` (name and
    sha256). ``venv`` defaults to the running interpreter's (``sys.prefix``)."""
    from geneformer_triton.serving.server import _venv_python_version

    root = Path(venv if venv is not None else sys.prefix).resolve()
    site = _site_packages(root)
    servers = sorted((site / "nvidia_pytriton.libs").glob("libtritonserver-*.so"))
    return {
        "format": str(STAMP_FORMAT),
        "venv": str(root),
        "python": _venv_python_version(root),
        "torch": _version(site, "torch"),
        "onnxruntime": _version(site, "onnxruntime"),
        "tritonserver_library": servers[0].name if servers else "missing",
        "tritonserver_sha256": _sha256(servers[0]) if servers else "missing",
    }


def source_tree_hash(source: str | os.PathLike[str]) -> str:
    """sha256 over the relative paths and contents of every file under ``source`` (sorted; ``.git``
    folders skipped), so any edit to the backend sources changes it."""
    root = Path(source).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"backend source folder {root} does not exist")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def check_built_backends(venv: str | os.PathLike[str] | None = None, folder: Path | None = None) -> tuple[Path | None, str]:
    """``(backends_dir, reason)``: the built ``backends/`` folder when it is complete and its stamp's
    environment matches ``venv``'s, else ``(None, why not)``."""
    root = folder if folder is not None else build_dir()
    stamp_path = root / "stamp.json"
    backends = root / "backends"
    if not stamp_path.is_file():
        return None, f"no build at {root} (no stamp.json)"
    missing = [f"{name}/{lib}" for name, lib in BACKEND_LIBRARIES.items() if not (backends / name / lib).is_file()]
    if missing:
        return None, f"the build at {root} lacks {', '.join(missing)}"
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable {stamp_path}: {exc}"
    current = environment_stamp(venv)
    stale = [f"{key} {stamp.get(key)!r} != {value!r}" for key, value in current.items() if stamp.get(key) != value]
    if stale:
        return None, f"the build at {root} was made for another environment ({'; '.join(stale)}): rebuild"
    return backends, f"built at {root} for torch {current['torch']}, onnxruntime {current['onnxruntime']}"


def choose_backends(mode: str | None = None, *, venv: str | os.PathLike[str] | None = None,
                    folder: Path | None = None, gpu: bool = False) -> BackendChoice:
    """Decide between the real backends and the stand-ins (see the module docstring).

    Args:
        mode: ``auto``, ``real`` or ``stand-in``; ``None`` reads ``$GFTRITON_BACKENDS`` (default ``auto``).
        venv: the server's Python environment (default ``sys.prefix``).
        folder: the build folder (default :func:`build_dir`).
        gpu: the server runs GPU configs (``KIND_GPU``), which the CPU-only build cannot serve.

    Raises:
        ValueError: an unknown mode.
        BackendsNotBuiltError: ``real`` without a current build.
    """
    chosen = (mode or os.environ.get(BACKENDS_ENV) or "auto").strip().lower()
    if chosen not in MODES:
        raise ValueError(f"backends mode {chosen!r} (from the argument or ${BACKENDS_ENV}) must be one of {', '.join(MODES)}")
    if chosen == "stand-in":
        return BackendChoice("stand-in", None, f"stand-ins asked for ({BACKENDS_ENV}=stand-in or backends='stand-in')")
    directory, reason = check_built_backends(venv, folder)
    if directory is not None and gpu:
        directory, reason = None, f"the build ({reason}) is CPU-only (TRITON_ENABLE_GPU=OFF) and the configs are GPU ones"
    if directory is not None:
        logger.info("serving through Triton's C++ onnxruntime and pytorch backends: %s", reason)
        return BackendChoice("real", directory, reason)
    if chosen == "real":
        raise BackendsNotBuiltError(f"the real onnxruntime/pytorch backends were asked for, but {reason}; {_BUILD_HINT}")
    logger.warning(
        "SERVING THROUGH PYTHON STAND-INS for Triton's onnxruntime and pytorch backends (not the real C++ "
        "backends): %s; %s. Set %s=real to make this an error.", reason, _BUILD_HINT, BACKENDS_ENV)
    return BackendChoice("stand-in", None, f"fallback: {reason}")


def log_backend_table(log_text: str) -> dict[str, str]:
    """``{backend name: path}`` from the ``| Backend | Path | Config |`` table tritonserver logs at
    start-up (the last table wins when the log holds several starts)."""
    table: dict[str, str] = {}
    in_table = False
    for line in log_text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == ["Backend", "Path"]:
            in_table, table = True, {}
        elif in_table and line.startswith("|") and len(cells) >= 2:
            table[cells[0]] = cells[1]
        elif in_table and not line.startswith("+"):
            in_table = False
    return table


def describe_backend_path(path: str) -> str:
    """In words, what a backend path from :func:`log_backend_table` is."""
    name = Path(path).name
    if name == "model.py":
        return f"{Path(path).parent.name}/model.py (Python stand-in)"
    if name == "libtriton_python.so":
        return "libtriton_python.so (python backend)"
    return f"{name} (Triton C++ backend)"


def served_backends(http_url: str, log_text: str, models: list[str] | None = None,
                    timeout_s: float = 5.0, headers: dict[str, str] | None = None) -> dict[str, str]:
    """``{model: what served it}`` for models of a running server (``models``; default: every READY
    model of its repository index): each model's ``backend`` from its served config (``GET
    /v2/models/<name>/config``) looked up in the server log's backend table (``ensemble scheduler``
    for ensembles). ``http_url`` is ``host:port``; ``headers`` carry the admin key that the repository
    index needs on a restricted server (``LocalTritonServer.admin_headers("http")``)."""
    import urllib.request

    if models is None:
        request = urllib.request.Request(f"http://{http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 (the caller's server)
            models = sorted({e["name"] for e in json.loads(resp.read()) if e.get("state") == "READY"})
    table = log_backend_table(log_text)
    described = {}
    for model in models:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/config", timeout=timeout_s) as resp:  # noqa: S310
            config = json.loads(resp.read())
        backend = config.get("backend") or ""
        if config.get("platform") == "ensemble" or not backend:
            described[model] = "ensemble scheduler"
        else:
            described[model] = describe_backend_path(table[backend]) if backend in table else f"{backend} (not in the log)"
    return described


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.serving.backend_build",
                                     description="stamp of a backend build (used by scripts/build_backends.sh)")
    sub = parser.add_subparsers(dest="command", required=True)
    stamp = sub.add_parser("stamp", help="print the full stamp JSON for this venv and a source folder")
    stamp.add_argument("--source", required=True, help="folder with the backend sources")
    stamp.add_argument("--script", required=True, help="the build script (its hash is part of the stamp)")
    check = sub.add_parser("check", help="exit 0 when the build folder is usable by this venv, else print why")
    check.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "stamp":
        full = {**environment_stamp(), "source_sha256": source_tree_hash(args.source),
                "script_sha256": _sha256(Path(args.script))}
        print(json.dumps(full, indent=2, sort_keys=True))
        return 0
    directory, reason = check_built_backends(folder=args.folder)
    print(reason)
    return 0 if directory is not None else 1


if __name__ == "__main__":
    sys.exit(_main())
