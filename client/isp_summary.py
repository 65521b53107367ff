"""Summaries of ``gftriton isp`` results: genes ranked by mean shift over cells, printed and plotted."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from geneformer_triton.core.isp_schema import RANK_BY, IspRunError


def summarize(rows: pd.DataFrame, rank_by: str = "cell", min_cells: int = 1) -> pd.DataFrame:
    """Per perturbed gene (or gene set): cells, mean/std of each score, sorted strongest first.

    ``shift`` columns are ``1 - cosine`` (0 = no change) for ``cell`` and ``gene``; ``goal`` ranks by
    the mean goal shift (positive = towards the goal state). Genes seen in fewer than ``min_cells``
    cells are left out.
    """
    if rank_by not in RANK_BY:
        raise IspRunError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    column = RANK_BY[rank_by]
    if rows.empty:
        return pd.DataFrame(columns=["gene_id", "gene_symbol", "n_cells"])
    if rows[column].isna().all():
        raise IspRunError(f"no {column} values in the results: rank by another score (the run did not compute it)")
    frame = rows.copy()
    frame["cell_shift_distance"] = 1.0 - frame["cell_shift"].astype(np.float64)
    frame["gene_embedding_shift_distance"] = 1.0 - frame["gene_embedding_shift"].astype(np.float64)
    grouped = frame.groupby("gene_id", sort=False)
    summary = pd.DataFrame({
        "gene_symbol": grouped["gene_symbol"].first(),
        "n_cells": grouped["cell_id"].nunique(),
        "mean_cell_shift": grouped["cell_shift_distance"].mean(),
        "std_cell_shift": grouped["cell_shift_distance"].std(ddof=0),
        "mean_cell_cosine": grouped["cell_shift"].mean(),
        "mean_gene_embedding_shift": grouped["gene_embedding_shift_distance"].mean(),
        "mean_goal_shift": grouped["goal_shift"].mean(),
        "mean_start_shift": grouped["start_shift"].mean(),
    }).reset_index()
    summary = summary[summary["n_cells"] >= min_cells]
    if summary.empty:  # no gene in min_cells cells: keep the columns (dropna would drop every one of them)
        return summary.reset_index(drop=True)
    key = {"cell": "mean_cell_shift", "gene": "mean_gene_embedding_shift", "goal": "mean_goal_shift"}[rank_by]
    summary = summary.sort_values([key, "n_cells"], ascending=[False, False], kind="stable").reset_index(drop=True)
    return summary.dropna(axis=1, how="all")


def format_summary(summary: pd.DataFrame, top: int = 20) -> str:
    if summary.empty:
        return "(no results)"
    shown = summary.head(top).copy()
    for column in shown.columns:
        if column.startswith(("mean_", "std_")):
            shown[column] = shown[column].map(lambda v: f"{v:.6f}")
    return shown.to_string(index=False)


def plot_top_shifts(summary: pd.DataFrame, path: str | Path, rank_by: str = "cell", top: int = 20,
                    title: Optional[str] = None) -> Path:
    """Horizontal bar chart of the ``top`` genes' mean shift (error bars: std over cells) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = {"cell": "mean_cell_shift", "gene": "mean_gene_embedding_shift", "goal": "mean_goal_shift"}[rank_by]
    label = {"cell": "mean cell-embedding shift (1 - cosine)", "gene": "mean gene-embedding shift (1 - cosine)",
             "goal": "mean goal-state shift (cosine gain)"}[rank_by]
    shown = summary.head(top).iloc[::-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.32 * len(shown) + 1.2)))
    error = shown["std_cell_shift"] if rank_by == "cell" and "std_cell_shift" in shown else None
    names = [f"{s} ({n})" for s, n in zip(shown["gene_symbol"].astype(str), shown["n_cells"])]
    ax.barh(names, shown[key], xerr=error, color="#4477aa", ecolor="#999999", capsize=2)
    ax.set_xlabel(label)
    ax.set_ylabel("gene (cells)")
    ax.set_title(title or f"Top {len(shown)} in-silico perturbations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
