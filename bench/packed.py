"""Padding-free encoder: every token of a batch packed into one [T, H] tensor.

Projections and feed-forward layers run on the packed tokens only (no padded rows), attention runs per
cell: on CUDA with flash attention's variable-length kernel (``torch.nn.attention.varlen.varlen_attn``,
bf16/fp16, cumulative sequence offsets, no mask: flash attention refuses a padding mask, this needs
none), elsewhere with one SDPA call per cell (no mask either). Same weights and same arithmetic as
``geneformer_triton.model.encoder.GeneformerEncoder`` (it wraps one), cell embedding = masked mean.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from geneformer_triton.model.encoder import _ACTIVATIONS, GeneformerEncoder


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:  # torch < 2.9
        return None


class PackedEncoder(nn.Module):
    """forward(input_ids [B, L], attention_mask [B, L]) -> cell_embedding [B, H] float32 (right padding)."""

    def __init__(self, encoder: GeneformerEncoder) -> None:
        super().__init__()
        if encoder.pooling != "mean":
            raise ValueError("PackedEncoder implements mean pooling only")
        self.encoder = encoder
        self.varlen = _varlen()

    def _attend(self, layer: nn.Module, x: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        enc = self.encoder
        attn = layer.attention.self
        total = x.shape[0]
        q = attn.query(x).view(total, enc.num_heads, enc.head_dim)
        k = attn.key(x).view(total, enc.num_heads, enc.head_dim)
        v = attn.value(x).view(total, enc.num_heads, enc.head_dim)
        if x.is_cuda and self.varlen is not None and x.dtype in (torch.float16, torch.bfloat16):
            context = self.varlen(q, k, v, cu, cu, max_len, max_len)
        else:
            context = torch.empty_like(q)
            starts = cu.tolist()
            for start, stop in zip(starts[:-1], starts[1:]):
                qs, ks, vs = (t[start:stop].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                context[start:stop] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        return context.reshape(total, enc.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1)
        ids = input_ids[keep]
        positions = (torch.cumsum(attention_mask, dim=1) - 1)[keep]
        segment = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(input_ids)[keep]
        cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        max_len = int(input_ids.shape[1])  # right padding: the padded length bounds every cell (no sync)
        emb = enc.embeddings
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        act = _ACTIVATIONS[enc.activation_name]
        for layer in enc.layers:
            context = self._attend(layer, x, cu, max_len)
            out = layer.attention.output
            x = out.LayerNorm(out.dense(context) + x)
            x = layer.output.LayerNorm(layer.output.dense(act(layer.intermediate.dense(x))) + x)
        tokens = x.float()
        weight = torch.ones_like(ids, dtype=tokens.dtype)
        if enc.excluded_token_ids.numel() > 0:
            weight = (~torch.isin(ids, enc.excluded_token_ids)).to(tokens.dtype)
        sums = torch.zeros(input_ids.shape[0], tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
        sums.index_add_(0, segment, tokens * weight.unsqueeze(1))
        counts = torch.zeros(input_ids.shape[0], dtype=tokens.dtype, device=tokens.device).index_add_(0, segment, weight)
        return sums / counts.clamp(min=1.0).unsqueeze(1)
