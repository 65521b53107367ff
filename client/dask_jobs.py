"""The adapter between the Dask engine and the single-server jobs: ``gftriton isp`` / ``embed`` on a cluster.

This is the ONE place that knows the single-server job code (``geneformer_triton.client.isp_run.run_isp`` + ``ResultStore``,
``geneformer_triton.client.embed_job.EmbedRun`` + ``PartialStore``, the option handling of ``geneformer_triton.client.isp_cli`` /
``geneformer_triton.client.cli``): when that code changes, re-point the functions here. A shard task runs the
unchanged job on its cells against one Triton server, into a temporary store on the worker, and
returns the finished results; the client process writes them as the shard's pieces
(:class:`geneformer_triton.client.shards.ShardStore`) and, when every shard is done, assembles the output in cell order
with the same writers as a single-server run:

* ISP: the rows (and rejected cells) of each shard are appended, shard by shard, to the output's
  ``ResultStore``; cells already there (an earlier run) are neither recomputed nor appended again.
* embed: the shards' embeddings are stacked in cell order and written by ``write_embeddings``.

Limits (clear errors): ``--goal-cells`` / ``--start-cells`` need ``--servers`` (the state is embedded
through the first one; with servers started by the workers give ``--goal-embedding`` .npy instead);
``embed --client-tokenize`` is single-server only.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geneformer_triton.client.dask_engine import (
    ClusterError,
    ClusterOptions,
    ServerTarget,
    open_cluster,
    run_shards,
    server_targets,
    with_failover,
)
from geneformer_triton.client.shards import Shard, ShardStore, fingerprint, plan_shards

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Connection:
    """How a task talks to its server: protocol (for servers the workers start), per-request
    ``timeout_s`` (seconds), ``retries`` while unreachable, ``wait_s`` for readiness, ``concurrency``."""

    servers: tuple[ServerTarget, ...]
    protocol: str
    concurrency: int
    timeout_s: float
    retries: int
    wait_s: float

    def client(self, target: ServerTarget):
        from geneformer_triton.client.triton_client import GeneformerClient, RetryPolicy

        return GeneformerClient(target.url, target.protocol, concurrency=self.concurrency, timeout_s=self.timeout_s,
                                retry=RetryPolicy(attempts=max(1, self.retries)))


def _run_on_a_server(connection: Connection, shard: Shard, model: str, job) -> Any:
    """``job(client)`` against the shard's server (failing over to the next given one)."""

    def call(target: ServerTarget):
        with connection.client(target) as client:
            client.wait_ready(connection.wait_s, model)
            return job(client)

    return with_failover(server_targets(connection.servers, connection.protocol, shard.index), call)


# ============================================================================= ISP


@dataclass(frozen=True)
class IspShardJob:
    """What every ISP shard task needs besides its cells (sent to each worker once)."""

    spec: Any  # geneformer_triton.client.isp_spec.IspSpec
    gene_ids: np.ndarray
    symbols: dict
    connection: Connection
    flush_every: int


def isp_shard_task(job: IspShardJob, shard: Shard, cells: tuple) -> dict[str, pd.DataFrame]:
    """Dask task: perturb the shard's cells (``cells`` = CSR counts, totals, cell ids) with
    ``geneformer_triton.client.isp_run.run_isp``; returns ``{"rows": ..., "errors": ...}`` frames."""
    from geneformer_triton.client.isp import CellTable
    from geneformer_triton.client.isp_run import run_isp
    from geneformer_triton.client.isp_store import ResultStore

    counts, n_counts, cell_ids = cells
    table = CellTable(counts, job.gene_ids, n_counts, list(cell_ids), job.symbols)

    def perturb(client) -> dict[str, pd.DataFrame]:
        with tempfile.TemporaryDirectory(prefix="gftriton-isp-shard-") as tmp, \
                ResultStore(Path(tmp) / "shard.parquet", job.spec.fingerprint(), columns=job.spec.columns()) as store:
            run_isp(client, table, job.spec, store, job.connection.concurrency, job.flush_every, 30.0)
            return {"rows": store.read(), "errors": store.read_errors()}

    return _run_on_a_server(job.connection, shard, job.spec.model, perturb)


def _isp_spec(args: argparse.Namespace, cells, name_to_id: dict, options: ClusterOptions):
    """The run's IspSpec (``geneformer_triton.client.isp_cli.build_spec``); states are embedded through the first given server."""
    from geneformer_triton.client.isp_cli import _states_option, build_spec
    from geneformer_triton.core.isp_schema import IspRunError

    wants_state = any(getattr(args, f"{w}_cells") for w in ("goal", "start")) or _states_option(args) is not None
    if wants_state and not options.servers:
        raise IspRunError("cell states or --goal-cells/--start-cells with --cluster: give --servers (the states are "
                          "embedded through the first one) or an embedding file (--goal-embedding / --start-embedding .npy)")
    if not wants_state:
        return build_spec(args, None, cells, name_to_id)
    with _connection(args, options).client(options.servers[0]) as state_client:
        state_client.wait_ready(args.wait)
        return build_spec(args, state_client, cells, name_to_id)


def _connection(args: argparse.Namespace, options: ClusterOptions) -> Connection:
    return Connection(options.servers, options.protocol, args.concurrency, args.timeout, args.retries,
                      getattr(args, "wait", 60.0))


def _rows_in_cell_order(rows: pd.DataFrame, order: dict[str, int]) -> pd.DataFrame:
    if rows.empty:
        return rows
    key = rows["cell_id"].astype(str).map(order)
    sort = ["_cell", "target_index"] if "target_index" in rows else ["_cell"]
    return rows.assign(_cell=key.to_numpy()).sort_values(sort, kind="stable").drop(columns="_cell").reset_index(drop=True)


def run_isp_on_cluster(args: argparse.Namespace, client: Any = None) -> int:
    """``gftriton isp`` with ``--cluster`` / ``--servers``; ``client``: an open ``distributed.Client``
    to use instead of opening the cluster of the options (tests, notebooks)."""
    from geneformer_triton.client.isp_cli import _report, gene_name_map, load_isp_cells, selected_rows
    from geneformer_triton.client.isp_store import ResultStore
    from geneformer_triton.core.isp_schema import IspRunError

    options = ClusterOptions.from_args(args)
    name_to_id = gene_name_map(args)
    cells = load_isp_cells(args, name_to_id)
    selected = selected_rows(args, cells)
    spec = _isp_spec(args, cells, name_to_id, options)
    shards = plan_shards(len(selected), options.shard_size)  # shard rows index ``selected``
    plan = {"job": "isp", "spec": spec.fingerprint(), "n_cells": len(cells), "selected": fingerprint(np.asarray(selected)),
            "shard_size": options.shard_size,
            "cells": fingerprint(cells.cell_ids, cells.counts.indptr, cells.counts.indices, cells.counts.data,
                                 cells.n_counts)}
    order = {c: i for i, c in enumerate(cells.cell_ids)}
    with (ResultStore(args.output, spec.fingerprint(), overwrite=args.overwrite, columns=spec.columns()) as final,
          ShardStore(args.output) as shard_store):
        if args.retry_errors:
            final.forget_errors()
        resumed = shard_store.open(plan, restart=args.overwrite or args.retry_errors)
        finished = final.finished()
        todo = {s: [selected[r] for r in s.rows if cells.cell_ids[selected[r]] not in finished] for s in shards}
        pending = [s for s in shards if todo[s] and not shard_store.is_done(s)]
        LOGGER.info("%d cells in %d shards of %d: %d shards to run, %d already stored, %d cells already in %s",
                    len(cells), len(shards), options.shard_size, len(pending), resumed, len(finished), final.path)

        def payload(shard: Shard) -> tuple:
            rows = todo[shard]
            return cells.counts[rows], cells.n_counts[rows], [cells.cell_ids[r] for r in rows]

        job = IspShardJob(spec, cells.gene_ids, cells.symbols, _connection(args, options), args.flush_every)
        started = time.perf_counter()
        failed = _run(client, options, pending, isp_shard_task, job, payload,
                      lambda shard, result: shard_store.write(shard, result), not args.no_progress, "isp")
        seconds = time.perf_counter() - started
        for shard in shards:  # assemble in cell order; skip cells the output already holds
            if not shard_store.is_done(shard):
                continue
            pieces = shard_store.read(shard)
            rows, errors = (p[~p["cell_id"].astype(str).isin(finished)] for p in (pieces["rows"], pieces["errors"]))
            final.append(_rows_in_cell_order(rows, order), errors)
            finished |= set(rows["cell_id"].astype(str)) | set(errors["cell_id"].astype(str))
        if failed:
            raise IspRunError(f"{len(failed)} shard(s) failed ({failed[0][0].name}: {failed[0][1]}); finished shards "
                              f"are saved in {shard_store.folder} and {final.path}: rerun the command to resume")
        shard_store.remove()
        n_rows = len(final.read())
        LOGGER.info("%d shards ran in %.1f s on the cluster; %s holds %d rows", len(pending), seconds, final.path, n_rows)
        _report(final, args)
    return 0


def _run(client: Any, options: ClusterOptions, pending: list[Shard], task, job, payload, on_result,
         progress: bool, desc: str) -> list:
    if not pending:
        return []
    if client is not None:
        return run_shards(client, pending, task, job, payload, on_result, options, progress, desc)
    with open_cluster(options) as opened:
        return run_shards(opened, pending, task, job, payload, on_result, options, progress, desc)


# ============================================================================= embed


@dataclass(frozen=True)
class EmbedShardJob:
    """What every embed shard task needs besides its cells."""

    model: str
    gene_ids: list
    vocabulary: Any  # GeneVocabulary or None
    batch_size: int
    connection: Connection


def embed_shard_task(job: EmbedShardJob, shard: Shard, cells: tuple) -> dict[str, np.ndarray]:
    """Dask task: embed the shard's cells with ``geneformer_triton.client.embed_job.EmbedRun`` (server-side
    tokenization); returns ``{"embeddings": float32 [n_cells, hidden]}`` (NaN rows: not embeddable)."""
    from geneformer_triton.client.embed_job import EmbedRun
    from geneformer_triton.client.outputs import PartialStore
    from geneformer_triton.core.cell_inputs import CellMatrix

    counts, n_counts, cell_ids = cells
    matrix = CellMatrix(counts, job.gene_ids, list(cell_ids), n_counts, adata=None, source=shard.name)

    def embed(client) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="gftriton-embed-shard-") as tmp:
            store = PartialStore(Path(tmp) / "shard.npy")
            try:
                EmbedRun(client, matrix, job.model, None, job.batch_size, job.vocabulary).run(store, progress=False)
                return {"embeddings": store.assemble(matrix.n_cells)}
            finally:
                store.close()

    return _run_on_a_server(job.connection, shard, job.model, embed)


def run_embed_on_cluster(args: argparse.Namespace, client: Any = None) -> int:
    """``gftriton embed`` with ``--cluster`` / ``--servers`` (server-side tokenization)."""
    from geneformer_triton.client.cli import _dictionary_folders, read_embed_input
    from geneformer_triton.client.outputs import output_format, write_embeddings
    from geneformer_triton.core.dictionaries import TOKEN_DICTIONARY_FILE, load_vocabulary

    if args.client_tokenize:
        raise ClusterError("--client-tokenize runs on one server only; drop it (the servers tokenize) or drop --cluster/--servers")
    output_format(args.output)
    options = ClusterOptions.from_args(args)
    folders = _dictionary_folders(args)
    vocabulary_folder = next((f for f in folders if (f / TOKEN_DICTIONARY_FILE).is_file()), None)
    vocabulary = load_vocabulary(vocabulary_folder) if vocabulary_folder is not None else None
    cells = read_embed_input(args)
    shards = plan_shards(cells.n_cells, options.shard_size)
    plan = {"job": "embed", "input": cells.fingerprint(), "model": args.model, "n_cells": cells.n_cells,
            "shard_size": options.shard_size, "tokenization": "server"}
    with ShardStore(args.output) as shard_store:
        resumed = shard_store.open(plan, restart=args.restart)
        pending = [s for s in shards if not shard_store.is_done(s)]
        LOGGER.info("%d cells in %d shards: %d to run, %d already stored in %s", cells.n_cells, len(shards),
                    len(pending), resumed, shard_store.folder)

        def payload(shard: Shard) -> tuple:
            rows = shard.rows
            return cells.counts[rows], cells.n_counts[rows], [cells.cell_ids[r] for r in rows]

        batch_size = args.batch_size or 32
        job = EmbedShardJob(args.model, list(cells.gene_ids), vocabulary, batch_size, _connection(args, options))
        failed = _run(client, options, pending, embed_shard_task, job, payload,
                      lambda shard, result: shard_store.write(shard, result), not args.no_progress, args.model)
        if failed:
            raise ClusterError(f"{len(failed)} shard(s) failed ({failed[0][0].name}: {failed[0][1]}); finished shards are "
                               f"saved in {shard_store.folder}: rerun the command to resume")
        embeddings = np.concatenate([shard_store.read(s)["embeddings"] for s in shards]) if shards else np.zeros((0, 0))
        info = {"model": args.model, "cluster": options.cluster or "", "servers": ",".join(t.url for t in options.servers),
                "tokenization": "server", "input": cells.source}
        write_embeddings(args.output, embeddings, cells.cell_ids, cells.adata, info)
        shard_store.remove()
    LOGGER.info("wrote %d x %d embeddings to %s (%d shards run, %d resumed)", embeddings.shape[0],
                embeddings.shape[1] if embeddings.ndim == 2 else 0, args.output, len(pending), resumed)
    return 0
