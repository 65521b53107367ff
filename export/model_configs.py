"""Triton model configs generated from the serving contract: every ``config.pbtxt`` and ``configs/{cpu,gpu}.pbtxt``.

Each config is built as Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``) from
:mod:`geneformer_triton.core.contract` (names, tensors, precisions) and a :class:`~geneformer_triton.core.contract.ServedShape`
(hidden size, input size, special tokens), plus a host overlay (``cpu``: CPU instances and thread settings;
``gpu``: GPU instances, the TensorRT accelerator, pinned memory, warm-up), and written with
``google.protobuf.text_format`` under a comment header. Nothing is patched: a model of another size gets
configs generated for its own shape. The checked-in configs (``model_repository/``, ``deploy/geneformer_trt``,
``deploy/geneformer_embed_trt``) are these files for :data:`~geneformer_triton.core.contract.DEFAULT_SHAPE`
(tests/test_model_configs.py regenerates and compares them); regenerate them with
``python -m geneformer_triton.export.model_configs --write``.
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from geneformer_triton.core import contract as c
from geneformer_triton.core.dictionaries import GENE_MAPPING_FILE, GENE_MEDIAN_FILE, TOKEN_DICTIONARY_FILE
from geneformer_triton.export import tensorrt_build as trt

LOGGER = logging.getLogger(__name__)

HOSTS = ("cpu", "gpu")
T = mc.DataType
STRING, FP32, INT32, INT64, BOOL = T.TYPE_STRING, T.TYPE_FP32, T.TYPE_INT32, T.TYPE_INT64, T.TYPE_BOOL
CPU, GPU = mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_GPU
#: ORT TensorRT engine caches (a writable volume in docker-compose.yml), one folder per model
ORT_TRT_CACHE = "/var/cache/geneformer/ort-trt"
#: ISP: tokens per encoder call (batch x padded length); 32768 = 16 cells of 2048 tokens
ISP_MAX_TOKENS_PER_BATCH = 32768
ISP_MAX_PERTURBATIONS = 16384
ISP_INSTANCES = {"cpu": 2, "gpu": 4}  # instances = chunks in flight per cell (max_inflight_batches)
#: ISP dynamic batching: up to this many one-cell requests (from any clients) reach one execute() and share
#: packed encoder batches; the batcher waits at most ISP_MAX_QUEUE_DELAY_US for more to arrive
ISP_MAX_CELLS_PER_EXECUTE = 16
ISP_MAX_QUEUE_DELAY_US = 2000
TOKENIZER_INSTANCES = {"cpu": 2, "gpu": 4}
MAX_GENES_PER_REQUEST = 1_000_000


@dataclass(frozen=True)
class Tensor:
    """A config tensor: name, Triton data type, dims (-1 = variable), optional."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False  # allow_ragged_batch (an input only)

    def proto(self, cls: type) -> object:
        message = cls(name=self.name, data_type=self.data_type, dims=list(self.dims))
        if self.optional:
            message.optional = True
        if self.ragged:
            message.allow_ragged_batch = True
        return message


RAW_INPUTS = (Tensor(c.GENE_IDS, STRING, (-1,)), Tensor(c.COUNTS, FP32, (-1,)), Tensor(c.N_COUNTS, FP32, (1,), True))
#: the ISP model's request and response tensors (names: geneformer_triton.core.isp_service.INPUTS / OUTPUTS)
_ISP_INPUTS = (
    *RAW_INPUTS,
    Tensor("perturbation", STRING, (1,)),
    Tensor("targets", STRING, (-1,), True),
    Tensor("target_mode", STRING, (1,), True),
    Tensor("anchor_genes", STRING, (-1,), True),
    Tensor("rank_shift", FP32, (1,), True),
    Tensor("goal_embedding", FP32, (-1,), True),
    Tensor("start_embedding", FP32, (-1,), True),
    Tensor("return_gene_shift", BOOL, (1,), True),
    Tensor("encoder_model", STRING, (1,), True),
    # upstream Geneformer semantics (default; geneformer_triton/core/isp_upstream_service.py)
    Tensor("semantics", STRING, (1,), True),
    Tensor("emb_layer", INT32, (1,), True),
    Tensor("emb_mode", STRING, (1,), True),
    Tensor("state_embeddings", FP32, (-1, -1), True),
    Tensor("embed_only", BOOL, (1,), True),
)
#: every input ragged: requests of different sizes merge into one execute() (each keeps its own tensors, a
#: leading batch dimension of 1; the python backend does not concatenate them)
ISP_INPUTS = tuple(replace(t, ragged=True) for t in _ISP_INPUTS)
ISP_OUTPUTS = tuple(
    Tensor(name, dtype, dims)
    for name, dtype, dims in (
        ("perturbed_genes", STRING, (-1,)), ("cell_shift", FP32, (-1,)), ("gene_embedding_shift", FP32, (-1,)),
        ("goal_shift", FP32, (-1,)), ("start_shift", FP32, (-1,)), ("original_embedding", FP32, (-1,)),
        ("cell_emb_shift", FP32, (-1,)), ("state_shift", FP32, (-1, -1)), ("cell_genes", STRING, (-1,)),
        ("gene_perturbation", INT32, (-1,)), ("gene_affected", INT32, (-1,)), ("gene_cos", FP32, (-1,)),
        ("target_errors", STRING, (-1,)),
    )
)


@dataclass(frozen=True)
class GeneratedConfig:
    """One config file: its path relative to the repository root, a comment header and the ModelConfig."""

    path: str
    comment: str
    config: mc.ModelConfig

    def text(self) -> str:
        """The file's text: ``# ``-prefixed comment lines, then ``text_format`` of the config."""
        lines = [wrapped for line in self.comment.strip().splitlines()
                 for wrapped in textwrap.wrap(line, LINE - 2, break_on_hyphens=False, break_long_words=False) or [""]]
        header = "".join(f"# {line}".rstrip() + "\n" for line in lines)
        return header + "".join(_field_text(self.config, field, value) for field, value in self.config.ListFields())


LINE = 110  # a field element that fits on a line of this many characters is written on one line


def _field_text(config: mc.ModelConfig, field: object, value: object) -> str:
    """``text_format`` of one top-level field: each repeated element (map entry) on its own line where it fits."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        parts = []
        for key in sorted(value):
            one = mc.ModelConfig()
            getattr(one, field.name)[key].CopyFrom(value[key])
            parts.append(one)
    elif field.label == field.LABEL_REPEATED and field.message_type is not None:
        parts = []
        for item in value:
            one = mc.ModelConfig()
            getattr(one, field.name).add().CopyFrom(item)
            parts.append(one)
    else:
        one = mc.ModelConfig()
        one.MergeFrom(config)
        for other, _ in config.ListFields():
            if other.name != field.name:
                one.ClearField(other.name)
        parts = [one]
    out = []
    for part in parts:
        line = text_format.MessageToString(part, as_one_line=True)
        out.append(line + "\n" if len(line) <= LINE else text_format.MessageToString(part))
    return "".join(out)


# ------------------------------------------------------------------------------------------- building blocks
def _base(name: str, max_batch_size: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor], *,
          platform: str = "", backend: str = "") -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=max_batch_size)
    config.input.extend(t.proto(mc.ModelInput) for t in inputs)
    config.output.extend(t.proto(mc.ModelOutput) for t in outputs)
    return config


def _parameters(config: mc.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def _instances(config: mc.ModelConfig, count: int, kind: int, profiles: Sequence[str] = ()) -> None:
    config.instance_group.add(count=count, kind=kind, profile=list(profiles))


def _gpu_batching(config: mc.ModelConfig, profiles: Sequence[trt.Profile]) -> None:
    """Preferred batches = the opt batches of the TensorRT profiles; pinned host buffers."""
    config.dynamic_batching.preferred_batch_size.extend(trt.preferred_batch_sizes(profiles))
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    config.optimization.input_pinned_memory.enable = True
    config.optimization.output_pinned_memory.enable = True


def _warmup(config: mc.ModelConfig, name: str, tensors: c.EncoderTensors, profile: trt.Profile) -> None:
    """One warm-up batch at the longest profile's opt shape (builds TensorRT engines at load, not on a request)."""
    warm = config.model_warmup.add(name=name, batch_size=profile.opt_batch)
    for tensor in tensors.inputs:
        warm.inputs[tensor].data_type = INT64
        warm.inputs[tensor].dims.append(profile.opt_tokens)
        warm.inputs[tensor].zero_data = True


def _bool(value: bool) -> str:
    return str(value).lower()


def profiles_for(shape: c.ServedShape) -> tuple[trt.Profile, ...]:
    """TensorRT length buckets for ``shape.input_size`` tokens (export/tensorrt_build.py)."""
    return trt.default_profiles(shape.input_size, c.MAX_BATCH_SIZE)


# ------------------------------------------------------------------------------------------- encoders
_PRECISION_TEXT = {
    "fp32": "", "fp16": " (fp32 inputs and outputs, fp16 compute)",
    "bf16": ": traced in bfloat16 (libtorch uses AVX512-BF16 / AMX on CPU, tensor cores on GPU)",
    "int8": " (onnxruntime dynamic quantization of the fused fp32 graph: int8 weights, activations "
            "quantized per call; fp32 inputs and outputs)",
}


def _encoder_default(variant: c.EncoderVariant, shape: c.ServedShape) -> mc.ModelConfig:
    hidden = shape.hidden_size
    names = variant.tensors
    inputs = [Tensor(names.input_ids, INT64, (-1,)), Tensor(names.attention_mask, INT64, (-1,))]
    outputs = [Tensor(names.cell_embedding, FP32, (hidden,)), Tensor(names.token_embeddings, FP32, (-1, hidden))]
    if variant.graph == c.ISP_REDUCED_GRAPH:
        offset, position_map = c.ISP_REDUCED_INPUTS
        token_mean, gene_cos = c.ISP_REDUCED_OUTPUTS
        inputs += [Tensor(offset, INT64, (1,)), Tensor(position_map, INT64, (-1,))]
        outputs = [Tensor(token_mean, FP32, (hidden,)), Tensor(gene_cos, FP32, (-1,))]
    elif variant.graph == c.PACKED_GRAPH:
        inputs = [Tensor(t.name, t.data_type, t.dims, ragged=True) for t in inputs]
        outputs = outputs[:1]
    config = _base(variant.model, c.MAX_BATCH_SIZE, inputs, outputs, platform=variant.platform)
    if variant.graph == c.PACKED_GRAPH:  # each row's width: where one cell ends and the next begins
        config.batch_input.add(kind=mc.BatchInput.BATCH_ITEM_SHAPE, target_name=[c.PACKED_ITEM_WIDTH],
                               data_type=INT32, source_input=[names.input_ids])
    config.dynamic_batching.max_queue_delay_microseconds = 1000
    if variant.kind == "torchscript":
        _parameters(config, {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "false"})
    return config


_GRAPH_TEXT = {
    c.TOKENS_GRAPH: "Right-padded token ids -> cell embedding and token embeddings.",
    c.ISP_REDUCED_GRAPH: "Right-padded token ids + each row's alignment with its original -> token means and per-gene cosines.",
    c.PACKED_GRAPH: "Token ids of cells of any lengths (ragged, no padding) -> cell embedding.",
}


def _encoder_comment(variant: c.EncoderVariant) -> str:
    kind = {"onnx": "ONNX", "torchscript": "TorchScript", "tensorrt": "TensorRT plan"}[variant.kind]
    layer = ("" if variant.embeds else
             f"\nToken embeddings of helical emb_layer {variant.emb_layer} (hidden_states[n_layers - 1]: upstream "
             "InSilicoPerturber's default emb_layer=-1), for in-silico perturbation only (no ensemble).")
    if variant.graph == c.PACKED_GRAPH:
        layer += ("\nPadding-free (export/packed_export.py): ragged inputs (allow_ragged_batch: Triton concatenates the "
                  "rows of every request of a batch, so the dynamic batcher merges cells of any lengths) and the "
                  "batch_input item_width (each row's width); attention is block-diagonal per cell in the graph; "
                  "cell_embedding only.")
    if variant.graph == c.ISP_REDUCED_GRAPH:
        layer += ("\nThe ISP reduction runs in the graph (export/isp_reduction_export.py): per row, original_offset "
                  "(rows back to its original in the same request: relative, so batching keeps it valid) and "
                  "position_map in; token_mean and gene_cos (cosine of each gene with the same gene in the "
                  "original) out instead of token embeddings.")
    names = ("" if variant.tensors == c.PLAIN_TENSORS else
             "\nThe libtorch backend names tensors <name>__<index> by their position in forward() and in the "
             "returned tuple.")
    return (f"Geneformer encoder {variant.model}: {kind} {variant.precision}{_PRECISION_TEXT[variant.precision]} "
            f"({variant.platform}).\n{_GRAPH_TEXT[variant.graph]}{layer}{names}\n"
            "Generated by export/model_configs.py from geneformer_triton/core/contract.py: do not edit.")


def _ort_tensorrt_accelerator(config: mc.ModelConfig, variant: c.EncoderVariant, shapes: Sequence[trt.Profile]) -> None:
    """onnxruntime's TensorRT execution provider: one profile over [1..max batch] x [1..input size] tokens."""
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    cache = f"{ORT_TRT_CACHE}/{variant.model}"
    longest, names = shapes[-1], variant.tensors.inputs

    def shape(batch: int, tokens: int) -> str:
        return ",".join(f"{n}:{batch}x{tokens}" for n in names)

    accelerator.parameters.update({
        "precision_mode": variant.precision.upper(),
        "max_workspace_size_bytes": str(4 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": shape(1, 1),
        "trt_profile_opt_shapes": shape(longest.opt_batch, longest.opt_tokens),
        "trt_profile_max_shapes": shape(c.MAX_BATCH_SIZE, longest.max_tokens),
    })


def encoder_config(variant: c.EncoderVariant, shape: c.ServedShape, host: str | None = None) -> GeneratedConfig:
    """``<model>/config.pbtxt`` (host None) or ``<model>/configs/<host>.pbtxt`` of an exported encoder."""
    config = _encoder_default(variant, shape)
    comment = _encoder_comment(variant)
    if host is None:
        return GeneratedConfig(f"{variant.model}/config.pbtxt", comment + "\nPer-host tuning: configs/cpu.pbtxt, "
                               "configs/gpu.pbtxt (tritonserver --model-config-name).", config)
    profiles = profiles_for(shape)
    if host == "cpu":
        _instances(config, 1, CPU)
        if variant.kind == "onnx":
            _parameters(config, {"intra_op_thread_count": "0", "inter_op_thread_count": "1", "execution_mode": "0"})
            comment += ("\nCPU host: one instance using every physical core (intra_op_thread_count 0 = onnxruntime's "
                        "default). On a big host, prefer count N with intra_op_thread_count = cores / N.")
        else:
            comment += ("\nCPU host: one instance; libtorch's intra-op pool uses every core. No INTER_OP_THREAD_COUNT: "
                        "libtorch's inter-op pool is process-global, and Triton's pytorch backend aborts when a second "
                        "TorchScript model sets it.")
    elif variant.precision == "int8":
        _instances(config, 1, GPU)
        _gpu_batching(config, profiles)
        config.optimization.ClearField("execution_accelerators")
        comment += ("\nGPU host: dynamic int8 quantization is a CPU format (its DynamicQuantizeMatMul / QAttention "
                    "nodes fall back to the CPU execution provider; TensorRT reads QDQ graphs, not these contrib ops). "
                    "On GPU hosts serve geneformer_torchscript_bf16 or geneformer_onnx_fp16; this config keeps the "
                    "model loadable there.")
    else:
        _instances(config, 2, GPU)
        _gpu_batching(config, profiles)
        comment += ("\nGPU host: instance_group.count is per GPU (2 instances overlap copies with compute); "
                    "preferred_batch_size = the opt batches of the TensorRT profiles (export/tensorrt_build.py).")
        if variant.kind == "onnx" and variant.graph == c.TOKENS_GRAPH:
            _ort_tensorrt_accelerator(config, variant, profiles)
            _warmup(config, "build_engines", variant.tensors, profiles[-1])
            comment += ("\nonnxruntime's TensorRT execution provider (CUDA EP runs what TensorRT cannot) builds its "
                        "engines at load (model_warmup) and caches them in trt_engine_cache_path (a volume in "
                        "docker-compose.yml); a cached engine is reused only on the same GPU model and TensorRT version.")
    return GeneratedConfig(f"{variant.model}/configs/{host}.pbtxt", comment, config)


def trt_config(shape: c.ServedShape, profiles: Sequence[trt.Profile] | None = None,
               instance_count: int = 2) -> GeneratedConfig:
    """``geneformer_trt/config.pbtxt``: the TensorRT plan, one instance group over all its profiles (GPU only)."""
    variant = c.ENCODER_VARIANTS["trt"]
    profiles = tuple(profiles or profiles_for(shape))
    trt.validate_profiles(profiles, c.MAX_BATCH_SIZE)
    config = _encoder_default(variant, shape)
    config.ClearField("dynamic_batching")
    _instances(config, instance_count, GPU, [str(i) for i in range(len(profiles))])
    _gpu_batching(config, profiles)
    _warmup(config, "longest_bucket_opt", variant.tensors, profiles[-1])
    table = "\n".join(f"  profile {i}: tokens {p.min_tokens}..{p.max_tokens} (opt {p.opt_tokens}), "
                      f"batch {p.min_batch}..{p.max_batch} (opt {p.opt_batch})" for i, p in enumerate(profiles))
    comment = (_encoder_comment(variant) + "\nThe plan (1/model.plan) is built on the serving GPU by deploy/build_trt.sh "
               "and is specific to that GPU model and TensorRT version.\nOptimization profiles in the plan (Triton picks "
               f"the one whose range holds each batch's shape):\n{table}\npreferred_batch_size = the profiles' opt batches; "
               f"{instance_count} instances per visible GPU overlap host<->device copies with compute.")
    return GeneratedConfig(f"{variant.model}/config.pbtxt", comment, config)


# ------------------------------------------------------------------------------------------- ensembles, python models
def ensemble_config(variant: c.EncoderVariant, shape: c.ServedShape) -> GeneratedConfig:
    """``geneformer_embed_<variant>/config.pbtxt``: raw counts -> tokenizer -> encoder -> cell embedding."""
    config = _base(variant.ensemble, c.MAX_BATCH_SIZE, RAW_INPUTS,
                   [Tensor(c.PLAIN_TENSORS.cell_embedding, FP32, (shape.hidden_size,))], platform="ensemble")
    plain, names = c.PLAIN_TENSORS, variant.tensors
    tokens = {plain.input_ids: "tokens", plain.attention_mask: "tokens_mask"}
    steps = config.ensemble_scheduling.step
    steps.add(model_name=c.TOKENIZER_MODEL, model_version=-1, input_map={t.name: t.name for t in RAW_INPUTS},
              output_map=tokens)
    steps.add(model_name=variant.model, model_version=-1,
              input_map={names.input_ids: "tokens", names.attention_mask: "tokens_mask"},
              output_map={names.cell_embedding: plain.cell_embedding})
    comment = (f"Ensemble: raw counts -> {c.TOKENIZER_MODEL} -> {variant.model} -> cell embedding.\n"
               "Generated by export/model_configs.py from geneformer_triton/core/contract.py: do not edit.")
    return GeneratedConfig(f"{variant.ensemble}/config.pbtxt", comment, config)


def tokenizer_config(shape: c.ServedShape, host: str | None = None) -> GeneratedConfig:
    """``geneformer_tokenizer`` (python backend): raw counts of one cell per batch row -> token ids."""
    tokens = c.PLAIN_TENSORS
    config = _base(c.TOKENIZER_MODEL, c.MAX_BATCH_SIZE, RAW_INPUTS,
                   [Tensor(tokens.input_ids, INT64, (-1,)), Tensor(tokens.attention_mask, INT64, (-1,)),
                    Tensor(c.LENGTH, INT64, (1,))], backend="python")
    config.dynamic_batching.max_queue_delay_microseconds = 500
    _parameters(config, {
        "token_dictionary": TOKEN_DICTIONARY_FILE,
        "gene_median_dictionary": GENE_MEDIAN_FILE,
        "gene_mapping_dictionary": GENE_MAPPING_FILE,
        c.PARAM_INPUT_SIZE: str(shape.input_size),
        c.PARAM_SPECIAL_TOKENS: _bool(shape.special_tokens),
        "max_genes_per_request": str(MAX_GENES_PER_REQUEST),
    })
    comment = ("Rank-value tokenizer (python backend): raw counts of one cell per batch row -> Geneformer token ids.\n"
               'Gene ids are Ensembl ids; "" pads a row. Dictionary files live in the version folder (1/), written by '
               "`gftriton export`.\nmax_genes_per_request (genes x rows): larger requests are rejected before any work.\n"
               "Generated by export/model_configs.py from geneformer_triton/core/contract.py: do not edit.")
    if host is None:
        return GeneratedConfig(f"{c.TOKENIZER_MODEL}/config.pbtxt", comment, config)
    _instances(config, TOKENIZER_INSTANCES[host], CPU)
    comment += f"\n{host.upper()} host: {TOKENIZER_INSTANCES[host]} CPU instances (tokenization stays on CPU)."
    return GeneratedConfig(f"{c.TOKENIZER_MODEL}/configs/{host}.pbtxt", comment, config)


def encoder_signatures(shape: c.ServedShape) -> dict[str, dict]:
    """What the ISP model needs of each encoder it may call: tensor names, max batch, hidden size."""
    signatures = {}
    for model in c.ISP_ENCODERS:
        variant = c.VARIANT_OF_MODEL[model]
        names = variant.tensors.as_dict()
        if variant.graph == c.ISP_REDUCED_GRAPH:  # its own inputs and outputs (contract.ISP_REDUCED_*)
            names = {"input_ids": names["input_ids"], "attention_mask": names["attention_mask"],
                     **{name: name for name in c.ISP_REDUCED_INPUTS + c.ISP_REDUCED_OUTPUTS}}
        signatures[model] = {**names, "graph": variant.graph, "max_batch_size": c.MAX_BATCH_SIZE,
                             "hidden_size": shape.hidden_size}
    return signatures


def isp_config(shape: c.ServedShape, host: str | None = None) -> GeneratedConfig:
    """``geneformer_isp`` (python backend, BLS): one cell + a perturbation spec per request (batch dimension 1),
    scores out; Triton's dynamic batcher hands several requests to one execute(), which packs their rows."""
    config = _base(c.ISP_MODEL, ISP_MAX_CELLS_PER_EXECUTE, ISP_INPUTS, ISP_OUTPUTS, backend="python")
    config.dynamic_batching.max_queue_delay_microseconds = ISP_MAX_QUEUE_DELAY_US
    _parameters(config, {
        c.PARAM_ENCODER_MODEL: c.ISP_DEFAULT_ENCODER,
        c.PARAM_ALLOWED_ENCODERS: ",".join(c.ISP_ENCODERS),
        **{c.PARAM_ENCODER_SIGNATURE + model: json.dumps(signature, separators=(",", ":"))
           for model, signature in encoder_signatures(shape).items()},
        "dictionary_dir": f"../{c.TOKENIZER_MODEL}/1",
        c.PARAM_INPUT_SIZE: str(shape.input_size),
        c.PARAM_SPECIAL_TOKENS: _bool(shape.special_tokens),
        "max_tokens_per_batch": str(ISP_MAX_TOKENS_PER_BATCH),
        "max_perturbations_per_request": str(ISP_MAX_PERTURBATIONS),
    })
    comment = ("In-silico perturbation (python backend, BLS): one cell + a perturbation spec in, one score per "
               "perturbation out.\nTokenizes in-process with geneformer_tokenizer/1's dictionaries and calls the "
               "encoder named by `encoder_model` (or the request's allowed `encoder_model` input) in token-budget "
               "chunks;\nencoder_signature.<model> gives each allowed encoder's tensor names and sizes. Contract: "
               "geneformer_triton/core/isp_service.py.\nOne cell per request (every tensor has a leading batch dimension of "
               f"1; batch > 1 is rejected). Dynamic batching: up to {ISP_MAX_CELLS_PER_EXECUTE} requests of any sizes "
               f"(ragged inputs), queued at most {ISP_MAX_QUEUE_DELAY_US} us, reach one execute() and their "
               "perturbation rows share encoder batches.\nmax_tokens_per_batch: tokens per encoder call (batch x "
               "padded length; 32768 = 16 cells of 2048 tokens); the encoder's max_batch_size also bounds a chunk.\n"
               "Generated by export/model_configs.py from geneformer_triton/core/contract.py: do not edit.")
    if host is None:
        return GeneratedConfig(f"{c.ISP_MODEL}/config.pbtxt", comment, config)
    _instances(config, ISP_INSTANCES[host], CPU)
    _parameters(config, {"max_inflight_batches": str(ISP_INSTANCES[host])})
    comment += (f"\n{host.upper()} host: {ISP_INSTANCES[host]} CPU instances (the python logic stays on CPU; the "
                f"encoder it calls runs where its own config puts it), {ISP_INSTANCES[host]} chunks in flight per cell.")
    return GeneratedConfig(f"{c.ISP_MODEL}/configs/{host}.pbtxt", comment, config)


# ------------------------------------------------------------------------------------------- repositories
def repository_configs(shape: c.ServedShape = c.DEFAULT_SHAPE,
                       variants: Sequence[c.EncoderVariant] | None = None) -> list[GeneratedConfig]:
    """Every config of a servable repository for ``shape``: tokenizer, ISP, each exported encoder (default +
    per host) and the ensemble of each embedding encoder (default: every exported variant)."""
    variants = list(variants if variants is not None else c.EXPORTED_VARIANTS.values())
    builders: list[Callable[[str | None], GeneratedConfig]] = [
        lambda host: tokenizer_config(shape, host), lambda host: isp_config(shape, host),
        *[(lambda host, v=v: encoder_config(v, shape, host)) for v in variants],
    ]
    configs = [build(host) for build in builders for host in (None, *HOSTS)]
    configs += [ensemble_config(v, shape) for v in variants if v.embeds]
    return configs


def deploy_configs(shape: c.ServedShape = c.DEFAULT_SHAPE) -> list[GeneratedConfig]:
    """The TensorRT models' configs (``deploy/``: copied into the repository by deploy/build_trt.sh)."""
    return [trt_config(shape), ensemble_config(c.ENCODER_VARIANTS["trt"], shape)]


def write_configs(root: Path, configs: Sequence[GeneratedConfig]) -> list[Path]:
    """Write ``configs`` under ``root``; returns the files whose content changed (unchanged files are not touched)."""
    changed = []
    for generated in configs:
        path = root / generated.path
        text = generated.text()
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        changed.append(path)
    return changed


def stale_configs(root: Path, configs: Sequence[GeneratedConfig]) -> list[str]:
    """Paths (relative to ``root``) whose file is missing or differs from the generated text."""
    return [g.path for g in configs if not (root / g.path).is_file() or (root / g.path).read_text() != g.text()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m geneformer_triton.export.model_configs [--write]``: check (or rewrite) the checked-in configs."""
    parser = argparse.ArgumentParser(description="check or regenerate the checked-in Triton configs")
    parser.add_argument("--write", action="store_true", help="rewrite the files that differ")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    targets = [(root / "model_repository", repository_configs()), (root / "deploy", deploy_configs())]
    if args.write:
        for folder, configs in targets:
            for path in write_configs(folder, configs):
                LOGGER.warning("wrote %s", path)
        return 0
    stale = [f"{folder.name}/{p}" for folder, configs in targets for p in stale_configs(folder, configs)]
    if stale:
        LOGGER.error("configs differ from the contract: %s; run python -m geneformer_triton.export.model_configs --write", stale)
    return 1 if stale else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
