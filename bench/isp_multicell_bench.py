"""Served ISP with cells merged into shared encoder batches vs one request at a time (issue 15).

Same cells, same server, same spec; only the client's concurrency differs:

* ``one_at_a_time``: ``run_isp(..., concurrency=1)``: every ``execute`` of ``geneformer_isp`` holds one cell, whose
  rows make their own encoder batches (upstream's one-cell-at-a-time shape of work);
* ``merged``: ``run_isp(..., concurrency=N)``: Triton's dynamic batcher hands the queued cells to one ``execute``
  and their rows share packed encoder batches.

Cells: the first ``--cells`` (12) Norman K562 control cells of ``../shared/data/perturbench_norman19_k562.h5ad``
with >= 4 genes (counts recovered from the log-normalized X; ~15 genes per cell). Cases: ``overexpress_KLF1``
(KLF1 is not among the screen's 500 genes: one perturbation per cell, the case packing across cells is for)
and ``delete_all``. Encoder: ``geneformer_onnx_isp_reduced`` (upstream's emb_layer -1, reduction in the graph)
with seeded random ``gf-6L-10M-i2048`` weights, Triton's C++ onnxruntime backend where built. Baseline:
upstream's unmodified ``InSilicoPerturber`` (oracle runner, CPU, forward batch 100, emb_mode ``cell``) on the
same tokenized cells, repeats in one process; its ``perturb_data`` time (model loading included). Every
method's ``cell_emb`` values are compared with upstream's (max abs difference, same keys), and merged with
one-at-a-time. How merging happened comes from Triton's own metrics (``geneformer_isp`` inferences vs
executions, encoder executions). Medians of ``--repeats`` (>= 3), min-max; load averages recorded.

    python -m geneformer_triton.bench.isp_multicell_bench --out bench/results/2026-12-01-vm/isp-multicell
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from geneformer_triton.bench.isp_upstream_bench import (
    REPO_ROOT,
    default_dictionaries,
    export_repository,
    machine_state,
    prepare_checkpoint,
    run_sampled,
    shared_dir,
)

LOGGER = logging.getLogger("bench.isp_multicell")
KLF1 = "ENSG00000105610"
CASES = {"overexpress_KLF1": ("overexpress", (KLF1,)), "delete_all": ("delete", None)}
ENCODER = "geneformer_onnx_isp_reduced"
ISP = "geneformer_isp"


@dataclass(frozen=True)
class MulticellOptions:
    """What to run (see the module docstring)."""

    cells: int = 12
    repeats: int = 3
    concurrency: int = 12
    cases: tuple[str, ...] = tuple(CASES)
    upstream: bool = True
    seed: int = 0
    threads: int = 2
    timeout_s: float = 900.0
    out: Optional[str] = None
    work: Optional[str] = None

    def __post_init__(self) -> None:
        if self.repeats < 3:
            raise SystemExit(f"--repeats must be >= 3 (medians of at least 3 repeats), got {self.repeats}")
        unknown = sorted(set(self.cases) - set(CASES))
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; choose from {list(CASES)}")


def norman_control_cells(vocabulary, count: int):
    """The first ``count`` Norman K562 control cells with >= 4 genes, as a CellTable."""
    import anndata

    from geneformer_triton.client.isp import CellTable, cell_table_from_anndata
    from geneformer_triton.core.cell_inputs import InputOptions, SymbolMap

    path = shared_dir() / "data" / "perturbench_norman19_k562.h5ad"
    adata = anndata.read_h5ad(path)
    adata = adata[adata.obs["condition"] == "control"][: 40 * count].copy()
    table = cell_table_from_anndata(adata, InputOptions(allow_non_integer=True),
                                    SymbolMap(vocabulary.gene_name_to_id, "the V1 dictionaries"), str(path))
    rows = [r for r in range(len(table)) if len(table.cell(r)[0]) >= 4][:count]
    return CellTable(table.counts[rows], table.gene_ids, table.n_counts[rows], [table.cell_ids[r] for r in rows],
                     dict(table.symbols))


def _summary(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "all": [float(v) for v in values]}


def _values(frame, cell_ids: list[str], vocabulary) -> dict:
    """(cell index, perturbed tokens) -> cell_emb_shift, the key upstream's JSON uses."""
    index = {c: i for i, c in enumerate(cell_ids)}
    token = vocabulary.token_ids
    return {(index[c], tuple(int(token[g]) for g in gene.split("+"))): float(v)
            for c, gene, v in zip(frame["cell_id"], frame["gene_id"], frame["cell_emb_shift"])}


def _max_diff(ours: dict, theirs: dict) -> float:
    if set(ours) != set(theirs):
        raise RuntimeError(f"different perturbations: {sorted(set(ours) ^ set(theirs))[:5]} ({len(ours)} vs {len(theirs)})")
    return float(max(abs(ours[k] - theirs[k]) for k in theirs))


def _fresh(path: Path) -> Path:
    """``path`` with no earlier run's results (a store there would resume instead of rerunning)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def run_served(options: MulticellOptions, repository: Path, cells, vocabulary, work: Path) -> dict:
    """Per case and client mode: repeats, Triton's view of the first repeat, the last repeat's values."""
    from geneformer_triton.bench.isp_worker import backend_kind, stub_import_root
    from geneformer_triton.bench.triton_metrics import breakdown, scrape
    from geneformer_triton.client.isp_run import run_isp
    from geneformer_triton.client.isp_spec import IspSpec
    from geneformer_triton.client.isp_store import ResultStore
    from geneformer_triton.client.triton_client import GeneformerClient
    from geneformer_triton.serving.server import LocalTritonServer

    stub_import_root(work / "server")
    out: dict = {}
    with LocalTritonServer(repository, models=[ENCODER, ISP], model_config_name="cpu", work_dir=work / "server") as server:
        out["backend"] = backend_kind(server)
        with GeneformerClient(server.grpc_url, "grpc", concurrency=options.concurrency, timeout_s=3600) as client:
            client.wait_ready(300, ISP)
            for case in options.cases:
                perturbation, targets = CASES[case]
                spec = IspSpec(perturbation=perturbation, targets=targets)
                for mode, concurrency in (("one_at_a_time", 1), ("merged", options.concurrency)):
                    with ResultStore(_fresh(work / f"warm_{case}_{mode}.parquet"), spec.fingerprint(), columns=spec.columns()) as store:
                        run_isp(client, cells, spec, store, concurrency=concurrency)  # warm-up (not timed)
                    repeats, profile, frame = [], {}, None
                    for r in range(options.repeats):
                        before, load = scrape(server.metrics_url), machine_state()
                        path = _fresh(work / f"{case}_{mode}_{r}.parquet")
                        with ResultStore(path, spec.fingerprint(), columns=spec.columns()) as store:
                            stats = run_isp(client, cells, spec, store, concurrency=concurrency)
                            frame = store.read()
                        after = scrape(server.metrics_url)
                        if stats.cells_done != len(cells):
                            raise RuntimeError(f"{case} {mode}: {stats.cells_rejected} cells rejected")
                        repeats.append({"seconds": stats.seconds, "perturbations": stats.perturbations,
                                        "load_average_before": load.get("load_average")})
                        if r == 0:
                            profile = {m: breakdown(before, after, m) for m in (ISP, ENCODER)}
                    out[(case, mode)] = {"repeats": repeats, "triton": profile, "concurrency": concurrency,
                                         "values": _values(frame, cells.cell_ids, vocabulary)}
                    rates = [r["perturbations"] / r["seconds"] for r in repeats]
                    LOGGER.info("%s %s: median %.1f perturbations/s; %s executes for %s requests", case, mode,
                                float(np.median(rates)), profile[ISP]["executions"], profile[ISP]["requests"])
    return out


def run_upstream(options: MulticellOptions, checkpoint: Path, tokens_npz: Path, work: Path) -> dict:
    """Upstream's InSilicoPerturber per case, ``repeats`` runs in one process (bench/upstream_driver.py)."""
    from tests.oracle_env import helical_python, oracle_environment

    folder = work / "upstream"
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for case in options.cases:
        perturbation, targets = CASES[case]
        argv = ["--cells", "all", "--perturb-type", perturbation, "--genes", ",".join(targets) if targets else "all",
                "--emb-mode", "cell", "--emb-layer", "-1", "--forward-batch-size", "100", "--no-stats",
                "--threads", str(options.threads)]
        runs += [{"argv": argv, "output": str(folder / f"{case}_{r}.json"), "phase": case} for r in range(options.repeats)]
    plan = {"oracle_dir": str(shared_dir() / "reference" / "oracle"), "model_dir": str(checkpoint),
            "dict_dir": str(default_dictionaries()), "tokens": str(tokens_npz), "work_dir": str(folder),
            "phase_file": str(folder / "phase"), "runs": runs}
    (folder / "plan.json").write_text(json.dumps(plan, indent=1))
    env = oracle_environment()
    env["OMP_NUM_THREADS"] = str(options.threads)
    run_sampled([str(helical_python()), str(REPO_ROOT / "bench" / "upstream_driver.py"), str(folder / "plan.json")],
                env, folder / "run.log", options.timeout_s, folder / "phase")
    out = {}
    for case in options.cases:
        results = [json.loads((folder / f"{case}_{r}.json").read_text()) for r in range(options.repeats)]
        values = {(s["cell"], tuple(s["perturbed"])): float(s["cos"]) for s in results[-1]["cell_shifts"]
                  if s.get("state") is None}
        out[case] = {"repeats": [{"seconds": r["seconds"]["perturb_data"], "perturbations": r["n_perturbations"]}
                                 for r in results], "values": values,
                     "source": results[-1]["upstream"]["git"][:7] or results[-1]["upstream"]["path"]}
    return out


def _method(repeats: list[dict]) -> dict:
    return {"perturbations": repeats[0]["perturbations"],
            "seconds": _summary([r["seconds"] for r in repeats]),
            "perturbations_per_s": _summary([r["perturbations"] / r["seconds"] for r in repeats])}


def run(options: MulticellOptions) -> dict:
    """Prepare, run every case and mode, compare the values; the report dict (also written to ``out``)."""
    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    started, before = time.perf_counter(), machine_state()
    work = Path(options.work or tempfile.mkdtemp(prefix="isp-multicell-"))
    work.mkdir(parents=True, exist_ok=True)
    vocabulary = load_vocabulary(default_dictionaries())
    cells = norman_control_cells(vocabulary, options.cells)
    tokenizer = RankValueTokenizer(vocabulary, 2048, False)
    tokens = [tokenizer.tokenize_gene_lists(*(a[None, :] for a in cells.cell(r)), cells.n_counts[r: r + 1])[0]
              for r in range(len(cells))]
    tokens_npz = work / "tokens.npz"
    np.savez(tokens_npz, *[t.astype(np.int64) for t in tokens])
    checkpoint = prepare_checkpoint(vocabulary, work / "checkpoint", options.seed)
    repository = export_repository(checkpoint, work / "model_repository")
    served = run_served(options, repository, cells, vocabulary, work)
    upstream = run_upstream(options, checkpoint, tokens_npz, work) if options.upstream else {}
    report: dict = {"options": asdict(options), "cells": {"source": "perturbench_norman19_k562.h5ad control",
                                                          "count": len(cells), "tokens": [int(t.size) for t in tokens]},
                    "backend": served["backend"], "encoder": ENCODER, "cases": {}}
    for case in options.cases:
        entry: dict = {}
        alone, merged = served[(case, "one_at_a_time")], served[(case, "merged")]
        for mode, result in (("one_at_a_time", alone), ("merged", merged)):
            entry[mode] = {**_method(result["repeats"]), "concurrency": result["concurrency"], "triton": result["triton"],
                           "load_average_before": [r["load_average_before"] for r in result["repeats"]]}
        entry["merged"]["max_abs_diff_vs_one_at_a_time"] = _max_diff(merged["values"], alone["values"])
        if case in upstream:
            entry["upstream"] = {**_method(upstream[case]["repeats"]), "source": upstream[case]["source"]}
            for mode, result in (("one_at_a_time", alone), ("merged", merged)):
                entry[mode]["max_abs_diff_vs_upstream"] = _max_diff(result["values"], upstream[case]["values"])
        report["cases"][case] = entry
    report["machine"] = {"before": before, "after": machine_state(), "seconds": time.perf_counter() - started}
    if options.out:
        write(report, Path(options.out))
    return report


def write(report: dict, out: Path) -> None:
    """``isp_multicell.json`` and ``report.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "isp_multicell.json").write_text(json.dumps(report, indent=1))
    lines = ["# Served ISP: cells merged vs one request at a time (issue 15)", "",
             f"Cells: {report['cells']['count']} Norman K562 control cells, {min(report['cells']['tokens'])}-"
             f"{max(report['cells']['tokens'])} tokens. Encoder {report['encoder']} ({report['backend']}), "
             f"seeded random gf-6L-10M-i2048, CPU configs. Medians of {report['options']['repeats']} repeats (min-max).",
             "", "| case | method | perturbations | seconds | perturbations/s | geneformer_isp requests / executes | "
             "encoder executes | max abs diff vs upstream |", "|---|---|---|---|---|---|---|---|"]
    for case, entry in report["cases"].items():
        for method in ("upstream", "one_at_a_time", "merged"):
            if method not in entry:
                continue
            m = entry[method]
            rate, secs = m["perturbations_per_s"], m["seconds"]
            triton = m.get("triton", {})
            isp, enc = triton.get(ISP), triton.get(ENCODER)
            executes = f"{isp['requests']:.0f} / {isp['executions']:.0f}" if isp else ""
            encoder = f"{enc['executions']:.0f}" if enc else ""
            diff = f"{m['max_abs_diff_vs_upstream']:.1e}" if "max_abs_diff_vs_upstream" in m else ""
            name = method if method == "upstream" else f"{method} (concurrency {m['concurrency']})"
            lines.append(f"| {case} | {name} | {m['perturbations']} | {secs['median']:.2f} ({secs['min']:.2f}-"
                         f"{secs['max']:.2f}) | {rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f}) | "
                         f"{executes} | {encoder} | {diff} |")
    lines.append("")
    machine = report["machine"]
    lines += ["Merged vs one-at-a-time values: " + ", ".join(
        f"{case} max abs diff {entry['merged']['max_abs_diff_vs_one_at_a_time']:.1e}" for case, entry in report["cases"].items()),
              "", f"Machine: 2 cores shared with other users; load average {machine['before'].get('load_average')} "
              f"before, {machine['after'].get('load_average')} after; per-repeat load averages in the JSON. "
              f"Whole run {machine['seconds']:.0f} s. Triton columns: its metrics over the first repeat.", ""]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = MulticellOptions()
    parser.add_argument("--cells", type=int, default=defaults.cells)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="merged: cells in flight")
    parser.add_argument("--cases", default=",".join(defaults.cases), help=f"comma list of {list(CASES)}")
    parser.add_argument("--no-upstream", action="store_true", help="skip upstream's InSilicoPerturber baseline")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default=None)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    report = run(MulticellOptions(cells=a.cells, repeats=a.repeats, concurrency=a.concurrency,
                                  cases=tuple(c for c in a.cases.split(",") if c), upstream=not a.no_upstream,
                                  threads=a.threads, out=a.out, work=a.work))
    print(json.dumps({case: {m: e[m]["perturbations_per_s"]["median"] for m in e if isinstance(e[m], dict)
                             and "perturbations_per_s" in e[m]} for case, e in report["cases"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
