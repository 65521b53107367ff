"""Embedding quality evaluation: does an optimized backend change downstream results?

Every function takes cell embeddings as ``np.ndarray`` of shape ``[n_cells, H]`` (any float dtype;
converted to float64 internally so that metrics of two backends differ only by their inputs) and
labels as an array-like of ``n_cells`` strings (converted with ``np.asarray(labels).astype(str)``).

Metrics (all deterministic for a fixed ``seed``):

* classification: :func:`classification_metrics` -- standardize + ``RidgeClassifier`` on a
  stratified 80/20 split, accuracy and weighted F1 on the held-out 20 %.
* geometry: :func:`silhouette` (cosine by default), :func:`separation_ratio` (Euclidean),
  :func:`knn_label_consistency` (cosine, k=15), :func:`clustering_agreement` (KMeans ARI/NMI),
  Davies-Bouldin and Calinski-Harabasz (Euclidean, sklearn), :func:`control_separation`.
* fidelity against a reference backend: :func:`embedding_fidelity`.
* side by side: :func:`compare_methods` -> ``pandas.DataFrame``; :func:`write_report` writes
  CSV + JSON + Markdown + a PNG of a 2-D projection.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    f1_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from geneformer_triton.core.fidelity import FIDELITY_METRICS, embedding_fidelity

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
DEFAULT_TEST_SIZE = 0.2
DEFAULT_K = 15
DEFAULT_SILHOUETTE_METRIC = "cosine"

#: Metric columns produced by :func:`embedding_metrics`, in report order. ``higher`` says which
#: direction is better (``None``: neither, e.g. counts).
METRIC_DIRECTIONS: dict[str, bool | None] = {
    "accuracy": True,
    "f1_weighted": True,
    "silhouette": True,
    "separation_ratio": True,
    "knn_consistency": True,
    "ari": True,
    "nmi": True,
    "davies_bouldin": False,
    "calinski_harabasz": True,
    "control_separation": True,
}
#: Defaults of the keyword arguments of :func:`embedding_metrics` (recorded in reports).
DEFAULT_PARAMS: dict[str, Any] = {
    "seed": DEFAULT_SEED, "k": DEFAULT_K, "silhouette_metric": DEFAULT_SILHOUETTE_METRIC, "test_size": DEFAULT_TEST_SIZE,
}
#: Chance-level references computed from the labels alone (identical for every method).
CHANCE_COLUMNS = ("accuracy_majority", "knn_consistency_chance")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _as_inputs(embeddings: np.ndarray, labels: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: returns (float64 [n, H] array, str [n] array)."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [n_cells, H], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"embeddings must be floating point, got {x.dtype}")
    x = x.astype(np.float64)
    y = np.asarray(labels).astype(str)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be 1-D with {x.shape[0]} entries, got shape {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf")
    if np.unique(y).size < 2:
        raise ValueError("need at least two distinct labels")
    return x, y


def _centroids(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (classes [C] str, centroids [C, H] float64, class index of each cell [n] int)."""
    classes, inv = np.unique(y, return_inverse=True)
    cent = np.zeros((classes.size, x.shape[1]), dtype=np.float64)
    np.add.at(cent, inv, x)
    cent /= np.bincount(inv, minlength=classes.size)[:, None]
    return classes, cent, inv


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------
def stratified_split(
    labels: Sequence[str] | np.ndarray,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = DEFAULT_SEED,
    min_class_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split of cell indices.

    Classes with fewer than ``min_class_size`` cells (default 2: a single cell cannot appear in
    both sets) cannot be stratified; all of their cells go to the training set (so the classifier
    still knows the class) and a warning is logged. If the test set would be smaller than the
    number of stratifiable classes, the split falls back to an unstratified shuffle (warning).

    Args:
        labels: ``[n_cells]`` labels.
        test_size: fraction of the stratifiable cells held out.
        seed: ``random_state`` of ``train_test_split``.
        min_class_size: smallest class that is stratified.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays, disjoint, together ``0..n_cells-1``.
    """
    y = np.asarray(labels).astype(str)
    idx = np.arange(y.size)
    classes, counts = np.unique(y, return_counts=True)
    small = set(classes[counts < min_class_size].tolist())
    if small:
        log.warning("classes too small to stratify (< %d cells), kept in training only: %s",
                    min_class_size, sorted(small))
    keep = ~np.isin(y, list(small))
    idx_k, y_k = idx[keep], y[keep]
    n_test = math.ceil(test_size * idx_k.size)
    n_strat_classes = np.unique(y_k).size
    if n_test < n_strat_classes or idx_k.size - n_test < n_strat_classes:
        log.warning("test set of %d cells cannot hold %d classes: unstratified split", n_test, n_strat_classes)
        tr, te = train_test_split(idx_k, test_size=test_size, random_state=seed, shuffle=True)
    else:
        tr, te = train_test_split(idx_k, test_size=test_size, random_state=seed, stratify=y_k)
    tr = np.concatenate([tr, idx[~keep]])
    return np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)


def classification_metrics(
    embeddings: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = DEFAULT_SEED,
    alpha: float = 1.0,
) -> dict[str, float]:
    """Linear-probe cell-type classification.

    Pipeline ``StandardScaler -> RidgeClassifier(alpha)`` fitted on the training part of
    :func:`stratified_split` (same split for every backend given the same labels and seed) and
    scored on the held-out part.

    Args:
        embeddings: ``[n_cells, H]`` float array.
        labels: ``[n_cells]`` strings.

    Returns:
        ``{"accuracy", "f1_weighted", "accuracy_majority", "n_train", "n_test"}``;
        ``accuracy_majority`` is the held-out accuracy of always predicting the most frequent
        training class (the chance level to compare against).
    """
    x, y = _as_inputs(embeddings, labels)
    tr, te = stratified_split(y, test_size=test_size, seed=seed)
    clf = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha))
    clf.fit(x[tr], y[tr])
    pred = clf.predict(x[te])
    cls, cnt = np.unique(y[tr], return_counts=True)
    majority = cls[np.argmax(cnt)]
    return {
        "accuracy": float(accuracy_score(y[te], pred)),
        "f1_weighted": float(f1_score(y[te], pred, average="weighted", zero_division=0)),
        "accuracy_majority": float(np.mean(y[te] == majority)),
        "n_train": int(tr.size),
        "n_test": int(te.size),
    }


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def silhouette(
    embeddings: np.ndarray, labels: Sequence[str] | np.ndarray, metric: str = DEFAULT_SILHOUETTE_METRIC
) -> float:
    """Mean silhouette coefficient over all cells, labels as clusters.

    For cell i with label c: ``a = mean d(i, j)`` over the other cells of c, ``b = min`` over
    other classes c' of ``mean d(i, j)`` over cells of c'; ``s_i = (b - a) / max(a, b)``
    (``s_i = 0`` for singleton classes). Distance ``d`` is cosine distance ``1 - cos`` by default
    (``metric="euclidean"`` also accepted). Range [-1, 1], higher = better separated.
    """
    x, y = _as_inputs(embeddings, labels)
    return float(silhouette_score(x, y, metric=metric))


def separation_ratio(embeddings: np.ndarray, labels: Sequence[str] | np.ndarray) -> float:
    """Inter/intra-cluster separation ratio (Euclidean).

    ``ratio = mean_{c < c'} ||mu_c - mu_c'||  /  mean_i ||x_i - mu_{y_i}||``

    numerator: mean Euclidean distance between the centroids ``mu`` of all unordered pairs of
    distinct classes; denominator: mean over all cells of the Euclidean distance to their own
    class centroid. Scale invariant; > 1 means classes lie further apart than cells spread around
    their class; labels unrelated to the geometry give small values (centroids of random subsets
    nearly coincide).
    """
    x, y = _as_inputs(embeddings, labels)
    _, cent, inv = _centroids(x, y)
    diff = cent[:, None, :] - cent[None, :, :]
    d = np.sqrt((diff**2).sum(-1))
    iu = np.triu_indices(cent.shape[0], k=1)
    inter = d[iu].mean()
    intra = np.linalg.norm(x - cent[inv], axis=1).mean()
    if intra == 0:
        return float("inf")
    return float(inter / intra)


def knn_label_consistency(
    embeddings: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    k: int = DEFAULT_K,
    metric: str = "cosine",
) -> float:
    """Mean fraction of each cell's ``k`` nearest neighbours (itself excluded) sharing its label.

    Neighbours by cosine distance by default (exact, brute force). ``k`` is capped at
    ``n_cells - 1``. Chance level for labels unrelated to the geometry is
    ``sum_c n_c (n_c - 1) / (n (n - 1))`` (see :func:`chance_levels`).
    """
    x, y = _as_inputs(embeddings, labels)
    n = x.shape[0]
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm="brute").fit(x)
    _, ind = nn.kneighbors(x)
    # drop the cell itself; if a duplicate point pushed it out of the first k+1, drop the last one
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        row = ind[i]
        self_pos = np.flatnonzero(row == i)
        out[i] = np.delete(row, self_pos[0] if self_pos.size else k)
    return float((y[out] == y[:, None]).mean())


def clustering_agreement(
    embeddings: np.ndarray, labels: Sequence[str] | np.ndarray, seed: int = DEFAULT_SEED, n_init: int = 10
) -> dict[str, float]:
    """Unsupervised clustering vs labels.

    ``KMeans(n_clusters = number of distinct labels, random_state=seed, n_init)`` on the raw
    embeddings (Euclidean); returns ``{"ari", "nmi"}`` (adjusted Rand index, normalized mutual
    information, arithmetic normalization) of its clusters against the labels. ~0 for labels
    unrelated to the geometry, 1 for a perfect match.
    """
    x, y = _as_inputs(embeddings, labels)
    n_clusters = np.unique(y).size
    pred = KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init).fit_predict(x)
    return {
        "ari": float(adjusted_rand_score(y, pred)),
        "nmi": float(normalized_mutual_info_score(y, pred)),
    }


def control_separation(
    embeddings: np.ndarray, labels: Sequence[str] | np.ndarray, control_label: str
) -> float:
    """How far non-control cells lie from the control population (Euclidean).

    ``mean_{i not control} ||x_i - mu_ctrl||  /  mean_{i control} ||x_i - mu_ctrl||``

    where ``mu_ctrl`` is the centroid of the control cells. 1 = treated cells are as close to the
    control centroid as control cells are; > 1 = they lie outside the control cloud.
    """
    x, y = _as_inputs(embeddings, labels)
    is_ctrl = y == str(control_label)
    if not is_ctrl.any():
        raise ValueError(f"control label {control_label!r} not among the labels")
    if is_ctrl.all():
        raise ValueError("every cell carries the control label")
    mu = x[is_ctrl].mean(0)
    spread = np.linalg.norm(x[is_ctrl] - mu, axis=1).mean()
    other = np.linalg.norm(x[~is_ctrl] - mu, axis=1).mean()
    return float(other / spread) if spread > 0 else float("inf")


def chance_levels(labels: Sequence[str] | np.ndarray) -> dict[str, float]:
    """Chance references from the labels alone: ``knn_consistency_chance`` =
    ``sum_c n_c (n_c - 1) / (n (n - 1))`` (expected kNN consistency with random neighbours)."""
    y = np.asarray(labels).astype(str)
    _, c = np.unique(y, return_counts=True)
    n = y.size
    return {"knn_consistency_chance": float((c * (c - 1)).sum() / (n * (n - 1)))}


def embedding_metrics(
    embeddings: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    control_label: str | None = None,
    *,
    seed: int = DEFAULT_SEED,
    k: int = DEFAULT_K,
    silhouette_metric: str = DEFAULT_SILHOUETTE_METRIC,
    test_size: float = DEFAULT_TEST_SIZE,
) -> dict[str, float]:
    """All downstream metrics of one embedding set.

    Args:
        embeddings: ``[n_cells, H]`` float array (fp32 typical).
        labels: ``[n_cells]`` strings (e.g. cell types).
        control_label: label of control cells; ``control_separation`` is NaN without it.

    Returns:
        dict with keys of :data:`METRIC_DIRECTIONS`, :data:`CHANCE_COLUMNS`, ``n_cells``,
        ``n_labels``, ``n_train``, ``n_test``.
    """
    x, y = _as_inputs(embeddings, labels)
    out: dict[str, float] = {"n_cells": int(x.shape[0]), "n_labels": int(np.unique(y).size)}
    out.update(classification_metrics(x, y, test_size=test_size, seed=seed))
    out["silhouette"] = silhouette(x, y, metric=silhouette_metric)
    out["separation_ratio"] = separation_ratio(x, y)
    out["knn_consistency"] = knn_label_consistency(x, y, k=k)
    out.update(clustering_agreement(x, y, seed=seed))
    out["davies_bouldin"] = float(davies_bouldin_score(x, y))
    out["calinski_harabasz"] = float(calinski_harabasz_score(x, y))
    out["control_separation"] = (
        control_separation(x, y, control_label) if control_label is not None else float("nan")
    )
    out.update(chance_levels(y))
    return out


# --------------------------------------------------------------------------------------------
# fidelity and side-by-side comparison
# --------------------------------------------------------------------------------------------
def compare_methods(
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence[str] | np.ndarray,
    reference: str,
    control_label: str | None = None,
    **metric_kwargs: Any,
) -> pd.DataFrame:
    """Evaluate several embedding sets of the same cells side by side.

    Args:
        embeddings: ``{method name: [n_cells, H] float array}``, rows in the same cell order,
            e.g. ``{"pytorch_fp32": E0, "onnx_fp32": E1, "onnx_fp16": E2}``.
        labels: ``[n_cells]`` strings.
        reference: key of ``embeddings`` that the others are compared with.
        control_label: passed to :func:`embedding_metrics`.
        **metric_kwargs: ``seed``, ``k``, ``silhouette_metric``, ``test_size``.

    Returns:
        DataFrame indexed by method (reference first, then input order) with the columns of
        :func:`embedding_metrics`, ``delta_<metric>`` = method - reference for every metric of
        :data:`METRIC_DIRECTIONS` (0 on the reference row), and :data:`geneformer_triton.core.fidelity.FIDELITY_METRICS` against
        the reference (cosine 1 and errors 0 on the reference row).
    """
    if reference not in embeddings:
        raise KeyError(f"reference {reference!r} not in {list(embeddings)}")
    order = [reference] + [m for m in embeddings if m != reference]
    ref = np.asarray(embeddings[reference])
    rows = []
    for name in order:
        emb = np.asarray(embeddings[name])
        log.info("evaluating %s: %s %s", name, emb.shape, emb.dtype)
        row: dict[str, Any] = {"method": name}
        row.update(embedding_metrics(emb, labels, control_label, **metric_kwargs))
        row.update(embedding_fidelity(emb, ref))
        rows.append(row)
    df = pd.DataFrame(rows).set_index("method")
    for m in METRIC_DIRECTIONS:
        df[f"delta_{m}"] = df[m] - df.loc[reference, m]
    df.attrs["reference"] = reference
    df.attrs["params"] = {**DEFAULT_PARAMS, **metric_kwargs, "control_label": control_label}
    return df


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def project_2d(
    embeddings: Mapping[str, np.ndarray], reference: str, method: str = "pca", seed: int = DEFAULT_SEED
) -> dict[str, np.ndarray]:
    """2-D coordinates (``[n_cells, 2]`` float64) of every embedding set.

    ``pca``: PCA fitted on the reference embeddings and applied unchanged to every method, so
    panels share axes and a backend that moves cells shows it. ``umap``: UMAP (umap-learn,
    optional, slow first call because of numba compilation) fitted on the reference and applied
    with ``transform``; falls back to PCA with a warning when umap-learn is missing.
    """
    from sklearn.decomposition import PCA

    ref = np.asarray(embeddings[reference], dtype=np.float64)
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            log.warning("umap-learn not installed: using PCA")
            method = "pca"
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed).fit(ref)
            return {m: reducer.transform(np.asarray(e, dtype=np.float64)) for m, e in embeddings.items()}
    if method != "pca":
        raise ValueError(f"unknown projection {method!r} (pca or umap)")
    pca = PCA(n_components=2, random_state=seed).fit(ref)
    return {m: pca.transform(np.asarray(e, dtype=np.float64)) for m, e in embeddings.items()}


def plot_projection(
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence[str] | np.ndarray,
    path: str | Path,
    reference: str,
    method: str = "pca",
    seed: int = DEFAULT_SEED,
) -> Path:
    """PNG with one scatter panel per embedding set (reference first), cells coloured by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(labels).astype(str)
    order = [reference] + [m for m in embeddings if m != reference]
    coords = project_2d({m: embeddings[m] for m in order}, reference, method=method, seed=seed)
    classes = np.unique(y)
    cmap = plt.get_cmap("tab20" if classes.size > 10 else "tab10")
    n = len(order)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 2.5, 4.2), squeeze=False)
    for ax, m in zip(axes[0], order):
        xy = coords[m]
        for j, c in enumerate(classes):
            sel = y == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(j % cmap.N), label=c, linewidths=0)
        ax.set_title(m + (" (reference)" if m == reference else ""), fontsize=10)
        ax.set_xlabel(f"{method.upper()} 1")
        ax.set_ylabel(f"{method.upper()} 2")
        ax.tick_params(labelsize=7)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, markerscale=3, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "—"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _md_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in df.iterrows():
        lines.append(f"| {name} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, Path):
        return str(v)
    return v


@dataclass(frozen=True)
class ReportOptions:
    """What :func:`write_report` writes besides the table.

    ``random_weights``: the encoder weights are randomly initialized (the report then says plainly that
    absolute metrics near chance are expected and only the differences between backends are meaningful);
    ``embeddings``, ``labels``: for the projection figure (skipped if either is None); ``reference``:
    reference method (default ``df.attrs["reference"]`` or the first row); ``metadata``: free-form facts
    recorded in JSON and Markdown (model, dataset, n_cells, ...); ``projection``: ``"pca"`` or ``"umap"``;
    ``title``; ``prefix``: file names ``<prefix>.*``.
    """

    random_weights: bool
    embeddings: Mapping[str, np.ndarray] | None = None
    labels: Sequence[str] | np.ndarray | None = None
    reference: str | None = None
    metadata: Mapping[str, Any] | None = None
    projection: str = "pca"
    title: str = "Embedding quality by backend"
    prefix: str = "embedding_eval"


RANDOM_WEIGHTS_NOTE = [
    "> **The encoder weights are randomly initialized (no pretrained checkpoint).** The embeddings",
    "> carry no learned biology, so absolute metrics near chance level are expected and say",
    "> nothing about Geneformer's quality (any structure above chance comes from which genes a cell",
    "> expresses passing through random projections). Only the differences between backends",
    "> (delta and fidelity columns) are meaningful here.",
    "",
]
#: metrics in [0, 1] or [-1, 1] whose largest |delta| each method's summary line names
BOUNDED_METRICS = ("accuracy", "f1_weighted", "silhouette", "knn_consistency", "ari", "nmi")


def _report_payload(df: pd.DataFrame, options: ReportOptions, reference: str, params: Mapping[str, Any]) -> dict:
    return {
        "title": options.title,
        "reference": reference,
        "random_weights": bool(options.random_weights),
        "metadata": dict(options.metadata or {}),
        "metric_params": params,
        "metric_definitions": metric_definitions(params),
        "methods": {str(m): row.to_dict() for m, row in df.iterrows()},
    }


def _worst_deltas(df: pd.DataFrame, reference: str, metric_cols: Sequence[str]) -> list[str]:
    """One line per non-reference method: its largest |delta| among the bounded metrics, its min cosine."""
    bounded = [c for c in BOUNDED_METRICS if c in metric_cols]
    lines = []
    for m in df.index:
        if m == reference:
            continue
        worst = max(((abs(df.loc[m, f"delta_{c}"]), c) for c in bounded), default=(0.0, "-"))
        lines.append(f"- `{m}`: largest |Δ| among bounded metrics = {_fmt(worst[0])} ({worst[1]}); "
                     f"min cosine vs reference = {_fmt(df.loc[m, 'cosine_min'])}.")
    return lines


def _report_markdown(df: pd.DataFrame, options: ReportOptions, reference: str, definitions: Mapping[str, str],
                     png: Path | None) -> str:
    md: list[str] = [f"# {options.title}", ""]
    if options.random_weights:
        md += RANDOM_WEIGHTS_NOTE
    md += [f"Reference method: `{reference}`."]
    md += [f"- {k_}: {v}" for k_, v in (options.metadata or {}).items()]
    md.append("")
    metric_cols = [c for c in METRIC_DIRECTIONS if c in df.columns and not df[c].isna().all()]
    chance = [c for c in CHANCE_COLUMNS if c in df.columns]
    if chance:
        ref_row = df.loc[reference]
        md.append("Chance levels: " + ", ".join(f"{c} = {_fmt(ref_row[c])}" for c in chance)
                  + "; ARI ≈ 0, NMI ≈ 0, silhouette ≈ 0 for labels unrelated to the embeddings.")
        md.append("")
    md += ["## Downstream metrics", "", _md_table(df, metric_cols), ""]
    md += ["## Differences to the reference (method − reference)", "",
           _md_table(df, [f"delta_{c}" for c in metric_cols]), ""]
    md += ["## Fidelity against the reference", "", _md_table(df, list(FIDELITY_METRICS)), ""]
    md += _worst_deltas(df, reference, metric_cols)
    md += ["", "## Definitions", ""]
    md += [f"- **{k_}**: {v}" for k_, v in definitions.items()]
    if png is not None:
        md += ["", f"![{options.projection} projection]({png.name})"]
    return "\n".join(md) + "\n"


def write_report(df: pd.DataFrame, out_dir: str | Path, options: ReportOptions) -> dict[str, Path]:
    """Write ``<prefix>.csv``, ``<prefix>.json``, ``<prefix>.md`` and (given embeddings and labels)
    ``<prefix>_<projection>.png`` into ``out_dir``; ``df`` is the output of :func:`compare_methods`.

    Returns:
        ``{"csv", "json", "markdown"[, "png"]}`` -> written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = options.reference or df.attrs.get("reference") or str(df.index[0])
    params = dict(df.attrs.get("params") or DEFAULT_PARAMS)
    prefix = options.prefix
    paths: dict[str, Path] = {"csv": out / f"{prefix}.csv"}
    df.to_csv(paths["csv"], index_label="method")
    if options.embeddings is not None and options.labels is not None:
        paths["png"] = plot_projection(options.embeddings, options.labels, out / f"{prefix}_{options.projection}.png",
                                       reference, options.projection, seed=int(params["seed"]))
    paths["json"] = out / f"{prefix}.json"
    payload = _report_payload(df, options, reference, params)
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    paths["markdown"] = out / f"{prefix}.md"
    paths["markdown"].write_text(_report_markdown(df, options, reference, payload["metric_definitions"], paths.get("png")))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def metric_definitions(params: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Plain-language definitions of every report column for the given metric parameters."""
    p = {**DEFAULT_PARAMS, **(params or {})}
    test_pct = round(100 * float(p["test_size"]))
    return {
        "accuracy / f1_weighted": f"StandardScaler + RidgeClassifier(alpha=1) on a stratified "
        f"{100 - test_pct}/{test_pct} split (seed {p['seed']}, same split for every method; classes with "
        "< 2 cells kept in training); held-out accuracy and support-weighted F1. accuracy_majority = "
        "held-out accuracy of always predicting the majority training class.",
        "silhouette": f"mean silhouette coefficient with labels as clusters, {p['silhouette_metric']} distance.",
        "separation_ratio": "mean Euclidean distance between class centroids (all class pairs) / mean "
        "Euclidean distance of cells to their own class centroid.",
        "knn_consistency": f"mean fraction of each cell's {p['k']} nearest neighbours (cosine, self excluded) "
        "sharing its label; chance (knn_consistency_chance) = sum_c n_c(n_c-1) / (n(n-1)).",
        "ari / nmi": f"KMeans (k = number of labels, seed {p['seed']}, n_init 10, Euclidean) clusters vs labels.",
        "davies_bouldin": "sklearn Davies-Bouldin index (Euclidean), lower is better.",
        "calinski_harabasz": "sklearn Calinski-Harabasz index, higher is better.",
        "control_separation": "mean Euclidean distance of non-control cells to the control centroid / "
        "mean Euclidean distance of control cells to it (only with a control label).",
        "delta_<metric>": "method value minus reference value.",
        "fidelity": "row-wise cosine similarity to the reference embeddings (cosine_min, cosine_mean); "
        "max and mean absolute elementwise error (max_abs_err, mean_abs_err).",
    }
