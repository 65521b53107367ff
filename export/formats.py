"""Exported encoder variants and Triton model names (no heavy imports: used by CLI parsers)."""

from __future__ import annotations

from dataclasses import dataclass

TOKENIZER_MODEL = "geneformer_tokenizer"


@dataclass(frozen=True)
class EncoderFormat:
    """One exported encoder variant: Triton model name, file format and precision."""

    name: str
    model: str
    kind: str
    precision: str


ENCODER_FORMATS = {
    f.name: f
    for f in (
        EncoderFormat("onnx", "geneformer_onnx", "onnx", "fp32"),
        EncoderFormat("onnx_fp16", "geneformer_onnx_fp16", "onnx", "fp16"),
        EncoderFormat("torchscript", "geneformer_torchscript", "torchscript", "fp32"),
    )
}
DEFAULT_FORMATS = tuple(ENCODER_FORMATS)
