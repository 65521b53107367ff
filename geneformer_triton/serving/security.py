"""Who may call which of tritonserver's APIs: restricted API groups and their keys.

Default (``ApiAccess()``): the model-repository (load/unload/upload = code execution through the
python backend), shared-memory, trace and logging APIs (the last two can point files anywhere) need
the header ``admin-key: KEY`` over HTTP, ``triton-grpc-protocol-admin-key: KEY`` over gRPC (Triton
2.51's ``--http-restricted-api`` / ``--grpc-restricted-protocol``). Inference, health, metadata,
model config and statistics stay open unless ``protect_inference`` also puts ``inference`` behind
``inference-key``.

A key comes from, in order: the explicit value, a key file, an environment variable
(``GFTRITON_ADMIN_KEY`` / ``GFTRITON_INFERENCE_KEY``), else it is generated and written to a file
readable only by its owner (mode 0600) in the server's work dir. Keys are never logged. Triton takes
them on its command line, so local users who can list processes can read them: run the server as its
own user on a host you trust, or in a container.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = [
    "ADMIN_APIS",
    "ADMIN_HEADER",
    "INFERENCE_HEADER",
    "ADMIN_KEY_ENV",
    "INFERENCE_KEY_ENV",
    "ApiAccess",
    "ResolvedKey",
    "grpc_header",
    "read_key_file",
    "resolve_key",
    "restriction_args",
    "redact",
]

#: APIs restricted to the admin key by default.
ADMIN_APIS = ("model-repository", "shared-memory", "trace", "logging")
#: HTTP header names (gRPC: ``grpc_header(name)``).
ADMIN_HEADER = "admin-key"
INFERENCE_HEADER = "inference-key"
#: Environment variables a key is read from when none is given explicitly.
ADMIN_KEY_ENV = "GFTRITON_ADMIN_KEY"
INFERENCE_KEY_ENV = "GFTRITON_INFERENCE_KEY"

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")


def grpc_header(http_header: str) -> str:
    """The gRPC metadata key Triton expects for a restricted-protocol header."""
    return f"triton-grpc-protocol-{http_header}"


@dataclass(frozen=True)
class ApiAccess:
    """Access settings of a server.

    Attributes:
        admin_key: the admin key itself (else ``admin_key_file``, else ``$GFTRITON_ADMIN_KEY``, else generated).
        admin_key_file: a file holding the admin key (first line).
        protect_inference: also restrict the inference API (header ``inference-key``), for deployments
            without an authenticating proxy in front.
        inference_key, inference_key_file: as for the admin key (env ``GFTRITON_INFERENCE_KEY``).
    """

    admin_key: Optional[str] = None
    admin_key_file: Optional[Path] = None
    protect_inference: bool = False
    inference_key: Optional[str] = None
    inference_key_file: Optional[Path] = None


@dataclass(frozen=True)
class ResolvedKey:
    """A key and where it came from (``file`` is set when it was generated and written there)."""

    value: str
    source: str
    file: Optional[Path] = None

    def __repr__(self) -> str:  # never show the key itself
        return f"ResolvedKey(source={self.source!r}, file={self.file!r})"


def _checked(key: str, where: str) -> str:
    key = key.strip()
    if not _KEY_PATTERN.match(key):
        raise ValueError(
            f"the key from {where} must be 16-256 characters of letters, digits and ._~+/- "
            "(e.g. `openssl rand -hex 16`); it was rejected without being shown"
        )
    return key


def read_key_file(path: Path) -> str:
    """The key on the first line of ``path``; refuses files other users can read or write."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"key file {path} does not exist")
    mode = path.stat().st_mode & 0o077
    if mode:
        raise ValueError(f"key file {path} is readable or writable by other users (mode {oct(path.stat().st_mode & 0o777)}); "
                         f"run: chmod 600 {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    return _checked(lines[0] if lines else "", f"key file {path}")


def resolve_key(explicit: Optional[str], key_file: Optional[Path], env_var: str, generated_file: Path,
                environ: Mapping[str, str] = os.environ) -> ResolvedKey:
    """Pick a key (explicit, key file, environment, else generate one into ``generated_file``, mode 0600)."""
    if explicit:
        return ResolvedKey(_checked(explicit, "the explicit argument"), "argument")
    if key_file is not None:
        return ResolvedKey(read_key_file(key_file), f"key file {key_file}")
    if environ.get(env_var):
        return ResolvedKey(_checked(environ[env_var], f"${env_var}"), f"${env_var}")
    key = secrets.token_hex(16)
    generated_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(generated_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return ResolvedKey(key, "generated", generated_file)


def restriction_args(admin_key: str, inference_key: Optional[str]) -> list[str]:
    """tritonserver flags restricting :data:`ADMIN_APIS` (and ``inference`` when a key is given)."""
    groups: list[tuple[Sequence[str], str, str]] = [(ADMIN_APIS, ADMIN_HEADER, admin_key)]
    if inference_key is not None:
        groups.append((("inference",), INFERENCE_HEADER, inference_key))
    args = []
    for apis, header, key in groups:
        spec = f"{','.join(apis)}:{header}={key}"
        args += [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]
    return args


def redact(command: Sequence[str], secrets_: Sequence[str]) -> list[str]:
    """``command`` with every occurrence of each secret replaced by ``***`` (for logs)."""
    out = []
    for part in command:
        for secret in secrets_:
            if secret:
                part = part.replace(secret, "***")
        out.append(part)
    return out
