"""Through Triton: perf_analyzer against a real local tritonserver, every encoder and ensemble,
HTTP and gRPC, a concurrency sweep, real cells, dynamic batching on (the repository's configs).

For each served model the in-process throughput of the same backend on the same cells is measured
right before its perf_analyzer runs (same machine state), so ``efficiency`` = Triton cells/s over
in-process cells/s. Each perf_analyzer run is a fixed number of requests (``--request-count``) at one
concurrency; its CSV is kept under ``<out>/perf_analyzer/``. Triton's metrics endpoint is scraped before
and after each run: the per-model deltas give the server-side breakdown (queue, compute input/infer/
output, average dynamic batch) for the served model and each model an ensemble composes.

The bench serves its own repository (``<work>/repository``): the configs of the source repository with
the weights linked (every variant of ``geneformer_triton.core.contract.EXPORTED_VARIANTS``, exported by ``gftriton export``), so the
source repository is never modified.

Every (model, protocol, concurrency) point is measured ``repeats`` times (separate perf_analyzer runs of
the same request count): the row gives the median cells/s with min-max, and cells per CPU-second of the
tritonserver process tree (server + backend stubs, psutil CPU times before/after each run), with the
1-minute load before and after.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from geneformer_triton.bench import perf, triton_metrics
from geneformer_triton.bench.cells import CellSet, raw_count_inputs
from geneformer_triton.bench.inprocess import measure_method
from geneformer_triton.bench.methods import BuildContext, MethodSpec
from geneformer_triton.bench.sampler import ResourceSampler, cpu_times
from geneformer_triton.bench.stats import range_text, summarize_rates
from geneformer_triton.core.contract import EMBEDDING_MODELS, TOKENIZER_MODEL, VARIANT_OF_MODEL, ServedModel

LOGGER = logging.getLogger(__name__)


# export format -> in-process method of the same backend on the same cells (one cell per call, as served)
INPROCESS_METHOD = {"onnx": "onnx_fp32_b1", "onnx_fp16": "onnx_fp16_b1", "onnx_int8": "onnx_int8_b1",
                    "onnx_packed": "onnx_packed_fp32_b1", "onnx_int8_packed": "onnx_packed_int8_b1",
                    "torchscript": "torchscript_fp32_b1", "torchscript_bf16": "torchscript_bf16_b1"}
#: the exported embedding models (contract.EMBEDDING_MODELS: each encoder and its ensemble)
SERVED: dict[str, ServedModel] = {name: m for name, m in EMBEDDING_MODELS.items()
                                  if VARIANT_OF_MODEL[m.encoder].name in INPROCESS_METHOD}
# on a GPU host the same served models compare with the GPU methods
GPU_METHODS = {"geneformer_torchscript": "torchscript_fp32_gpu", "geneformer_embed_torchscript": "torchscript_fp32_gpu",
               "geneformer_torchscript_bf16": "torchscript_bf16_gpu", "geneformer_embed_torchscript_bf16": "torchscript_bf16_gpu"}


def inprocess_method(model: ServedModel, device: str = "cpu") -> str:
    """The in-process method of the same backend and precision that ``model`` is compared with."""
    cpu = INPROCESS_METHOD[VARIANT_OF_MODEL[model.encoder].name]
    return GPU_METHODS.get(model.name, cpu) if device.startswith("cuda") else cpu


def select_throughput(row: dict) -> None:
    """``cells_per_s`` = Little's law (concurrency x batch / mean client latency: exact for perf_analyzer's
    closed loop, whatever the run's length) where the latency is known, else perf_analyzer's figure, whose
    measurement window is counted in whole seconds (a 14-18 s run is off by up to 7%). Both stay in the row."""
    little = row.get("cells_per_s_littles_law", float("nan"))
    if little == little and little > 0:
        row["cells_per_s"], row["throughput_source"] = little, "littles_law"
    else:
        row["cells_per_s"], row["throughput_source"] = row.get("cells_per_s_perf_analyzer", float("nan")), "perf_analyzer"
    rate = row.get("inprocess_cells_per_s", float("nan"))
    row["efficiency"] = row["cells_per_s"] / rate if rate == rate and rate > 0 else float("nan")


TRITON_COLUMNS = [
    "model", "kind", "backend", "protocol", "concurrency", "batch_size", "request_count", "n_cells", "tokens_mean",
    "repeats", "useful_gflop_per_cell", "executed_gflop_per_cell", "cells_per_s", "cells_per_s_min", "cells_per_s_max",
    "cells_per_cpu_s", "cells_per_cpu_s_min", "cells_per_cpu_s_max", "loadavg_before", "loadavg_after", "throughput_source",
    "cells_per_s_perf_analyzer", "cells_per_s_littles_law", "inprocess_method",
    "inprocess_cells_per_s", "inprocess_before", "inprocess_after", "efficiency", "inprocess_cpu_s_per_cell",
    "server_cpu_s_per_cell", "cpu_efficiency", "avg_latency_ms", "p50_ms", "p90_ms",
    "p95_ms", "p99_ms", "client_send_ms", "network_ms", "server_queue_ms", "server_compute_input_ms",
    "server_compute_infer_ms", "server_compute_output_ms", "client_recv_ms", "enc_avg_batch", "enc_queue_ms",
    "enc_compute_infer_ms", "enc_compute_infer_ms_per_exec", "tok_queue_ms", "tok_compute_infer_ms",
    "server_cpu_pct_mean", "server_rss_peak_mb", "perf_analyzer_cpu_pct_mean", "system_cpu_pct_mean", "loadavg_1m",
    "gpu_util_mean", "gpu_mem_peak_mb", "wall_s", "csv", "error",
]


# ----------------------------------------------------------------------------------------------- repository
def prepare_serving_repository(source: Path, dest: Path) -> Path:
    """``dest``: configs copied from ``source``, weights symlinked (the source repository is never modified)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for model_dir in sorted(p for p in source.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        target = dest / model_dir.name
        target.mkdir()
        shutil.copy2(model_dir / "config.pbtxt", target / "config.pbtxt")
        if (model_dir / "configs").is_dir():
            shutil.copytree(model_dir / "configs", target / "configs")
        for version in (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            (target / version.name).mkdir()
            for item in version.iterdir():
                if item.name != "__pycache__":
                    (target / version.name / item.name).symlink_to(item.resolve())
    return dest


# ----------------------------------------------------------------------------------------------- runs
def write_inputs(out_dir: Path, enc_cells: CellSet, full_cells: CellSet, batch_sizes: list[int], pad_id: int,
                 signatures: set[str], compose_copy: bool = True) -> dict[tuple[str, int], Path]:
    """perf_analyzer input JSON per (signature, batch size); the ONNX batch-1 file also goes to
    bench/data/perf_input.json for docker-compose's sdk service."""
    files = {}
    raw = raw_count_inputs(full_cells) if "ensemble" in signatures else None
    for batch in batch_sizes:
        for signature in sorted(signatures):
            if signature == "ensemble":
                data = perf.ensemble_input_data(raw, batch)
            else:
                data = perf.encoder_input_data(enc_cells.tokens, signature, batch, pad_id)
            files[(signature, batch)] = perf.write_json(data, out_dir / "perf_inputs" / f"{signature}_b{batch}.json")
    if compose_copy and ("onnx", 1) in files:
        perf.write_json(perf.encoder_input_data(enc_cells.tokens, "onnx", 1, pad_id), perf.COMPOSE_INPUT)
    return files


@dataclass(frozen=True)
class TritonRunOptions:
    """How :func:`run_triton` measures: ``protocols`` and the gRPC ``concurrencies`` (HTTP:
    ``http_concurrencies``, default the same); ``passes``: each cell sent this many times per run, at
    least ``min_seconds`` of work (perf_analyzer counts its window in whole seconds); ``batch_size``: cells
    per request; ``model_config_name``: ``cpu`` / ``gpu`` config files; ``timeout_s`` per perf_analyzer
    run; ``write_compose_input``: also bench/data/perf_input.json; ``repeats`` per point;
    ``client_protocols``: also measured through the project's client at ``client_concurrency``;
    ``backends``: one server each (``real``, ``stand-in``, ``auto``)."""

    protocols: Sequence[str] = ("grpc",)
    concurrencies: Sequence[int] = (1,)
    http_concurrencies: Sequence[int] | None = None
    passes: int = 1
    batch_size: int = 1
    model_config_name: str | None = "cpu"
    timeout_s: float = 1800.0
    write_compose_input: bool = True
    min_seconds: float = 0.0
    repeats: int = 1
    client_protocols: tuple[str, ...] = ()
    client_concurrency: int = 2
    backends: tuple[str, ...] = ("auto",)

    def concurrencies_for(self, protocol: str) -> Sequence[int]:
        return (self.http_concurrencies or self.concurrencies) if protocol == "http" else self.concurrencies


@dataclass
class TritonResults:
    """What :func:`run_triton` measured, filled as runs finish (a caller keeps them if interrupted):
    ``rows`` (``TRITON_COLUMNS``), ``metric_rows`` (server-side breakdown per composing model), ``info``."""

    rows: list[dict] = field(default_factory=list)
    metric_rows: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class _Harness:
    """Everything one served model's measurements need (one per :func:`run_triton` call)."""

    ctx: BuildContext
    method_specs: dict[str, MethodSpec]
    enc_cells: CellSet
    full_cells: CellSet
    options: TritonRunOptions
    inputs: dict[tuple[str, int], Path]
    binary: Path
    env: dict
    csv_dir: Path
    results: TritonResults

    def inprocess(self, method: str, model: ServedModel, cells: CellSet) -> tuple[float, float]:
        """(cells/s, CPU s per cell) of in-process ``method`` on ``cells`` (NaN when it is not built)."""
        if method not in self.method_specs:
            return float("nan"), float("nan")
        LOGGER.info("in-process %s on the same %d cells (for %s)", method, len(cells), model.name)
        row, _ = measure_method(self.method_specs[method], self.ctx, cells, _arch(self.ctx), self.options.repeats)
        return (float("nan"), float("nan")) if row["error"] else (row["cells_per_s"], row["cpu_s_per_cell"])

    def request_count(self, cells: CellSet, inprocess_rate: float) -> int:
        """Requests per run: every cell ``passes`` times, at least ~``min_seconds`` of work."""
        rounds = self.options.passes
        if self.options.min_seconds and inprocess_rate == inprocess_rate and inprocess_rate > 0:
            rounds = max(rounds, int(np.ceil(self.options.min_seconds * inprocess_rate / len(cells))))
        return max(len(cells) * rounds // self.options.batch_size, 1)

    def measure(self, model: ServedModel, server) -> None:
        """Every point of ``model`` on ``server``, between two in-process measurements of its backend (their
        mean is the reference: drift in what else runs on the machine then affects both sides alike)."""
        options = self.options
        cells = self.full_cells if model.kind == "ensemble" else self.enc_cells
        method = inprocess_method(model, self.ctx.device)
        before = self.inprocess(method, model, cells)
        request_count = self.request_count(cells, before[0])
        model_rows = []
        for protocol in options.protocols:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            for concurrency in options.concurrencies_for(protocol):
                model_rows.append(_one_run(model, method, server, self.binary, self.env, url, protocol, concurrency,
                                           options.batch_size, max(request_count, concurrency * 2),
                                           self.inputs[(model.signature, options.batch_size)], self.csv_dir, cells,
                                           before[0], options.timeout_s, self.results.metric_rows, _arch(self.ctx),
                                           options.repeats))
        for protocol in options.client_protocols:
            model_rows.append(_client_run(model, method, server, protocol, options.client_concurrency, cells, self.ctx.pad_id,
                                          options.repeats, _arch(self.ctx)))
        for row in model_rows:
            row["backend"] = server.backend_choice.kind
        self.results.rows.extend(model_rows)
        after = self.inprocess(method, model, cells)
        for row in model_rows:
            _set_efficiency(row, before, after)


def _server_env() -> dict[str, str]:
    """$GFTRITON_SERVER_PYTHONPATH first on the server's (python stubs') PYTHONPATH only: a GPU host whose
    Python has numpy 2 gives the stubs numpy<2 there (Triton 2.51's python backend needs it)."""
    if not os.environ.get("GFTRITON_SERVER_PYTHONPATH"):
        return {}
    return {"PYTHONPATH": os.pathsep.join(
        p for p in (os.environ["GFTRITON_SERVER_PYTHONPATH"], os.environ.get("PYTHONPATH", "")) if p)}


def run_triton(
    models: list[str],
    ctx: BuildContext,
    method_specs: dict[str, MethodSpec],
    cells: tuple[CellSet, CellSet],
    out_dir: Path,
    options: TritonRunOptions,
    results: TritonResults | None = None,
) -> TritonResults:
    """Serve ``models`` from ``ctx.repository`` and measure them, each point ``options.repeats`` times.

    ``cells``: (the encoders' token cells, the ensembles' raw-count cells). One server per entry of
    ``options.backends``, one after the other on the same cells and inputs (``real``: Triton's C++
    onnxruntime/pytorch backends, ``stand-in``: the Python stand-ins, ``auto``: real when built); each
    row's ``backend`` says which served it. ``results`` is filled as runs finish and returned."""
    from geneformer_triton.serving.server import LocalTritonServer

    enc_cells, full_cells = cells
    served = [SERVED[m] for m in models]
    needed = sorted({m.name for m in served} | {c for m in served for c in m.composing})
    inputs = write_inputs(out_dir, enc_cells, full_cells, [options.batch_size], ctx.pad_id,
                          {m.signature for m in served}, options.write_compose_input)
    binary = perf.find_perf_analyzer()
    results = results if results is not None else TritonResults()
    results.info.update(models=needed, protocols=list(options.protocols), concurrencies=list(options.concurrencies),
                        http_concurrencies=list(options.http_concurrencies or options.concurrencies),
                        batch_size=options.batch_size, perf_analyzer=str(binary),
                        model_config_name=options.model_config_name, repeats=options.repeats, backends={})
    harness = _Harness(ctx, method_specs, enc_cells, full_cells, options, inputs, binary,
                       perf.perf_analyzer_env(ctx.work_dir / "perf_analyzer_libs"), out_dir / "perf_analyzer", results)
    for requested in options.backends:
        suffix = f"-{requested}" if len(options.backends) > 1 else ""
        server = LocalTritonServer(ctx.repository, models=needed, model_config_name=options.model_config_name,
                                   work_dir=ctx.work_dir / f"server{suffix}", log_path=out_dir / f"tritonserver{suffix}.log",
                                   allow_gpu_metrics=ctx.device.startswith("cuda"), env=_server_env(), backends=requested)
        started = time.perf_counter()
        with server:
            results.info["server_start_s"] = time.perf_counter() - started
            results.info["backends"][server.backend_choice.kind] = served_backends(server)
            for model in served:
                harness.measure(model, server)
    return results


def served_backends(server) -> dict[str, str]:
    """Backend name -> what serves it: ``C++ libtriton_<name>.so`` or ``python stand-in`` (a model.py)."""
    args = [a for a in getattr(server, "command", None) or [] if str(a).startswith("--backend-directory=")]
    if not args:
        return {}
    found = {}
    for folder in sorted(p for p in Path(str(args[0]).split("=", 1)[1]).iterdir() if p.is_dir()):
        library = next(iter(sorted(folder.glob("libtriton_*.so"))), None)
        found[folder.name] = f"C++ {library.name}" if library is not None else (
            "python stand-in (model.py)" if (folder / "model.py").is_file() else "?")
    return found


def served_flops(model: ServedModel, cells: CellSet, batch_size: int, arch) -> tuple[float, float]:
    """(useful, executed) GFLOPs per cell as served: a ragged (packed) model computes each cell at its own
    length whatever the dynamic batcher merges; a padded one computes each request at its longest cell
    (requests of ``batch_size`` cells grouped as ``perf`` writes them; the dynamic batcher merges only
    requests of equal length, so it adds no padding). Ensembles: grouped by token length as an
    approximation of perf's grouping by gene count."""
    lengths = cells.lengths
    useful = float(arch.encoder_flops(lengths).sum())
    if model.ragged or batch_size <= 1:
        return useful / len(lengths) / 1e9, useful / len(lengths) / 1e9
    groups = perf._groups(lengths, batch_size)
    executed = sum(len(g) * float(arch.encoder_flops(lengths[g].max())) for g in groups)
    return useful / len(lengths) / 1e9, executed / sum(len(g) for g in groups) / 1e9


def _arch(ctx: BuildContext):
    from geneformer_triton.bench.cells import Architecture

    return Architecture.from_config(ctx.loaded.config)


def _one_run(model: ServedModel, method: str, server, binary: Path, env: dict, url: str, protocol: str, concurrency: int,
             batch_size: int, request_count: int, input_data: Path, csv_dir: Path, cells: CellSet, inprocess: float,
             timeout_s: float, metric_rows: list[dict], arch, repeats: int = 1) -> dict:
    """``repeats`` perf_analyzer runs of ``request_count`` requests at one point; the row: median cells/s
    (min-max), tritonserver-tree CPU seconds per cell, latencies and breakdown of the median run."""
    row = {c: float("nan") for c in TRITON_COLUMNS}
    row.update(model=model.name, kind=model.kind, protocol=protocol, concurrency=concurrency, batch_size=batch_size,
               request_count=request_count, n_cells=len(cells), tokens_mean=float(cells.lengths.mean()),
               inprocess_method=method, inprocess_cells_per_s=inprocess, error="")
    row["useful_gflop_per_cell"], row["executed_gflop_per_cell"] = served_flops(model, cells, batch_size, arch)
    stem = f"{model.name}_{protocol}_c{concurrency}_b{batch_size}"
    LOGGER.info("perf_analyzer %s %s concurrency %d batch %d: %d requests x %d repeats", model.name, protocol,
                concurrency, batch_size, request_count, repeats)
    try:
        row["loadavg_before"] = os.getloadavg()[0]
        metrics_before = triton_metrics.scrape(server.metrics_url)
        runs = []
        pa_sampler = ResourceSampler(pids=[], include_children=False, gpu=False)
        started = time.perf_counter()
        with ResourceSampler(pids=[server.pid]) as server_sampler, pa_sampler:
            for repeat in range(repeats):
                csv_path = csv_dir / f"{stem}_r{repeat}.csv"
                command = perf.perf_analyzer_command(binary, model.name, url, protocol, input_data, concurrency,
                                                     request_count, csv_path, batch_size)
                cpu0 = cpu_times(server.pid)
                code, tail = perf.run_perf_analyzer(command, env, timeout_s, csv_dir / f"{stem}_r{repeat}.log",
                                                    on_start=pa_sampler.watch)
                server_cpu = cpu_times(server.pid) - cpu0
                if code != 0 or not csv_path.is_file():
                    raise RuntimeError(f"perf_analyzer exit {code}: {tail[-600:]}")
                run = {"csv": csv_path, **perf.parse_csv(csv_path)}
                run["cells_per_s_perf_analyzer"] = run["infer_per_s"]
                run["cells_per_s_littles_law"] = concurrency * batch_size / (run.get("avg_latency_us", float("nan")) / 1e6)
                select_throughput(run)
                run["server_cpu_s_per_cell"] = server_cpu / (request_count * batch_size)
                runs.append(run)
        row["wall_s"] = time.perf_counter() - started
        row["loadavg_after"] = os.getloadavg()[0]
        metrics_after = triton_metrics.scrape(server.metrics_url)
        row.update(summarize_rates([r["cells_per_s"] for r in runs], [r["server_cpu_s_per_cell"] for r in runs]))
        row["server_cpu_s_per_cell"] = row.pop("cpu_s_per_cell")
        median = sorted(runs, key=lambda r: r["cells_per_s"])[len(runs) // 2]
        row["throughput_source"] = median["throughput_source"]
        for name in ("cells_per_s_perf_analyzer", "cells_per_s_littles_law"):
            row[name] = median[name]
        for name in ("p50", "p90", "p95", "p99"):
            row[f"{name}_ms"] = median.get(f"{name}_us", float("nan")) / 1e3
        row["avg_latency_ms"] = median.get("avg_latency_us", float("nan")) / 1e3
        for name in ("client_send", "network", "server_queue", "server_compute_input", "server_compute_infer",
                     "server_compute_output", "client_recv"):
            row[f"{name}_ms"] = median.get(f"{name}_us", float("nan")) / 1e3
        row["csv"] = str(median["csv"].relative_to(csv_dir.parent))
        for name in model.composing:  # server-side breakdown over all repeats
            parts = triton_metrics.breakdown(metrics_before, metrics_after, name)
            metric_rows.append({"model": model.name, "composing_model": name, "protocol": protocol,
                                "concurrency": concurrency, "batch_size": batch_size, **parts})
            prefix = "tok_" if name == TOKENIZER_MODEL else "enc_"
            for key in ("avg_batch", "queue_ms", "compute_infer_ms", "compute_infer_ms_per_exec"):
                if f"{prefix}{key}" in row:
                    row[f"{prefix}{key}"] = parts[key]
        gauges = triton_metrics.gauges(metrics_after)
        if gauges["nv_gpu_utilization"] == gauges["nv_gpu_utilization"]:
            row["gpu_util_mean"] = gauges["nv_gpu_utilization"] * 100
        summary = server_sampler.summary
        row.update(server_cpu_pct_mean=summary.cpu_pct_mean, server_rss_peak_mb=summary.rss_peak_mb,
                   system_cpu_pct_mean=summary.system_cpu_pct_mean, loadavg_1m=summary.loadavg_1m,
                   perf_analyzer_cpu_pct_mean=pa_sampler.summary.cpu_pct_mean)
        if summary.gpu_util_mean == summary.gpu_util_mean:
            row.update(gpu_util_mean=summary.gpu_util_mean, gpu_mem_peak_mb=summary.gpu_mem_peak_mb)
    except Exception as error:  # noqa: BLE001 - record and go on
        LOGGER.error("%s %s c%d: %s", model.name, protocol, concurrency, error)
        row["error"] = f"{type(error).__name__}: {error}".replace("\n", " ")[:600]
    LOGGER.info("  %s %s c%d: %s cells/s (in-process before %.2f)", model.name, protocol, concurrency,
                range_text(row), inprocess)
    return row


def _client_run(model: ServedModel, method: str, server, protocol: str, concurrency: int, cells: CellSet, pad_id: int,
                repeats: int, arch) -> dict:
    """The project's own client (``geneformer_triton.client.triton_client.GeneformerClient``) embedding every cell, one cell
    per request, ``concurrency`` requests in flight, ``repeats`` times: protocol ``<protocol>+client``."""
    from geneformer_triton.client.triton_client import GeneformerClient, pack_cells

    row = {c: float("nan") for c in TRITON_COLUMNS}
    row.update(model=model.name, kind=model.kind, protocol=f"{protocol}+client", concurrency=concurrency, batch_size=1,
               request_count=len(cells), n_cells=len(cells), tokens_mean=float(cells.lengths.mean()),
               inprocess_method=method, throughput_source="client wall clock", error="")
    row["useful_gflop_per_cell"], row["executed_gflop_per_cell"] = served_flops(model, cells, 1, arch)
    try:
        if model.kind == "ensemble":
            adata = cells.adata[cells.rows]
            gene_ids, counts = pack_cells(adata.X, list(adata.var["ensembl_id"]))
            n_counts = np.asarray(adata.obs["n_counts"], dtype=np.float32)
        url = server.grpc_url if protocol == "grpc" else server.http_url
        walls, cpus = [], []
        row["loadavg_before"] = os.getloadavg()[0]
        with GeneformerClient(url, protocol, concurrency=concurrency) as client:
            def embed(n: int = len(cells)) -> np.ndarray:
                if model.kind == "ensemble":
                    return client.embed_cells(gene_ids[:n], counts[:n], n_counts[:n], model.name, batch_size=1)
                return client.embed_tokens(cells.tokens[:n], model.name, batch_size=1, pad_id=pad_id)

            embed(concurrency)  # warm-up
            for _ in range(repeats):
                cpu0, wall0 = cpu_times(server.pid), time.perf_counter()
                embed()
                walls.append(time.perf_counter() - wall0)
                cpus.append(cpu_times(server.pid) - cpu0)
        row["loadavg_after"] = os.getloadavg()[0]
        rates = [len(cells) / w for w in walls]
        row.update(summarize_rates(rates, [c / len(cells) for c in cpus]))
        row["server_cpu_s_per_cell"] = row.pop("cpu_s_per_cell")
        row["wall_s"] = float(sum(walls))
    except Exception as error:  # noqa: BLE001 - record and go on
        LOGGER.error("%s %s client: %s", model.name, protocol, error)
        row["error"] = f"{type(error).__name__}: {error}".replace("\n", " ")[:600]
    LOGGER.info("  %s %s+client c%d: %s cells/s", model.name, protocol, concurrency, range_text(row))
    return row


def _mean(*values: float) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else float("nan")


def _set_efficiency(row: dict, before: tuple[float, float], after: tuple[float, float]) -> None:
    """efficiency = Triton cells/s over the in-process cells/s (mean of the medians before and after);
    cpu_efficiency = in-process CPU seconds per cell over the server's (tritonserver + stubs) ones."""
    rate = _mean(before[0], after[0])
    row.update(inprocess_cells_per_s=rate, inprocess_before=before[0], inprocess_after=after[0])
    row["efficiency"] = row["cells_per_s"] / rate if rate == rate and rate > 0 else float("nan")
    cpu = _mean(before[1], after[1])
    server_cpu = row["server_cpu_s_per_cell"]  # measured: CPU times of the tritonserver tree over the runs
    row["inprocess_cpu_s_per_cell"] = cpu
    row["cpu_efficiency"] = cpu / server_cpu if cpu == cpu and server_cpu == server_cpu and server_cpu > 0 else float("nan")
    LOGGER.info("  %s %s c%d: efficiency %.2f (in-process %.2f -> %.2f), CPU-time efficiency %.2f", row["model"],
                row["protocol"], row["concurrency"], row["efficiency"], before[0], after[0], row["cpu_efficiency"])
