"""Command-line options that choose a Geneformer model and its dictionaries (shared by subcommands)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from geneformer_triton.core.dictionaries import GeneVocabulary, build_vocabulary_from_counts, load_vocabulary
from geneformer_triton.model.specs import DEFAULT_MODEL, MODEL_SPECS

if TYPE_CHECKING:
    from geneformer_triton.model.loading import LoadedGeneformer

LOGGER = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model name (helical naming) or a checkpoint folder (default {DEFAULT_MODEL})")
    group.add_argument("--cache-dir", help="helical cache prefix (default $CACHE_DIR_HELICAL_PREFIX or ~)")
    group.add_argument("--dictionaries", help="folder with token_dictionary.json, gene_median_dictionary.json, ...")
    group.add_argument("--random-weights", action="store_true",
                       help="use seeded random weights when no checkpoint is found (offline demo; no biology)")
    group.add_argument("--vocabulary-from-sample", action="store_true",
                       help="build the gene vocabulary from the celltypist sample when no dictionaries are given")
    group.add_argument("--seed", type=int, default=0, help="seed for random weights")


def sample_vocabulary(special_tokens: bool = False) -> GeneVocabulary:
    """Vocabulary built from the celltypist sample's raw counts (offline demo)."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    adata = load_celltypist_sample()
    keep = adata.var["ensembl_id"].to_numpy() != ""
    vocabulary = build_vocabulary_from_counts(adata.X[:, keep], list(adata.var["ensembl_id"][keep]), special_tokens)
    # the sample's own symbol -> Ensembl id table (exported as gene_name_id_dict.json: symbol inputs work)
    vocabulary.gene_name_to_id = {str(symbol): str(gene) for symbol, gene in zip(adata.var_names[keep],
                                                                              adata.var["ensembl_id"][keep])
                                  if gene in vocabulary.token_ids}
    LOGGER.warning("gene vocabulary built from the celltypist sample (%d genes): demo only", len(vocabulary) - 2)
    return vocabulary


def load_model_from_args(args: argparse.Namespace) -> "LoadedGeneformer":
    """Load the model the options describe; a vocabulary from --dictionaries or the sample overrides."""
    vocabulary = load_vocabulary(args.dictionaries) if args.dictionaries else None
    if vocabulary is None and args.vocabulary_from_sample:
        spec = MODEL_SPECS.get(str(args.model))
        vocabulary = sample_vocabulary(special_tokens=bool(spec and spec.special_tokens))
    from geneformer_triton.model.loading import load_geneformer, random_geneformer

    loaded = load_geneformer(args.model, cache_dir=args.cache_dir, allow_random=args.random_weights,
                             seed=args.seed, vocabulary=vocabulary)
    if loaded.vocabulary is None and loaded.random_weights:
        LOGGER.warning("no gene dictionaries for %s: using the celltypist sample's (demo only; pass --dictionaries "
                       "or a helical cache for Geneformer's)", loaded.name)
        loaded = random_geneformer(loaded.name, args.seed, sample_vocabulary(loaded.special_tokens))
    return loaded
