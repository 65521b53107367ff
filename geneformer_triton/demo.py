"""``gftriton demo``: the main job end to end on the built-in default, with a short summary.

Export gf-6L-10M-i2048 (real files when given, else random weights and a vocabulary built from the
celltypist sample), start the real tritonserver, embed real cells through the tokenizer ensemble over
gRPC and over HTTP, compare every served backend with the local fp32 PyTorch reference, stop the
server, print throughput and fidelity, and write ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from geneformer_triton.model_args import add_model_arguments, load_model_from_args

LOGGER = logging.getLogger(__name__)

DEMO_MODEL = "geneformer_embed_onnx_int8"  # fastest served path that holds its gate (bench/results/2026-12-01-vm)


def _embed_throughput(url: str, protocol: str, adata, model: str, concurrency: int) -> dict:
    from client.triton_client import GeneformerClient, pack_cells

    gene_ids, counts = pack_cells(adata.X, list(adata.var["ensembl_id"]))
    n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float32)
    with GeneformerClient(url, protocol, concurrency=concurrency) as client:
        client.embed_cells(gene_ids[:2], counts[:2], n_counts[:2], model)  # warm-up
        started = time.perf_counter()
        embeddings = client.embed_cells(gene_ids, counts, n_counts, model, batch_size=8, progress=True)
        seconds = time.perf_counter() - started
    return {"protocol": protocol, "model": model, "cells": len(embeddings), "seconds": round(seconds, 2),
            "cells_per_s": round(len(embeddings) / seconds, 2), "hidden_size": int(embeddings.shape[1])}


def run_demo(args: argparse.Namespace) -> int:
    from client.check import check_server, local_manifests
    from client.triton_client import GeneformerClient
    from export.repository import export_model_repository
    from geneformer_triton.backend_build import served_backends
    from geneformer_triton.data.celltypist_sample import load_celltypist_sample
    from geneformer_triton.fidelity import format_fidelity_table, write_fidelity_report
    from geneformer_triton.server import LocalTritonServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model_from_args(args)
    export_model_repository(loaded, args.repository)
    adata = load_celltypist_sample(n_cells=args.cells, symbol_to_ensembl=loaded.vocabulary.gene_name_to_id)

    with LocalTritonServer(args.repository, model_config_name="cpu", log_path=out / "tritonserver.log") as server:
        throughput = [
            _embed_throughput(server.grpc_url, "grpc", adata, DEMO_MODEL, args.concurrency),
            _embed_throughput(server.http_url, "http", adata, DEMO_MODEL, args.concurrency),
        ]
        with GeneformerClient(server.grpc_url, "grpc") as client:
            report = check_server(client, loaded, n_cells=args.check_cells, manifests=local_manifests(args.repository))
        served_by = served_backends(server.http_url, server.log_path.read_text(errors="replace"),
                                    headers=server.admin_headers("http"))
    paths = write_fidelity_report(report.results, out)
    summary = {
        "model": loaded.name,
        "weights": "RANDOM (seeded; no biology)" if loaded.random_weights else loaded.source,
        "vocabulary_genes": len(loaded.vocabulary) - len(loaded.vocabulary.special_token_ids) - 2,
        "throughput": throughput,
        "served_by": served_by,
        "fidelity_passed": report.passed,
        "served_tokenizer_mismatches": report.token_mismatches,
        "fidelity_csv": str(paths["csv"]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nGeneformer on Triton demo: {loaded.name}, weights {summary['weights']}")
    for row in throughput:
        print(f"  {row['protocol']:<5} {row['model']}: {row['cells']} real cells in {row['seconds']} s "
              f"= {row['cells_per_s']} cells/s (server-side tokenization, 2 CPU cores)")
    print("\nWhat served each model (from the server log):")
    for model, backend in served_by.items():
        print(f"  {model:<32} {backend}")
    print(f"\nFidelity of every served backend vs the local fp32 PyTorch reference ({args.check_cells} cells):")
    print(format_fidelity_table(report.results))
    print(f"\nserved tokenizer vs local tokenizer: {report.token_mismatches} cells differ")
    print(f"summary: {out / 'summary.json'}")
    return 0 if report.passed else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="export, serve, embed the celltypist sample over gRPC and HTTP, check fidelity, summarize")
    add_model_arguments(parser)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--cells", type=int, default=48, help="celltypist cells to embed per protocol")
    parser.add_argument("--check-cells", type=int, default=16, help="cells for the fidelity check of every backend")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", default="results/demo")
    parser.set_defaults(func=run_demo)
