"""``gftriton bench``: in-process methods vs the baselines, through Triton, scaling; results + report.

    gftriton bench --mode quick                 # CI: a handful of cells, every stage, < 3 minutes
    gftriton bench --mode full                  # CPU figures: 60 real cells, all methods, Triton sweep, scaling
    gftriton bench --mode gpu                   # on a GPU host (bench/gpu.sh): < 8 minutes
    gftriton bench --perf-input-only            # just bench/data/perf_input.json for docker-compose's sdk
    python -m geneformer_triton.bench.cli --mode quick --out /tmp/bench

Results: ``bench/results/<date>-<host>[-mode]/`` (``--out``): see ``geneformer_triton.bench.report``. The exported model
repository (unless ``--repository``: every variant of ``geneformer_triton.core.contract.EXPORTED_VARIANTS``) and the serving repository live in
``--work-dir`` (default: ``$GFTRITON_DATA_DIR/bench_work/<model>-<weights hash>``, reused across runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from geneformer_triton.bench.triton_bench import TritonRunOptions

from geneformer_triton.core.contract import EXPORTED_VARIANTS, TOKENIZER_MODEL

LOGGER = logging.getLogger("bench")


@dataclass
class ModeConfig:
    n_cells: int
    max_length: int | None
    methods: list[str] | None  # None: every method of the device's catalogue
    repeats: int
    triton_models: list[str]
    protocols: list[str]
    concurrencies: list[int]  # gRPC sweep
    triton_cells: int  # the first N benchmark cells go through Triton
    triton_passes: int  # requests per run = cells x passes (at least ~triton_min_s of work)
    triton_batch: int = 1
    http_concurrencies: list[int] | None = None  # HTTP sweep (default: the gRPC one)
    triton_min_s: float = 0.0
    scaling_methods: list[str] = field(default_factory=list)
    cells_sweep: list[int] = field(default_factory=list)
    length_sweep: list[int] = field(default_factory=list)
    length_cells: int = 8
    batch_sweep: list[int] = field(default_factory=list)
    batch_cells: int = 16
    min_length: int = 0  # only cells with at least this many tokens (GPU: 512-2,048-token cells)
    device: str = "cpu"
    export_formats: tuple[str, ...] = ("onnx", "onnx_fp16", "onnx_int8", "onnx_packed", "onnx_int8_packed",
                                       "torchscript", "torchscript_bf16")
    headline_model: str = "geneformer_embed_onnx_int8"  # the served path the report leads with (declared here)
    headline_protocol: str = "grpc"
    client_protocols: tuple[str, ...] = ("grpc",)  # also measured through the project's client (concurrency 2)
    triton_backends: tuple[str, ...] = ("auto",)  # real C++ backends when built (--triton-backends real,stand-in)


MODES = {
    "quick": ModeConfig(
        n_cells=8, max_length=512,
        methods=["baseline_eager_fp32_b10", "torch_fp32_sorted", "torchscript_fp32_b1", "onnx_fp32_b1", "onnx_int8_b1"],
        repeats=3, triton_models=["geneformer_onnx_int8", "geneformer_embed_onnx_int8"], protocols=["grpc", "http"],
        concurrencies=[2], triton_cells=8, triton_passes=1,
        scaling_methods=["onnx_fp32_b1"], cells_sweep=[4, 8], length_sweep=[128, 256, 512], length_cells=4,
        batch_sweep=[1, 4], batch_cells=8, export_formats=("onnx", "onnx_int8", "torchscript"),
    ),
    # bounded to ~40 min on 2 cores: every CPU method that has a served twin, both baselines, the packed
    # (ragged) models beside the padded ones; concurrency 8 on 2 cores only measured queueing, left out
    "full": ModeConfig(
        n_cells=24, max_length=None, repeats=3,
        methods=["baseline_eager_fp32_b10", "helical_get_embeddings", "torch_fp32_sorted", "torch_fp32_b1", "torch_bf16_b1",
                 "torchscript_fp32_b1", "torchscript_bf16_b1", "onnx_fp32_b1", "onnx_int8_b1", "onnx_packed_fp32_b1",
                 "onnx_packed_int8_b1"],
        triton_models=["geneformer_embed_onnx_int8", "geneformer_onnx_int8", "geneformer_embed_onnx_int8_packed",
                       "geneformer_onnx_int8_packed", "geneformer_embed_onnx", "geneformer_onnx", "geneformer_onnx_packed",
                       "geneformer_torchscript", "geneformer_torchscript_bf16"],
        protocols=["grpc", "http"], concurrencies=[1, 2, 4], http_concurrencies=[2], triton_cells=24,
        triton_passes=1, triton_min_s=6.0,
        scaling_methods=["onnx_int8_b1"], cells_sweep=[100, 300],
        length_sweep=[128, 256, 512, 1024, 2048], length_cells=16, batch_sweep=[1, 2, 4, 8, 16], batch_cells=24,
        export_formats=("onnx", "onnx_int8", "onnx_packed", "onnx_int8_packed", "torchscript", "torchscript_bf16"),
    ),
    "gpu": ModeConfig(
        n_cells=2048, max_length=None, methods=None, repeats=3,
        triton_models=["geneformer_torchscript_bf16", "geneformer_torchscript", "geneformer_embed_torchscript_bf16"],
        protocols=["grpc", "http"], concurrencies=[2, 8, 16], http_concurrencies=[8], triton_cells=512, triton_passes=2,
        triton_batch=32,
        triton_min_s=5.0,
        scaling_methods=["torch_bf16_packed", "torch_bf16_sorted"], cells_sweep=[100, 1000, 10000],
        length_sweep=[256, 512, 1024, 2048], length_cells=1024, batch_sweep=[8, 32, 128, 512], batch_cells=2048,
        min_length=512, device="cuda", export_formats=("torchscript", "torchscript_bf16"),
        headline_model="geneformer_embed_torchscript_bf16",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: baselines vs every backend, in process and through Triton; report")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from geneformer_triton.model.args import add_model_arguments

    add_model_arguments(parser)
    parser.set_defaults(random_weights=True)  # cost and fidelity do not depend on the weights' values
    parser.add_argument("--mode", choices=sorted(MODES), default="quick", help="quick (CI), full (CPU figures), gpu")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<host>[-mode])")
    parser.add_argument("--work-dir", type=Path, help="exports and serving repository (reused across runs)")
    parser.add_argument("--repository", type=Path, help="an exported model repository to use (weights must match the model)")
    parser.add_argument("--cells", type=int, help="number of real cells (default: the mode's)")
    parser.add_argument("--max-length", type=int, help="truncate cells to this many tokens")
    parser.add_argument("--methods", help="comma list of in-process methods (default: the mode's)")
    parser.add_argument("--repeats", type=int, help="timed runs per method and per served point (median with min-max reported; default: the mode's)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads in process (0: runtime default)")
    parser.add_argument("--triton-models", help="comma list of served models (default: the mode's)")
    parser.add_argument("--concurrency", help="comma list of perf_analyzer concurrencies (default: the mode's)")
    parser.add_argument("--protocols", help="comma list: grpc,http")
    parser.add_argument("--triton-backends", help="comma list of served backends, one server each, same cells: "
                        "real (Triton's C++ onnxruntime/pytorch), stand-in (Python), auto (default: real when built)")
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-helical", action="store_true", help="leave out helical's own get_embeddings")
    parser.add_argument("--plan-only", action="store_true",
                        help="check and print the mode's plan (methods, served models, exports) without running: "
                             "bench/gpu.sh --dry-run uses it on a CPU machine")
    parser.add_argument("--perf-input-only", action="store_true",
                        help="only write bench/data/perf_input.json (real cells) for docker-compose's sdk service")


def _csv(text: str | None, cast=str) -> list | None:
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else None


def load_model(args: argparse.Namespace):
    from geneformer_triton.bench.cells import default_dictionaries
    from geneformer_triton.model.args import load_model_from_args
    from geneformer_triton.model.specs import MODEL_SPECS

    if not args.dictionaries and not args.vocabulary_from_sample:
        spec = MODEL_SPECS.get(str(args.model))
        folder = default_dictionaries(spec.dictionary_version if spec else "v1")
        if folder is not None:
            args.dictionaries = str(folder)
    return load_model_from_args(args)


def _default_work_dir(loaded) -> Path:
    from geneformer_triton.bench.cells import data_cache_dir

    return data_cache_dir() / "bench_work" / f"{loaded.name}-{loaded.weights_sha256[:12]}"


def _repository_matches(repository: Path, loaded, formats) -> list[str]:
    """Formats whose export in ``repository`` is missing or from other weights."""
    stale = []
    for name in formats:
        manifest = repository / EXPORTED_VARIANTS[name].model / "1" / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("weights_sha256") != loaded.weights_sha256:
            stale.append(name)
    if not (repository / TOKENIZER_MODEL / "1" / "token_dictionary.json").is_file():
        stale.append("tokenizer")
    return stale


def prepare_repository(args: argparse.Namespace, loaded, work_dir: Path, formats) -> Path:
    """The repository to benchmark: ``--repository`` if its exports match the model, else our own export."""
    import shutil

    from geneformer_triton.export.repository import copy_python_models, export_model_repository

    if args.repository is not None:
        stale = _repository_matches(args.repository, loaded, formats)
        if not stale:
            return args.repository.resolve()
        LOGGER.warning("%s: %s missing or exported from other weights; exporting into the work folder", args.repository, stale)
    repository = work_dir / "export"
    source = Path(__file__).resolve().parents[1] / "model_repository"
    stale = _repository_matches(repository, loaded, formats) if repository.is_dir() else list(formats)
    if not stale:  # the weights match; the python models' code may not
        for path in copy_python_models(repository):
            LOGGER.info("refreshed %s in the reused export (the installed copy changed)", path.relative_to(repository))
    else:
        if repository.exists():
            shutil.rmtree(repository)
        shutil.copytree(source, repository, ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "__pycache__"))
        started = time.perf_counter()
        export_model_repository(loaded, repository, [f for f in formats], emb_layer=-1)
        LOGGER.info("exported %s into %s in %.0f s", ",".join(formats), repository, time.perf_counter() - started)
    return repository


def mode_plan(mode: str) -> dict:
    """What ``mode`` runs, resolved against the catalogues (ValueError naming what is unknown)."""
    from geneformer_triton.bench.methods import cpu_methods, gpu_methods, select
    from geneformer_triton.bench.triton_bench import SERVED, inprocess_method

    cfg = MODES[mode]
    catalogue = cpu_methods() if cfg.device == "cpu" else gpu_methods()
    specs = select(catalogue, cfg.methods)
    select(catalogue, cfg.scaling_methods)
    unknown = [m for m in cfg.triton_models if m not in SERVED]
    unknown += [f for f in cfg.export_formats if f not in EXPORTED_VARIANTS]
    if unknown:
        raise ValueError(f"mode {mode}: unknown served models or export formats {unknown}")
    served = {m: inprocess_method(SERVED[m], cfg.device) for m in cfg.triton_models}
    names = {s.name for s in catalogue}
    missing = sorted({method for method in served.values() if method not in names})
    if missing:
        raise ValueError(f"mode {mode}: served models compare with methods not in the catalogue: {missing}")
    exported = {EXPORTED_VARIANTS[f].model for f in cfg.export_formats}
    needed = {c for m in cfg.triton_models for c in SERVED[m].composing if c != TOKENIZER_MODEL}
    if needed - exported:
        raise ValueError(f"mode {mode}: served models need exports not in export_formats: {sorted(needed - exported)}")
    return {"mode": mode, "device": cfg.device, "methods": [s.name for s in specs], "scaling": cfg.scaling_methods,
            "served": served, "exports": list(cfg.export_formats), "headline": cfg.headline_model,
            "repeats": cfg.repeats}


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    from geneformer_triton.bench import report
    from geneformer_triton.bench.cells import Architecture, real_cells, sample_cells
    from geneformer_triton.bench.methods import BuildContext, cpu_methods, gpu_methods, helical_python, select
    from geneformer_triton.bench.scaling import resample

    started = time.perf_counter()
    cfg = MODES[args.mode]
    if args.plan_only:
        print(json.dumps(mode_plan(args.mode), indent=1))
        return 0
    loaded = load_model(args)
    vocabulary = loaded.vocabulary
    input_size = loaded.input_size
    arch = Architecture.from_config(loaded.config)
    n_cells = args.cells or cfg.n_cells
    max_length = args.max_length if args.max_length is not None else cfg.max_length

    pool = sample_cells(vocabulary, input_size, loaded.special_tokens)  # the whole sample, untruncated
    if args.perf_input_only:
        from geneformer_triton.bench import perf

        cells = pool.select(range(min(n_cells, len(pool))))
        path = perf.write_json(perf.encoder_input_data(cells.tokens, "onnx", 1, vocabulary.pad_id), perf.COMPOSE_INPUT)
        LOGGER.info("wrote %s (%d real cells)", path, len(cells))
        return 0
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--mode gpu needs a CUDA device (torch sees none)")
    if cfg.min_length:
        pool = pool.at_least(cfg.min_length)
    full = resample(pool, n_cells) if (cfg.min_length or n_cells > len(pool)) else real_cells(vocabulary, n_cells, input_size, loaded.special_tokens)
    cells = full.truncate(max_length) if max_length else full

    out_dir = args.out or report.default_out_dir(args.mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = (args.work_dir or _default_work_dir(loaded)).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "mode": args.mode,
        "environment": report.environment(),
        "model": {"name": loaded.name, "source": loaded.source, "random_weights": loaded.random_weights,
                  "weights_sha256": loaded.weights_sha256},
        "cells": cells.describe(),
        "flops_formula": arch.formula(),
        "config": {k: v for k, v in cfg.__dict__.items()},
        "inprocess": [], "triton": [], "triton_metrics": [], "scaling": [],
    }

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        report.write_results(out_dir, results)

    # a stage that is skipped keeps the figures an earlier run left in the same folder
    kept = report.load_tables(out_dir)
    for stage, skipped in (("inprocess", args.skip_inprocess), ("triton", args.skip_triton), ("scaling", args.skip_scaling)):
        if skipped and kept.get(stage):
            results[stage] = kept[stage]
            if stage == "triton":
                results["triton_metrics"] = kept.get("triton_metrics", [])
                results["triton_info"] = kept.get("triton_info", {})
            if stage == "inprocess":
                from geneformer_triton.bench.inprocess import add_ratios

                add_ratios(results["inprocess"])
            LOGGER.info("keeping the %s figures already in %s", stage, out_dir)
    signal.signal(signal.SIGTERM, _terminate)  # `timeout` (bench/gpu.sh): stop the server, keep what was measured

    repository = prepare_repository(args, loaded, work_dir, cfg.export_formats)
    ctx = BuildContext(loaded, repository, work_dir, cfg.device, args.threads)
    catalogue = cpu_methods() if cfg.device == "cpu" else gpu_methods()
    names = _csv(args.methods) or cfg.methods
    specs = select(catalogue, names)
    if (args.skip_helical or helical_python() is None or max_length) and any(s.backend == "helical" for s in specs):
        LOGGER.info("helical's own path left out (%s)", "asked" if args.skip_helical else
                    "no helical venv: set GFTRITON_HELICAL_PYTHON" if helical_python() is None else "cells are truncated")
        specs = [s for s in specs if s.backend != "helical"]

    # the serving repository: the source's configs with its exported weights linked
    from geneformer_triton.bench.triton_bench import prepare_serving_repository

    triton_models = _csv(args.triton_models) or cfg.triton_models
    serving = prepare_serving_repository(repository, work_dir / "repository")
    ctx.repository = serving
    results["repository"] = {"source": str(repository), "serving": str(serving)}

    try:
        _stages(BenchRun(args=args, cfg=cfg, ctx=ctx, catalogue=catalogue, specs=specs, cells=cells, full=full,
                         pool=pool, arch=arch, out_dir=out_dir, results=results, save=save, triton_models=triton_models,
                         max_length=max_length, input_size=input_size))
    except KeyboardInterrupt:
        from geneformer_triton.bench.inprocess import add_ratios

        LOGGER.warning("interrupted: writing what was measured")
        add_ratios(results["inprocess"])
        save()
        return 130
    save()
    summary = json.loads((out_dir / "summary.json").read_text())
    for target in summary.get("targets", []):
        LOGGER.info("%s %s: %s", "MET " if target["passed"] else "MISS", target["target"], target["value"])
    LOGGER.info("report: %s (%.0f s)", out_dir / "report.md", time.perf_counter() - started)
    return 0


@dataclass
class BenchRun:
    """One ``gftriton bench`` run as its stages see it: the options (``args``, mode ``cfg``), the build
    context of the methods, the method catalogue and the selected in-process ``specs``, the cells
    (``cells`` truncated to ``max_length``, ``full`` untruncated, ``pool`` the whole sample), the model's
    ``arch`` and ``input_size``, the served ``triton_models``, and where results go (``results``,
    written by ``save`` into ``out_dir``)."""

    args: argparse.Namespace
    cfg: ModeConfig
    ctx: Any
    catalogue: list
    specs: list
    cells: Any
    full: Any
    pool: Any
    arch: Any
    out_dir: Path
    results: dict
    save: Callable[[], None]
    triton_models: list[str]
    max_length: int | None
    input_size: int

    @property
    def repeats(self) -> int:
        return self.args.repeats or self.cfg.repeats


def _inprocess_stage(run: BenchRun) -> None:
    from geneformer_triton.bench.inprocess import run_inprocess

    run.results["inprocess"] = []
    rows, _ = run_inprocess(run.specs, run.ctx, run.cells, run.arch, run.repeats, on_row=run.results["inprocess"].append)
    run.results["inprocess"] = rows
    run.save()


def triton_options(args: argparse.Namespace, cfg: ModeConfig) -> "TritonRunOptions":
    """The Triton stage's options: the command line's, else the mode's."""
    from geneformer_triton.bench.triton_bench import TritonRunOptions

    return TritonRunOptions(
        protocols=_csv(args.protocols) or cfg.protocols, concurrencies=_csv(args.concurrency, int) or cfg.concurrencies,
        http_concurrencies=_csv(args.concurrency, int) or cfg.http_concurrencies, passes=cfg.triton_passes,
        batch_size=cfg.triton_batch, model_config_name="gpu" if cfg.device == "cuda" else "cpu",
        min_seconds=cfg.triton_min_s, write_compose_input=args.mode == "full", repeats=args.repeats or cfg.repeats,
        client_protocols=tuple(cfg.client_protocols), backends=tuple(_csv(args.triton_backends) or cfg.triton_backends))


def _triton_stage(run: BenchRun) -> None:
    from geneformer_triton.bench.triton_bench import TritonResults, run_triton

    by_name = {s.name: s for s in run.catalogue}
    triton_cells = run.cells.select(range(min(run.cfg.triton_cells, len(run.cells))))
    triton_full = run.full.select(range(min(run.cfg.triton_cells, len(run.full))))
    run.results.update(triton=[], triton_metrics=[])
    measured = run_triton(run.triton_models, run.ctx, by_name, (triton_cells, triton_full), run.out_dir,
                          triton_options(run.args, run.cfg),
                          TritonResults(rows=run.results["triton"], metric_rows=run.results["triton_metrics"]))
    run.results.update(triton=measured.rows, triton_metrics=measured.metric_rows, triton_info=measured.info)
    run.save()


def _scaling_stage(run: BenchRun) -> None:
    from geneformer_triton.bench.methods import select
    from geneformer_triton.bench.scaling import run_scaling

    cfg = run.cfg
    scaling_pool = run.pool.truncate(run.max_length) if run.max_length else run.pool
    run.results["scaling"] = []
    run_scaling(run.ctx, scaling_pool, run.arch, select(run.catalogue, cfg.scaling_methods), cfg.cells_sweep,
                [L for L in cfg.length_sweep if L <= (run.max_length or run.input_size)],
                cfg.length_cells, cfg.batch_sweep, cfg.batch_cells, rows=run.results["scaling"])


def _stages(run: BenchRun) -> None:
    """The stages the options leave in: in process, through Triton, scaling."""
    if not run.args.skip_inprocess:
        _inprocess_stage(run)
    if not run.args.skip_triton and run.triton_models:
        _triton_stage(run)
    if not run.args.skip_scaling and run.cfg.scaling_methods:
        _scaling_stage(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.bench.cli", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
