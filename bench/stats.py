"""Repeat statistics: every method, in process or served, is summarised the same way.

A method is timed ``repeats`` (>= 3 in full mode) times; the row gives the median throughput with its
min-max range, and cells per CPU-second (CPU seconds of the process tree that does the work: this
process, helical's venv process, or the tritonserver tree with its backend stubs) from the same runs.
"""

from __future__ import annotations

import numpy as np

REPEAT_COLUMNS = ["repeats", "cells_per_s", "cells_per_s_min", "cells_per_s_max", "cpu_s_per_cell",
                  "cells_per_cpu_s", "cells_per_cpu_s_min", "cells_per_cpu_s_max"]


def summarize(n_cells: int, walls: list[float], cpus: list[float]) -> dict:
    """Median and min-max of cells/s and cells per CPU-second over repeats.

    ``walls``: wall seconds of each repeat; ``cpus``: CPU seconds of the working processes in that repeat
    (NaN where unknown). ``cells_per_s`` is ``n_cells`` over the median wall time.
    """
    walls_a = np.asarray(walls, dtype=float)
    cpus_a = np.asarray(cpus, dtype=float)
    rates = n_cells / walls_a
    per_cpu = n_cells / cpus_a if np.isfinite(cpus_a).all() and (cpus_a > 0).all() else np.full(len(walls_a), np.nan)
    cpu_median = float(np.median(cpus_a)) if np.isfinite(cpus_a).all() else float("nan")
    return {
        "repeats": len(walls_a),
        "wall_s": float(np.median(walls_a)), "wall_s_min": float(walls_a.min()), "wall_s_max": float(walls_a.max()),
        "cells_per_s": float(n_cells / np.median(walls_a)),
        "cells_per_s_min": float(rates.min()), "cells_per_s_max": float(rates.max()),
        "cpu_s": cpu_median, "cpu_s_per_cell": cpu_median / n_cells if cpu_median == cpu_median else float("nan"),
        "cells_per_cpu_s": float(np.median(per_cpu)),
        "cells_per_cpu_s_min": float(np.min(per_cpu)), "cells_per_cpu_s_max": float(np.max(per_cpu)),
    }


def summarize_rates(rates: list[float], cpu_s_per_cell: list[float]) -> dict:
    """The same summary from per-repeat throughputs (served runs: perf_analyzer gives cells/s per run)."""
    rates_a = np.asarray(rates, dtype=float)
    cpu_a = np.asarray(cpu_s_per_cell, dtype=float)
    per_cpu = 1.0 / cpu_a
    return {
        "repeats": len(rates_a),
        "cells_per_s": float(np.median(rates_a)), "cells_per_s_min": float(rates_a.min()),
        "cells_per_s_max": float(rates_a.max()),
        "cpu_s_per_cell": float(np.median(cpu_a)),
        "cells_per_cpu_s": float(np.median(per_cpu)), "cells_per_cpu_s_min": float(np.min(per_cpu)),
        "cells_per_cpu_s_max": float(np.max(per_cpu)),
    }


def range_text(row: dict, key: str = "cells_per_s", digits: int = 2) -> str:
    """``median (min-max)`` of ``key`` in a row."""
    med, lo, hi = row.get(key, float("nan")), row.get(f"{key}_min", float("nan")), row.get(f"{key}_max", float("nan"))
    if med != med:
        return "n/a"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"
