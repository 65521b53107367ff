"""In-silico perturbation served by Triton (``geneformer_isp``) against the in-process fp32 reference.

The reference is ``perturbation.run_plan`` with the fp32 PyTorch encoder on the same tokenized cell.
Real celltypist cells are cut to their top-ranked genes (only those genes are sent, with the cell's
full total counts, so the server's tokenizer yields the cell's first K tokens) to keep CPU time small.
Also: hand-checkable tiny cells (token order of every perturbation type, end to end), every bad input,
and the ``gftriton isp`` client killed mid-run and resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geneformer_triton.client.isp_spec import infer_cell
from geneformer_triton.client.isp_store import ResultStore
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError
from geneformer_triton.core.isp_schema import COLUMNS
from geneformer_triton.core.perturbation import cosine, plan_perturbations, run_plan
from geneformer_triton.core.tokenizer import RankValueTokenizer, pad_token_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
ISP = "geneformer_isp"
ENCODERS = ("geneformer_onnx", "geneformer_torchscript")
SCORE_ATOL = 1e-4
EMB_COSINE = 0.99999
ALL_OUTPUTS = ["perturbed_genes", "cell_shift", "gene_embedding_shift", "goal_shift", "start_shift", "original_embedding"]


# ----------------------------------------------------------------------------- helpers


def b(values) -> np.ndarray:
    return np.array([str(v).encode() for v in values], dtype=object)


@pytest.fixture(scope="module")
def client(triton_server):
    with GeneformerClient(triton_server.grpc_url, "grpc", concurrency=1, timeout_s=300) as c:
        c.wait_ready(60, ISP)
        yield c


@pytest.fixture(scope="module")
def tokenizer(v1_vocabulary):
    return RankValueTokenizer(v1_vocabulary, 2048, False)


@pytest.fixture(scope="module")
def top_gene_cells(celltypist_cells, tokenizer):
    """Cells 0..5 cut to their first K ranked genes: (gene_ids, counts, n_counts) in column order."""
    adata = celltypist_cells
    ids = adata.var["ensembl_id"].to_numpy()
    col_tokens = tokenizer.gene_tokens(list(ids))
    cells = []
    for row, k in zip(range(6), (40, 64, 48, 56, 32, 44)):
        x = adata.X[row]
        full = tokenizer.tokenize_matrix(x, list(ids), adata.obs["n_counts"].to_numpy()[row : row + 1])[0]
        keep_tokens = set(int(t) for t in full[:k])
        cols = np.array([c for c in x.indices if ids[c] != "" and int(col_tokens[c]) in keep_tokens])
        cols.sort()
        counts = np.asarray(x[:, cols].todense()).ravel().astype(np.float32)
        cells.append((ids[cols].astype(object), counts, float(adata.obs["n_counts"].iloc[row])))
    return cells


def reference(tokenizer, vocabulary, encode, cell, perturbation, targets=None, mode="each", anchors=(),
              rank_shift=None, goal=None, start=None):
    gene_ids, counts, n_counts = cell
    (tokens,) = tokenizer.tokenize_gene_lists(gene_ids[None, :], counts[None, :], np.array([n_counts]))
    to_tok = lambda genes: tokenizer.gene_tokens(list(genes))  # noqa: E731
    plan = plan_perturbations(
        tokens, perturbation, "all" if targets is None else to_tok(targets), group=mode == "set",
        anchor=to_tok(anchors) if anchors else None, rank_shift=rank_shift,
    )
    result = run_plan(encode, plan, start_state=start, goal_state=goal, max_tokens=4096)
    labels = ["+".join(vocabulary.genes_for_tokens(row)) for row in plan.perturbed_genes]
    return result, labels


def request(cell, perturbation, targets=None, mode=None, anchors=(), rank_shift=None, goal=None, start=None,
            gene_shift=None, encoder=None) -> dict:
    gene_ids, counts, n_counts = cell
    inputs = {"gene_ids": b(gene_ids), "counts": counts, "n_counts": np.array([n_counts], np.float32),
              "perturbation": b([perturbation]), "semantics": b(["ours"])}  # ours; upstream's: test_isp_oracle.py
    if targets is not None:
        inputs["targets"] = b(targets)
    if mode is not None:
        inputs["target_mode"] = b([mode])
    if anchors:
        inputs["anchor_genes"] = b(anchors)
    if rank_shift is not None:
        inputs["rank_shift"] = np.array([rank_shift], np.float32)
    if goal is not None:
        inputs["goal_embedding"] = np.asarray(goal, np.float32)
    if start is not None:
        inputs["start_embedding"] = np.asarray(start, np.float32)
    if gene_shift is not None:
        inputs["return_gene_shift"] = np.array([gene_shift], bool)
    if encoder is not None:
        inputs["encoder_model"] = b([encoder])
    return inputs


def served(client, inputs, outputs=ALL_OUTPUTS) -> dict:
    out = infer_cell(client, ISP, inputs, outputs)
    return {k: v for k, v in out.items() if v is not None}


def assert_matches(out, ref, labels, gene_shift=True):
    assert [g.decode() for g in out["perturbed_genes"]] == labels
    emb_cos = cosine(out["original_embedding"], ref.original_cell_embedding)
    assert emb_cos >= EMB_COSINE, emb_cos
    np.testing.assert_allclose(out["cell_shift"], ref.cell_shift, rtol=0, atol=SCORE_ATOL)
    if gene_shift:
        np.testing.assert_allclose(out["gene_embedding_shift"], ref.gene_shift, rtol=0, atol=SCORE_ATOL)
    else:
        assert "gene_embedding_shift" not in out
    for name, values in (("goal_shift", ref.goal_shift), ("start_shift", ref.start_shift)):
        if values is None:
            assert name not in out
        else:
            np.testing.assert_allclose(out[name], values, rtol=0, atol=SCORE_ATOL)


# ----------------------------------------------------------------------------- served == reference


def embedding(encode, tokenizer, cell) -> np.ndarray:
    (tokens,) = tokenizer.tokenize_gene_lists(cell[0][None], cell[1][None], np.array([cell[2]]))
    return encode(*pad_token_batch([tokens]))[0][0]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_delete_all_matches_reference(client, tokenizer, v1_vocabulary, reference_encoder, top_gene_cells, encoder):
    goal = embedding(reference_encoder, tokenizer, top_gene_cells[4])  # states: embeddings of other cells
    start = embedding(reference_encoder, tokenizer, top_gene_cells[5])
    for cell in top_gene_cells[:2]:
        ref, labels = reference(tokenizer, v1_vocabulary, reference_encoder, cell, "delete", goal=goal, start=start)
        out = served(client, request(cell, "delete", goal=goal, start=start, encoder=encoder))  # gene shift by default
        assert_matches(out, ref, labels)


CASES = {
    "overexpress-each": dict(perturbation="overexpress", targets=[3, 0, 17]),
    "inhibit-positions": dict(perturbation="inhibit", targets=[0, 5, 40], rank_shift=5.0),
    "activate-fraction": dict(perturbation="activate", targets=[47, 20, 1], rank_shift=0.25),
    "inhibit-all": dict(perturbation="inhibit", rank_shift=3.0),
    "delete-set": dict(perturbation="delete", targets=[2, 9, 30], mode="set"),
    "overexpress-set-anchor": dict(perturbation="overexpress", targets=[12, 25], mode="set", anchors=[44]),
    "activate-each-anchor": dict(perturbation="activate", targets=[10, 33], anchors=[40], rank_shift=2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_perturbation_types_match_reference(client, tokenizer, v1_vocabulary, reference_encoder, top_gene_cells, case):
    spec = dict(CASES[case])
    cell = top_gene_cells[2]  # 48 genes
    (tokens,) = tokenizer.tokenize_gene_lists(cell[0][None], cell[1][None], np.array([cell[2]]))
    name = lambda i: v1_vocabulary.gene_for_token(int(tokens[i]))  # noqa: E731 (i-th ranked gene's id)
    for key in ("targets", "anchors"):
        if key in spec:
            spec[key] = [name(i) for i in spec[key]]
    ref, labels = reference(tokenizer, v1_vocabulary, reference_encoder, cell, **spec)
    gene_shift = case != "inhibit-all"
    out = served(client, request(cell, gene_shift=gene_shift, **spec))
    assert_matches(out, ref, labels, gene_shift=gene_shift)
    if spec.get("mode") == "set":
        assert len(labels) == 1 and labels[0].count("+") == len(spec["targets"]) + len(spec.get("anchors", ())) - 1


def test_cell_shift_only_requests_skip_token_embeddings(client, tokenizer, v1_vocabulary, reference_encoder, top_gene_cells):
    cell = top_gene_cells[3]
    ref, labels = reference(tokenizer, v1_vocabulary, reference_encoder, cell, "delete")
    out = served(client, request(cell, "delete"), ["perturbed_genes", "cell_shift", "original_embedding"])
    assert set(out) == {"perturbed_genes", "cell_shift", "original_embedding"}
    assert_matches(out, ref, labels, gene_shift=False)


# ----------------------------------------------------------------------------- hand-checkable tiny cells


@pytest.fixture(scope="module")
def tiny(v1_vocabulary):
    """Five real genes whose counts are 5, 4, 3, 2, 1 times their median: rank order g0 > g1 > ... > g4."""
    genes = sorted(g for g in v1_vocabulary.token_ids if g.startswith("ENSG"))[100:105]
    medians = np.array([v1_vocabulary.gene_medians[g] for g in genes])
    counts = (np.array([5, 4, 3, 2, 1]) * medians * 7.0).astype(np.float32)
    order = [3, 0, 4, 1, 2]  # send them shuffled: the server must rank them
    cell = (np.array(genes, dtype=object)[order], counts[order], float(counts.sum()))
    tokens = [v1_vocabulary.token_ids[g] for g in genes]
    return genes, tokens, cell


HAND = [  # (perturbation, targets (indices), mode, rank_shift, expected order of g0..g4 after it)
    ("delete", [1], None, None, [0, 2, 3, 4]),
    ("delete", [0, 4], "set", None, [1, 2, 3]),
    ("overexpress", [3], None, None, [3, 0, 1, 2, 4]),
    ("overexpress", [4, 2], "set", None, [4, 2, 0, 1, 3]),
    ("inhibit", [1], None, 2.0, [0, 2, 3, 1, 4]),
    ("inhibit", [3], None, 5.0, [0, 1, 2, 4, 3]),
    ("activate", [3], None, 1.0, [0, 1, 3, 2, 4]),
    ("activate", [4], None, 0.5, [0, 4, 1, 2, 3]),  # k = floor(0.5 * 5 + 0.5) = 3: rank 4 -> 1
]


@pytest.mark.parametrize("perturbation,targets,mode,rank_shift,expected", HAND, ids=[f"{h[0]}-{h[1]}" for h in HAND])
def test_hand_checked_token_order(client, reference_encoder, tiny, perturbation, targets, mode, rank_shift, expected):
    genes, tokens, cell = tiny
    out = served(client, request(cell, perturbation, [genes[i] for i in targets], mode=mode, rank_shift=rank_shift))
    assert [g.decode() for g in out["perturbed_genes"]] == (
        ["+".join(genes[i] for i in targets)] if mode == "set" else [genes[i] for i in targets])
    original = np.array(tokens, dtype=np.int64)
    written = np.array([tokens[i] for i in expected], dtype=np.int64)
    (orig_emb, orig_tok), (pert_emb, pert_tok) = [reference_encoder(s[None], np.ones((1, len(s)), np.int64)) for s in (original, written)]
    assert cosine(out["original_embedding"], orig_emb[0]) >= EMB_COSINE
    assert abs(out["cell_shift"][0] - cosine(pert_emb[0], orig_emb[0])) <= SCORE_ATOL
    # gene shift: unperturbed genes matched by identity wherever they now sit
    kept = [i for i in range(5) if i not in targets]
    where = {g: p for p, g in enumerate(expected)}
    gene_cos = cosine(orig_tok[0, kept], pert_tok[0, [where[i] for i in kept]]).mean()
    assert abs(out["gene_embedding_shift"][0] - gene_cos) <= SCORE_ATOL


# ----------------------------------------------------------------------------- bad input


BAD = {
    "gene-not-in-cell": (dict(targets=["ENSG00000000003"]), "dropped: not expressed in the cell"),
    "gene-not-in-vocabulary": (dict(targets=["ENSG99999999999"]), "not in the model's gene vocabulary"),
    "unknown-perturbation": (dict(perturbation="knockout"), "unknown perturbation 'knockout'"),
    "empty-target-list": (dict(targets=[]), "targets is empty"),
    "set-larger-than-cell": (dict(targets="ALL+1", mode="set"), "is not smaller than the cell"),
    "set-equal-to-cell": (dict(targets="ALL", mode="set"), "is not smaller than the cell"),
    "cell-too-short": (dict(cell="ONE"), "needs at least 2"),
    "empty-gene-list": (dict(cell="EMPTY"), "gene_ids is empty"),
    "inhibit-without-rank-shift": (dict(perturbation="inhibit"), "needs rank_shift"),
    "fractional-positions": (dict(perturbation="activate", rank_shift=1.5), "whole number"),
    "rank-shift-on-delete": (dict(rank_shift=2.0), "rank_shift applies to inhibit/activate only"),
    "unknown-target-mode": (dict(mode="pairs"), "unknown target_mode 'pairs'"),
    "set-of-all": (dict(mode="set"), "give an explicit gene list"),
    "duplicate-in-set": (dict(targets="DUP", mode="set"), "lists a gene twice"),
    "target-is-anchor": (dict(targets="G0", anchors="G0"), "is also an anchor"),
    "goal-wrong-size": (dict(goal=np.ones(17)), "goal_embedding has 17 values; the encoder's hidden size is 256"),
    "goal-not-finite": (dict(goal=np.full(256, np.nan)), "NaN or infinite"),
    "negative-counts": (dict(cell="NEGATIVE"), "negative"),
    "length-mismatch": (dict(cell="MISMATCH"), "must match"),
    "encoder-not-allowed": (dict(encoder="geneformer_tokenizer"), "is not allowed"),
    "encoder-not-loaded": (dict(encoder="geneformer_trt"), "encoder model 'geneformer_trt' is not loaded on this server"),
    "no-vocabulary-gene": (dict(cell="UNKNOWN_GENES"), "none of its gene ids is in the vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_error(client, tiny, case):
    genes, _, cell = tiny
    spec, message = BAD[case]
    spec = dict(spec)
    cells = {
        "ONE": (cell[0][:1], cell[1][:1], cell[2]),
        "EMPTY": (np.array([], dtype=object), np.array([], np.float32), cell[2]),
        "NEGATIVE": (cell[0], -cell[1], cell[2]),
        "MISMATCH": (cell[0], cell[1][:3], cell[2]),
        "UNKNOWN_GENES": (np.array(["NOT_A_GENE", "ALSO_NOT"], dtype=object), np.ones(2, np.float32), 2.0),
    }
    cell = cells.get(spec.pop("cell", None), cell)
    targets = {"ALL": genes, "ALL+1": genes + ["ENSG00000000003"], "DUP": [genes[0], genes[0]], "G0": [genes[0]]}
    if isinstance(spec.get("targets"), str):
        spec["targets"] = targets[spec["targets"]]
    if isinstance(spec.get("anchors"), str):
        spec["anchors"] = targets[spec["anchors"]]
    spec.setdefault("perturbation", "delete")
    with pytest.raises(InferenceError, match="geneformer_isp") as info:
        infer_cell(client, ISP, request(cell, **spec), ["cell_shift"])
    assert message in str(info.value), str(info.value)


def test_model_keeps_serving_after_errors(client, tiny):
    _, _, cell = tiny
    out = served(client, request(cell, "delete"), ["cell_shift"])
    assert out["cell_shift"].shape == (5,)


# ----------------------------------------------------------------------------- client: kill and resume


N_CLI_CELLS, N_CLI_GENES = 24, 32


def test_isp_subcommand_is_registered():
    from geneformer_triton.cli import build_parser

    args = build_parser().parse_args(["isp", "--output", "x.csv", "--targets", "GATA1,SPI1", "--target-mode", "set"])
    assert args.func.__module__ == "geneformer_triton.client.isp_cli" and args.target_mode == "set"


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory, celltypist_cells, tokenizer):
    """24 real cells cut to their top 32 genes (obs n_counts keeps the full totals)."""
    import scipy.sparse as sp

    adata = celltypist_cells[:N_CLI_CELLS].copy()
    ids = adata.var["ensembl_id"].to_numpy()
    col_tokens = tokenizer.gene_tokens(list(ids))
    cells = tokenizer.tokenize_matrix(adata.X, list(ids), adata.obs["n_counts"].to_numpy())
    matrix = sp.lil_matrix(adata.X.shape, dtype=np.float32)
    dense_x = adata.X.tocsr()
    for row, tokens in enumerate(cells):
        keep = np.isin(col_tokens, tokens[:N_CLI_GENES]) & (ids != "")
        cols = np.flatnonzero(keep)
        matrix[row, cols] = dense_x[row, cols].toarray()
    adata.X = sp.csr_matrix(matrix)
    adata.obs["group"] = ["reference" if i < 4 else "query" for i in range(adata.n_obs)]
    path = tmp_path_factory.mktemp("isp") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def read_parts(folder: Path) -> pd.DataFrame:
    """Committed rows of a Parquet result folder (parts with a ``_commits/`` marker), read without its lock."""
    committed = {m.name for m in (folder / "_commits").iterdir() if not m.name.startswith(".")}
    parts = [p for p in sorted(folder.glob("part-*.parquet")) if p.name[len("part-"): -len(".parquet")] in committed]
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def _isp_cli(triton_server, h5ad, output, *extra):
    # `python -m geneformer_triton.client.isp_cli ARGS` == `gftriton isp ARGS` (registration: test_isp_subcommand_is_registered)
    return [sys.executable, "-m", "geneformer_triton.client.isp_cli", "--url", triton_server.grpc_url,
            "--h5ad", str(h5ad), "--output", str(output), "--concurrency", "2", "--flush-every", "1",
            "--no-progress", "--top", "5", "--semantics", "ours", "--target-mode", "each", *extra]


def test_cli_killed_mid_run_resumes_without_duplicates(triton_server, small_h5ad, tmp_path):
    output = tmp_path / "isp.parquet"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(_isp_cli(triton_server, small_h5ad, output), cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        commits = output / "_commits"
        while not commits.is_dir() or len([m for m in commits.iterdir() if not m.name.startswith(".")]) < 3:
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no results appeared"
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(30)
    killed = read_parts(output)
    n_done = killed["cell_id"].nunique()
    assert 3 <= n_done < N_CLI_CELLS, f"the run was not interrupted mid-way ({n_done} cells done)"

    second = subprocess.run(_isp_cli(triton_server, small_h5ad, output), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{n_done} already done" in second.stderr
    rows = read_parts(output)
    assert list(rows.columns) == list(COLUMNS)
    assert rows["cell_id"].nunique() == N_CLI_CELLS
    assert not rows.duplicated(["cell_id", "target_index"]).any()
    per_cell = rows.groupby("cell_id").agg(n=("target_index", "size"), expected=("n_perturbations", "first"))
    assert (per_cell["n"] == per_cell["expected"]).all() and (per_cell["n"] == N_CLI_GENES).all()
    assert rows.loc[rows["cell_id"].isin(killed["cell_id"])].shape[0] == len(killed)  # earlier rows kept as they were
    # summary table with symbols and a PNG, next to the output
    summary = pd.read_csv(tmp_path / "isp_summary.csv")
    assert {"gene_id", "gene_symbol", "n_cells", "mean_cell_shift"} <= set(summary.columns)
    assert summary["mean_cell_shift"].is_monotonic_decreasing
    assert (summary["gene_symbol"] != summary["gene_id"]).mean() > 0.9  # symbols from the dataset's var names
    png = (tmp_path / "isp_top_shifts.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["gene_symbol"].iloc[0] in second.stdout
    # a third run has nothing left to do
    third = subprocess.run(_isp_cli(triton_server, small_h5ad, output), cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and f"{N_CLI_CELLS} already done" in third.stderr
    assert len(read_parts(output)) == len(rows)


def test_csv_store_repairs_a_torn_append(tmp_path):
    """A kill mid-append leaves a torn line and a partial cell: both are dropped on reopen."""
    path = tmp_path / "isp.csv"

    def frame(cell, n, rows=None):
        rows = n if rows is None else rows
        return pd.DataFrame({
            "cell_id": [cell] * rows, "perturbation": ["delete"] * rows, "gene_id": [f"ENSG{i:011d}" for i in range(rows)],
            "gene_symbol": [f"G{i}" for i in range(rows)], "target_index": np.arange(rows), "n_perturbations": [n] * rows,
            "cell_shift": np.linspace(0.9, 1, rows), "gene_embedding_shift": np.nan, "goal_shift": np.nan, "start_shift": np.nan,
            "cell_emb_shift": np.nan,
        })[list(COLUMNS)]

    with ResultStore(path, {"perturbation": "delete"}) as store:
        store.append(frame("a", 3), pd.DataFrame(columns=["cell_id", "error"]))
        store.append(frame("b", 4), pd.DataFrame([{"cell_id": "z", "error": "rejected"}]))
    with open(path, "ab") as handle:  # cell c: 2 of its 5 rows, the second one torn
        text = frame("c", 5, rows=2).to_csv(index=False, header=False)
        handle.write(text[: len(text) - 7].encode())
    with ResultStore(path, {"perturbation": "delete"}) as store:
        rows = store.read()
        assert sorted(rows["cell_id"].unique()) == ["a", "b"] and len(rows) == 7
        assert store.finished() == {"a", "b", "z"}
        store.append(frame("c", 5), pd.DataFrame(columns=["cell_id", "error"]))
        assert len(store.read()) == 12 and not store.read().duplicated(["cell_id", "target_index"]).any()
    with pytest.raises(RuntimeError, match="other settings"):
        ResultStore(path, {"perturbation": "overexpress"})


def test_client_goal_state_from_reference_cells(triton_server, small_h5ad, tokenizer, v1_vocabulary, reference_encoder, tmp_path):
    """Goal state = mean embedding of reference cells (via the embedding ensemble); goal shifts == reference."""
    from geneformer_triton.client.isp import cell_table
    from geneformer_triton.client.isp_run import run_isp
    from geneformer_triton.client.isp_spec import IspSpec, state_embedding
    from geneformer_triton.core.cell_inputs import read_cells

    cells = cell_table(read_cells(small_h5ad))
    rows = [int(r) for r in np.flatnonzero(cells.obs["group"] == "reference")]
    tokens = tokenizer.tokenize_matrix(cells.counts[rows], list(cells.gene_ids), cells.n_counts[rows])
    expected_goal = reference_encoder(*pad_token_batch(tokens))[0].astype(np.float64).mean(axis=0)
    with GeneformerClient(triton_server.grpc_url, concurrency=2) as client:
        goal = state_embedding(client, cells, rows, "geneformer_embed_onnx")
        assert cosine(goal, expected_goal) >= EMB_COSINE
        spec = IspSpec(semantics="ours", goal_embedding=tuple(float(v) for v in goal))
        with ResultStore(tmp_path / "goal.csv", spec.fingerprint()) as store:
            stats = run_isp(client, cells, spec, store, concurrency=2, rows=[10, 11])
            result = store.read()
    assert stats.cells_done == 2 and stats.perturbations == 2 * N_CLI_GENES == len(result)
    for cell_id, frame in result.groupby("cell_id", sort=False):
        row = cells.cell_ids.index(cell_id)
        gene_ids, counts = cells.cell(row)
        ref, labels = reference(tokenizer, v1_vocabulary, reference_encoder, (gene_ids, counts, cells.n_counts[row]),
                                "delete", goal=expected_goal)
        assert list(frame["gene_id"]) == labels
        np.testing.assert_allclose(frame["cell_shift"], ref.cell_shift, rtol=0, atol=SCORE_ATOL)
        np.testing.assert_allclose(frame["goal_shift"], ref.goal_shift, rtol=0, atol=SCORE_ATOL)
        assert frame["gene_embedding_shift"].isna().all() and frame["start_shift"].isna().all()


def test_engine_with_special_tokens_in_process(v2_vocabulary, top_gene_cells):
    """V2 dictionaries: <cls>/<eos> stay in place and are never perturbed; IspJob == run_plan (no server)."""
    import torch
    from transformers import BertConfig, BertModel

    from geneformer_triton.core.isp_service import IspEngine, parse_request, run_job
    from geneformer_triton.model.encoder import GeneformerEncoder
    from geneformer_triton.model.runtimes import torch_encode_fn

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(v2_vocabulary), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128, hidden_act="relu", initializer_range=0.5))
    cls, eos = v2_vocabulary.cls_id, v2_vocabulary.eos_id
    encode = torch_encode_fn(GeneformerEncoder(bert.eval(), excluded_token_ids=(cls, eos)).eval())
    engine = IspEngine(v2_vocabulary, 4096, True, max_tokens_per_batch=700)
    gene_ids, counts, n_counts = top_gene_cells[0]
    inputs = request((gene_ids, counts, n_counts), "inhibit", rank_shift=0.1, goal=np.linspace(-1, 1, 32))
    parsed = parse_request(lambda name: inputs.get(name))
    job = engine.prepare(parsed, gene_shift=True)
    assert job.plan.original_ids[0] == cls and job.plan.original_ids[-1] == eos
    assert len(job.chunks) > 2
    out = run_job(job, lambda ids, mask, want: encode(ids, mask))
    ref = run_plan(encode, job.plan, goal_state=np.linspace(-1, 1, 32), max_tokens=700)
    genes = v2_vocabulary.genes_for_tokens(job.plan.original_ids[1:-1])
    assert [g.decode() for g in out["perturbed_genes"]] == genes
    for name, expected in (("cell_shift", ref.cell_shift), ("gene_embedding_shift", ref.gene_shift), ("goal_shift", ref.goal_shift)):
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="target <cls> dropped: not in the model's gene vocabulary"):  # no genes
        engine.prepare(parse_request(lambda name: {**inputs, "targets": b(["<cls>"])}.get(name)), False)


def test_client_records_rejected_and_skipped_cells(triton_server, small_h5ad, tmp_path):
    from geneformer_triton.client.isp import cell_table
    from geneformer_triton.client.isp_run import run_isp
    from geneformer_triton.client.isp_spec import IspSpec
    from geneformer_triton.core.cell_inputs import read_cells

    cells = cell_table(read_cells(small_h5ad))
    genes_a, _ = cells.cell(0)
    genes_b, _ = cells.cell(1)
    only_a = next(g for g in genes_a if g not in set(genes_b))
    with GeneformerClient(triton_server.grpc_url, concurrency=2) as client:
        lenient = IspSpec(perturbation="overexpress", targets=(only_a,), semantics="ours")
        with ResultStore(tmp_path / "lenient.parquet", lenient.fingerprint()) as store:
            stats = run_isp(client, cells, lenient, store, rows=[0, 1])
            assert (stats.cells_done, stats.cells_without_targets) == (1, 1)
            assert list(store.read()["gene_id"]) == [only_a]
            assert store.read_errors()["error"].str.startswith("skipped").all()
        strict = IspSpec(perturbation="overexpress", targets=(only_a,), strict_targets=True, semantics="ours")
        with ResultStore(tmp_path / "strict.parquet", strict.fingerprint()) as store:
            stats = run_isp(client, cells, strict, store, rows=[0, 1])
            assert (stats.cells_done, stats.cells_rejected) == (1, 1)
            (message,) = store.read_errors()["error"]
            assert "dropped: not expressed in the cell" in message
            assert run_isp(client, cells, strict, store, rows=[0, 1]).cells_skipped_done == 2  # resume: nothing left
            store.forget_errors()
            assert run_isp(client, cells, strict, store, rows=[0, 1]).cells_rejected == 1  # --retry-errors


# ----------------------------------------------------------------------------- upstream semantics through the CLI


def _gftriton(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "geneformer_triton.cli", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_overexpress_absent_gene_in_control_cells(triton_server, exported_repository, tmp_path):
    """The CRISPRa analogue: KLF1 (not among the file's 500 genes) overexpressed in 12 control cells of the
    log-normalized perturbench file (counts recovered from obs['ncounts']): one row per cell, exit 0."""
    output = tmp_path / "oe.parquet"
    done = _gftriton("isp", "--url", triton_server.grpc_url, "--repository", exported_repository,
                     "--h5ad", SHARED / "data" / "perturbench_norman19_k562.h5ad",
                     "--cells", "condition=control", "--max-cells", 12, "--perturbation", "overexpress",
                     "--targets", "KLF1", "--allow-non-integer", "--output", output, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_parts(output)
    assert len(rows) == 12 and rows["cell_id"].nunique() == 12
    assert (rows["gene_symbol"] == "KLF1").all() and rows["cell_emb_shift"].between(-1, 1).all()
    assert rows["cell_emb_shift"].notna().all() and (rows["cell_emb_shift"] < 1).all()


def test_unknown_target_dropped_and_named_others_run(triton_server, small_h5ad, tmp_path):
    output = tmp_path / "drop.parquet"
    with GeneformerClient(triton_server.grpc_url, concurrency=2) as client:
        from geneformer_triton.client.isp import cell_table
        from geneformer_triton.client.isp_run import run_isp
        from geneformer_triton.client.isp_spec import IspSpec
        from geneformer_triton.core.cell_inputs import read_cells

        cells = cell_table(read_cells(small_h5ad))
        genes, _ = cells.cell(0)
        spec = IspSpec(perturbation="overexpress", targets=(str(genes[3]), "ENSG99999999999"))
        with ResultStore(output, spec.fingerprint()) as store:
            stats = run_isp(client, cells, spec, store, rows=[0, 1])
            rows, errors = store.read(), store.read_errors()
    assert stats.cells_done == 2 and len(rows) == 2 and (rows["gene_id"] == str(genes[3])).all()
    assert (errors["error"] == "target ENSG99999999999 dropped: not in the model's gene vocabulary").sum() == 2


def test_run_without_results_exits_nonzero_with_reason(triton_server, small_h5ad, tmp_path):
    done = _gftriton("isp", "--url", triton_server.grpc_url, "--h5ad", small_h5ad, "--n-cells", 2, "--targets",
                     "ENSG99999999999", "--output", tmp_path / "none.parquet", "--no-progress")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no cell produced a result" in done.stderr and "not in the model's gene vocabulary" in done.stderr
    assert "geneformer_isp: geneformer_isp:" not in done.stderr  # no doubled prefix


@pytest.mark.parametrize("command", [["isp", "--wait", 1, "--retries", 1, "--n-cells", 1, "--output", "OUT"],
                                     ["check", "--retries", 0, "--retry-backoff", 0.1],
                                     ["embed", SHARED / "data" / "perturbench_norman19_k562.h5ad", "-o", "OUT",
                                      "--max-cells", 1, "--retries", 0, "--retry-backoff", 0.1,
                                      "--dictionaries", SHARED / "geneformer" / "v1"]])
def test_unreachable_server_exits_3(tmp_path, command):
    from geneformer_triton.serving.server import free_port

    args = [tmp_path / "x.parquet" if a == "OUT" else a for a in command]
    done = _gftriton(*args, "--url", f"127.0.0.1:{free_port()}")
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])


def test_target_beyond_input_size_is_dropped_in_process(v1_vocabulary, top_gene_cells):
    """A 16-token input: a target ranked beyond it is dropped for that cell with the reason (ours, one at a
    time) while the other targets run; a joint delete (upstream) skips the cell saying why."""
    from geneformer_triton.core.isp_service import IspEngine, IspInputError, parse_request

    engine = IspEngine(v1_vocabulary, 16, False, max_tokens_per_batch=4096)
    gene_ids, counts, n_counts = top_gene_cells[0]
    cell = engine.tokenize(parse_request(lambda name: request(top_gene_cells[0], "delete").get(name)))
    inside, beyond = v1_vocabulary.gene_for_token(int(cell[2])), None
    ranked = RankValueTokenizer(v1_vocabulary, 2048, False).tokenize_gene_lists(gene_ids[None, :], counts[None, :], np.array([n_counts]))[0]
    beyond = v1_vocabulary.gene_for_token(int(ranked[20]))
    ours = request(top_gene_cells[0], "delete", targets=[inside, beyond], mode="each")
    job = engine.prepare(parse_request(lambda name: ours.get(name)), gene_shift=False)
    assert job.labels == [inside]
    assert job.notes == [f"target {beyond} dropped: expressed but ranked beyond the model input size (16 genes)"]
    upstream = {**ours, "semantics": b(["upstream"])}
    upstream.pop("target_mode")
    with pytest.raises(IspInputError, match=f"target {beyond} is expressed but ranked beyond the model input size"):
        engine.prepare_upstream(parse_request(lambda name: upstream.get(name)))
