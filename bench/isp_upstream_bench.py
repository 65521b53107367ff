"""ISP benchmark against upstream Geneformer itself: ``InSilicoPerturber`` vs our in-process core vs Triton.

Same run, same real cells, same checkpoint, same numbers:

* cells: real celltypist cells tokenized with our (helical-identical) tokenizer and the V1 dictionaries;
  ``--mode cpu``: for each ``--lengths`` target the sample cell whose full length is closest (untruncated);
  ``--mode quick``: the first ``--quick-cells`` (1) cells cut to their top ``--quick-length`` (64) ranked genes;
* checkpoint: ``gf-6L-10M-i2048`` with seeded random weights (``--seed``), written with
  ``save_pretrained`` (:func:`geneformer_triton.export.checkpoint.save_checkpoint`); upstream loads it as
  ``BertForMaskedLM``, our in-process method loads the same folder, the served encoder is exported from it;
* perturbation: delete all, ``emb_layer=-1`` (upstream's default), ``emb_mode`` ``cell`` and ``cell_and_gene``.

Methods (each in its own process, running the emb modes one after the other; the peak RSS of its process
tree is sampled with psutil and attributed to the emb mode running at the time, :mod:`geneformer_triton.bench.proc_memory`):

* ``upstream``: upstream's unmodified ``InSilicoPerturber`` via the oracle runner
  ``../shared/reference/oracle/run_oracle.py`` (CPU shim without CUDA) in helical's venv + the oracle overlay
  (``tests/oracle_env.py``), or in ``$GFTRITON_UPSTREAM_PYTHON`` (a Python with upstream's own pins, e.g. on
  a GPU host), repeats in one process (:mod:`geneformer_triton.bench.upstream_driver`); perturbations/s
  is upstream's own ``perturb_data`` timing (model loading included, interpreter start-up not);
  forward batch 100 (upstream's default) up to ``--full-batch-max-length`` tokens, else ``--long-batch``;
* ``inprocess``: our numpy planner/reducer with upstream semantics over the PyTorch fp32 encoder
  (:mod:`geneformer_triton.bench.isp_worker`);
* ``served``: ``geneformer_triton.client.isp_run.run_isp`` (what ``gftriton isp`` runs) against a real local tritonserver
  (``geneformer_isp`` -> ``geneformer_onnx_isp``); the report records which onnxruntime backend served.

Every method's values are compared with upstream's of the same ``emb_mode`` (max abs diff of the
``cell_emb`` shifts and, for ``cell_and_gene``, of the gene cosines; identical key sets); a method that
does not agree within ``--atol`` fails the run (exit 1), so speed is only compared at equal numbers.
Medians of ``--repeats`` (>= 3) repeats, min-max shown. Results (``--out``, default
``bench/results/<date>-<host>/isp`` for ``cpu``): ``isp_upstream.csv``, ``isp_upstream.json``,
``report.md``, ``isp_upstream.png``.

    python -m geneformer_triton.bench.isp_upstream_bench --mode quick --out /tmp/q     # 1 cell x 64 tokens, ~1 minute
    python -m geneformer_triton.bench.isp_upstream_bench --mode cpu                    # one ~500-token cell (~10 minutes)
    python -m geneformer_triton.bench.isp_upstream_bench --mode cpu --lengths 500,1000 # longer (upstream ~4/s at 1,000 tokens)
    bash bench/gpu_isp.sh --upstream [--dry-run]                     # GPU host: 2,048-token cell, on CUDA
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from geneformer_triton.bench.proc_memory import TreeMemorySampler

LOGGER = logging.getLogger("bench.isp_upstream")
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "gf-6L-10M-i2048"
METHODS = ("upstream", "inprocess", "served")
EMB_MODES = ("cell", "cell_and_gene")
UPSTREAM_DEFAULT_BATCH = 100
#: per-mode defaults (command-line options override them)
MODES = {
    "quick": {},
    "cpu": {"lengths": (500,)},
    # GPU hosts (bench/gpu_isp.sh --upstream): one 2,048-token cell, upstream at its default batch 100
    # (H100/H200 memory holds its attention maps), ours in process on CUDA (no GPU onnxruntime: not served)
    "gpu": {"lengths": (2048,), "device": "cuda", "full_batch_max_length": 2048, "methods": ("upstream", "inprocess"),
            "max_tokens": 131072, "max_batch": 64},
}


@dataclass(frozen=True)
class BenchOptions:
    """What to run; ``mode`` fills the cell selection (``lengths`` for cpu, ``quick_*`` for quick)."""

    mode: str = "quick"
    lengths: tuple[int, ...] = (500,)
    quick_cells: int = 1
    quick_length: int = 64
    repeats: int = 3
    emb_modes: tuple[str, ...] = EMB_MODES
    methods: tuple[str, ...] = METHODS
    emb_layer: int = -1  # upstream's convention (its default)
    our_emb_layer: Optional[int] = None  # negative control only: give our side another layer
    seed: int = 0
    full_batch_max_length: int = 600  # forward batch 100 above this needs > 7 GB (attention maps)
    long_batch: int = 20
    max_tokens: int = 32768  # our chunking (the served model's max_tokens_per_batch)
    max_batch: int = 64  # the ONNX encoder's max_batch_size
    concurrency: int = 2
    threads: int = 2
    atol: float = 1e-5
    timeout_s: float = 3600.0
    device: str = "cpu"  # ours in process (and upstream, which uses CUDA by itself where there is one)
    cells_file: Optional[str] = None  # token cells from `geneformer_triton.bench.isp_bench --prepare-cells` (hosts without the data)
    dry_run: bool = False  # prepare everything, print each method's command, run nothing
    out: Optional[str] = None
    work: Optional[str] = None
    dictionaries: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SystemExit(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.repeats < 3:
            raise SystemExit(f"--repeats must be >= 3 (medians of at least 3 repeats), got {self.repeats}")
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.emb_modes) - set(EMB_MODES))
        if unknown:
            raise SystemExit(f"unknown methods / emb modes {unknown}; choose from {METHODS} and {EMB_MODES}")


@dataclass
class BenchCell:
    """One benchmarked cell: ``tokens`` (V1 ids, rank order), where it came from."""

    name: str
    tokens: np.ndarray
    sample_index: int
    full_length: int

    def describe(self) -> dict:
        return {"name": self.name, "sample_index": self.sample_index, "tokens": int(self.tokens.size),
                "full_length": self.full_length}


@dataclass
class MethodResult:
    """One method x emb_mode: per-repeat seconds, perturbations/s, peak memory and agreement with upstream."""

    method: str
    emb_mode: str
    description: str
    perturbations: int
    seconds: list[float]
    peak_rss_mib: float
    max_abs_diff_cell_emb: float = float("nan")
    max_abs_diff_gene_cos: float = float("nan")
    compared_values: int = 0
    agrees: Optional[bool] = None
    details: dict = field(default_factory=dict)

    @property
    def rates(self) -> np.ndarray:
        return self.perturbations / np.asarray(self.seconds, dtype=np.float64)

    def summary(self) -> dict:
        rates = self.rates
        return {
            "method": self.method, "emb_mode": self.emb_mode, "perturbations": self.perturbations,
            "repeats": len(self.seconds), "median_s": float(np.median(self.seconds)),
            "min_s": float(np.min(self.seconds)), "max_s": float(np.max(self.seconds)),
            "median_perturbations_per_s": float(np.median(rates)), "min_perturbations_per_s": float(rates.min()),
            "max_perturbations_per_s": float(rates.max()), "peak_rss_mib": self.peak_rss_mib,
            "max_abs_diff_cell_emb": self.max_abs_diff_cell_emb, "max_abs_diff_gene_cos": self.max_abs_diff_gene_cos,
            "compared_values": self.compared_values, "agrees_with_upstream": self.agrees,
        }


# ----------------------------------------------------------------------------- cells, checkpoint


def shared_dir() -> Path:
    return Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))


def default_dictionaries() -> Path:
    return shared_dir() / "geneformer" / "v1"


def select_cells(vocabulary, options: BenchOptions) -> list[BenchCell]:
    """Real celltypist cells (first 160 of the sample, or ``cells_file``), see the module docstring."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    if options.cells_file:
        with np.load(options.cells_file) as data:
            cells = [t[:n].astype(np.int64) for t, n in zip(data["tokens"], data["lengths"])]
    else:
        rows = 16 if options.mode == "quick" else 160
        adata = load_celltypist_sample(n_cells=rows, symbol_to_ensembl=vocabulary.gene_name_to_id)
        tokenizer = RankValueTokenizer(vocabulary, 2048, False)
        cells = tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())
    if options.mode == "quick":
        long_enough = [i for i, c in enumerate(cells) if len(c) >= options.quick_length][: options.quick_cells]
        return [BenchCell(f"celltypist_{i}_top{options.quick_length}", np.asarray(cells[i][: options.quick_length]),
                          i, len(cells[i])) for i in long_enough]
    lengths = np.array([len(c) for c in cells])
    source = "cells_file" if options.cells_file else "celltypist"
    chosen = []
    for target in options.lengths:
        i = int(np.argmin(np.abs(lengths - target)))  # first of equally close cells
        chosen.append(BenchCell(f"{source}_{i}", np.asarray(cells[i]), i, int(lengths[i])))
    return chosen


def prepare_checkpoint(vocabulary, folder: Path, seed: int) -> Path:
    """The seeded random checkpoint both sides load (``save_pretrained``: config.json + model.safetensors)."""
    from geneformer_triton.export.checkpoint import save_checkpoint
    from geneformer_triton.model.loading import random_geneformer

    return save_checkpoint(random_geneformer(MODEL_NAME, seed=seed, vocabulary=vocabulary), folder)


def export_repository(checkpoint: Path, folder: Path) -> Path:
    """A copy of ``model_repository/`` with the ISP encoders at upstream's emb_layer -1 exported
    (``geneformer_onnx_isp`` and ``geneformer_onnx_isp_reduced``, which geneformer_isp prefers)."""
    from geneformer_triton.export.repository import export_model_repository
    from geneformer_triton.model.loading import load_checkpoint

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(REPO_ROOT / "model_repository", folder,
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "__pycache__"))
    export_model_repository(load_checkpoint(checkpoint), folder, formats=["onnx_isp", "onnx_isp_reduced"])
    return folder


def upstream_batch(cells: list[BenchCell], options: BenchOptions) -> int:
    longest = max(c.tokens.size for c in cells)
    return UPSTREAM_DEFAULT_BATCH if longest <= options.full_batch_max_length else options.long_batch


# ----------------------------------------------------------------------------- running methods


@dataclass(frozen=True)
class MethodRun:
    """A method's process: ``command`` run with ``env``; plan, log, phase file and outputs live in ``folder``."""

    method: str
    emb_modes: tuple[str, ...]
    emb_layer: int
    command: list[str]
    env: dict
    folder: Path

    def shell(self) -> str:
        keys = [k for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in self.env]
        return " ".join([*(f"{k}={self.env[k]}" for k in keys), *self.command])

    def execute(self, timeout_s: float) -> TreeMemorySampler:
        """Run to completion; the returned sampler holds the peak RSS per emb_mode (phase)."""
        return run_sampled(self.command, self.env, self.folder / "run.log", timeout_s, self.folder / "phase")


def run_sampled(command: list[str], env: dict, log_path: Path, timeout_s: float,
                phase_file: Optional[Path] = None) -> TreeMemorySampler:
    """Run ``command`` to completion, sampling its process tree's RSS; raises on failure or timeout."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        with TreeMemorySampler(process.pid, phase_file=phase_file) as sampler:
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise RuntimeError(f"{command[:3]} ran past {timeout_s:.0f} s; log: {log_path}") from None
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} failed with exit code {code} (log {log_path}):\n{tail}")
    return sampler


def upstream_run(context: "BenchContext") -> MethodRun:
    """Plan upstream's InSilicoPerturber: every emb_mode x ``options.repeats`` in one process."""
    from tests.oracle_env import helical_python, oracle_environment

    options = context.options
    folder = context.work / "upstream"
    folder.mkdir(parents=True, exist_ok=True)
    batch = upstream_batch(context.cells, options)
    runs = []
    for emb_mode in options.emb_modes:
        argv = ["--cells", "all", "--perturb-type", "delete", "--genes", "all", "--emb-mode", emb_mode,
                "--emb-layer", str(options.emb_layer), "--forward-batch-size", str(batch), "--no-stats",
                "--threads", str(options.threads)]
        runs += [{"argv": argv, "output": str(folder / f"{emb_mode}_repeat{r}.json"), "phase": emb_mode}
                 for r in range(options.repeats)]
    plan = {"oracle_dir": str(shared_dir() / "reference" / "oracle"), "model_dir": str(context.checkpoint),
            "dict_dir": str(context.dictionaries), "tokens": str(context.tokens_npz), "work_dir": str(folder),
            "phase_file": str(folder / "phase"), "forward_batch_size": batch, "runs": runs}
    (folder / "plan.json").write_text(json.dumps(plan, indent=1))
    if os.environ.get("GFTRITON_UPSTREAM_PYTHON"):  # a Python with upstream's own pins (oracle README, environment B)
        python, env = os.environ["GFTRITON_UPSTREAM_PYTHON"], dict(os.environ)
    else:  # helical's venv + the oracle overlay (environment A)
        python, env = str(helical_python()), oracle_environment()
    env["OMP_NUM_THREADS"] = str(options.threads)
    command = [python, str(REPO_ROOT / "bench" / "upstream_driver.py"), str(folder / "plan.json")]
    return MethodRun("upstream", options.emb_modes, options.emb_layer, command, env, folder)


def run_upstream(context: "BenchContext") -> dict[str, tuple[MethodResult, dict]]:
    """Run :func:`upstream_run`; per emb_mode its result and the last repeat's values."""
    run = upstream_run(context)
    plan = json.loads((run.folder / "plan.json").read_text())
    batch = plan["forward_batch_size"]
    LOGGER.info("upstream %s: %d repeats each, forward batch %d", "+".join(run.emb_modes), context.options.repeats, batch)
    sampler = run.execute(context.options.timeout_s)
    out = {}
    for emb_mode in run.emb_modes:
        outputs = [Path(r["output"]) for r in plan["runs"] if r["phase"] == emb_mode]
        runs = [json.loads(o.read_text()) for o in outputs]
        for path, result in zip(outputs[:-1], runs[:-1]):  # only the last repeat's values are compared: drop the others'
            path.write_text(json.dumps({k: v for k, v in result.items() if k not in ("cell_shifts", "gene_shifts")}))
        counts = {r["n_perturbations"] for r in runs}
        if len(counts) != 1:
            raise RuntimeError(f"upstream repeats perturbed different numbers of genes: {sorted(counts)}")
        last = runs[-1]
        source = last["upstream"]["git"][:7] or f"source {last['upstream']['path']}"
        result = MethodResult(
            "upstream", emb_mode,
            f"Geneformer InSilicoPerturber ({source}), BertForMaskedLM fp32 eager on {context.options.device}, forward "
            f"batch {batch}, torch {last['versions']['torch']}, transformers {last['versions']['transformers']}",
            counts.pop(), [r["seconds"]["perturb_data"] for r in runs], sampler.phase_peak_mib(emb_mode),
            details={"forward_batch_size": batch, "wall_s": [r["wall_s"] for r in runs],
                     "upstream_perturbations_per_s": [r["perturbations_per_s"] for r in runs],
                     "layer_to_quant": last["layer_to_quant"], "shim_call_sites": last["shim_call_sites"],
                     "process_peak_rss_mib": sampler.peak_mib})
        out[emb_mode] = (result, upstream_values(last))
    return out


def worker_run(context: "BenchContext", method: str, emb_modes: Optional[tuple[str, ...]] = None,
               emb_layer: Optional[int] = None) -> MethodRun:
    """Plan our ``inprocess`` or ``served`` method (every emb_mode) in a worker process (:mod:`geneformer_triton.bench.isp_worker`)."""
    options = context.options
    layer = options.emb_layer if emb_layer is None else emb_layer
    modes = tuple(emb_modes or options.emb_modes)
    folder = context.work / method / f"{'+'.join(modes)}_layer{layer}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    plan = {"method": method, "checkpoint": str(context.checkpoint), "cells": [c.tokens.tolist() for c in context.cells],
            "emb_modes": list(modes), "emb_layer": layer, "repeats": options.repeats, "threads": options.threads,
            "device": options.device, "max_tokens": options.max_tokens, "max_batch": options.max_batch,
            "concurrency": options.concurrency, "repository": str(context.repository) if context.repository else None,
            "work_dir": str(folder), "output": str(folder / "summary.json"), "phase_file": str(folder / "phase")}
    (folder / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(options.threads)}
    command = [sys.executable, "-m", "geneformer_triton.bench.isp_worker", str(folder / "plan.json")]
    return MethodRun(method, modes, layer, command, env, folder)


def run_ours(context: "BenchContext", method: str, emb_modes: Optional[tuple[str, ...]] = None,
             emb_layer: Optional[int] = None) -> dict[str, tuple[MethodResult, dict]]:
    """Run :func:`worker_run` (``emb_layer``: another layer for our side, a negative control); per emb_mode
    its result and values."""
    options = context.options
    run = worker_run(context, method, emb_modes, emb_layer)
    LOGGER.info("%s %s (emb_layer %d): %d repeats each", method, "+".join(run.emb_modes), run.emb_layer, options.repeats)
    sampler = run.execute(options.timeout_s)
    summaries = json.loads((run.folder / "summary.json").read_text())
    out = {}
    for emb_mode in run.emb_modes:
        summary = summaries[emb_mode]
        with np.load(run.folder / f"values_{emb_mode}.npz") as data:
            values = {k: data[k] for k in data.files}
        counts = {r["perturbations"] for r in summary["repeats"]}
        if len(counts) != 1:
            raise RuntimeError(f"{method} repeats perturbed different numbers of genes: {sorted(counts)}")
        description = summary["encoder"] + (f"; {summary['backend']}" if "backend" in summary else "")
        details = {k: v for k, v in summary.items() if k != "encoder"}
        details["process_peak_rss_mib"] = sampler.peak_mib
        if run.emb_layer != options.emb_layer:
            details["negative_control_emb_layer"] = run.emb_layer
        out[emb_mode] = (MethodResult(method, emb_mode, description, counts.pop(), [r["seconds"] for r in summary["repeats"]],
                                      sampler.phase_peak_mib(emb_mode), details=details), values)
    return out


# ----------------------------------------------------------------------------- agreement


def load_upstream_values(context: "BenchContext", emb_mode: str) -> dict:
    """Upstream's values of the last repeat of ``emb_mode`` (after :func:`run_upstream`)."""
    path = context.work / "upstream" / f"{emb_mode}_repeat{context.options.repeats - 1}.json"
    return upstream_values(json.loads(path.read_text()))


def upstream_values(result: dict) -> dict:
    """Upstream's oracle JSON as the worker's arrays (``cell_keys``/``cell_cos``, ``gene_keys``/``gene_cos``)."""
    cells = [r for r in result["cell_shifts"] if r.get("state") is None]
    if any(len(r["perturbed"]) != 1 for r in cells):
        raise RuntimeError("upstream values hold joint perturbations; the benchmark runs delete all (one gene each)")
    genes = result["gene_shifts"]
    return {
        "cell_keys": np.array([[r["cell"], r["perturbed"][0]] for r in cells], dtype=np.int64).reshape(-1, 2),
        "cell_cos": np.array([r["cos"] for r in cells], dtype=np.float64),
        "gene_keys": np.array([[r["cell"], r["perturbed"][0], r["affected"]] for r in genes], dtype=np.int64).reshape(-1, 3),
        "gene_cos": np.array([r["cos"] for r in genes], dtype=np.float64),
    }


@dataclass(frozen=True)
class Agreement:
    max_abs_diff_cell_emb: float
    max_abs_diff_gene_cos: float
    compared: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _max_diff(ours_keys, ours_cos, their_keys, their_cos, what: str, problems: list[str]) -> float:
    """Max abs difference over identical key sets (keys: int rows); a different key set is a problem."""
    if len(their_keys) == 0 and len(ours_keys) == 0:
        return float("nan")
    ours = {tuple(k): v for k, v in zip(ours_keys.tolist(), ours_cos.tolist())}
    theirs = {tuple(k): v for k, v in zip(their_keys.tolist(), their_cos.tolist())}
    if len(ours) != len(ours_keys):
        problems.append(f"{what}: ours lists a key twice")
    if set(ours) != set(theirs):
        only_ours, only_theirs = set(ours) - set(theirs), set(theirs) - set(ours)
        problems.append(f"{what}: {len(only_ours)} keys only ours (e.g. {sorted(only_ours)[:2]}), "
                        f"{len(only_theirs)} only upstream's (e.g. {sorted(only_theirs)[:2]})")
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        return float("inf")
    return float(np.max(np.abs(np.array([ours[k] for k in shared]) - np.array([theirs[k] for k in shared]))))


def agreement(ours: dict, theirs: dict, atol: float) -> Agreement:
    """Our values vs upstream's: same keys, max abs diff of cell_emb shifts and gene cosines <= ``atol``."""
    problems: list[str] = []
    cell = _max_diff(ours["cell_keys"], ours["cell_cos"], theirs["cell_keys"], theirs["cell_cos"], "cell_emb", problems)
    gene = _max_diff(ours["gene_keys"], ours["gene_cos"], theirs["gene_keys"], theirs["gene_cos"], "gene cos", problems)
    for name, diff in (("cell_emb", cell), ("gene cos", gene)):
        if not np.isnan(diff) and not diff <= atol:
            problems.append(f"{name}: max abs diff {diff:.3e} > {atol:.0e}")
    return Agreement(cell, gene, len(ours["cell_cos"]) + len(ours["gene_cos"]), tuple(problems))


def apply_agreement(result: MethodResult, check: Agreement) -> MethodResult:
    result.max_abs_diff_cell_emb = check.max_abs_diff_cell_emb
    result.max_abs_diff_gene_cos = check.max_abs_diff_gene_cos
    result.compared_values = check.compared
    result.agrees = check.ok
    if check.problems:
        result.details["agreement_problems"] = list(check.problems)
    return result


# ----------------------------------------------------------------------------- the run


@dataclass
class BenchContext:
    options: BenchOptions
    work: Path
    out: Path
    dictionaries: Path
    cells: list[BenchCell]
    checkpoint: Path
    tokens_npz: Path
    repository: Optional[Path] = None


def prepare(options: BenchOptions) -> BenchContext:
    """Cells, checkpoint, upstream's token file and (when served) the exported repository."""
    from geneformer_triton.core.dictionaries import load_vocabulary

    dictionaries = Path(options.dictionaries) if options.dictionaries else default_dictionaries()
    vocabulary = load_vocabulary(dictionaries)
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in socket.gethostname())
    if options.out:
        out = Path(options.out)
    elif options.mode != "quick":
        out = REPO_ROOT / "bench" / "results" / f"{dt.date.today():%Y-%m-%d}-{host}" / "isp"
    else:
        out = Path(tempfile.mkdtemp(prefix="isp-upstream-quick-"))
    work = Path(options.work) if options.work else Path(tempfile.mkdtemp(prefix="isp-upstream-work-"))
    work.mkdir(parents=True, exist_ok=True)
    cells = select_cells(vocabulary, options)
    LOGGER.info("cells: %s", ", ".join(f"{c.name} ({c.tokens.size} tokens)" for c in cells))
    checkpoint = prepare_checkpoint(vocabulary, work / "checkpoint", options.seed)
    tokens_npz = work / "tokens.npz"
    np.savez(tokens_npz, *[c.tokens.astype(np.int64) for c in cells])
    context = BenchContext(options, work, out, dictionaries, cells, checkpoint, tokens_npz)
    if "served" in options.methods:
        context.repository = export_repository(checkpoint, work / "model_repository")
    return context


def machine_state() -> dict:
    state = {"utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        state["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return state


def run_benchmark(options: BenchOptions, context: Optional[BenchContext] = None) -> dict:
    """Run every method x emb_mode, check agreement with upstream, write the results; returns the report dict.

    ``context``: from :func:`prepare` (made here when absent; a caller that passes it can rerun single
    methods afterwards, e.g. a negative control with :func:`run_ours`)."""
    from geneformer_triton.bench.isp_upstream_report import write_report

    started = time.perf_counter()
    before = machine_state()
    context = context or prepare(options)
    if options.dry_run:
        return dry_run(context)
    results: list[MethodResult] = []
    upstream: dict[str, dict] = {}
    for emb_mode, (result, values) in run_upstream(context).items():
        upstream[emb_mode] = values
        results.append(apply_agreement(result, agreement(values, values, options.atol)))
    for method in (m for m in METHODS if m != "upstream" and m in options.methods):
        for emb_mode, (result, values) in run_ours(context, method, emb_layer=options.our_emb_layer).items():
            results.append(apply_agreement(result, agreement(values, upstream[emb_mode], options.atol)))
            LOGGER.info("%s %s: median %.1f perturbations/s, agrees with upstream: %s", method, emb_mode,
                        float(np.median(result.rates)), result.agrees)
    after = machine_state()
    return write_report(context, results, {"before": before, "after": after,
                                           "seconds": time.perf_counter() - started})


def dry_run(context: BenchContext) -> dict:
    """Every method's plan and command (written under ``context.work``), nothing run."""
    options = context.options
    runs = [upstream_run(context)]
    runs += [worker_run(context, method, emb_layer=options.our_emb_layer)
             for method in METHODS if method != "upstream" and method in options.methods]
    commands = [{"method": r.method, "emb_modes": list(r.emb_modes), "command": r.shell()} for r in runs]
    for c in commands:
        print(f"[dry run] {c['method']} ({'+'.join(c['emb_modes'])}): {c['command']}")
    return {"dry_run": True, "cells": [c.describe() for c in context.cells], "commands": commands,
            "work": str(context.work), "out": str(context.out)}


def parse_args(argv=None) -> BenchOptions:
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.bench.isp_upstream_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchOptions()
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--lengths", help="cpu/gpu mode: target cell lengths in tokens, comma-separated (cpu: 500)")
    parser.add_argument("--quick-cells", type=int, default=defaults.quick_cells)
    parser.add_argument("--quick-length", type=int, default=defaults.quick_length)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--emb-modes", default=",".join(EMB_MODES))
    parser.add_argument("--methods", help="comma-separated (default: all; gpu: upstream,inprocess); upstream always runs")
    parser.add_argument("--our-emb-layer", type=int, default=None,
                        help="negative control: run OUR side at another emb_layer (the agreement check must fail)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", help="our in-process method's torch device (gpu mode: cuda)")
    parser.add_argument("--cells-file", help="token cells (.npz from `python -m geneformer_triton.bench.isp_bench --prepare-cells`)")
    parser.add_argument("--dry-run", action="store_true", help="prepare and print every method's command; run nothing")
    parser.add_argument("--long-batch", type=int, default=defaults.long_batch,
                        help=f"upstream forward batch on cells longer than --full-batch-max-length (default {defaults.long_batch})")
    parser.add_argument("--full-batch-max-length", type=int,
                        help=f"longest cell for upstream's batch {UPSTREAM_DEFAULT_BATCH} (default {defaults.full_batch_max_length}; gpu 2048)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--atol", type=float, default=defaults.atol)
    parser.add_argument("--out", help="results folder (cpu default: bench/results/<date>-<host>/isp)")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--dictionaries", help="V1 gene dictionaries (default ../shared/geneformer/v1)")
    a = parser.parse_args(argv)
    chosen = dict(MODES[a.mode])
    if a.lengths:
        chosen["lengths"] = tuple(int(x) for x in a.lengths.split(","))
    if a.methods:
        chosen["methods"] = tuple(dict.fromkeys(["upstream", *a.methods.split(",")]))
    for key in ("device", "full_batch_max_length"):
        if getattr(a, key) is not None:
            chosen[key] = getattr(a, key)
    return BenchOptions(mode=a.mode, quick_cells=a.quick_cells, quick_length=a.quick_length, repeats=a.repeats,
                        emb_modes=tuple(a.emb_modes.split(",")), our_emb_layer=a.our_emb_layer, seed=a.seed,
                        long_batch=a.long_batch, concurrency=a.concurrency, threads=a.threads, atol=a.atol,
                        cells_file=a.cells_file, dry_run=a.dry_run, out=a.out, work=a.work,
                        dictionaries=a.dictionaries, **chosen)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    report = run_benchmark(parse_args(argv))
    if report.get("dry_run"):
        return 0
    print(Path(report["files"]["report"]).read_text())
    disagreeing = [f"{r['method']}/{r['emb_mode']}" for r in report["results"] if not r["agrees_with_upstream"]]
    if disagreeing:
        print(f"FAILED: values differ from upstream's for {', '.join(disagreeing)}; speed is not comparable", file=sys.stderr)
        return 1
    return 0


__all__ = ["BenchContext", "BenchOptions", "MethodResult", "agreement", "load_upstream_values", "prepare", "run_benchmark",
           "run_ours", "run_upstream", "upstream_values"]

if __name__ == "__main__":
    raise SystemExit(main())
