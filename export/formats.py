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
    #: fixed helical emb_layer for this variant (None: the export's --emb-layer); -2 = hidden_states[n_layers - 1]
    emb_layer: int | None = None


ENCODER_FORMATS = {
    f.name: f
    for f in (
        EncoderFormat("onnx", "geneformer_onnx", "onnx", "fp32"),
        # in-silico perturbation at upstream InSilicoPerturber's default layer (its emb_layer=-1)
        EncoderFormat("onnx_isp", "geneformer_onnx_isp", "onnx", "fp32", emb_layer=-2),
        EncoderFormat("onnx_fp16", "geneformer_onnx_fp16", "onnx", "fp16"),
        EncoderFormat("torchscript", "geneformer_torchscript", "torchscript", "fp32"),
    )
}
DEFAULT_FORMATS = tuple(ENCODER_FORMATS)
