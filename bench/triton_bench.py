"""Through Triton: perf_analyzer against a real local tritonserver, every encoder and ensemble,
HTTP and gRPC, a concurrency sweep, real cells, dynamic batching on (the repository's configs).

For each served model the in-process throughput of the same backend on the same cells is measured
right before its perf_analyzer runs (same machine state), so ``efficiency`` = Triton cells/s over
in-process cells/s. Each perf_analyzer run is a fixed number of requests (``--request-count``) at one
concurrency; its CSV is kept under ``<out>/perf_analyzer/``. Triton's metrics endpoint is scraped before
and after each run: the per-model deltas give the server-side breakdown (queue, compute input/infer/
output, average dynamic batch) for the served model and each model an ensemble composes.

The bench serves its own repository (``<work>/repository``): the configs of the source repository with
the weights linked, plus bench-made variants (int8 ONNX on CPU, bf16 TorchScript on GPU), so the
source repository is never modified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import perf, triton_metrics
from bench.cells import CellSet, raw_count_inputs
from bench.inprocess import measure_method
from bench.methods import BuildContext, MethodSpec
from bench.sampler import ResourceSampler

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str
    kind: str  # encoder | ensemble
    signature: str  # onnx | torchscript | ensemble (perf_analyzer input names)
    method: str  # in-process method of the same backend
    composing: tuple[str, ...]  # models whose metrics make the server-side breakdown


SERVED = {m.name: m for m in (
    ServedModel("geneformer_onnx", "encoder", "onnx", "onnx_fp32_b1", ("geneformer_onnx",)),
    ServedModel("geneformer_onnx_fp16", "encoder", "onnx", "onnx_fp16_b1", ("geneformer_onnx_fp16",)),
    ServedModel("geneformer_onnx_int8", "encoder", "onnx", "onnx_int8_b1", ("geneformer_onnx_int8",)),
    ServedModel("geneformer_torchscript", "encoder", "torchscript", "torchscript_fp32_b1", ("geneformer_torchscript",)),
    ServedModel("geneformer_torchscript_bf16", "encoder", "torchscript", "torchscript_bf16_gpu", ("geneformer_torchscript_bf16",)),
    ServedModel("geneformer_embed_onnx", "ensemble", "ensemble", "onnx_fp32_b1", ("geneformer_tokenizer", "geneformer_onnx")),
    ServedModel("geneformer_embed_onnx_fp16", "ensemble", "ensemble", "onnx_fp16_b1", ("geneformer_tokenizer", "geneformer_onnx_fp16")),
    ServedModel("geneformer_embed_onnx_int8", "ensemble", "ensemble", "onnx_int8_b1", ("geneformer_tokenizer", "geneformer_onnx_int8")),
    ServedModel("geneformer_embed_torchscript", "ensemble", "ensemble", "torchscript_fp32_b1", ("geneformer_tokenizer", "geneformer_torchscript")),
    ServedModel("geneformer_embed_torchscript_bf16", "ensemble", "ensemble", "torchscript_bf16_gpu", ("geneformer_tokenizer", "geneformer_torchscript_bf16")),
)}
# on a GPU host the same served models compare with the GPU methods
GPU_METHODS = {"geneformer_torchscript": "torchscript_fp32_gpu", "geneformer_embed_torchscript": "torchscript_fp32_gpu"}

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
    "cells_per_s", "throughput_source", "cells_per_s_perf_analyzer", "cells_per_s_littles_law", "inprocess_method",
    "inprocess_cells_per_s", "inprocess_before", "inprocess_after", "efficiency", "inprocess_cpu_s_per_cell",
    "server_cpu_s_per_cell", "cpu_efficiency", "avg_latency_ms", "p50_ms", "p90_ms",
    "p95_ms", "p99_ms", "client_send_ms", "network_ms", "server_queue_ms", "server_compute_input_ms",
    "server_compute_infer_ms", "server_compute_output_ms", "client_recv_ms", "enc_avg_batch", "enc_queue_ms",
    "enc_compute_infer_ms", "enc_compute_infer_ms_per_exec", "tok_queue_ms", "tok_compute_infer_ms",
    "server_cpu_pct_mean", "server_rss_peak_mb", "perf_analyzer_cpu_pct_mean", "system_cpu_pct_mean", "loadavg_1m",
    "gpu_util_mean", "gpu_mem_peak_mb", "wall_s", "csv", "error",
]


# ----------------------------------------------------------------------------------------------- repository
def _variant_config(text: str, source: str, target: str) -> str:
    return text.replace(f'"{source}"', f'"{target}"')


def prepare_serving_repository(source: Path, dest: Path, int8_onnx: Path | None = None,
                               torchscript_bf16: Path | None = None) -> Path:
    """``dest``: configs copied from ``source``, weights symlinked, plus the bench-made variants."""
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
    variants = []
    if int8_onnx is not None:
        variants.append(("geneformer_onnx", "geneformer_onnx_int8", "geneformer_embed_onnx", "geneformer_embed_onnx_int8",
                         int8_onnx, "model.onnx", False))
    if torchscript_bf16 is not None:  # GPU serving: the cell embedding only (no [B, L, H] tensor back)
        variants.append(("geneformer_torchscript", "geneformer_torchscript_bf16", "geneformer_embed_torchscript",
                         "geneformer_embed_torchscript_bf16", torchscript_bf16, "model.pt", True))
    for base, name, ensemble, ensemble_name, weights, filename, cell_only in variants:
        for src_model, dst_model in ((base, name), (ensemble, ensemble_name)):
            src, dst = dest / src_model, dest / dst_model
            if not src.is_dir():
                continue
            dst.mkdir()
            for config in [src / "config.pbtxt", *sorted((src / "configs").glob("*.pbtxt"))]:
                out = dst / config.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                text = _variant_config(config.read_text(), src_model, dst_model)
                if src_model == ensemble:  # the ensemble's encoder step
                    text = _variant_config(text, base, name)
                elif cell_only:
                    text = _drop_token_embeddings(text)
                out.write_text(text)
            (dst / "1").mkdir()
        (dest / name / "1" / filename).symlink_to(Path(weights).resolve())
    return dest


def _drop_token_embeddings(text: str) -> str:
    """A config declaring only the cell embedding output (the backends then return only that one)."""
    import re

    text = re.sub(r',\s*\{\s*name:\s*"token_embeddings(__1)?"[^}]*\}', "", text)
    return re.sub(r'\{\s*name:\s*"token_embeddings(__1)?"[^}]*\},\s*', "", text)


def export_torchscript_bf16(loaded, path: Path, emb_layer: int = -1) -> Path:
    """A bf16 TorchScript encoder (SDPA attention; int64 inputs, fp32 outputs) for GPU serving."""
    import copy

    import torch

    from export.torchscript_export import export_torchscript

    encoder = copy.deepcopy(loaded.encoder(emb_layer=emb_layer, attention="sdpa")).to(torch.bfloat16).eval()
    written = export_torchscript(encoder, path.parent)
    if written != path:
        os.replace(written, path)
    return path


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


def run_triton(
    models: list[str],
    ctx: BuildContext,
    method_specs: dict[str, MethodSpec],
    enc_cells: CellSet,
    full_cells: CellSet,
    out_dir: Path,
    protocols: list[str],
    concurrencies: list[int],
    passes: int = 1,
    batch_size: int = 1,
    model_config_name: str | None = "cpu",
    timeout_s: float = 1800.0,
    write_compose_input: bool = True,
    min_seconds: float = 0.0,
    http_concurrencies: list[int] | None = None,
    rows: list[dict] | None = None,
    metric_rows: list[dict] | None = None,
    backends: tuple[str, ...] = ("auto",),
) -> tuple[list[dict], list[dict], dict]:
    """Serve ``models`` from ``ctx.repository`` and measure them; returns (rows, metric rows, info).

    ``backends``: one server per entry, one after the other on the same cells and inputs (``real``: Triton's
    C++ onnxruntime/pytorch backends, ``stand-in``: the Python stand-ins, ``auto``: real when built); each
    row's ``backend`` says which served it."""
    from geneformer_triton.server import LocalTritonServer

    served = [SERVED[m] for m in models]
    if ctx.device.startswith("cuda"):
        served = [dataclasses.replace(m, method=GPU_METHODS.get(m.name, m.method)) for m in served]
    needed = sorted({m.name for m in served} | {c for m in served for c in m.composing})
    signatures = {m.signature for m in served}
    inputs = write_inputs(out_dir, enc_cells, full_cells, [batch_size], ctx.pad_id, signatures, write_compose_input)
    binary = perf.find_perf_analyzer()
    env = perf.perf_analyzer_env(ctx.work_dir / "perf_analyzer_libs")
    csv_dir = out_dir / "perf_analyzer"
    rows = [] if rows is None else rows  # filled as runs finish (a caller keeps them if interrupted)
    metric_rows = [] if metric_rows is None else metric_rows
    info = {"models": needed, "protocols": protocols, "concurrencies": concurrencies,
            "http_concurrencies": http_concurrencies or concurrencies, "batch_size": batch_size,
            "perf_analyzer": str(binary), "model_config_name": model_config_name, "backends": {}}
    # $GFTRITON_SERVER_PYTHONPATH goes first on the server's (python stubs') PYTHONPATH only: a GPU host
    # whose Python has numpy 2 gives the stubs numpy<2 there (Triton 2.51's python backend needs it)
    server_env = {}
    if os.environ.get("GFTRITON_SERVER_PYTHONPATH"):
        server_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.environ["GFTRITON_SERVER_PYTHONPATH"], os.environ.get("PYTHONPATH", "")) if p)
    for requested in backends:
        suffix = f"-{requested}" if len(backends) > 1 else ""
        _serve_and_measure(LocalTritonServer(
            ctx.repository, models=needed, model_config_name=model_config_name,
            work_dir=ctx.work_dir / f"server{suffix}", log_path=out_dir / f"tritonserver{suffix}.log",
            allow_gpu_metrics=ctx.device.startswith("cuda"), env=server_env, backends=requested),
            served, ctx, method_specs, enc_cells, full_cells, binary, env, inputs, csv_dir, protocols, concurrencies,
            http_concurrencies, passes, batch_size, timeout_s, min_seconds, rows, metric_rows, info)
    return rows, metric_rows, info


def _serve_and_measure(server, served: list[ServedModel], ctx: BuildContext, method_specs: dict[str, MethodSpec],
                       enc_cells: CellSet, full_cells: CellSet, binary: Path, env: dict, inputs: dict, csv_dir: Path,
                       protocols: list[str], concurrencies: list[int], http_concurrencies: list[int] | None,
                       passes: int, batch_size: int, timeout_s: float, min_seconds: float, rows: list[dict],
                       metric_rows: list[dict], info: dict) -> None:
    """Start ``server``, then for each served model: in-process rate, perf_analyzer runs, in-process rate."""
    started = time.perf_counter()
    with server:
        backend = server.backend_choice.kind
        info["backends"][backend] = {"server_start_s": time.perf_counter() - started,
                                     "reason": server.backend_choice.reason, "log": str(server.log_path)}
        for model in served:
            cells = full_cells if model.kind == "ensemble" else enc_cells

            def inprocess_now() -> tuple[float, float]:
                if model.method not in method_specs:
                    return float("nan"), float("nan")
                LOGGER.info("in-process %s on the same %d cells (for %s)", model.method, len(cells), model.name)
                row, _ = measure_method(method_specs[model.method], ctx, cells, _arch(ctx))
                return (float("nan"), float("nan")) if row["error"] else (row["cells_per_s"], row["cpu_s_per_cell"])

            # the same backend in process right before and right after this model's runs (the mean is the
            # reference: drift in what else runs on the machine then affects both sides alike)
            before = inprocess_now()
            # every run sends each cell the same number of times; at least ~min_seconds of work, since
            # perf_analyzer measures its window in whole seconds
            rounds = passes
            if min_seconds and before[0] == before[0] and before[0] > 0:
                rounds = max(passes, int(np.ceil(min_seconds * before[0] / len(cells))))
            request_count = max(len(cells) * rounds // batch_size, 1)
            model_rows = []
            for protocol in protocols:
                url = server.grpc_url if protocol == "grpc" else server.http_url
                for concurrency in (http_concurrencies or concurrencies) if protocol == "http" else concurrencies:
                    model_rows.append(_one_run(model, backend, server, binary, env, url, protocol, concurrency, batch_size,
                                               max(request_count, concurrency * 2), inputs[(model.signature, batch_size)],
                                               csv_dir, cells, before[0], timeout_s, metric_rows))
            rows.extend(model_rows)
            after = inprocess_now()
            for row in model_rows:
                _set_efficiency(row, before, after)


def _arch(ctx: BuildContext):
    from bench.cells import Architecture

    return Architecture.from_config(ctx.loaded.config)


def _one_run(model: ServedModel, backend: str, server, binary: Path, env: dict, url: str, protocol: str, concurrency: int,
             batch_size: int, request_count: int, input_data: Path, csv_dir: Path, cells: CellSet, inprocess: float,
             timeout_s: float, metric_rows: list[dict]) -> dict:
    row = {c: float("nan") for c in TRITON_COLUMNS}
    row.update(model=model.name, kind=model.kind, backend=backend, protocol=protocol, concurrency=concurrency, batch_size=batch_size,
               request_count=request_count, n_cells=len(cells), tokens_mean=float(cells.lengths.mean()),
               inprocess_method=model.method, inprocess_cells_per_s=inprocess, error="")
    stem = f"{model.name}_{backend}_{protocol}_c{concurrency}_b{batch_size}"
    csv_path = csv_dir / f"{stem}.csv"
    command = perf.perf_analyzer_command(binary, model.name, url, protocol, input_data, concurrency, request_count,
                                         csv_path, batch_size)
    LOGGER.info("perf_analyzer %s %s concurrency %d batch %d: %d requests", model.name, protocol, concurrency,
                batch_size, request_count)
    try:
        before = triton_metrics.scrape(server.metrics_url)
        pa_sampler = ResourceSampler(pids=[], include_children=False, gpu=False)
        started = time.perf_counter()
        with ResourceSampler(pids=[server.pid]) as server_sampler, pa_sampler:
            code, tail = perf.run_perf_analyzer(command, env, timeout_s, csv_dir / f"{stem}.log", on_start=pa_sampler.watch)
        row["wall_s"] = time.perf_counter() - started
        after = triton_metrics.scrape(server.metrics_url)
        if code != 0 or not csv_path.is_file():
            raise RuntimeError(f"perf_analyzer exit {code}: {tail[-600:]}")
        parsed = perf.parse_csv(csv_path)
        row["cells_per_s_perf_analyzer"] = parsed["infer_per_s"]
        for name in ("p50", "p90", "p95", "p99"):
            row[f"{name}_ms"] = parsed.get(f"{name}_us", float("nan")) / 1e3
        row["avg_latency_ms"] = parsed.get("avg_latency_us", float("nan")) / 1e3
        # Little's law (closed loop, `concurrency` requests always in flight): a check on perf_analyzer's
        # figure, whose measurement window is counted in whole seconds
        row["cells_per_s_littles_law"] = concurrency * batch_size / (row["avg_latency_ms"] / 1e3)
        select_throughput(row)
        for name in ("client_send", "network", "server_queue", "server_compute_input", "server_compute_infer",
                     "server_compute_output", "client_recv"):
            row[f"{name}_ms"] = parsed.get(f"{name}_us", float("nan")) / 1e3
        row["csv"] = str(csv_path.relative_to(csv_dir.parent))
        for name in model.composing:
            parts = triton_metrics.breakdown(before, after, name)
            metric_rows.append({"model": model.name, "backend": backend, "composing_model": name, "protocol": protocol,
                                "concurrency": concurrency, "batch_size": batch_size, **parts})
            prefix = "tok_" if name == "geneformer_tokenizer" else "enc_"
            for key in ("avg_batch", "queue_ms", "compute_infer_ms", "compute_infer_ms_per_exec"):
                if f"{prefix}{key}" in row:
                    row[f"{prefix}{key}"] = parts[key]
        gauges = triton_metrics.gauges(after)
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
    LOGGER.info("  %s %s c%d: %.2f cells/s (in-process before %.2f)", model.name, protocol, concurrency,
                row["cells_per_s"], inprocess)
    return row


def _mean(*values: float) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else float("nan")


def _set_efficiency(row: dict, before: tuple[float, float], after: tuple[float, float]) -> None:
    """efficiency = Triton cells/s over the in-process cells/s (mean of before and after); cpu_efficiency =
    in-process CPU seconds per cell over the server's (tritonserver + stubs) CPU seconds per cell."""
    rate = _mean(before[0], after[0])
    row.update(inprocess_cells_per_s=rate, inprocess_before=before[0], inprocess_after=after[0])
    row["efficiency"] = row["cells_per_s"] / rate if rate == rate and rate > 0 else float("nan")
    cpu = _mean(before[1], after[1])
    server_cpu = row["server_cpu_pct_mean"] / 100.0 / row["cells_per_s"] if row["cells_per_s"] == row["cells_per_s"] and row["cells_per_s"] > 0 else float("nan")
    row["inprocess_cpu_s_per_cell"] = cpu
    row["server_cpu_s_per_cell"] = server_cpu
    row["cpu_efficiency"] = cpu / server_cpu if cpu == cpu and server_cpu == server_cpu and server_cpu > 0 else float("nan")
    LOGGER.info("  %s %s c%d: efficiency %.2f (in-process %.2f -> %.2f), CPU-time efficiency %.2f", row["model"],
                row["protocol"], row["concurrency"], row["efficiency"], before[0], after[0], row["cpu_efficiency"])
