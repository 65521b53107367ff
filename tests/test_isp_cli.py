"""``gftriton isp`` reporting without a server (``--summary-only`` over a stored result folder)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from geneformer_triton.cli import build_parser
from geneformer_triton.client.isp import CellTable
from geneformer_triton.client.isp_run import cell_rows
from geneformer_triton.client.isp_spec import IspSpec
from geneformer_triton.client.isp_store import ResultStore


def _store_two_cells(path) -> None:
    """Two cells whose perturbed genes do not overlap (each gene scored in one cell only)."""
    import scipy.sparse as sp

    spec = IspSpec()
    genes = np.array(["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"], dtype=object)
    cells = CellTable(sp.csr_matrix((2, 4), dtype=np.float32), genes, np.ones(2), ["c0", "c1"], {}, pd.DataFrame())
    frames = []
    for cell_id, perturbed in (("c0", genes[:2]), ("c1", genes[2:])):
        result = {"perturbed_genes": np.array([g.encode() for g in perturbed], dtype=object),
                  "cell_shift": np.array([0.9, 0.8], np.float32), "cell_emb_shift": np.array([0.95, 0.85], np.float32)}
        frames.append(cell_rows(cell_id, spec, result, cells))
    with ResultStore(path, spec.fingerprint(), columns=spec.columns()) as store:
        store.append(pd.concat(frames, ignore_index=True), pd.DataFrame(columns=["cell_id", "error"]))


def _summary_only(path, min_cells: int) -> int:
    args = build_parser().parse_args(["isp", "--summary-only", "--output", str(path), "--min-cells", str(min_cells)])
    return args.func(args)


def test_summary_when_no_gene_reaches_min_cells(tmp_path, capsys):
    """No gene in >= 2 cells: exit 0, an empty summary with its header, a message saying what to change."""
    out = tmp_path / "res.parquet"
    _store_two_cells(out)
    assert _summary_only(out, 2) == 0
    printed = capsys.readouterr().out
    assert "no perturbed gene was scored in >= 2 cells" in printed and "--min-cells" in printed
    summary = pd.read_csv(tmp_path / "res_summary.csv")
    assert summary.empty and {"gene_id", "gene_symbol", "n_cells"} <= set(summary.columns)
    assert not (tmp_path / "res_top_shifts.png").exists()


def test_summary_with_min_cells_one_lists_every_gene(tmp_path, capsys):
    """Control: the same results with --min-cells 1 rank all four genes and draw the plot."""
    out = tmp_path / "res.parquet"
    _store_two_cells(out)
    assert _summary_only(out, 1) == 0
    assert len(pd.read_csv(tmp_path / "res_summary.csv")) == 4
    assert (tmp_path / "res_top_shifts.png").is_file()
    assert "no perturbed gene" not in capsys.readouterr().out
