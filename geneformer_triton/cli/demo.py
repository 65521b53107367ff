"""``gftriton demo``: the main job end to end on the built-in default, with a short summary.

Export gf-6L-10M-i2048 (real files when given, else random weights and a vocabulary built from the
celltypist sample), start the real tritonserver, embed real cells through the tokenizer ensemble over
gRPC and over HTTP, compare every served backend with the local fp32 PyTorch reference, run a short
in-silico deletion through the served ``geneformer_isp`` (upstream InSilicoPerturber semantics), stop the
server, print throughput, fidelity and the most shifted genes, and write ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_triton.core.host import cpu_features, default_embed_model
from geneformer_triton.model.args import add_model_arguments, load_model_from_args

LOGGER = logging.getLogger(__name__)


def _embed_throughput(url: str, protocol: str, adata, model: str, concurrency: int) -> dict:
    from geneformer_triton.client.triton_client import GeneformerClient, pack_cells

    gene_ids, counts = pack_cells(adata.X, list(adata.var["ensembl_id"]))
    n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float32)
    with GeneformerClient(url, protocol, concurrency=concurrency) as client:
        client.embed_cells(gene_ids[:2], counts[:2], n_counts[:2], model)  # warm-up
        started = time.perf_counter()
        embeddings = client.embed_cells(gene_ids, counts, n_counts, model, batch_size=8, progress=True)
        seconds = time.perf_counter() - started
    return {"protocol": protocol, "model": model, "cells": len(embeddings), "seconds": round(seconds, 2),
            "cells_per_s": round(len(embeddings) / seconds, 2), "hidden_size": int(embeddings.shape[1])}


@dataclass(frozen=True)
class DemoIsp:
    """Size of the demo's in-silico perturbation. Every (cell, gene) pair is one ``geneformer_isp`` request
    (upstream semantics: deleting a one-gene list), i.e. two encoder passes over the cell."""

    cells: int = 3  # the shortest of the embedded cells (fewest tokens: the cheapest passes)
    genes: int = 8  # deleted one at a time: the best-ranked genes that all those cells express
    concurrency: int = 2  # requests in flight


@dataclass(frozen=True)
class IspPlan:
    """What the demo perturbs: rows of the cells, Ensembl ids of the genes, tokens per cell."""

    rows: list[int]
    genes: list[str]
    tokens: list[int]


def isp_plan(adata, loaded, options: DemoIsp) -> IspPlan:
    """The ``options.cells`` cells with the fewest tokens and the ``options.genes`` genes all of them
    express, by mean rank position in those cells (rank 0 = the first token)."""
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    tokenizer = RankValueTokenizer(loaded.vocabulary, loaded.input_size, loaded.special_tokens)
    tokens = tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())
    rows = sorted(range(len(tokens)), key=lambda row: len(tokens[row]))[:options.cells]
    special = set(loaded.vocabulary.special_token_ids)
    positions: dict[int, list[int]] = {}
    for row in rows:
        for rank, token in enumerate(int(t) for t in tokens[row]):
            if token not in special:
                positions.setdefault(token, []).append(rank)
    shared = sorted((t for t, ranks in positions.items() if len(ranks) == len(rows)), key=lambda t: np.mean(positions[t]))
    genes = loaded.vocabulary.genes_for_tokens(np.array(shared[:options.genes], dtype=np.int64))
    return IspPlan(rows, list(genes), [len(tokens[row]) for row in rows])


def run_isp_demo(url: str, adata, loaded, options: DemoIsp) -> tuple[pd.DataFrame, dict]:
    """Delete each planned gene in each planned cell through the served ``geneformer_isp`` (gRPC).

    Returns one row per gene, most shifted first: ``gene_symbol``, ``gene_id``, ``n_cells``,
    ``mean_cell_emb_shift`` (1 - upstream's ``cell_emb`` value: 1 - the mean cosine of the other genes'
    embeddings, 0 = no shift) and ``mean_cell_shift`` (1 - cosine of the mean-pooled cell embeddings);
    and the run's size and speed.
    """
    from geneformer_triton.client.isp import cell_table_from_anndata
    from geneformer_triton.client.isp_spec import IspSpec, infer_cell
    from geneformer_triton.client.triton_client import GeneformerClient
    from geneformer_triton.core.cell_inputs import InputOptions
    from geneformer_triton.core.contract import ISP_MODEL

    plan = isp_plan(adata, loaded, options)
    cells = cell_table_from_anndata(adata, InputOptions(gene_column="ensembl_id"), source="celltypist sample")
    specs = {gene: IspSpec(perturbation="delete", targets=(gene,)) for gene in plan.genes}

    def perturb(client: GeneformerClient, row: int, gene: str) -> dict:
        gene_ids, counts = cells.cell(row)
        spec = specs[gene]
        result = infer_cell(client, ISP_MODEL, spec.request_inputs(gene_ids, counts, float(cells.n_counts[row])),
                            spec.outputs())
        if len(result["cell_emb_shift"]) != 1:  # the plan only deletes genes the cell expresses
            notes = [note.decode() for note in result["target_errors"]]
            raise RuntimeError(f"{ISP_MODEL} did not delete {gene} in cell {cells.cell_ids[row]}: {notes}")
        return {"cell_id": cells.cell_ids[row], "gene_id": gene, "gene_symbol": cells.symbol(gene),
                "cell_emb_shift": 1.0 - float(result["cell_emb_shift"][0]), "cell_shift": 1.0 - float(result["cell_shift"][0])}

    pairs = [(row, gene) for row in plan.rows for gene in plan.genes]
    with GeneformerClient(url, "grpc", concurrency=options.concurrency) as client, \
            ThreadPoolExecutor(options.concurrency) as pool:
        started = time.perf_counter()
        results = pd.DataFrame(pool.map(lambda pair: perturb(client, *pair), pairs))
        seconds = time.perf_counter() - started
    top = (results.groupby(["gene_symbol", "gene_id"], sort=False)
           .agg(n_cells=("cell_id", "nunique"), mean_cell_emb_shift=("cell_emb_shift", "mean"),
                mean_cell_shift=("cell_shift", "mean"))
           .reset_index().sort_values("mean_cell_emb_shift", ascending=False, kind="stable").reset_index(drop=True))
    run = {"model": ISP_MODEL, "perturbation": "delete", "semantics": "upstream", "cells": len(plan.rows),
           "genes": len(plan.genes), "perturbations": len(pairs), "tokens_per_cell": plan.tokens,
           "seconds": round(seconds, 2), "perturbations_per_s": round(len(pairs) / seconds, 2)}
    return top, run


def run_demo(args: argparse.Namespace) -> int:
    from geneformer_triton.client.check import check_server, local_manifests
    from geneformer_triton.client.triton_client import GeneformerClient
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample
    from geneformer_triton.core.fidelity import format_fidelity_table, write_fidelity_report
    from geneformer_triton.export.repository import export_model_repository
    from geneformer_triton.serving.backend_build import served_backends
    from geneformer_triton.serving.server import LocalTritonServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model_from_args(args)
    export_model_repository(loaded, args.repository)
    adata = load_celltypist_sample(n_cells=args.cells, symbol_to_ensembl=loaded.vocabulary.gene_name_to_id)

    model = default_embed_model(cpu_features())
    with LocalTritonServer(args.repository, model_config_name="cpu", log_path=out / "tritonserver.log") as server:
        throughput = [
            _embed_throughput(server.grpc_url, "grpc", adata, model, args.concurrency),
            _embed_throughput(server.http_url, "http", adata, model, args.concurrency),
        ]
        with GeneformerClient(server.grpc_url, "grpc") as client:
            report = check_server(client, loaded, n_cells=args.check_cells, manifests=local_manifests(args.repository))
        isp_top, isp_run = run_isp_demo(server.grpc_url, adata, loaded,
                                        DemoIsp(cells=args.isp_cells, genes=args.isp_genes, concurrency=args.concurrency))
        served_by = served_backends(server.http_url, server.log_path.read_text(errors="replace"),
                                    headers=server.admin_headers("http"))
    paths = write_fidelity_report(report.results, out)
    isp_top.to_csv(out / "isp_top_genes.csv", index=False)
    summary = {
        "model": loaded.name,
        "weights": "RANDOM (seeded; no biology)" if loaded.random_weights else loaded.source,
        "vocabulary_genes": len(loaded.vocabulary) - len(loaded.vocabulary.special_token_ids) - 2,
        "throughput": throughput,
        "served_by": served_by,
        "fidelity_passed": report.passed,
        "served_tokenizer_mismatches": report.token_mismatches,
        "fidelity_csv": str(paths["csv"]),
        "isp": {**isp_run, "top_genes_csv": str(out / "isp_top_genes.csv")},
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
    print(f"\nIn-silico deletion through {isp_run['model']} (upstream InSilicoPerturber semantics, emb_layer -1):\n"
          f"  {isp_run['genes']} genes x {isp_run['cells']} cells ({', '.join(map(str, isp_run['tokens_per_cell']))} tokens) "
          f"= {isp_run['perturbations']} perturbations in {isp_run['seconds']} s = {isp_run['perturbations_per_s']}/s")
    print("Most shifted genes (shift = 1 - cosine, 0 = none; cell_emb: upstream's value)"
          + (", random weights: no biology:" if loaded.random_weights else ":"))
    print(isp_top.to_string(index=False, float_format=lambda v: f"{v:.6f}"))
    print(f"summary: {out / 'summary.json'}")
    return 0 if report.passed else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="export, serve, embed the celltypist sample over gRPC and HTTP, check fidelity, "
                                                "perturb genes in silico, summarize")
    add_model_arguments(parser)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--cells", type=int, default=48, help="celltypist cells to embed per protocol")
    parser.add_argument("--check-cells", type=int, default=16, help="cells for the fidelity check of every backend")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--isp-cells", type=int, default=DemoIsp.cells,
                        help="in-silico deletion: the N shortest of the embedded cells")
    parser.add_argument("--isp-genes", type=int, default=DemoIsp.genes,
                        help="in-silico deletion: genes deleted one at a time (the best ranked that those cells share)")
    parser.add_argument("--out", default="results/demo")
    parser.set_defaults(func=run_demo)
