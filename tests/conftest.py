"""Shared fixtures: real Geneformer dictionaries (../shared), a random-weight gf-6L-10M-i2048, an
exported model repository, a real tritonserver serving it, and real cells (celltypist sample)."""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
MODEL_NAME = "gf-6L-10M-i2048"
N_CELLS = 48


def pytest_configure(config: pytest.Config) -> None:
    if not (SHARED / "geneformer" / "v1" / "token_dictionary.json").is_file():
        raise pytest.UsageError(f"Geneformer dictionaries not found under {SHARED}/geneformer (set GFTRITON_SHARED_DIR)")


# ----------------------------------------------------------------------------- markers (docs/testing.md)
# e2e: starts a real tritonserver; helical: runs the helical venv's interpreter (helical or upstream
# Geneformer); gpu: needs a CUDA GPU. A test gets a marker from the fixtures it uses (their whole closure)
# or from its module; the process watcher below fails a test that starts one of those processes without
# the marker, so `pytest -m "not e2e and not helical"` can never quietly start a server.
MARKER_FIXTURES = {
    "e2e": {"triton_server", "v2_server", "packed_server"},
    "helical": {"helical_python", "oracle_python"},
    "gpu": {"cuda_device"},
}
MARKER_MODULES = {  # modules whose tests start their own servers / helical runs in the test body
    "e2e": {"test_backends", "test_bad_input", "test_bench", "test_distributed", "test_fidelity_served",
            "test_security", "test_security_lifecycle", "test_server", "test_variants", "test_isp_bench"},
    "helical": {"test_isp_stats", "test_isp_bench"},
}


def _nvidia_device_present() -> bool:
    """An NVIDIA GPU is attached to this host (driver device node or nvidia-smi), working or not."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        for marker, fixtures in MARKER_FIXTURES.items():
            if fixtures & set(item.fixturenames) or module in MARKER_MODULES.get(marker, ()):
                item.add_marker(marker)
    # gpu tests are deselected only on hosts without any NVIDIA device and only when -m does not name gpu:
    # on a GPU host (even with a broken driver or a CPU-only torch) they run and fail; `-m gpu` runs them anywhere
    if re.search(r"\bgpu\b", config.option.markexpr or "") or _nvidia_device_present():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[_GPU_DESELECTED] = len(gpu)


_GPU_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if config.stash.get(_GPU_DESELECTED, 0):
        terminalreporter.write_line(f"{config.stash[_GPU_DESELECTED]} gpu tests deselected: no NVIDIA device on this "
                                    "host (`pytest -m gpu` runs them, and they fail here)", yellow=True)


@pytest.fixture(scope="session")
def cuda_device():
    """The first CUDA device; fails (never skips) where torch sees none (tests using it are marked gpu)."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail(f"a gpu test needs a CUDA GPU, torch {torch.__version__} sees none "
                    f"(CUDA build: {torch.version.cuda}); deselect with -m 'not gpu' on a CPU-only host")
    return torch.device("cuda:0")


class _ProcessWatcher:
    """Records the tritonserver and helical-venv processes that appear below this process while a test runs."""

    def __init__(self, helical_python: str) -> None:
        import psutil

        self._me = psutil.Process()
        self._helical = helical_python
        self._before = {p.pid for p in self._me.children(recursive=True)}
        self.seen: dict[str, set[str]] = {"e2e": set(), "helical": set()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            for child in self._me.children(recursive=True):
                if child.pid in self._before:
                    continue
                try:
                    command = child.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if command and Path(command[0]).name == "tritonserver":
                    self.seen["e2e"].add(command[0])
                elif command and self._helical and command[0] == self._helical:
                    self.seen["helical"].add(" ".join(command[:3]))

    def stop(self) -> dict[str, set[str]]:
        self._stop.set()
        self._thread.join()
        return self.seen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Fail a test that starts a tritonserver (helical's interpreter) but is not marked e2e (helical)."""
    unmarked = [m for m in ("e2e", "helical") if not item.get_closest_marker(m)]
    watcher = _ProcessWatcher(os.environ.get("GFTRITON_HELICAL_PYTHON", str(REPO_ROOT / ".venv-helical" / "bin" / "python"))) \
        if unmarked else None
    item.stash[_WATCHER] = watcher
    yield
    if watcher is not None:
        watcher.stop()


_WATCHER = pytest.StashKey[object]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    watcher = item.stash.get(_WATCHER, None)
    if call.when != "teardown" or watcher is None:
        return
    seen = watcher.stop()
    missing = {m: sorted(seen[m]) for m in ("e2e", "helical") if seen[m] and not item.get_closest_marker(m)}
    if missing and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} started {missing} without the marker(s) {', '.join(missing)}: add its "
                           "fixture or module to MARKER_FIXTURES / MARKER_MODULES in tests/conftest.py")


@pytest.fixture(scope="session")
def v1_vocabulary():
    from geneformer_triton.core.dictionaries import load_vocabulary

    return load_vocabulary(SHARED / "geneformer" / "v1")


@pytest.fixture(scope="session")
def v2_vocabulary():
    from geneformer_triton.core.dictionaries import load_vocabulary

    return load_vocabulary(SHARED / "geneformer" / "v2")


@pytest.fixture(scope="session")
def loaded_model(v1_vocabulary):
    """gf-6L-10M-i2048 with seeded random weights and the real V1 dictionaries."""
    from geneformer_triton.model.loading import random_geneformer

    return random_geneformer(MODEL_NAME, seed=0, vocabulary=v1_vocabulary)


@pytest.fixture(scope="session")
def reference_encoder(loaded_model):
    """fp32 PyTorch reference encoder (numpy callable)."""
    from geneformer_triton.model.runtimes import torch_encode_fn

    return torch_encode_fn(loaded_model.encoder())


@pytest.fixture(scope="session")
def celltypist_cells(v1_vocabulary):
    """The first N_CELLS real cells of the celltypist sample (raw counts, Ensembl ids in var)."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    return load_celltypist_sample(n_cells=N_CELLS, symbol_to_ensembl=v1_vocabulary.gene_name_to_id)


@pytest.fixture(scope="session")
def celltypist_tokens(celltypist_cells, v1_vocabulary) -> list[np.ndarray]:
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    adata = celltypist_cells
    return tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory, loaded_model) -> Path:
    """Every encoder format, the tokenizer, the ensembles and the ISP model exported into an empty folder
    (export_model_repository writes a complete repository: generated configs, python models, weights)."""
    from geneformer_triton.export.repository import export_model_repository

    repository = tmp_path_factory.mktemp("exported") / "model_repository"
    export_model_repository(loaded_model, repository)
    return repository


@pytest.fixture(scope="session")
def triton_server(exported_repository):
    """A real tritonserver (nvidia-pytriton wheel) serving the exported repository, CPU configs."""
    from geneformer_triton.serving.server import LocalTritonServer

    with LocalTritonServer(exported_repository, model_config_name="cpu") as server:
        yield server


def write_helical_cache(prefix: Path, loaded, version: str = "v1") -> Path:
    """Lay out ``loaded`` as helical's cache expects it under ``prefix`` (weights, config, dictionaries).

    V1 checkpoints are ``pytorch_model.bin`` in helical's cache, later versions ``model.safetensors``.
    """
    import torch

    folder = prefix / ".cache" / "helical" / "models" / "geneformer" / version
    checkpoint = folder / loaded.name
    checkpoint.mkdir(parents=True)
    loaded.model.save_pretrained(checkpoint)
    if version == "v1":
        torch.save(loaded.model.state_dict(), checkpoint / "pytorch_model.bin")
        (checkpoint / "model.safetensors").unlink()
    (checkpoint / "training_args.bin").write_bytes(b"")  # helical only checks that it exists
    for name in ("token_dictionary.json", "gene_median_dictionary.json", "ensembl_mapping_dict.json"):
        shutil.copy(SHARED / "geneformer" / version / name, folder / name)
    return checkpoint


def one_model_repository(root: Path, name: str, model_py: str, config: str) -> Path:
    """A model repository at ``root`` holding one python-backend model ``name`` (``model.py`` + config)."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(model_py)
    (root / name / "config.pbtxt").write_text(config)
    return root
