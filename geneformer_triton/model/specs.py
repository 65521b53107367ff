"""Geneformer model names and their architecture, as helical 3.1.4 knows them.

Parameter counts of these architectures (with the MLM head) match the names: 10.3M, 39.6M, 38.0M,
151.3M, 104.4M and 316.4M (checked in tests/test_loading.py).

Sizes come from helical's model map and the published Geneformer configs. They are used to build a
model with random weights when no checkpoint is available (offline demo, tests, benchmarks: cost and
cross-backend fidelity do not depend on weight values).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from geneformer_triton.core import contract
from geneformer_triton.core.contract import ServedShape

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one Geneformer checkpoint.

    ``dictionary_version`` names the gene-dictionary folder in a helical cache (``v1``/``v2``/``v3``);
    ``special_tokens`` is True for models trained with ``<cls>`` first and ``<eos>`` last.
    """

    name: str
    dictionary_version: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    input_size: int
    vocab_size: int
    special_tokens: bool

    @property
    def shape(self) -> ServedShape:
        """The sizes its served configs are generated for (export/model_configs.py)."""
        return ServedShape(self.hidden_size, self.input_size, self.special_tokens)

    def bert_config_dict(self) -> dict:
        """A Hugging Face ``BertConfig`` dictionary matching Geneformer's published configs."""
        return {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            "attention_probs_dropout_prob": 0.02,
            "hidden_dropout_prob": 0.02,
            "hidden_act": "relu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": self.input_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "type_vocab_size": 2,
            "vocab_size": self.vocab_size,
        }


V1_VOCAB = 25426
V2_VOCAB = 20275

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("gf-6L-10M-i2048", "v1", 6, 256, 4, 512, 2048, V1_VOCAB, False),
        ModelSpec("gf-12L-40M-i2048", "v1", 12, 512, 8, 1024, 2048, V1_VOCAB, False),
        ModelSpec("gf-12L-40M-i2048-CZI-CellxGene", "v1", 12, 512, 8, 1024, 2048, V1_VOCAB, False),
        ModelSpec("gf-12L-38M-i4096", "v2", 12, 512, 8, 1024, 4096, V2_VOCAB, True),
        ModelSpec("gf-12L-38M-i4096-CLcancer", "v2", 12, 512, 8, 1024, 4096, V2_VOCAB, True),
        ModelSpec("gf-20L-151M-i4096", "v2", 20, 896, 14, 1792, 4096, V2_VOCAB, True),
        ModelSpec("gf-12L-104M-i4096", "v3", 12, 768, 12, 3072, 4096, V2_VOCAB, True),
        ModelSpec("gf-12L-104M-i4096-CLcancer", "v3", 12, 768, 12, 3072, 4096, V2_VOCAB, True),
        ModelSpec("gf-18L-316M-i4096", "v3", 18, 1152, 18, 4608, 4096, V2_VOCAB, True),
    )
}

#: Names helical 3.1.4 still accepts and maps to the new ones (Geneformer renamed its models by size).
DEPRECATED_NAMES = {
    "gf-6L-30M-i2048": "gf-6L-10M-i2048",
    "gf-12L-30M-i2048": "gf-12L-40M-i2048",
    "gf-12L-95M-i4096": "gf-12L-38M-i4096",
    "gf-12L-95M-i4096-CLcancer": "gf-12L-38M-i4096-CLcancer",
    "gf-20L-95M-i4096": "gf-20L-151M-i4096",
}

DEFAULT_MODEL = contract.DEFAULT_MODEL


def get_model_spec(name: str) -> ModelSpec:
    """Return the spec for ``name`` (deprecated names are mapped, with a warning) or raise ``ValueError``."""
    if name in DEPRECATED_NAMES:
        LOGGER.warning("model name %s is deprecated; using %s (helical's renaming)", name, DEPRECATED_NAMES[name])
        name = DEPRECATED_NAMES[name]
    try:
        return MODEL_SPECS[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_SPECS))
        raise ValueError(f"unknown Geneformer model name {name!r}; known names: {known}") from None
