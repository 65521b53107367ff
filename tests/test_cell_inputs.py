"""The one input layer (geneformer_triton.core.cell_inputs) on real files: the shared perturbench h5ad
(log1p-normalized, symbols, obs ncounts) and small .h5ad / CSV / TSV files written from it with
symbols or Ensembl ids, a .raw, a layer, obs n_counts present or absent.

Expected values come from the files and the shared V1 dictionary read here with json/numpy, not from
the code under test."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SHARED

from geneformer_triton.core.cell_inputs import (
    InputError,
    InputOptions,
    SymbolMap,
    cells_from_anndata,
    ensembl_id,
    find_symbol_map,
    read_cells,
)

NORMAN = SHARED / "data" / "perturbench_norman19_k562.h5ad"
V1 = SHARED / "geneformer" / "v1"
N_CELLS = 24


@pytest.fixture(scope="module")
def name_to_id() -> dict[str, str]:
    return json.loads((V1 / "gene_name_id_dict.json").read_text())


@pytest.fixture(scope="module")
def symbols(name_to_id) -> SymbolMap:
    return SymbolMap(name_to_id, "V1 gene_name_id_dict.json")


@pytest.fixture(scope="module")
def norman() -> ad.AnnData:
    return ad.read_h5ad(NORMAN)


@pytest.fixture(scope="module")
def raw_counts(norman) -> ad.AnnData:
    """The first cells of the perturbench file as integer counts: the cell's expm1(X) over its
    smallest expm1(X) (checked below to be integers), symbols as var names, no obs totals."""
    x = sp.csr_matrix(norman.X[:N_CELLS], dtype=np.float64)
    x.data = np.expm1(x.data)
    scale = np.array([x[r].data.min() for r in range(N_CELLS)])
    counts = sp.csr_matrix(sp.diags(1 / scale) @ x)
    assert np.abs(counts.data - np.round(counts.data)).max() < 1e-3
    counts.data = np.round(counts.data)
    return ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=norman.obs_names[:N_CELLS].astype(str)),
                      var=pd.DataFrame(index=norman.var_names.astype(str)))


def _expected_ids(var_names, name_to_id) -> list[str]:
    ids, seen = [], set()
    for name in var_names:
        gene = name_to_id.get(str(name), "")
        ids.append("" if gene in seen else gene)
        seen.add(gene)
    return ids


def test_perturbench_log1p_recovered_with_obs_ncounts(norman, symbols):
    cells = read_cells(NORMAN, InputOptions(), symbols)
    assert cells.n_cells == norman.n_obs == 3375
    assert np.all(cells.counts.data == np.round(cells.counts.data)) and cells.counts.data.min() >= 1
    # expm1(X) is one scale per cell times the recovered counts (an independent property of the file)
    x = sp.csr_matrix(norman.X, dtype=np.float64)
    x.sort_indices()
    ratio = np.expm1(x.data) / cells.counts.data
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    per_cell = np.bincount(rows, ratio) / np.bincount(rows)
    np.testing.assert_allclose(ratio, per_cell[rows], rtol=1e-4)
    # default n_counts_key is absent: the documented alias obs["ncounts"]
    np.testing.assert_array_equal(cells.n_counts, norman.obs["ncounts"].to_numpy(np.float32))
    assert cells.notes["n_counts"] == "obs['ncounts']"
    # the symbols mapped with the dictionary; the display symbol kept for ISP output
    assert cells.symbols[symbols.mapping["KAZN"]] == "KAZN"


def test_log_normalized_without_log1p_mark_is_refused(norman, symbols):
    unmarked = norman[:N_CELLS].copy()
    del unmarked.uns["log1p"]
    first = str(unmarked.obs_names[0])
    with pytest.raises(InputError, match=rf"non-integer values in {N_CELLS} cells, e.g. '{first}' \(row 0\).*"
                                         r"--layer.*--allow-non-integer"):
        cells_from_anndata(unmarked, InputOptions(), symbols, "unmarked")
    allowed = cells_from_anndata(unmarked, InputOptions(allow_non_integer=True), symbols, "unmarked")
    np.testing.assert_allclose(allowed.counts.toarray(), sp.csr_matrix(unmarked.X).toarray(), rtol=1e-6)
    # negative control of the recovery: log1p mark present but values are not log1p(count * scale)
    noisy = norman[:N_CELLS].copy()
    noisy.X = sp.csr_matrix(noisy.X)
    noisy.X.data = noisy.X.data * 1.37 + 0.011
    with pytest.raises(InputError, match="cannot be recovered"):
        cells_from_anndata(noisy, InputOptions(), symbols, "noisy")


def test_symbols_ensembl_ids_and_gene_column_read_alike(raw_counts, symbols, name_to_id, tmp_path):
    expected = _expected_ids(raw_counts.var_names, name_to_id)
    by_symbol = cells_from_anndata(raw_counts, InputOptions(), symbols)
    assert by_symbol.gene_ids == expected
    # Ensembl ids as var names (with version suffixes, some lower case): no dictionary needed
    ensembl = raw_counts.copy()
    names = [f"{g}.{i % 7}" if g else f"unmapped{i}" for i, g in enumerate(_expected_ids(raw_counts.var_names, name_to_id))]
    names = [n.lower() if i % 5 == 0 else n for i, n in enumerate(names)]
    ensembl.var_names = names
    by_id = cells_from_anndata(ensembl, InputOptions(), None)
    assert by_id.gene_ids == expected
    # a var column of Ensembl ids beside symbol var names (the default column name, then a named one)
    with_column = raw_counts.copy()
    with_column.var["ensembl_id"] = expected
    with_column.var["gene_ids"] = expected
    assert cells_from_anndata(with_column, InputOptions(), None).gene_ids == expected
    assert cells_from_anndata(with_column, InputOptions(gene_column="gene_ids"), None).gene_ids == expected
    with pytest.raises(InputError, match="no column 'nope'"):
        cells_from_anndata(with_column, InputOptions(gene_column="nope"), None)
    # symbols and nothing to map them: refused, saying where the dictionary comes from
    with pytest.raises(InputError, match=r"symbols .*--repository DIR.*--dictionaries DIR"):
        cells_from_anndata(raw_counts, InputOptions(), None)
    for cells in (by_symbol, by_id):
        assert (cells.counts != sp.csr_matrix(raw_counts.X)).nnz == 0


def test_mixed_identifiers_judged_one_by_one(raw_counts, symbols, name_to_id):
    expected = _expected_ids(raw_counts.var_names, name_to_id)
    mixed = raw_counts.copy()
    mixed.var_names = [g if (i % 2 and g) else s for i, (s, g) in enumerate(zip(raw_counts.var_names, expected))]
    assert cells_from_anndata(mixed, InputOptions(), symbols).gene_ids == expected
    # without a dictionary only the Ensembl ids are used (the symbols are ignored, not guessed)
    partial = cells_from_anndata(mixed, InputOptions(), None).gene_ids
    assert [g for g in partial if g] == [g for i, g in enumerate(expected) if i % 2 and g]


def test_duplicated_ensembl_id_kept_by_first_column(raw_counts, symbols):
    twice = raw_counts[:, :4].copy()
    gene = symbols.mapping[str(twice.var_names[0])]
    twice.var["ensembl_id"] = [gene, "ENSG00000105610", gene, ""]
    assert cells_from_anndata(twice, InputOptions(), None).gene_ids == [gene, "ENSG00000105610", "", ""]


def test_raw_and_layer(raw_counts, symbols):
    scaled = raw_counts.copy()
    scaled.raw = raw_counts.copy()
    dense = raw_counts.X.toarray()
    scaled.X = (dense - dense.mean(axis=0)) / (dense.std(axis=0) + 1)  # z-scores, like scanpy's scale()
    with pytest.raises(InputError, match="negative values"):
        cells_from_anndata(scaled, InputOptions(), symbols)
    from_raw = cells_from_anndata(scaled, InputOptions(layer="raw"), symbols)
    assert (from_raw.counts != sp.csr_matrix(raw_counts.X)).nnz == 0
    assert from_raw.to_anndata().var_names.equals(raw_counts.var_names)

    layered = raw_counts.copy()
    layered.layers["counts"] = raw_counts.X.copy()
    layered.X = sp.csr_matrix(np.log1p(dense))
    with pytest.raises(InputError, match="non-integer"):
        cells_from_anndata(layered, InputOptions(), symbols)
    from_layer = cells_from_anndata(layered, InputOptions(layer="counts"), symbols)
    assert (from_layer.counts != sp.csr_matrix(raw_counts.X)).nnz == 0
    with pytest.raises(InputError, match=r"no layer 'spliced'.*'counts'"):
        cells_from_anndata(layered, InputOptions(layer="spliced"), symbols)
    with pytest.raises(InputError, match="no .raw"):
        cells_from_anndata(layered, InputOptions(layer="raw"), symbols)


def test_n_counts_present_absent_and_named(raw_counts, symbols):
    sums = np.asarray(raw_counts.X.sum(axis=1)).ravel()
    absent = cells_from_anndata(raw_counts, InputOptions(), symbols)
    np.testing.assert_array_equal(absent.n_counts, sums.astype(np.float32))
    assert "sum of each cell's counts" in absent.notes["n_counts"]
    given = raw_counts.copy()
    given.obs["n_counts"] = sums * 3 + 1
    given.obs["umis"] = sums * 5
    np.testing.assert_array_equal(cells_from_anndata(given, InputOptions(), symbols).n_counts, (sums * 3 + 1).astype(np.float32))
    np.testing.assert_array_equal(cells_from_anndata(given, InputOptions(n_counts_key="umis"), symbols).n_counts,
                                  (sums * 5).astype(np.float32))
    with pytest.raises(InputError, match=r"no column 'total_umis' \(--n-counts-key\)"):
        cells_from_anndata(given, InputOptions(n_counts_key="total_umis"), symbols)
    broken = given.copy()
    broken.obs.loc[broken.obs_names[2], "n_counts"] = np.nan
    with pytest.raises(InputError, match=r"obs\['n_counts'\].*\(row 2\)"):
        cells_from_anndata(broken, InputOptions(), symbols)


def test_csv_tsv_and_h5ad_files_read_alike(raw_counts, symbols, name_to_id, tmp_path):
    frame = pd.DataFrame(raw_counts.X.toarray(), index=raw_counts.obs_names, columns=raw_counts.var_names)
    frame.to_csv(tmp_path / "cells.csv")
    ids = frame.copy()
    ids.columns = [g or f"x{i}" for i, g in enumerate(_expected_ids(raw_counts.var_names, name_to_id))]
    ids.to_csv(tmp_path / "cells.tsv.gz", sep="\t")
    raw_counts.write_h5ad(tmp_path / "cells.h5ad")
    read = [read_cells(tmp_path / "cells.csv", InputOptions(), symbols),
            read_cells(tmp_path / "cells.tsv.gz", InputOptions(), None),
            read_cells(tmp_path / "cells.h5ad", InputOptions(), symbols)]
    for cells in read:
        assert cells.gene_ids == read[0].gene_ids and cells.cell_ids == list(raw_counts.obs_names)
        assert (cells.counts != sp.csr_matrix(raw_counts.X)).nnz == 0
    assert read_cells(tmp_path / "cells.csv", InputOptions(max_cells=5), symbols).n_cells == 5
    with pytest.raises(InputError, match="--layer applies to .h5ad input only"):
        read_cells(tmp_path / "cells.csv", InputOptions(layer="counts"), symbols)
    (tmp_path / "cells.xlsx").write_text("x")
    with pytest.raises(InputError, match="unsupported input format"):
        read_cells(tmp_path / "cells.xlsx")


def test_symbol_map_from_the_repository_tokenizer(tmp_path, name_to_id):
    assert find_symbol_map(repository=tmp_path) is None
    folder = tmp_path / "geneformer_tokenizer" / "1"
    folder.mkdir(parents=True)
    (folder / "gene_name_id_dict.json").write_text(json.dumps({"KLF1": "ENSG00000105610"}))
    found = find_symbol_map(repository=tmp_path)
    assert found.mapping == {"KLF1": "ENSG00000105610"} and str(folder) in found.source
    assert find_symbol_map(dictionaries=V1, repository=tmp_path).mapping == name_to_id  # --dictionaries first


def test_ensembl_id_rule():
    assert ensembl_id("ENSG00000105610.4") == "ENSG00000105610"
    assert ensembl_id("ensmusg00000017167") == "ENSMUSG00000017167"
    for other in ("ENST00000252455", "ENSEMBL", "KLF1", "", None, float("nan"), "ENSG"):
        assert ensembl_id(other) == ""


def test_embed_isp_and_evaluate_refuse_and_accept_alike(norman, tmp_path, caplog):
    """The three commands read one log-normalized file the same way: refused naming the first cell
    without uns['log1p'] (before any server is asked: --url points nowhere), read with the flag."""
    from geneformer_triton.cli import main

    unmarked = norman[:N_CELLS].copy()
    del unmarked.uns["log1p"]
    unmarked.obs["cell_type"] = ["a", "b"] * (N_CELLS // 2)
    path = tmp_path / "lognorm.h5ad"
    unmarked.write_h5ad(path)
    first = str(unmarked.obs_names[0])
    commands = {
        "embed": ["embed", str(path), "-o", str(tmp_path / "e.npy"), "--url", "127.0.0.1:9", "--dictionaries", str(V1),
                  "--retries", "0"],
        "isp": ["isp", "--h5ad", str(path), "--output", str(tmp_path / "i.parquet"), "--url", "127.0.0.1:9",
                "--dictionaries", str(V1), "--retries", "1", "--wait", "0"],
        "evaluate": ["evaluate", str(path), "--label-key", "cell_type", "--url", "127.0.0.1:9", "--random-weights",
                     "--dictionaries", str(V1), "--timeout", "0", "--max-cells", "0"],
    }
    for name, argv in commands.items():
        caplog.clear()
        assert main(argv) == 2, name
        assert f"non-integer values in {N_CELLS} cells, e.g. '{first}' (row 0)" in caplog.text, name
        caplog.clear()
        code = main([*argv, "--allow-non-integer"])
        assert "non-integer values" in caplog.text and "--allow-non-integer)" in caplog.text, name  # the warning
        assert code != 0, name  # read, then stopped by the absent server
