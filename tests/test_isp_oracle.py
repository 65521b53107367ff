"""``gftriton isp`` (upstream semantics, through a real tritonserver) against upstream Geneformer's own code.

The oracle is upstream's unmodified ``InSilicoPerturber`` (+ ``EmbExtractor.get_state_embs`` for cell
states) run on CPU by ``../shared/reference/oracle/run_oracle.py`` in helical's venv plus a small overlay
(``scripts/setup_oracle_env.sh``), on our exported weights (``geneformer_triton.export.checkpoint.save_checkpoint``). Cells:
short perturbench cells (counts recovered from the log-normalized file) and one celltypist cell cut to its
top-ranked genes. Each oracle configuration runs once per session; several configurations are asserted
on each run. fp32 encoders must match within 1e-5 with identical rankings; where upstream is wrong
(docs/isp.md) we compare against the documented correction. Negative controls: the same comparison
rejects a wrong layer and a plan that keeps the perturbed gene.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import oracle_env
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from geneformer_triton.client.isp import CellTable, cell_table_from_anndata
from geneformer_triton.client.isp_run import run_isp
from geneformer_triton.client.isp_spec import IspSpec, upstream_state_embedding
from geneformer_triton.client.isp_store import ResultStore
from geneformer_triton.client.triton_client import GeneformerClient
from geneformer_triton.core.cell_inputs import InputOptions, SymbolMap
from geneformer_triton.core.isp_upstream import plan_upstream, score
from geneformer_triton.core.tokenizer import RankValueTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
ORACLE = SHARED / "reference" / "oracle" / "run_oracle.py"
PERTURBENCH = SHARED / "data" / "perturbench_norman19_k562.h5ad"
ATOL = 1e-5
N_SHORT = 4  # perturbench cells
CUT = 80  # celltypist cell cut to its first CUT ranked genes
STATES = {"state_key": "state", "start_state": "A", "goal_state": "B", "alt_states": ["C"]}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def oracle_python() -> str:
    oracle_env.oracle_overlay()
    return str(oracle_env.helical_python())


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, loaded_model) -> Path:
    from geneformer_triton.export.checkpoint import save_checkpoint

    return save_checkpoint(loaded_model, tmp_path_factory.mktemp("checkpoint") / "gf")


@pytest.fixture(scope="session")
def cells(v1_vocabulary, celltypist_cells) -> CellTable:
    """N_SHORT perturbench control cells (>= 8 genes) + one celltypist cell cut to CUT genes, labelled A/B/C."""
    import anndata

    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    pb = anndata.read_h5ad(PERTURBENCH)
    pb = pb[pb.obs["condition"] == "control"][:200].copy()
    symbols = SymbolMap(v1_vocabulary.gene_name_to_id, "the V1 dictionaries")
    table = cell_table_from_anndata(pb, InputOptions(allow_non_integer=True), symbols, str(PERTURBENCH))
    rows = [r for r in range(len(table)) if 8 <= len(table.cell(r)[0]) <= 40][:N_SHORT]
    ids = np.array(sorted(set(table.gene_ids[table.gene_ids != ""]) | set(celltypist_cells.var["ensembl_id"])), dtype=object)
    column = {g: i for i, g in enumerate(ids)}
    data, indices, indptr, totals, names = [], [], [0], [], []
    for r in rows:
        genes, counts = table.cell(r)
        data += list(counts)
        indices += [column[g] for g in genes]
        indptr.append(len(data))
        totals.append(table.n_counts[r])
        names.append(table.cell_ids[r])
    ct_ids = celltypist_cells.var["ensembl_id"].to_numpy()
    x = celltypist_cells.X[0]
    full = tokenizer.tokenize_matrix(x, list(ct_ids), celltypist_cells.obs["n_counts"].to_numpy()[:1])[0]
    keep = set(int(t) for t in full[:CUT])
    col_tokens = tokenizer.gene_tokens(list(ct_ids))
    for c, v in zip(x.indices, x.data):
        if ct_ids[c] != "" and int(col_tokens[c]) in keep:
            data.append(v)
            indices.append(column[ct_ids[c]])
    indptr.append(len(data))
    totals.append(float(celltypist_cells.obs["n_counts"].iloc[0]))
    names.append("celltypist_0")
    counts = sp.csr_matrix((np.array(data, np.float32), np.array(indices), np.array(indptr)), shape=(len(names), len(ids)))
    counts.sort_indices()
    obs = pd.DataFrame({"state": ["A", "A", "B", "C", "A"][: len(names)]}, index=names)
    return CellTable(counts, ids, np.array(totals), names, dict(table.symbols), obs)


@pytest.fixture(scope="session")
def tokens(cells, v1_vocabulary) -> list[np.ndarray]:
    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    out = []
    for r in range(len(cells)):
        genes, counts = cells.cell(r)
        out.append(tokenizer.tokenize_gene_lists(genes[None, :], counts[None, :], cells.n_counts[r : r + 1])[0])
    return out


@pytest.fixture(scope="session")
def tokens_npz(tmp_path_factory, tokens) -> Path:
    path = tmp_path_factory.mktemp("oracle") / "tokens.npz"
    np.savez(path, *[t.astype(np.int64) for t in tokens])
    return path


@pytest.fixture(scope="session")
def oracle(oracle_python, checkpoint, tokens_npz, tmp_path_factory):
    """run(name, **options) -> upstream's JSON, computed once per configuration."""
    results: dict[str, dict] = {}
    work = tmp_path_factory.mktemp("oracle_runs")

    def run(name: str, *args: str) -> dict:
        if name not in results:
            out = work / f"{name}.json"
            env = oracle_env.oracle_environment()
            subprocess.run([oracle_python, str(ORACLE), str(checkpoint), str(SHARED / "geneformer" / "v1"),
                            str(tokens_npz), "--no-stats", "--threads", "2", "--output", str(out), *args],
                           check=True, env=env, capture_output=True, timeout=600)
            results[name] = json.loads(out.read_text())
        return results[name]

    return run


@pytest.fixture(scope="module")
def client(triton_server):
    with GeneformerClient(triton_server.grpc_url, "grpc", concurrency=8, timeout_s=600) as c:
        c.wait_ready(120, "geneformer_isp")
        yield c


def _job_runner(client, cells, work: Path, default_rows=None):
    """run(name, spec, rows) -> (rows frame, gene frame, errors frame) through gftriton isp's job runner,
    each named run once."""
    results: dict[str, tuple] = {}

    def run(name: str, spec: IspSpec, rows=default_rows):
        if name not in results:
            with ResultStore(work / f"{name}.parquet", spec.fingerprint(), columns=spec.columns()) as store:
                # every cell in flight: the server merges them into one execute (shared batches, issue 15)
                run_isp(client, cells, spec, store, concurrency=len(cells), rows=rows)
                results[name] = (store.read(), store.read_genes(), store.read_errors())
        return results[name]

    return run


@pytest.fixture(scope="module")
def ours(client, cells, tmp_path_factory):
    return _job_runner(client, cells, tmp_path_factory.mktemp("ours"))


# ----------------------------------------------------------------------------- comparison helpers


def _tok(vocabulary, gene_ids: str) -> tuple[int, ...]:
    return tuple(int(vocabulary.token_ids[g]) for g in gene_ids.split("+"))


def our_cell_values(frame: pd.DataFrame, cells: CellTable, vocabulary, column: str) -> dict:
    index = {c: i for i, c in enumerate(cells.cell_ids)}
    return {(index[c], _tok(vocabulary, g)): float(v) for c, g, v in zip(frame["cell_id"], frame["gene_id"], frame[column])}


def oracle_cell_values(result: dict, state=None) -> dict:
    return {(r["cell"], tuple(r["perturbed"])): r["cos"] for r in result["cell_shifts"] if r.get("state") == state}


def compare(ours: dict, theirs: dict) -> float:
    """Max abs difference over the same keys; asserts identical key sets and per-cell rankings."""
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs))[:5], len(ours), len(theirs))
    keys = sorted(theirs)
    a = np.array([ours[k] for k in keys])
    b = np.array([theirs[k] for k in keys])
    for cell in {k[0] for k in keys}:
        sel = np.array([k[0] == cell for k in keys])
        order = np.argsort(b[sel], kind="stable")
        assert np.all(np.diff(a[sel][order]) >= -ATOL), f"ranking differs in cell {cell}"
    return float(np.max(np.abs(a - b)))


def our_gene_values(genes: pd.DataFrame, cells: CellTable, vocabulary) -> dict:
    index = {c: i for i, c in enumerate(cells.cell_ids)}
    return {(index[c], _tok(vocabulary, g), int(vocabulary.token_ids[a])): float(v)
            for c, g, a, v in zip(genes["cell_id"], genes["gene_id"], genes["affected_gene_id"], genes["cos"])}


def oracle_gene_values(result: dict) -> dict:
    return {(r["cell"], tuple(r["perturbed"]), r["affected"]): r["cos"] for r in result["gene_shifts"]}


def upstream_overexpress_labels(mine: dict, gene_tokens: list) -> dict:
    """Our overexpress-all gene values under upstream's labels: upstream stores the value of affected gene
    L[j] under L[j+1] (L = the cell's genes without the perturbed one) and never labels L[0] (docs/isp.md);
    ``gene_tokens``: each cell's gene tokens (V2: without <cls>/<eos>)."""
    shifted = {}
    for cell, cell_tokens in enumerate(gene_tokens):
        for p in cell_tokens[1:]:
            rest = [int(t) for t in cell_tokens if t != p]
            for j in range(len(rest) - 1):
                shifted[(cell, (int(p),), rest[j + 1])] = mine[(cell, (int(p),), rest[j])]
    return shifted


def spec(**kw) -> IspSpec:
    return IspSpec(**{"perturbation": "delete", "encoder_model": None, **kw})


# ----------------------------------------------------------------------------- tests


def test_delete_all_cell_and_gene(oracle, ours, cells, v1_vocabulary):
    """emb_layer -1 (upstream's default); emb_layer 0 is covered by the overexpress configuration."""
    theirs = oracle("delete_all_-1", "--perturb-type", "delete", "--genes", "all", "--emb-mode",
                    "cell_and_gene", "--emb-layer", "-1", "--forward-batch-size", "8")
    assert theirs["layer_to_quant"] == 5
    rows, genes, _ = ours("delete_all_-1", spec(emb_layer=-1, emb_mode="cell_and_gene"))
    assert compare(our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    assert compare(our_gene_values(genes, cells, v1_vocabulary), oracle_gene_values(theirs)) < ATOL


def test_wrong_layer_is_rejected(oracle, ours, cells, v1_vocabulary):
    """Negative control: our last-layer scores do not pass against upstream's default layer."""
    theirs = oracle("delete_all_-1")
    rows, _, _ = ours("delete_all_0", spec(emb_layer=0))
    values = our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift")
    with pytest.raises(AssertionError):
        assert compare(values, oracle_cell_values(theirs)) < ATOL


def test_kept_perturbed_gene_is_rejected(oracle, tokens, loaded_model):
    """Negative control: in-process, the correct plan matches upstream and one that keeps the deleted gene
    in the comparison (positions shifted by one) does not."""
    from geneformer_triton.model.runtimes import torch_encode_fn

    theirs = oracle_cell_values(oracle("delete_all_-1"))
    encode = torch_encode_fn(loaded_model.encoder(emb_layer=-2))
    cell = 0
    plan = plan_upstream(tokens[cell], "delete", "all")
    original = encode(tokens[cell][None, :], np.ones((1, tokens[cell].size), np.int64))[1][0]
    good, kept = {}, {}
    for p in plan.perturbations:
        emb = encode(p.sequence[None, :], np.ones((1, p.sequence.size), np.int64))[1][0]
        good[(cell, p.label)] = score(p, original, emb).cell_emb_shift
        broken = replace(p, orig_pos=np.arange(p.pert_pos.size))  # the deleted gene stays in the original
        kept[(cell, p.label)] = score(broken, original, emb).cell_emb_shift
    mine = {k: v for k, v in theirs.items() if k[0] == cell}
    assert compare(good, mine) < ATOL
    with pytest.raises(AssertionError):
        assert compare(kept, mine) < ATOL


def test_overexpress_all_cell_and_gene_with_label_correction(oracle, ours, cells, v1_vocabulary, tokens):
    theirs = oracle("overexpress_all_0", "--perturb-type", "overexpress", "--genes", "all", "--emb-mode",
                    "cell_and_gene", "--emb-layer", "0", "--forward-batch-size", "8")
    assert theirs["layer_to_quant"] == 6
    rows, genes, _ = ours("overexpress_all_0", spec(perturbation="overexpress", emb_layer=0, emb_mode="cell_and_gene"))
    assert compare(our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    mine = our_gene_values(genes, cells, v1_vocabulary)
    assert compare(upstream_overexpress_labels(mine, tokens), oracle_gene_values(theirs)) < ATOL
    unshifted = [abs(mine[k] - v) for k, v in oracle_gene_values(theirs).items() if k in mine]
    assert max(unshifted) > ATOL  # negative control: upstream's labels, read as they are, do not match


def test_list_delete_and_overexpress_absent_gene(oracle, ours, cells, v1_vocabulary, tokens):
    """A list is one joint perturbation; delete keeps only cells carrying every gene; overexpress inserts a
    gene the cells do not express (KLF1) together with one some cells express (forward batch 1: upstream
    crashes on such mixed batches)."""
    shared = [int(t) for t in tokens[0][:2]]
    genes = [v1_vocabulary.gene_for_token(t) for t in shared]
    theirs = oracle("delete_list", "--perturb-type", "delete", "--genes", ",".join(genes), "--emb-mode",
                    "cell_and_gene", "--forward-batch-size", "4")
    rows, gene_rows, errors = ours("delete_list", spec(targets=tuple(genes), emb_mode="cell_and_gene"))
    assert compare(our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    assert compare(our_gene_values(gene_rows, cells, v1_vocabulary), oracle_gene_values(theirs)) < ATOL
    assert len(rows) + len(errors) == len(cells)  # cells without both genes are skipped, with the reason
    klf1 = v1_vocabulary.gene_name_to_id["KLF1"]
    oe = [klf1, genes[0]]
    theirs = oracle("overexpress_list", "--perturb-type", "overexpress", "--genes", ",".join(oe), "--emb-mode",
                    "cell_and_gene", "--forward-batch-size", "1")
    rows, gene_rows, _ = ours("overexpress_list", spec(perturbation="overexpress", targets=tuple(oe), emb_mode="cell_and_gene"))
    assert len(rows) == len(cells)
    assert compare(our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    assert compare(our_gene_values(gene_rows, cells, v1_vocabulary), oracle_gene_values(theirs)) < ATOL


def test_states_with_get_state_embs(oracle, ours, client, cells, v1_vocabulary):
    labels = ",".join(cells.obs["state"])
    theirs = oracle("states", "--perturb-type", "delete", "--genes", "all", "--emb-mode", "cell", "--states",
                    json.dumps(STATES), "--labels", labels, "--forward-batch-size", "8")
    base = spec()
    names = [STATES["start_state"], STATES["goal_state"], *STATES["alt_states"]]
    labels_arr = cells.obs["state"].to_numpy()
    embs = tuple(tuple(upstream_state_embedding(client, cells, list(np.flatnonzero(labels_arr == n)), base)) for n in names)
    run_spec = replace(base, state_names=tuple(names), state_embeddings=embs)
    start_rows = [int(r) for r in np.flatnonzero(labels_arr == "A")]
    rows, _, _ = ours("states", run_spec, start_rows)
    for name in names:
        assert compare(our_cell_values(rows, cells, v1_vocabulary, f"state_shift_{name}"),
                       oracle_cell_values(theirs, name)) < ATOL


def test_fp16_rank_agreement_reported(oracle, ours, cells, v1_vocabulary, capsys):
    theirs = oracle_cell_values(oracle("overexpress_all_0", "--perturb-type", "overexpress", "--genes", "all",
                                       "--emb-mode", "cell_and_gene", "--emb-layer", "0", "--forward-batch-size", "8"))
    rows, _, _ = ours("overexpress_all_fp16", spec(perturbation="overexpress", emb_layer=0,
                                                   encoder_model="geneformer_onnx_fp16"))
    mine = our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift")
    report = []
    for cell in sorted({k[0] for k in theirs}):
        keys = sorted(k for k in theirs if k[0] == cell)
        a = np.array([mine[k] for k in keys])
        b = np.array([theirs[k] for k in keys])
        rho = stats.spearmanr(a, b).statistic
        top = len(set(np.argsort(a)[:20]) & set(np.argsort(b)[:20])) / min(20, len(keys))
        report.append((cell, len(keys), rho, top, float(np.max(np.abs(a - b)))))
        assert rho > 0.9, report[-1]
    with capsys.disabled():
        for cell, n, rho, top, diff in report:
            print(f"\nfp16 vs upstream fp32, cell {cell} ({n} overexpressions): Spearman {rho:.4f}, top-20 overlap {top:.2f}, "
                  f"max |diff| {diff:.2e}")


# ----------------------------------------------------------------------------- V2 models and anchor combos
# Every configuration below runs in ONE upstream process (tests/upstream_isp_driver.py): V2 cells go through
# upstream's <cls>/<eos> code paths (emb_mode cls / cls_and_gene, which our cell / cell_and_gene map to).
# V2 (12 layers, the smallest V2 architecture) runs on the N_SHORT perturbench cells only (CPU time).

V2_MODEL = "gf-12L-38M-i4096"
DRIVER = REPO_ROOT / "tests" / "upstream_isp_driver.py"
KLF1 = "KLF1"
V2_ROWS = list(range(N_SHORT))


@pytest.fixture(scope="session")
def v2_model(v2_vocabulary):
    from geneformer_triton.model.loading import random_geneformer

    return random_geneformer(V2_MODEL, seed=0, vocabulary=v2_vocabulary)


@pytest.fixture(scope="session")
def v2_checkpoint(tmp_path_factory, v2_model) -> Path:
    from geneformer_triton.export.checkpoint import save_checkpoint

    return save_checkpoint(v2_model, tmp_path_factory.mktemp("checkpoint_v2") / "gf2")


@pytest.fixture(scope="session")
def v2_tokens(cells, v2_vocabulary) -> list[np.ndarray]:
    """The N_SHORT perturbench cells tokenized for V2: [<cls>, genes..., <eos>]."""
    tokenizer = RankValueTokenizer(v2_vocabulary, 4096, True)
    out = []
    for r in V2_ROWS:
        genes, counts = cells.cell(r)
        out.append(tokenizer.tokenize_gene_lists(genes[None, :], counts[None, :], cells.n_counts[r : r + 1])[0])
    assert all(t[0] == v2_vocabulary.cls_id and t[-1] == v2_vocabulary.eos_id for t in out)
    return out


@pytest.fixture(scope="session")
def v2_server(tmp_path_factory, v2_model):
    """A real tritonserver serving the V2 ISP model on our exported V2 encoders (hidden_states[n-1] and [n])."""
    from geneformer_triton.export.repository import export_model_repository
    from geneformer_triton.serving.server import LocalTritonServer

    repository = tmp_path_factory.mktemp("exported_v2") / "model_repository"  # empty: export writes all of it
    export_model_repository(v2_model, repository, formats=("onnx_isp", "onnx"))
    with LocalTritonServer(repository, model_config_name="cpu") as server:
        yield server


@pytest.fixture(scope="module")
def v2_client(v2_server):
    with GeneformerClient(v2_server.grpc_url, "grpc", concurrency=8, timeout_s=600) as c:
        c.wait_ready(120, "geneformer_isp")
        yield c


def _v2_genes(v2_vocabulary, v2_tokens) -> list[str]:
    return [v2_vocabulary.gene_for_token(int(t)) for t in v2_tokens[0][1:3]]


@pytest.fixture(scope="session")
def batch_oracle(oracle_python, checkpoint, v2_checkpoint, tokens_npz, tokens, v2_tokens, cells, v1_vocabulary,
                 v2_vocabulary, tmp_path_factory) -> dict:
    """{name: upstream JSON} for every V2 / anchor configuration, computed in one upstream process."""
    work = tmp_path_factory.mktemp("oracle_batch")
    v2_npz = work / "tokens_v2.npz"
    np.savez(v2_npz, *[t.astype(np.int64) for t in v2_tokens])
    genes = _v2_genes(v2_vocabulary, v2_tokens)
    klf1 = v2_vocabulary.gene_name_to_id[KLF1]
    states = ["--states", json.dumps(STATES), "--labels", ",".join(cells.obs["state"].iloc[V2_ROWS])]
    v1_anchor = v1_vocabulary.gene_for_token(int(tokens[0][0]))
    configs = {  # name: (model, run_oracle options, anchor gene)
        "v2_delete_all_-1": ("v2", ["--perturb-type", "delete", "--genes", "all", "--emb-mode", "cell_and_gene",
                                    "--emb-layer", "-1", "--forward-batch-size", "8"], None),
        "v2_overexpress_all_0": ("v2", ["--perturb-type", "overexpress", "--genes", "all", "--emb-mode",
                                        "cell_and_gene", "--emb-layer", "0", "--forward-batch-size", "8"], None),
        "v2_delete_list": ("v2", ["--perturb-type", "delete", "--genes", ",".join(genes), "--emb-mode",
                                  "cell_and_gene", "--forward-batch-size", "4"], None),
        "v2_overexpress_list": ("v2", ["--perturb-type", "overexpress", "--genes", f"{klf1},{genes[0]}",
                                       "--emb-mode", "cell_and_gene", "--forward-batch-size", "1"], None),
        # a one-gene list keeps the states run short (the state formula is the same as for "all")
        "v2_states": ("v2", ["--perturb-type", "delete", "--genes", genes[0], "--emb-mode", "cell", *states,
                             "--forward-batch-size", "8"], None),
        "v1_anchor": ("v1", ["--perturb-type", "delete", "--genes", "all", "--emb-mode", "cell",
                             "--forward-batch-size", "8"], v1_anchor),
    }
    runs = []
    for name, (model, args, anchor) in configs.items():
        v2 = model == "v2"
        runs.append({"argv": [str(v2_checkpoint if v2 else checkpoint), str(SHARED / "geneformer" / model),
                              str(v2_npz if v2 else tokens_npz), "--no-stats", "--threads", "2",
                              "--model-version", "V2" if v2 else "V1", "--output", str(work / f"{name}.json"), *args],
                     "anchor_gene": anchor, "special": v2})
    (work / "runs.json").write_text(json.dumps(runs))
    done = subprocess.run([oracle_python, str(DRIVER), str(work / "runs.json")], env=oracle_env.oracle_environment(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    print("\n".join(line for line in done.stderr.splitlines() if line.startswith("upstream_isp_driver:")))
    out = {name: json.loads((work / f"{name}.json").read_text()) for name in configs}
    out["_anchor"] = v1_anchor
    return out


@pytest.fixture(scope="module")
def ours_v2(v2_client, cells, tmp_path_factory):
    return _job_runner(v2_client, cells, tmp_path_factory.mktemp("ours_v2"), V2_ROWS)


def test_v2_delete_all_cls_and_gene(batch_oracle, ours_v2, cells, v2_vocabulary):
    """V2: the per-perturbation value is the <cls> cosine; gene cosines exclude <cls>/<eos>; emb_layer -1."""
    theirs = batch_oracle["v2_delete_all_-1"]
    assert theirs["layer_to_quant"] == 11
    rows, genes, _ = ours_v2("delete_all_-1", spec(emb_layer=-1, emb_mode="cell_and_gene"))
    assert compare(our_cell_values(rows, cells, v2_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    assert compare(our_gene_values(genes, cells, v2_vocabulary), oracle_gene_values(theirs)) < ATOL
    assert not {v2_vocabulary.cls_id, v2_vocabulary.eos_id} & {k[2] for k in our_gene_values(genes, cells, v2_vocabulary)}


def test_v2_wrong_layer_is_rejected(batch_oracle, ours_v2, cells, v2_vocabulary):
    """Negative control: last-layer (emb_layer 0) values do not pass against upstream's emb_layer -1."""
    rows, _, _ = ours_v2("delete_all_0", spec(emb_layer=0))
    with pytest.raises(AssertionError):
        assert compare(our_cell_values(rows, cells, v2_vocabulary, "cell_emb_shift"),
                       oracle_cell_values(batch_oracle["v2_delete_all_-1"])) < ATOL


def test_v2_overexpress_all_inserts_after_cls(batch_oracle, ours_v2, cells, v2_vocabulary, v2_tokens):
    theirs = batch_oracle["v2_overexpress_all_0"]
    assert theirs["layer_to_quant"] == 12
    rows, genes, _ = ours_v2("overexpress_all_0", spec(perturbation="overexpress", emb_layer=0, emb_mode="cell_and_gene"))
    assert compare(our_cell_values(rows, cells, v2_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    mine = our_gene_values(genes, cells, v2_vocabulary)
    assert compare(upstream_overexpress_labels(mine, [t[1:-1] for t in v2_tokens]), oracle_gene_values(theirs)) < ATOL


def test_v2_lists_delete_and_overexpress_absent_gene(batch_oracle, ours_v2, cells, v2_vocabulary, v2_tokens):
    genes = _v2_genes(v2_vocabulary, v2_tokens)
    theirs = batch_oracle["v2_delete_list"]
    rows, gene_rows, errors = ours_v2("delete_list", spec(targets=tuple(genes), emb_mode="cell_and_gene"))
    assert compare(our_cell_values(rows, cells, v2_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    assert compare(our_gene_values(gene_rows, cells, v2_vocabulary), oracle_gene_values(theirs)) < ATOL
    assert len(rows) + len(errors) == len(V2_ROWS)
    oe = (v2_vocabulary.gene_name_to_id[KLF1], genes[0])
    theirs = batch_oracle["v2_overexpress_list"]
    rows, gene_rows, _ = ours_v2("overexpress_list", spec(perturbation="overexpress", targets=oe, emb_mode="cell_and_gene"))
    assert len(rows) == len(V2_ROWS)
    assert compare(our_cell_values(rows, cells, v2_vocabulary, "cell_emb_shift"), oracle_cell_values(theirs)) < ATOL
    assert compare(our_gene_values(gene_rows, cells, v2_vocabulary), oracle_gene_values(theirs)) < ATOL


def test_v2_states_use_cls(batch_oracle, ours_v2, v2_client, cells, v2_vocabulary, v2_tokens):
    theirs = batch_oracle["v2_states"]
    base = spec()
    names = [STATES["start_state"], STATES["goal_state"], *STATES["alt_states"]]
    labels = cells.obs["state"].to_numpy()[V2_ROWS]
    embs = tuple(tuple(upstream_state_embedding(v2_client, cells, list(np.flatnonzero(labels == n)), base)) for n in names)
    run_spec = replace(base, targets=(_v2_genes(v2_vocabulary, v2_tokens)[0],), state_names=tuple(names),
                       state_embeddings=embs)
    rows, _, errors = ours_v2("states", run_spec, [int(r) for r in np.flatnonzero(labels == "A")])
    assert len(rows) + len(errors) == int((labels == "A").sum()) and len(rows) > 0
    for name in names:
        assert compare(our_cell_values(rows, cells, v2_vocabulary, f"state_shift_{name}"),
                       oracle_cell_values(theirs, name)) < ATOL


def test_v2_special_tokens_negative_controls(batch_oracle, v2_tokens, v2_model):
    """In-process, V2 cell 0 (delete all): our plan + <cls> scoring matches upstream; scoring it as a V1 cell
    (mean of gene cosines, <cls> ignored) does not, nor do gene cosines read one position off (<cls> compared
    as the first gene)."""
    from geneformer_triton.model.runtimes import torch_encode_fn

    theirs = batch_oracle["v2_delete_all_-1"]
    encode = torch_encode_fn(v2_model.encoder(emb_layer=-2))
    cell = 0
    ids = v2_tokens[cell]
    plan = plan_upstream(ids, "delete", "all", max_len=4096, special=(int(ids[0]), int(ids[-1])))
    original = encode(ids[None, :], np.ones((1, ids.size), np.int64))[1][0]
    good, v1_style, good_genes, off_genes = {}, {}, {}, {}
    for p in plan.perturbations:
        emb = encode(p.sequence[None, :], np.ones((1, p.sequence.size), np.int64))[1][0]
        result = score(p, original, emb, special=True)
        good[(cell, p.label)] = result.cell_emb_shift
        v1_style[(cell, p.label)] = score(p, original, emb).cell_emb_shift
        off = score(replace(p, orig_pos=p.orig_pos - 1, pert_pos=p.pert_pos - 1), original, emb, special=True)
        for a, c, o in zip(ids[p.orig_pos], result.gene_cos, off.gene_cos):
            good_genes[(cell, p.label, int(a))] = float(c)
            off_genes[(cell, p.label, int(a))] = float(o)
    cells_theirs = {k: v for k, v in oracle_cell_values(theirs).items() if k[0] == cell}
    genes_theirs = {k: v for k, v in oracle_gene_values(theirs).items() if k[0] == cell}
    assert compare(good, cells_theirs) < ATOL
    assert compare(good_genes, genes_theirs) < ATOL
    with pytest.raises(AssertionError):
        assert compare(v1_style, cells_theirs) < ATOL
    with pytest.raises(AssertionError):
        assert compare(off_genes, genes_theirs) < ATOL


def test_anchor_combos(batch_oracle, oracle, ours, cells, v1_vocabulary):
    """combos=1 + anchor_gene (V1; the V2 planner shares the code, tests/test_isp_upstream.py): every other gene
    deleted together with the anchor; cells without the anchor skipped."""
    anchor = batch_oracle["_anchor"]
    rows, _, errors = ours("anchor", spec(anchor_genes=(anchor,)))
    theirs = oracle_cell_values(batch_oracle["v1_anchor"])
    assert len(theirs) > 0 and rows["cell_id"].nunique() + len(errors) == len(cells)
    assert compare(our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift"), theirs) < ATOL
    assert anchor not in set(rows["gene_id"])
    # negative control: the same genes deleted alone (upstream, no anchor) do not pass
    alone = {k: v for k, v in oracle_cell_values(oracle("delete_all_-1")).items() if k in theirs}
    mine = {k: v for k, v in our_cell_values(rows, cells, v1_vocabulary, "cell_emb_shift").items() if k in alone}
    assert len(alone) == len(theirs)
    with pytest.raises(AssertionError):
        assert compare(mine, alone) < ATOL
