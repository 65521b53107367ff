"""Shared fixtures: real Geneformer dictionaries (../shared), a random-weight gf-6L-10M-i2048, an
exported model repository, a real tritonserver serving it, and real cells (celltypist sample)."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def v1_vocabulary():
    from geneformer_triton.dictionaries import load_vocabulary

    return load_vocabulary(SHARED / "geneformer" / "v1")


@pytest.fixture(scope="session")
def v2_vocabulary():
    from geneformer_triton.dictionaries import load_vocabulary

    return load_vocabulary(SHARED / "geneformer" / "v2")


@pytest.fixture(scope="session")
def loaded_model(v1_vocabulary):
    """gf-6L-10M-i2048 with seeded random weights and the real V1 dictionaries."""
    from geneformer_triton.loading import random_geneformer

    return random_geneformer(MODEL_NAME, seed=0, vocabulary=v1_vocabulary)


@pytest.fixture(scope="session")
def reference_encoder(loaded_model):
    """fp32 PyTorch reference encoder (numpy callable)."""
    from geneformer_triton.runtimes import torch_encode_fn

    return torch_encode_fn(loaded_model.encoder())


@pytest.fixture(scope="session")
def celltypist_cells(v1_vocabulary):
    """The first N_CELLS real cells of the celltypist sample (raw counts, Ensembl ids in var)."""
    from geneformer_triton.data.celltypist_sample import load_celltypist_sample

    return load_celltypist_sample(n_cells=N_CELLS, symbol_to_ensembl=v1_vocabulary.gene_name_to_id)


@pytest.fixture(scope="session")
def celltypist_tokens(celltypist_cells, v1_vocabulary) -> list[np.ndarray]:
    from geneformer_triton.tokenizer import RankValueTokenizer

    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    adata = celltypist_cells
    return tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory, loaded_model) -> Path:
    """Every encoder format, the tokenizer, the ensembles and the ISP model exported into an empty folder
    (export_model_repository writes a complete repository: generated configs, python models, weights)."""
    from export.repository import export_model_repository

    repository = tmp_path_factory.mktemp("exported") / "model_repository"
    export_model_repository(loaded_model, repository)
    return repository


@pytest.fixture(scope="session")
def triton_server(exported_repository):
    """A real tritonserver (nvidia-pytriton wheel) serving the exported repository, CPU configs."""
    from geneformer_triton.server import LocalTritonServer

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
