"""perf_analyzer: where it is, how it runs here, its input data from real cells, its CSV.

The ``tritonclient[all]==2.51.0`` wheel puts ``perf_analyzer`` in the venv's ``bin/``. It needs
``libb64.so.0d`` and ``libcudart.so.12``: the ``nvidia-pytriton`` wheel carries both (under hashed
names in ``nvidia_pytriton.libs``), so a folder of symlinks with the plain names goes on
``LD_LIBRARY_PATH`` (docs/runtime.md).

Input data (``--input-data``) is JSON made from real tokenized cells: random integers leave the
vocabulary. One file per input signature, since perf_analyzer rejects names a model does not have:
- encoders ONNX/TensorRT (``input_ids``, ``attention_mask``) — also written to ``bench/data/perf_input.json``,
  the file docker-compose's ``sdk`` service runs perf_analyzer with (``PERF_MODEL`` default geneformer_onnx);
- TorchScript (``input_ids__0``, ``attention_mask__1``);
- ensembles (``gene_ids`` BYTES, ``counts`` FP32, ``n_counts`` FP32: raw counts of the same cells).
With ``-b B`` perf_analyzer fills a request with B consecutive steps, which must share a shape: for
B > 1 the cells are sorted by length and each group of B is padded to its longest cell (that is what a
client batching sorted cells sends).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from geneformer_triton.core.contract import INPUT_SIGNATURES

LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_INPUT = REPO_ROOT / "bench" / "data" / "perf_input.json"
SIGNATURES = INPUT_SIGNATURES  # signature (onnx | torchscript | tensorrt | ensemble) -> input names

# perf_analyzer CSV header -> our column (times in microseconds, as perf_analyzer writes them)
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "infer_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_latency_us",
    "request/response": "request_response",
    "response wait": "response_wait_us",
}


def find_perf_analyzer() -> Path:
    """``$GFTRITON_PERF_ANALYZER``, the venv's ``bin/perf_analyzer``, or one on PATH."""
    candidates = [os.environ.get("GFTRITON_PERF_ANALYZER", ""), str(Path(sys.prefix) / "bin" / "perf_analyzer"),
                  shutil.which("perf_analyzer") or ""]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise FileNotFoundError("perf_analyzer not found: pip install tritonclient[all]==2.51.0 (its wheel carries bin/perf_analyzer)")


def perf_analyzer_env(lib_dir: Path) -> dict[str, str]:
    """Environment for perf_analyzer: symlinks to nvidia-pytriton's libb64/libcudart on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    lib_dir.mkdir(parents=True, exist_ok=True)
    try:
        from geneformer_triton.serving.server import pytriton_server_dir

        libs = pytriton_server_dir().parent.parent / "nvidia_pytriton.libs"
    except Exception:  # noqa: BLE001 - the system may have the libraries
        libs = None
    if libs is not None and libs.is_dir():
        for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
            found = sorted(libs.glob(pattern))
            link = lib_dir / name
            if found and not link.exists():
                link.symlink_to(found[0])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


# ----------------------------------------------------------------------------------------------- input data
def _groups(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cell index groups of ``batch_size`` (sorted by length when batching; the last group refilled)."""
    if batch_size <= 1:
        return [np.array([i]) for i in range(len(lengths))]
    order = np.argsort(-lengths, kind="stable")
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(groups[-1]) < batch_size:  # refill with the group's own cells: every request stays full
        last = groups[-1]
        groups[-1] = np.resize(last, batch_size)
    return groups


def encoder_input_data(cells: list[np.ndarray], signature: str = "onnx", batch_size: int = 1, pad_id: int = 0) -> dict:
    """perf_analyzer JSON for an encoder: one step per cell (right-padded within groups of ``batch_size``)."""
    ids_name, mask_name = SIGNATURES[signature]
    lengths = np.array([len(c) for c in cells])
    steps = []
    for group in _groups(lengths, batch_size):
        width = int(lengths[group].max())
        for i in group:
            cell = cells[i]
            ids = np.full(width, pad_id, dtype=np.int64)
            ids[:len(cell)] = cell
            mask = np.zeros(width, dtype=np.int64)
            mask[:len(cell)] = 1
            steps.append({ids_name: {"content": ids.tolist(), "shape": [width]},
                          mask_name: {"content": mask.tolist(), "shape": [width]}})
    return {"data": steps}


def ensemble_input_data(raw: list[tuple[np.ndarray, np.ndarray, float]], batch_size: int = 1) -> dict:
    """perf_analyzer JSON for a tokenizer ensemble: each cell's expressed genes and raw counts."""
    sizes = np.array([len(g) for g, _, _ in raw])
    steps = []
    for group in _groups(sizes, batch_size):
        width = int(sizes[group].max())
        for i in group:
            genes, counts, total = raw[i]
            padded_genes = list(map(str, genes)) + [""] * (width - len(genes))
            padded_counts = np.zeros(width, dtype=np.float32)
            padded_counts[:len(counts)] = counts
            steps.append({"gene_ids": {"content": padded_genes, "shape": [width]},
                          "counts": {"content": padded_counts.tolist(), "shape": [width]},
                          "n_counts": {"content": [float(total)], "shape": [1]}})
    return {"data": steps}


def write_json(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- running
def perf_analyzer_command(
    binary: Path, model: str, url: str, protocol: str, input_data: Path, concurrency: int, request_count: int,
    csv_path: Path, batch_size: int = 1, extra: list[str] | None = None,
) -> list[str]:
    """A fixed-size measurement: ``request_count`` requests at ``concurrency`` (no stability search, so
    it ends in a known number of requests even on a busy machine)."""
    return [
        str(binary), "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
        "--input-data", str(input_data), "--concurrency-range", str(concurrency),
        "--request-count", str(request_count), "-f", str(csv_path), "--verbose-csv",
        *(extra or []),
    ]


def parse_csv(path: Path) -> dict:
    """The one row of a perf_analyzer CSV (single concurrency), with our column names and floats."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} holds no measurement")
    row = rows[0]
    parsed = {}
    for header, value in row.items():
        if header is None:
            continue
        name = CSV_COLUMNS.get(header.strip(), header.strip().lower().replace(" ", "_").replace("/", "_per_"))
        try:
            parsed[name] = float(value)
        except (TypeError, ValueError):
            parsed[name] = value
    return parsed


def run_perf_analyzer(command: list[str], env: dict[str, str], timeout_s: float, log_path: Path,
                      on_start=None) -> tuple[int, str]:
    """Run perf_analyzer; its output goes to ``log_path``; ``on_start(pid)`` is called once it runs;
    returns (exit code, last lines of its output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = 124
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    return code, tail
