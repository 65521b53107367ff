"""Scaling sweeps: throughput as the number of cells, the sequence length and the batch size grow.

- cells: N real cells (resampled beyond the sample's 559), the method's own batching: total time should
  grow linearly in N (constant cells/s); with length-sorted batches, more cells also pad less.
- length: cells truncated to their first L tokens (only cells with at least L tokens): the cost of a
  cell is a·L + b·L² (projections vs attention; ``geneformer_triton.bench.cells``); the fit and the crossover L = a/b are
  reported, with the log-log slope between consecutive lengths.
- batch: the same cells at batch sizes B (length-sorted).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from geneformer_triton.bench.cells import Architecture, CellSet
from geneformer_triton.bench.inprocess import measure_method
from geneformer_triton.bench.methods import BuildContext, MethodSpec

LOGGER = logging.getLogger(__name__)

SCALING_COLUMNS = [
    "sweep", "x", "method", "n_cells", "tokens_mean", "batch_size", "cells_per_s", "tokens_per_s", "ms_per_cell",
    "useful_tflop_per_s", "padding_waste", "cpu_s_per_cell", "cpu_pct_mean", "loadavg_1m", "wall_s", "error",
]


def resample(cellset: CellSet, n: int, seed: int = 0) -> CellSet:
    """``n`` cells of ``cellset``: all of them in order, then seeded random draws of them."""
    if n <= len(cellset):
        return cellset.select(np.arange(n))
    rng = np.random.default_rng(seed)
    index = np.concatenate([np.arange(len(cellset)), rng.integers(0, len(cellset), n - len(cellset))])
    chosen = cellset.select(index)
    chosen.source = f"{cellset.source}, resampled to {n} (seed {seed})"
    return chosen


def _row(sweep: str, x: float, spec: MethodSpec, result: dict, cells: CellSet) -> dict:
    return {
        "sweep": sweep, "x": x, "method": spec.name, "n_cells": len(cells), "tokens_mean": float(cells.lengths.mean()),
        "batch_size": spec.batch_size, "cells_per_s": result["cells_per_s"], "tokens_per_s": result["tokens_per_s"],
        "ms_per_cell": 1e3 / result["cells_per_s"] if result["cells_per_s"] > 0 else float("nan"),
        "useful_tflop_per_s": result["useful_tflop_per_s"], "padding_waste": result["padding_waste"],
        "cpu_s_per_cell": result["cpu_s_per_cell"], "cpu_pct_mean": result["cpu_pct_mean"],
        "loadavg_1m": result["loadavg_1m"], "wall_s": result["wall_s"], "error": result["error"],
    }


def run_scaling(
    ctx: BuildContext,
    pool: CellSet,
    arch: Architecture,
    methods: list[MethodSpec],
    cells_sweep: list[int],
    length_sweep: list[int],
    length_cells: int,
    batch_sweep: list[int],
    batch_cells: int,
    rows: list[dict] | None = None,
) -> list[dict]:
    """``pool``: the untruncated real cells to draw from (the whole sample); rows are appended to ``rows``
    as they are measured (a caller keeps them if interrupted)."""
    rows = [] if rows is None else rows

    def measure(sweep: str, x: float, spec: MethodSpec, cells: CellSet) -> None:
        LOGGER.info("scaling %s=%s: %s on %d cells", sweep, x, spec.name, len(cells))
        result, _ = measure_method(spec, ctx, cells, arch)
        rows.append(_row(sweep, x, spec, result, cells))
        LOGGER.info("  %.2f cells/s %s", result["cells_per_s"], result["error"])

    for spec in methods:
        for n in cells_sweep:
            measure("cells", n, spec, resample(pool, n))
        for length in length_sweep:
            eligible = pool.at_least(length)
            if len(eligible) == 0:
                continue
            measure("length", length, spec, resample(eligible, length_cells).truncate(length))
        for batch in batch_sweep:
            measure("batch", batch, dataclasses.replace(spec, batch_size=batch, batching="sorted"),
                    resample(pool, batch_cells))
    return rows


def fit_length_cost(rows: list[dict], method: str) -> dict:
    """Least-squares fit of time per cell t(L) = a·L + b·L² over the length sweep of ``method``."""
    points = [(r["x"], r["ms_per_cell"]) for r in rows
              if r["sweep"] == "length" and r["method"] == method and not r["error"] and r["ms_per_cell"] == r["ms_per_cell"]]
    if len(points) < 2:
        return {}
    L = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(np.stack([L, L * L], axis=1), t, rcond=None)
    slopes = np.diff(np.log(t)) / np.diff(np.log(L))
    return {
        "method": method,
        "a_ms_per_token": float(a),
        "b_ms_per_token2": float(b),
        "crossover_tokens": float(a / b) if b > 0 else float("inf"),
        "loglog_slopes": [float(s) for s in slopes],
        "lengths": [float(x) for x in L],
    }


def fit_cells_cost(rows: list[dict], method: str) -> dict:
    """Log-log slope of total time vs number of cells (1 = linear)."""
    points = [(r["x"], r["wall_s"]) for r in rows
              if r["sweep"] == "cells" and r["method"] == method and not r["error"] and r["wall_s"] == r["wall_s"]]
    if len(points) < 2:
        return {}
    n = np.log([p[0] for p in points])
    t = np.log([p[1] for p in points])
    slope = float(np.polyfit(n, t, 1)[0])
    return {"method": method, "loglog_slope": slope, "cells": [p[0] for p in points]}
