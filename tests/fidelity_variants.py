"""Deliberately broken encoder variants for the fidelity gates' negative controls.

Each variant is a served ONNX encoder (token ids in, ``cell_embedding`` out, fp32) with one realistic
defect. :func:`build_variant_repository` writes them all, plus the correct export as the positive
control, into one Triton model repository, so one server serves every variant.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from geneformer_triton.core.contract import ENCODER_VARIANTS
from geneformer_triton.export.onnx_export import export_onnx
from geneformer_triton.model.encoder import GeneformerEncoder

ENCODER_MODEL = ENCODER_VARIANTS["onnx"].model
#: The last LayerNorm of the graph (the encoder's output LayerNorm): a shift there moves every token
#: by the same vector, the hardest LayerNorm defect to see in cosine.
LAST_LN_BIAS = "layers.5.output.LayerNorm.bias"
MIDDLE_LN_BIAS = "layers.2.attention.output.LayerNorm.bias"
TYPICAL_BIAS_SHIFT = 0.02


def edit_initializer(src: Path, dst: Path, name: str, edit: Callable[[np.ndarray], np.ndarray]) -> Path:
    """Copy ONNX ``src`` to ``dst`` with initializer ``name`` replaced by ``edit(value)`` (onnx package)."""
    model = onnx.load(str(src))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            value = numpy_helper.to_array(tensor)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(edit(value).astype(value.dtype), name))
            break
    else:
        raise KeyError(f"{src} has no initializer {name}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


class PaddingAttended(GeneformerEncoder):
    """Ignores the attention mask: pad tokens are attended to and pooled."""

    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, torch.ones_like(attention_mask))


class RowsRolled(GeneformerEncoder):
    """Returns each cell the embedding of the previous cell in the batch (rows shuffled)."""

    def forward(self, input_ids, attention_mask):
        cell, tokens = super().forward(input_ids, attention_mask)
        return torch.roll(cell, 1, 0), tokens


class GenesReversed(GeneformerEncoder):
    """Reverses each cell's gene order (lowest rank first) before encoding."""

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(1, keepdim=True)
        positions = torch.cumsum(torch.ones_like(input_ids), 1) - 1
        index = torch.where(positions < lengths, lengths - 1 - positions, positions)
        return super().forward(torch.gather(input_ids, 1, index), attention_mask)


def _as(encoder: GeneformerEncoder, cls: type[GeneformerEncoder]) -> GeneformerEncoder:
    encoder.__class__ = cls
    return encoder


def qk_swapped_encoder(loaded) -> GeneformerEncoder:
    """Every layer's query and key projections (weights and biases) exchanged, on a copy of the model."""
    bert = copy.deepcopy(loaded.model.bert)
    for layer in bert.encoder.layer:
        attention = layer.attention.self
        attention.query, attention.key = attention.key, attention.query
    return GeneformerEncoder(bert, attention="math").eval()


def torch_variants(loaded) -> dict[str, GeneformerEncoder]:
    """Broken encoders built in PyTorch (exported to ONNX like the real ones)."""
    return {
        "broken_qk_swapped": qk_swapped_encoder(loaded),
        "broken_wrong_layer": loaded.encoder(emb_layer=-2, attention="math"),
        "broken_padding_attended": _as(loaded.encoder(attention="math"), PaddingAttended),
        "broken_rows_shuffled": _as(copy.deepcopy(loaded.encoder(attention="math")), RowsRolled),
        "broken_genes_reversed": _as(copy.deepcopy(loaded.encoder(attention="math")), GenesReversed),
    }


def onnx_variants() -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """Broken copies of the exported (fused) ``model.onnx``: variant -> (initializer, edit)."""
    return {
        "broken_ln_bias_zeroed": (MIDDLE_LN_BIAS, np.zeros_like),
        "broken_ln_bias_shifted": (LAST_LN_BIAS, lambda b: b + np.float32(TYPICAL_BIAS_SHIFT)),
    }


def _config(exported: Path, name: str) -> str:
    """The fp32 ONNX encoder's CPU config (a ModelConfig), renamed to ``name``."""
    config = text_format.Parse((exported / ENCODER_MODEL / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    config.name = name
    return text_format.MessageToString(config)


def build_variant_repository(exported: Path, loaded, dest: Path) -> list[str]:
    """A Triton repository at ``dest``: the correct fp32 and fp16 ONNX encoders (positive controls) and
    every broken variant; returns the broken variants' names."""
    for model in (ENCODER_MODEL, f"{ENCODER_MODEL}_fp16"):
        shutil.copytree(exported / model, dest / model, ignore=shutil.ignore_patterns("model.portable.onnx"))
    source = exported / ENCODER_MODEL / "1" / "model.onnx"
    names = []
    for name, (initializer, edit) in onnx_variants().items():
        edit_initializer(source, dest / name / "1" / "model.onnx", initializer, edit)
        names.append(name)
    for name, encoder in torch_variants(loaded).items():
        export_onnx(encoder, dest / name / "1", optimize=False)
        (dest / name / "1" / "model.portable.onnx").unlink(missing_ok=True)
        names.append(name)
    for name in names:
        (dest / name / "config.pbtxt").write_text(_config(exported, name))
    return names
