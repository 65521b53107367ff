"""Model loading: checkpoint folders, helical cache layout, random init by name, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED, write_helical_cache
from transformers import BertConfig, BertForMaskedLM

from geneformer_triton.core.dictionaries import DictionaryError, load_vocabulary
from geneformer_triton.model.encoder import GeneformerEncoder, hidden_state_index
from geneformer_triton.model.loading import ModelLoadError, load_checkpoint, load_geneformer, random_geneformer
from geneformer_triton.model.specs import DEPRECATED_NAMES, MODEL_SPECS, get_model_spec

# millions of parameters (with the MLM head) that each helical name promises
NAME_SIZES = {name: float(name.split("-")[2][:-1]) for name in MODEL_SPECS}


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_spec_sizes_match_model_names(name):
    with torch.device("meta"):
        model = BertForMaskedLM(BertConfig(**get_model_spec(name).bert_config_dict()))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(NAME_SIZES[name], rel=0.06), f"{name}: {millions:.1f}M parameters"


@pytest.mark.parametrize("version, name", [("v1", "gf-6L-10M-i2048"), ("v2", "gf-12L-38M-i4096")])
def test_specs_match_shared_geneformer_configs(version, name):
    shared = json.loads(next((SHARED / "geneformer" / version).glob("*.config.json")).read_text())
    ours = get_model_spec(name).bert_config_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps"):
        assert ours[key] == shared[key], key


def test_deprecated_names_map_to_new_ones():
    for old, new in DEPRECATED_NAMES.items():
        assert get_model_spec(old).name == new


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown Geneformer model name 'gf-99L'.*gf-6L-10M-i2048"):
        get_model_spec("gf-99L")


def test_random_init_is_seeded_and_logged(caplog, v1_vocabulary):
    with caplog.at_level("WARNING"):
        first = random_geneformer("gf-6L-10M-i2048", seed=3, vocabulary=v1_vocabulary)
    assert "RANDOM WEIGHTS" in caplog.text
    second = random_geneformer("gf-6L-10M-i2048", seed=3, vocabulary=v1_vocabulary)
    third = random_geneformer("gf-6L-10M-i2048", seed=4, vocabulary=v1_vocabulary)
    assert first.weights_sha256 == second.weights_sha256 != third.weights_sha256
    assert first.random_weights and first.config.vocab_size == len(v1_vocabulary)




def test_load_from_helical_cache_and_checkpoint_folder(tmp_path, loaded_model):
    checkpoint = write_helical_cache(tmp_path, loaded_model)
    from_cache = load_geneformer("gf-6L-10M-i2048", cache_dir=tmp_path)
    assert from_cache.weights_sha256 == loaded_model.weights_sha256
    assert not from_cache.random_weights and len(from_cache.vocabulary) == len(loaded_model.vocabulary)
    from_folder = load_geneformer(checkpoint)
    assert from_folder.weights_sha256 == loaded_model.weights_sha256


def test_checkpoint_errors(tmp_path, loaded_model):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(tmp_path)
    loaded_model.model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights file"):
        load_checkpoint(tmp_path)
    checkpoint = write_helical_cache(tmp_path / "cache", loaded_model)
    with pytest.raises(ModelLoadError, match="does not match model name gf-12L-38M-i4096: num_hidden_layers=6 \\(expected 12\\)"):
        load_checkpoint(checkpoint, "gf-12L-38M-i4096")
    with pytest.raises(ModelLoadError, match="not found in the helical cache"):
        load_geneformer("gf-12L-40M-i2048", cache_dir=tmp_path / "empty")
    with pytest.raises(DictionaryError, match="not found"):
        load_vocabulary(tmp_path / "missing")


def test_encoder_matches_huggingface_hidden_states(loaded_model, celltypist_tokens):
    """Our encoder-only forward equals BertForMaskedLM's hidden_states[emb_layer] masked mean."""
    from geneformer_triton.core.tokenizer import pad_token_batch

    ids, mask = (torch.from_numpy(a) for a in pad_token_batch(celltypist_tokens[:3]))
    ids, mask = ids[:, :300], mask[:, :300]
    with torch.no_grad():
        hidden_states = loaded_model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for emb_layer in (-1, -2, 0, 3):
            encoder = loaded_model.encoder(emb_layer=emb_layer)
            assert len(encoder.layers) == hidden_state_index(6, emb_layer)
            cell, tokens = encoder(ids, mask)
            expected = (hidden_states[emb_layer] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            torch.testing.assert_close(cell, expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="emb_layer=7 is outside"):
        GeneformerEncoder(loaded_model.model.bert, emb_layer=7)


def test_v2_pooling_excludes_special_tokens_and_cls_mode(v2_vocabulary):
    loaded = random_geneformer("gf-12L-38M-i4096", vocabulary=v2_vocabulary)
    loaded.model.bert.encoder.layer = loaded.model.bert.encoder.layer[:2]  # keep the test fast
    loaded.model.config.num_hidden_layers = 2
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        cell, tokens = loaded.encoder()(ids, mask)
        cls, _ = loaded.encoder(pooling="cls")(ids, mask)
    torch.testing.assert_close(cell[0], tokens[0, 1:4].mean(0))
    torch.testing.assert_close(cls[0], tokens[0, 0])
    v1 = random_geneformer("gf-6L-10M-i2048")
    with pytest.raises(ModelLoadError, match="no <cls> token"):
        v1.encoder(pooling="cls")
    assert np.isfinite(cell.numpy()).all()
