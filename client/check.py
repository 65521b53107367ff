"""Fidelity of a running Triton server against the local fp32 PyTorch reference.

Every served encoder (token ids in) and ensemble (raw counts in) is found from the server's ready models
and their configs, embeds the same real celltypist cells as the reference, and is compared with
``geneformer_triton.core.fidelity`` (centred cosine, error relative to the spread between cells, nearest-neighbour
identity, kNN-10 overlap; thresholds per precision from ``fidelity.gate_for``). The served
tokenizer's token ids are compared with local tokenization too. Where a local copy of the served
repository is given, its manifests' weights hash must equal the reference's; without it, other weights
show as a failed fidelity row whose detail says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geneformer_triton.client.triton_client import GeneformerClient, pack_cells
from geneformer_triton.core.contract import (
    GENE_IDS,
    TOKENIZER_MODEL,
    VARIANT_OF_MODEL,
    ServedModel,
    cell_embedding_outputs,
    is_encoder_signature,
)
from geneformer_triton.core.fidelity import FidelityResult, compare_variant
from geneformer_triton.core.tokenizer import RankValueTokenizer
from geneformer_triton.model.runtimes import embed_token_cells, torch_encode_fn

if TYPE_CHECKING:
    from geneformer_triton.model.loading import LoadedGeneformer

LOGGER = logging.getLogger(__name__)

GROSS_MISMATCH_COSINE = 0.9


def _names(tensors: list[dict]) -> set[str]:
    return {t["name"] for t in tensors}


def _precision(name: str, manifests: dict[str, dict]) -> str:
    """The encoder's precision: its manifest's, else the contract's, else fp32 (the strictest gate)."""
    if name in manifests and manifests[name].get("precision"):
        return str(manifests[name]["precision"])
    if name in VARIANT_OF_MODEL:
        return VARIANT_OF_MODEL[name].precision
    LOGGER.warning("%s is not in the contract and has no manifest: checking it at the fp32 gate", name)
    return "fp32"


def local_manifests(repository: str | Path | None) -> dict[str, dict]:
    """``manifest.json`` of each model in a local repository (highest numeric version folder)."""
    manifests: dict[str, dict] = {}
    if repository is None:
        return manifests
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository not found: {repository}")
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if versions and (versions[-1] / "manifest.json").is_file():
            manifests[model_dir.name] = json.loads((versions[-1] / "manifest.json").read_text())
    return manifests


def discover_models(client: GeneformerClient, manifests: dict[str, dict] | None = None,
                    only: list[str] | None = None) -> list[ServedModel]:
    """Served encoders and ensembles that output ``cell_embedding``, from the ready models' configs."""
    manifests = manifests or {}
    found = []
    for name in only or client.ready_models():
        config = client.model_config(name)
        inputs, outputs = _names(config.get("input", [])), _names(config.get("output", []))
        platform = config.get("platform", "")
        if not outputs & cell_embedding_outputs():
            continue
        if name in VARIANT_OF_MODEL and not VARIANT_OF_MODEL[name].embeds:
            LOGGER.info("skipping %s: a fixed-layer encoder for in-silico perturbation, not an embedding path", name)
            continue
        if platform == "ensemble" and GENE_IDS in inputs:
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            encoders = [s["model_name"] for s in steps if s["model_name"] != TOKENIZER_MODEL]
            encoder = encoders[-1] if encoders else name
            found.append(ServedModel(name, "ensemble", encoder, _precision(encoder, manifests)))
        elif is_encoder_signature(inputs):
            found.append(ServedModel(name, "encoder", name, _precision(name, manifests)))
        else:
            LOGGER.info("skipping %s: not an encoder or an embedding ensemble", name)
    if only:
        missing = sorted(set(only) - {m.name for m in found})
        if missing:
            raise ValueError(f"{missing}: not encoders or embedding ensembles on the server")
    return found


def manifest_problems(models: list[ServedModel], manifests: dict[str, dict], loaded: LoadedGeneformer) -> dict[str, str]:
    """Encoder name -> why its local manifest does not describe the reference's weights."""
    problems = {}
    for encoder in sorted({m.encoder for m in models}):
        manifest = manifests.get(encoder)
        if manifest is None:
            continue
        if manifest.get("weights_sha256") != loaded.weights_sha256:
            problems[encoder] = (
                f"manifest says weights {manifest.get('weights_source')} (sha256 {str(manifest.get('weights_sha256'))[:12]}), "
                f"the reference is {loaded.source} (sha256 {loaded.weights_sha256[:12]})"
            )
        elif manifest.get("input_size") not in (None, loaded.input_size):
            problems[encoder] = f"manifest input size {manifest.get('input_size')}, reference {loaded.input_size}"
    return problems


@dataclass
class CheckReport:
    results: list[FidelityResult]
    token_mismatches: int | None  # None: no tokenizer served
    n_cells: int
    problems: dict[str, str]

    @property
    def passed(self) -> bool:
        return (bool(self.results) and all(r.passed for r in self.results) and not self.token_mismatches
                and not self.problems)


def check_server(
    client: GeneformerClient,
    loaded: LoadedGeneformer,
    n_cells: int = 16,
    models: list[ServedModel] | None = None,
    manifests: dict[str, dict] | None = None,
    batch_size: int | None = None,
) -> CheckReport:
    """Embed ``n_cells`` celltypist cells with every served model and with the reference; compare."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    manifests = manifests or {}
    models = models if models is not None else discover_models(client, manifests)
    vocabulary = loaded.vocabulary
    if vocabulary is None:
        raise ValueError("the reference model has no gene dictionaries")
    adata = load_celltypist_sample(n_cells=n_cells, symbol_to_ensembl=vocabulary.gene_name_to_id)
    gene_ids, n_counts = list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy(dtype=np.float32)
    tokenizer = RankValueTokenizer(vocabulary, loaded.input_size, loaded.special_tokens)
    tokens = tokenizer.tokenize_matrix(adata.X, gene_ids, n_counts)
    packed_ids, packed_counts = pack_cells(adata.X, gene_ids)
    reference = embed_token_cells(torch_encode_fn(loaded.encoder()), tokens, batch_size=8)
    lengths = f"{n_cells} celltypist cells, {min(map(len, tokens))}-{max(map(len, tokens))} tokens"

    token_mismatches = None
    if TOKENIZER_MODEL in client.ready_models():
        token_mismatches = 0
        size = client.max_batch_size(TOKENIZER_MODEL)
        for start in range(0, n_cells, size):
            rows = slice(start, start + size)
            out = client.infer(TOKENIZER_MODEL, {"gene_ids": packed_ids[rows], "counts": packed_counts[rows],
                                                 "n_counts": n_counts[rows].reshape(-1, 1)}, ["input_ids", "attention_mask"])
            for offset, (ids, mask) in enumerate(zip(out["input_ids"], out["attention_mask"])):
                if not np.array_equal(ids[mask.astype(bool)], tokens[start + offset]):
                    token_mismatches += 1
        level = logging.INFO if token_mismatches == 0 else logging.ERROR
        LOGGER.log(level, "served tokenizer: %d of %d cells differ from local tokenization", token_mismatches, n_cells)

    problems = manifest_problems(models, manifests, loaded)
    results = []
    for model in models:
        if model.kind == "ensemble":
            embeddings = client.embed_cells(packed_ids, packed_counts, n_counts, model.name, batch_size=batch_size)
        else:
            embeddings = client.embed_tokens(tokens, model.name, batch_size=batch_size, pad_id=vocabulary.pad_id)
        detail = f"{model.kind}; {lengths}"
        result = compare_variant(model.name, model.precision, embeddings, reference, detail)
        if model.encoder in problems:
            result.passed = False
            result.detail += f"; {problems[model.encoder]}"
        elif not result.passed and result.cosine_min < GROSS_MISMATCH_COSINE:
            result.detail += ("; far from the reference: the server probably serves other weights or dictionaries "
                              "than the local reference (use the model options of `gftriton export`)")
        results.append(result)
    return CheckReport(results=results, token_mismatches=token_mismatches, n_cells=n_cells, problems=problems)
