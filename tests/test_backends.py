"""Triton's real C++ onnxruntime and pytorch backends (``make backends``): the default test server
serves through them, every model of the repository is READY there, the build step skips a current
build, and the choice between real backends and Python stand-ins is explicit and loud.

A missing build FAILS these tests (CI runs ``make backends`` before the suite); it is never skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from geneformer_triton.serving.backend_build import (
    BACKEND_LIBRARIES,
    BackendsNotBuiltError,
    build_dir,
    check_built_backends,
    choose_backends,
    environment_stamp,
    log_backend_table,
    served_backends,
    source_tree_hash,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ("geneformer_onnx", "geneformer_onnx_fp16", "geneformer_torchscript")


def _log(server) -> str:
    return server.log_path.read_text(errors="replace")


def test_default_test_server_initialises_both_real_backends(triton_server):
    assert triton_server.backend_choice.kind == "real", (
        f"the test server fell back to the Python stand-ins ({triton_server.backend_choice.reason}): "
        "run `make backends` (scripts/build_backends.sh)")
    log = _log(triton_server)
    table = log_backend_table(log)
    for backend, library in BACKEND_LIBRARIES.items():
        assert f'"TRITONBACKEND_Initialize: {backend}"' in log, backend
        assert Path(table[backend]).name == library, table
    assert Path(table["python"]).name == "libtriton_python.so"


def test_every_model_of_the_repository_is_ready_and_encoders_run_in_cpp(triton_server):
    """Every model folder of model_repository/ (CPU configs) loads READY; encoders through the C++ libraries."""
    expected = sorted(p.parent.name for p in (REPO_ROOT / "model_repository").glob("*/config.pbtxt"))
    served = served_backends(triton_server.http_url, _log(triton_server), headers=triton_server.admin_headers("http"))
    assert sorted(served) == expected
    for model in ENCODERS:
        assert served[model].endswith("(Triton C++ backend)"), (model, served[model])
    assert served["geneformer_onnx"].startswith("libtriton_onnxruntime.so")
    assert served["geneformer_torchscript"].startswith("libtriton_pytorch.so")
    assert served["geneformer_tokenizer"] == "libtriton_python.so (python backend)"
    assert served["geneformer_embed_onnx"] == "ensemble scheduler"


def test_forced_stand_ins_say_so_in_the_log(exported_repository, tmp_path):
    """Negative control of the two tests above: GFTRITON_BACKENDS=stand-in serves through model.py."""
    from geneformer_triton.serving.server import LocalTritonServer

    with LocalTritonServer(exported_repository, models=["geneformer_onnx"], model_config_name="cpu",
                           work_dir=tmp_path / "work", backends="stand-in") as server:
        assert server.backend_choice.kind == "stand-in"
        served = served_backends(server.http_url, _log(server), headers=server.admin_headers("http"))
    assert served == {"geneformer_onnx": "onnxruntime/model.py (Python stand-in)"}
    assert "libtriton_onnxruntime.so" not in _log(server)


def test_auto_without_a_build_warns_and_real_without_a_build_fails(tmp_path, caplog):
    empty = tmp_path / "no-build"
    with caplog.at_level(logging.WARNING, logger="geneformer_triton.serving.backend_build"):
        choice = choose_backends("auto", folder=empty)
    assert choice.kind == "stand-in" and choice.directory is None
    assert "SERVING THROUGH PYTHON STAND-INS" in caplog.text and "make backends" in caplog.text
    with pytest.raises(BackendsNotBuiltError, match=r"no build at .*no-build.*make backends"):
        choose_backends("real", folder=empty)
    with pytest.raises(ValueError, match="must be one of auto, real, stand-in"):
        choose_backends("cpp")


def test_real_mode_uses_the_current_build():
    choice = choose_backends("real")
    assert choice.kind == "real" and choice.directory == build_dir() / "backends"


def test_a_stamp_from_another_environment_is_refused(tmp_path):
    folder = tmp_path / "build"
    shutil.copytree(build_dir() / "backends", folder / "backends", symlinks=True)
    stamp = json.loads((build_dir() / "stamp.json").read_text())
    (folder / "stamp.json").write_text(json.dumps(stamp))
    assert check_built_backends(folder=folder)[0] == folder / "backends"
    for key, value in (("torch", "2.5.0"), ("onnxruntime", "1.19.2"), ("tritonserver_sha256", "0" * 64),
                       ("venv", "/elsewhere/.venv")):
        (folder / "stamp.json").write_text(json.dumps({**stamp, key: value}))
        directory, reason = check_built_backends(folder=folder)
        assert directory is None and key in reason and "rebuild" in reason
    (folder / "stamp.json").write_text(json.dumps(stamp))
    (folder / "backends" / "pytorch" / "libtriton_pytorch.so").unlink()
    directory, reason = check_built_backends(folder=folder)
    assert directory is None and "pytorch/libtriton_pytorch.so" in reason


def test_stamp_records_this_environment():
    stamp = environment_stamp()
    import onnxruntime
    import torch

    assert stamp["torch"] == torch.__version__ and stamp["onnxruntime"] == onnxruntime.__version__
    assert stamp["tritonserver_library"].startswith("libtritonserver-") and len(stamp["tritonserver_sha256"]) == 64


def test_source_hash_changes_with_any_source_edit(tmp_path):
    source = tmp_path / "src"
    (source / "core").mkdir(parents=True)
    (source / "core" / "a.cc").write_text("int a;\n")
    before = source_tree_hash(source)
    (source / "core" / "a.cc").write_text("int b;\n")
    assert source_tree_hash(source) != before
    (source / "core" / "a.cc").write_text("int a;\n")
    assert source_tree_hash(source) == before
    (source / "core" / "b.cc").write_text("")
    assert source_tree_hash(source) != before


def test_build_script_skips_a_current_build_and_names_missing_sources(tmp_path):
    script = REPO_ROOT / "scripts" / "build_backends.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "backends up to date" in done.stdout
    missing = subprocess.run(["bash", str(script), "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert missing.returncode != 0
    assert "backend sources not found" in missing.stderr and "--source DIR" in missing.stderr


def test_gpu_configs_never_get_the_cpu_only_build(caplog):
    with caplog.at_level(logging.WARNING, logger="geneformer_triton.serving.backend_build"):
        assert choose_backends("auto", gpu=True).kind == "stand-in"
    assert "CPU-only" in caplog.text
    with pytest.raises(BackendsNotBuiltError, match="CPU-only"):
        choose_backends("real", gpu=True)


def test_a_reused_backend_directory_switches_kind_cleanly(tmp_path):
    from geneformer_triton.serving.server import build_backend_directory

    dest = tmp_path / "backends"
    build_backend_directory(dest, real_backends=build_dir() / "backends")
    assert (dest / "onnxruntime" / "libtriton_onnxruntime.so").is_file()
    assert (dest / "onnxruntime" / "libonnxruntime.so.1").is_symlink()
    build_backend_directory(dest)
    assert sorted(p.name for p in (dest / "onnxruntime").iterdir()) == ["model.py"]
    assert sorted(p.name for p in (dest / "pytorch").iterdir()) == ["model.py"]
