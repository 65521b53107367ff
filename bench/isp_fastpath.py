"""Fast in-process ``delete all`` in-silico perturbation, and the Geneformer-style baseline it is compared to.

Ours (:class:`DeleteAllRunner`): encoder only (no LM head, no other hidden states), cell-embedding
shift only, perturbed sequences built on the device by one gather per chunk, chunks sized by a token
budget (:func:`geneformer_triton.core.perturbation.chunk_by_token_budget`), bf16 where the device supports
it. Every sequence of a ``delete all`` run has the same length (n - 1 tokens), so chunks carry no
padding and attention runs without a mask (SDPA may then pick flash attention); optionally
``torch.compile`` with one static chunk shape.

Baseline (:func:`baseline_delete_all`): what Geneformer's ``InSilicoPerturber`` does per cell,
reduced to its compute: ``BertForMaskedLM`` fp32, eager attention, ``output_hidden_states=True``,
perturbations in forward batches of 100 padded to their longest sequence, one cell at a time, mean
of the last hidden state over non-pad (non-special) tokens, cosine with the original cell.

Both return ``cell_shift`` [n genes] in the cell's rank order, the same values as
``perturbation.run_plan(..., plan_perturbations(cell, "delete"))`` (tested in tests/test_isp_served.py).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from geneformer_triton.core.perturbation import chunk_by_token_budget, plan_perturbations
from geneformer_triton.core.tokenizer import pad_token_batch
from geneformer_triton.model.encoder import GeneformerEncoder


def _layout(tokens: np.ndarray, special_ids: Sequence[int]) -> tuple[int, int]:
    prefix = int(len(tokens) > 0 and int(tokens[0]) in special_ids)
    suffix = int(len(tokens) > prefix and int(tokens[-1]) in special_ids)
    return prefix, suffix


class DeleteAllRunner:
    """Cell shift of deleting each gene of a cell, encoder-only, on one device."""

    def __init__(
        self,
        encoder: GeneformerEncoder,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_tokens: int = 65536,
        max_batch: Optional[int] = None,
        compile: bool = False,
        special_ids: Sequence[int] = (),
    ) -> None:
        if encoder.attention != "sdpa":
            raise ValueError("DeleteAllRunner needs an encoder with attention='sdpa' (it runs without a mask)")
        self.device = torch.device(device)
        self.dtype = dtype
        # a copy: Module.to() converts in place, and the encoder shares its weights with the full model
        self.encoder = copy.deepcopy(encoder).to(self.device, dtype).eval()
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.special_ids = tuple(int(t) for t in special_ids)
        self.compiled = compile
        self._forward = torch.compile(self._embed, dynamic=False) if compile else self._embed

    @torch.no_grad()  # not inference_mode: torch.compile rejects inference tensors ("version_counter")
    def _embed(self, input_ids: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor:
        """Mean-pooled last hidden state [B, H] float32 of unpadded sequences [B, L] (no mask)."""
        enc = self.encoder
        x = enc._embed(input_ids)
        for layer in enc.layers:
            x = enc._layer(layer, x, None)
        length = x.shape[1]
        return x[:, prefix : length - suffix].float().mean(dim=1)

    @torch.no_grad()
    def run_cell(self, tokens: np.ndarray) -> np.ndarray:
        """``cell_shift`` of deleting each gene of ``tokens`` (unpadded), float32 [n genes]."""
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)
        prefix, suffix = _layout(tokens, self.special_ids)
        length = ids.numel()
        n = length - prefix - suffix
        original = self._embed(ids[None], prefix, suffix)  # eager: one shape per cell
        # every perturbed sequence has length - 1 tokens: the chunks only differ in row count
        chunks = chunk_by_token_budget([length - 1] * n, self.max_tokens, self.max_batch)
        rows = chunks[0][1] - chunks[0][0]
        positions = torch.arange(length - 1, device=self.device)
        shifts = []
        for start, stop in chunks:
            deleted = torch.arange(prefix + start, prefix + stop, device=self.device)
            if self.compiled and stop - start < rows:  # keep one static shape: pad rows, drop them after
                deleted = torch.cat([deleted, deleted[-1:].expand(rows - (stop - start))])
            gather = positions[None, :] + (positions[None, :] >= deleted[:, None]).long()
            cells = self._forward(ids[gather], prefix, suffix)[: stop - start]
            shifts.append(F.cosine_similarity(cells, original, dim=-1, eps=1e-8))
        return torch.cat(shifts).cpu().numpy().astype(np.float32)


@torch.inference_mode()
def baseline_delete_all(
    model,
    tokens: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 100,
    special_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> np.ndarray:
    """Geneformer-style ``delete all`` of one cell with ``BertForMaskedLM`` (see the module docstring)."""
    device = torch.device(device)
    prefix, suffix = _layout(tokens, special_ids)
    specials = torch.tensor(list(special_ids), dtype=torch.long, device=device)

    def embed(batch: list[np.ndarray]) -> torch.Tensor:
        ids, mask = pad_token_batch(batch, pad_id)
        ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        out = model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        keep = mask_t.bool()
        if specials.numel():
            keep &= ~torch.isin(ids_t, specials)
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    original = embed([np.asarray(tokens, dtype=np.int64)])
    plan = plan_perturbations(
        tokens, "delete", "all",
        cls_token_id=special_ids[0] if prefix else None, eos_token_id=special_ids[-1] if suffix else None,
        pad_token_id=pad_id,
    )
    shifts = []
    for start in range(0, plan.num_perturbations, batch_size):
        seqs = [plan.sequence(i) for i in range(start, min(start + batch_size, plan.num_perturbations))]
        shifts.append(F.cosine_similarity(embed(seqs), original, dim=-1, eps=1e-8))
    return torch.cat(shifts).float().cpu().numpy()
