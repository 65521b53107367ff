"""Benchmark: in-silico ``delete all`` perturbations per second on real cells, ours vs a Geneformer-style baseline.

Measured in the same run, on the same cells (real celltypist cells, truncated to ``--length`` tokens):

* ``baseline``: Geneformer's ``InSilicoPerturber`` compute (``BertForMaskedLM`` fp32, eager attention,
  ``output_hidden_states=True``, forward batch 100, one cell at a time; :func:`geneformer_triton.bench.isp_fastpath.baseline_delete_all`);
* ``ours``: encoder only, cell shift only, token-budget chunks built on the device, no padding/mask,
  bf16 where the device supports it (CUDA; CPUs with AVX512-BF16/AMX), optionally ``torch.compile``
  (:class:`geneformer_triton.bench.isp_fastpath.DeleteAllRunner`);
* ``triton`` (``--triton``, CPU): the served ``geneformer_isp`` model calling the fp32 ONNX encoder
  through a real local tritonserver, cell-shift-only requests, ``--triton-concurrency`` cells in flight.

Every method's ``cell_shift`` is compared with the baseline's on the baseline's cells (max abs diff).
Results: ``bench/results/<date>-<host>/isp/isp_bench.{csv,json,md}``; the ratio is printed.

    python -m geneformer_triton.bench.isp_bench --mode quick            # 2 cells x 64 tokens, CPU, < 1 minute
    python -m geneformer_triton.bench.isp_bench --mode cpu --triton     # CPU figures incl. the Triton path
    bash bench/gpu_isp.sh                             # H100: 2,048-token cells (target >= 10,000/s)

Cells come from the celltypist sample (needs the gene dictionaries) or from ``--cells-file`` written by
``--prepare-cells FILE`` (token ids only: lets a machine without the data or network run the benchmark).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

LOGGER = logging.getLogger("bench.isp")
REPO_ROOT = Path(__file__).resolve().parents[1]

MODES = {
    "quick": dict(cells=2, length=64, baseline_cells=2, device="cpu", max_tokens=8192, compile=False),
    "cpu": dict(cells=3, length=192, baseline_cells=2, device="cpu", max_tokens=8192, compile=False),
    "gpu": dict(cells=8, length=2048, baseline_cells=1, device="cuda", max_tokens=131072, compile=True),
}


@dataclass
class Measurement:
    method: str
    description: str
    device: str
    dtype: str
    cells: int
    length: int
    perturbations: int
    seconds: float
    perturbations_per_s: float
    speedup_vs_baseline: float = float("nan")
    max_abs_diff_vs_baseline: float = float("nan")


# ----------------------------------------------------------------------------- cells


def default_dictionaries() -> Optional[Path]:
    shared = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
    folder = shared / "geneformer" / "v1"
    return folder if (folder / "token_dictionary.json").is_file() else None


def celltypist_cells(vocabulary, count: int, length: int, special_tokens: bool = False) -> list[np.ndarray]:
    """The first ``count`` celltypist cells with at least ``length`` tokens, truncated to ``length``."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    tokenizer = RankValueTokenizer(vocabulary, 4096 if special_tokens else 2048, special_tokens)
    chosen: list[np.ndarray] = []
    for rows in (48, 160, 559):  # read more of the sample only when needed
        adata = load_celltypist_sample(n_cells=rows, symbol_to_ensembl=vocabulary.gene_name_to_id)
        cells = tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())
        chosen = [c[:length] for c in cells if len(c) >= length][:count]
        if len(chosen) >= count:
            break
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} celltypist cells have >= {length} tokens; ask for fewer cells or a shorter length")
    return chosen


def save_cells(path: Path, cells: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max(len(c) for c in cells)
    tokens = np.zeros((len(cells), width), dtype=np.int32)
    for i, c in enumerate(cells):
        tokens[i, : len(c)] = c
    np.savez_compressed(path, tokens=tokens, lengths=np.array([len(c) for c in cells], dtype=np.int32))


def load_cells_file(path: Path, count: int, length: int) -> list[np.ndarray]:
    data = np.load(path)
    cells = [t[:n].astype(np.int64) for t, n in zip(data["tokens"], data["lengths"]) if n >= length]
    cells = [c[:length] for c in cells][:count]
    if len(cells) < count:
        raise SystemExit(f"{path} holds only {len(cells)} cells with >= {length} tokens (asked for {count})")
    return cells


# ----------------------------------------------------------------------------- helpers


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        from geneformer_triton.core.host import cpu_features

        features = cpu_features()
        return torch.bfloat16 if ("avx512_bf16" in features or "amx_bf16" in features) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16").replace("float16", "fp16")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[np.ndarray], np.ndarray], cells: list[np.ndarray], device: str) -> tuple[float, list[np.ndarray]]:
    synchronize(device)
    start = time.perf_counter()
    results = [run(c) for c in cells]
    synchronize(device)
    return time.perf_counter() - start, results


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) for x, y in zip(a, b)))


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def baseline_model(loaded, device: str):
    """A separate ``BertForMaskedLM`` with the same weights, eager attention, fp32."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(**{**loaded.config.to_dict(), "attn_implementation": "eager"})
    model = BertForMaskedLM(config)
    model.load_state_dict(loaded.model.state_dict())
    model = model.to(device, torch.float32).eval()
    attn = getattr(model.config, "_attn_implementation", "eager")
    if attn != "eager":
        raise RuntimeError(f"baseline model uses attention {attn!r}, expected 'eager'")
    return model


# ----------------------------------------------------------------------------- Triton path


def rank_preserving_counts(vocabulary, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Gene ids and counts that the rank-value tokenizer turns back into exactly ``tokens``.

    Gene i (0-based rank) gets ``median_i * (L - i)`` counts with total 10,000: its normalized value is
    ``L - i`` (strictly decreasing, far above float32 rounding).
    """
    genes = vocabulary.genes_for_tokens(tokens)
    medians = np.array([vocabulary.gene_medians[g] for g in genes], dtype=np.float64)
    counts = (medians * (len(genes) - np.arange(len(genes)))).astype(np.float32)
    return np.array([g.encode() for g in genes], dtype=object), counts, 10_000.0


def triton_delete_all(loaded, cells: list[np.ndarray], concurrency: int, work_dir: Path):
    """Serve ONNX fp32 + geneformer_isp with a local tritonserver; returns (seconds, shifts, description)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from geneformer_triton.client.isp_spec import infer_cell
    from geneformer_triton.client.triton_client import GeneformerClient
    from geneformer_triton.export.repository import export_model_repository
    from geneformer_triton.serving.server import LocalTritonServer

    repository = work_dir / "model_repository"
    if repository.exists():
        shutil.rmtree(repository)
    shutil.copytree(REPO_ROOT / "model_repository", repository,
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "__pycache__"))
    export_model_repository(loaded, repository, formats=["onnx"])
    requests = []
    for tokens in cells:
        gene_ids, counts, n_counts = rank_preserving_counts(loaded.vocabulary, tokens)
        requests.append({
            "gene_ids": gene_ids, "counts": counts, "n_counts": np.array([n_counts], np.float32),
            "perturbation": np.array([b"delete"], dtype=object), "return_gene_shift": np.array([False]),
            "semantics": np.array([b"ours"], dtype=object),
        })
    with LocalTritonServer(repository, models=["geneformer_onnx", "geneformer_isp"], model_config_name="cpu",
                           log_path=work_dir / "tritonserver.log") as server:
        with GeneformerClient(server.grpc_url, concurrency=concurrency, timeout_s=3600) as client:
            infer_cell(client, "geneformer_isp", requests[0], ["cell_shift"])  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                outputs = list(pool.map(lambda r: infer_cell(client, "geneformer_isp", r, ["perturbed_genes", "cell_shift"]),
                                        requests))
            seconds = time.perf_counter() - start
    for tokens, out in zip(cells, outputs):
        expected = loaded.vocabulary.genes_for_tokens(tokens)
        if [g.decode() for g in out["perturbed_genes"]] != expected:
            raise RuntimeError("the served model tokenized a benchmark cell differently (gene order differs)")
    return seconds, [o["cell_shift"] for o in outputs]


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, report: Callable[[list[Measurement]], None] = lambda results: None) -> list[Measurement]:
    """Measure every method; ``report(results)`` is called after each one (results survive a timeout)."""
    import torch

    from geneformer_triton.bench.isp_fastpath import DeleteAllRunner, baseline_delete_all
    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.model.loading import load_geneformer

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device (torch %s)" % torch.__version__)
    dictionaries = Path(args.dictionaries) if args.dictionaries else default_dictionaries()
    vocabulary = load_vocabulary(dictionaries) if dictionaries else None
    if args.cells_file:
        cells = load_cells_file(Path(args.cells_file), args.cells, args.length)
    else:
        if vocabulary is None:
            raise SystemExit("no gene dictionaries: pass --dictionaries or --cells-file")
        cells = celltypist_cells(vocabulary, args.cells, args.length)
    if args.prepare_cells:
        save_cells(Path(args.prepare_cells), cells)
        LOGGER.info("wrote %d cells x %d tokens to %s", len(cells), args.length, args.prepare_cells)
        return []

    loaded = load_geneformer(args.model, allow_random=True, seed=args.seed, vocabulary=vocabulary)
    special_ids = loaded.vocabulary.special_token_ids if (loaded.vocabulary and loaded.special_tokens) else ()
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    n_pert = [len(c) - (2 if special_ids else 0) for c in cells]
    base_cells = cells[: args.baseline_cells]
    results: list[Measurement] = []

    # baseline (fp32, eager, all hidden states, batch 100, one cell at a time)
    model = baseline_model(loaded, device)
    baseline_delete_all(model, cells[0][: min(len(cells[0]), 32)], device, args.baseline_batch, special_ids)  # warm-up
    seconds, base_shifts = timed(lambda c, m=model: baseline_delete_all(m, c, device, args.baseline_batch, special_ids), base_cells, device)
    total = sum(n_pert[: len(base_cells)])
    results.append(Measurement("baseline", f"BertForMaskedLM fp32 eager, output_hidden_states, batch {args.baseline_batch}, one cell at a time",
                               device, "fp32", len(base_cells), args.length, total, seconds, total / seconds))
    LOGGER.info("baseline: %d perturbations in %.2f s = %.1f/s", total, seconds, total / seconds)
    report(results)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    variants = [("ours", False)] + ([("ours_compiled", True)] if args.compile else [])
    for name, compiled in variants:
        runner = DeleteAllRunner(loaded.encoder(), device, dtype, args.max_tokens, args.max_batch, compiled, special_ids)
        warm = time.perf_counter()
        try:
            runner.run_cell(cells[0])  # warm-up (and compilation) on a full-size cell
        except Exception as error:  # noqa: BLE001 - a failed compile must not lose the other figures
            if not compiled:
                raise
            LOGGER.warning("torch.compile failed (%s); skipping %s", error, name)
            continue
        LOGGER.info("%s: warm-up %.1f s", name, time.perf_counter() - warm)
        seconds, shifts = timed(runner.run_cell, cells, device)
        total = sum(n_pert)
        what = (f"encoder only, {dtype_name(dtype)}, cell shift only, chunks of <= {args.max_tokens} tokens built on the "
                f"device, no padding/mask" + (", torch.compile" if compiled else ""))
        results.append(Measurement(name, what, device, dtype_name(dtype), len(cells), args.length, total, seconds,
                                   total / seconds, max_abs_diff_vs_baseline=max_diff(shifts, base_shifts)))
        LOGGER.info("%s: %d perturbations in %.2f s = %.1f/s", name, total, seconds, total / seconds)
        report(results)
        del runner

    if args.triton:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="isp-bench-") as tmp:
            seconds, shifts = triton_delete_all(loaded, cells, args.triton_concurrency, Path(tmp))
        total = sum(n_pert)
        results.append(Measurement(
            "triton", f"geneformer_isp (BLS) -> geneformer_onnx fp32 on a local tritonserver (CPU configs), "
                      f"{args.triton_concurrency} cells in flight, cell shift only", "cpu (server)", "fp32",
            len(cells), args.length, total, seconds, total / seconds, max_abs_diff_vs_baseline=max_diff(shifts, base_shifts)))
        LOGGER.info("triton: %d perturbations in %.2f s = %.1f/s", total, seconds, total / seconds)
        report(results)
    return results


def write_results(results: list[Measurement], args: argparse.Namespace, out_dir: Path) -> Path:
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    for m in results:
        m.speedup_vs_baseline = m.perturbations_per_s / results[0].perturbations_per_s
    frame = pd.DataFrame([asdict(m) for m in results])
    frame.to_csv(out_dir / "isp_bench.csv", index=False)
    env = environment(args.device)
    (out_dir / "isp_bench.json").write_text(json.dumps(
        {"args": vars(args), "environment": env, "results": [asdict(m) for m in results]}, indent=2, default=str) + "\n")
    lines = [
        f"# In-silico `delete all`: perturbations/s ({args.mode} mode)",
        "",
        f"{env.get('gpu', platform.processor() or 'CPU')}, {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"model {args.model}, {results[0].cells if results else 0}+ real celltypist cells of {args.length} tokens "
        f"(each cell: {args.length} deletions of a gene, sequences of {args.length - 1} tokens).",
        "",
        "| method | device | dtype | cells | perturbations | s | perturbations/s | x baseline | max abs diff vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        lines.append(f"| {m.method} | {m.device} | {m.dtype} | {m.cells} | {m.perturbations} | {m.seconds:.2f} | "
                     f"{m.perturbations_per_s:,.1f} | {m.speedup_vs_baseline:.2f} | {m.max_abs_diff_vs_baseline:.2e} |")
    lines += ["", "Methods:", ""] + [f"- `{m.method}`: {m.description}" for m in results]
    if "load_average" in env:
        lines += ["", f"Load average during the run: {env['load_average']}"]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    return out_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.bench.isp_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--cells", type=int, help="cells for our path")
    parser.add_argument("--baseline-cells", type=int, help="cells for the baseline (its first cells)")
    parser.add_argument("--length", type=int, help="tokens per cell (cells are truncated to it)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="ours: auto = bf16 where supported")
    parser.add_argument("--max-tokens", type=int, help="ours: tokens per forward chunk")
    parser.add_argument("--max-batch", type=int, help="ours: sequences per forward chunk (default: token budget only)")
    parser.add_argument("--baseline-batch", type=int, default=100)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="also measure torch.compile")
    parser.add_argument("--triton", action="store_true", help="also measure the served geneformer_isp (CPU)")
    parser.add_argument("--triton-concurrency", type=int, default=2)
    parser.add_argument("--model", default="gf-6L-10M-i2048", help="model name (random weights if not cached) or checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dictionaries", help="gene dictionary folder (default ../shared/geneformer/v1)")
    parser.add_argument("--cells-file", help="token cells written by --prepare-cells (no data or dictionaries needed)")
    parser.add_argument("--prepare-cells", help="write the selected cells to this .npz and exit")
    parser.add_argument("--out", help="results folder (default bench/results/<date>-<host>/isp)")
    args = parser.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.baseline_cells = min(args.baseline_cells, args.cells)
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    started = time.perf_counter()
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in socket.gethostname())
    out_dir = Path(args.out) if args.out else REPO_ROOT / "bench" / "results" / f"{dt.date.today():%Y-%m-%d}-{host}" / "isp"
    results = run(args, lambda partial: write_results(partial, args, out_dir))
    if not results:
        return 0
    write_results(results, args, out_dir)
    print((out_dir / "README.md").read_text())
    base = results[0]
    for m in results[1:]:
        print(f"{m.method}: {m.perturbations_per_s:,.1f} perturbations/s = {m.speedup_vs_baseline:.2f}x the baseline "
              f"({base.perturbations_per_s:,.1f}/s); max |cell_shift diff| {m.max_abs_diff_vs_baseline:.2e}")
    print(f"results: {out_dir} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
