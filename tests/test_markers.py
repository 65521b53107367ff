"""The pytest markers of docs/testing.md hold: a test that starts a tritonserver (the helical interpreter)
without ``e2e`` (``helical``) fails, fixtures give their markers, and ``gpu`` tests fail rather than skip
where asked for without a GPU. Each case runs a small pytest session with tests/conftest.py as its plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.helical]  # the sessions below start both on purpose


def _pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-c", str(REPO_ROOT / "pyproject.toml"),
                           "--rootdir", str(tmp_path), "-q", "-p", "no:cacheprovider", str(tmp_path), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_an_unmarked_test_that_starts_a_server_fails(tmp_path):
    result = _pytest(tmp_path, """
        from geneformer_triton.serving.server import LocalTritonServer

        def test_unmarked(tmp_path):
            (tmp_path / "repo").mkdir()
            with LocalTritonServer(tmp_path / "repo", models="*") as server:
                assert server.is_alive()
    """)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "without the marker(s) e2e" in result.stdout, result.stdout[-3000:]


def test_a_marked_test_that_starts_a_server_passes(tmp_path):
    result = _pytest(tmp_path, """
        import pytest
        from geneformer_triton.serving.server import LocalTritonServer

        @pytest.mark.e2e
        def test_marked(tmp_path):
            (tmp_path / "repo").mkdir()
            with LocalTritonServer(tmp_path / "repo", models="*") as server:
                assert server.is_alive()
    """)
    assert result.returncode == 0, result.stdout[-3000:]


def test_an_unmarked_test_that_runs_helical_fails(tmp_path):
    result = _pytest(tmp_path, """
        import os, subprocess

        def test_unmarked():
            subprocess.run([os.environ["GFTRITON_HELICAL_PYTHON"], "-c", "import time; time.sleep(1.5)"], check=True)
    """)
    assert result.returncode == 1 and "without the marker(s) helical" in result.stdout, result.stdout[-3000:]


def test_markers_come_from_fixtures(tmp_path):
    source = """
        def test_served(triton_server):
            pass

        def test_helical(oracle_python):
            pass

        def test_plain():
            pass
    """
    e2e = _pytest(tmp_path, source, "--collect-only", "-m", "e2e")
    assert "test_served" in e2e.stdout and "test_plain" not in e2e.stdout and "test_helical" not in e2e.stdout
    fast = _pytest(tmp_path, source, "--collect-only", "-m", "not e2e and not helical")
    assert "test_plain" in fast.stdout and "test_served" not in fast.stdout and "test_helical" not in fast.stdout


def test_gpu_tests_are_deselected_only_without_a_device_and_fail_when_asked_for(tmp_path):
    from conftest import _nvidia_device_present

    source = """
        def test_needs_cuda(cuda_device):
            pass
    """
    default = _pytest(tmp_path, source)
    if _nvidia_device_present():  # a GPU host: they run, whatever state its driver is in
        assert "gpu tests deselected" not in default.stdout, default.stdout
        return
    assert default.returncode == 5 and "1 gpu tests deselected: no NVIDIA device" in default.stdout, default.stdout
    asked = _pytest(tmp_path, source, "-m", "gpu")
    assert asked.returncode == 1 and "a gpu test needs a CUDA GPU" in asked.stdout, asked.stdout[-3000:]
    fast = _pytest(tmp_path, source, "-m", "not e2e and not helical")  # the fast part on a CPU-only host
    assert fast.returncode == 5 and "1 gpu tests deselected" in fast.stdout, fast.stdout
