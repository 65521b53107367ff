"""TensorRT engine (``model.plan``) for the Geneformer encoder, built at deploy time on the serving GPU.

The source is the ONNX encoder written by ``gftriton export``
(``model_repository/geneformer_onnx/1/model.portable.onnx``, standard ONNX ops only: inputs ``input_ids`` and ``attention_mask``,
INT64 ``[batch, tokens]``; outputs ``cell_embedding`` FP32 ``[batch, H]`` and ``token_embeddings``
FP32 ``[batch, tokens, H]``). The engine keeps those names and types, so the ``geneformer_trt``
model (platform ``tensorrt_plan``) has the same interface as ``geneformer_onnx``.

A plan is specific to the TensorRT version *and* the GPU model it was built on: it is never checked
in, it is built on the serving host (``docker compose run --rm trt-build`` or the compose one-shot
service) with the TensorRT of the NGC release that serves it (24.10: TensorRT 10.5, the version
inside ``nvcr.io/nvidia/tritonserver:24.10-py3``).

Optimization profiles
---------------------
One profile per length bucket; every profile covers batch 1..64 (``max_batch_size`` of the Triton
model) and is tuned (``opt``) at the top of its bucket with a batch that keeps ~32K tokens per batch,
so a full batch costs about the same in every bucket. Triton picks, per request batch, the profile
whose range holds the batch's shape (the instance group lists all profiles). The dynamic batcher's
``preferred_batch_size`` values are the opt batches (16, 32, 64).

======= =============== ========== =============== =========== ==================
profile tokens min..max opt tokens batch min..max  opt batch   tokens at opt
======= =============== ========== =============== =========== ==================
0       1..512          512        1..64           64          32,768
1       513..1,024      1,024      1..64           32          32,768
2       1,025..2,048    2,048      1..64           16          32,768
======= =============== ========== =============== =========== ==================

Models with 4,096 input tokens (V2) get a fourth bucket 2,049..4,096 at opt batch 8
(``default_profiles(4096)``).

Two equivalent ways to build, both driven by the same ``Profile`` list:

* ``build_tensorrt_engine`` uses the TensorRT Python API the way NVIDIA's ``TensorRT/demo/BERT``
  builder does: ``Builder`` -> explicit-batch ``NetworkDefinition`` -> ``OnnxParser`` ->
  ``BuilderConfig`` (workspace pool, FP16/BF16 flags, one ``IOptimizationProfile`` per bucket with
  ``set_shape(name, min, opt, max)`` for *both* inputs, timing cache loaded and saved) ->
  ``build_serialized_network``.
* ``trtexec_command`` returns the equivalent ``trtexec`` command line (``--profile=N`` followed by
  ``--minShapes/--optShapes/--maxShapes`` for each profile, ``--fp16``, ``--timingCacheFile``,
  ``--saveEngine``); ``deploy/build_trt.sh`` runs it inside ``nvcr.io/nvidia/tensorrt:24.10-py3``.

Both write ``manifest.json`` next to the plan (model name, precision, profiles, TensorRT version, GPU
name, sha256 of the source ONNX) and the ``geneformer_trt`` ``config.pbtxt``.

This file only needs the standard library at import time (it runs with the NGC container's system
Python 3.10, which has ``tensorrt`` but not this project's dependencies); run it as a script:
``python3 export/tensorrt_build.py {build,trtexec-cmd,manifest,check,config} --help``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

# --- contract (docs/DESIGN.md) --------------------------------------------------------------------
TRT_MODEL_NAME = "geneformer_trt"
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask")
OUTPUT_NAMES: tuple[str, ...] = ("cell_embedding", "token_embeddings")
MAX_BATCH_SIZE = 64
DEFAULT_HIDDEN_SIZE = 256
DEFAULT_MAX_TOKENS = 2048
TOKENS_PER_OPT_BATCH = 32768
BUCKET_EDGES = (512, 1024, 2048, 4096)
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_GIB = 4.0

# --- pinned NGC release (Triton 2.51.0 == NGC 24.10 == TensorRT 10.5) ------------------------------
NGC_RELEASE = "24.10"
NGC_TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"
NGC_TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
NGC_TENSORRT_VERSION = "10.5"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ONNX = Path("model_repository/geneformer_onnx/1/model.portable.onnx")
DEFAULT_PLAN = Path(f"model_repository/{TRT_MODEL_NAME}/1/model.plan")
MANIFEST_NAME = "manifest.json"


class TensorRTUnavailableError(RuntimeError):
    """TensorRT or a CUDA GPU is missing: the message says which, and where to get it."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the same ``[batch, tokens]`` range for ``input_ids`` and ``attention_mask``."""

    min_tokens: int
    opt_tokens: int
    max_tokens: int
    opt_batch: int
    min_batch: int = 1
    max_batch: int = MAX_BATCH_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.opt_tokens <= self.max_tokens:
            raise ValueError(f"profile tokens need 1 <= min <= opt <= max, got {self}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"profile batch needs 1 <= min <= opt <= max, got {self}")

    @property
    def min_shape(self) -> tuple[int, int]:
        return (self.min_batch, self.min_tokens)

    @property
    def opt_shape(self) -> tuple[int, int]:
        return (self.opt_batch, self.opt_tokens)

    @property
    def max_shape(self) -> tuple[int, int]:
        return (self.max_batch, self.max_tokens)

    def spec(self) -> str:
        """Compact text form ``min-max/optTokensxoptBatch`` (``parse_profiles`` reads it back)."""
        return f"{self.min_tokens}-{self.max_tokens}/{self.opt_tokens}x{self.opt_batch}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out.update(min_shape=list(self.min_shape), opt_shape=list(self.opt_shape), max_shape=list(self.max_shape))
        return out


def default_profiles(
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = MAX_BATCH_SIZE,
    tokens_per_opt_batch: int = TOKENS_PER_OPT_BATCH,
) -> tuple[Profile, ...]:
    """Length buckets 1..512, 513..1024, ... up to ``max_tokens``; opt at the bucket top, ~32K tokens per opt batch."""
    edges = [edge for edge in BUCKET_EDGES if edge < max_tokens] + [max_tokens]
    profiles = []
    low = 1
    for high in edges:
        opt_batch = max(1, min(max_batch, tokens_per_opt_batch // high))
        profiles.append(Profile(low, high, high, opt_batch, 1, max_batch))
        low = high + 1
    return tuple(profiles)


DEFAULT_PROFILES: tuple[Profile, ...] = default_profiles()


def parse_profiles(text: str, max_batch: int = MAX_BATCH_SIZE) -> tuple[Profile, ...]:
    """Parse ``"1-512/512x64,513-1024/1024x32"`` (tokens min-max / opt tokens x opt batch)."""
    profiles = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            span, opt = item.split("/")
            low, high = (int(v) for v in span.split("-"))
            opt_tokens, opt_batch = (int(v) for v in opt.split("x"))
        except ValueError:
            raise ValueError(f"bad profile spec {item!r}: expected MIN-MAX/OPTTOKENSxOPTBATCH, e.g. 1-512/512x64") from None
        profiles.append(Profile(low, opt_tokens, high, opt_batch, 1, max_batch))
    if not profiles:
        raise ValueError("no optimization profile given")
    return tuple(profiles)


def format_profiles(profiles: Iterable[Profile]) -> str:
    return ",".join(p.spec() for p in profiles)


def validate_profiles(profiles: Sequence[Profile], max_batch_size: int = MAX_BATCH_SIZE) -> None:
    """Buckets must be sorted, contiguous from 1 token, and each must cover batch 1..max_batch_size."""
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    expected_low = 1
    for index, profile in enumerate(profiles):
        if profile.min_tokens != expected_low:
            raise ValueError(
                f"profile {index} starts at {profile.min_tokens} tokens, expected {expected_low}: "
                "buckets must be sorted and contiguous so every length 1..max has a profile"
            )
        if profile.min_batch != 1 or profile.max_batch != max_batch_size:
            raise ValueError(f"profile {index} must cover batch 1..{max_batch_size} (Triton max_batch_size)")
        expected_low = profile.max_tokens + 1


def preferred_batch_sizes(profiles: Sequence[Profile]) -> list[int]:
    """The dynamic batcher's preferred batch sizes: the profiles' opt batches, ascending."""
    return sorted({p.opt_batch for p in profiles})


def shape_spec(profile: Profile, which: str, input_names: Sequence[str] = INPUT_NAMES) -> str:
    """``trtexec`` shape list for one selector (``min``/``opt``/``max``): ``input_ids:64x512,attention_mask:64x512``."""
    shape = {"min": profile.min_shape, "opt": profile.opt_shape, "max": profile.max_shape}[which]
    dims = "x".join(str(d) for d in shape)
    return ",".join(f"{name}:{dims}" for name in input_names)


def _check_precision(precision: str) -> str:
    precision = precision.lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def trtexec_command(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    precision: str = DEFAULT_PRECISION,
    profiles: Sequence[Profile] = DEFAULT_PROFILES,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    input_names: Sequence[str] = INPUT_NAMES,
    trtexec: str = "trtexec",
) -> list[str]:
    """The ``trtexec`` argv equivalent to ``build_tensorrt_engine`` with the same arguments.

    One profile gives the plain ``--minShapes/--optShapes/--maxShapes`` form; several give
    ``--profile=N`` followed by that profile's three shape flags (trtexec of TensorRT 10 reads the
    shape flags that follow each ``--profile``). ``--skipInference``: building only (random INT64
    token ids would index outside the vocabulary).
    """
    precision = _check_precision(precision)
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    argv = [trtexec, f"--onnx={os.fspath(onnx_path)}"]
    for index, profile in enumerate(profiles):
        if len(profiles) > 1:
            argv.append(f"--profile={index}")
        argv += [
            f"--minShapes={shape_spec(profile, 'min', input_names)}",
            f"--optShapes={shape_spec(profile, 'opt', input_names)}",
            f"--maxShapes={shape_spec(profile, 'max', input_names)}",
        ]
    if precision == "fp16":
        argv.append("--fp16")
    elif precision == "bf16":
        argv.append("--bf16")
    argv.append(f"--memPoolSize=workspace:{int(round(workspace_gib * 1024))}")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    argv += [f"--saveEngine={os.fspath(plan_path)}", "--skipInference"]
    return argv


def trtexec_command_line(*args: Any, **kwargs: Any) -> str:
    """``trtexec_command`` as one shell-quoted line."""
    return shlex.join(trtexec_command(*args, **kwargs))


# --- environment checks ---------------------------------------------------------------------------
def _how_to_get_tensorrt() -> str:
    return (
        f"Build the plan on the serving GPU host inside the NGC container {NGC_TENSORRT_IMAGE} "
        f"(TensorRT {NGC_TENSORRT_VERSION}, the TensorRT of {NGC_TRITON_IMAGE}): "
        "`docker compose run --rm trt-build` (needs the NVIDIA driver and the NVIDIA Container Toolkit; "
        "see docs/deployment.md), or install a `tensorrt` wheel of exactly that TensorRT version on a GPU machine. "
        "The equivalent command line is printed by `python3 export/tensorrt_build.py trtexec-cmd`."
    )


def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise ``TensorRTUnavailableError`` saying how to get it."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, only present in TensorRT images
    except Exception as exc:  # ImportError, or a broken install failing to load libnvinfer
        raise TensorRTUnavailableError(
            f"the TensorRT Python package `tensorrt` is not importable here ({type(exc).__name__}: {exc}). "
            + _how_to_get_tensorrt()
        ) from exc
    return trt


def gpu_info() -> dict[str, str] | None:
    """Name, compute capability and driver of the first visible CUDA GPU, or None when none is visible."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return None
    first = (visible or "0").split(",")[0].strip()
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        for fields in ("name,compute_cap,driver_version", "name,driver_version"):
            cmd = [nvidia_smi, f"--query-gpu={fields}", "--format=csv,noheader"]
            if first.isdigit() or first.startswith("GPU-") or first.startswith("MIG-"):
                cmd.insert(1, f"--id={first}")
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):
                break
            lines = [line for line in result.stdout.splitlines() if line.strip()]
            if result.returncode == 0 and lines:
                values = [v.strip() for v in lines[0].split(",")]
                return dict(zip(fields.split(","), values))
    try:  # no nvidia-smi (or it failed): torch, when it happens to be installed
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_cap": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - torch absent or CUDA init failure: no GPU usable here
        pass
    return None


def require_cuda_gpu(trt_version: str = "") -> dict[str, str]:
    info = gpu_info()
    if info is None:
        raise TensorRTUnavailableError(
            f"no CUDA GPU is visible (nvidia-smi: {shutil.which('nvidia-smi') or 'not found'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); TensorRT "
            f"`tensorrt` {trt_version} builds engines for the GPU it runs on. " + _how_to_get_tensorrt()
        )
    return info


# --- outputs: manifest and Triton config ----------------------------------------------------------
def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_model_name(onnx_path: Path) -> str | None:
    """The Geneformer model name recorded by ``gftriton export`` next to the ONNX file, if any."""
    manifest = onnx_path.parent / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    for key in ("model_name", "model", "geneformer_model"):
        if isinstance(data.get(key), str):
            return data[key]
    return None


def write_manifest(
    plan_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    precision: str,
    profiles: Sequence[Profile],
    tensorrt_version: str,
    gpu: dict[str, str] | None,
    built_with: str,
    model_name: str | None = None,
    workspace_gib: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` next to the plan and return it."""
    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    manifest: dict[str, Any] = {
        "triton_model": TRT_MODEL_NAME,
        "model_name": model_name or _source_model_name(onnx_path),
        "format": "tensorrt_plan",
        "file": plan_path.name,
        "plan_sha256": sha256_file(plan_path) if plan_path.exists() else None,
        "precision": _check_precision(precision),
        "profiles": [p.to_dict() for p in profiles],
        "profiles_spec": format_profiles(profiles),
        "preferred_batch_sizes": preferred_batch_sizes(profiles),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "tensorrt_version": tensorrt_version,
        "gpu_name": (gpu or {}).get("name"),
        "gpu_compute_capability": (gpu or {}).get("compute_cap"),
        "driver_version": (gpu or {}).get("driver_version"),
        "source_onnx": os.fspath(onnx_path),
        "source_onnx_sha256": sha256_file(onnx_path),
        "built_with": built_with,
        "workspace_gib": workspace_gib,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update(extra or {})
    out = plan_path.parent / MANIFEST_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def render_trt_config(
    profiles: Sequence[Profile] = DEFAULT_PROFILES,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    instance_count: int = 2,
    max_queue_delay_us: int = 2000,
    name: str = TRT_MODEL_NAME,
) -> str:
    """``config.pbtxt`` of the TensorRT encoder; ``deploy/geneformer_trt/config.pbtxt`` is this for the defaults."""
    validate_profiles(profiles)
    batches = ", ".join(str(b) for b in preferred_batch_sizes(profiles))
    profile_ids = ", ".join(f'"{i}"' for i in range(len(profiles)))
    table = "\n".join(
        f"#   profile {i}: tokens {p.min_tokens}..{p.max_tokens} (opt {p.opt_tokens}), "
        f"batch {p.min_batch}..{p.max_batch} (opt {p.opt_batch})"
        for i, p in enumerate(profiles)
    )
    warm = profiles[-1]
    return f"""# Geneformer encoder, TensorRT plan (tensorrt backend). Same tensors as geneformer_onnx.
# Generated by export/tensorrt_build.py (render_trt_config); the plan itself (1/model.plan) is built
# on the serving GPU by deploy/build_trt.sh and is specific to that GPU model and TensorRT version.
# Optimization profiles in the plan (Triton picks the one whose range holds each batch's shape):
{table}
# preferred_batch_size = the profiles' opt batches. instance_group.count is per GPU: {instance_count}
# instances per visible GPU overlap host<->device copies with compute.
name: "{name}"
platform: "tensorrt_plan"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "cell_embedding" data_type: TYPE_FP32 dims: [ {hidden_size} ] }},
  {{ name: "token_embeddings" data_type: TYPE_FP32 dims: [ -1, {hidden_size} ] }}
]
instance_group [
  {{ count: {instance_count} kind: KIND_GPU profile: [ {profile_ids} ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {batches} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
optimization {{
  input_pinned_memory {{ enable: true }}
  output_pinned_memory {{ enable: true }}
}}
model_warmup [
  {{
    name: "longest_bucket_opt"
    batch_size: {warm.opt_batch}
    inputs {{ key: "input_ids" value: {{ data_type: TYPE_INT64 dims: [ {warm.opt_tokens} ] zero_data: true }} }}
    inputs {{ key: "attention_mask" value: {{ data_type: TYPE_INT64 dims: [ {warm.opt_tokens} ] zero_data: true }} }}
  }}
]
"""


def write_trt_config(
    config_path: str | os.PathLike[str],
    profiles: Sequence[Profile] = DEFAULT_PROFILES,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
) -> Path:
    path = Path(config_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_trt_config(profiles, hidden_size=hidden_size))
    return path


# --- the build ------------------------------------------------------------------------------------
def _check_onnx_compatibility(onnx_path: Path) -> list[str]:
    """Warnings about ONNX IR/opset beyond what TensorRT 10.5's parser and ORT 1.19 (Triton 24.10) read."""
    try:
        import onnx  # noqa: PLC0415 - optional in the TensorRT container
    except ImportError:
        return []
    try:
        model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - the TensorRT parser reports the real problem
        return [f"could not read {onnx_path} with onnx: {exc}"]
    warnings = []
    if model.ir_version > 10:
        warnings.append(f"ONNX IR version {model.ir_version} > 10: Triton 24.10's onnxruntime cannot load it")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > 20:
            warnings.append(f"ONNX opset {opset.version} > 20: TensorRT 10.5's ONNX parser may reject it")
    return warnings


def build_tensorrt_engine(
    onnx_path: str | os.PathLike[str] = DEFAULT_ONNX,
    plan_path: str | os.PathLike[str] = DEFAULT_PLAN,
    precision: str = DEFAULT_PRECISION,
    profiles: Sequence[Profile] = DEFAULT_PROFILES,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    *,
    config_path: str | os.PathLike[str] | None = None,
    write_config: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` with the TensorRT Python API; return the manifest written next to it.

    Raises ``FileNotFoundError`` for a missing ONNX file and ``TensorRTUnavailableError`` (naming
    what is missing: the ``tensorrt`` package or a CUDA GPU) where the build cannot run.
    """
    precision = _check_precision(precision)
    profiles = tuple(profiles)
    validate_profiles(profiles)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX encoder not found: {onnx_path} (run `gftriton export` first)")
    trt = require_tensorrt()
    gpu = require_cuda_gpu(trt.__version__)
    for warning in _check_onnx_compatibility(onnx_path):
        print(f"warning: {warning}", file=sys.stderr)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 10 networks are always explicit batch
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    if set(inputs) != set(INPUT_NAMES) or set(outputs) != set(OUTPUT_NAMES):
        raise RuntimeError(
            f"{onnx_path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
            f"the geneformer_trt contract is inputs {list(INPUT_NAMES)}, outputs {list(OUTPUT_NAMES)}"
        )
    int64 = getattr(trt, "int64", None)  # TensorRT < 10 has no INT64 I/O: the parser casts to INT32
    for name, tensor in inputs.items():
        if int64 is None or tensor.dtype != int64:  # the Triton config says TYPE_INT64
            raise RuntimeError(f"input {name} parsed as {tensor.dtype}, expected int64 (TensorRT >= 10 keeps INT64 I/O)")
    hidden_size = int(outputs["cell_embedding"].shape[-1])
    if hidden_size <= 0:
        hidden_size = DEFAULT_HIDDEN_SIZE

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            print("warning: this GPU has no fast FP16; building FP16 anyway", file=sys.stderr)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise RuntimeError(f"TensorRT {trt.__version__} has no BF16 builder flag (needs TensorRT >= 9)")
        config.set_flag(trt.BuilderFlag.BF16)
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name in INPUT_NAMES:  # both inputs share the [batch, tokens] range
            optimization_profile.set_shape(name, profile.min_shape, profile.opt_shape, profile.max_shape)
        config.add_optimization_profile(optimization_profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT build_serialized_network failed (see the TensorRT log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(memoryview(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))

    manifest = write_manifest(
        plan_path, onnx_path, precision, profiles, trt.__version__, gpu, "tensorrt-python-api",
        model_name=model_name, workspace_gib=workspace_gib,
    )
    if write_config:
        write_trt_config(config_path or plan_path.parent.parent / "config.pbtxt", profiles, hidden_size)
    return manifest


def detect_tensorrt_version() -> str:
    """TensorRT version from the Python package, else the NGC image's environment, else ``unknown``."""
    try:
        import tensorrt as trt  # noqa: PLC0415

        return str(trt.__version__)
    except Exception:  # noqa: BLE001
        pass
    for key in ("TRT_VERSION", "TENSORRT_VERSION"):
        if os.environ.get(key):
            return os.environ[key]
    return "unknown"


def plan_is_current(
    plan_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str], precision: str, profiles: Sequence[Profile]
) -> tuple[bool, str]:
    """Whether the plan and its manifest match this ONNX file, precision, profiles, TensorRT and GPU."""
    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    manifest_path = plan_path.parent / MANIFEST_NAME
    if not plan_path.is_file() or not manifest_path.is_file():
        return False, "no plan/manifest yet"
    manifest = json.loads(manifest_path.read_text())
    checks = {
        "source_onnx_sha256": sha256_file(onnx_path),
        "precision": _check_precision(precision),
        "profiles_spec": format_profiles(profiles),
        "plan_sha256": sha256_file(plan_path),
    }
    version = detect_tensorrt_version()
    if version != "unknown":
        checks["tensorrt_version"] = version
    gpu = gpu_info()
    if gpu is not None:
        checks["gpu_name"] = gpu.get("name")
    for key, value in checks.items():
        if manifest.get(key) != value:
            return False, f"{key} changed: {manifest.get(key)!r} -> {value!r}"
    return True, "plan is up to date"


# --- command line ---------------------------------------------------------------------------------
def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="source ONNX encoder")
    parser.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="engine to write")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument(
        "--profiles", default=format_profiles(DEFAULT_PROFILES),
        help="MIN-MAX/OPTTOKENSxOPTBATCH,... (default: %(default)s)",
    )
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (loaded and saved)")
    parser.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the plan with the TensorRT Python API (+ manifest, config)")
    _add_common(build)
    build.add_argument("--config", type=Path, default=None, help="geneformer_trt config.pbtxt to write")
    build.add_argument("--no-config", action="store_true")
    build.add_argument("--model-name", default=None)
    cmd = sub.add_parser("trtexec-cmd", help="print the equivalent trtexec command line")
    _add_common(cmd)
    cmd.add_argument("--trtexec", default="trtexec")
    manifest = sub.add_parser("manifest", help="write manifest.json after a trtexec build")
    _add_common(manifest)
    manifest.add_argument("--built-with", default="trtexec")
    manifest.add_argument("--tensorrt-version", default=None)
    manifest.add_argument("--model-name", default=None)
    check = sub.add_parser("check", help="exit 0 when the plan matches ONNX, precision, profiles, TensorRT, GPU")
    _add_common(check)
    config = sub.add_parser("config", help="write the geneformer_trt config.pbtxt")
    config.add_argument("--out", type=Path, required=True)
    config.add_argument("--profiles", default=format_profiles(DEFAULT_PROFILES))
    config.add_argument("--max-batch", type=int, default=MAX_BATCH_SIZE)
    config.add_argument("--hidden-size", type=int, default=DEFAULT_HIDDEN_SIZE)
    args = parser.parse_args(argv)
    profiles = parse_profiles(args.profiles, args.max_batch)

    try:
        if args.command == "build":
            result = build_tensorrt_engine(
                args.onnx, args.plan, args.precision, profiles, args.timing_cache, args.workspace_gib,
                config_path=args.config, write_config=not args.no_config, model_name=args.model_name,
            )
            print(json.dumps(result, indent=2))
        elif args.command == "trtexec-cmd":
            print(trtexec_command_line(
                args.onnx, args.plan, args.precision, profiles, args.timing_cache, args.workspace_gib,
                trtexec=args.trtexec,
            ))
        elif args.command == "manifest":
            result = write_manifest(
                args.plan, args.onnx, args.precision, profiles,
                args.tensorrt_version or detect_tensorrt_version(), gpu_info(), args.built_with,
                model_name=args.model_name, workspace_gib=args.workspace_gib,
            )
            print(json.dumps(result, indent=2))
        elif args.command == "check":
            current, reason = plan_is_current(args.plan, args.onnx, args.precision, profiles)
            print(reason)
            return 0 if current else 1
        elif args.command == "config":
            print(write_trt_config(args.out, profiles, args.hidden_size))
    except (TensorRTUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
