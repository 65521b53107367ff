"""The package as a user installs it: one namespace, layers whose imports point one way, lint-clean.

``pip install .`` into a temporary folder (the wheel's layout, not the checkout's) must hold only
``geneformer_triton`` (client/, export/ and bench/ mapped into it, no generic top-level names) and every
module of the checkout, the python models' ``model_repository/<model>/1/model.py`` included (as
``geneformer_triton/python_models``), from which the installed ``gftriton export`` writes a repository
outside the checkout; the import-linter layers contract (pyproject ``[tool.importlinter]``) runs on
that install; ruff (pyproject ``[tool.ruff]``) on the checkout. Each gate has a negative control: a
module that imports upward, an install without a python model's source, a file with unsorted and unused imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAPPED_FOLDERS = {"geneformer_triton": "geneformer_triton", "client": "geneformer_triton/client",
                  "export": "geneformer_triton/export", "bench": "geneformer_triton/bench",
                  "model_repository": "geneformer_triton/python_models"}
PYTHON_MODELS = sorted(p.relative_to(REPO_ROOT / "model_repository") for p in (REPO_ROOT / "model_repository").glob("*/1/model.py"))


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}: run `make venv` (requirements.txt pins it)"
    return str(path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps .`` into a fresh folder (built from a copy: the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    for rel in tracked:
        if rel.startswith(("bench/results/", "tests/")) or not (REPO_ROOT / rel).is_file():
            continue
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, source / rel)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, capture_output=True, text=True)
    return target


def _lint_imports(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("lint-imports"), str(REPO_ROOT / "pyproject.toml"), "--no-cache"], cwd=site,
                          env={"PATH": str(BIN), "PYTHONPATH": str(site)}, capture_output=True, text=True)


def test_install_has_one_namespace(installed):
    top = sorted(p.name for p in installed.iterdir() if p.name not in {"bin", "__pycache__"})
    assert [name for name in top if not name.endswith(".dist-info")] == ["geneformer_triton"], top


def test_install_holds_every_module_of_the_checkout(installed):
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    missing = []
    for rel in tracked:
        folder, _, rest = rel.partition("/")
        if folder in MAPPED_FOLDERS and not rel.startswith("bench/results/"):
            if not (installed / MAPPED_FOLDERS[folder] / rest).is_file():
                missing.append(rel)
    assert not missing, f"not installed (add the package to [tool.setuptools] packages in pyproject.toml): {missing}"


def _export_from(site: Path, repository: Path) -> subprocess.CompletedProcess:
    """The installed ``gftriton export`` (random weights, TorchScript only), run outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(site / "bin" / "gftriton"), "export", "--random-weights", "--formats", "torchscript",
                           "--repository", str(repository)], cwd=repository.parent, env=env, capture_output=True,
                          text=True, timeout=600)


def test_installed_export_writes_the_python_models(installed, tmp_path):
    assert len(PYTHON_MODELS) >= 2, PYTHON_MODELS  # tokenizer and ISP
    repository = tmp_path / "empty"
    result = _export_from(installed, repository)
    assert result.returncode == 0, result.stderr[-3000:]
    for rel in PYTHON_MODELS:
        assert (repository / rel).read_bytes() == (REPO_ROOT / "model_repository" / rel).read_bytes(), rel


def test_installed_export_without_a_python_model_fails(installed, tmp_path):
    """Negative control: an install lacking the ISP model's source is refused by name (so the test above
    read the install's copies, not the checkout's)."""
    site = tmp_path / "site"
    shutil.copytree(installed, site, symlinks=True)
    (site / "geneformer_triton" / "python_models" / "geneformer_isp" / "1" / "model.py").unlink()
    repository = tmp_path / "empty"
    result = _export_from(site, repository)
    assert result.returncode != 0
    assert "geneformer_isp/1/model.py missing" in result.stderr, result.stderr[-3000:]
    assert not (repository / "geneformer_isp" / "1" / "model.py").exists()


def test_layers_contract_holds(installed):
    result = _lint_imports(installed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_layers_contract_holds_in_the_checkout():
    """What a contributor runs (`.venv/bin/lint-imports` at the repository root): geneformer_triton/client,
    /export and /bench are links to the top-level folders, so the checkout has the installed layout."""
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_layers_contract_rejects_an_upward_import(installed, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    probe = site / "geneformer_triton" / "core" / "layer_probe.py"
    probe.write_text("from geneformer_triton.client import triton_client  # core must not import client\n")
    result = _lint_imports(site)
    assert result.returncode != 0
    assert "geneformer_triton.core.layer_probe -> geneformer_triton.client.triton_client" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_rejects_unsorted_and_unused_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nprint(os.sep)\n")
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "--config", str(REPO_ROOT / "pyproject.toml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "F401" in result.stdout and "I001" in result.stdout
