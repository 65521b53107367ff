"""Packed (padding-free) ONNX encoder for Triton's ragged batching.

Triton's dynamic batcher can merge requests of *different* lengths only into a model whose variable-size
inputs are ragged (``allow_ragged_batch``): the backend then hands the model every request's elements
concatenated into one flat tensor. This module exports such a model:

inputs
  ``input_ids`` int64 [N] and ``attention_mask`` int64 [N]: the rows of every request of the batch,
  flattened and concatenated (N = sum over requests of batch size x row width; a request of several cells
  is right-padded to its longest cell, one cell per request carries no padding at all);
  ``item_width`` int32 [C, 1]: each row's width, Triton's ``batch_input`` ``BATCH_ITEM_SHAPE`` of
  ``input_ids`` (C = number of cells in the batch, over all requests).
output
  ``cell_embedding`` float32 [C, H]: mean over each cell's own tokens (``attention_mask`` 1, the model's
  excluded ids left out), like ``geneformer_triton.model.encoder.GeneformerEncoder``.

Inside the graph the pad elements are dropped first (NonZero + Gather): the embeddings, the Q/K/V and
output projections, the feed-forward layers and the LayerNorms run on the T real tokens only. Attention is
block-diagonal: an ONNX ``Loop`` over the cells (:func:`block_attention`, scripted) computes one
[heads, L_i, L_i] score block per cell, so no token attends to another cell's tokens and nothing is
computed for padding: executed FLOPs = useful FLOPs (``geneformer_triton.bench.cells.Architecture`` counts them). Same
weights and arithmetic as the padded encoder: fp32 outputs agree with it to float rounding.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List

import numpy as np
import onnx
import torch
from torch import nn

from geneformer_triton.core.contract import PACKED_ITEM_WIDTH, PLAIN_TENSORS
from geneformer_triton.export.onnx_export import OPSET
from geneformer_triton.model.encoder import _ACTIVATIONS, GeneformerEncoder

LOGGER = logging.getLogger(__name__)

INPUT_NAMES = [*PLAIN_TENSORS.inputs, PACKED_ITEM_WIDTH]
OUTPUT_NAMES = [PLAIN_TENSORS.cell_embedding]
DYNAMIC_AXES = {"input_ids": {0: "elements"}, "attention_mask": {0: "elements"}, "item_width": {0: "cells"},
                "cell_embedding": {0: "cells"}}


@torch.jit.script
def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each cell's tokens to its own tokens only: q, k, v [T, heads, head_dim] with the cells'
    tokens contiguous, ``ends`` [C] int64 the cumulative lengths -> context [T, heads, head_dim].

    Scripted, so the ONNX export keeps the loop over cells (an ONNX ``Loop``): one [heads, L_i, L_i] score
    block per cell, nothing computed across cells or for padding."""
    parts: List[torch.Tensor] = []
    start = torch.zeros_like(ends[0])
    for i in range(ends.size(0)):
        stop = ends[i]
        qs = q[start:stop].transpose(0, 1)
        ks = k[start:stop].transpose(0, 1)
        vs = v[start:stop].transpose(0, 1)
        probs = torch.softmax(torch.matmul(qs, ks.transpose(1, 2)) * scale, dim=-1)
        parts.append(torch.matmul(probs, vs).transpose(0, 1))
        start = stop
    return torch.cat(parts, 0)


class PackedEncoder(nn.Module):
    """forward(input_ids [N] int64, attention_mask [N] int64, item_width [C, 1] int32) -> cell_embedding [C, H].

    Wraps (shares the weights of) a mean-pooling :class:`GeneformerEncoder`; see the module docstring.
    """

    def __init__(self, encoder: GeneformerEncoder) -> None:
        super().__init__()
        if encoder.pooling != "mean":
            raise ValueError("the packed encoder implements mean pooling only (export pooling='mean')")
        self.encoder = encoder

    def _attend(self, layer: nn.Module, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Block-diagonal self-attention of one layer: tokens [1, T, H] -> context [1, T, H]."""
        enc = self.encoder
        attn = layer.attention.self
        total = x.shape[1]
        q, k, v = (proj(x).view(total, enc.num_heads, enc.head_dim) for proj in (attn.query, attn.key, attn.value))
        return block_attention(q, k, v, ends, 1.0 / math.sqrt(enc.head_dim)).reshape(1, total, enc.hidden_size)

    @staticmethod
    def _tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, item_width: torch.Tensor):
        """Real tokens of the flat batch, cell after cell: (ids [T], position [T], cell [T], lengths [C])."""
        widths = item_width[:, 0].long()
        ends = torch.cumsum(widths, 0)
        element = torch.cumsum(torch.ones_like(input_ids), 0) - 1  # 0..N-1, follows the input's device
        row = (element.unsqueeze(1) >= ends.unsqueeze(0)).sum(1)  # [N] cell of each element
        position = element - (ends - widths)[row]  # index within the cell's row (= the padded encoder's)
        keep = torch.nonzero(attention_mask != 0).squeeze(1)
        cell = row[keep]
        lengths = (cell.unsqueeze(0) == torch.arange(widths.shape[0], device=cell.device).unsqueeze(1)).sum(1)
        return input_ids[keep], position[keep], cell, lengths

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_width: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        ids, position, cell, lengths = self._tokens(input_ids, attention_mask, item_width)
        emb = enc.embeddings
        # tokens as one [1, T, H] sequence: the Linear layers export as MatMul (+ Add), which onnxruntime's
        # dynamic quantization turns into int8 MatMuls (it leaves Gemm, the 2-D export, in fp32)
        x = emb.word_embeddings(ids.unsqueeze(0)) + emb.position_embeddings(position.unsqueeze(0))
        x = x + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        ends = torch.cumsum(lengths, 0)
        act = _ACTIVATIONS[enc.activation_name]
        for layer in enc.layers:
            out = layer.attention.output
            x = out.LayerNorm(out.dense(self._attend(layer, x, ends)) + x)
            x = layer.output.LayerNorm(layer.output.dense(act(layer.intermediate.dense(x))) + x)
        tokens = x[0].float()
        weight = torch.ones_like(ids, dtype=tokens.dtype)
        if enc.excluded_token_ids.numel() > 0:
            weight = (~torch.isin(ids, enc.excluded_token_ids)).to(tokens.dtype)
        member = (cell.unsqueeze(0) == torch.arange(lengths.shape[0], device=cell.device).unsqueeze(1)).to(tokens.dtype)
        member = member * weight.unsqueeze(0)  # [C, T]: which tokens each cell's mean takes
        return torch.matmul(member, tokens) / member.sum(1, keepdim=True).clamp(min=1.0)


def flat_batch(cells: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What Triton's ragged batching hands the packed model for one request per cell (no padding):
    (input_ids [N] int64, attention_mask [N] int64, item_width [C, 1] int32)."""
    ids = np.concatenate([np.asarray(c, dtype=np.int64) for c in cells])
    widths = np.array([[len(c)] for c in cells], dtype=np.int32)
    return ids, np.ones_like(ids), widths


def _example_inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab_size, (96,), generator=generator)
    mask = torch.ones_like(ids)
    mask[80:] = 0  # the second row (width 48) carries 16 pad elements
    return ids, mask, torch.tensor([[48], [48]], dtype=torch.int32)


def export_packed_onnx(encoder: GeneformerEncoder, version_dir: str | Path, precision: str = "fp32",
                       opset: int = OPSET) -> Path:
    """Write the packed encoder to ``<version_dir>/model.onnx`` (standard ONNX ops; ``int8``: onnxruntime
    dynamic quantization of that graph's MatMuls). ``encoder``: fp32, mean pooling. Returns the path."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"packed ONNX export supports fp32 and int8, not {precision!r}")
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    fp32 = version_dir / ("model.fp32.onnx" if precision == "int8" else "model.onnx")
    vocab_size = encoder.embeddings.word_embeddings.num_embeddings
    with torch.no_grad():
        torch.onnx.export(PackedEncoder(encoder).eval(), _example_inputs(vocab_size), str(fp32),
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES,
                          opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(fp32), full_check=True)
    if precision == "int8":
        quantize_weights_int8(fp32, target)
        fp32.unlink()
    LOGGER.info("wrote packed %s ONNX encoder to %s", precision, target)
    return target


def _outer_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs and, for a Loop/If, the outer-scope names its subgraphs read."""
    names = set(node.input)
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            body = attribute.g
            local = {i.name for i in body.input} | {t.name for t in body.initializer}
            for inner in body.node:
                local |= set(inner.output)
            names |= {n for inner in body.node for n in _outer_inputs(inner)} - local
    return names


def sort_topologically(model: onnx.ModelProto) -> None:
    """Order the main graph's nodes so each follows the producers of what it reads, subgraph reads
    included (onnxruntime's quantizer re-sorts without them and leaves a Loop before its body's inputs)."""
    produced = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if _outer_inputs(n) <= produced]
        if not ready:
            raise ValueError(f"ONNX graph has a cycle or a missing input near {pending[0].name}")
        for node in ready:
            ordered.append(node)
            produced |= set(node.output)
        pending = [n for n in pending if not any(n is r for r in ready)]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def quantize_weights_int8(source: Path, target: Path) -> Path:
    """int8 dynamic quantization of the MatMuls by a weight (initializer) in ``source``: int8 weights,
    activations quantized per call. Activation x activation MatMuls (attention scores and context inside
    the per-cell Loop, the pooling) stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    weights = {t.name for t in model.graph.initializer}
    activation_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor at INFO on the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=activation_matmuls,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    quantized = onnx.load(str(target))
    sort_topologically(quantized)
    onnx.save(quantized, str(target))
    onnx.checker.check_model(str(target))
    return target
