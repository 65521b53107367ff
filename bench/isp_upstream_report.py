"""Results of :mod:`geneformer_triton.bench.isp_upstream_bench`: ``isp_upstream.csv|json``, ``report.md``, ``isp_upstream.png``.

Ratios are medians over medians: ``x upstream`` = median perturbations/s of a method / median perturbations/s
of upstream in the same ``emb_mode``. The CPU target (issue 15): served >= 5x upstream at equal numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from geneformer_triton.bench.isp_upstream_bench import BenchContext, MethodResult

CPU_TARGET = 5.0
CSV_NAME, JSON_NAME, REPORT_NAME, PLOT_NAME = "isp_upstream.csv", "isp_upstream.json", "report.md", "isp_upstream.png"


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add ``x_upstream`` (median rate / upstream's median rate, same emb_mode) to each summary row."""
    base = {r["emb_mode"]: r["median_perturbations_per_s"] for r in rows if r["method"] == "upstream"}
    for r in rows:
        ref = base.get(r["emb_mode"])
        r["x_upstream"] = r["median_perturbations_per_s"] / ref if ref else float("nan")
    return rows


def environment() -> dict:
    import torch

    from geneformer_triton.core.host import cpu_name

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": cpu_name(), "torch": torch.__version__}


def served_profile(result: "MethodResult", inprocess: "MethodResult | None") -> dict:
    """Where one served repeat's time went: Triton's metrics (repeat 0), the client's wall time and, for the
    numpy reduction inside the BLS model, the same code's time measured in process.

    Server times are summed over requests (the encoder's compute is one instance's busy time; with several
    cells or chunks in flight the ISP model's request times overlap).
    """
    profile = result.details.get("triton_profile") or {}
    isp = profile.get("geneformer_isp")
    encoder = next((profile[m] for m in ("geneformer_onnx_isp_reduced", "geneformer_onnx_isp") if profile.get(m)), None)
    if not isp or not encoder:
        return {}
    client_s = result.details["repeats"][0]["seconds"]
    isp_s = isp["request_ms"] * isp["requests"] / 1e3
    encoder_compute_s = encoder["compute_infer_ms_per_exec"] * encoder["executions"] / 1e3
    encoder_io_s = (encoder["compute_input_ms"] + encoder["compute_output_ms"]) * encoder["requests"] / 1e3
    reduce_s = inprocess.details["repeats"][0]["plan_and_reduce_s"] if inprocess else float("nan")
    return {
        "client_wall_s": client_s,
        "isp_model_s": isp_s,
        "encoder_compute_s": encoder_compute_s,
        "encoder_tensor_io_s": encoder_io_s,
        "plan_and_reduce_s_in_process": reduce_s,
        "bls_transport_and_overhead_s": isp_s - encoder_compute_s - encoder_io_s - (0.0 if np.isnan(reduce_s) else reduce_s),
        "client_grpc_and_writing_s": client_s - isp_s,
        "encoder_calls": encoder["executions"],
        "encoder_avg_batch": encoder["avg_batch"],
        "encoder_queue_ms_per_call": encoder["queue_ms"],
        "overlapping_requests": isp["requests"] > 1,
    }


def inprocess_profile(result: "MethodResult") -> dict:
    first = result.details["repeats"][0]
    return {"total_s": first["seconds"], "encoder_s": first["encoder_s"], "plan_and_reduce_s": first["plan_and_reduce_s"]}


def _fmt_range(median: float, low: float, high: float, digits: int = 1) -> str:
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def notes(context: "BenchContext") -> list[str]:
    """How the run was set up, in words (report.md "Notes")."""
    options = context.options
    if options.mode == "quick":
        cells = (f"quick mode: the first {options.quick_cells} celltypist cell(s) cut to their top "
                 f"{options.quick_length} ranked genes (CI-sized; figures say little about speed)")
    else:
        cells = (f"for each target length ({', '.join(map(str, options.lengths))} tokens) the first of the sample's first "
                 "160 cells whose full (untruncated) length is closest; one ~500-token cell on CPU keeps the whole run "
                 "(upstream at ~9 perturbations/s: 2 emb modes x 3 repeats of ~55 s) near 12 minutes")
    return [
        f"Cells: {cells}.",
        f"Upstream forward batch: {UPSTREAM_BATCH_NOTE.format(max_len=options.full_batch_max_length, long=options.long_batch)}.",
        "Timing: upstream = its own `perturb_data` timing in the oracle runner (loading the model and the dataset, every "
        "forward pass, writing its result pickles; interpreter start-up and imports excluded); in process = our ISP "
        "job on an already loaded encoder; served = the client's wall time for all cells against a warm server "
        "(one warm-up request on a 32-gene prefix first). Repeats run in one process per method.",
        "Served code: Triton's python-backend stubs ignore PYTHONPATH, so the served worker links this checkout's "
        "`geneformer_triton` into the server's working directory (first on the stubs' `sys.path`); without it an "
        "editable install of another checkout would serve its code.",
        "Values: upstream's `(perturbed, \"cell_emb\")` shifts and `(perturbed, affected)` gene cosines from its raw "
        "pickles vs our `cell_emb_shift` and `gene_cos` on the same keys (cell, perturbed token[, affected token]); "
        f"`agrees` = identical key sets and max abs diff <= {options.atol:g}.",
    ]


UPSTREAM_BATCH_NOTE = ("100 (its default) when every cell has <= {max_len} tokens, else {long} (batch 100 on "
                       "2,048-token cells needs ~7 GB per attention map; on 448-574-token cells it peaked at 7.0 GB RSS)")


def load_note(machine: dict, cpus: int) -> str:
    """What the 1-minute load average when the run started (``machine["before"]``) says about the figures on a
    host of ``cpus`` CPUs (the report's recorded ``environment["cpu_count"]``, not the rendering host's)."""
    load = (machine["before"].get("load_average") or [float("nan")])[0]
    if load >= 0.5 * cpus:
        return (f"Other work was running when the run started (1-minute load {load:.2f} on {cpus} CPUs): absolute "
                "figures are noisy; compare ratios from one run.")
    return f"The machine was otherwise idle when the run started (1-minute load {load:.2f} on {cpus} CPUs)."


def _markdown(report: dict) -> str:
    rows = report["results"]
    cells = report["cells"]
    machine = report["machine"]
    cell_list = ", ".join(f"{c['name']} ({c['tokens']} tokens)" for c in cells)
    lines = [
        f"# ISP `delete all` vs upstream Geneformer `InSilicoPerturber` ({report['mode']} mode)",
        "",
        f"Cells: {cell_list} (real celltypist cells, our tokenizer, "
        f"V1 dictionaries); {report['perturbations']} perturbations per run (every gene deleted in turn); "
        f"checkpoint {report['model']} with seeded random weights (seed {report['seed']}), written with `save_pretrained`, "
        f"loaded by upstream as `BertForMaskedLM` and by us; `emb_layer={report['emb_layer']}`. "
        f"Medians of {report['repeats']} repeats (min-max). Peak memory: peak sum of RSS over each method's process tree "
        "(psutil, 50 ms sampling; shared pages counted per process).",
        "",
        "## Results",
        "",
        "| method | emb_mode | perturbations/s | s per run | x upstream | peak RSS MiB | max abs diff cell_emb | max abs diff gene cos | agrees |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['emb_mode']} | "
            f"{_fmt_range(r['median_perturbations_per_s'], r['min_perturbations_per_s'], r['max_perturbations_per_s'])} "
            f"| {_fmt_range(r['median_s'], r['min_s'], r['max_s'], 2)} | {r['x_upstream']:.2f} | {r['peak_rss_mib']:,.0f} "
            f"| {r['max_abs_diff_cell_emb']:.1e} | {r['max_abs_diff_gene_cos']:.1e} | {'yes' if r['agrees_with_upstream'] else 'NO'} |")
    lines += ["", "Methods:", ""] + [f"- `{m}`: {d}" for m, d in report["descriptions"].items()]
    target = report["target"]
    lines += ["", f"## CPU target: served >= {CPU_TARGET:g}x upstream at equal numbers", ""]
    for mode, value in target["served_x_upstream"].items():
        lines.append(f"- `{mode}`: served {value:.2f}x upstream: {'met' if value >= CPU_TARGET else 'NOT met'}")
    if report.get("profile"):
        p = report["profile"]
        lines += ["", "## Where the time goes (repeat 0)", ""]
        if p.get("served"):
            s = p["served"]
            lines += [f"Served (`{p['served_mode']}`; Triton metrics, summed over requests): client wall "
                      f"{s['client_wall_s']:.2f} s; inside `geneformer_isp` {s['isp_model_s']:.2f} s = encoder compute "
                      f"{s['encoder_compute_s']:.2f} s ({s['encoder_calls']:.0f} calls, avg batch {s['encoder_avg_batch']:.1f}) + "
                      f"encoder tensor I/O {s['encoder_tensor_io_s']:.2f} s + planning and numpy reduction "
                      f"{s['plan_and_reduce_s_in_process']:.2f} s (timed in process, where token embeddings are reduced on the "
                      f"host; served, the reduced encoder does it in its graph) + BLS transport and Python overhead "
                      f"{s['bls_transport_and_overhead_s']:.2f} s; "
                      + ("several cells were in flight, so server times overlap and the client share is not separable."
                         if s["overlapping_requests"] else
                         f"client, gRPC and result writing {s['client_grpc_and_writing_s']:.2f} s."), ""]
        if p.get("inprocess"):
            i = p["inprocess"]
            lines += [f"In process (`{p['served_mode']}`): {i['total_s']:.2f} s = encoder {i['encoder_s']:.2f} s + "
                      f"planning and numpy reduction {i['plan_and_reduce_s']:.2f} s.", ""]
    lines += ["## Machine", "",
              f"{report['environment']['platform']}, {report['environment']['processor'] or 'CPU model not recorded'}, "
              f"{report['environment']['cpu_count']} CPUs, torch "
              f"{report['environment']['torch']} (ours). Load average before {machine['before'].get('load_average')} "
              f"({machine['before']['utc']}), after {machine['after'].get('load_average')} ({machine['after']['utc']}); "
              f"whole run {machine['seconds']:.0f} s. {report['note']}", "", "## Notes", ""]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["emb_mode"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, method in enumerate(methods):
        sel = [next((r for r in rows if r["method"] == method and r["emb_mode"] == m), None) for m in modes]
        med = np.array([r["median_perturbations_per_s"] if r else np.nan for r in sel])
        low = np.array([r["min_perturbations_per_s"] if r else np.nan for r in sel])
        high = np.array([r["max_perturbations_per_s"] if r else np.nan for r in sel])
        x = np.arange(len(modes)) + (k - (len(methods) - 1) / 2) * width
        bars = ax.bar(x, med, width, yerr=[med - low, high - med], capsize=4, label=method)
        for bar, r in zip(bars, sel):
            if r:  # above the error bar
                ax.annotate(f"{r['x_upstream']:.1f}x", (bar.get_x() + bar.get_width() / 2, r["max_perturbations_per_s"]),
                            textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_ylim(0, 1.15 * max(r["max_perturbations_per_s"] for r in rows))  # room for the labels
    ax.set_xticks(np.arange(len(modes)), [f"emb_mode={m}" for m in modes])
    ax.set_ylabel("perturbations / s (median, min-max)")
    ax.set_title(f"ISP delete all: ours vs upstream InSilicoPerturber\n{subtitle}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(context: "BenchContext", results: list["MethodResult"], machine: dict) -> dict:
    """Write the four files into ``context.out``; returns the report dict (also the JSON's content)."""
    out = context.out
    out.mkdir(parents=True, exist_ok=True)
    options = context.options
    rows = with_ratios([r.summary() for r in results])
    served = {r["emb_mode"]: r["x_upstream"] for r in rows if r["method"] == "served"}
    profile: dict = {}
    mode = "cell_and_gene" if "cell_and_gene" in options.emb_modes else options.emb_modes[0]
    chosen = {r.method: r for r in results if r.emb_mode == mode}
    if "inprocess" in chosen:
        profile["inprocess"] = inprocess_profile(chosen["inprocess"])
    if "served" in chosen:
        profile["served"] = served_profile(chosen["served"], chosen.get("inprocess"))
    if profile:
        profile["served_mode"] = mode
    host = environment()
    report = {
        "mode": options.mode, "model": "gf-6L-10M-i2048", "seed": options.seed, "emb_layer": options.emb_layer,
        "repeats": options.repeats, "cells": [c.describe() for c in context.cells],
        "perturbations": int(sum(c.tokens.size for c in context.cells)),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(options).items()},
        "environment": host, "machine": machine, "results": rows,
        "descriptions": {f"{r.method}/{r.emb_mode}": r.description for r in results},
        "details": {f"{r.method}/{r.emb_mode}": r.details for r in results},
        "target": {"cpu_served_x_upstream": CPU_TARGET, "served_x_upstream": served,
                   "met": bool(served) and all(v >= CPU_TARGET for v in served.values())},
        "profile": profile,
        "notes": notes(context),
        "note": load_note(machine, host["cpu_count"] or 1),
        "files": {"csv": str(out / CSV_NAME), "json": str(out / JSON_NAME), "report": str(out / REPORT_NAME),
                  "plot": str(out / PLOT_NAME)},
    }
    pd.DataFrame(rows).to_csv(out / CSV_NAME, index=False)
    (out / JSON_NAME).write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    (out / REPORT_NAME).write_text(_markdown(report))
    lengths = " + ".join(str(c["tokens"]) for c in report["cells"])
    _plot(rows, out / PLOT_NAME, f"{options.mode} mode, cells of {lengths} tokens, x = vs upstream (median)")
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


__all__ = ["CPU_TARGET", "with_ratios", "write_report"]
