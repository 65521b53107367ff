"""Embedding-quality metrics: known structure, chance behaviour, and independent re-computations."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_triton.core.fidelity import FIDELITY_METRICS
from geneformer_triton.evaluation import metrics as ev

CLASS_SIZES = {"a": 60, "b": 45, "c": 30, "ctrl": 25}


def _blobs(seed: int = 0, spread: float = 1.0, sep: float = 12.0, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class of CLASS_SIZES, in shuffled order: ([n, dim] fp32, [n] str)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[c] * n for c, n in CLASS_SIZES.items()])
    centers = {c: rng.normal(size=dim) * sep for c in CLASS_SIZES}
    x = np.stack([centers[c] for c in labels]) + rng.normal(scale=spread, size=(labels.size, dim))
    order = rng.permutation(labels.size)
    return x[order].astype(np.float32), labels[order]


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return _blobs()


@pytest.fixture(scope="module")
def noisy() -> tuple[np.ndarray, np.ndarray]:
    """Overlapping clusters: metrics strictly between the extremes, so formulas are really exercised."""
    return _blobs(seed=1, spread=3.0, sep=1.0)


@pytest.fixture(scope="module")
def random_labels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    y = rng.choice(np.array(["p", "q", "r", "s"]), size=400)
    return x, y


# ---------------------------------------------------------------------------------------------
# independent reference implementations (plain numpy, loops)
# ---------------------------------------------------------------------------------------------
def _cosine_dist(x: np.ndarray) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - u @ u.T


def _euclid_dist(x: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def _silhouette_by_hand(x: np.ndarray, y: np.ndarray, dist: np.ndarray) -> float:
    s = []
    for i in range(len(y)):
        same = (y == y[i]) & (np.arange(len(y)) != i)
        a = dist[i, same].mean()
        b = min(dist[i, y == c].mean() for c in np.unique(y) if c != y[i])
        s.append((b - a) / max(a, b))
    return float(np.mean(s))


def _ari_by_hand(y: np.ndarray, pred: np.ndarray) -> float:
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((yi.max() + 1, pred.max() + 1))
    for i, j in zip(yi, pred):
        table[i, j] += 1
    comb = lambda v: v * (v - 1) / 2  # noqa: E731
    idx = comb(table).sum()
    a, b, n = comb(table.sum(1)).sum(), comb(table.sum(0)).sum(), comb(len(y))
    expected = a * b / n
    return float((idx - expected) / ((a + b) / 2 - expected))


def _nmi_by_hand(y: np.ndarray, pred: np.ndarray) -> float:
    _, yi = np.unique(y, return_inverse=True)
    n = len(y)
    table = np.zeros((yi.max() + 1, pred.max() + 1))
    for i, j in zip(yi, pred):
        table[i, j] += 1
    p = table / n
    pi, pj = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pi, pj)[nz])).sum()
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()  # noqa: E731
    return float(mi / ((h(pi) + h(pj)) / 2))


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------
def test_stratified_split_is_disjoint_complete_and_stratified(blobs):
    _, y = blobs
    tr, te = ev.stratified_split(y, test_size=0.2, seed=0)
    assert np.intersect1d(tr, te).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(y.size))
    assert te.size == math.ceil(0.2 * y.size)
    for c, n in CLASS_SIZES.items():
        assert abs((y[te] == c).sum() - 0.2 * n) <= 1
    tr2, te2 = ev.stratified_split(y, test_size=0.2, seed=0)
    assert np.array_equal(te, te2)  # deterministic


def test_split_handles_classes_too_small_to_stratify(caplog):
    y = np.array(["a"] * 30 + ["b"] * 20 + ["lonely"])
    with caplog.at_level(logging.WARNING, logger="geneformer_triton.evaluation.metrics"):
        tr, te = ev.stratified_split(y)
    assert "lonely" in caplog.text
    assert 50 in tr and 50 not in te  # the singleton stays in training
    x = np.random.default_rng(0).normal(size=(y.size, 4)).astype(np.float32)
    res = ev.classification_metrics(x, y)  # must not raise
    assert 0.0 <= res["accuracy"] <= 1.0
    # test set too small to hold every class: unstratified fallback, still a valid split
    y2 = np.array([c for c in "abcdefgh" for _ in range(3)])
    tr, te = ev.stratified_split(y2, test_size=0.2)
    assert tr.size + te.size == y2.size and np.intersect1d(tr, te).size == 0


def test_classification_known_structure(blobs):
    x, y = blobs
    res = ev.classification_metrics(x, y)
    assert res["accuracy"] == 1.0 and res["f1_weighted"] == 1.0
    assert res["n_test"] == math.ceil(0.2 * y.size) and res["n_train"] + res["n_test"] == y.size


def test_classification_random_labels_near_chance(random_labels):
    x, y = random_labels
    res = ev.classification_metrics(x, y)
    assert res["accuracy"] < 0.45  # 4 balanced classes: chance 0.25
    assert abs(res["accuracy_majority"] - 0.25) < 0.1


def test_classification_matches_numpy_ridge(noisy):
    """Accuracy and weighted F1 recomputed from predictions of a ridge classifier written in numpy."""
    x, y = noisy
    x = (x * np.logspace(-2, 2, x.shape[1])).astype(np.float32)  # unequal feature scales: scaling matters
    alpha = 30.0
    res = ev.classification_metrics(x, y, alpha=alpha)
    tr, te = ev.stratified_split(y)
    xd = x.astype(np.float64)
    mu, sd = xd[tr].mean(0), xd[tr].std(0)
    sd[sd == 0] = 1.0
    xtr, xte = (xd[tr] - mu) / sd, (xd[te] - mu) / sd
    classes = np.unique(y[tr])
    t = np.where(y[tr][:, None] == classes[None, :], 1.0, -1.0)
    xm, tm = xtr.mean(0), t.mean(0)
    w = np.linalg.solve((xtr - xm).T @ (xtr - xm) + alpha * np.eye(x.shape[1]), (xtr - xm).T @ (t - tm))
    pred = classes[np.argmax((xte - xm) @ w + tm, axis=1)]
    truth = y[te]
    assert res["accuracy"] == pytest.approx(np.mean(pred == truth), abs=1e-12)
    assert 0.3 < res["accuracy"] < 1.0  # a non-trivial case
    f1s, weights = [], []
    for c in np.unique(truth):
        tp = np.sum((pred == c) & (truth == c))
        prec = tp / max(np.sum(pred == c), 1)
        rec = tp / np.sum(truth == c)
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
        weights.append(np.sum(truth == c))
    assert res["f1_weighted"] == pytest.approx(np.average(f1s, weights=weights), abs=1e-12)
    majority = classes[np.argmax([(y[tr] == c).sum() for c in classes])]
    assert res["accuracy_majority"] == pytest.approx(np.mean(truth == majority))


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_silhouette_matches_hand_computation(noisy, metric):
    x, y = noisy
    xd = x.astype(np.float64)
    dist = _cosine_dist(xd) if metric == "cosine" else _euclid_dist(xd)
    assert ev.silhouette(x, y, metric=metric) == pytest.approx(_silhouette_by_hand(xd, y, dist), abs=1e-9)


def test_separation_ratio_matches_loops(noisy):
    x, y = noisy
    xd = x.astype(np.float64)
    classes = sorted(set(y))
    cent = {c: xd[y == c].mean(0) for c in classes}
    pair_d = [np.linalg.norm(cent[a] - cent[b]) for i, a in enumerate(classes) for b in classes[i + 1:]]
    own_d = [np.linalg.norm(xd[i] - cent[y[i]]) for i in range(len(y))]
    assert ev.separation_ratio(x, y) == pytest.approx(np.mean(pair_d) / np.mean(own_d), rel=1e-10)


@pytest.mark.parametrize("k", [1, 5, 15])
def test_knn_consistency_matches_brute_force(noisy, k):
    x, y = noisy
    dist = _cosine_dist(x.astype(np.float64))
    fracs = []
    for i in range(len(y)):
        d = dist[i].copy()
        d[i] = np.inf
        nbrs = np.argsort(d, kind="stable")[:k]
        fracs.append(np.mean(y[nbrs] == y[i]))
    assert ev.knn_label_consistency(x, y, k=k) == pytest.approx(np.mean(fracs), abs=1e-12)


def test_knn_consistency_excludes_self_with_duplicates():
    # two identical points of different labels: each one's nearest other cell has the other label
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.1]], dtype=np.float32)
    y = np.array(["a", "b", "c", "c"])
    assert ev.knn_label_consistency(x, y, k=1) == pytest.approx(0.5)


def test_clustering_agreement_matches_hand_ari_nmi(noisy):
    from sklearn.cluster import KMeans

    x, y = noisy
    res = ev.clustering_agreement(x, y, seed=0)
    pred = KMeans(n_clusters=len(set(y)), random_state=0, n_init=10).fit_predict(x.astype(np.float64))
    assert res["ari"] == pytest.approx(_ari_by_hand(y, pred), abs=1e-10)
    assert res["nmi"] == pytest.approx(_nmi_by_hand(y, pred), abs=1e-10)


def test_davies_bouldin_and_calinski_harabasz_by_hand(noisy):
    x, y = noisy
    m = ev.embedding_metrics(x, y)
    xd = x.astype(np.float64)
    classes = sorted(set(y))
    cent = np.stack([xd[y == c].mean(0) for c in classes])
    scatter = np.array([np.linalg.norm(xd[y == c] - cent[i], axis=1).mean() for i, c in enumerate(classes)])
    db = np.mean([max((scatter[i] + scatter[j]) / np.linalg.norm(cent[i] - cent[j])
                      for j in range(len(classes)) if j != i) for i in range(len(classes))])
    assert m["davies_bouldin"] == pytest.approx(db, rel=1e-9)
    g = xd.mean(0)
    between = sum((y == c).sum() * np.sum((cent[i] - g) ** 2) for i, c in enumerate(classes))
    within = sum(np.sum((xd[y == c] - cent[i]) ** 2) for i, c in enumerate(classes))
    n, k = len(y), len(classes)
    assert m["calinski_harabasz"] == pytest.approx(between / (k - 1) / (within / (n - k)), rel=1e-9)


def test_control_separation_matches_loops(noisy):
    x, y = noisy
    xd = x.astype(np.float64)
    ctrl = [i for i in range(len(y)) if y[i] == "ctrl"]
    other = [i for i in range(len(y)) if y[i] != "ctrl"]
    mu = sum(xd[i] for i in ctrl) / len(ctrl)
    expected = np.mean([np.linalg.norm(xd[i] - mu) for i in other]) / np.mean([np.linalg.norm(xd[i] - mu) for i in ctrl])
    assert ev.control_separation(x, y, "ctrl") == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError):
        ev.control_separation(x, y, "absent")


def test_all_metrics_on_separated_clusters(blobs):
    x, y = blobs
    m = ev.embedding_metrics(x, y, control_label="ctrl")
    assert m["accuracy"] == 1.0 and m["f1_weighted"] == 1.0
    assert m["ari"] == pytest.approx(1.0) and m["nmi"] == pytest.approx(1.0)
    assert m["knn_consistency"] == 1.0
    assert m["silhouette"] > 0.8
    assert m["separation_ratio"] > 5
    assert m["davies_bouldin"] < 0.3
    assert m["calinski_harabasz"] > 1000
    assert m["control_separation"] > 5
    assert m["n_cells"] == y.size and m["n_labels"] == 4


def test_all_metrics_on_random_labels_near_chance(random_labels):
    x, y = random_labels
    m = ev.embedding_metrics(x, y, control_label="p")
    assert abs(m["ari"]) < 0.05 and m["nmi"] < 0.05
    assert abs(m["silhouette"]) < 0.05
    assert abs(m["knn_consistency"] - m["knn_consistency_chance"]) < 0.05
    assert m["separation_ratio"] < 0.2
    assert m["control_separation"] == pytest.approx(1.0, abs=0.1)
    _, counts = np.unique(y, return_counts=True)
    assert m["knn_consistency_chance"] == pytest.approx((counts * (counts - 1)).sum() / (400 * 399))
    assert math.isnan(ev.embedding_metrics(x, y)["control_separation"])  # no control label given


def test_input_validation():
    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        ev.embedding_metrics(x[0], ["a"] * 3)
    with pytest.raises(ValueError):
        ev.silhouette(x, ["a", "b", "a"])
    with pytest.raises(ValueError):
        ev.silhouette(x, ["a"] * 4)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        ev.separation_ratio(bad, ["a", "b", "a", "b"])


# ---------------------------------------------------------------------------------------------
# fidelity and side-by-side comparison
# ---------------------------------------------------------------------------------------------
def _rotate(x: np.ndarray, cos_theta: float | np.ndarray, seed: int = 0) -> np.ndarray:
    """Each row turned by the angle arccos(cos_theta) (norm kept): row-wise cosine = cos_theta exactly
    (a scalar, or one value per row)."""
    cos_theta = np.broadcast_to(np.asarray(cos_theta, dtype=np.float64), (x.shape[0],))[:, None]
    rng = np.random.default_rng(seed)
    xd = x.astype(np.float64)
    r = rng.normal(size=xd.shape)
    u = xd / np.linalg.norm(xd, axis=1, keepdims=True)
    v = r - (r * u).sum(1, keepdims=True) * u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.linalg.norm(xd, axis=1, keepdims=True) * (cos_theta * u + np.sqrt(1 - cos_theta**2) * v)


def test_fidelity_known_cosine(blobs):
    x, _ = blobs
    f = ev.embedding_fidelity(_rotate(x, 0.9), x)
    assert f["cosine_min"] == pytest.approx(0.9, abs=1e-6) and f["cosine_mean"] == pytest.approx(0.9, abs=1e-6)
    cos = np.linspace(0.5, 1.0, x.shape[0])
    f = ev.embedding_fidelity(_rotate(x, cos), x)
    assert f["cosine_min"] == pytest.approx(0.5, abs=1e-9) and f["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-9)
    f2 = ev.embedding_fidelity(2 * x, x)  # scale: cosine 1, errors = |x|
    assert f2["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert f2["max_abs_err"] == pytest.approx(np.abs(x).max(), rel=1e-6)
    assert f2["mean_abs_err"] == pytest.approx(np.abs(x.astype(np.float64)).mean(), rel=1e-6)
    z = np.zeros((2, 3))
    assert ev.embedding_fidelity(z, z)["cosine_min"] == 1.0
    with pytest.raises(ValueError):
        ev.embedding_fidelity(x[:, :3], x)


def test_compare_methods_identical_and_perturbed(blobs):
    x, y = blobs
    pert = _rotate(x, 0.99, seed=3).astype(np.float32)
    df = ev.compare_methods({"onnx_fp32": x.copy(), "pytorch_fp32": x, "perturbed": pert}, y,
                            reference="pytorch_fp32", control_label="ctrl")
    assert list(df.index) == ["pytorch_fp32", "onnx_fp32", "perturbed"]
    deltas = [f"delta_{m}" for m in ev.METRIC_DIRECTIONS]
    assert set(deltas) <= set(df.columns) and set(FIDELITY_METRICS) <= set(df.columns)
    for name in ("pytorch_fp32", "onnx_fp32"):
        assert (df.loc[name, deltas] == 0).all()
        assert df.loc[name, "cosine_min"] == pytest.approx(1.0, abs=1e-7)
        assert df.loc[name, "max_abs_err"] == 0.0
    assert df.loc["perturbed", "cosine_min"] == pytest.approx(0.99, abs=1e-5)
    assert df.loc["perturbed", "cosine_mean"] == pytest.approx(0.99, abs=1e-5)
    # deltas are exactly method - reference, and the metrics are those of embedding_metrics
    alone = ev.embedding_metrics(pert, y, control_label="ctrl")
    for m in ev.METRIC_DIRECTIONS:
        assert df.loc["perturbed", m] == pytest.approx(alone[m], abs=1e-12)
        assert df.loc["perturbed", f"delta_{m}"] == pytest.approx(df.loc["perturbed", m] - df.loc["pytorch_fp32", m])
    assert df.loc["perturbed", "delta_silhouette"] < 0  # rotating cells blurs the clusters
    with pytest.raises(KeyError):
        ev.compare_methods({"a": x}, y, reference="b")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("random_weights", [True, False])
def test_write_report(tmp_path, blobs, random_weights):
    x, y = blobs
    embs = {"pytorch_fp32": x, "onnx_fp16": (x + 0.01).astype(np.float32)}
    df = ev.compare_methods(embs, y, reference="pytorch_fp32")  # no control: NaN column
    paths = ev.write_report(df, tmp_path / "out", ev.ReportOptions(
        random_weights=random_weights, embeddings=embs, labels=y, metadata={"model": "gf-6L-10M-i2048", "dataset": "blobs"}))
    assert set(paths) == {"csv", "json", "markdown", "png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())

    back = pd.read_csv(paths["csv"], index_col="method")
    assert list(back.index) == ["pytorch_fp32", "onnx_fp16"]
    assert back.loc["onnx_fp16", "accuracy"] == pytest.approx(df.loc["onnx_fp16", "accuracy"])

    payload = json.loads(paths["json"].read_text())
    assert payload["reference"] == "pytorch_fp32" and payload["random_weights"] is random_weights
    assert payload["metadata"]["model"] == "gf-6L-10M-i2048"
    assert payload["methods"]["onnx_fp16"]["control_separation"] is None  # NaN -> null, valid JSON
    assert payload["metric_params"]["k"] == ev.DEFAULT_K

    md = paths["markdown"].read_text()
    assert ("randomly initialized" in md) is random_weights
    if random_weights:
        assert "near chance" in md
    assert "| onnx_fp16 |" in md and "cosine_min" in md and paths["png"].name in md

    from PIL import Image

    raw = paths["png"].read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["png"]) as im:
        im.verify()
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100  # two panels side by side


def test_report_without_embeddings_skips_png(tmp_path, blobs):
    x, y = blobs
    df = ev.compare_methods({"ref": x}, y, reference="ref")
    paths = ev.write_report(df, tmp_path, ev.ReportOptions(random_weights=False))
    assert "png" not in paths and paths["markdown"].is_file()


def test_pca_projection_shared_axes(blobs):
    x, _ = blobs
    coords = ev.project_2d({"ref": x, "same": x.copy()}, reference="ref")
    assert coords["ref"].shape == (x.shape[0], 2)
    np.testing.assert_allclose(coords["ref"], coords["same"])
    with pytest.raises(ValueError):
        ev.project_2d({"ref": x}, reference="ref", method="tsne")


# ---------------------------------------------------------------------------------------------
# pbmc68k_reduced loader
# ---------------------------------------------------------------------------------------------
def test_pbmc68k_counts():
    import scanpy as sc

    from geneformer_triton.core.data.pbmc68k import load_pbmc68k_counts

    adata = load_pbmc68k_counts(symbol_to_ensembl={"CD3E": "ENSG00000198851", "HES4": "ENSG00000188290"})
    assert adata.shape == (700, 765)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    data = adata.X.data
    assert np.all(data == np.round(data)) and data.min() >= 1  # stored entries are positive integers
    src = sc.datasets.pbmc68k_reduced()
    assert list(adata.var_names) == list(src.raw.var_names) and "CD3E" in adata.var_names
    assert list(adata.obs_names) == list(src.obs_names)
    assert adata.obs["bulk_labels"].nunique() == 10
    assert (adata.obs["bulk_labels"].astype(str).to_numpy() == src.obs["bulk_labels"].astype(str).to_numpy()).all()
    # normalizing back reproduces raw.X (stored at 3 decimals)
    tot = src.obs["n_counts"].to_numpy(np.float64)[:, None]
    back = np.log1p(adata.X.toarray().astype(np.float64) / tot * 1e4)
    assert np.abs(back - src.raw.X.toarray()).max() < 1e-3
    assert (adata.X.toarray() > 0).sum() == (src.raw.X.toarray() > 0).sum()  # same sparsity pattern
    np.testing.assert_allclose(adata.obs["n_counts"], src.obs["n_counts"])
    np.testing.assert_allclose(adata.obs["n_counts_recovered"], adata.X.sum(axis=1).A1)
    rep = adata.uns["count_recovery"]
    assert rep["max_non_integer"] == 0 and rep["min_count"] >= 0 and rep["max_lognorm_error"] < 1e-3
    assert 0.1 < rep["fraction_of_n_counts"] < 0.5  # raw holds only the 765 genes, not all genes
    assert adata.var.loc["CD3E", "ensembl_id"] == "ENSG00000198851"
    assert (adata.var["ensembl_id"] != "").sum() == 2
