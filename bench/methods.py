"""The methods the in-process benchmark compares: the baselines users have today and our encoder paths.

Every method embeds the same tokenized cells and returns float32 cell embeddings [N, H] in input order.

Baselines (what users run today):
- ``baseline_eager_fp32_b10``: ``BertForMaskedLM`` with eager attention, fp32, batch 10 in input order,
  ``output_hidden_states=True``, mean of the last hidden state over each cell's tokens (the original
  challenge baseline: the LM head is computed and thrown away, batches are padded to their longest cell);
- ``baseline_sdpa_autocast_b24``: helical 3.1's default path: ``BertForMaskedLM`` with SDPA attention,
  batch 24 in input order, inside ``torch.amp.autocast("cuda")`` (fp16 on a GPU; on a CPU that context
  is a no-op, so it runs fp32, exactly as helical does there);
- ``helical_get_embeddings``: helical 3.1.4 itself (``Geneformer.get_embeddings``) in its own venv
  (``$GFTRITON_HELICAL_PYTHON``), timed around ``get_embeddings`` only (``bench/helical_embed.py``).

Our encoder paths (encoder only, no LM head, only the layers needed, masked mean pooling):
- PyTorch (``geneformer_triton.model.encoder``), SDPA attention, fp32 / bf16 / fp16, int8 dynamic quantization
  of the Linear layers, optionally ``torch.compile``; TorchScript (the exported ``model.pt``);
- ONNX Runtime on the exported files: fused fp32 ``model.onnx`` (onnxruntime's transformer optimizer:
  Attention, SkipLayerNormalization), fp16, int8 dynamic quantization of the fused graph
  (``onnxruntime.quantization.quantize_dynamic``), and the unfused portable export for comparison.
Batching: ``input`` (input order, fixed batch size: the baselines), ``sorted`` (cells sorted by length,
fixed batch size: each batch is padded only to its own longest cell) or ``bucketed`` (sorted, and
batches filled up to a token budget: short cells go in larger batches).
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

LOGGER = logging.getLogger(__name__)

EncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> cell embeddings
REFERENCE = "torch_fp32_sorted"
BASELINE = "baseline_eager_fp32_b10"
HELICAL_STYLE = "baseline_sdpa_autocast_b24"
HELICAL = "helical_get_embeddings"
DEFAULT_HELICAL_PYTHON = "/tmp/setup/helical-venv/bin/python"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    family: str  # baseline | helical | encoder
    backend: str  # transformers | pytorch | torchscript | onnxruntime | helical
    precision: str  # fp32 | bf16 | fp16 | int8 (reduced precision fidelity threshold applies below fp32)
    batching: str = "sorted"  # input | sorted | bucketed
    batch_size: int = 8
    token_budget: int = 0  # bucketed: most tokens (padded) per batch
    pad_multiple: int = 1  # pad batch lengths up to a multiple of this (static shapes for compile)
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def fidelity_precision(self) -> str:
        return "fp32" if self.precision == "fp32" else "reduced"

    def describe(self) -> dict:
        data = asdict(self)
        data["options"] = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return data


# ----------------------------------------------------------------------------------------------- batching
def plan_batches(lengths: np.ndarray, spec: MethodSpec, max_length: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Batches as (cell indices, padded length) for ``spec``'s batching strategy."""
    lengths = np.asarray(lengths)
    order = np.arange(len(lengths)) if spec.batching == "input" else np.argsort(-lengths, kind="stable")

    def padded(index: np.ndarray) -> int:
        longest = int(lengths[index].max())
        if spec.pad_multiple > 1:
            longest = -(-longest // spec.pad_multiple) * spec.pad_multiple
            if max_length:
                longest = min(longest, max(max_length, int(lengths[index].max())))
        return longest

    batches: list[tuple[np.ndarray, int]] = []
    if spec.batching in ("input", "sorted"):
        for start in range(0, len(order), spec.batch_size):
            index = order[start:start + spec.batch_size]
            batches.append((index, padded(index)))
        return batches
    if spec.batching != "bucketed":
        raise ValueError(f"unknown batching {spec.batching!r}")
    budget = spec.token_budget or spec.batch_size * int(lengths.max())
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and stop - start < spec.batch_size and (stop - start + 1) * padded(order[start:start + 1]) <= budget:
            stop += 1
        index = order[start:stop]
        batches.append((index, padded(index)))
        start = stop
    return batches


def pad_batch(cells: list[np.ndarray], index: np.ndarray, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.full((len(index), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(index), length), dtype=np.int64)
    for row, i in enumerate(index):
        cell = cells[i]
        input_ids[row, :len(cell)] = cell
        attention_mask[row, :len(cell)] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------- methods
class Method:
    """A built method: ``embed(cells)`` returns [N, H] float32 in input order."""

    def __init__(self, spec: MethodSpec, encode: EncodeFn | None, device: str = "cpu", pad_id: int = 0,
                 max_length: int | None = None, setup_s: float = 0.0, close: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.encode = encode
        self.device = device
        self.pad_id = pad_id
        self.max_length = max_length
        self.setup_s = setup_s
        self._close = close
        self.last_padded_tokens = 0
        self.last_batches = 0

    def embed(self, cells: list[np.ndarray]) -> np.ndarray:
        assert self.encode is not None
        plan = plan_batches(np.array([len(c) for c in cells]), self.spec, self.max_length)
        result: np.ndarray | None = None
        padded = 0
        for index, length in plan:
            ids, mask = pad_batch(cells, index, length, self.pad_id)
            out = self.encode(ids, mask)
            if result is None:
                result = np.empty((len(cells), out.shape[1]), dtype=np.float32)
            result[index] = out
            padded += ids.size
        self.last_padded_tokens = padded
        self.last_batches = len(plan)
        assert result is not None
        return result

    def padded_lengths(self, cells: list[np.ndarray]) -> np.ndarray:
        """Per cell, the length it is computed at (its batch's padded length)."""
        lengths = np.array([len(c) for c in cells])
        out = np.empty(len(cells), dtype=np.int64)
        for index, length in plan_batches(lengths, self.spec, self.max_length):
            out[index] = length
        return out

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self.encode = None


@dataclass
class BuildContext:
    """What methods are built from: the loaded model, the exported repository, a work folder."""

    loaded: object  # geneformer_triton.model.loading.LoadedGeneformer (fp32, on CPU: never modified)
    repository: Path | None
    work_dir: Path
    device: str = "cpu"
    threads: int = 0  # intra-op threads (0 = the runtime's default: all physical cores)
    emb_layer: int = -1

    @property
    def pad_id(self) -> int:
        vocabulary = getattr(self.loaded, "vocabulary", None)
        return int(vocabulary.pad_id) if vocabulary is not None else 0

    @property
    def excluded_ids(self) -> tuple[int, ...]:
        vocabulary = self.loaded.vocabulary
        return tuple(vocabulary.special_token_ids) if (vocabulary is not None and self.loaded.special_tokens) else ()


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _hf_baseline(ctx: BuildContext, spec: MethodSpec) -> EncodeFn:
    """BertForMaskedLM forward with hidden states, mean of the last layer over the cell's tokens."""
    import torch

    model = copy.deepcopy(ctx.loaded.model)
    attention = spec.options.get("attention", "eager")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attention)
    else:  # older transformers
        model.config._attn_implementation = attention
    model = model.to(ctx.device).eval()
    device = torch.device(ctx.device)
    autocast = bool(spec.options.get("autocast_cuda", False))
    excluded = torch.tensor(ctx.excluded_ids, dtype=torch.long, device=device)
    layer = ctx.emb_layer

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(device)
        mask = torch.from_numpy(attention_mask).to(device)
        # helical: torch.no_grad() + torch.amp.autocast("cuda") (a no-op on a CPU)
        with torch.no_grad(), torch.amp.autocast("cuda", enabled=autocast and device.type == "cuda"):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[layer].float()
        keep = mask.bool()
        if excluded.numel():
            keep &= ~torch.isin(ids, excluded)
        weights = keep.float().unsqueeze(-1)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)).cpu().numpy()

    return encode


def _torch_encoder(ctx: BuildContext, spec: MethodSpec) -> EncodeFn:
    import torch

    # A private copy: GeneformerEncoder shares its modules with the loaded model, and .to(dtype/device)
    # would convert the loaded model's weights in place.
    encoder = copy.deepcopy(ctx.loaded.encoder(emb_layer=ctx.emb_layer, attention=spec.options.get("attention", "sdpa")))
    encoder = encoder.to(device=ctx.device, dtype=_torch_dtype("fp32" if spec.precision == "int8" else spec.precision)).eval()
    if spec.precision == "int8":
        if ctx.device != "cpu":
            raise RuntimeError("int8 dynamic quantization (torch.ao) runs on CPU only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear}, dtype=torch.qint8)
    module = encoder
    if spec.options.get("compile"):
        module = torch.compile(encoder, dynamic=spec.options.get("dynamic", True), mode=spec.options.get("compile_mode"))
    device = torch.device(ctx.device)
    non_blocking = device.type == "cuda"

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids)
        mask = torch.from_numpy(attention_mask)
        if non_blocking:
            ids, mask = ids.pin_memory(), mask.pin_memory()
        with torch.inference_mode():
            cell = module(ids.to(device, non_blocking=non_blocking), mask.to(device, non_blocking=non_blocking))[0]
        return cell.float().cpu().numpy()

    return encode


def _torchscript(ctx: BuildContext, spec: MethodSpec) -> EncodeFn:
    import torch

    path = _repository_file(ctx, spec.options.get("model", "geneformer_torchscript"), "model.pt")
    module = torch.jit.load(str(path), map_location=ctx.device).eval()
    device = torch.device(ctx.device)

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            cell = module(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device))[0]
        return cell.float().cpu().numpy()

    return encode


def _repository_file(ctx: BuildContext, model: str, filename: str) -> Path:
    if ctx.repository is None:
        raise FileNotFoundError(f"no model repository: {model}/1/{filename} is needed")
    path = ctx.repository / model / "1" / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (export it: gftriton export)")
    return path


# ONNX variant -> (served model, file) of the exported repository
ONNX_VARIANTS = {
    "fp32": ("geneformer_onnx", "model.onnx"),  # fused
    "fp16": ("geneformer_onnx_fp16", "model.onnx"),
    "portable": ("geneformer_onnx", "model.portable.onnx"),  # unfused
    "int8": ("geneformer_onnx_int8", "model.onnx"),  # gftriton export --precision int8
    "packed": ("geneformer_onnx_packed", "model.onnx"),  # padding-free (export/packed_export.py)
    "int8_packed": ("geneformer_onnx_int8_packed", "model.onnx"),
}


def onnx_file(ctx: BuildContext, variant: str) -> Path:
    """The exported ONNX file of a variant (``ONNX_VARIANTS``)."""
    if variant not in ONNX_VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; choose from {sorted(ONNX_VARIANTS)}")
    return _repository_file(ctx, *ONNX_VARIANTS[variant])


def ort_session_options(threads: int = 0, spinning: bool | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


def _onnxruntime(ctx: BuildContext, spec: MethodSpec) -> EncodeFn:
    import onnxruntime as ort

    from geneformer_triton.model.runtimes import is_packed_session, run_packed_onnx

    path = onnx_file(ctx, spec.options.get("variant", spec.precision))
    options = ort_session_options(ctx.threads, spec.options.get("spinning"))
    providers = ["CPUExecutionProvider"]
    if ctx.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    # Embedding-only serving: ask for the cell embedding alone (no [B, L, H] copy out).
    outputs = ["cell_embedding"]
    if is_packed_session(session):  # fed as Triton's ragged batching feeds it
        return lambda input_ids, attention_mask: run_packed_onnx(session, input_ids, attention_mask)[0]

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(outputs, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return encode


def _packed(ctx: BuildContext, spec: MethodSpec) -> EncodeFn:
    import torch

    from geneformer_triton.bench.packed import PackedEncoder

    encoder = copy.deepcopy(ctx.loaded.encoder(emb_layer=ctx.emb_layer, attention="sdpa"))
    module = PackedEncoder(encoder.to(device=ctx.device, dtype=_torch_dtype(spec.precision)).eval())
    device = torch.device(ctx.device)

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            cell = module(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device))
        return cell.cpu().numpy()

    return encode


BUILDERS = {
    "packed": _packed,
    "transformers": _hf_baseline,
    "pytorch": _torch_encoder,
    "torchscript": _torchscript,
    "onnxruntime": _onnxruntime,
}


def build_method(spec: MethodSpec, ctx: BuildContext, max_length: int | None = None) -> Method:
    """Build ``spec`` (load, convert, quantize, compile lazily); the time it took is ``setup_s``."""
    if spec.backend == "helical":
        return Method(spec, None, ctx.device, ctx.pad_id, max_length)
    import torch

    if ctx.threads and ctx.device == "cpu":
        torch.set_num_threads(ctx.threads)
    started = time.perf_counter()
    encode = BUILDERS[spec.backend](ctx, spec)
    return Method(spec, encode, ctx.device, ctx.pad_id, max_length, setup_s=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- catalogue
def cpu_methods() -> list[MethodSpec]:
    """Methods of the CPU benchmark (full mode); quick mode takes a subset.

    ``_b1`` methods run cell by cell in length order: on a CPU a single cell of a few hundred tokens
    already makes large matrix products, and one cell per run computes no padding at all (it was the
    fastest configuration measured on the 2-core development machine; see bench/README.md).
    """
    onnx, ort = "encoder", "onnxruntime"
    return [
        MethodSpec(BASELINE, "BertForMaskedLM eager fp32, batch 10, input order (original baseline)",
                   "baseline", "transformers", "fp32", "input", 10, options={"attention": "eager"}),
        MethodSpec(HELICAL_STYLE, "BertForMaskedLM SDPA, autocast('cuda') (no-op on CPU), batch 24, input order (helical 3.1 path)",
                   "baseline", "transformers", "fp32", "input", 24, options={"attention": "sdpa", "autocast_cuda": True}),
        MethodSpec(HELICAL, "helical 3.1.4 Geneformer.get_embeddings, batch 10 (own venv; the seed baseline)",
                   "helical", "helical", "fp32", "input", 10),
        MethodSpec(REFERENCE, "encoder PyTorch SDPA fp32, length-sorted batches of 8 (fp32 reference)",
                   "encoder", "pytorch", "fp32", "sorted", 8),
        MethodSpec("torch_fp32_bucketed", "encoder PyTorch SDPA fp32, token-budget buckets (8k tokens)",
                   "encoder", "pytorch", "fp32", "bucketed", 64, token_budget=8192),
        MethodSpec("torch_fp32_b1", "encoder PyTorch SDPA fp32, one cell per call (no padding)",
                   "encoder", "pytorch", "fp32", "sorted", 1),
        MethodSpec("torch_bf16_sorted", "encoder PyTorch SDPA bf16, sorted batches of 8 (oneDNN matmuls: AMX or AVX512-BF16 where the CPU has them)",
                   "encoder", "pytorch", "bf16", "sorted", 8),
        MethodSpec("torch_bf16_b1", "encoder PyTorch SDPA bf16, one cell per call (oneDNN matmuls: AMX or AVX512-BF16 where the CPU has them)",
                   "encoder", "pytorch", "bf16", "sorted", 1),
        MethodSpec("torch_fp16_sorted", "encoder PyTorch SDPA fp16, sorted batches of 8",
                   "encoder", "pytorch", "fp16", "sorted", 8),
        MethodSpec("torch_int8_b1", "encoder PyTorch, int8 dynamic quantization of the Linear layers (fbgemm), one cell per call",
                   "encoder", "pytorch", "int8", "sorted", 1),
        MethodSpec("torchscript_fp32_b1", "TorchScript model.pt (SDPA attention), fp32, one cell per call",
                   "encoder", "torchscript", "fp32", "sorted", 1),
        MethodSpec("torchscript_bf16_b1", "TorchScript bf16 model.pt (gftriton export --precision bf16), one cell per call",
                   "encoder", "torchscript", "bf16", "sorted", 1, options={"model": "geneformer_torchscript_bf16"}),
        MethodSpec("onnx_portable_fp32_b1", "ONNX Runtime, plain export (unfused attention), fp32, one cell per call",
                   onnx, ort, "fp32", "sorted", 1, options={"variant": "portable"}),
        MethodSpec("onnx_fp32_sorted", "ONNX Runtime fused graph (Attention, SkipLayerNorm) fp32, sorted batches of 8",
                   onnx, ort, "fp32", "sorted", 8, options={"variant": "fp32"}),
        MethodSpec("onnx_fp32_b1", "ONNX Runtime fused graph fp32, one cell per call (no padding)",
                   onnx, ort, "fp32", "sorted", 1, options={"variant": "fp32"}),
        MethodSpec("onnx_fp16_b1", "ONNX Runtime fused graph fp16, one cell per call",
                   onnx, ort, "fp16", "sorted", 1, options={"variant": "fp16"}),
        MethodSpec("onnx_int8_b1", "ONNX Runtime fused graph, int8 dynamic quantization (gftriton export --precision int8; VNNI), one cell per call",
                   onnx, ort, "int8", "sorted", 1, options={"variant": "int8"}),
        MethodSpec("onnx_packed_fp32_b1",
                   "ONNX Runtime packed graph (ragged inputs, attention per cell; served as geneformer_onnx_packed) fp32, one cell per call",
                   onnx, ort, "fp32", "sorted", 1, options={"variant": "packed"}),
        MethodSpec("onnx_packed_int8_b1",
                   "ONNX Runtime packed graph, int8 dynamic quantization of the weight MatMuls (geneformer_onnx_int8_packed), one cell per call",
                   onnx, ort, "int8", "sorted", 1, options={"variant": "int8_packed"}),
    ]


def gpu_methods() -> list[MethodSpec]:
    """Methods of the GPU benchmark (onnxruntime there is CPU-only: no ONNX methods)."""
    return [
        MethodSpec(BASELINE, "BertForMaskedLM eager fp32, batch 10, input order (original baseline)",
                   "baseline", "transformers", "fp32", "input", 10, options={"attention": "eager"}),
        MethodSpec(HELICAL_STYLE, "BertForMaskedLM SDPA + fp16 autocast, batch 24, input order (helical 3.1 default)",
                   "baseline", "transformers", "fp16", "input", 24, options={"attention": "sdpa", "autocast_cuda": True}),
        MethodSpec(REFERENCE, "encoder PyTorch SDPA fp32 (TF32 off), sorted batches of 64 (fp32 reference)",
                   "encoder", "pytorch", "fp32", "sorted", 64),
        MethodSpec("torch_bf16_sorted", "encoder PyTorch SDPA bf16, sorted batches of 128",
                   "encoder", "pytorch", "bf16", "sorted", 128),
        MethodSpec("torch_fp16_sorted", "encoder PyTorch SDPA fp16, sorted batches of 128",
                   "encoder", "pytorch", "fp16", "sorted", 128),
        MethodSpec("torch_bf16_bucketed", "encoder PyTorch SDPA bf16, token-budget buckets (256k tokens)",
                   "encoder", "pytorch", "bf16", "bucketed", 512, token_budget=262144),
        MethodSpec("torch_bf16_packed", "encoder PyTorch bf16, packed tokens (no padding), flash varlen attention",
                   "encoder", "packed", "bf16", "bucketed", 1024, token_budget=262144),
        MethodSpec("torchscript_fp32_gpu", "TorchScript model.pt (SDPA), fp32, sorted batches of 64",
                   "encoder", "torchscript", "fp32", "sorted", 64),
        MethodSpec("torchscript_bf16_gpu", "TorchScript bf16 model.pt (SDPA; served as geneformer_torchscript_bf16), sorted batches of 128",
                   "encoder", "torchscript", "bf16", "sorted", 128, options={"model": "geneformer_torchscript_bf16"}),
        MethodSpec("torch_bf16_compile_bucketed", "encoder PyTorch bf16 torch.compile, buckets padded to 256",
                   "encoder", "pytorch", "bf16", "bucketed", 512, token_budget=262144, pad_multiple=256,
                   options={"compile": True, "dynamic": True}),
    ]


def select(specs: list[MethodSpec], names: list[str] | None) -> list[MethodSpec]:
    if not names:
        return specs
    known = {s.name: s for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


# ----------------------------------------------------------------------------------------------- helical
def helical_python() -> Path | None:
    """helical's venv interpreter: $GFTRITON_HELICAL_PYTHON, else the default setup path, else .venv-helical."""
    candidates = [os.environ.get("GFTRITON_HELICAL_PYTHON", ""), DEFAULT_HELICAL_PYTHON,
                  str(Path(__file__).resolve().parents[1] / ".venv-helical" / "bin" / "python")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def write_helical_cache(prefix: Path, loaded) -> Path:
    """Lay the loaded model out the way helical's cache expects (weights, config, dictionaries)."""
    import torch

    from geneformer_triton.model.specs import get_model_spec

    version = get_model_spec(loaded.name).dictionary_version
    folder = prefix / ".cache" / "helical" / "models" / "geneformer" / version
    checkpoint = folder / loaded.name
    checkpoint.mkdir(parents=True, exist_ok=True)
    loaded.model.config.save_pretrained(checkpoint)
    torch.save(loaded.model.state_dict(), checkpoint / "pytorch_model.bin")
    (checkpoint / "training_args.bin").write_bytes(b"")  # helical only checks that it exists
    loaded.vocabulary.save(folder)
    return checkpoint


def run_helical(ctx: BuildContext, cellset, batch_size: int = 10, timeout_s: float = 3600.0, sampler_factory=None,
                repeats: int = 1) -> dict:
    """helical's get_embeddings on ``cellset``'s cells (raw counts) in its own venv, ``repeats`` times.

    Returns ``{"embeddings", "embed_s", "cpu_s", "tokenize_s", "load_s", "lengths", "summary"}``: per
    repeat wall and CPU seconds (lists); summary is the resource sampler's view of the helical process
    while it embedded.
    """
    python = helical_python()
    if python is None:
        raise FileNotFoundError("helical's venv not found: set GFTRITON_HELICAL_PYTHON (make helical-venv)")
    import anndata as ad

    script = Path(__file__).with_name("helical_embed.py")
    with tempfile.TemporaryDirectory(prefix="bench-helical-") as tmp:
        tmp_path = Path(tmp)
        write_helical_cache(tmp_path / "prefix", ctx.loaded)
        adata = cellset.adata[cellset.rows].copy()
        adata.obs_names_make_unique()
        adata.obs["n_counts"] = np.asarray(cellset.adata.obs["n_counts"])[cellset.rows]
        h5ad = tmp_path / "cells.h5ad"
        ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var).write_h5ad(h5ad)
        out = tmp_path / "helical.npz"
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["CACHE_DIR_HELICAL_PREFIX"] = str(tmp_path / "prefix")
        device = "cuda" if ctx.device.startswith("cuda") else "cpu"
        cmd = [str(python), str(script), "--model", ctx.loaded.name, "--h5ad", str(h5ad), "--out", str(out),
               "--batch-size", str(batch_size), "--device", device, "--repeats", str(repeats)]
        if ctx.threads:
            cmd += ["--threads", str(ctx.threads)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        sampler = None
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                if "BENCH_EMBED_START" in line and sampler_factory is not None:
                    sampler = sampler_factory([proc.pid])
                    sampler.__enter__()
                elif "BENCH_EMBED_END" in line and sampler is not None:
                    sampler.__exit__(None, None, None)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"helical did not finish in {timeout_s:.0f} s")
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if sampler is not None and sampler._thread is not None and sampler._thread.is_alive():
                sampler.__exit__(None, None, None)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError("helical failed (exit %s):\n%s" % (proc.returncode, "\n".join(lines[-30:])))
        data = np.load(out)
        result = {k: data[k] for k in data.files}
    result["summary"] = sampler.summary if sampler is not None else None
    return {"embeddings": result["embeddings"], "embed_s": [float(x) for x in np.atleast_1d(result["embed_s"])],
            "cpu_s": [float(x) for x in np.atleast_1d(result["cpu_s"])], "tokenize_s": float(result["tokenize_s"]),
            "load_s": float(result["load_s"]), "lengths": result["lengths"], "summary": result["summary"]}
