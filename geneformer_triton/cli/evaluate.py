"""``gftriton evaluate``: downstream embedding quality of every served (or exported) backend vs the fp32
PyTorch reference, on labelled cells (an .h5ad file or the bundled pbmc68k sample).

The logic lives in :mod:`geneformer_triton.evaluation.backends`; this module only parses options.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_triton.core.cell_inputs import InputOptions, add_input_arguments
from geneformer_triton.core.contract import TOKENIZER_MODEL
from geneformer_triton.evaluation.backends import (
    DEFAULT_BACKENDS,
    FP32_ACCURACY_TOLERANCE,
    EvaluationOptions,
    chance_summary,
    evaluate_backends,
    format_summary,
    load_labelled_cells,
    stratified_subsample,
)
from geneformer_triton.model.args import add_model_arguments, load_model_from_args

LOGGER = logging.getLogger(__name__)

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


def run_evaluate(args: argparse.Namespace) -> int:
    repository = Path(args.repository) if args.repository else None
    if args.dictionaries is None and repository is not None:
        args.dictionaries = str(repository / TOKENIZER_MODEL / "1")  # the server's own dictionaries
    loaded = load_model_from_args(args)
    vocabulary = loaded.vocabulary
    if vocabulary is None:
        raise ValueError("no gene dictionaries: pass --dictionaries or --repository")

    inputs = InputOptions(layer=args.layer, gene_column=args.gene_column, n_counts_key=args.n_counts_key,
                          allow_non_integer=args.allow_non_integer)
    cells = load_labelled_cells(vocabulary, path=args.input, dataset=args.dataset, label_key=args.label_key,
                                inputs=inputs)
    total = cells.n_cells
    keep = [args.control_label] if args.control_label else []
    cells = cells.subset(stratified_subsample(cells.labels, args.max_cells, args.eval_seed, keep))
    if cells.n_cells < total:
        LOGGER.info("stratified subsample: %d of %d cells (seed %d)", cells.n_cells, total, args.eval_seed)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    client = None
    if not args.local:
        from geneformer_triton.client.triton_client import GeneformerClient

        url = args.url or f"localhost:{DEFAULT_PORTS[args.protocol]}"
        client = GeneformerClient(url, args.protocol, concurrency=args.concurrency)
        client.wait_ready(args.timeout)
    try:
        options = EvaluationOptions(
            backends=backends, repository=repository, local=args.local, control_label=args.control_label,
            seed=args.eval_seed, batch_size=args.batch_size, emb_layer=args.emb_layer, pooling=args.pooling,
            out_dir=args.out, projection=args.projection, accuracy_tolerance=args.accuracy_tolerance,
            save_embeddings=args.save_embeddings, metadata={"cells_before_subsample": total, "eval_seed": args.eval_seed},
        )
        result = evaluate_backends(loaded, cells, options, client=client, vocabulary=vocabulary)
    finally:
        if client is not None:
            client.close()

    if result.metadata["random_weights"]:
        print("NOTE: RANDOM WEIGHTS (no pretrained checkpoint): absolute metrics near chance are expected; "
              "only the differences between backends are meaningful.")
    print(f"{cells.n_cells} cells, {result.metadata['n_labels']} labels ({cells.label_key}); "
          + chance_summary(result.table))
    print(format_summary(result.table))
    checks = result.checks
    print(f"{'PASS' if result.passed else 'FAIL'}: fp32 max |delta accuracy| {checks['fp32_max_abs_delta_accuracy']:.4f} "
          f"(tolerance {checks['accuracy_tolerance']}), fidelity failures: {checks['fidelity_failed'] or 'none'}")
    for kind, path in result.paths.items():
        print(f"{kind}: {path}")
    return 0 if result.passed else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="downstream quality (classification, geometry) of every served backend vs the fp32 PyTorch reference",
        description="Embed labelled cells with the in-process fp32 PyTorch reference and with every served "
        "ensemble geneformer_embed_<backend> (or, with --local, every exported encoder file in process), then "
        "compare classification and geometry metrics side by side. Exit code 1 when an fp32 backend's accuracy "
        "differs from the reference by more than the tolerance or a backend misses its fidelity threshold.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("input", nargs="?", help=".h5ad file with raw counts and a label column")
    data.add_argument("--dataset", choices=["pbmc68k"], help="bundled labelled sample instead of a file "
                      "(pbmc68k: scanpy's pbmc68k_reduced, counts recovered, labels bulk_labels)")
    data.add_argument("--label-key", help="obs column with the labels (default bulk_labels for pbmc68k)")
    data.add_argument("--control-label", help="label of control cells (adds control_separation)")
    add_input_arguments(data)
    data.add_argument("--max-cells", type=int, default=2000, help="stratified subsample size (0 = all cells)")
    data.add_argument("--eval-seed", type=int, default=0, help="seed of the subsample, 80/20 split and KMeans "
                      "(--seed is the random-weights seed)")

    served = parser.add_argument_group("backends")
    served.add_argument("--url", help="Triton host:port (default localhost:8001 for grpc, 8000 for http)")
    served.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    served.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help="comma list; served ensembles are geneformer_embed_<backend> (default %(default)s)")
    served.add_argument("--repository", help="model repository: manifests checked against the reference weights, "
                        "tokenizer dictionaries; with --local, the encoder files to run")
    served.add_argument("--local", action="store_true", help="run the exported encoders of --repository in "
                        "process (onnxruntime, TorchScript) instead of through a server")
    served.add_argument("--batch-size", type=int, default=32, help="cells per request / batch")
    served.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    served.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")

    add_model_arguments(parser)
    parser.add_argument("--emb-layer", type=int, help="embedding layer (default: the manifests', else -1)")
    parser.add_argument("--pooling", choices=["mean", "cls"], help="pooling (default: the manifests', else mean)")

    report = parser.add_argument_group("report")
    report.add_argument("--out", default="results/evaluate", help="report folder (default %(default)s)")
    report.add_argument("--projection", choices=["pca", "umap"], default="pca")
    report.add_argument("--accuracy-tolerance", type=float, default=FP32_ACCURACY_TOLERANCE,
                        help="largest |accuracy delta| of fp32 backends vs the reference (default %(default)s = 1 point)")
    report.add_argument("--save-embeddings", action="store_true", help="also write embeddings.npz")
    parser.set_defaults(func=run_evaluate)
