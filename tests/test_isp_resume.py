"""A ``gftriton isp`` run killed in the middle of writing a batch resumes without duplicating any row.

The client process (real server, real CLI) dies with ``os._exit`` right after one batch's gene-cosine part,
or its rows part, is on disk and before the batch is committed: the worst moments for a resume. The
resumed output must equal an uninterrupted run's: same rows, same gene cosines, each exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from geneformer_triton.client.isp_store import ResultStore

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
N_CELLS = 5
CRASH_BATCH = 3  # the client dies while writing its 3rd batch (one cell per batch)
EXIT_CODE = 86

# run the isp CLI, killing the process after the CRASH_BATCH-th part written into folder argv[1]
CRASHING_CLI = """
import os, sys
import geneformer_triton.client.isp_store as isp_store
folder, batch = sys.argv[1], int(sys.argv[2])
write, seen = isp_store.ResultStore._write_parquet, []
def crashing(self, frame, target, name):
    path = write(self, frame, target, name)
    if target.name == folder:
        seen.append(path)
        if len(seen) == batch:
            os._exit(%d)
    return path
isp_store.ResultStore._write_parquet = crashing
from geneformer_triton.client.isp_cli import main
sys.exit(main(sys.argv[3:]))
""" % EXIT_CODE


def _args(triton_server, output: Path) -> list[str]:
    return ["--url", triton_server.grpc_url, "--repository", str(triton_server.model_repository),
            "--h5ad", str(SHARED / "data" / "perturbench_norman19_k562.h5ad"),
            "--cells", "condition=control", "--max-cells", str(N_CELLS), "--allow-non-integer",
            "--perturbation", "overexpress", "--targets", "KLF1", "--emb-mode", "cell_and_gene",
            "--flush-every", "1", "--concurrency", "1", "--no-progress", "--min-cells", "1", "--output", str(output)]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _contents(output: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows and gene cosines of a finished output, sorted (read through the store, as a resume sees them)."""
    import json

    fingerprint = json.loads((output / "_run.json").read_text())
    with ResultStore(output, fingerprint) as store:
        rows = store.read().sort_values(["cell_id", "target_index"]).reset_index(drop=True)
        genes = store.read_genes().sort_values(["cell_id", "gene_id", "affected_gene_id"]).reset_index(drop=True)
    return rows, genes


@pytest.fixture(scope="module")
def uninterrupted(triton_server, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    output = tmp_path_factory.mktemp("resume") / "whole.parquet"
    done = _run([sys.executable, "-m", "geneformer_triton.client.isp_cli", *_args(triton_server, output)])
    assert done.returncode == 0, done.stderr[-3000:]
    rows, genes = _contents(output)
    assert rows["cell_id"].nunique() == N_CELLS and len(genes) > N_CELLS
    return rows, genes


@pytest.mark.parametrize("folder", ["_genes", "isp.parquet"], ids=["after_gene_part", "after_rows_part"])
def test_killed_mid_batch_resumes_to_the_uninterrupted_result(folder, triton_server, uninterrupted, tmp_path):
    output = tmp_path / "isp.parquet"
    killed = _run([sys.executable, "-c", CRASHING_CLI, folder, str(CRASH_BATCH), *_args(triton_server, output)])
    assert killed.returncode == EXIT_CODE, killed.stderr[-3000:]
    on_disk = sorted(p.name for p in (output / "_genes").glob("part-*.parquet"))
    assert len(on_disk) == CRASH_BATCH  # the killed batch's gene part is there, uncommitted
    resumed = _run([sys.executable, "-m", "geneformer_triton.client.isp_cli", *_args(triton_server, output)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{CRASH_BATCH - 1} already done" in resumed.stderr
    rows, genes = _contents(output)
    want_rows, want_genes = uninterrupted
    assert not genes.duplicated(["cell_id", "gene_id", "affected_gene_id"]).any()
    assert len(rows) == len(want_rows) and len(genes) == len(want_genes)
    pd.testing.assert_frame_equal(rows, want_rows)
    pd.testing.assert_frame_equal(genes, want_genes)


def test_uncommitted_parts_are_what_a_resume_must_drop(triton_server, uninterrupted, tmp_path):
    """Negative control: reading the killed output's part files directly (ignoring the commit markers)
    shows the duplicate a resume would have produced."""
    output = tmp_path / "isp.parquet"
    killed = _run([sys.executable, "-c", CRASHING_CLI, "_genes", str(CRASH_BATCH), *_args(triton_server, output)])
    assert killed.returncode == EXIT_CODE, killed.stderr[-3000:]
    stale = pd.concat([pd.read_parquet(p) for p in sorted((output / "_genes").glob("part-*.parquet"))])
    assert stale["cell_id"].nunique() == CRASH_BATCH  # one cell more than the committed CRASH_BATCH - 1
    _, committed_genes = _contents(output)
    assert committed_genes["cell_id"].nunique() == CRASH_BATCH - 1
    assert len(list((output / "_genes").glob("part-*.parquet"))) == CRASH_BATCH - 1  # reopening deleted it
