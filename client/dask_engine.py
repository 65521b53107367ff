"""Dask engine: shard tasks over many Triton servers, one per worker or a given list, surviving lost workers.

``gftriton isp`` / ``gftriton embed`` with ``--cluster ADDRESS`` (a running Dask scheduler, e.g. from
dask-jobqueue's ``SLURMCluster`` or dask-kubernetes), ``--cluster local:N`` (a :class:`LocalCluster`
of N worker processes, one thread each, on loopback) or ``--servers URL,URL`` use this module:

* **Servers.** Without ``--servers``, every worker starts its own ``tritonserver`` on its node
  (``geneformer_triton.client.triton_worker_plugin.TritonServerPlugin``, a Dask ``WorkerPlugin``): ``LocalTritonServer`` serving
  ``--repository`` on free loopback ports, health-checked before the worker takes tasks, stopped at
  teardown, and stopped by a watchdog process (``geneformer_triton.client.triton_watchdog``) if the worker is killed.
  With ``--servers``, tasks send their shard to the given URLs (``http://host:8000``,
  ``grpc://host:8001`` or ``host:port`` with ``--protocol``); shard *i* starts at URL *i mod n* and
  moves to the next URL when one is unreachable.
* **Tasks.** :func:`run_shards` submits one task per shard not yet done (at most a few per worker in
  flight), with ``retries`` for task errors; a task on a worker that dies is rerun on another one by
  the scheduler. Each finished task's result goes to a callback in the client process (which writes the
  shard's pieces atomically, see :mod:`geneformer_triton.client.shards`) and advances the progress bar (tqdm, cells).

Task functions live in :mod:`geneformer_triton.client.dask_jobs` (the adapter to the single-server job code).
The watchdog is :mod:`geneformer_triton.client.triton_watchdog`; shards and their store are :mod:`geneformer_triton.client.shards`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from geneformer_triton.client.shards import Shard

LOGGER = logging.getLogger(__name__)

PLUGIN_NAME = "gftriton-triton-server"
PROTOCOLS = ("grpc", "http")
T = TypeVar("T")


class ClusterError(RuntimeError):
    """The cluster or its servers cannot run the job (bad options, a server that does not start)."""


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ServerTarget:
    """One Triton endpoint: ``url`` is ``host:port`` (what tritonclient takes), ``protocol`` grpc/http."""

    url: str
    protocol: str


def parse_server_url(text: str, default_protocol: str = "grpc") -> ServerTarget:
    """``http://host:8000`` / ``grpc://host:8001`` / ``host:port`` (``default_protocol``) -> target."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    protocol, address = (scheme.lower(), rest) if sep else (default_protocol, text)
    address = address.rstrip("/")
    if protocol not in PROTOCOLS:
        raise ClusterError(f"server URL {text!r}: scheme must be http:// or grpc://, got {scheme!r}")
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"server URL {text!r}: expected [http|grpc]://HOST:PORT (for instance http://gftriton:8000)")
    return ServerTarget(address, protocol)


@dataclass(frozen=True)
class ClusterOptions:
    """How a job is spread out.

    ``cluster``: ``"local:N"`` or a scheduler address (``tcp://host:8786``); ``None`` with ``servers``
    means a local cluster of one worker per server. ``repository``: the model repository each worker's
    own server serves (needed when no ``servers`` are given). ``shard_size``: cells per task.
    ``task_retries``: reruns of a task that raised. ``model_config_name`` / ``models``: what the
    workers' servers load (``None`` = every model). ``server_start_timeout_s``: seconds a worker waits
    for its server to be ready.
    """

    cluster: Optional[str] = None
    servers: tuple[ServerTarget, ...] = ()
    repository: Optional[Path] = None
    protocol: str = "grpc"
    model_config_name: Optional[str] = "cpu"
    models: Optional[tuple[str, ...]] = None
    shard_size: int = 16
    task_retries: int = 3
    server_start_timeout_s: float = 180.0
    tasks_per_worker: int = 2

    def __post_init__(self) -> None:
        if self.cluster is None and not self.servers:
            raise ClusterError("give --cluster local:N / --cluster SCHEDULER_ADDRESS, or --servers URL,URL")
        if not self.servers and self.repository is None:
            raise ClusterError("--cluster without --servers starts a Triton server on every worker: "
                               "give the model repository it serves with --repository DIR")
        if self.repository is not None and not self.servers and not Path(self.repository).is_dir():
            raise ClusterError(f"--repository {self.repository}: no such folder (run `gftriton export` or `make demo` first)")
        if self.shard_size < 1:
            raise ClusterError(f"--shard-size must be >= 1 cells, got {self.shard_size}")
        if self.cluster is not None:
            local_workers(self.cluster)  # validates local:N

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClusterOptions":
        protocol = getattr(args, "protocol", "grpc")
        servers = tuple(parse_server_url(s, protocol) for s in (args.servers or "").split(",") if s.strip())
        models = tuple(m for m in (args.server_models or "").split(",") if m) or None
        return cls(cluster=args.cluster, servers=servers,
                   repository=Path(args.repository) if args.repository else None, protocol=protocol,
                   model_config_name=args.server_config or None, models=models, shard_size=args.shard_size,
                   task_retries=args.task_retries)


def local_workers(cluster: str) -> Optional[int]:
    """N of ``local:N`` (None for a scheduler address); ClusterError for a bad ``local:`` spec."""
    if not cluster.startswith("local"):
        return None
    _, sep, count = cluster.partition(":")
    if not sep or not count.isdigit() or int(count) < 1:
        raise ClusterError(f"--cluster {cluster!r}: expected local:N with N >= 1 workers (for instance local:2)")
    return int(count)


def cluster_requested(args: argparse.Namespace) -> bool:
    """True when the command line asks for the Dask engine (``--cluster`` or ``--servers``)."""
    return bool(getattr(args, "cluster", None) or getattr(args, "servers", None))


def add_cluster_arguments(parser: argparse.ArgumentParser, repository: bool = True) -> None:
    """``--cluster``, ``--servers``, ``--shard-size`` ... (``--repository`` too unless the command has it)."""
    group = parser.add_argument_group("scale-out (Dask)")
    group.add_argument("--cluster", help="local:N (N local worker processes) or a Dask scheduler address "
                                         "(tcp://host:8786); each worker starts a tritonserver serving --repository")
    group.add_argument("--servers", help="comma list of Triton server URLs (http://host:8000, grpc://host:8001) "
                                         "the workers use instead of starting their own")
    if repository:
        group.add_argument("--repository", help="model repository each worker's own tritonserver serves")
    group.add_argument("--shard-size", type=int, default=16, help="cells per task (one task = one shard)")
    group.add_argument("--task-retries", type=int, default=3, help="reruns of a failed task")
    group.add_argument("--server-config", default="cpu", help="workers' servers: per-host config name "
                                                             "(configs/NAME.pbtxt; 'gpu' on GPU nodes, '' for config.pbtxt)")
    group.add_argument("--server-models", help="workers' servers: comma list of models to load (default all)")


# ----------------------------------------------------------------------------- worker servers


def _worker_plugin(worker: Any = None) -> Any:
    """This worker's TritonServerPlugin (``worker``: given by ``client.run``, else the task's worker)."""
    if worker is None:
        from distributed import get_worker

        worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise ClusterError("this worker has no tritonserver plugin: run with --repository (or give --servers)")
    return plugin


def server_targets(servers: Sequence[ServerTarget], protocol: str, shard_index: int) -> list[ServerTarget]:
    """Where a task sends its shard, in order of preference: the given servers starting at
    ``shard_index mod n``, else (inside a worker) the worker's own server."""
    if servers:
        start = shard_index % len(servers)
        return list(servers[start:]) + list(servers[:start])
    return [_worker_plugin().target(protocol)]


def with_failover(targets: Sequence[ServerTarget], call: Callable[[ServerTarget], T]) -> T:
    """``call(target)`` on the first target that is reachable (ServerUnavailableError moves on)."""
    from geneformer_triton.client.triton_client import ServerUnavailableError

    last: Optional[BaseException] = None
    for target in targets:
        try:
            return call(target)
        except Exception as error:  # noqa: BLE001 - only 'unavailable' (also as the cause) moves on
            if not isinstance(error, ServerUnavailableError) and not isinstance(error.__cause__, ServerUnavailableError):
                raise
            LOGGER.warning("%s (%s) unavailable: %s; trying the next server", target.url, target.protocol, error)
            last = error
    if last is None:
        raise ClusterError("no server to send the shard to")
    raise last


# ----------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def open_cluster(options: ClusterOptions) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster of ``options``, with the server plugin registered when
    the workers start their own servers; everything it started is closed on exit."""
    from distributed import Client, LocalCluster

    from geneformer_triton.client.triton_worker_plugin import TritonServerPlugin

    n_local = local_workers(options.cluster) if options.cluster else len(options.servers)
    with contextlib.ExitStack() as stack:
        if n_local is not None:
            cluster = stack.enter_context(LocalCluster(
                n_workers=n_local, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_port=0))
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(Client(options.cluster))
        if not options.servers:
            LOGGER.info("starting a tritonserver on each of %d worker(s) (repository %s)",
                        len(client.scheduler_info(n_workers=-1)["workers"]), options.repository)
            try:
                client.register_plugin(TritonServerPlugin(options.repository, options.model_config_name,
                                                          options.models, options.server_start_timeout_s))
            except Exception as error:
                raise ClusterError(f"a worker could not start its tritonserver: {error}") from error
        try:
            yield client
        finally:
            if not options.servers:  # teardown on every worker now, not under the nanny's close timeout
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(PLUGIN_NAME)


def run_shards(
    client: Any,
    shards: Sequence[Shard],
    task: Callable[..., T],
    job: Any,
    payload: Callable[[Shard], Any],
    on_result: Callable[[Shard, T], None],
    options: ClusterOptions,
    progress: bool = True,
    desc: str = "cells",
) -> list[tuple[Shard, BaseException]]:
    """Run ``task(job, shard, payload(shard))`` for every shard on the cluster; ``on_result(shard,
    result)`` in this process as each finishes. ``job`` is sent to every worker once. Returns the
    shards that failed (after ``options.task_retries``) with their errors; the others are done."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not shards:
        return []
    n_workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    window = max(2, options.tasks_per_worker * n_workers)
    [job_future] = client.scatter([job], broadcast=True, hash=False)
    queue = iter(shards)
    failed: list[tuple[Shard, BaseException]] = []
    owner: dict[Any, Shard] = {}

    def submit(shard: Shard) -> Any:
        future = client.submit(task, job_future, shard, payload(shard), retries=options.task_retries, pure=False,
                               key=f"{getattr(task, '__name__', 'task')}-{shard.name}-{os.urandom(4).hex()}")
        owner[future] = shard
        return future

    running = as_completed([submit(s) for s in itertools.islice(queue, window)])
    with tqdm(total=sum(s.n_cells for s in shards), unit="cell", desc=desc, disable=not progress) as bar:
        for future in running:
            shard = owner.pop(future)
            try:
                result = future.result()
            except Exception as error:  # the task failed after its retries (or its workers kept dying)
                LOGGER.error("%s (cells %d..%d) failed: %s", shard.name, shard.start, shard.stop, error)
                failed.append((shard, error))
            else:
                on_result(shard, result)
                bar.update(shard.n_cells)
            future.release()
            following = next(queue, None)
            if following is not None:
                running.add(submit(following))
    return failed


def worker_server_info(dask_worker: Any = None) -> dict:
    """On a worker (``client.run(worker_server_info)``): its own server's pid, gRPC/HTTP addresses,
    shared-memory prefix and work folder, and the worker's pid."""
    plugin = _worker_plugin(dask_worker)
    server = plugin.server
    return {"worker_pid": os.getpid(), "server_pid": server.pid if server else None,
            "grpc": server.grpc_url if server else None, "http": server.http_url if server else None,
            "shm_prefix": server.shm_prefix if server else None, "work_dir": str(plugin.work_dir)}
