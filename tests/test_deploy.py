"""Deployment artefacts: docker-compose.yml, per-host and TensorRT Triton configs, the TensorRT builder.

No Docker, GPU or TensorRT needed: the compose file is checked as data, configs against Triton's own
ModelConfig protobuf, and the trtexec command line against a real (tiny) ONNX export of the encoder.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from geneformer_triton.core.contract import DEFAULT_SHAPE, SERVED_MODELS
from geneformer_triton.export import tensorrt_build as tb
from geneformer_triton.export.model_configs import trt_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
GPU_SERVICES = ("trt-build", "tritonserver")
# Triton release <-> NGC container release (Triton release notes: 24.10 ships Triton 2.51.0, TensorRT 10.5)
NGC_RELEASE_OF_TRITON = {"2.51.0": "24.10"}
ENCODERS = ("geneformer_onnx", "geneformer_onnx_fp16", "geneformer_torchscript")
PER_HOST_MODELS = (*ENCODERS, "geneformer_tokenizer", "geneformer_isp")


# --- helpers --------------------------------------------------------------------------------------
def load_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def io_signature(config: mc.ModelConfig) -> tuple:
    def tensors(items):
        return [(t.name, t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in items]

    return tensors(config.input), tensors(config.output)


def parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def load_list_problems(command: list[str]) -> list[str]:
    """How a tritonserver command's --load-model list differs from the contract's SERVED_MODELS."""
    loaded = [c.split("=", 1)[1].split()[0] for c in command if c.startswith("--load-model=")]
    problems = [f"duplicate {m}" for m in sorted({m for m in loaded if loaded.count(m) > 1})]
    problems += [f"missing {m}" for m in SERVED_MODELS if m not in loaded]
    problems += [f"not in the contract: {m}" for m in loaded if m not in SERVED_MODELS]
    return problems


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def tiny_encoder_onnx(tmp_path_factory) -> Path:
    """The real GeneformerEncoder around a tiny random BertModel, exported to ONNX with the contract's names."""
    import torch
    import transformers

    from geneformer_triton.model.encoder import GeneformerEncoder

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128, hidden_act="relu",
    )
    torch.manual_seed(0)
    encoder = GeneformerEncoder(transformers.BertModel(config, add_pooling_layer=False), attention="math").eval()
    ids = torch.randint(2, 64, (2, 8))
    mask = torch.ones_like(ids)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
               "cell_embedding": {0: "batch"}, "token_embeddings": {0: "batch", 1: "tokens"}}
    with warnings.catch_warnings():  # legacy (TorchScript) exporter: deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (ids, mask), str(path), input_names=list(tb.INPUT_NAMES), output_names=list(tb.OUTPUT_NAMES),
            dynamic_axes=dynamic, opset_version=17, dynamo=False,
        )
    return path


# --- docker-compose.yml ---------------------------------------------------------------------------
def test_compose_parses_and_has_the_services(compose):
    assert {"export", "trt-build", "tritonserver", "sdk"} <= set(compose["services"])


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"service {name} has no explicit image (tag) name"
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and "${" not in image, f"service {name}: image {image!r} is not pinned"
    dockerfile = (ROOT / compose["services"]["tritonserver"]["build"]["dockerfile"]).read_text()
    for ref in re.findall(r"^(?:ARG \w+=|FROM )(\S+)", dockerfile, flags=re.M):
        if not ref.startswith("$"):
            assert re.search(r":[\w.-]+$", ref) and not ref.endswith(":latest"), f"unpinned base {ref}"


def test_ngc_images_match_the_triton_client_release(compose):
    release = NGC_RELEASE_OF_TRITON[importlib.metadata.version("tritonclient")]
    services = compose["services"]
    assert services["sdk"]["image"] == f"nvcr.io/nvidia/tritonserver:{release}-py3-sdk"
    assert services["trt-build"]["image"] == f"nvcr.io/nvidia/tensorrt:{release}-py3"
    dockerfile = (ROOT / services["tritonserver"]["build"]["dockerfile"]).read_text()
    assert f"nvcr.io/nvidia/tritonserver:{release}-py3" in dockerfile
    assert tb.NGC_RELEASE == release
    assert release in services["tritonserver"]["image"]


def test_host_paths_exist(compose):
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"service {name} mounts missing host path {source}"
            else:
                assert source in named, f"service {name} uses undeclared named volume {source}"
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir()
            assert (context / build["dockerfile"]).is_file()
    # files the commands and the server image use
    for path in ("deploy/build_trt.sh", "requirements.txt", "pyproject.toml", "geneformer_triton",
                 "deploy/Dockerfile.tritonserver.dockerignore", "export/tensorrt_build.py",
                 "deploy/geneformer_trt/config.pbtxt", "deploy/geneformer_embed_trt/config.pbtxt"):
        assert (ROOT / path).exists(), path
    assert "deploy/build_trt.sh" in " ".join(compose["services"]["trt-build"]["command"])


def test_gpu_reservations(compose):
    for name in GPU_SERVICES:
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
    for name in ("export", "sdk"):
        assert "deploy" not in compose["services"][name]


def test_tritonserver_service(compose):
    services = compose["services"]
    server = services["tritonserver"]
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert server["depends_on"]["trt-build"]["condition"] == "service_completed_successfully"
    assert services["trt-build"]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    ports = server["ports"]
    assert {p.rsplit(":", 1)[1] for p in ports} == {"8000", "8001", "8002"}
    assert all(p.startswith("${TRITON_BIND_ADDRESS:-127.0.0.1}:") for p in ports), ports
    assert "./model_repository:/models:ro" in server["volumes"]
    command = server["command"]
    assert "--model-control-mode=explicit" in command
    assert "--model-config-name=gpu" in command
    assert any(c.startswith("--http-restricted-api=model-repository") for c in command)
    assert any(c.startswith("--grpc-restricted-protocol=model-repository") for c in command)
    assert load_list_problems(command) == []
    assert load_list_problems([c for c in command if c != "--load-model=geneformer_onnx_isp"]), "negative control"
    assert load_list_problems([*command, "--load-model=geneformer_onnx"]), "negative control: a duplicate"
    loaded = [c.split("=", 1)[1] for c in command if c.startswith("--load-model=")]
    for model in loaded:
        assert (ROOT / "model_repository" / model / "config.pbtxt").is_file() or (
            ROOT / "deploy" / model / "config.pbtxt"
        ).is_file(), f"--load-model={model} has no config"
    assert "/v2/health/ready" in " ".join(server["healthcheck"]["test"])
    sdk = " ".join(services["sdk"]["command"])
    assert "tritonserver:8001" in sdk and "-i grpc" in sdk and "bench/data/perf_input.json" in sdk
    assert services["sdk"]["depends_on"]["tritonserver"]["condition"] == "service_healthy"


def test_build_script_syntax():
    subprocess.run(["bash", "-n", str(ROOT / "deploy/build_trt.sh")], check=True)


# --- Triton configs -------------------------------------------------------------------------------
def per_host_configs() -> list[Path]:
    return sorted(ROOT.glob("model_repository/*/configs/*.pbtxt"))


def test_every_model_has_gpu_and_cpu_configs():
    for model in PER_HOST_MODELS:
        for host in ("gpu", "cpu"):
            assert (ROOT / "model_repository" / model / "configs" / f"{host}.pbtxt").is_file(), (model, host)


@pytest.mark.parametrize("path", per_host_configs(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_per_host_config_matches_default(path):
    config = load_config(path)
    default = load_config(path.parent.parent / "config.pbtxt")
    assert config.name == default.name == path.parent.parent.name
    assert (config.platform, config.backend, config.max_batch_size) == (
        default.platform, default.backend, default.max_batch_size)
    assert io_signature(config) == io_signature(default)
    for key, value in parameters(default).items():  # a per-host file may add tuning keys, never drop one
        assert parameters(config).get(key) == value, f"{path}: parameter {key}"
    assert config.HasField("dynamic_batching") == default.HasField("dynamic_batching")
    kinds = {group.kind for group in config.instance_group}
    host = path.stem
    if config.backend == "python" or host == "cpu":  # python-backend models (tokenizer, ISP) stay on CPU
        assert kinds == {mc.ModelInstanceGroup.KIND_CPU}
    else:
        assert kinds == {mc.ModelInstanceGroup.KIND_GPU}
        assert config.optimization.input_pinned_memory.enable and config.optimization.output_pinned_memory.enable
        assert list(config.dynamic_batching.preferred_batch_size) == tb.preferred_batch_sizes(tb.DEFAULT_PROFILES)
    assert all(b <= config.max_batch_size for b in config.dynamic_batching.preferred_batch_size)


def test_onnx_gpu_configs_use_the_tensorrt_accelerator():
    expected = {"geneformer_onnx": "FP32", "geneformer_onnx_fp16": "FP16"}
    for model, precision in expected.items():
        config = load_config(ROOT / "model_repository" / model / "configs" / "gpu.pbtxt")
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt"
        assert accelerator.parameters["precision_mode"] == precision
        assert int(accelerator.parameters["max_workspace_size_bytes"]) > 0
        assert accelerator.parameters["trt_engine_cache_enable"] == "1"
        names = {item.split(":")[0] for item in accelerator.parameters["trt_profile_max_shapes"].split(",")}
        assert names == set(tb.INPUT_NAMES)
    for model in expected:
        cpu = parameters(load_config(ROOT / "model_repository" / model / "configs" / "cpu.pbtxt"))
        assert {"intra_op_thread_count", "inter_op_thread_count"} <= set(cpu)


def test_trt_config_matches_onnx_encoder_and_profiles():
    path = ROOT / "deploy" / "geneformer_trt" / "config.pbtxt"
    assert path.read_text() == trt_config(DEFAULT_SHAPE).text(), "regenerate: python -m geneformer_triton.export.model_configs --write"
    config = load_config(path)
    onnx_default = load_config(ROOT / "model_repository" / "geneformer_onnx" / "config.pbtxt")
    assert config.name == tb.TRT_MODEL_NAME and config.platform == "tensorrt_plan"
    assert config.max_batch_size == onnx_default.max_batch_size == tb.MAX_BATCH_SIZE
    assert io_signature(config) == io_signature(onnx_default)
    assert [t.name for t in config.input] == list(tb.INPUT_NAMES)
    assert [t.name for t in config.output] == list(tb.OUTPUT_NAMES)
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(group.profile) == [str(i) for i in range(len(tb.DEFAULT_PROFILES))]
    opt_batches = sorted({p.opt_batch for p in tb.DEFAULT_PROFILES})
    assert list(config.dynamic_batching.preferred_batch_size) == opt_batches == [16, 32, 64]
    (warmup,) = config.model_warmup
    assert set(warmup.inputs) == set(tb.INPUT_NAMES)


def test_trt_ensemble_matches_onnx_ensemble():
    config = load_config(ROOT / "deploy" / "geneformer_embed_trt" / "config.pbtxt")
    onnx_ensemble = load_config(ROOT / "model_repository" / "geneformer_embed_onnx" / "config.pbtxt")
    assert config.name == "geneformer_embed_trt" and config.platform == "ensemble"
    assert io_signature(config) == io_signature(onnx_ensemble)
    steps = list(config.ensemble_scheduling.step)
    reference = list(onnx_ensemble.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == ["geneformer_tokenizer", tb.TRT_MODEL_NAME]
    for step, ref in zip(steps, reference):
        assert dict(step.input_map) == dict(ref.input_map) and dict(step.output_map) == dict(ref.output_map)


# --- TensorRT builder -----------------------------------------------------------------------------
def test_default_profiles_cover_every_length():
    profiles = tb.DEFAULT_PROFILES
    tb.validate_profiles(profiles)
    assert [(p.min_tokens, p.max_tokens) for p in profiles] == [(1, 512), (513, 1024), (1025, 2048)]
    assert all(p.min_batch == 1 and p.max_batch == 64 for p in profiles)
    assert tb.parse_profiles(tb.format_profiles(profiles)) == profiles
    assert [p.max_tokens for p in tb.default_profiles(4096)] == [512, 1024, 2048, 4096]
    with pytest.raises(ValueError):
        tb.validate_profiles(tb.parse_profiles("1-512/512x64,600-2048/2048x16"))
    with pytest.raises(ValueError):
        tb.parse_profiles("1-512/1024x64")  # opt outside [min, max]


def test_trtexec_command_names_the_onnx_inputs(tiny_encoder_onnx, tmp_path):
    import onnx

    model = onnx.load(str(tiny_encoder_onnx))
    input_names = [i.name for i in model.graph.input]
    assert input_names == list(tb.INPUT_NAMES)
    for graph_input in model.graph.input:  # [batch, tokens], both dynamic, INT64
        dims = graph_input.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param for d in dims)
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64

    plan, cache = tmp_path / "model.plan", tmp_path / "timing.cache"
    line = tb.trtexec_command_line(tiny_encoder_onnx, plan, "fp16", tb.DEFAULT_PROFILES, cache, 4)
    argv = shlex.split(line)
    assert argv[0] == "trtexec"
    assert f"--onnx={tiny_encoder_onnx}" in argv and f"--saveEngine={plan}" in argv
    assert f"--timingCacheFile={cache}" in argv and "--fp16" in argv and "--memPoolSize=workspace:4096" in argv

    # --profile=N is followed by that profile's min/opt/max shapes, naming exactly the ONNX inputs
    profile_at = [i for i, a in enumerate(argv) if a.startswith("--profile=")]
    assert [argv[i] for i in profile_at] == [f"--profile={i}" for i in range(len(tb.DEFAULT_PROFILES))]
    for index, start in enumerate(profile_at):
        profile = tb.DEFAULT_PROFILES[index]
        flags = argv[start + 1:start + 4]
        expected = {"--minShapes": profile.min_shape, "--optShapes": profile.opt_shape, "--maxShapes": profile.max_shape}
        assert [f.split("=")[0] for f in flags] == list(expected)
        for flag in flags:
            key, spec = flag.split("=", 1)
            shapes = dict(item.split(":") for item in spec.split(","))
            assert list(shapes) == input_names
            assert set(shapes.values()) == {"x".join(map(str, expected[key]))}

    single = tb.trtexec_command(tiny_encoder_onnx, plan, "fp32", tb.DEFAULT_PROFILES[:1])
    assert not any(a.startswith("--profile") for a in single) and "--fp16" not in single
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in single
    assert "--bf16" in tb.trtexec_command(tiny_encoder_onnx, plan, "bf16")


def test_build_without_tensorrt_says_what_is_missing(tiny_encoder_onnx, tmp_path):
    try:
        import tensorrt  # noqa: F401

        if tb.gpu_info() is not None:
            pytest.skip("TensorRT and a GPU are present: the build would run")
    except ImportError:
        pass
    with pytest.raises(tb.TensorRTUnavailableError, match="`tensorrt`") as info:
        tb.build_tensorrt_engine(tiny_encoder_onnx, tmp_path / "model.plan", "fp16", tb.DEFAULT_PROFILES, None, 1)
    assert tb.NGC_TENSORRT_IMAGE in str(info.value)
    assert not (tmp_path / "model.plan").exists()
    with pytest.raises(FileNotFoundError):
        tb.build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "model.plan")


def test_manifest_and_up_to_date_check(tiny_encoder_onnx, tmp_path):
    plan = tmp_path / "geneformer_trt" / "1" / "model.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"not a real engine")
    manifest = tb.write_manifest(plan, tiny_encoder_onnx, "fp16", tb.DEFAULT_PROFILES, "10.5.0", None, "test",
                                 model_name="gf-6L-10M-i2048")
    on_disk = json.loads((plan.parent / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["source_onnx_sha256"] == tb.sha256_file(tiny_encoder_onnx)
    assert on_disk["precision"] == "fp16" and on_disk["model_name"] == "gf-6L-10M-i2048"
    assert [p["opt_shape"] for p in on_disk["profiles"]] == [[64, 512], [32, 1024], [16, 2048]]
    assert {"tensorrt_version", "gpu_name"} <= set(on_disk)
    current, _ = tb.plan_is_current(plan, tiny_encoder_onnx, "fp16", tb.DEFAULT_PROFILES)
    if tb.detect_tensorrt_version() in ("unknown", "10.5.0") and tb.gpu_info() is None:
        assert current
    assert not tb.plan_is_current(plan, tiny_encoder_onnx, "bf16", tb.DEFAULT_PROFILES)[0]


def test_served_python_parses_as_python_310():
    """The NGC 24.10 images run Python 3.10: the builder script and the package the server imports."""
    files = [ROOT / "export" / "tensorrt_build.py", *sorted((ROOT / "geneformer_triton").rglob("*.py")),
             *sorted(ROOT.glob("model_repository/*/1/model.py"))]
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
