"""ISP at lower precision: do the int8 reduced ISP encoder's numbers rank genes like fp32?

    python -m geneformer_triton.bench.isp_precision --cells 4 --length 500 --out bench/results/<date>-<host>/isp-packed

Exports ``geneformer_onnx_isp_reduced`` (fp32) and ``geneformer_onnx_isp_reduced_int8`` (onnxruntime
dynamic quantization of the same graph; export/isp_reduction_export.py) for gf-6L-10M-i2048 with seeded
random weights (seed 0: the weights the upstream benchmark uses; no real checkpoint is available here), runs
upstream-semantics ``delete all`` on real celltypist cells through each in process (onnxruntime CPU,
``perturbation.run_packed``, all cells packed together) and compares per cell: Spearman correlation of
``cell_emb_shift`` (upstream's ``cell_emb`` value: the gene ranking), overlap of the 20 genes whose deletion
shifts the cell most (lowest cosine), max abs difference of ``cell_emb_shift`` and of the per-gene cosines,
plus each precision's perturbations/s (median of ``--repeats``). Writes ``isp_precision.json`` and ``.md``.
bf16 is not compared: there is no bf16 ISP encoder (the bf16 format is TorchScript, without the reduction).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("geneformer_triton.bench.isp_precision")
TOP = 20
PRECISIONS = ("fp32", "int8")


def run_delete_all(session, cells: list[np.ndarray], vocabulary, max_tokens: int) -> tuple[float, list[dict]]:
    """(seconds, per-cell outputs) of upstream-semantics delete-all of ``cells`` packed through ``session``."""
    from geneformer_triton.core.isp_upstream import plan_upstream
    from geneformer_triton.core.isp_upstream_service import UpstreamJob
    from geneformer_triton.core.perturbation import run_packed
    from geneformer_triton.export.isp_reduction_export import run_isp_reduction

    jobs = []
    for cell in cells:
        plan = plan_upstream(cell, "delete", "all")
        jobs.append(UpstreamJob(plan=plan, labels=vocabulary.genes_for_tokens(cell), cell_genes=vocabulary.genes_for_tokens(cell),
                                emb_mode="cell_and_gene", states=None, max_tokens=max_tokens, max_batch=64))
    started = time.perf_counter()
    errors = run_packed(jobs, lambda b: run_isp_reduction(session, b.input_ids, b.attention_mask, b.original_offset,
                                                           b.position_map), max_tokens, 64, vocabulary.pad_id)
    seconds = time.perf_counter() - started
    if any(e is not None for e in errors):
        raise RuntimeError(f"ISP failed: {[str(e) for e in errors if e is not None]}")
    return seconds, [job.outputs() for job in jobs]


def compare(reference: dict, other: dict) -> dict:
    """Gene-ranking agreement of one cell's ``other`` outputs with ``reference`` (fp32)."""
    from scipy import stats

    ref, got = reference["cell_emb_shift"].astype(np.float64), other["cell_emb_shift"].astype(np.float64)
    top = min(TOP, ref.size)
    overlap = len(set(np.argsort(ref)[:top]) & set(np.argsort(got)[:top])) / top
    return {"genes": int(ref.size), "spearman": float(stats.spearmanr(ref, got).statistic), f"top{TOP}_overlap": overlap,
            "max_abs_diff_cell_emb_shift": float(np.abs(ref - got).max()),
            "max_abs_diff_gene_cos": float(np.abs(reference["gene_cos"] - other["gene_cos"]).max())}


def main(argv=None) -> int:
    from geneformer_triton.bench.isp_bench import celltypist_cells, default_dictionaries
    from geneformer_triton.bench.isp_upstream_bench import machine_state
    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.export.isp_reduction_export import export_isp_reduction_onnx
    from geneformer_triton.model.loading import random_geneformer
    from geneformer_triton.model.runtimes import onnx_session

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--length", type=int, default=500, help="tokens per cell (cells cut to this length)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    vocabulary = load_vocabulary(default_dictionaries())
    cells = celltypist_cells(vocabulary, args.cells, args.length)
    loaded = random_geneformer("gf-6L-10M-i2048", seed=0, vocabulary=vocabulary)
    before = machine_state()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoder = loaded.encoder(emb_layer=-2, attention="math")
        for precision in PRECISIONS:
            session = onnx_session(export_isp_reduction_onnx(encoder, Path(tmp) / precision, precision), args.threads)
            run_delete_all(session, [cells[0][:32]], vocabulary, args.max_tokens)  # warm-up, not timed
            runs = [run_delete_all(session, cells, vocabulary, args.max_tokens) for _ in range(args.repeats)]
            results[precision] = {"seconds": [s for s, _ in runs], "outputs": runs[-1][1]}
    perturbations = sum(int(o["cell_emb_shift"].size) for o in results["fp32"]["outputs"])
    report = {
        "cells": [{"tokens": int(c.size)} for c in cells], "perturbations": perturbations, "threads": args.threads,
        "weights": "gf-6L-10M-i2048, seeded random weights (seed 0)", "emb_layer": -1,
        "machine": {"before": before, "after": machine_state()},
        "speed": {p: {"seconds": r["seconds"], "median_s": float(np.median(r["seconds"])),
                      "perturbations_per_s": perturbations / float(np.median(r["seconds"]))} for p, r in results.items()},
        "int8_vs_fp32": [compare(a, b) for a, b in zip(results["fp32"]["outputs"], results["int8"]["outputs"])],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "isp_precision.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "isp_precision.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    speed = report["speed"]
    lines = [f"# ISP delete-all: int8 vs fp32 reduced ISP encoders (in process, onnxruntime CPU, {report['threads']} threads)", "",
             f"{len(report['cells'])} celltypist cells of {report['cells'][0]['tokens']} tokens, {report['perturbations']} "
             f"perturbations per run, {report['weights']}, upstream emb_layer -1. Medians of {len(speed['fp32']['seconds'])} repeats.", "",
             "| precision | perturbations/s | median s | x fp32 |", "|---|---|---|---|"]
    for p, s in speed.items():
        lines.append(f"| {p} | {s['perturbations_per_s']:.1f} | {s['median_s']:.2f} | "
                     f"{speed['fp32']['median_s'] / s['median_s']:.2f} |")
    lines += ["", f"| cell | genes | Spearman (cell_emb_shift) | top-{TOP} overlap | max abs diff cell_emb_shift | max abs diff gene cos |",
              "|---|---|---|---|---|---|"]
    for i, c in enumerate(report["int8_vs_fp32"]):
        lines.append(f"| {i} | {c['genes']} | {c['spearman']:.4f} | {c[f'top{TOP}_overlap']:.2f} | "
                     f"{c['max_abs_diff_cell_emb_shift']:.1e} | {c['max_abs_diff_gene_cos']:.1e} |")
    m = report["machine"]
    lines += ["", f"Load average before {m['before'].get('load_average')} ({m['before']['utc']}), after "
              f"{m['after'].get('load_average')} ({m['after']['utc']}); the machine is shared (2 cores).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
