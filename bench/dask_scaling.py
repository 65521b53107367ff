"""Scale-out benchmark: an ISP delete-all screen through the Dask engine with 1 and 2 Triton servers.

For S in ``--servers`` (default 1, 2): S real ``tritonserver`` processes are started (the ISP model,
its encoder and the tokenizer, CPU configs) and a LocalCluster of S worker processes (one thread each)
sends shards to them (``--servers`` mode of ``gftriton isp``, shard i to server i mod S). Each repeat
runs the whole screen afresh (``--overwrite``) and is timed from submission to the assembled output
(cluster and server start-up excluded). The same screen through the plain single-server client
(``gftriton isp --url``, no Dask) is the baseline for the engine's overhead. Reported: perturbations/s
(median, min, max over ``--repeats``), speed-up over 1 server and scaling efficiency
speed-up / S. On a 2-core machine both servers share the same cores, so expect ~1x.

    python -m geneformer_triton.bench.dask_scaling --repository model_repository --out bench/results/DATE-vm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from geneformer_triton.core.contract import ISP_DEFAULT_ENCODER, ISP_MODEL, TOKENIZER_MODEL

LOGGER = logging.getLogger("geneformer_triton.bench.dask_scaling")
MODELS = (ISP_MODEL, ISP_DEFAULT_ENCODER, TOKENIZER_MODEL)


def cut_cells(n_cells: int, n_genes: int, dictionaries: Path, path: Path) -> Path:
    """The first ``n_cells`` celltypist cells cut to their ``n_genes`` top-ranked genes, as .h5ad."""
    import scipy.sparse as sp

    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample
    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    adata = load_celltypist_sample(n_cells=n_cells)
    vocabulary = load_vocabulary(dictionaries)
    tokenizer = RankValueTokenizer(vocabulary, 2048, False)
    ids = list(adata.var["ensembl_id"])
    column_tokens = tokenizer.gene_tokens(ids)
    keep = np.zeros(adata.shape, dtype=bool)
    for row, tokens in enumerate(tokenizer.tokenize_matrix(adata.X, ids, adata.obs["n_counts"].to_numpy())):
        keep[row] = np.isin(column_tokens, tokens[:n_genes]) & (np.array(ids) != "")
    adata.X = sp.csr_matrix(adata.X.multiply(sp.csr_matrix(keep)), dtype=np.float32)
    adata.write_h5ad(path)
    return path


def _isp_args(options: argparse.Namespace, h5ad: Path, output: Path) -> list[str]:
    return ["--h5ad", str(h5ad), "--output", str(output), "--overwrite", "--no-progress", "--top", "1", "--min-cells", "1",
            "--concurrency", str(options.concurrency)]


def _rows(output: Path) -> int:
    import pandas as pd

    return sum(len(pd.read_parquet(p)) for p in output.glob("part-*.parquet"))


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(options: argparse.Namespace, h5ad: Path, work: Path) -> list[dict]:
    """One result row per setup (plain client, Dask with each server count); see the module docstring."""
    from geneformer_triton.client.dask_engine import ClusterOptions, open_cluster
    from geneformer_triton.client.dask_jobs import run_isp_on_cluster
    from geneformer_triton.client.isp_cli import build_parser
    from geneformer_triton.client.isp_cli import main as isp_main
    from geneformer_triton.serving.server import LocalTritonServer

    results = []
    for n_servers in options.servers:
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(LocalTritonServer(options.repository, models=list(MODELS), model_config_name="cpu"))
                       for _ in range(n_servers)]
            urls = ",".join(f"grpc://{s.grpc_url}" for s in servers)
            argv = ["isp", "--cluster", f"local:{n_servers}", "--servers", urls, "--shard-size", str(options.shard_size),
                    *_isp_args(options, h5ad, work / f"dask{n_servers}.parquet")]
            args = build_parser().parse_args(argv)
            client = stack.enter_context(open_cluster(ClusterOptions.from_args(args)))
            if n_servers == 1:  # the plain client against the same server: the engine's overhead
                plain = work / "plain.parquet"
                url = servers[0].grpc_url
                seconds = [_timed(lambda url=url, plain=plain: isp_main(["--url", url, *_isp_args(options, h5ad, plain)]))
                           for _ in range(options.repeats)]
                results.append(_result("plain client (no Dask), 1 server", 1, seconds, _rows(plain)))
            seconds = []
            for _ in range(options.repeats):
                seconds.append(_timed(lambda argv=argv, client=client: run_isp_on_cluster(build_parser().parse_args(argv),
                                                                                         client=client)))
            results.append(_result(f"Dask, {n_servers} server(s) + {n_servers} worker(s)", n_servers, seconds,
                                   _rows(work / f"dask{n_servers}.parquet")))
            LOGGER.info("%s", results[-1])
    return results


def _result(label: str, n_servers: int, seconds: list[float], rows: int) -> dict:
    rates = sorted(rows / s for s in seconds)
    return {"setup": label, "servers": n_servers, "perturbations": rows, "repeats": len(seconds),
            "seconds": [round(s, 3) for s in seconds], "perturbations_per_s_median": round(statistics.median(rates), 2),
            "perturbations_per_s_min": round(rates[0], 2), "perturbations_per_s_max": round(rates[-1], 2)}


def summarize(results: list[dict]) -> dict:
    one = next(r for r in results if r["setup"].startswith("Dask") and r["servers"] == 1)
    for row in results:
        if row["setup"].startswith("Dask"):
            row["speedup_over_1_server"] = round(row["perturbations_per_s_median"] / one["perturbations_per_s_median"], 3)
            row["scaling_efficiency"] = round(row["speedup_over_1_server"] / row["servers"], 3)
    return {"per_server_perturbations_per_s": one["perturbations_per_s_median"], "rows": results}


def write(out: Path, summary: dict, meta: dict) -> None:
    """``dask_scaling.json`` (everything) and ``dask_scaling.md`` (the table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "dask_scaling.json").write_text(json.dumps({**meta, **summary}, indent=2) + "\n")
    lines = [
        "# Dask scale-out: ISP delete-all through 1 and 2 Triton servers", "",
        f"Machine: {meta['environment'].get('cpu', '?')}, {meta['environment'].get('logical_cpus', '?')} logical CPUs, no GPU; "
        f"load average at start {meta['loadavg_start']}. Workload: {meta['workload']}.",
        f"Each setup ran {meta['repeats']} times (median, min-max); time from submission to the assembled output, "
        "cluster and server start-up excluded. Servers and workers share the same cores.", "",
        "| setup | perturbations | perturbations/s median (min-max) | speed-up vs 1 server | efficiency |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['setup']} | {row['perturbations']} | {row['perturbations_per_s_median']} "
                     f"({row['perturbations_per_s_min']}-{row['perturbations_per_s_max']}) | "
                     f"{row.get('speedup_over_1_server', '')} | {row.get('scaling_efficiency', '')} |")
    lines += ["", "On 2 shared CPU cores a second server cannot add compute: the figure measures the engine's "
              "overhead and the cost of two servers competing for the same cores, not the scaling on a cluster "
              "(one GPU per server), which docs/deployment.md estimates from per-server throughput."]
    (out / "dask_scaling.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.bench.dask_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="model_repository", help="exported model repository")
    parser.add_argument("--out", default="bench/results/dask", help="folder for dask_scaling.json / .md")
    parser.add_argument("--servers", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2])
    parser.add_argument("--cells", type=int, default=24)
    parser.add_argument("--genes", type=int, default=32, help="genes kept per cell (delete-all: one pass each)")
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight per worker")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    LOGGER.setLevel(logging.INFO)
    from geneformer_triton.bench.report import environment

    with tempfile.TemporaryDirectory(prefix="gftriton-dask-bench-") as tmp:
        work = Path(tmp)
        h5ad = cut_cells(options.cells, options.genes, Path(options.repository) / TOKENIZER_MODEL / "1",
                         work / "cells.h5ad")
        meta = {"environment": environment(), "loadavg_start": round(os.getloadavg()[0], 2),
                "workload": f"delete-all on {options.cells} celltypist cells cut to their top {options.genes} genes "
                            f"({options.genes + 1} forward passes of {options.genes} tokens per cell), shards of "
                            f"{options.shard_size} cells, {options.concurrency} requests in flight per worker, random weights",
                "repeats": options.repeats}
        summary = summarize(measure(options, h5ad, work))
    meta["loadavg_end"] = round(os.getloadavg()[0], 2)
    write(Path(options.out), summary, meta)
    print((Path(options.out) / "dask_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
