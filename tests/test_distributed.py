"""Dask scale-out: a LocalCluster of 2 worker processes, each starting its own real tritonserver (worker
plugin), runs an ISP screen and an embed job while one worker is SIGKILLed mid-run. The outputs must equal
a plain single-server run of the same CLI code (same rows, same scores), with every cell exactly once,
and the killed worker's tritonserver must be stopped (watchdog). Plus the shard store's resume and
duplicate guarantees, option errors, and the CLI with ``--servers``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geneformer_triton.client.dask_engine import (
    ClusterError,
    ClusterOptions,
    ServerTarget,
    open_cluster,
    parse_server_url,
    worker_server_info,
)
from geneformer_triton.client.shards import ShardPlanMismatchError, ShardStore, plan_shards

N_ISP_CELLS, N_ISP_GENES = 12, 10
N_EMBED_CELLS = 24
SHARD = 2
SERVER_MODELS = "geneformer_isp,geneformer_onnx,geneformer_onnx_isp,geneformer_tokenizer,geneformer_embed_onnx"


def _pid_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------- cells


@pytest.fixture(scope="module")
def cut_cells(tmp_path_factory, celltypist_cells, v1_vocabulary):
    """Real celltypist cells cut to their top N_ISP_GENES ranked genes (short cells: fast delete-all)."""
    import scipy.sparse as sp

    from geneformer_triton.core.tokenizer import RankValueTokenizer

    tokenizer = RankValueTokenizer(v1_vocabulary, 2048, False)
    adata = celltypist_cells[:N_EMBED_CELLS].copy()
    ids = list(adata.var["ensembl_id"])
    column_tokens = tokenizer.gene_tokens(ids)
    tokens = tokenizer.tokenize_matrix(adata.X, ids, adata.obs["n_counts"].to_numpy())
    x = adata.X.tocsr()
    keep = np.zeros(x.shape, dtype=bool)
    for row, cell in enumerate(tokens):
        keep[row] = np.isin(column_tokens, cell[:N_ISP_GENES]) & (np.array(ids) != "")
    adata.X = sp.csr_matrix(x.multiply(sp.csr_matrix(keep)), dtype=np.float32)
    folder = tmp_path_factory.mktemp("dask_cells")
    adata.write_h5ad(folder / "embed.h5ad")
    adata[:N_ISP_CELLS].copy().write_h5ad(folder / "isp.h5ad")
    return folder


# ----------------------------------------------------------------------------- cluster


class Cluster:
    """The module's LocalCluster (2 workers, each with its own tritonserver) and every server seen."""

    def __init__(self, repository: Path) -> None:
        self.options = ClusterOptions(cluster="local:2", repository=repository, shard_size=SHARD,
                                      models=tuple(SERVER_MODELS.split(",")))
        self._context = open_cluster(self.options)
        self.client = self._context.__enter__()
        self.seen: dict[int, dict] = {}
        self.closed = False

    def servers(self, timeout_s: float = 120) -> dict[str, dict]:
        """worker address -> its server's info, once every worker's server is up (a restarted worker's
        plugin may still be starting its server)."""
        self.client.wait_for_workers(2, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.client.run(worker_server_info)
            if len(info) == 2 and all(e["server_pid"] for e in info.values()):
                break
            assert time.monotonic() < deadline, f"workers without a running server: {info}"
            time.sleep(0.2)
        for entry in info.values():
            self.seen[entry["server_pid"]] = entry
        return info

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def cluster(exported_repository):
    started = Cluster(exported_repository)
    try:
        yield started
    finally:
        started.close()


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    from geneformer_triton.cli import build_parser

    return build_parser().parse_args([command, *argv])


def _kill_a_busy_worker(cluster: Cluster, marker_folder: Path, done_at_kill: list) -> dict:
    """After the first shard lands, SIGKILL a worker that is running a task; returns its server info."""
    deadline = time.monotonic() + 120
    while not list(marker_folder.glob("shard-*.done")):
        assert time.monotonic() < deadline, "no shard finished"
        time.sleep(0.02)
    servers = cluster.servers()
    while True:
        busy = [address for address, keys in cluster.client.processing().items() if keys and address in servers]
        if busy:
            break
        assert time.monotonic() < deadline, "no worker is running a task"
        time.sleep(0.01)
    victim = servers[busy[0]]
    done_at_kill.append(len(list(marker_folder.glob("shard-*.done"))))
    os.kill(victim["worker_pid"], signal.SIGKILL)
    return victim


def _run_with_a_kill(cluster: Cluster, run, args: argparse.Namespace, output: Path, total: int):
    result: dict = {}

    def target() -> None:
        try:
            result["rc"] = run(args, client=cluster.client)
        except BaseException as error:  # reported by the test
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    done_at_kill: list = []
    try:
        victim = _kill_a_busy_worker(cluster, ShardStore(output).folder, done_at_kill)
    finally:
        thread.join(240)
    assert not thread.is_alive(), "the distributed run did not finish"
    assert "error" not in result, result.get("error")
    assert result["rc"] == 0
    assert done_at_kill[0] < total, f"the worker was killed after every shard was done ({done_at_kill[0]}/{total})"
    return victim


def _assert_server_stopped(victim: dict) -> None:
    assert _pid_gone(victim["server_pid"], 30), f"the killed worker's tritonserver (pid {victim['server_pid']}) leaked"
    # the watchdog removes the server's shared memory and work folder once the server's group is gone
    def leftovers() -> list:
        shm = list(Path("/dev/shm").glob(victim["shm_prefix"] + "*"))
        return shm + ([victim["work_dir"]] if Path(victim["work_dir"]).exists() else [])

    deadline = time.monotonic() + 15
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers()


def _read_isp(folder: Path) -> pd.DataFrame:
    parts = sorted(folder.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def test_isp_screen_survives_a_killed_worker_and_equals_one_server(cluster, cut_cells, exported_repository, tmp_path):
    from geneformer_triton.client.dask_jobs import run_isp_on_cluster
    from geneformer_triton.client.isp_cli import main as isp_main

    h5ad = cut_cells / "isp.h5ad"
    servers = cluster.servers()
    assert len(servers) == 2 and len({s["server_pid"] for s in servers.values()}) == 2  # one server each
    single = tmp_path / "single.parquet"
    one_server = next(iter(servers.values()))["grpc"]
    assert isp_main(["--url", one_server, "--h5ad", str(h5ad), "--output", str(single), "--no-progress",
                     "--concurrency", "2"]) == 0

    output = tmp_path / "cluster.parquet"
    args = _parse("isp", ["--cluster", "local:2", "--repository", str(exported_repository), "--h5ad", str(h5ad),
                          "--output", str(output), "--shard-size", str(SHARD), "--concurrency", "1",
                          "--no-progress", "--server-models", SERVER_MODELS])
    victim = _run_with_a_kill(cluster, run_isp_on_cluster, args, output, N_ISP_CELLS // SHARD)
    _assert_server_stopped(victim)
    assert not ShardStore(output).folder.exists()  # assembled and cleaned up

    rows, expected = _read_isp(output), _read_isp(single)
    assert rows["cell_id"].nunique() == N_ISP_CELLS
    assert not rows.duplicated(["cell_id", "target_index"]).any()
    per_cell = rows.groupby("cell_id").agg(n=("target_index", "size"), expected=("n_perturbations", "first"))
    assert (per_cell["n"] == per_cell["expected"]).all() and (per_cell["n"] == N_ISP_GENES).all()
    # the output is in cell order, as the input
    import anndata

    assert list(dict.fromkeys(rows["cell_id"])) == list(anndata.read_h5ad(h5ad).obs_names)
    key = ["cell_id", "target_index"]
    rows, expected = (f.sort_values(key).reset_index(drop=True) for f in (rows, expected))
    pd.testing.assert_frame_equal(rows.drop(columns="cell_shift"), expected.drop(columns="cell_shift"))
    np.testing.assert_allclose(rows["cell_shift"], expected["cell_shift"], rtol=0, atol=1e-6)

    # a rerun finds everything done: no task, the output unchanged
    assert run_isp_on_cluster(args, client=cluster.client) == 0
    assert len(_read_isp(output)) == len(rows)


def test_embed_survives_a_killed_worker_and_equals_one_server(cluster, cut_cells, exported_repository, tmp_path):
    from geneformer_triton.cli import main as gftriton_main
    from geneformer_triton.client.dask_jobs import run_embed_on_cluster

    h5ad = cut_cells / "embed.h5ad"
    one_server = next(iter(cluster.servers().values()))["grpc"]
    single = tmp_path / "single.npy"
    assert gftriton_main(["embed", str(h5ad), "-o", str(single), "--url", one_server, "--no-progress"]) == 0

    output = tmp_path / "cluster.npy"
    args = _parse("embed", [str(h5ad), "-o", str(output), "--cluster", "local:2", "--repository",
                            str(exported_repository), "--shard-size", str(SHARD), "--no-progress"])
    victim = _run_with_a_kill(cluster, run_embed_on_cluster, args, output, N_EMBED_CELLS // SHARD)
    _assert_server_stopped(victim)
    embeddings, expected = np.load(output), np.load(single)
    assert embeddings.shape == expected.shape == (N_EMBED_CELLS, expected.shape[1])
    assert np.isfinite(embeddings).all()
    # batches differ (2-cell shards vs 32-cell requests): padding changes the float sums slightly
    np.testing.assert_allclose(embeddings, expected, rtol=1e-4, atol=1e-5)
    assert not ShardStore(output).folder.exists()


def test_cli_with_given_servers(cluster, cut_cells, tmp_path):
    """``gftriton isp --cluster local:1 --servers URL,URL`` (the CLI's own entry point): one worker, no
    server of its own, a live and a closed server URL: the shards starting at the closed one must fail
    over to the live one, or they fail and the command returns non-zero."""
    from geneformer_triton.client.isp_cli import main as isp_main

    server = next(iter(cluster.servers().values()))
    output = tmp_path / "given.parquet"
    rc = isp_main(["--cluster", "local:1", "--servers", f"http://127.0.0.1:9,http://{server['http']}",
                   "--h5ad", str(cut_cells / "isp.h5ad"), "--n-cells", "4", "--output", str(output),
                   "--shard-size", "1", "--retries", "1", "--wait", "3", "--no-progress", "--top", "3"])
    assert rc == 0
    rows = _read_isp(output)
    assert rows["cell_id"].nunique() == 4 and len(rows) == 4 * N_ISP_GENES


def test_closing_the_cluster_stops_every_server(cluster):
    cluster.servers()
    seen = dict(cluster.seen)
    assert len(seen) >= 3  # the two first servers and the restarted workers' ones
    cluster.close()
    for entry in seen.values():
        _assert_server_stopped(entry)


# ----------------------------------------------------------------------------- no cluster needed


def test_shards_cover_the_cells_once():
    shards = plan_shards(7, 3)
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 7)]
    assert np.array_equal(np.concatenate([s.rows for s in shards]), np.arange(7))
    assert plan_shards(0, 3) == []
    with pytest.raises(ValueError, match="shard size"):
        plan_shards(7, 0)


def test_shard_store_resume_duplicates_and_plan_mismatch(tmp_path):
    output = tmp_path / "out.parquet"
    plan = {"job": "isp", "n_cells": 4, "shard_size": 2}
    shards = plan_shards(4, 2)
    store = ShardStore(output)
    assert store.open(plan) == 0
    frame = pd.DataFrame({"cell_id": ["a", "b"], "x": [1.0, 2.0]})
    assert store.write(shards[0], {"rows": frame, "emb": np.ones((2, 3), np.float32)})
    assert not store.write(shards[0], {"rows": frame.iloc[:1]})  # a duplicate result is dropped
    pieces = store.read(shards[0])
    pd.testing.assert_frame_equal(pieces["rows"], frame)
    assert pieces["emb"].shape == (2, 3)
    (store.folder / ".shard-00001.rows.parquet.123.tmp").write_bytes(b"torn")  # a killed write
    store.close()
    with ShardStore(output) as again:
        assert again.open(plan) == 1 and again.is_done(shards[0]) and not again.is_done(shards[1])
        assert not list(again.folder.glob(".*.tmp"))
    with pytest.raises(ShardPlanMismatchError, match="shard_size"):
        ShardStore(output).open({**plan, "shard_size": 3})
    with ShardStore(output) as restarted:
        assert restarted.open({**plan, "shard_size": 3}, restart=True) == 0


def test_options_are_checked(tmp_path):
    assert parse_server_url("http://gftriton:8000") == ServerTarget("gftriton:8000", "http")
    assert parse_server_url("127.0.0.1:8001") == ServerTarget("127.0.0.1:8001", "grpc")
    for bad in ("ftp://host:1", "http://host", "host:port", "http://host:70000"):
        with pytest.raises(ClusterError):
            parse_server_url(bad)
    with pytest.raises(ClusterError, match="--repository"):
        ClusterOptions(cluster="local:2")
    with pytest.raises(ClusterError, match="no such folder"):
        ClusterOptions(cluster="local:2", repository=tmp_path / "missing")
    with pytest.raises(ClusterError, match="local:N"):
        ClusterOptions(cluster="local:zero", repository=tmp_path)
    with pytest.raises(ClusterError, match="--cluster"):
        ClusterOptions()


def test_watchdog_stops_the_group_only_when_the_parent_dies(tmp_path):
    """geneformer_triton.client.triton_watchdog on stand-in processes: killing the 'worker' does not stop a 'server' group
    in its own session (sleep; the leak the watchdog exists for); with the watchdog it is stopped."""
    import subprocess
    import sys

    def spawn_pair() -> tuple[subprocess.Popen, subprocess.Popen]:
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        server = subprocess.Popen(["sleep", "120"], start_new_session=True)
        return worker, server

    # control: without a watchdog the group survives the worker's SIGKILL
    worker, server = spawn_pair()
    worker.kill()
    worker.wait()
    time.sleep(1.0)
    assert server.poll() is None
    server.kill()
    server.wait()

    worker, server = spawn_pair()
    folder = tmp_path / "work"
    folder.mkdir()
    watchdog = subprocess.Popen([sys.executable, "-m", "geneformer_triton.client.triton_watchdog", "--parent", str(worker.pid),
                                 "--group", str(server.pid), "--interval", "0.1", "--grace", "2",
                                 "--remove", str(folder)])
    try:
        time.sleep(1.0)
        assert server.poll() is None and watchdog.poll() is None  # nothing happens while the worker lives
        worker.kill()
        worker.wait()
        assert watchdog.wait(20) == 0
        assert server.wait(5) is not None and not folder.exists()
    finally:
        for process in (worker, server, watchdog):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_server_that_does_not_get_ready_is_a_clear_error(tmp_path):
    """The plugin's health check: a worker whose server cannot load the model fails the cluster start
    with Triton's reason (negative control for the READY check the other tests rely on)."""
    empty = tmp_path / "empty_repository"
    empty.mkdir()
    options = ClusterOptions(cluster="local:1", repository=empty, models=("geneformer_isp",), server_start_timeout_s=60)
    with pytest.raises(ClusterError, match="could not start its tritonserver.*geneformer_isp"):
        with open_cluster(options):
            pass
