"""``gftriton fidelity``: exported encoders (ONNX fp32/fp16, TorchScript) vs the fp32 PyTorch reference,
in process, on real cells (the celltypist sample), at batch sizes 1 and 8; each variant is judged by
``geneformer_triton.core.fidelity.gate_for(precision)``. Exit status 1 when any variant fails its gate."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geneformer_triton.core.contract import TOKENIZER_MODEL
from geneformer_triton.core.dictionaries import load_vocabulary
from geneformer_triton.core.fidelity import (
    FidelityResult,
    compare_variant,
    format_fidelity_table,
    write_fidelity_report,
)
from geneformer_triton.core.tokenizer import RankValueTokenizer
from geneformer_triton.export.formats import EMBEDDING_FORMATS
from geneformer_triton.model.args import add_model_arguments, load_model_from_args
from geneformer_triton.model.runtimes import EncodeFn, embed_token_cells, onnx_encode_fn, torch_encode_fn, torchscript_encode_fn

if TYPE_CHECKING:
    from geneformer_triton.model.loading import LoadedGeneformer

LOGGER = logging.getLogger(__name__)

BATCH_SIZES = (1, 8)


def celltypist_token_cells(repository: Path, n_cells: int, input_size: int, special_tokens: bool) -> list[np.ndarray]:
    """The first ``n_cells`` celltypist cells tokenized with the repository's tokenizer dictionaries."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    vocabulary = load_vocabulary(repository / TOKENIZER_MODEL / "1")
    adata = load_celltypist_sample(n_cells=n_cells, symbol_to_ensembl=vocabulary.gene_name_to_id)
    tokenizer = RankValueTokenizer(vocabulary, input_size, special_tokens)
    return tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())


def exported_runtime(kind: str, path: Path) -> EncodeFn:
    return onnx_encode_fn(path) if kind == "onnx" else torchscript_encode_fn(path)


def check_exported_encoders(
    loaded: "LoadedGeneformer", repository: Path, cells: list[np.ndarray], formats: list[str]
) -> list[FidelityResult]:
    """Compare every exported format found in ``repository`` with the fp32 PyTorch reference at the layer its
    manifest records (``emb_layer``: the export's ``--emb-layer``, or a fixed-layer ISP encoder's own)."""
    references: dict[int, np.ndarray] = {}
    results = []
    for name in formats:
        fmt = EMBEDDING_FORMATS[name]
        version_dir = repository / fmt.model / "1"
        manifest = json.loads((version_dir / "manifest.json").read_text())
        if manifest["weights_sha256"] != loaded.weights_sha256:
            raise ValueError(
                f"{fmt.model} was exported from other weights ({manifest['weights_source']}) than the reference "
                f"({loaded.source}); pass the same model options as for `gftriton export`"
            )
        layer = int(manifest.get("emb_layer", -1))
        if layer not in references:
            references[layer] = embed_token_cells(torch_encode_fn(loaded.encoder(emb_layer=layer)), cells, batch_size=8)
        reference = references[layer]
        encode = exported_runtime(fmt.kind, version_dir / ("model.onnx" if fmt.kind == "onnx" else "model.pt"))
        for batch_size in BATCH_SIZES:
            embeddings = embed_token_cells(encode, cells, batch_size=batch_size)
            lengths = f"lengths {min(map(len, cells))}-{max(map(len, cells))}"
            results.append(compare_variant(f"{fmt.model} (batch {batch_size})", fmt.precision, embeddings, reference, lengths))
    return results


def run_fidelity(args: argparse.Namespace) -> int:
    repository = Path(args.repository)
    loaded = load_model_from_args(args)
    formats = [f for f in args.formats.split(",") if f]
    cells = celltypist_token_cells(repository, args.cells, loaded.input_size, loaded.special_tokens)
    results = check_exported_encoders(loaded, repository, cells, formats)
    print(format_fidelity_table(results))
    paths = write_fidelity_report(results, args.out)
    LOGGER.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0 if all(r.passed for r in results) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fidelity", help="compare exported encoders with the fp32 PyTorch reference on real cells")
    add_model_arguments(parser)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--formats", default=",".join(EMBEDDING_FORMATS))
    parser.add_argument("--cells", type=int, default=32, help="number of celltypist cells")
    parser.add_argument("--out", default="results/fidelity", help="folder for fidelity.csv / fidelity.json")
    parser.set_defaults(func=run_fidelity)
