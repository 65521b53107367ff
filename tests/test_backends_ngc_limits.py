"""The exported encoders stay within what the NGC 24.10 container's runtimes load (onnxruntime 1.19,
libtorch 2.5), checked offline from the files; too-new files are rejected (negative controls)."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import onnx
import pytest

from geneformer_triton.export.serving_limits import (
    ONNX_LIMITS,
    TORCHSCRIPT_MAX_FILE_FORMAT,
    check_file,
    check_repository,
    torchscript_file_format_version,
)


def test_every_exported_encoder_is_within_the_ngc_24_10_limits(exported_repository):
    results = check_repository(exported_repository)
    names = {f"{p.parent.parent.name}/{p.name}" for p in results}
    assert {"geneformer_onnx/model.onnx", "geneformer_onnx/model.portable.onnx", "geneformer_onnx_fp16/model.onnx",
            "geneformer_torchscript/model.pt"} <= names, names
    assert all(not problems for problems in results.values()), results


def _portable(exported_repository: Path) -> onnx.ModelProto:
    return onnx.load(str(exported_repository / "geneformer_onnx" / "1" / "model.portable.onnx"))


@pytest.mark.parametrize("domain, version", [("", 22), ("ai.onnx.ml", 6), ("com.microsoft", 2)])
def test_a_too_new_opset_is_rejected(exported_repository, tmp_path, domain, version):
    model = _portable(exported_repository)
    kept = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(kept + [onnx.helper.make_opsetid(domain, version)])
    path = tmp_path / "too_new.onnx"
    onnx.save(model, str(path))
    (problem,) = check_file(path)
    assert f"opset {domain or 'ai.onnx'} {version} >" in problem and "onnxruntime 1.19" in problem


def test_a_too_new_ir_version_is_rejected(exported_repository, tmp_path):
    model = _portable(exported_repository)
    model.ir_version = ONNX_LIMITS["ir_version"] + 1
    path = tmp_path / "ir11.onnx"
    onnx.save(model, str(path))
    (problem,) = check_file(path)
    assert "IR version 11 > 10" in problem


def _rewrite_version(source: Path, dest: Path, version: int) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.split("/", 1)[-1] == "version":
                data = f"{version}\n".encode()
            zout.writestr(item, data)


def test_a_too_new_torchscript_archive_is_rejected(exported_repository, tmp_path):
    original = exported_repository / "geneformer_torchscript" / "1" / "model.pt"
    assert torchscript_file_format_version(original) <= TORCHSCRIPT_MAX_FILE_FORMAT
    newer = tmp_path / "v11.pt"
    _rewrite_version(original, newer, TORCHSCRIPT_MAX_FILE_FORMAT + 1)
    (problem,) = check_file(newer)
    assert "file format version 11 > 10 (libtorch 2.5)" in problem
    same = tmp_path / "v10.pt"
    _rewrite_version(original, same, TORCHSCRIPT_MAX_FILE_FORMAT)
    assert check_file(same) == []
    not_torchscript = tmp_path / "plain.pt"
    shutil.copy(exported_repository / "geneformer_onnx" / "1" / "model.portable.onnx", not_torchscript)
    with pytest.raises(zipfile.BadZipFile):
        check_file(not_torchscript)


def test_libtorch_file_format_limit_is_unchanged_in_the_local_torch():
    """kMaxSupportedFileFormatVersion has been 0xA since PyTorch 1.11; the local torch's header agrees,
    so libtorch 2.5 (between the two) reads the same range."""
    import torch

    header = Path(torch.__file__).parent / "include" / "caffe2" / "serialize" / "versions.h"
    found = re.search(r"kMaxSupportedFileFormatVersion\s*=\s*(0x[0-9A-Fa-f]+)L", header.read_text())
    assert found and int(found.group(1), 16) == TORCHSCRIPT_MAX_FILE_FORMAT
