"""Exported encoder variants and Triton model names (no heavy imports: used by CLI parsers).

This is the one registry of served variants: each :class:`EncoderFormat` names its encoder model and its
embedding ensemble (``geneformer_embed_<format>``), the file format and the precision. The export, the
bench and the fidelity checks read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENIZER_MODEL = "geneformer_tokenizer"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class EncoderFormat:
    """One exported encoder variant: Triton model name, file format and precision.

    ``precision`` is the compute precision: ``fp32``; ``fp16`` (onnxruntime fp16 conversion); ``bf16``
    (TorchScript traced in bfloat16: libtorch runs its matmuls with the CPU's AVX512-BF16 / AMX or the
    GPU's tensor cores); ``int8`` (onnxruntime dynamic quantization of the fused fp32 graph: int8 weights,
    activations quantized per call, VNNI dot products; a CPU format). Inputs and outputs are always
    int64 token ids in, float32 embeddings out.
    """

    name: str
    model: str
    kind: str  # onnx | torchscript
    precision: str
    #: fixed helical emb_layer for this variant (None: the export's --emb-layer); -2 = hidden_states[n_layers - 1]
    emb_layer: int | None = None
    #: padding-free: ragged inputs (Triton's ``allow_ragged_batch``) into ``export.packed_export``'s graph,
    #: so the dynamic batcher merges cells of any lengths; outputs ``cell_embedding`` only
    packed: bool = False

    @property
    def ensemble(self) -> str:
        """The ensemble (raw counts in: tokenizer, then this encoder) built on this encoder."""
        return self.model.replace("geneformer_", "geneformer_embed_", 1)

    @property
    def filename(self) -> str:
        return "model.onnx" if self.kind == "onnx" else "model.pt"


ENCODER_FORMATS = {
    f.name: f
    for f in (
        EncoderFormat("onnx", "geneformer_onnx", "onnx", "fp32"),
        # in-silico perturbation at upstream InSilicoPerturber's default layer (its emb_layer=-1)
        EncoderFormat("onnx_isp", "geneformer_onnx_isp", "onnx", "fp32", emb_layer=-2),
        EncoderFormat("onnx_fp16", "geneformer_onnx_fp16", "onnx", "fp16"),
        EncoderFormat("onnx_int8", "geneformer_onnx_int8", "onnx", "int8"),
        EncoderFormat("onnx_packed", "geneformer_onnx_packed", "onnx", "fp32", packed=True),
        EncoderFormat("onnx_int8_packed", "geneformer_onnx_int8_packed", "onnx", "int8", packed=True),
        EncoderFormat("torchscript", "geneformer_torchscript", "torchscript", "fp32"),
        EncoderFormat("torchscript_bf16", "geneformer_torchscript_bf16", "torchscript", "bf16"),
    )
}
DEFAULT_FORMATS = tuple(ENCODER_FORMATS)
FORMAT_OF_MODEL = {f.model: f for f in ENCODER_FORMATS.values()}


def formats_for(precisions: list[str] | tuple[str, ...], formats: list[str] | tuple[str, ...] = DEFAULT_FORMATS) -> list[str]:
    """The formats among ``formats`` whose precision is one of ``precisions`` (ValueError if none or unknown)."""
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ValueError(f"unknown precisions {unknown}; choose from {list(PRECISIONS)}")
    chosen = [name for name in formats if name in ENCODER_FORMATS and ENCODER_FORMATS[name].precision in precisions]
    if not chosen:
        raise ValueError(f"no export format among {list(formats)} has precision {list(precisions)}; "
                         f"formats by precision: { {f.name: f.precision for f in ENCODER_FORMATS.values()} }")
    return chosen
