"""Results folder: CSV + JSON tables, targets, report.md and PNG plots.

Files in ``bench/results/<date>-<host>[-mode]/``:
``inprocess.csv|json`` (one row per method), ``triton.csv|json`` (one row per model x protocol x
concurrency), ``triton_metrics.csv`` (server-side breakdown per composing model), ``scaling.csv|json``,
``summary.json`` (environment, cells, FLOP formula, targets), ``report.md``, ``perf_analyzer/*.csv``
(perf_analyzer's own CSVs and logs), ``perf_inputs/*.json`` and the plots
``throughput_by_method.png``, ``speedup_over_baseline.png``, ``fidelity_by_method.png``,
``latency_percentiles.png``, ``triton_throughput.png``, ``scaling.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_triton.bench.inprocess import INPROCESS_COLUMNS
from geneformer_triton.bench.methods import HELICAL as SEED
from geneformer_triton.bench.methods import REFERENCE
from geneformer_triton.bench.scaling import SCALING_COLUMNS, fit_cells_cost, fit_length_cost
from geneformer_triton.bench.stats import range_text
from geneformer_triton.bench.triton_bench import TRITON_COLUMNS
from geneformer_triton.core.host import cpu_features, cpu_name

LOGGER = logging.getLogger(__name__)

SERVED_RATIO_TARGET = 20.0  # best served path over the seed baseline, cells/s
TRITON_EFFICIENCY_TARGET = 0.9  # served over the same backend in process, every concurrency >= 2
GPU_CELLS_PER_S_TARGET = 10_000.0


def default_out_dir(mode: str, root: Path | None = None) -> Path:
    host = "".join(c if (c.isalnum() or c in "-_") else "-" for c in socket.gethostname()) or "host"
    root = root or Path(__file__).resolve().parent / "results"
    suffix = "" if mode == "full" else f"-{mode}"
    return root / f"{time.strftime('%Y-%m-%d')}-{host}{suffix}"


def environment() -> dict:
    import psutil

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_start": list(os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    from importlib import metadata

    for module in ("torch", "onnxruntime", "transformers", "numpy", "tritonclient", "nvidia-pytriton"):
        try:
            info[module] = metadata.version(module)
        except metadata.PackageNotFoundError:
            info[module] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return info


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_table(rows: list[dict], columns: list[str], out_dir: Path, stem: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame.columns:
            frame[column] = np.nan
    frame = frame[columns + [c for c in frame.columns if c not in columns]]
    frame.to_csv(out_dir / f"{stem}.csv", index=False)
    (out_dir / f"{stem}.json").write_text(json.dumps(_json_safe(frame.to_dict(orient="records")), indent=1) + "\n")
    return frame


# ----------------------------------------------------------------------------------------------- targets
def _ok(frame: pd.DataFrame | None) -> pd.DataFrame:
    if frame is None or not len(frame):
        return pd.DataFrame()
    return frame[frame["error"].fillna("") == ""]


def seed_row(inprocess: pd.DataFrame) -> pd.Series | None:
    """The seed baseline (helical 3.1.4 get_embeddings, batch 10, in its venv) when it was measured."""
    ok = _ok(inprocess)
    if not len(ok) or SEED not in set(ok["method"]):
        return None
    return ok[ok["method"] == SEED].iloc[0]


def add_served_ratios(triton: pd.DataFrame | None, inprocess: pd.DataFrame) -> None:
    """``ratio_vs_seed`` (cells/s over the seed's) and ``cpu_ratio_vs_seed`` (the seed's CPU s per cell
    over the tritonserver tree's) for every served row; ``gate_pass``: the in-process run of the same
    backend and file held its fidelity threshold."""
    if triton is None or not len(triton):
        return
    seed = seed_row(inprocess)
    rate = float(seed["cells_per_s"]) if seed is not None else float("nan")
    cpu = float(seed["cpu_s_per_cell"]) if seed is not None else float("nan")
    triton["ratio_vs_seed"] = triton["cells_per_s"] / rate
    triton["cpu_ratio_vs_seed"] = cpu / triton["server_cpu_s_per_cell"]
    gates = dict(zip(inprocess["method"], inprocess["fidelity_pass"])) if len(inprocess) else {}
    triton["gate_pass"] = [bool(gates.get(m, False)) for m in triton["inprocess_method"]]


def evaluate_targets(inprocess: pd.DataFrame, triton: pd.DataFrame | None, mode: str) -> list[dict]:
    """The issue's targets, each stated with every figure it rests on (no selection after the fact:
    "best" means the highest median over every served row, and the efficiency target must hold at every
    concurrency >= 2)."""
    targets = []
    ok = _ok(inprocess)
    served = _ok(triton)
    seed = seed_row(inprocess)
    if mode == "gpu" and len(served):
        best = served.sort_values("cells_per_s", ascending=False).iloc[0]
        targets.append({
            "target": f"GPU: >= {GPU_CELLS_PER_S_TARGET:,.0f} cells/s through Triton",
            "value": f"{best['model']} {best['protocol']} c{int(best['concurrency'])}: {range_text(best, digits=0)} cells/s",
            "passed": bool(best["cells_per_s"] >= GPU_CELLS_PER_S_TARGET),
        })
    if len(served):
        held = served[served["gate_pass"] == True]  # noqa: E712
        if seed is None:
            targets.append({"target": f"best served path >= {SERVED_RATIO_TARGET:.0f}x the seed baseline ({SEED}, batch 10)",
                            "value": "seed baseline not measured in this run (helical venv missing or cells truncated)",
                            "passed": False})
        elif len(held):
            best = held.sort_values("cells_per_s", ascending=False).iloc[0]
            targets.append({
                "target": f"best served path >= {SERVED_RATIO_TARGET:.0f}x the seed baseline ({SEED}, batch 10), gates held",
                "value": (f"{best['model']} {best['protocol']} c{int(best['concurrency'])}: {range_text(best)} vs "
                          f"{range_text(seed)} cells/s = {best['ratio_vs_seed']:.2f}x (per CPU-second "
                          f"{best['cpu_ratio_vs_seed']:.2f}x)"),
                "passed": bool(best["ratio_vs_seed"] >= SERVED_RATIO_TARGET),
            })
    names = set(ok["method"]) if len(ok) else set()
    for onnx, torch_name in (("onnx_fp32_b1", "torch_fp32_b1"), ("onnx_fp32_b1", "torchscript_fp32_b1"),
                             ("onnx_fp32_sorted", REFERENCE), ("onnx_int8_b1", "torch_int8_b1"),
                             ("onnx_int8_b1", "torchscript_bf16_b1")):
        if onnx in names and torch_name in names:
            a = ok[ok["method"] == onnx].iloc[0]
            b = ok[ok["method"] == torch_name].iloc[0]
            targets.append({"target": f"ONNX path not slower than PyTorch ({onnx} vs {torch_name}, in process)",
                            "value": f"{range_text(a)} vs {range_text(b)} cells/s ({a['cells_per_s'] / b['cells_per_s']:.2f}x)",
                            "passed": bool(a["cells_per_s"] >= b["cells_per_s"])})
    if len(served):
        for protocol in ("grpc",):
            pair = served[served["protocol"] == protocol]
            for c in sorted(pair["concurrency"].unique()):
                at = pair[pair["concurrency"] == c].set_index("model")["cells_per_s"]
                if "geneformer_onnx" in at and "geneformer_torchscript" in at:
                    targets.append({"target": f"ONNX not slower than PyTorch served ({protocol} c{int(c)}: "
                                              "geneformer_onnx vs geneformer_torchscript)",
                                    "value": f"{at['geneformer_onnx']:.2f} vs {at['geneformer_torchscript']:.2f} cells/s",
                                    "passed": bool(at["geneformer_onnx"] >= at["geneformer_torchscript"])})
        high = served[served["concurrency"] >= 2]
        for model, group in high.groupby("model", sort=False):
            values = ", ".join(f"{r.protocol} c{int(r.concurrency)} {r.efficiency:.0%}" for r in group.itertuples())
            worst = float(group["efficiency"].min())
            targets.append({
                "target": f"served >= {TRITON_EFFICIENCY_TARGET:.0%} of the same backend in process at every concurrency >= 2: {model}",
                "value": f"{values} (vs {group['inprocess_method'].iloc[0]})",
                "passed": bool(worst >= TRITON_EFFICIENCY_TARGET),
            })
    return targets


# ----------------------------------------------------------------------------------------------- plots
def _plots(out_dir: Path, inprocess: pd.DataFrame, triton: pd.DataFrame | None, scaling: pd.DataFrame | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = inprocess[inprocess["error"].fillna("") == ""].copy()
    if len(ok):
        colors = ok["family"].map({"baseline": "#999999", "helical": "#c07020", "encoder": "#2060b0"}).fillna("#2060b0")
        for column, name, xlabel, line in (
            ("cells_per_s", "throughput_by_method.png", "cells / s", None),
            ("ratio_vs_helical", "speedup_over_baseline.png", "x seed baseline (helical get_embeddings b10; cells/s, same run)", SERVED_RATIO_TARGET),
        ):
            fig, ax = plt.subplots(figsize=(9, 0.42 * len(ok) + 1.4))
            ax.barh(ok["method"], ok[column], color=colors)
            for y, value in enumerate(ok[column]):
                if value == value:
                    ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
            if line is not None:
                ax.axvline(line, color="red", linestyle="--", linewidth=1, label=f"target {line:.0f}x")
                ax.legend(loc="lower right")
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.set_title(f"{column.replace('_', ' ')} — {len(ok)} methods, {int(ok['n_cells'].iloc[0])} real cells")
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            written.append(name)
        fid = ok[ok["cosine_min"].notna()]
        if len(fid):
            fig, ax = plt.subplots(figsize=(9, 0.42 * len(fid) + 1.4))
            gap = np.clip(1.0 - fid["cosine_min"].to_numpy(dtype=float), 1e-9, None)
            ax.barh(fid["method"], gap, color=np.where(fid["fidelity_pass"].astype(bool), "#2a9d5c", "#d04040"))
            ax.set_xscale("log")
            ax.axvline(1e-5, color="black", linestyle="--", linewidth=1, label="fp32 threshold (min cos 0.99999)")
            ax.axvline(1e-3, color="gray", linestyle=":", linewidth=1, label="reduced precision (min cos 0.999)")
            ax.invert_yaxis()
            ax.set_xlabel("1 - min cosine vs fp32 reference (log; smaller is better; floor 1e-9)")
            ax.legend(loc="lower right", fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / "fidelity_by_method.png", dpi=110)
            plt.close(fig)
            written.append("fidelity_by_method.png")
    if triton is not None and len(triton):
        good = triton[triton["error"].fillna("") == ""]
        if len(good):
            fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
            for ax in axes:
                ax.set_prop_cycle(color=plt.cm.tab20.colors)
            for (model, protocol), group in good.groupby(["model", "protocol"], sort=False):
                group = group.sort_values("concurrency")
                axes[0].plot(group["concurrency"], group["cells_per_s"], marker="o", label=f"{model} {protocol}")
                axes[1].plot(group["concurrency"], group["p50_ms"], marker="o", label=f"{model} {protocol} p50")
                axes[1].fill_between(group["concurrency"], group["p50_ms"], group["p99_ms"], alpha=0.12)
            axes[0].set_xlabel("concurrency")
            axes[0].set_ylabel("cells / s")
            axes[0].set_xscale("log", base=2)
            axes[1].set_xlabel("concurrency")
            axes[1].set_ylabel("latency ms (p50 line, band to p99)")
            axes[1].set_xscale("log", base=2)
            axes[1].set_yscale("log")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / "triton_throughput.png", dpi=110)
            plt.close(fig)
            written.append("triton_throughput.png")
            fig, ax = plt.subplots(figsize=(11, 0.32 * len(good) + 1.5))
            labels = [f"{r.model} {r.protocol} c{int(r.concurrency)}" for r in good.itertuples()]
            y = np.arange(len(good))
            for offset, (column, color) in enumerate((("p50_ms", "#2060b0"), ("p90_ms", "#60a0d0"),
                                                      ("p95_ms", "#e0a040"), ("p99_ms", "#d04040"))):
                ax.barh(y + (offset - 1.5) * 0.2, good[column], height=0.2, color=color, label=column.replace("_ms", ""))
            ax.set_yticks(y, labels, fontsize=7)
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_xlabel("latency (ms, log)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / "latency_percentiles.png", dpi=110)
            plt.close(fig)
            written.append("latency_percentiles.png")
    if scaling is not None and len(scaling):
        good = scaling[scaling["error"].fillna("") == ""]
        sweeps = [s for s in ("cells", "length", "batch") if s in set(good["sweep"])]
        if sweeps:
            fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
            for ax, sweep in zip(axes[0], sweeps):
                part = good[good["sweep"] == sweep]
                for method, group in part.groupby("method", sort=False):
                    group = group.sort_values("x")
                    ax.plot(group["x"], group["cells_per_s"], marker="o", label=method)
                ax.set_xscale("log", base=2 if sweep != "cells" else 10)
                ax.set_yscale("log")
                ax.set_xlabel({"cells": "cells", "length": "tokens per cell", "batch": "batch size"}[sweep])
                ax.set_ylabel("cells / s")
                ax.set_title(f"throughput vs {sweep}")
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / "scaling.png", dpi=110)
            plt.close(fig)
            written.append("scaling.png")
    return written


# ----------------------------------------------------------------------------------------------- report
def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.{digits}f}"
    return str(value)


def _md_table(frame: pd.DataFrame, columns: list[tuple[str, str, int]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in frame.itertuples(index=False):
        data = row._asdict()
        lines.append("| " + " | ".join(_fmt(data.get(c[0]), c[2]) for c in columns) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, results: dict) -> dict[str, Path]:
    """Write every table, the plots and report.md from ``results`` (see geneformer_triton.bench.cli); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inprocess = write_table(results.get("inprocess", []), INPROCESS_COLUMNS, out_dir, "inprocess")
    triton = write_table(results["triton"], TRITON_COLUMNS, out_dir, "triton") if results.get("triton") else None
    if results.get("triton_metrics"):
        pd.DataFrame(results["triton_metrics"]).to_csv(out_dir / "triton_metrics.csv", index=False)
    scaling = write_table(results["scaling"], SCALING_COLUMNS, out_dir, "scaling") if results.get("scaling") else None
    mode = results.get("mode", "?")
    add_served_ratios(triton, inprocess)
    if triton is not None:
        triton.to_csv(out_dir / "triton.csv", index=False)
    targets = evaluate_targets(inprocess, triton, mode) if len(inprocess) else []
    fits = {}
    if scaling is not None:
        for method in scaling["method"].unique():
            fits[method] = {"length": fit_length_cost(results["scaling"], method), "cells": fit_cells_cost(results["scaling"], method)}
    summary = {k: v for k, v in results.items() if k not in ("inprocess", "triton", "triton_metrics", "scaling")}
    summary.update(targets=targets, scaling_fits=fits)
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    plots = _plots(out_dir, inprocess, triton, scaling) if len(inprocess) or triton is not None else []
    (out_dir / "report.md").write_text(_markdown(results, inprocess, triton, scaling, targets, fits, plots))
    LOGGER.info("results written to %s", out_dir)
    return {"dir": out_dir, "report": out_dir / "report.md"}


def _markdown(results, inprocess, triton, scaling, targets, fits, plots) -> str:
    env = results.get("environment", {})
    cells = results.get("cells", {})
    lines = [f"# Geneformer benchmark — {results.get('mode', '?')} mode, {env.get('host', '')}", ""]
    lines += [f"- started {env.get('started_at', '')}, {results.get('elapsed_s', 0):.0f} s; machine: {env.get('cpu', '')}, "
              f"{env.get('physical_cores', '')} cores, {env.get('memory_gb', '')} GB, "
              f"{'/'.join(env.get('cpu_features') or []) or 'no VNNI/BF16/AMX/FP16'}"
              + (f", GPU {env['gpu']}" if env.get("gpu") else ", no GPU"),
              f"- software: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, transformers {env.get('transformers')}, "
              f"tritonclient/perf_analyzer {env.get('tritonclient')}, python {env.get('python')}",
              f"- model: {results.get('model', {}).get('name', '')} ({results.get('model', {}).get('source', '')}); "
              "cost and fidelity do not depend on the weights' values",
              f"- cells: {cells.get('n_cells', '')} real cells ({cells.get('source', '')}), tokens per cell mean "
              f"{_fmt(cells.get('tokens_mean'), 0)}, median {_fmt(cells.get('tokens_median'), 0)}, "
              f"max {cells.get('tokens_max', '')}" + (f", truncated to {cells['max_length']} tokens" if cells.get("max_length") else ""),
              f"- FLOPs: {results.get('flops_formula', '')}",
              f"- machine load (1-min load average) at start {_fmt(env.get('loadavg_at_start', [float('nan')])[0])}: other processes share "
              "these cores, so cells per CPU-second is reported beside cells/s, and every row gives the load before/after",
              f"- timing: every method, baselines included, and every served point is run {results.get('config', {}).get('repeats', '?')} "
              "times (after a warm-up); figures are medians with (min-max); cells per CPU-second counts the CPU time of "
              "the process tree doing the work (this process; helical's venv process; the tritonserver tree with its "
              "backend stubs, psutil)", ""]
    lines += _headline(results, inprocess, triton)
    if targets:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['passed'] else 'NO'} |" for t in targets]
        lines.append("")
    if len(inprocess):
        shown = inprocess.copy()
        shown["rate"] = [range_text(r) for _, r in shown.iterrows()]
        shown["per_cpu"] = [range_text(r, "cells_per_cpu_s") for _, r in shown.iterrows()]
        lines += ["## In-process (same cells, same run)", "",
                  _md_table(shown, [("method", "method", 0), ("precision", "prec", 0), ("batching", "batching", 0),
                                        ("batch_size", "batch", 0), ("rate", "cells/s median (min-max)", 0),
                                        ("per_cpu", "cells per CPU-s", 0), ("tokens_per_s", "tokens/s", 0),
                                        ("ratio_vs_helical", "x seed", 2), ("cpu_ratio_vs_helical", "x seed (CPU s)", 2),
                                        ("ratio_vs_baseline", "x HF loop", 2), ("cpu_ratio_vs_baseline", "x HF loop (CPU s)", 2),
                                        ("useful_gflop_per_cell", "useful GFLOP/cell", 1), ("executed_gflop_per_cell", "executed GFLOP/cell", 1),
                                        ("useful_tflop_per_s", "useful TFLOP/s", 4),
                                        ("padding_waste", "padding", 3), ("cpu_s_per_cell", "CPU s/cell", 3),
                                        ("cpu_pct_mean", "CPU %", 0), ("rss_peak_mb", "peak RSS MB", 0),
                                        ("gpu_util_mean", "GPU %", 0), ("torch_cuda_peak_mb", "GPU MB", 0),
                                        ("cosine_min", "min cos", 7), ("cosine_mean", "mean cos", 7), ("fidelity_pass", "fidelity ok", 0),
                                        ("loadavg_before", "load before", 2), ("loadavg_after", "load after", 2)]),
                  ""]
        labels = inprocess[["method", "label"]]
        lines += ["Methods:", ""] + [f"- `{r.method}`: {r.label}" for r in labels.itertuples()] + [""]
        errors = inprocess[inprocess["error"].fillna("") != ""]
        if len(errors):
            lines += ["Not measured:", ""] + [f"- `{r.method}`: {r.error}" for r in errors.itertuples()] + [""]
        lines += ["Useful FLOPs count the encoder at the cells' true lengths; executed FLOPs add padding and the "
                  "LM head (baselines). Ratios: a method's median cells/s over the seed baseline's (`helical_get_embeddings`, "
                  "helical 3.1.4 batch 10) or the Geneformer-style `BertForMaskedLM` fp32 loop's (`baseline_eager_fp32_b10`) "
                  "in this run; `(CPU s)`: their CPU seconds per cell over the method's. Fidelity: "
                  "cosine of cell embeddings against the fp32 PyTorch encoder (`torch_fp32_sorted`); thresholds "
                  "0.99999 (fp32), 0.999 (bf16/fp16/int8).", ""]
    if triton is not None and len(triton):
        triton = triton.copy()
        triton["rate"] = [range_text(r) for _, r in triton.iterrows()]
        triton["per_cpu"] = [range_text(r, "cells_per_cpu_s") for _, r in triton.iterrows()]
        lines += ["## Through Triton (perf_analyzer, real cells, dynamic batching on): every model, protocol and concurrency", "",
                  f"Server configs: `--model-config-name={results.get('triton_info', {}).get('model_config_name')}`; backends: "
                  + (", ".join(f"{k}: {v}" for k, v in results.get("triton_info", {}).get("backends", {}).items()) or "?") + "; "
                  f"batch size per request {results.get('triton_info', {}).get('batch_size')}; in-process figure: the same "
                  "backend on the same cells, measured just before. Latencies in ms; the server-side split (queue, compute) "
                  "is perf_analyzer's; `enc avg batch` and `enc infer ms/exec` come from Triton's metrics endpoint. "
                  "GFLOP/cell: useful = the encoder at the cells' true lengths; executed = what the served model computes "
                  "(a padded model: each request at its longest cell; a `_packed` model: each cell at its own length, "
                  "whatever the dynamic batcher merges).", "",
                  _md_table(triton, [("model", "model", 0), ("protocol", "proto", 0), ("concurrency", "conc", 0),
                                     ("rate", "cells/s median (min-max)", 0), ("per_cpu", "cells per server CPU-s", 0),
                                     ("ratio_vs_seed", "x seed", 2), ("cpu_ratio_vs_seed", "x seed (CPU s)", 2),
                                     ("inprocess_cells_per_s", "in-process", 2),
                                     ("useful_gflop_per_cell", "useful GFLOP/cell", 2),
                                     ("executed_gflop_per_cell", "executed GFLOP/cell", 2),
                                     ("efficiency", "efficiency", 2), ("cpu_efficiency", "CPU-time eff.", 2),
                                     ("p50_ms", "p50", 0), ("p90_ms", "p90", 0),
                                     ("p95_ms", "p95", 0), ("p99_ms", "p99", 0), ("server_queue_ms", "queue", 1),
                                     ("server_compute_infer_ms", "compute", 1), ("network_ms", "network", 1),
                                     ("enc_avg_batch", "enc avg batch", 2), ("enc_compute_infer_ms_per_exec", "enc infer ms/exec", 1),
                                     ("tok_compute_infer_ms", "tokenizer ms", 1), ("server_cpu_pct_mean", "server CPU %", 0),
                                     ("server_rss_peak_mb", "server RSS MB", 0), ("loadavg_before", "load before", 2),
                                     ("loadavg_after", "load after", 2), ("error", "error", 0)]), ""]
    if scaling is not None and len(scaling):
        lines += ["## Scaling", "", _md_table(scaling, [("sweep", "sweep", 0), ("x", "x", 0), ("method", "method", 0),
                                                        ("n_cells", "cells", 0), ("tokens_mean", "tokens/cell", 0),
                                                        ("batch_size", "batch", 0), ("cells_per_s", "cells/s", 2),
                                                        ("tokens_per_s", "tokens/s", 0), ("ms_per_cell", "ms/cell", 1),
                                                        ("useful_tflop_per_s", "TFLOP/s", 4), ("padding_waste", "padding", 3)]), ""]
        lines += ["How cost grows:", ""]
        for method, fit in fits.items():
            length, cells_fit = fit.get("length") or {}, fit.get("cells") or {}
            if cells_fit:
                lines.append(f"- `{method}`, cells: total time ~ N^{cells_fit['loglog_slope']:.2f} over "
                             f"{', '.join(str(int(c)) for c in cells_fit['cells'])} cells (1.00 = linear: constant cost per cell).")
            if length:
                slopes = ", ".join(f"{s:.2f}" for s in length["loglog_slopes"])
                lines.append(f"- `{method}`, length: time per cell ≈ {length['a_ms_per_token'] * 1e3:.3f} µs·L + "
                             f"{length['b_ms_per_token2'] * 1e6:.4f} ns·L² (crossover L ≈ {length['crossover_tokens']:,.0f} tokens: "
                             f"attention's L² term dominates beyond it); log-log slopes between lengths: {slopes}.")
        good = scaling[(scaling["sweep"] == "batch") & (scaling["error"].fillna("") == "")]
        for method, group in good.groupby("method", sort=False):
            group = group.sort_values("x")
            best = group.loc[group["cells_per_s"].idxmax()]
            last = group.iloc[-1]
            lines.append(f"- `{method}`, batch: best at batch {int(best['x'])} ({best['cells_per_s']:.2f} cells/s); batch "
                         f"{int(last['x'])} gives {last['cells_per_s'] / best['cells_per_s']:.0%} of that with "
                         f"{last['padding_waste']:.0%} padded tokens (length-sorted batches of real cells).")
        lines.append("- Total time over N cells should grow linearly (constant cost per cell); departures from slope 1.00 "
                     "in the cells sweep come from changes in machine load over its minutes (loadavg in the CSV).")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Files: `inprocess.csv|json`, `triton.csv|json`, `triton_metrics.csv`, `scaling.csv|json`, `summary.json`, "
              "`perf_analyzer/` (perf_analyzer's CSVs and logs), `perf_inputs/` (its input JSON, real cells).", ""]
    return "\n".join(lines)


def _headline(results: dict, inprocess: pd.DataFrame, triton: pd.DataFrame | None) -> list[str]:
    """The served path declared in the mode's config (``headline_model``), at every concurrency of its
    protocol, against the seed baseline: the figure the README quotes."""
    config = results.get("config", {})
    model, protocol = config.get("headline_model"), config.get("headline_protocol", "grpc")
    seed = seed_row(inprocess) if len(inprocess) else None
    lines = ["## Headline: the served path", ""]
    if triton is None or not len(triton) or model not in set(triton["model"]):
        return lines + [f"`{model}` was not served in this run.", ""]
    rows = triton[(triton["model"] == model) & triton["protocol"].isin([protocol, f"{protocol}+client"])]
    seed_text = (f"{range_text(seed)} cells/s, {range_text(seed, 'cells_per_cpu_s', 3)} cells per CPU-second"
                 if seed is not None else "not measured in this run")
    lines += [f"`{model}` ({protocol}, raw counts in, cell embeddings out, through a real tritonserver; declared "
              f"in the mode's config before the run, not picked from the results). Seed baseline "
              f"(`{SEED}`, helical 3.1.4 get_embeddings, batch 10, its own venv): {seed_text}.", "",
              "| measured by | concurrency | cells/s median (min-max) | cells per server CPU-s | x seed (cells/s) | x seed (CPU s) | "
              "efficiency vs in-process | load before/after |", "|---|---|---|---|---|---|---|---|"]
    for r in rows.itertuples():
        row = r._asdict()
        who = "project client (GeneformerClient)" if r.protocol.endswith("+client") else "perf_analyzer"
        lines.append(f"| {who} | {int(r.concurrency)} | {range_text(row)} | {range_text(row, 'cells_per_cpu_s', 3)} | "
                     f"{_fmt(row.get('ratio_vs_seed'))} | {_fmt(row.get('cpu_ratio_vs_seed'))} | {_fmt(row.get('efficiency'))} | "
                     f"{_fmt(row.get('loadavg_before'))} / {_fmt(row.get('loadavg_after'))} |")
    return lines + [""]


def load_tables(out_dir: Path) -> dict:
    """The tables a results folder holds (empty where absent), rows as written (NaN for nulls)."""
    def load(stem: str) -> list[dict]:
        path = out_dir / f"{stem}.json"
        if not path.is_file():
            return []
        rows = json.loads(path.read_text())
        rows = [{k: (float("nan") if v is None else v) for k, v in row.items()} for row in rows]
        for row in rows:
            row["error"] = row.get("error") if isinstance(row.get("error"), str) else ""
        return rows

    tables = {stem: load(stem) for stem in ("inprocess", "triton", "scaling")}
    metrics = out_dir / "triton_metrics.csv"
    tables["triton_metrics"] = pd.read_csv(metrics).to_dict(orient="records") if metrics.is_file() else []
    summary = out_dir / "summary.json"
    tables["triton_info"] = json.loads(summary.read_text()).get("triton_info", {}) if summary.is_file() else {}
    return tables


def rewrite(out_dir: Path) -> dict[str, Path]:
    """Re-read a results folder's tables and write its report again (ratios recomputed): for folders
    written by an older version, or after editing or merging tables."""
    from geneformer_triton.bench.inprocess import add_ratios

    results = json.loads((out_dir / "summary.json").read_text())
    results.pop("targets", None)
    results.pop("scaling_fits", None)
    results.update(load_tables(out_dir))
    add_ratios(results["inprocess"])
    from geneformer_triton.bench.triton_bench import _set_efficiency, select_throughput

    for row in results["triton"]:
        if row.get("error"):
            continue
        select_throughput(row)
        if "inprocess_before" in row:
            _set_efficiency(row, (row["inprocess_before"], row.get("inprocess_cpu_s_per_cell", float("nan"))),
                            (row.get("inprocess_after", float("nan")), row.get("inprocess_cpu_s_per_cell", float("nan"))))
    return write_results(out_dir, results)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    for folder in sys.argv[1:] or [str(default_out_dir("full"))]:
        print(rewrite(Path(folder))["report"])
