"""The layout of a `gftriton isp` output (client and ISP stats read it): score names, columns, folders."""

from __future__ import annotations

from pathlib import Path
from typing import Container

PERTURBATIONS = ("delete", "overexpress", "inhibit", "activate")
SCORE_OUTPUTS = ("cell_shift", "gene_embedding_shift", "goal_shift", "start_shift")
#: upstream's per-perturbation value (InSilicoPerturber's ``(perturbed, "cell_emb")`` without cell states)
UPSTREAM_SCORE = "cell_emb_shift"
COLUMNS = (
    "cell_id", "perturbation", "gene_id", "gene_symbol", "target_index", "n_perturbations",
    *SCORE_OUTPUTS, UPSTREAM_SCORE,
)
#: Parquet dataset of every (perturbed, affected) gene cosine (emb_mode cell_and_gene), inside the output
GENE_FOLDER = "_genes"
COMMIT_FOLDER = "_commits"  # one empty marker per committed batch of parts
GENE_COLUMNS = ("cell_id", "gene_id", "affected_gene_id", "affected_symbol", "cos")
STATE_PREFIX = "state_shift_"  # + state name: upstream's value with cell_states_to_model
ERROR_COLUMNS = ("cell_id", "error")
RANK_BY = {  # summary ranking -> score column it is based on
    "cell": "cell_shift",
    "gene": "gene_embedding_shift",
    "goal": "goal_shift",
}


PART_GLOB = "part-*.parquet"  # the rows of one flushed batch: part-<batch>.parquet


def part_file(folder: Path, batch: str) -> Path:
    """Where the rows of ``batch`` go in ``folder`` (the output, ``_errors`` or ``_genes``)."""
    return folder / f"part-{batch}.parquet"


def part_batch(part: Path) -> str:
    """The batch a Parquet part belongs to: ``part-<batch>.parquet`` -> ``<batch>`` (its marker in ``_commits/``)."""
    return part.name[len("part-"): -len(".parquet")]


def committed_parts(folder: Path, committed: Container[str]) -> list[Path]:
    """The ``part-*.parquet`` files of ``folder`` whose batch is in ``committed``, in write (name) order; the
    others belong to an interrupted run (never read; deleted when the run reopens)."""
    return [p for p in sorted(folder.glob(PART_GLOB)) if part_batch(p) in committed]


class IspRunError(RuntimeError):
    """The run cannot proceed (bad options, output written with other settings, server gone)."""


__all__ = [
    "COLUMNS", "COMMIT_FOLDER", "PART_GLOB", "ERROR_COLUMNS", "GENE_COLUMNS", "GENE_FOLDER",
    "PERTURBATIONS", "RANK_BY", "SCORE_OUTPUTS", "STATE_PREFIX", "UPSTREAM_SCORE", "IspRunError", "committed_parts",
    "part_batch", "part_file",
]
