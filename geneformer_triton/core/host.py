"""What this host's CPU is and which reduced-precision instruction sets it has (stdlib only).

The fastest served precision depends on them: with AMX-BF16 tiles (Intel Sapphire Rapids and later) bf16
TorchScript runs ~2x the int8 ONNX encoder; with AVX512-BF16 but no AMX (e.g. AMD Zen 4) int8 ONNX is
faster (bench/results/2026-12-02-vm vs 2026-12-01-vm). Read from ``/proc/cpuinfo`` (Linux); elsewhere the
name falls back to ``platform.processor()`` and the feature list is empty.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

from geneformer_triton.core.contract import ENCODER_VARIANTS

CPUINFO = Path("/proc/cpuinfo")
#: instruction sets (``/proc/cpuinfo`` flag names) that decide which reduced-precision paths run natively
PRECISION_FEATURES = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


def _first_field(name: str, cpuinfo: Path) -> str | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return None


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (``model name`` of ``cpuinfo``; else ``platform.processor()``)."""
    return _first_field("model name", cpuinfo) or platform.processor()


def cpu_features(cpuinfo: Path = CPUINFO) -> list[str]:
    """The :data:`PRECISION_FEATURES` the CPU reports, in that order (empty where ``cpuinfo`` is unreadable)."""
    flags = set((_first_field("flags", cpuinfo) or "").split())
    return [feature for feature in PRECISION_FEATURES if feature in flags]


def default_embed_model(features: Sequence[str]) -> str:
    """The embedding ensemble to serve by default (the demo's): the fastest served path that holds its fidelity
    gate on a CPU with ``features`` (:func:`cpu_features`), from `make bench-full` through Triton on the same cells,
    encoders at concurrency 2 over gRPC, bf16 TorchScript vs int8 ONNX: 17.95 vs 9.37 cells/s with AMX-BF16 tiles
    (bench/results/2026-12-02-vm, Intel Xeon), 6.03 vs 7.33 with AVX512-BF16 but no AMX (bench/results/2026-12-01-vm,
    AMD EPYC). The ensembles put the same tokenizer step before either encoder."""
    variant = "torchscript_bf16" if "amx_bf16" in features else "onnx_int8"
    return ENCODER_VARIANTS[variant].ensemble


__all__ = ["CPUINFO", "PRECISION_FEATURES", "cpu_features", "cpu_name", "default_embed_model"]
