"""ONNX export of the encoder-only Geneformer (opset 17, dynamic batch and sequence axes).

Two files per export:
- ``model.onnx``: the graph served by Triton's onnxruntime backend. By default it is passed through
  onnxruntime's transformer optimizer (fused Attention, SkipLayerNormalization: com.microsoft
  contrib ops, which onnxruntime runs on CPU and CUDA); ``fp16`` converts weights and compute to
  float16 with float32 inputs/outputs kept; ``int8`` is onnxruntime's dynamic quantization of the fused
  fp32 graph (int8 weights, activations quantized per call: QAttention, DynamicQuantizeMatMul; onnxruntime
  runs them with AVX512-VNNI / AVX2 integer dot products on CPU).
- ``model.portable.onnx``: the same encoder in standard ONNX ops only, fp32 — the input of the
  TensorRT builder (its parser does not read onnxruntime contrib ops).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import onnx
import torch

from geneformer_triton.core.contract import PLAIN_TENSORS
from geneformer_triton.model.encoder import GeneformerEncoder

LOGGER = logging.getLogger(__name__)

INPUT_NAMES = list(PLAIN_TENSORS.inputs)
OUTPUT_NAMES = list(PLAIN_TENSORS.outputs)
DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "cell_embedding": {0: "batch"},
    "token_embeddings": {0: "batch", 1: "sequence"},
}
OPSET = 17
PORTABLE_NAME = "model.portable.onnx"

Precision = Literal["fp32", "fp16", "int8"]


def _example_inputs(vocab_size: int, length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2 :] = 0
    return input_ids, attention_mask


def export_portable_onnx(encoder: GeneformerEncoder, path: str | Path, opset: int = OPSET) -> Path:
    """Export ``encoder`` (fp32, ``attention="math"``) to standard-op ONNX at ``path``; checked."""
    if encoder.attention != "math":
        raise ValueError("export an encoder built with attention='math' (plain MatMul/Softmax graph)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = encoder.embeddings.word_embeddings.num_embeddings
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            _example_inputs(vocab_size),
            str(path),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES,
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
    LOGGER.info("wrote portable ONNX (opset %d) to %s", opset, path)
    return path


def optimize_for_onnxruntime(
    portable_path: str | Path,
    path: str | Path,
    num_heads: int,
    hidden_size: int,
    precision: Precision = "fp32",
) -> Path:
    """Fuse attention/LayerNorm with onnxruntime's transformer optimizer; optionally convert to fp16."""
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(
        str(portable_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1
    )
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    LOGGER.info("onnxruntime fusion: %s", fused)
    if fused.get("Attention", 0) == 0:
        LOGGER.warning("attention was not fused: the ONNX model will run unfused attention")
    if precision == "fp16":
        optimized.convert_float_to_float16(keep_io_types=True)
    path = Path(path)
    optimized.save_model_to_file(str(path))
    onnx.checker.check_model(str(path))
    return path


def quantize_onnx_int8(source: str | Path, target: str | Path) -> Path:
    """int8 dynamic quantization (weights int8 per tensor, activations quantized per call) of a fused
    fp32 ONNX graph at ``source`` into ``target``; reused when ``target`` is newer than ``source``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor at INFO on the root logger
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    os.replace(tmp, target)
    onnx.checker.check_model(str(target))
    LOGGER.info("int8 dynamic quantization: %s -> %s", source, target)
    return target


def export_onnx(
    encoder: GeneformerEncoder,
    version_dir: str | Path,
    precision: Precision = "fp32",
    optimize: bool = True,
    opset: int = OPSET,
) -> Path:
    """Write ``model.onnx`` (+ ``model.portable.onnx``) into a Triton version folder; returns model.onnx.

    ``encoder`` must be fp32 with ``attention="math"``; fp16 is produced by conversion after fusion, int8
    by dynamic quantization of the fused fp32 graph.
    """
    version_dir = Path(version_dir)
    portable = export_portable_onnx(encoder, version_dir / PORTABLE_NAME, opset)
    target = version_dir / "model.onnx"
    if optimize:
        if precision == "int8":
            fused = version_dir / "model.fp32.onnx"
            optimize_for_onnxruntime(portable, fused, encoder.num_heads, encoder.hidden_size, "fp32")
            target.unlink(missing_ok=True)
            quantize_onnx_int8(fused, target)
            fused.unlink()
        else:
            optimize_for_onnxruntime(portable, target, encoder.num_heads, encoder.hidden_size, precision)
        if precision != "fp32":  # the portable graph (TensorRT's input) is kept for the fp32 model only
            portable.unlink()
        return target
    if precision != "fp32":
        raise ValueError(f"{precision} ONNX export needs optimize=True (it is made from the optimized graph)")
    target.write_bytes(portable.read_bytes())
    return target


def onnx_input_names(path: str | Path) -> list[str]:
    """Graph input names of an ONNX file (used to check TensorRT profiles and Triton configs)."""
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
