"""Write a Geneformer model into a complete Triton model repository (an empty folder is fine).

Configs are generated for the model's sizes (export/model_configs.py, from geneformer_triton/core/contract.py);
the python models (tokenizer, ISP) are copied from the checked-in ``model_repository/``. For each
requested format the encoder goes into ``<repository>/<model>/1/`` with a ``manifest.json`` (model name,
config hash, precision, opset, source weights hash, tool versions). Tokenizer dictionaries (and the
symbol map ``gene_name_id_dict.json`` where the vocabulary has one) go into ``geneformer_tokenizer/1/``.
A repository holding configs for another model size (the checked-in one included) is never patched:
the export refuses, naming the files, unless told to replace them.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Iterable

import onnx
import onnxruntime
import torch
import transformers

import geneformer_triton
from geneformer_triton import __version__
from geneformer_triton.core.contract import (
    EXPORTED_VARIANTS,
    ISP_MODEL,
    ISP_REDUCED_GRAPH,
    PACKED_GRAPH,
    TOKENIZER_MODEL,
    EncoderVariant,
    ServedShape,
)
from geneformer_triton.export.formats import DEFAULT_FORMATS
from geneformer_triton.export.isp_reduction_export import export_isp_reduction_onnx
from geneformer_triton.export.model_configs import repository_configs, stale_configs, write_configs
from geneformer_triton.export.onnx_export import OPSET, export_onnx
from geneformer_triton.export.packed_export import export_packed_onnx
from geneformer_triton.export.torchscript_export import export_torchscript
from geneformer_triton.model.loading import LoadedGeneformer

LOGGER = logging.getLogger(__name__)


def tool_versions() -> dict[str, str]:
    return {
        "geneformer_triton": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_manifest(version_dir: Path, loaded: LoadedGeneformer, fmt: EncoderVariant, emb_layer: int, pooling: str) -> Path:
    """Write ``manifest.json`` describing the exported encoder in ``version_dir``."""
    manifest = {
        "model_name": loaded.name,
        "format": fmt.kind,
        "triton_model": fmt.model,
        "precision": fmt.precision,
        "opset": OPSET if fmt.kind == "onnx" else None,
        "hidden_size": loaded.config.hidden_size,
        "input_size": loaded.input_size,
        "vocabulary_size": len(loaded.vocabulary) if loaded.vocabulary is not None else None,
        "emb_layer": emb_layer,
        "num_hidden_layers": loaded.config.num_hidden_layers,
        "hidden_state_index": emb_layer % (loaded.config.num_hidden_layers + 1),
        "pooling": pooling,
        "isp_reduction": fmt.graph == ISP_REDUCED_GRAPH,
        "special_tokens": loaded.special_tokens,
        "config_sha256": loaded.config_sha256(),
        "weights_source": loaded.source,
        "weights_sha256": loaded.weights_sha256,
        "random_weights": loaded.random_weights,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool_versions": tool_versions(),
    }
    path = version_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


#: the python models' sources ``<model>/1/model.py``: package data ``geneformer_triton/python_models`` (pyproject maps
#: the checked-in ``model_repository/`` there; in the checkout ``geneformer_triton/python_models`` links to it)
PYTHON_MODEL_SOURCES = Path(geneformer_triton.__file__).resolve().parent / "python_models"
PYTHON_MODELS = (TOKENIZER_MODEL, ISP_MODEL)


class RepositoryConflictError(ValueError):
    """The target repository holds configs for another model; exporting would overwrite them."""


def served_shape(loaded: LoadedGeneformer) -> ServedShape:
    """The sizes the served configs need: hidden size, input size, special tokens."""
    return ServedShape(loaded.config.hidden_size, loaded.input_size, loaded.special_tokens)


def write_repository_configs(repository: Path, shape: ServedShape, variants: list[EncoderVariant],
                             replace: bool = False) -> list[Path]:
    """Write the generated configs (export/model_configs.py) of ``shape``; returns the files written.

    A config that exists with other content (a repository exported for another model size, or the
    checked-in ``model_repository/`` with another model) is replaced only with ``replace``; otherwise
    :class:`RepositoryConflictError` names the files and what to do, before anything is written.
    """
    configs = repository_configs(shape, variants)
    conflicts = [path for path in stale_configs(repository, configs) if (repository / path).is_file()]
    if conflicts and not replace:
        raise RepositoryConflictError(
            f"{repository} holds configs for another model size ({len(conflicts)} differ, e.g. {conflicts[0]}): "
            f"export this model (hidden {shape.hidden_size}, input {shape.input_size}) into its own folder with "
            "--repository NEW_DIR, or pass --replace-configs to overwrite them"
        )
    return write_configs(repository, configs)


def copy_python_models(repository: Path) -> list[Path]:
    """Copy the python models (tokenizer, ISP) from the installed package (:data:`PYTHON_MODEL_SOURCES`) into
    ``repository``; a target that already has the same bytes is left alone. Returns the files written."""
    written = []
    for model in PYTHON_MODELS:
        source, target = PYTHON_MODEL_SOURCES / model / "1" / "model.py", repository / model / "1" / "model.py"
        if not source.is_file():
            raise FileNotFoundError(f"python model source {source} missing: the geneformer_triton install is incomplete; "
                                    "reinstall it (pip install --force-reinstall geneformer-triton, or from a checkout)")
        if source.resolve() != target.resolve() and not (target.is_file() and target.read_bytes() == source.read_bytes()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)
    return written


def export_model_repository(
    loaded: LoadedGeneformer,
    repository: str | Path,
    formats: Iterable[str] = DEFAULT_FORMATS,
    emb_layer: int = -1,
    pooling: str = "mean",
    replace_configs: bool = False,
) -> dict[str, Path]:
    """Write a complete, servable repository: the generated configs of every model (tokenizer, ISP, the
    requested encoder formats and their ensembles), the python models, the encoders' weights and
    manifests, and the tokenizer's dictionaries (with the symbol map where the vocabulary has one).
    Returns {format: weights path}. Raises :class:`RepositoryConflictError` (nothing written) when the
    repository holds configs for another model size and ``replace_configs`` is False."""
    repository = Path(repository)
    formats = list(formats)
    if loaded.vocabulary is None:
        raise ValueError("the model has no gene dictionaries: the tokenizer cannot be exported")
    unknown = [f for f in formats if f not in EXPORTED_VARIANTS]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose from {sorted(EXPORTED_VARIANTS)}")
    variants = [EXPORTED_VARIANTS[name] for name in formats]
    changed = write_repository_configs(repository, served_shape(loaded), variants, replace_configs)
    if changed:
        LOGGER.info("wrote %d config files for %s", len(changed), loaded.name)
    copy_python_models(repository)
    for variant in variants:
        if variant.embeds:
            (repository / variant.ensemble / "1").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    # ONNX: plain MatMul/Softmax attention, which onnxruntime's optimizer fuses into its Attention op.
    # TorchScript: fused scaled_dot_product_attention (libtorch runs it natively); the traced "math"
    # graph materializes the [B, heads, L, L] scores and was ~3x slower on CPU (bench/README.md).
    attention = {"onnx": "math", "torchscript": "sdpa"}
    for name in formats:
        fmt = EXPORTED_VARIANTS[name]
        layer = emb_layer if fmt.emb_layer is None else fmt.emb_layer
        encoder = loaded.encoder(emb_layer=layer, pooling=pooling, attention=attention[fmt.kind])
        version_dir = repository / fmt.model / "1"
        started = time.perf_counter()
        if fmt.graph == ISP_REDUCED_GRAPH:
            written[name] = export_isp_reduction_onnx(encoder, version_dir, precision=fmt.precision)
        elif fmt.graph == PACKED_GRAPH:
            written[name] = export_packed_onnx(encoder, version_dir, precision=fmt.precision)
        elif fmt.kind == "onnx":
            written[name] = export_onnx(encoder, version_dir, precision=fmt.precision)
        elif fmt.precision == "bf16":
            # a private copy: the encoder shares its modules with the loaded model, .to() converts in place
            bf16 = copy.deepcopy(encoder).to(torch.bfloat16).eval()
            written[name] = export_torchscript(bf16, version_dir)
        else:
            written[name] = export_torchscript(encoder, version_dir)
        write_manifest(version_dir, loaded, fmt, layer, pooling)
        LOGGER.info("exported %s in %.1f s", fmt.model, time.perf_counter() - started)
    tokenizer_dir = repository / TOKENIZER_MODEL / "1"
    loaded.vocabulary.save(tokenizer_dir)
    (tokenizer_dir / "manifest.json").write_text(
        json.dumps({"model_name": loaded.name, "vocabulary_size": len(loaded.vocabulary),
                    "input_size": loaded.input_size, "special_tokens": loaded.special_tokens}, indent=2) + "\n"
    )
    return written
