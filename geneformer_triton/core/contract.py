"""The serving contract: every model name, tensor name, size and precision the project serves (stdlib only).

This is the one place these facts are stated. The Triton configs under ``model_repository/`` and
``deploy/`` are generated from it (``export/model_configs.py``; a test regenerates them and compares), the
export, the clients, the bench, the evaluation and the python models in ``model_repository/`` read it,
and the ``--load-model`` lists of ``docker-compose.yml`` and ``deploy/k8s`` are checked against
:data:`SERVED_MODELS`. Adding an encoder variant is one :class:`EncoderVariant` entry in
:data:`ENCODER_VARIANTS` (docs/DESIGN.md, "Adding a model").

Standard library only: ``export/tensorrt_build.py`` imports it inside the NGC TensorRT container, and the
Triton python stubs import it inside the server.
"""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------------- model names
TOKENIZER_MODEL = "geneformer_tokenizer"
ISP_MODEL = "geneformer_isp"
ENCODER_PREFIX = "geneformer_"
ENSEMBLE_PREFIX = "geneformer_embed_"

#: compute precisions of the encoder variants (inputs are int64 token ids, outputs float32 in all of them)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: largest batch every batched model (tokenizer, encoders, ensembles) accepts
MAX_BATCH_SIZE = 64

# ------------------------------------------------------------------------------------------- tensors
#: raw-count inputs of the tokenizer, the embedding ensembles and the ISP model (one cell per batch row)
GENE_IDS, COUNTS, N_COUNTS = "gene_ids", "counts", "n_counts"
#: tokenizer outputs besides the token tensors
LENGTH = "length"


@dataclass(frozen=True)
class EncoderTensors:
    """Tensor names of one encoder backend: int64 ``[batch, tokens]`` in, float32 ``[batch, hidden]`` and
    ``[batch, tokens, hidden]`` out."""

    input_ids: str
    attention_mask: str
    cell_embedding: str
    token_embeddings: str

    @property
    def inputs(self) -> tuple[str, str]:
        return (self.input_ids, self.attention_mask)

    @property
    def outputs(self) -> tuple[str, str]:
        return (self.cell_embedding, self.token_embeddings)

    def as_dict(self) -> dict[str, str]:
        """Plain name -> this backend's name (``input_ids`` -> ``input_ids__0`` for TorchScript)."""
        return dict(zip(PLAIN_TENSORS.inputs + PLAIN_TENSORS.outputs, self.inputs + self.outputs))


PLAIN_TENSORS = EncoderTensors("input_ids", "attention_mask", "cell_embedding", "token_embeddings")
#: Triton's libtorch backend names tensors <name>__<index> by their position in forward() and in its result
TORCHSCRIPT_TENSORS = EncoderTensors("input_ids__0", "attention_mask__1", "cell_embedding__0", "token_embeddings__1")


@dataclass(frozen=True)
class Backend:
    """One Triton backend that serves encoders: file kind, Triton platform, weights file, tensor names."""

    kind: str
    platform: str
    filename: str
    tensors: EncoderTensors


BACKENDS = {
    b.kind: b
    for b in (
        Backend("onnx", "onnxruntime_onnx", "model.onnx", PLAIN_TENSORS),
        Backend("torchscript", "pytorch_libtorch", "model.pt", TORCHSCRIPT_TENSORS),
        Backend("tensorrt", "tensorrt_plan", "model.plan", PLAIN_TENSORS),
    )
}


#: encoder graphs: ``tokens`` returns (cell embedding, token embeddings); ``isp_reduced`` (an ISP encoder,
#: export/isp_reduction_export.py) takes two more inputs, each row's ``original_offset`` [1] (rows back to its
#: original in the same request) and ``position_map`` [L] (each position's position in that original, -1 =
#: none), and returns only ``token_mean`` [H] and ``gene_cos`` [L] (the per-gene cosines upstream scores)
#: ``packed`` (padding-free, export/packed_export.py) takes ragged inputs (``allow_ragged_batch``: Triton
#: concatenates the rows of a batch, so its dynamic batcher merges cells of any lengths) plus Triton's
#: ``batch_input`` :data:`PACKED_ITEM_WIDTH` (each row's width, [cells, 1] int32) and returns ``cell_embedding`` only
TOKENS_GRAPH, ISP_REDUCED_GRAPH, PACKED_GRAPH = "tokens", "isp_reduced", "packed"
ISP_REDUCED_INPUTS = ("original_offset", "position_map")
ISP_REDUCED_OUTPUTS = ("token_mean", "gene_cos")
PACKED_ITEM_WIDTH = "item_width"


# ------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ServedShape:
    """The sizes a served repository is built for: ``hidden_size`` (embedding width, floats),
    ``input_size`` (tokens per cell, at most) and ``special_tokens`` (``<cls>`` first, ``<eos>`` last: V2/V3)."""

    hidden_size: int
    input_size: int
    special_tokens: bool


#: the default model (gf-6L-10M-i2048) whose configs are checked in under model_repository/
DEFAULT_MODEL = "gf-6L-10M-i2048"
DEFAULT_SHAPE = ServedShape(hidden_size=256, input_size=2048, special_tokens=False)

# config parameters the python models read (their values are generated from the shape)
PARAM_INPUT_SIZE = "model_input_size"
PARAM_SPECIAL_TOKENS = "special_tokens"
#: ISP model: key prefix + encoder model -> JSON {plain tensor name: served name, ..., "max_batch_size": N,
#: "hidden_size": H} of each encoder it may call
PARAM_ENCODER_SIGNATURE = "encoder_signature."
PARAM_ENCODER_MODEL = "encoder_model"
PARAM_ALLOWED_ENCODERS = "allowed_encoder_models"


# ------------------------------------------------------------------------------------------- encoders
@dataclass(frozen=True)
class EncoderVariant:
    """One served encoder: ``name`` (``onnx_fp16``), its Triton model, backend kind and precision.

    ``precision`` is the compute precision: ``fp32``; ``fp16`` (onnxruntime fp16 conversion; TensorRT fp16
    plan); ``bf16`` (TorchScript traced in bfloat16: libtorch runs its matmuls with the CPU's AVX512-BF16 /
    AMX or the GPU's tensor cores); ``int8`` (onnxruntime dynamic quantization of the fused fp32 graph: int8
    weights, activations quantized per call, VNNI dot products; a CPU format). ``emb_layer`` fixes the
    helical emb_layer of the variant (None: the export's ``--emb-layer``; -2 = hidden_states[n_layers - 1]);
    a fixed-layer variant serves ISP only and has no ensemble. ``exported`` is False for a variant built
    elsewhere (the TensorRT plan, built on the serving GPU by deploy/build_trt.sh). ``graph``:
    :data:`TOKENS_GRAPH`, :data:`ISP_REDUCED_GRAPH` (its extra tensors: :data:`ISP_REDUCED_INPUTS` /
    :data:`ISP_REDUCED_OUTPUTS`) or :data:`PACKED_GRAPH` (ragged, padding-free; ``cell_embedding`` only).
    """

    name: str
    kind: str
    precision: str
    emb_layer: int | None = None
    exported: bool = True
    isp: bool = False  # the ISP model may call it (allowed_encoder_models)
    graph: str = TOKENS_GRAPH

    @property
    def model(self) -> str:
        return ENCODER_PREFIX + self.name

    @property
    def embeds(self) -> bool:
        """True when the variant embeds cells (an ensemble is built on it)."""
        return self.emb_layer is None

    @property
    def ensemble(self) -> str:
        """The ensemble (raw counts in: tokenizer, then this encoder) built on this encoder."""
        return ENSEMBLE_PREFIX + self.name

    @property
    def backend(self) -> Backend:
        return BACKENDS[self.kind]

    @property
    def platform(self) -> str:
        return self.backend.platform

    @property
    def filename(self) -> str:
        return self.backend.filename

    @property
    def tensors(self) -> EncoderTensors:
        return self.backend.tensors


ENCODER_VARIANTS: dict[str, EncoderVariant] = {
    v.name: v
    for v in (
        EncoderVariant("onnx", "onnx", "fp32", isp=True),
        # in-silico perturbation at upstream InSilicoPerturber's default layer (its emb_layer=-1)
        EncoderVariant("onnx_isp", "onnx", "fp32", emb_layer=-2, isp=True),
        # the same layer with the ISP reduction in the graph (the ISP model's default at that layer), and its
        # int8 dynamic quantization (CPU; used only when a request names it)
        EncoderVariant("onnx_isp_reduced", "onnx", "fp32", emb_layer=-2, isp=True, graph=ISP_REDUCED_GRAPH),
        EncoderVariant("onnx_isp_reduced_int8", "onnx", "int8", emb_layer=-2, isp=True, graph=ISP_REDUCED_GRAPH),
        EncoderVariant("onnx_fp16", "onnx", "fp16", isp=True),
        EncoderVariant("onnx_int8", "onnx", "int8"),
        # padding-free: ragged batches of cells of any lengths (block-diagonal attention in the graph)
        EncoderVariant("onnx_packed", "onnx", "fp32", graph=PACKED_GRAPH),
        EncoderVariant("onnx_int8_packed", "onnx", "int8", graph=PACKED_GRAPH),
        EncoderVariant("torchscript", "torchscript", "fp32", isp=True),
        EncoderVariant("torchscript_bf16", "torchscript", "bf16"),
        EncoderVariant("trt", "tensorrt", "fp16", exported=False, isp=True),
    )
}
#: the variants `gftriton export` writes, in export order
EXPORTED_VARIANTS = {name: v for name, v in ENCODER_VARIANTS.items() if v.exported}
VARIANT_OF_MODEL = {v.model: v for v in ENCODER_VARIANTS.values()}
#: encoder model -> the embedding ensemble built on it
ENSEMBLE_FOR = {v.model: v.ensemble for v in ENCODER_VARIANTS.values() if v.embeds}
ENCODER_OF_ENSEMBLE = {ensemble: encoder for encoder, ensemble in ENSEMBLE_FOR.items()}
ISP_DEFAULT_ENCODER = ENCODER_VARIANTS["onnx"].model
ISP_ENCODERS = tuple(v.model for v in ENCODER_VARIANTS.values() if v.isp)

@dataclass(frozen=True)
class ServedModel:
    """A served model that outputs cell embeddings: an ``encoder`` (token ids in) or an ``ensemble`` (raw
    counts in: the tokenizer, then ``encoder``), with the encoder's compute precision."""

    name: str
    kind: str  # encoder | ensemble
    encoder: str  # the encoder model itself, or the ensemble's encoder step
    precision: str

    @property
    def composing(self) -> tuple[str, ...]:
        """The models whose work a request to this one is (the server-side breakdown)."""
        return (TOKENIZER_MODEL, self.encoder) if self.kind == "ensemble" else (self.encoder,)

    @property
    def signature(self) -> str:
        """Which input names a client sends: ``ensemble`` (raw counts) or the encoder backend's kind."""
        if self.kind == "ensemble":
            return "ensemble"
        variant = VARIANT_OF_MODEL.get(self.encoder)
        return variant.kind if variant else "onnx"

    @property
    def ragged(self) -> bool:
        """A packed encoder (or its ensemble): requests of any lengths merged, no padding computed."""
        variant = VARIANT_OF_MODEL.get(self.encoder)
        return variant is not None and variant.graph == PACKED_GRAPH


#: every embedding model of the contract: each embedding encoder and its ensemble
EMBEDDING_MODELS: dict[str, ServedModel] = {
    m.name: m
    for v in ENCODER_VARIANTS.values() if v.embeds
    for m in (ServedModel(v.model, "encoder", v.model, v.precision), ServedModel(v.ensemble, "ensemble", v.model, v.precision))
}

#: every model a full GPU deployment loads (docker-compose.yml, deploy/k8s): tokenizer, encoders, ensembles, ISP
SERVED_MODELS = (
    TOKENIZER_MODEL,
    *(v.model for v in ENCODER_VARIANTS.values()),
    *ENSEMBLE_FOR.values(),
    ISP_MODEL,
)


def encoder_variant(name: str) -> EncoderVariant:
    """The variant called ``name`` (``onnx_fp16``) or whose Triton model is ``name`` (ValueError otherwise)."""
    variant = ENCODER_VARIANTS.get(name) or VARIANT_OF_MODEL.get(name)
    if variant is None:
        raise ValueError(f"unknown encoder variant {name!r}; known: {sorted(ENCODER_VARIANTS)}")
    return variant


def tensor_names(model: str) -> EncoderTensors:
    """Tensor names of encoder model ``model`` (plain names for a model the contract does not know)."""
    variant = VARIANT_OF_MODEL.get(model)
    return variant.tensors if variant else PLAIN_TENSORS


def is_encoder_signature(inputs: set[str]) -> bool:
    """True when a model's input names are an encoder's (token ids and mask, any backend's spelling)."""
    return any(set(b.tensors.inputs) <= inputs for b in BACKENDS.values())


def cell_embedding_outputs() -> set[str]:
    """Every backend's name of the cell-embedding output."""
    return {b.tensors.cell_embedding for b in BACKENDS.values()}


#: client input names by signature (ServedModel.signature): raw counts, or each backend's token tensors
INPUT_SIGNATURES: dict[str, tuple[str, ...]] = {
    "ensemble": (GENE_IDS, COUNTS, N_COUNTS),
    **{kind: b.tensors.inputs for kind, b in BACKENDS.items()},
}
