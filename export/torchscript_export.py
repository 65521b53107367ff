"""TorchScript export of the encoder-only Geneformer for Triton's ``pytorch_libtorch`` backend.

The module is traced (shapes are taken from the input at run time, so batch size and sequence length
stay dynamic) and checked at other shapes than the trace's. The libtorch backend addresses tensors
by position: inputs ``input_ids__0``, ``attention_mask__1``; outputs ``cell_embedding__0``,
``token_embeddings__1`` (see model_repository/geneformer_torchscript/config.pbtxt).

The saved archive has no debug records (``code/*.py.debug_pkl``: source ranges into the exporting
machine's Python files), so a failing call's error text, which Triton's pytorch backend sends to the
client as is, shows the archive's own serialized code but no path or line of the exporting machine.
"""

from __future__ import annotations

import logging
import os
import tempfile
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
    with tempfile.TemporaryDirectory(dir=version_dir) as work:
        full = Path(work) / "full" / "model.pt"  # the archive's records are named after its file: keep "model"
        full.parent.mkdir()
        traced.save(str(full))
        strip_debug_info(full, Path(work) / "model.pt")
        os.replace(Path(work) / "model.pt", path)
    LOGGER.info("wrote TorchScript to %s", path)
    return path


def strip_debug_info(source: Path, target: Path) -> None:
    """Copy the TorchScript archive ``source`` to ``target`` without its ``*.debug_pkl`` records (torch's
    own archive reader and writer: records stay aligned; ``torch.jit.load`` needs no debug records)."""
    reader = torch._C.PyTorchFileReader(str(source))
    writer = torch._C.PyTorchFileWriter(str(target))
    for name in reader.get_all_records():
        if not name.endswith(".debug_pkl"):
            data = reader.get_record(name)
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
