"""Write a Geneformer model into a Triton model repository: encoders, tokenizer files, manifests.

For each requested format the encoder goes into ``<repository>/<model>/1/`` with a ``manifest.json``
(model name, config hash, precision, opset, source weights hash, tool versions). Tokenizer
dictionaries go into ``geneformer_tokenizer/1/``. Config files are rendered from the checked-in ones
when the model's hidden size, input size or special tokens differ from the default model's.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import re
import time
from pathlib import Path
from typing import Iterable

import onnx
import onnxruntime
import torch
import transformers

from export.formats import DEFAULT_FORMATS, ENCODER_FORMATS, TOKENIZER_MODEL, EncoderFormat
from export.onnx_export import OPSET, export_onnx
from export.packed_export import export_packed_onnx
from export.torchscript_export import export_torchscript
from geneformer_triton import __version__
from geneformer_triton.loading import LoadedGeneformer

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


def write_manifest(version_dir: Path, loaded: LoadedGeneformer, fmt: EncoderFormat, emb_layer: int, pooling: str) -> Path:
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


def render_config(text: str, hidden_size: int, input_size: int, special_tokens: bool) -> str:
    """Adapt a checked-in config (written for gf-6L-10M-i2048) to another model's sizes."""
    text = re.sub(r"dims: \[ 256 \]", f"dims: [ {hidden_size} ]", text)
    text = re.sub(r"dims: \[ -1, 256 \]", f"dims: [ -1, {hidden_size} ]", text)
    text = re.sub(
        r'(key: "model_input_size" value: \{ string_value: )"\d+"', rf'\g<1>"{input_size}"', text
    )
    return re.sub(
        r'(key: "special_tokens" value: \{ string_value: )"\w+"',
        rf'\g<1>"{str(special_tokens).lower()}"',
        text,
    )


def render_repository_configs(repository: Path, loaded: LoadedGeneformer) -> list[Path]:
    """Rewrite config files under ``repository`` whose sizes differ from ``loaded``; returns changed files."""
    changed = []
    for path in sorted(repository.glob("*/config.pbtxt")) + sorted(repository.glob("*/configs/*.pbtxt")):
        text = path.read_text()
        rendered = render_config(text, loaded.config.hidden_size, loaded.input_size, loaded.special_tokens)
        if rendered != text:
            path.write_text(rendered)
            changed.append(path)
    if changed:
        LOGGER.warning("adapted %d config files to %s's sizes", len(changed), loaded.name)
    return changed


def export_model_repository(
    loaded: LoadedGeneformer,
    repository: str | Path,
    formats: Iterable[str] = DEFAULT_FORMATS,
    emb_layer: int = -1,
    pooling: str = "mean",
) -> dict[str, Path]:
    """Export the requested encoder formats and the tokenizer files; returns {format: weights path}."""
    repository = Path(repository)
    if loaded.vocabulary is None:
        raise ValueError("the model has no gene dictionaries: the tokenizer cannot be exported")
    unknown = [f for f in formats if f not in ENCODER_FORMATS]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose from {sorted(ENCODER_FORMATS)}")
    render_repository_configs(repository, loaded)
    written: dict[str, Path] = {}
    # ONNX: plain MatMul/Softmax attention, which onnxruntime's optimizer fuses into its Attention op.
    # TorchScript: fused scaled_dot_product_attention (libtorch runs it natively); the traced "math"
    # graph materializes the [B, heads, L, L] scores and was ~3x slower on CPU (bench/README.md).
    attention = {"onnx": "math", "torchscript": "sdpa"}
    for name in formats:
        fmt = ENCODER_FORMATS[name]
        layer = emb_layer if fmt.emb_layer is None else fmt.emb_layer
        encoder = loaded.encoder(emb_layer=layer, pooling=pooling, attention=attention[fmt.kind])
        version_dir = repository / fmt.model / "1"
        started = time.perf_counter()
        if fmt.packed:
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
