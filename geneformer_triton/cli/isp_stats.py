"""``gftriton isp-stats``: upstream Geneformer's ``InSilicoPerturberStats`` tables from ISP shifts.

    gftriton isp-stats --mode aggregate_gene_shifts --upstream-dir ISP_OUT --dictionaries DICTS --output genes.csv
    gftriton isp-stats --mode goal_state_shift --input results.parquet --dictionaries DICTS \
        --states '{"state_key": "disease", "start_state": "dcm", "goal_state": "nf", "alt_states": []}' --output goal.csv
    gftriton isp-stats --mode vs_null --upstream-dir TEST_OUT --null-input NULL_OUT --dictionaries DICTS --output null.csv

Writes the table as CSV (upstream's columns, rows and index) and a bar chart of the top ``--top`` rows
beside it (``OUTPUT.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from geneformer_triton.core.isp_stats import MODES, GeneDictionaries, IspStatsError, StatsOptions, compute_stats
from geneformer_triton.core.isp_stats_readers import (
    UPSTREAM_SUFFIX,
    read_isp_results,
    shifts_from_isp_results,
    shifts_from_oracle_json,
    shifts_from_upstream_dir,
)

LOGGER = logging.getLogger(__name__)

#: mode -> (column plotted, axis label); rows are plotted in the table's order (its ranking)
PLOTTED = {
    "goal_state_shift": ("Shift_to_goal_end", "shift towards the goal state"),
    "vs_null": ("Test_vs_null_avg_shift", "test minus null mean cosine"),
    "aggregate_gene_shifts": ("Cosine_sim_mean", "mean cosine similarity (1 = no change)"),
    "mixture_model": ("Test_avg_shift", "mean cosine similarity (1 = no change)"),
    "aggregate_data": ("Cosine_sim", "cosine similarity per cell"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "isp-stats", help="upstream InSilicoPerturberStats tables (goal state, vs null, aggregates, mixture model)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=MODES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="our `gftriton isp` results (Parquet folder/file or CSV)")
    source.add_argument("--upstream-dir", help="upstream InSilicoPerturber output folder (*_raw.pickle files)")
    source.add_argument("--oracle-json", help="JSON written by ../shared/reference/oracle/run_oracle.py")
    parser.add_argument("--null-input", help="vs_null: the null distribution's shifts, same kind as the input")
    parser.add_argument("--genes-perturbed", default="all",
                        help="'all' (default) or the comma-separated Ensembl ids perturbed together in a list run")
    parser.add_argument("--states", help="cell_states_to_model as JSON (or a .json file): state_key, start_state, "
                                         "goal_state, alt_states")
    parser.add_argument("--dictionaries", required=True,
                        help="folder with token_dictionary and gene_name_id_dict (.json, or upstream's .pkl)")
    parser.add_argument("--pickle-suffix", default=UPSTREAM_SUFFIX, help="upstream pickles to read (default %(default)s)")
    parser.add_argument("--output", required=True, help="CSV to write; the plot goes beside it as .png")
    parser.add_argument("--top", type=int, default=20, help="rows in the plot and the logged summary (default 20)")
    parser.set_defaults(func=run)


def _states(text: str | None) -> dict | None:
    if not text:
        return None
    path = Path(text)
    try:
        return json.loads(path.read_text() if path.suffix == ".json" and path.is_file() else text)
    except json.JSONDecodeError as error:
        raise IspStatsError(f"--states is not valid JSON ({error}); e.g. '{{\"state_key\": \"disease\", "
                            "\"start_state\": \"dcm\", \"goal_state\": \"nf\", \"alt_states\": []}'") from None


def _reader(args: argparse.Namespace, dictionaries: GeneDictionaries, states: dict | None) -> Callable[[str], pd.DataFrame]:
    if args.upstream_dir:
        return lambda path: shifts_from_upstream_dir(path, args.pickle_suffix)
    if args.oracle_json:
        return shifts_from_oracle_json
    return lambda path: shifts_from_isp_results(read_isp_results(path), dictionaries, states)


def _label(row: pd.Series) -> str:
    name = row.get("Gene_name", row.get("Gene"))
    label = str(name) if not (isinstance(name, float) and np.isnan(name)) else str(row.get("Ensembl_ID", row.get("Gene")))
    if "Affected" in row:
        affected = "cell" if row["Affected"] == "cell_emb" else row.get("Affected_gene_name", row["Affected"])
        label = f"{label} -> {affected}"
    return label


def plot_top(table: pd.DataFrame, mode: str, path: Path, top: int) -> Path:
    """Horizontal bars of the first ``top`` rows (aggregate_data: a histogram per perturbation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column, axis = PLOTTED[mode]
    if mode == "goal_state_shift" and "Gene" not in table.columns:  # one grouped perturbation
        shown = table.iloc[0].dropna()
        labels, values = list(shown.index), shown.to_numpy(dtype=float)
    elif mode == "aggregate_data":
        labels, values = [], None
    else:
        shown = table.head(top)
        labels, values = [_label(row) for _, row in shown.iterrows()], shown[column].to_numpy(dtype=float)
    figure, ax = plt.subplots(figsize=(7, 1.5 + 0.3 * max(len(labels), 4)))
    if values is None:
        for gene, values_of in table.groupby(table["Gene"].astype(str), sort=False)["Cosine_sim"]:
            ax.hist(values_of.to_numpy(), bins=30, alpha=0.6, label=gene)
        ax.set_xlabel(axis)
        ax.set_ylabel("cells")
        ax.legend()
    else:
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(axis)
    ax.set_title(f"isp-stats {mode}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise IspStatsError(f"--top must be >= 1, not {args.top}")
    states = _states(args.states)
    genes = "all" if args.genes_perturbed == "all" else [g.strip() for g in args.genes_perturbed.split(",") if g.strip()]
    options = StatsOptions(args.mode, genes, states)
    if (args.mode == "vs_null") != bool(args.null_input):
        raise IspStatsError("--null-input is required for vs_null and only used there")
    dictionaries = GeneDictionaries.from_dir(args.dictionaries)
    read = _reader(args, dictionaries, states)
    shifts = read(args.input or args.upstream_dir or args.oracle_json)
    null = read(args.null_input) if args.null_input else None
    table = compute_stats(shifts, dictionaries, options, null)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output)
    figure = plot_top(table, args.mode, output.with_suffix(".png"), args.top)
    LOGGER.info("wrote %d rows to %s and the plot %s", len(table), output, figure)
    with pd.option_context("display.width", 160, "display.max_columns", 12):
        LOGGER.info("top %d:\n%s", args.top, table.head(args.top).to_string())
    return 0
