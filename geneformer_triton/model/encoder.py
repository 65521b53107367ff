"""Encoder-only Geneformer: token ids in, cell (and gene) embeddings out, no LM head.

The module reuses the weights of a Hugging Face ``BertModel`` (the ``bert`` part of Geneformer's
``BertForMaskedLM``) and runs only the layers needed for the requested embedding layer. Its forward
is written with plain tensor ops so that TorchScript tracing and ONNX export give clean graphs
(onnxruntime's transformer optimizer recognises the attention pattern of ``attention="math"``).

Embedding layer (``emb_layer``) follows helical 3.1.4: the embedding is ``hidden_states[emb_layer]``
of a full Hugging Face forward pass (Python indexing: ``-1`` is the last transformer layer, ``0`` the
embedding layer's output, ``k`` the output of layer ``k``). Layers after it are not run.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Pooling = Literal["mean", "cls"]
Attention = Literal["sdpa", "math"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def hidden_state_index(num_hidden_layers: int, emb_layer: int) -> int:
    """Number of transformer layers to run so that the output equals ``hidden_states[emb_layer]``.

    ``hidden_states`` has ``num_hidden_layers + 1`` entries (0 = embeddings), indexed like a Python list.
    """
    count = num_hidden_layers + 1
    if not -count <= emb_layer < count:
        raise ValueError(
            f"emb_layer={emb_layer} is outside [{-count}, {num_hidden_layers}] for a model with "
            f"{num_hidden_layers} layers (-1 = last layer, 0 = embedding output)"
        )
    return emb_layer % count


class GeneformerEncoder(nn.Module):
    """Geneformer encoder with masked pooling.

    forward(input_ids [B, L] int64, attention_mask [B, L] int64 (1 token, 0 pad))
      -> (cell_embedding [B, H] float32, token_embeddings [B, L, H] float32)

    ``pooling="mean"`` averages the hidden states of non-pad tokens, leaving out the ids in
    ``excluded_token_ids`` (V2 models: ``<cls>`` and ``<eos>``), as helical's ``emb_mode="cell"`` does.
    ``pooling="cls"`` returns the first token's hidden state (V2 models only).
    Computation runs in the dtype of the weights; outputs are always float32.
    """

    def __init__(
        self,
        bert: nn.Module,
        emb_layer: int = -1,
        pooling: Pooling = "mean",
        excluded_token_ids: tuple[int, ...] = (),
        attention: Attention = "sdpa",
    ) -> None:
        super().__init__()
        config = bert.config
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.num_layers_run = hidden_state_index(config.num_hidden_layers, emb_layer)
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(bert.encoder.layer[: self.num_layers_run])
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.max_length = config.max_position_embeddings
        self.activation_name = config.hidden_act
        self.pooling = pooling
        self.attention = attention
        self.register_buffer(
            "excluded_token_ids", torch.tensor(list(excluded_token_ids), dtype=torch.long), persistent=False
        )

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        # positions derived from the input (not torch.arange) so traced graphs follow the input's device
        positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)
        x = x + emb.token_type_embeddings.weight[0]
        return emb.LayerNorm(x)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, layer: nn.Module, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        attn = layer.attention.self
        q = self._split_heads(attn.query(x))
        k = self._split_heads(attn.key(x))
        v = self._split_heads(attn.value(x))
        if self.attention == "sdpa":
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            probs = torch.softmax(scores + additive_mask, dim=-1)
            context = torch.matmul(probs, v)
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.hidden_size)

    def _layer(self, layer: nn.Module, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        context = self._attend(layer, x, additive_mask)
        out = layer.attention.output
        x = out.LayerNorm(out.dense(context) + x)
        hidden = _ACTIVATIONS[self.activation_name](layer.intermediate.dense(x))
        return layer.output.LayerNorm(layer.output.dense(hidden) + x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._embed(input_ids)
        # [B, 1, 1, L] additive mask in the layout onnxruntime's BERT attention fusion recognises
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = self._layer(layer, x, additive_mask)
        token_embeddings = x.float()
        if self.pooling == "cls":
            return token_embeddings[:, 0], token_embeddings
        keep = attention_mask.bool()
        if self.excluded_token_ids.numel() > 0:
            # an elementwise comparison, not torch.isin: ONNX opset 17 has no isin
            keep = keep & (input_ids.unsqueeze(-1) != self.excluded_token_ids).all(dim=-1)
        weights = keep.to(token_embeddings.dtype).unsqueeze(-1)
        summed = (token_embeddings * weights).sum(dim=1)
        cell_embedding = summed / weights.sum(dim=1).clamp(min=1.0)
        return cell_embedding, token_embeddings
