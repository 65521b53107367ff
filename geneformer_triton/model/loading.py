"""Load a Geneformer model: a checkpoint folder, a helical cache entry, or random weights by name.

- Checkpoint folder: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (the Geneformer
  model repository and helical's cache hold these). Gene dictionaries are looked up in the folder
  itself and then in its parent (helical keeps them one level up).
- helical cache: ``<prefix>/.cache/helical/models/geneformer/<v1|v2|v3>/<model name>/`` where the prefix
  is ``cache_dir`` or the ``CACHE_DIR_HELICAL_PREFIX`` environment variable (helical's own convention).
- Random weights from a known model name with a fixed seed, for offline use; logged loudly. They are
  *test weights* (:func:`init_test_weights`): every parameter gets a non-trivial value, so a backend that
  drops a bias, wires the wrong LayerNorm or attends padding gives visibly different embeddings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from geneformer_triton.core.dictionaries import (
    TOKEN_DICTIONARY_FILE,
    DictionaryError,
    GeneVocabulary,
    load_vocabulary,
)
from geneformer_triton.model.encoder import Attention, GeneformerEncoder, Pooling
from geneformer_triton.model.specs import ModelSpec, get_model_spec

LOGGER = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "position_embedding_type",
)


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message says what is missing or inconsistent."""


@dataclass
class LoadedGeneformer:
    """A loaded Geneformer (``BertForMaskedLM``, eval mode, fp32) and what it came from."""

    model: BertForMaskedLM
    name: str
    source: str
    random_weights: bool
    weights_sha256: str
    vocabulary: GeneVocabulary | None
    special_tokens: bool

    @property
    def config(self) -> BertConfig:
        return self.model.config

    @property
    def input_size(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def config_sha256(self) -> str:
        """sha256 of the architecture-defining config fields (stable across save/load bookkeeping)."""
        fields = {key: getattr(self.model.config, key, None) for key in ARCHITECTURE_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def encoder(
        self,
        emb_layer: int = -1,
        pooling: Pooling = "mean",
        attention: Attention = "sdpa",
        dtype: torch.dtype = torch.float32,
    ) -> GeneformerEncoder:
        """Encoder-only module over this model's weights (shared; copied when ``dtype`` is not fp32, so
        the loaded model itself stays fp32)."""
        if pooling == "cls" and not self.special_tokens:
            raise ModelLoadError(f"{self.name} has no <cls> token: pooling='cls' needs a V2 model")
        excluded = self.vocabulary.special_token_ids if (self.vocabulary and self.special_tokens) else ()
        encoder = GeneformerEncoder(self.model.bert, emb_layer, pooling, excluded, attention).eval()
        return copy.deepcopy(encoder).to(dtype) if dtype != torch.float32 else encoder


def _state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def helical_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """helical's model cache folder for Geneformer (``<prefix>/.cache/helical/models/geneformer``)."""
    prefix = cache_dir if cache_dir is not None else os.environ.get("CACHE_DIR_HELICAL_PREFIX", Path.home())
    return Path(prefix) / ".cache" / "helical" / "models" / "geneformer"


def _find_vocabulary(folder: Path) -> GeneVocabulary | None:
    for candidate in (folder, folder.parent):
        if (candidate / TOKEN_DICTIONARY_FILE).is_file():
            return load_vocabulary(candidate)
    return None


def _check_config_matches(config: BertConfig, spec: ModelSpec, folder: Path) -> None:
    expected = {
        "num_hidden_layers": spec.num_hidden_layers,
        "hidden_size": spec.hidden_size,
        "max_position_embeddings": spec.input_size,
    }
    wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        details = ", ".join(f"{k}={got} (expected {want})" for k, (got, want) in wrong.items())
        raise ModelLoadError(f"checkpoint {folder} does not match model name {spec.name}: {details}")


def load_checkpoint(folder: str | Path, name: str | None = None) -> LoadedGeneformer:
    """Load a Hugging Face checkpoint folder; ``name`` (optional) is checked against its config."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise ModelLoadError(f"{folder} has no weights file (expected one of {', '.join(WEIGHT_FILES)})")
    config = BertConfig.from_pretrained(folder)
    if name is not None:
        _check_config_matches(config, get_model_spec(name), folder)
    model = BertForMaskedLM.from_pretrained(folder, attn_implementation="sdpa").eval().float()
    vocabulary = _find_vocabulary(folder)
    if vocabulary is None:
        LOGGER.warning("no gene dictionaries next to %s: pass dictionaries explicitly to tokenize", folder)
    elif len(vocabulary) != config.vocab_size:
        raise ModelLoadError(
            f"token dictionary has {len(vocabulary)} entries but the checkpoint's vocab_size is {config.vocab_size}"
        )
    special = vocabulary.has_special_tokens if vocabulary is not None else config.max_position_embeddings > 2048
    return LoadedGeneformer(
        model=model,
        name=name or folder.name,
        source=str(folder.resolve()),
        random_weights=False,
        weights_sha256=_state_sha256(model),
        vocabulary=vocabulary,
        special_tokens=special,
    )


#: Scales of the seeded test weights (:func:`init_test_weights`); standard deviations unless noted.
TEST_WEIGHT_SCALES = {
    "word_embeddings": 1.0,  # gene identity dominates a token's embedding ...
    "position_embeddings": 0.3,  # ... rank still matters (reversed gene order changes the embedding)
    "token_type_embeddings": 0.1,
    "layer_norm_weight": (0.5, 1.5),  # uniform range
    "layer_norm_bias": 0.05,
    "linear_bias": 0.05,
    "linear_weight_gain": 0.3,  # Linear weights N(0, (gain / sqrt(fan_in))^2): residual stream keeps gene identity
}


def init_test_weights(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter of ``model`` a seeded, non-trivial value (in place; deterministic from ``seed``).

    Hugging Face's default init (Linear biases 0, LayerNorm weight 1 / bias 0, embeddings N(0, 0.02))
    makes mean-pooled embeddings of different long cells nearly identical (cosine 0.998-0.9998) and
    leaves biases and LayerNorm parameters untested. Here (scales in :data:`TEST_WEIGHT_SCALES`):
    word embeddings N(0, 1) (the pad row too), position embeddings N(0, 0.3^2), token-type embeddings
    N(0, 0.1^2), LayerNorm weights U(0.5, 1.5) and biases N(0, 0.05^2), Linear weights
    N(0, 0.3^2 / fan_in) and biases N(0, 0.05^2). Parameters are visited in name order from one
    ``torch.Generator``; tied parameters (the MLM decoder shares the word embeddings) are set once.
    Inter-cell figures with these weights: docs/fidelity.md.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    scales = TEST_WEIGHT_SCALES
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(remove_duplicate=False)):
            if id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 2)
            if "LayerNorm" in name and name.endswith("weight"):
                low, high = scales["layer_norm_weight"]
                value = low + (high - low) * torch.rand(param.shape, generator=generator)
            elif "LayerNorm" in name:
                value = noise * scales["layer_norm_bias"]
            elif leaf[-2] in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
                value = noise * scales[leaf[-2]]
            elif name.endswith("bias"):
                value = noise * scales["linear_bias"]
            elif param.ndim == 2:
                value = noise * scales["linear_weight_gain"] / param.shape[1] ** 0.5
            else:
                raise ValueError(f"no test-weight rule for parameter {name} {tuple(param.shape)}")
            param.copy_(value)


def random_geneformer(name: str, seed: int = 0, vocabulary: GeneVocabulary | None = None) -> LoadedGeneformer:
    """Build ``name``'s architecture with seeded test weights (:func:`init_test_weights`).

    Deterministic from ``seed`` (same seed, same ``weights_sha256``). Logged as a warning: no biology here.
    """
    spec = get_model_spec(name)
    config_dict = spec.bert_config_dict()
    if vocabulary is not None:
        config_dict["vocab_size"] = len(vocabulary)
    LOGGER.warning(
        "RANDOM WEIGHTS: %s is initialized randomly (seed %d) - embeddings carry no biological meaning; "
        "pass a checkpoint folder or a helical cache for real weights",
        name,
        seed,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(**config_dict, attn_implementation="sdpa")).eval()
    init_test_weights(model, seed)
    return LoadedGeneformer(
        model=model,
        name=name,
        source=f"random:seed={seed}",
        random_weights=True,
        weights_sha256=_state_sha256(model),
        vocabulary=vocabulary,
        special_tokens=spec.special_tokens,
    )


def load_geneformer(
    model: str | Path,
    cache_dir: str | Path | None = None,
    allow_random: bool = False,
    seed: int = 0,
    vocabulary: GeneVocabulary | None = None,
) -> LoadedGeneformer:
    """Load ``model``: a checkpoint folder, else a name found in the helical cache, else (if
    ``allow_random``) random weights for that name. ``vocabulary`` overrides the dictionaries found."""
    path = Path(model)
    if path.is_dir():
        loaded = load_checkpoint(path)
    else:
        spec = get_model_spec(str(model))
        cached = helical_cache_dir(cache_dir) / spec.dictionary_version / spec.name
        if cached.is_dir():
            loaded = load_checkpoint(cached, spec.name)
        elif allow_random:
            return random_geneformer(spec.name, seed, vocabulary)
        else:
            raise ModelLoadError(
                f"{spec.name} not found in the helical cache ({cached}); give a checkpoint folder, set "
                "CACHE_DIR_HELICAL_PREFIX, or allow random weights"
            )
    if vocabulary is not None:
        loaded.vocabulary = vocabulary
    if loaded.vocabulary is None:
        raise DictionaryError(f"no gene dictionaries found for {model}; pass a dictionary folder")
    return loaded
