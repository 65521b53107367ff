"""Host CPU facts (geneformer_triton.core.host) and the demo's default served path that depends on them."""

from __future__ import annotations

from geneformer_triton.core.host import cpu_features, cpu_name, default_embed_model

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16
"""


def test_cpu_features_and_name_from_cpuinfo(tmp_path):
    intel, amd = tmp_path / "intel", tmp_path / "amd"
    intel.write_text(SAPPHIRE_RAPIDS)
    amd.write_text(ZEN4)
    assert cpu_features(intel) == ["avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16"]
    assert cpu_features(amd) == ["avx512_vnni", "avx512_bf16"]
    assert cpu_name(amd) == "AMD EPYC 9R14"
    assert cpu_features(tmp_path / "missing") == []  # not Linux: nothing claimed
    assert isinstance(cpu_name(tmp_path / "missing"), str)


def test_the_demo_serves_bf16_only_where_amx_runs_it(tmp_path):
    """bf16 TorchScript is the fastest gated path only with AMX tiles; AVX512-BF16 alone is slower than int8 ONNX."""
    intel, amd = tmp_path / "intel", tmp_path / "amd"
    intel.write_text(SAPPHIRE_RAPIDS)
    amd.write_text(ZEN4)
    assert default_embed_model(cpu_features(intel)) == "geneformer_embed_torchscript_bf16"
    assert default_embed_model(cpu_features(amd)) == "geneformer_embed_onnx_int8"
    assert default_embed_model([]) == "geneformer_embed_onnx_int8"
