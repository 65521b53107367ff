"""`gftriton isp-stats` against upstream Geneformer's own InSilicoPerturberStats (the oracle).

One helical-venv process (tests/upstream_stats_driver.py) runs upstream's unmodified InSilicoPerturber on
real perturbench (Norman 2019, K562) cells with a seeded random gf-6L-10M-i2048 checkpoint, keeps its raw
pickles and stats CSVs, and runs upstream's stats for the modes run_oracle.py does not (vs_null,
mixture_model, goal_state_shift of one gene). Our stats read the same pickles; every column must agree.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geneformer_triton.core.isp_stats import (
    CELL_EMB,
    GeneDictionaries,
    IspStatsError,
    StatsOptions,
    benjamini_hochberg,
    compute_stats,
    rank_sum_two_samples,
    rank_sum_vs_reference,
)
from geneformer_triton.core.isp_stats_readers import (
    ISP_RESULT_COLUMNS,
    shifts_from_isp_results,
    shifts_from_oracle_json,
    shifts_from_upstream_dir,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oracle_env  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DICTS = oracle_env.SHARED / "geneformer" / "v1"
NORMAN = oracle_env.SHARED / "data" / "perturbench_norman19_k562.h5ad"
CONDITIONS = ("control", "KLF1", "MAPK1")  # 6 cells each: start, goal and alternative state
CELLS_PER_CONDITION = 4
STATES = {"state_key": "condition", "start_state": "control", "goal_state": "KLF1", "alt_states": ["MAPK1"]}
P_COLUMNS = ("pval", "FDR")


# ----------------------------------------------------------------------------- oracle runs


def _prepare_inputs(folder: Path) -> dict:
    """Tokens (.npz) of real cells, their labels, a seeded random checkpoint; genes for the list runs."""
    import anndata as ad

    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.core.tokenizer import RankValueTokenizer
    from geneformer_triton.model.loading import random_geneformer

    vocabulary = load_vocabulary(DICTS)
    adata = ad.read_h5ad(NORMAN, backed="r")
    condition = adata.obs["condition"].astype(str).to_numpy()
    rows = np.concatenate([np.flatnonzero(condition == c)[:CELLS_PER_CONDITION] for c in CONDITIONS])
    ordered = np.sort(rows)  # backed AnnData reads rows in increasing order
    subset = adata[ordered].to_memory()
    back = np.searchsorted(ordered, rows)  # the cells in CONDITIONS order
    x = subset.X.toarray() if hasattr(subset.X, "toarray") else np.asarray(subset.X)
    totals = subset.obs["ncounts"].to_numpy(dtype=np.float64)[back]
    counts = np.rint(np.expm1(x[back]) * totals[:, None] / 1e4)  # X is log1p(counts / ncounts * 1e4)
    labels = list(subset.obs["condition"].astype(str).to_numpy()[back])
    tokenizer = RankValueTokenizer(vocabulary, 2048, special_tokens=False)
    cells = tokenizer.tokenize_matrix(counts, vocabulary.symbols_to_ensembl(list(subset.var_names)), n_counts=totals)
    assert labels == [c for c in CONDITIONS for _ in range(CELLS_PER_CONDITION)]
    np.savez(folder / "tokens.npz", *cells)
    random_geneformer("gf-6L-10M-i2048", seed=0, vocabulary=vocabulary).model.save_pretrained(folder / "model")
    control = cells[:CELLS_PER_CONDITION]
    shared = [int(t) for t in control[0] if all(t in set(c.tolist()) for c in control[1:])]
    assert len(shared) >= 3, "the control cells share too few genes for the list runs"
    genes = vocabulary.genes_for_tokens(np.array(shared[:3]))
    return {"labels": labels, "pair": genes[:2], "single": genes[2:3]}


def _plan(folder: Path, inputs: dict) -> dict:
    def run(name: str, cells: str | None, genes, emb_mode: str, states: bool = False) -> dict:
        argv = ["--genes", genes if genes == "all" else ",".join(genes), "--emb-mode", emb_mode, "--forward-batch-size", "32"]
        if cells:
            argv += ["--cells", cells]
        if states:
            argv += ["--states", json.dumps(STATES), "--labels", ",".join(inputs["labels"])]
        return {"name": name, "argv": argv}

    control, others = "0,1,2", "3,4,5"
    return {
        "model_dir": str(folder / "model"), "dict_dir": str(DICTS), "tokens": str(folder / "tokens.npz"),
        "root": str(folder / "oracle"),
        "runs": [
            run("all", control, "all", "cell_and_gene"),           # aggregate_gene_shifts (run_oracle)
            run("null", others, "all", "cell"),                     # the null distribution for vs_null
            run("states", None, "all", "cell_and_gene", True),      # goal_state_shift (run_oracle, cell pickles only)
            run("pair", control + "," + others, inputs["pair"], "cell_and_gene"),
            run("single", control + "," + others, inputs["single"], "cell"),  # aggregate_data (run_oracle)
            run("single_states", None, inputs["single"], "cell", True),
        ],
        "stats": [
            {"name": "vs_null", "mode": "vs_null", "input": "all", "null": "null"},
            {"name": "mixture_model", "mode": "mixture_model", "input": "all"},
            {"name": "goal_single", "mode": "goal_state_shift", "input": "single_states",
             "genes_perturbed": inputs["single"], "states": STATES, "cell_only": True},
            {"name": "goal_full_folder", "mode": "goal_state_shift", "input": "states", "states": STATES},
        ],
    }


@pytest.fixture(scope="session")
def oracle(tmp_path_factory) -> dict:
    """Upstream's raw pickles, CSVs and JSON for every run (see module docstring)."""
    folder = tmp_path_factory.mktemp("isp_stats_oracle")
    inputs = _prepare_inputs(folder)
    plan = _plan(folder, inputs)
    (folder / "plan.json").write_text(json.dumps(plan))
    env = oracle_env.oracle_environment()
    env["GFTRITON_SHARED_DIR"] = str(oracle_env.SHARED)
    started = time.perf_counter()
    done = subprocess.run([str(oracle_env.helical_python()), str(REPO_ROOT / "tests" / "upstream_stats_driver.py"),
                           str(folder / "plan.json")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    root = Path(plan["root"])
    print(f"upstream oracle runs: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {"root": root, **inputs}


@pytest.fixture(scope="session")
def dictionaries() -> GeneDictionaries:
    return GeneDictionaries.from_dir(DICTS)


def _shifts(oracle: dict, run: str) -> pd.DataFrame:
    return shifts_from_upstream_dir(oracle["root"] / run / "isp")


def _upstream_csv(oracle: dict, run: str, mode: str) -> Path:
    return oracle["root"] / run / "stats" / f"{mode}.csv"


# ----------------------------------------------------------------------------- comparison


def table_differences(ours: pd.DataFrame, upstream_csv: Path) -> list[str]:
    """What differs between our table and upstream's CSV (empty = the same): columns (names, order),
    the index (row order), numbers within 1e-6 (p-values and FDR within 1e-9 relative), text exactly."""
    upstream = pd.read_csv(upstream_csv, index_col=0, low_memory=False)
    mine = pd.read_csv(io.StringIO(ours.to_csv()), index_col=0, low_memory=False)  # the same CSV round trip as upstream's file
    if list(mine.columns) != list(upstream.columns):
        return [f"columns {list(mine.columns)} != upstream {list(upstream.columns)}"]
    if mine.shape != upstream.shape:
        return [f"shape {mine.shape} != upstream {upstream.shape}"]
    problems = []
    if list(mine.index) != list(upstream.index):
        problems.append("row order / index differs")
    for column in upstream.columns:
        a, b = mine[column], upstream[column]
        if a.dtype.kind in "fiu" and b.dtype.kind in "fiu":
            x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
            if any(k in column for k in P_COLUMNS):
                close = np.isclose(x, y, rtol=1e-9, atol=0, equal_nan=True)
            else:
                close = np.isclose(x, y, rtol=0, atol=1e-6, equal_nan=True)
            if not close.all():
                i = int(np.flatnonzero(~close)[0])
                problems.append(f"{column}: row {i} ours {x[i]!r} upstream {y[i]!r} ({int((~close).sum())} rows)")
        elif not (a.astype(str).to_numpy() == b.astype(str).to_numpy()).all():
            problems.append(f"{column}: text differs, e.g. ours {a.head(2).tolist()} upstream {b.head(2).tolist()}")
    return problems


def assert_same(ours: pd.DataFrame, upstream_csv: Path) -> None:
    assert upstream_csv.is_file(), f"upstream wrote no {upstream_csv}"
    problems = table_differences(ours, upstream_csv)
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- parity with upstream


def test_aggregate_gene_shifts_matches_upstream(oracle, dictionaries):
    ours = compute_stats(_shifts(oracle, "all"), dictionaries, StatsOptions("aggregate_gene_shifts"))
    assert (ours["Affected"] != "cell_emb").sum() > 100  # gene rows are there, not only cell rows
    assert_same(ours, _upstream_csv(oracle, "all", "aggregate_gene_shifts"))
    pair = compute_stats(_shifts(oracle, "pair"), dictionaries, StatsOptions("aggregate_gene_shifts", oracle["pair"]))
    assert_same(pair, _upstream_csv(oracle, "pair", "aggregate_gene_shifts"))


def test_goal_state_shift_matches_upstream_with_gene_pickles_in_the_folder(oracle, dictionaries):
    shifts = _shifts(oracle, "states")  # cell pickles per state AND gene pickles: upstream fails on this folder
    assert (shifts["affected"] != CELL_EMB).any()
    assert "AttributeError" in (oracle["root"] / "stats" / "goal_full_folder.error").read_text()
    ours = compute_stats(shifts, dictionaries, StatsOptions("goal_state_shift", cell_states=STATES))
    assert_same(ours, _upstream_csv(oracle, "states", "goal_state_shift"))  # upstream ran on the cell pickles only
    single = compute_stats(_shifts(oracle, "single_states"), dictionaries,
                           StatsOptions("goal_state_shift", oracle["single"], cell_states=STATES))
    assert_same(single, oracle["root"] / "stats" / "goal_single.csv")


def test_vs_null_matches_upstream(oracle, dictionaries):
    ours = compute_stats(_shifts(oracle, "all"), dictionaries, StatsOptions("vs_null"), _shifts(oracle, "null"))
    assert_same(ours, oracle["root"] / "stats" / "vs_null.csv")


def test_mixture_model_matches_upstream(oracle, dictionaries):
    ours = compute_stats(_shifts(oracle, "all"), dictionaries, StatsOptions("mixture_model"))
    assert set(ours["Impact_component"]) == {0, 1}
    assert_same(ours, oracle["root"] / "stats" / "mixture_model.csv")


def test_aggregate_data_matches_upstream_and_works_for_a_gene_group(oracle, dictionaries):
    ours = compute_stats(_shifts(oracle, "single"), dictionaries, StatsOptions("aggregate_data", oracle["single"]))
    assert_same(ours, _upstream_csv(oracle, "single", "aggregate_data"))
    # upstream fails for a group of genes; ours returns upstream's own per-cell values of the group
    report = json.loads((oracle["root"] / "pair.json").read_text())
    assert "error" in report["stats"]["aggregate_data"]
    group = compute_stats(_shifts(oracle, "pair"), dictionaries, StatsOptions("aggregate_data", oracle["pair"][::-1]))
    expected = [row["cos"] for row in report["cell_shifts"]]
    assert len(expected) >= 2
    np.testing.assert_allclose(group["Cosine_sim"].to_numpy(), expected, rtol=0, atol=1e-12)
    symbols = tuple(dictionaries.symbol(dictionaries.id_to_token[g]) for g in oracle["pair"])
    assert set(group["Gene"]) == {symbols}


def test_oracle_json_reader_gives_the_same_stats(oracle, dictionaries):
    from_json = shifts_from_oracle_json(oracle["root"] / "all.json")
    assert len(from_json) == len(_shifts(oracle, "all"))
    ours = compute_stats(from_json, dictionaries, StatsOptions("mixture_model"))
    assert_same(ours, oracle["root"] / "stats" / "mixture_model.csv")


def _isp_result_rows(oracle: dict, run: str, dictionaries: GeneDictionaries) -> pd.DataFrame:
    """Rows in our ISP output's format (ISP_RESULT_COLUMNS) carrying upstream's cell values of ``run``."""
    names = ISP_RESULT_COLUMNS
    cells = json.loads((oracle["root"] / f"{run}.json").read_text())["cell_shifts"]
    return pd.DataFrame({
        names["cell"]: [str(r["cell"]) for r in cells],
        names["perturbed_ids"]: ["+".join(dictionaries.ensembl(t) for t in r["perturbed"]) for r in cells],
        names["stateless"]: [r["cos"] for r in cells],
    })


def test_our_isp_results_adapter(oracle, dictionaries, tmp_path):
    """Our ISP output's rows carrying upstream's values give upstream's stats (function and CLI --input)."""
    from geneformer_triton.cli import main
    from geneformer_triton.core.isp_schema import STATE_PREFIX, UPSTREAM_SCORE

    assert (ISP_RESULT_COLUMNS["stateless"], ISP_RESULT_COLUMNS["state_prefix"]) == (UPSTREAM_SCORE, STATE_PREFIX), \
        "client/isp.py writes other columns: repoint ISP_RESULT_COLUMNS"
    shifts = shifts_from_isp_results(_isp_result_rows(oracle, "all", dictionaries), dictionaries)
    null = shifts_from_isp_results(_isp_result_rows(oracle, "null", dictionaries), dictionaries)
    assert_same(compute_stats(shifts, dictionaries, StatsOptions("vs_null"), null), oracle["root"] / "stats" / "vs_null.csv")
    results = tmp_path / "results.parquet"
    results.mkdir()
    _isp_result_rows(oracle, "all", dictionaries).to_parquet(results / "part-0.parquet")
    output = tmp_path / "mixture.csv"
    assert main(["isp-stats", "--mode", "mixture_model", "--input", str(results), "--dictionaries", str(DICTS),
                 "--output", str(output)]) == 0
    assert_same(pd.read_csv(output, index_col=0), oracle["root"] / "stats" / "mixture_model.csv")


def test_cli_writes_upstreams_table_and_a_plot(oracle, tmp_path):
    from geneformer_triton.cli import main

    output = tmp_path / "goal.csv"
    code = main(["isp-stats", "--mode", "goal_state_shift", "--upstream-dir", str(oracle["root"] / "states" / "isp"),
                 "--states", json.dumps(STATES), "--dictionaries", str(DICTS), "--output", str(output), "--top", "5"])
    assert code == 0
    assert_same(pd.read_csv(output, index_col=0), _upstream_csv(oracle, "states", "goal_state_shift"))
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    null_csv = tmp_path / "null.csv"
    assert main(["isp-stats", "--mode", "vs_null", "--upstream-dir", str(oracle["root"] / "all" / "isp"), "--null-input",
                 str(oracle["root"] / "null" / "isp"), "--dictionaries", str(DICTS), "--output", str(null_csv)]) == 0
    assert_same(pd.read_csv(null_csv, index_col=0), oracle["root"] / "stats" / "vs_null.csv")


def test_cli_rejects_bad_requests(oracle, tmp_path, caplog):
    from geneformer_triton.cli import main

    base = ["isp-stats", "--upstream-dir", str(oracle["root"] / "all" / "isp"), "--dictionaries", str(DICTS),
            "--output", str(tmp_path / "x.csv")]
    cases = [
        (["--mode", "vs_null"], "--null-input is required"),
        (["--mode", "aggregate_data"], "give genes_perturbed"),
        (["--mode", "goal_state_shift"], "needs cell_states"),
        (["--mode", "goal_state_shift", "--states", "{not json"], "not valid JSON"),
        (["--mode", "goal_state_shift", "--states", json.dumps(STATES)], "needs per-state cell shifts"),
    ]
    for extra, message in cases:
        caplog.clear()
        assert main(base + extra) == 2, extra
        assert message in caplog.text, (extra, caplog.text)
    assert not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------- negative controls


def test_a_changed_value_or_swapped_state_is_caught(oracle, dictionaries):
    shifts = _shifts(oracle, "all")
    changed = shifts.copy()
    changed.loc[int(np.flatnonzero(changed["affected"] != CELL_EMB)[7]), "cos"] += 1e-3
    problems = table_differences(compute_stats(changed, dictionaries, StatsOptions("aggregate_gene_shifts")),
                                 _upstream_csv(oracle, "all", "aggregate_gene_shifts"))
    assert any(p.startswith("Cosine_sim_mean") for p in problems), problems

    states = _shifts(oracle, "states")
    swapped = states.copy()
    goal, alt = swapped["state"] == "KLF1", swapped["state"] == "MAPK1"
    swapped.loc[goal, "state"], swapped.loc[alt, "state"] = "MAPK1", "KLF1"
    problems = table_differences(compute_stats(swapped, dictionaries, StatsOptions("goal_state_shift", cell_states=STATES)),
                                 _upstream_csv(oracle, "states", "goal_state_shift"))
    assert any(p.startswith("Shift_to_goal_end") for p in problems), problems

    null = _shifts(oracle, "null")
    null.loc[0, "cos"] = 0.0  # one null value moved to the bottom changes that gene's ranks
    problems = table_differences(compute_stats(_shifts(oracle, "all"), dictionaries, StatsOptions("vs_null"), null),
                                 oracle["root"] / "stats" / "vs_null.csv")
    assert any("Null_avg_shift" in p for p in problems), problems


def test_comparison_rejects_reordered_columns_and_rows(oracle, dictionaries):
    ours = compute_stats(_shifts(oracle, "all"), dictionaries, StatsOptions("vs_null"), _shifts(oracle, "null"))
    csv = oracle["root"] / "stats" / "vs_null.csv"
    assert table_differences(ours[list(ours.columns[::-1])], csv)
    assert "row order / index differs" in table_differences(ours.iloc[::-1], csv)


# ----------------------------------------------------------------------------- statistics against references


def test_benjamini_hochberg_matches_statsmodels_and_scipy():
    from scipy.stats import false_discovery_control
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    for p in (rng.uniform(size=500), rng.uniform(size=200) ** 4, np.repeat(rng.uniform(size=20), 5), np.array([0.2])):
        ours = benjamini_hochberg(p)
        np.testing.assert_allclose(ours, multipletests(p, alpha=0.05, method="fdr_bh")[1], rtol=1e-12, atol=0)
        np.testing.assert_allclose(ours, false_discovery_control(p, method="bh"), rtol=1e-12, atol=0)
    p = np.array([0.01, np.nan, 0.04, 0.03])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.03, np.nan, 0.04, 0.04], rtol=1e-12)


def test_rank_sums_match_scipy():
    from scipy.stats import ranksums

    rng = np.random.default_rng(1)
    values = np.round(rng.normal(size=3000), 2)  # rounding makes ties
    groups = rng.integers(0, 40, size=values.size)
    reference = np.round(rng.normal(0.1, 1, size=700), 2)
    ours = rank_sum_vs_reference(reference, values, groups, 41)
    expected = [ranksums(reference, values[groups == g]).pvalue for g in range(40)]
    np.testing.assert_allclose(ours[:40], expected, rtol=1e-9, atol=0)
    assert np.isnan(ours[40])  # a group without values
    first = rng.uniform(size=values.size) < 0.4
    ours = rank_sum_two_samples(values, groups, first, 40)
    expected = [ranksums(values[first & (groups == g)], values[~first & (groups == g)]).pvalue for g in range(40)]
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=0)


def test_pickles_that_are_more_than_data_are_refused(tmp_path):
    class Shell:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "x_raw.pickle").write_bytes(pickle.dumps({(1, "cell_emb"): [Shell()]}))
    with pytest.raises(IspStatsError, match="refusing to load"):
        shifts_from_upstream_dir(tmp_path)


def test_results_reader_takes_only_committed_parts(tmp_path, caplog):
    """A killed `gftriton isp` run leaves a part without its _commits/ marker: isp-stats must not count it
    (resume redoes those cells); an output written before markers existed is read whole."""
    from geneformer_triton.core.isp_schema import COMMIT_FOLDER
    from geneformer_triton.core.isp_stats_readers import read_isp_results

    out = tmp_path / "isp.parquet"
    out.mkdir()
    for batch, cell in (("00000", "a"), ("00001", "b")):
        pd.DataFrame({"cell_id": [cell], "gene_id": ["ENSG1"], "cell_emb_shift": [0.5]}).to_parquet(out / f"part-{batch}.parquet")
    assert sorted(read_isp_results(out)["cell_id"]) == ["a", "b"]  # no markers: an output from before them
    (out / COMMIT_FOLDER).mkdir()
    (out / COMMIT_FOLDER / "00000").touch()
    assert list(read_isp_results(out)["cell_id"]) == ["a"]
    assert "ignoring 1 uncommitted part" in caplog.text
    (out / COMMIT_FOLDER / "00001").touch()
    assert sorted(read_isp_results(out)["cell_id"]) == ["a", "b"]
