"""Will an exported encoder load in the production server? Offline checks against the NGC 24.10
Triton container's runtimes: onnxruntime 1.19 and libtorch 2.5 (this project builds and tests with
newer ones: onnxruntime 1.32, torch 2.13).

- ONNX: the model's ``ir_version`` and each ``opset_import`` must be within what onnxruntime 1.19
  implements: IR version 10, ``ai.onnx`` opset 21, ``ai.onnx.ml`` opset 5 (measured with the
  onnxruntime 1.19.2 wheel: IR 11, opset 22 and ML opset 6 are refused at load). Other domains
  (``com.microsoft`` contrib ops and the like) are at version 1 in every release.
- TorchScript: the archive's ``version`` record (``<archive>/version`` or ``<archive>/.data/version``)
  must be within libtorch 2.5's ``caffe2::serialize::kMaxSupportedFileFormatVersion`` (10; unchanged
  since PyTorch 1.11). The record rises above the produced minimum only when the model uses an operator
  with a versioned upgrader.

These are necessary, not sufficient, conditions: an operator (or contrib op) newer than the old runtime
fails only when it loads there. docs/deployment.md ("Remaining gap to production") says what else holds.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

__all__ = ["ONNX_LIMITS", "TORCHSCRIPT_MAX_FILE_FORMAT", "check_file", "check_onnx", "check_repository", "check_torchscript",
           "torchscript_file_format_version"]

#: onnxruntime 1.19 (NGC 24.10): the highest IR version and opset per domain it loads.
ONNX_LIMITS = {"ir_version": 10, "opsets": {"": 21, "ai.onnx": 21, "ai.onnx.ml": 5}, "other_domains": 1}
#: libtorch 2.5 (NGC 24.10): caffe2::serialize::kMaxSupportedFileFormatVersion.
TORCHSCRIPT_MAX_FILE_FORMAT = 10


def check_onnx(path: str | Path) -> list[str]:
    """Problems (empty when none) of the ONNX file at ``path`` for onnxruntime 1.19: too-new IR version
    or opset imports. Reads only the model header (no external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    problems = []
    if model.ir_version > ONNX_LIMITS["ir_version"]:
        problems.append(f"{path}: ONNX IR version {model.ir_version} > {ONNX_LIMITS['ir_version']} (onnxruntime 1.19)")
    for opset in model.opset_import:
        limit = ONNX_LIMITS["opsets"].get(opset.domain, ONNX_LIMITS["other_domains"])
        if opset.version > limit:
            domain = opset.domain or "ai.onnx"
            problems.append(f"{path}: opset {domain} {opset.version} > {limit} (onnxruntime 1.19)")
    return problems


def torchscript_file_format_version(path: str | Path) -> int:
    """The ``version`` record of a TorchScript (``torch.jit.save``) zip archive."""
    with zipfile.ZipFile(path) as archive:
        records = [n for n in archive.namelist() if n.split("/", 1)[-1] in ("version", ".data/version")]
        if not records:
            raise ValueError(f"{path}: no version record in the archive; is it a TorchScript file?")
        return max(int(archive.read(name).decode().strip()) for name in records)


def check_torchscript(path: str | Path) -> list[str]:
    """Problems (empty when none) of the TorchScript file at ``path`` for libtorch 2.5."""
    version = torchscript_file_format_version(path)
    if version > TORCHSCRIPT_MAX_FILE_FORMAT:
        return [f"{path}: TorchScript file format version {version} > {TORCHSCRIPT_MAX_FILE_FORMAT} (libtorch 2.5)"]
    return []


def check_file(path: str | Path) -> list[str]:
    """:func:`check_onnx` for ``*.onnx``, :func:`check_torchscript` for ``*.pt``, else nothing."""
    suffix = Path(path).suffix
    if suffix == ".onnx":
        return check_onnx(path)
    if suffix == ".pt":
        return check_torchscript(path)
    return []


def check_repository(repository: str | Path) -> dict[Path, list[str]]:
    """``{file: problems}`` for every ``*.onnx`` and ``*.pt`` under ``<repository>/<model>/<version>/``."""
    root = Path(repository)
    files = sorted(p for pattern in ("*/[0-9]*/*.onnx", "*/[0-9]*/*.pt") for p in root.glob(pattern))
    return {path: check_file(path) for path in files}
