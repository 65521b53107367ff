"""The layout of a `gftriton isp` output (client and ISP stats read it): score names, columns, folders."""

from __future__ import annotations

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


class IspRunError(RuntimeError):
    """The run cannot proceed (bad options, output written with other settings, server gone)."""


__all__ = [
    "COLUMNS", "COMMIT_FOLDER", "ERROR_COLUMNS", "GENE_COLUMNS", "GENE_FOLDER",
    "PERTURBATIONS", "RANK_BY", "SCORE_OUTPUTS", "STATE_PREFIX", "UPSTREAM_SCORE", "IspRunError",
]
