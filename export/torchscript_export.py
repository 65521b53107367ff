"""TorchScript export of the encoder-only Geneformer for Triton's ``pytorch_libtorch`` backend.

The module is traced (shapes are taken from the input at run time, so batch size and sequence length
stay dynamic) and checked at other shapes than the trace's. The libtorch backend addresses tensors
by position: inputs ``input_ids__0``, ``attention_mask__1``; outputs ``cell_embedding__0``,
``token_embeddings__1`` (see model_repository/geneformer_torchscript/config.pbtxt).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from geneformer_triton.model.encoder import GeneformerEncoder

LOGGER = logging.getLogger(__name__)

CHECK_SHAPES = ((1, 7), (3, 129))


def export_torchscript(encoder: GeneformerEncoder, version_dir: str | Path) -> Path:
    """Trace ``encoder`` and save ``model.pt`` into a Triton version folder; returns its path."""
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = encoder.embeddings.word_embeddings.num_embeddings
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(2, vocab_size, (2, 64), generator=generator)
    example_mask = torch.ones_like(example)
    example_mask[1, 40:] = 0
    with torch.no_grad():
        traced = torch.jit.trace(encoder, (example, example_mask), check_trace=False)
        traced = traced.eval()
        for batch, length in CHECK_SHAPES:
            ids = torch.randint(2, vocab_size, (batch, length), generator=generator)
            mask = torch.ones_like(ids)
            expected = encoder(ids, mask)[0]
            got = traced(ids, mask)[0]
            if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"traced TorchScript differs from the module at shape {batch}x{length}")
    path = version_dir / "model.pt"
    traced.save(str(path))
    LOGGER.info("wrote TorchScript to %s", path)
    return path
