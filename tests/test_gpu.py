"""On a CUDA GPU: the bf16 encoder (the GPU hosts' default precision) holds the bf16 gate against the fp32
CPU reference on real cells. Marked ``gpu`` through ``cuda_device``: where no CUDA device is visible it
fails, it never skips (docs/testing.md says when it is deselected instead)."""

from __future__ import annotations

from geneformer_triton.core.fidelity import compare_variant
from geneformer_triton.model.runtimes import embed_token_cells, torch_encode_fn


def test_bf16_encoder_on_the_gpu_holds_the_bf16_gate(cuda_device, loaded_model, reference_encoder, celltypist_tokens):
    import torch

    cells = celltypist_tokens[:16]
    gpu = torch_encode_fn(loaded_model.encoder(dtype=torch.bfloat16).to(cuda_device))
    result = compare_variant("torch_bf16_cuda", "bf16", embed_token_cells(gpu, cells, batch_size=8),
                             embed_token_cells(reference_encoder, cells, batch_size=8))
    assert result.passed, result.failures
