"""ISP encoder graphs that reduce token embeddings where the encoder runs (ONNX).

The in-silico perturbation (ISP) scores of upstream Geneformer (``geneformer_triton/core/isp_upstream.py``)
need, per perturbed sequence, the cosine of every compared gene's embedding with the same gene's
embedding in the original cell, and the means over all tokens of both sequences. A plain encoder ships
``token_embeddings`` [rows, length, hidden] (32 MB per 16 x 2,048-token batch) to the ISP model, which
reduces them on the host. The graph exported here takes the packed batch of
:class:`geneformer_triton.core.perturbation.PackedBatch` and returns only the reduced values:

inputs
    ``input_ids``, ``attention_mask`` INT64 [B, L]; ``original_offset`` INT64 [B, 1] (rows back from each
    row to its original in the same batch, 0 for an original row); ``position_map`` INT64 [B, L] (for each
    token, the position of the same gene in the row's original, -1 = not compared).
outputs
    ``token_mean`` FP32 [B, H] (mean over each row's tokens at the encoder's layer); ``gene_cos`` FP32
    [B, L] (cos(token, the aligned original token), den = max(|a| |b|, 1e-8); 0 where the map is -1).

Relative offsets keep a batch valid when a batcher concatenates several requests. Numbers: the same
reduction as :func:`geneformer_triton.core.perturbation.reduce_token_rows`, in float32 inside the graph
(measured against it in ``tests/test_isp_reduction.py``). There is no TorchScript ISP encoder in
``geneformer_triton.core.contract.EXPORTED_VARIANTS`` yet, so only ONNX is exported.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from geneformer_triton.export.onnx_export import OPSET, optimize_for_onnxruntime, quantize_onnx_int8
from geneformer_triton.model.encoder import GeneformerEncoder

LOGGER = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask", "original_offset", "position_map"]
OUTPUT_NAMES = ["token_mean", "gene_cos"]
DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "original_offset": {0: "batch"},
    "position_map": {0: "batch", 1: "sequence"},
    "token_mean": {0: "batch"},
    "gene_cos": {0: "batch", 1: "sequence"},
}
EPS = 1e-8


class IspReductionEncoder(nn.Module):
    """``encoder`` followed by the ISP reduction (see the module docstring for tensors and shapes)."""

    def __init__(self, encoder: GeneformerEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, original_offset: torch.Tensor,
                position_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, tokens = self.encoder(input_ids, attention_mask)  # [B, L, H] float32
        batch, length, hidden = tokens.shape
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)
        token_mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        offset = original_offset.reshape(-1)
        rows = torch.cumsum(torch.ones_like(offset), dim=0) - 1 - offset  # each row's original, [B]
        flat = (rows.unsqueeze(1) * length + position_map.clamp(min=0)).reshape(-1)  # [B * L]
        flat_tokens = tokens.reshape(-1, hidden)
        aligned = flat_tokens.index_select(0, flat).reshape(batch, length, hidden)
        norms = torch.sqrt((tokens * tokens).sum(dim=-1))  # [B, L]
        aligned_norms = norms.reshape(-1).index_select(0, flat).reshape(batch, length)
        cos = (tokens * aligned).sum(dim=-1) / (norms * aligned_norms).clamp(min=EPS)
        gene_cos = torch.where(position_map >= 0, cos, torch.zeros_like(cos))
        return token_mean, gene_cos


def example_inputs(vocab_size: int, length: int = 48) -> tuple[torch.Tensor, ...]:
    """Three rows: an original, a deletion of its gene 3 and a move of its gene 5 to the front."""
    generator = torch.Generator().manual_seed(0)
    original = torch.randperm(vocab_size - 2, generator=generator)[:length] + 2
    deleted = torch.cat([original[:3], original[4:], original[:1]])
    moved = torch.cat([original[5:6], original[:5], original[6:]])
    input_ids = torch.stack([original, deleted, moved])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -1] = 0
    position_map = torch.full_like(input_ids, -1)
    position_map[1, : length - 1] = torch.cat([torch.arange(3), torch.arange(4, length)])
    position_map[2, 1:] = torch.cat([torch.arange(5), torch.arange(6, length)])
    original_offset = torch.tensor([[0], [1], [2]])
    return input_ids, attention_mask, original_offset, position_map


def export_isp_reduction_onnx(encoder: GeneformerEncoder, version_dir: str | Path, precision: str = "fp32",
                              opset: int = OPSET) -> Path:
    """Write ``model.onnx`` (fused by onnxruntime's optimizer; ``int8``: dynamically quantized) into a Triton
    version folder; ``encoder`` must be fp32 with ``attention="math"``. Returns the path."""
    if encoder.attention != "math":
        raise ValueError("export an encoder built with attention='math' (the graph onnxruntime fuses)")
    if precision not in ("fp32", "int8"):
        raise ValueError(f"ISP reduction encoders are exported in fp32 or int8, not {precision!r}")
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    module = IspReductionEncoder(encoder).eval()
    vocab_size = encoder.embeddings.word_embeddings.num_embeddings
    with tempfile.TemporaryDirectory(dir=version_dir) as tmp:
        portable = Path(tmp) / "model.portable.onnx"
        with torch.no_grad():
            torch.onnx.export(module, example_inputs(vocab_size), str(portable), input_names=INPUT_NAMES,
                              output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES, opset_version=opset, dynamo=False)
        onnx.checker.check_model(str(portable), full_check=True)
        fused = Path(tmp) / "model.fused.onnx" if precision == "int8" else target
        optimize_for_onnxruntime(portable, fused, encoder.num_heads, encoder.hidden_size, "fp32")
        if precision == "int8":
            target.unlink(missing_ok=True)
            quantize_onnx_int8(fused, target)
    LOGGER.info("wrote ISP reduction encoder (%s) to %s", precision, target)
    return target


def run_isp_reduction(session, input_ids: np.ndarray, attention_mask: np.ndarray, original_offset: np.ndarray,
                      position_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an onnxruntime session of this graph: (token_mean [B, H], gene_cos [B, L]) float32."""
    feeds = dict(zip(INPUT_NAMES, (input_ids, attention_mask, original_offset, position_map)))
    token_mean, gene_cos = session.run(OUTPUT_NAMES, feeds)
    return token_mean, gene_cos
