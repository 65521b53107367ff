"""In-process benchmark: every method on the same real cells, timed, sampled, checked against fp32.

Per method: cells/s, tokens/s, useful and executed FLOP/s (``geneformer_triton.bench.cells.Architecture``), CPU% and
peak RSS (psutil), GPU utilization and memory (NVML, torch's allocator peak), fidelity (min/mean cosine
of cell embeddings against the fp32 PyTorch encoder reference), ratio to the original baseline and to
helical's path. CPU seconds per cell are recorded too: on a shared machine they show a method's own
cost when other processes take cores.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import traceback
from typing import Callable

import numpy as np
import psutil

from geneformer_triton.bench.cells import Architecture, CellSet
from geneformer_triton.bench.methods import (
    BASELINE,
    HELICAL,
    HELICAL_STYLE,
    REFERENCE,
    BuildContext,
    MethodSpec,
    build_method,
    plan_batches,
    run_helical,
)
from geneformer_triton.bench.sampler import ResourceSampler, cpu_times
from geneformer_triton.bench.stats import summarize
from geneformer_triton.core.fidelity import embedding_fidelity, min_cosine_threshold

LOGGER = logging.getLogger(__name__)

INPROCESS_COLUMNS = [
    "method", "label", "family", "backend", "precision", "device", "batching", "batch_size", "token_budget",
    "n_cells", "tokens", "padded_tokens", "padding_waste", "batches", "repeats", "setup_s", "warmup_s", "wall_s",
    "wall_s_min", "wall_s_max", "cells_per_s", "cells_per_s_min", "cells_per_s_max", "cells_per_cpu_s",
    "cells_per_cpu_s_min", "cells_per_cpu_s_max", "loadavg_before", "loadavg_after", "tokens_per_s",
    "useful_gflop_per_cell", "executed_gflop_per_cell",
    "useful_tflop_per_s", "executed_tflop_per_s", "cpu_s", "cpu_s_per_cell", "cpu_pct_mean", "cpu_pct_max",
    "rss_before_mb", "rss_peak_mb", "rss_delta_mb", "system_cpu_pct_mean", "loadavg_1m", "gpu_util_mean",
    "gpu_mem_peak_mb", "torch_cuda_peak_mb", "cosine_min", "cosine_mean", "max_abs_err", "fidelity_threshold",
    "fidelity_pass", "ratio_vs_baseline", "cpu_ratio_vs_baseline", "ratio_vs_helical_style", "ratio_vs_helical", "cpu_ratio_vs_helical", "error",
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _reset_cuda_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return float("nan")


def _flops(arch: Architecture, spec: MethodSpec, lengths: np.ndarray, padded: np.ndarray) -> tuple[float, float]:
    useful = float(arch.encoder_flops(lengths).sum())
    executed = float(arch.encoder_flops(padded).sum())
    if spec.backend in ("transformers", "helical"):
        executed += float(arch.lm_head_flops(padded).sum())
    return useful, executed


def _empty_row(spec: MethodSpec, device: str, n_cells: int) -> dict:
    row = {c: float("nan") for c in INPROCESS_COLUMNS}
    row.update({k: v for k, v in spec.describe().items() if k in INPROCESS_COLUMNS})
    row.update(method=spec.name, device=device, n_cells=n_cells, error="", fidelity_pass=False)
    return row


def measure_method(
    spec: MethodSpec,
    ctx: BuildContext,
    cellset: CellSet,
    arch: Architecture,
    repeats: int = 1,
    reference: np.ndarray | None = None,
) -> tuple[dict, np.ndarray | None]:
    """Build, warm up and time one method ``repeats`` times (baselines alike); returns (row, embeddings).

    The row gives the median over repeats with min-max (``geneformer_triton.bench.stats.summarize``), CPU seconds of this
    process (of helical's process for helical), and the 1-minute load before and after."""
    cells = cellset.tokens
    lengths = cellset.lengths
    row = _empty_row(spec, ctx.device, len(cells))
    row["repeats"] = repeats
    row["loadavg_before"] = os.getloadavg()[0]
    proc = psutil.Process()
    embeddings = None
    try:
        if spec.backend == "helical":
            embeddings = _measure_helical(spec, ctx, cellset, arch, row, repeats)
        else:
            method = build_method(spec, ctx, cellset.max_length)
            row["setup_s"] = method.setup_s
            try:
                started = time.perf_counter()
                if spec.options.get("compile"):
                    method.embed(cells)  # compile every shape of the timed run
                else:
                    warm = plan_batches(lengths, spec, cellset.max_length)[0][0]  # the longest batch
                    method.embed([cells[i] for i in warm])
                _sync(ctx.device)
                row["warmup_s"] = time.perf_counter() - started
                walls, cpus, summaries = [], [], []
                rss_before = proc.memory_info().rss / 2**20
                _reset_cuda_peak(ctx.device)
                for _ in range(repeats):
                    gc.collect()
                    with ResourceSampler() as sampler:
                        cpu0, t0 = cpu_times(), time.perf_counter()
                        embeddings = method.embed(cells)
                        _sync(ctx.device)
                        walls.append(time.perf_counter() - t0)
                        cpus.append(cpu_times() - cpu0)
                    summaries.append(sampler.summary)
                padded = method.padded_lengths(cells)
                row["padded_tokens"] = int(padded.sum())
                row["batches"] = method.last_batches
            finally:
                method.close()
            # median over repeats (min-max kept): the same rule for every method, baselines included
            median_run = int(np.argsort(walls)[len(walls) // 2])
            row.update({k: v for k, v in summaries[median_run].as_dict().items() if k in INPROCESS_COLUMNS})
            row.update(summarize(len(cells), walls, cpus))
            row.update(rss_before_mb=rss_before, torch_cuda_peak_mb=_cuda_peak_mb(ctx.device))
            row["rss_peak_mb"] = max(s.rss_peak_mb for s in summaries)
            row["rss_delta_mb"] = row["rss_peak_mb"] - rss_before
            useful, executed = _flops(arch, spec, lengths, padded)
            row["useful_gflop_per_cell"] = useful / len(cells) / 1e9
            row["executed_gflop_per_cell"] = executed / len(cells) / 1e9
        _finish_row(row, lengths)
        row["loadavg_after"] = os.getloadavg()[0]
        if embeddings is not None and reference is not None:
            stats = embedding_fidelity(embeddings, reference)
            threshold = min_cosine_threshold("fp32" if spec.precision == "fp32" else spec.precision)
            row.update(cosine_min=stats["cosine_min"], cosine_mean=stats["cosine_mean"], max_abs_err=stats["max_abs_err"],
                       fidelity_threshold=threshold, fidelity_pass=bool(stats["cosine_min"] >= threshold))
    except Exception as error:  # noqa: BLE001 - one failing method must not stop the benchmark
        LOGGER.error("method %s failed: %s", spec.name, error)
        LOGGER.debug("%s", traceback.format_exc())
        row["error"] = f"{type(error).__name__}: {error}".replace("\n", " ")[:500]
        embeddings = None
    gc.collect()
    return row, embeddings


def _finish_row(row: dict, lengths: np.ndarray) -> None:
    wall = row["wall_s"]
    tokens = int(lengths.sum())
    row["tokens"] = tokens
    if not row["padded_tokens"] or row["padded_tokens"] != row["padded_tokens"]:  # missing or NaN
        row["padded_tokens"] = tokens
    row["padding_waste"] = 1.0 - tokens / row["padded_tokens"] if row["padded_tokens"] else float("nan")
    n = row["n_cells"]
    row["tokens_per_s"] = tokens / wall
    row["useful_tflop_per_s"] = row["useful_gflop_per_cell"] * n / wall / 1e3
    row["executed_tflop_per_s"] = row["executed_gflop_per_cell"] * n / wall / 1e3


def _measure_helical(spec: MethodSpec, ctx: BuildContext, cellset: CellSet, arch: Architecture, row: dict,
                     repeats: int) -> np.ndarray:
    if cellset.max_length is not None:
        raise ValueError("helical tokenizes to the model's input size: it runs on untruncated cells only")
    result = run_helical(ctx, cellset, spec.batch_size, repeats=repeats, sampler_factory=lambda pids: ResourceSampler(pids))
    lengths = np.asarray(result["lengths"])
    if not np.array_equal(lengths, cellset.lengths):
        LOGGER.warning("helical's token counts differ from ours for %d cells", int((lengths != cellset.lengths).sum()))
    summary = result["summary"]
    if summary is not None:
        row.update({k: v for k, v in summary.as_dict().items() if k in INPROCESS_COLUMNS})
    padded = np.empty(len(lengths), dtype=np.int64)
    for index, length in plan_batches(lengths, spec):
        padded[index] = length
    useful, executed = _flops(arch, spec, lengths, padded)
    row.update(setup_s=result["load_s"] + result["tokenize_s"], warmup_s=0.0,
               padded_tokens=int(padded.sum()), batches=-(-len(lengths) // spec.batch_size),
               useful_gflop_per_cell=useful / len(lengths) / 1e9, executed_gflop_per_cell=executed / len(lengths) / 1e9)
    row.update(summarize(len(lengths), result["embed_s"], result["cpu_s"]))
    return np.asarray(result["embeddings"], dtype=np.float32)


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_* = a method's cells/s over the baseline's cells/s, same run. ``cpu_ratio_vs_baseline``:
    the baseline's CPU seconds per cell over the method's (what each costs in CPU time, which other
    processes on a shared machine disturb less than wall time)."""
    by_name = {r["method"]: r for r in rows}
    for column, name in (("ratio_vs_baseline", BASELINE), ("ratio_vs_helical_style", HELICAL_STYLE), ("ratio_vs_helical", HELICAL)):
        base = by_name.get(name)
        base_rate = base["cells_per_s"] if base is not None and not base["error"] else float("nan")
        for row in rows:
            row[column] = row["cells_per_s"] / base_rate if base_rate == base_rate and base_rate > 0 else float("nan")
    for column, name in (("cpu_ratio_vs_baseline", BASELINE), ("cpu_ratio_vs_helical", HELICAL)):
        base = by_name.get(name)
        base_cpu = base["cpu_s_per_cell"] if base is not None and not base["error"] else float("nan")
        for row in rows:
            cpu = row.get("cpu_s_per_cell", float("nan"))
            row[column] = base_cpu / cpu if base_cpu == base_cpu and cpu == cpu and cpu > 0 else float("nan")


def run_inprocess(
    specs: list[MethodSpec],
    ctx: BuildContext,
    cellset: CellSet,
    arch: Architecture,
    repeats: int = 1,
    on_row: Callable[[dict], None] | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Measure ``specs`` in order (the fp32 reference first); returns rows and embeddings by method."""
    if ctx.device.startswith("cuda"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference)
        torch.backends.cudnn.allow_tf32 = False
    ordered = sorted(specs, key=lambda s: s.name != REFERENCE)
    rows: list[dict] = []
    embeddings: dict[str, np.ndarray] = {}
    reference = None
    if ordered and ordered[0].name != REFERENCE:
        raise ValueError(f"the fp32 reference method {REFERENCE} must be among the methods")
    for spec in ordered:
        LOGGER.info("in-process: %s on %d cells (%s)", spec.name, len(cellset), ctx.device)
        row, emb = measure_method(spec, ctx, cellset, arch, repeats, reference if spec.name != REFERENCE else None)
        if spec.name == REFERENCE:
            if emb is None:
                raise RuntimeError(f"the fp32 reference failed: {row['error']}")
            reference = emb
            stats = embedding_fidelity(emb, emb)
            row.update(cosine_min=stats["cosine_min"], cosine_mean=stats["cosine_mean"], max_abs_err=0.0,
                       fidelity_threshold=min_cosine_threshold("fp32"), fidelity_pass=True)
        if emb is not None:
            embeddings[spec.name] = emb
        rows.append(row)
        LOGGER.info("  %-28s %8.2f cells/s  min cos %.7f  %s", spec.name, row["cells_per_s"], row["cosine_min"], row["error"])
        if on_row is not None:
            on_row(row)
    add_ratios(rows)
    # keep the catalogue's order in the table
    order = {s.name: i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    return rows, embeddings


def cpu_count() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
