"""Bounded soak test: many concurrent clients mixing good and bad requests against every public model.

    python -m geneformer_triton.bench.soak --repository /path/to/exported/model_repository --seconds 60

Public models (the validated entry points): the embedding ensembles, the tokenizer and the ISP model.
``--clients`` threads (half gRPC, half HTTP, each its own connection) send requests drawn from a fixed
seeded set for ``--seconds``, split into three passes. Every ``--bad-every``-th request is malformed
and must be refused with INVALID_ARGUMENT / 400. Gates (``SoakReport.passed``):

* zero errors on good requests;
* every good result equal to its sequential reference (computed first, one request at a time) within
  ``tolerance`` (dynamic batching pads requests together, so fp32 results may differ by rounding);
* every bad request refused with INVALID_ARGUMENT / 400;
* server RSS (tritonserver + its python stubs) flat: growth from the end of pass 1 to the end of
  pass 3 at most ``max(10 %, 64 MiB)``.

Writes ``soak.json`` and ``soak.md`` into ``--out`` (default ``bench/results/soak-<date>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from geneformer_triton.client.triton_client import GeneformerClient, InferenceError, RetryPolicy
from geneformer_triton.core.contract import ENCODER_VARIANTS, ISP_MODEL, TOKENIZER_MODEL
from geneformer_triton.core.dictionaries import load_vocabulary
from geneformer_triton.core.isp_service import batched

LOGGER = logging.getLogger("geneformer_triton.bench.soak")

ENSEMBLES = tuple(ENCODER_VARIANTS[name].ensemble for name in ("onnx", "onnx_fp16", "torchscript"))
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
TOLERANCE = {"geneformer_embed_onnx_fp16": 2e-3}  # max abs difference; others 1e-5, exact for the tokenizer


@dataclass(frozen=True)
class Request:
    """One request of the soak mix: model, wire inputs, outputs; ``bad`` ones must be refused."""

    name: str
    model: str
    inputs: dict
    outputs: tuple[str, ...]
    bad: bool = False


@dataclass
class SoakReport:
    seconds: float
    clients: int
    models: list[str]
    good_requests: int = 0
    good_errors: int = 0
    bad_requests: int = 0
    bad_not_refused: int = 0
    mismatches: int = 0
    max_abs_deviation: dict = field(default_factory=dict)
    rss_mib_per_pass: list = field(default_factory=list)
    requests_per_s: float = 0.0
    examples: list = field(default_factory=list)
    passed: bool = False

    def finish(self) -> "SoakReport":
        rss = self.rss_mib_per_pass
        flat = len(rss) < 2 or rss[-1] - rss[0] <= max(0.10 * rss[0], 64.0)
        self.passed = bool(self.good_requests and self.bad_requests and not self.good_errors
                           and not self.bad_not_refused and not self.mismatches and flat)
        return self


def _cells(vocabulary_dir: Path, n_cells: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded synthetic cells: 12-80 vocabulary genes (Ensembl ids, bytes) with raw counts 1-50."""
    vocabulary = load_vocabulary(vocabulary_dir)
    genes = sorted(g for g in vocabulary.token_ids if g.startswith("ENSG"))
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        chosen = rng.choice(len(genes), size=int(rng.integers(12, 80)), replace=False)
        ids = np.array([genes[i].encode() for i in chosen], dtype=object)
        cells.append((ids, rng.integers(1, 50, size=len(chosen)).astype(np.float32)))
    return cells


def request_mix(vocabulary_dir: Path, models: list[str], n_cells: int = 6, seed: int = 0) -> tuple[list[Request], list[Request]]:
    """(good, bad) requests for ``models``: each cell to each model, and one malformed request per kind."""
    cells = _cells(vocabulary_dir, n_cells, seed)
    good: list[Request] = []
    for index, (ids, counts) in enumerate(cells):
        row = {"gene_ids": ids.reshape(1, -1), "counts": counts.reshape(1, -1)}
        for model in models:
            if model == TOKENIZER_MODEL:
                good.append(Request(f"cell{index}", model, row, ("input_ids",)))
            elif model == ISP_MODEL:
                isp = batched({"gene_ids": ids[:10], "counts": counts[:10], "perturbation": np.array([b"delete"], dtype=object)})
                good.append(Request(f"cell{index}", model, isp, ("cell_shift",)))
            else:
                good.append(Request(f"cell{index}", model, row, ("cell_embedding",)))
    ids, counts = cells[0]
    row = {"gene_ids": ids.reshape(1, -1), "counts": counts.reshape(1, -1)}
    broken_ids = ids.copy()
    broken_ids[1] = b"ENSG\xff\xfe"

    def bad_row(**changes) -> dict:
        return {**row, **changes}

    bad_inputs = {
        "nan_count": bad_row(counts=np.where(np.arange(len(counts)) == 2, np.nan, counts).astype(np.float32).reshape(1, -1)),
        "absurd_count": bad_row(counts=np.full((1, len(counts)), 1e30, np.float32)),
        "n_counts_inf": bad_row(n_counts=np.array([[np.inf]], np.float32)),
        "not_utf8": bad_row(gene_ids=broken_ids.reshape(1, -1)),
    }
    bad: list[Request] = []
    for model in models:
        if model == ISP_MODEL:
            isp = batched({"gene_ids": ids[:10], "counts": counts[:10], "perturbation": np.array([b"inhibit"], dtype=object),
                           "rank_shift": np.array([-3.0], np.float32)})
            bad.append(Request("rank_shift_negative", model, isp, ("cell_shift",), bad=True))
            continue
        output = "input_ids" if model == TOKENIZER_MODEL else "cell_embedding"
        bad += [Request(name, model, inputs, (output,), bad=True) for name, inputs in bad_inputs.items()]
    return good, bad


def _result(client: GeneformerClient, request: Request) -> np.ndarray:
    return client.infer(request.model, request.inputs, list(request.outputs))[request.outputs[0]]


def server_rss_mib(pid: int) -> float:
    """RSS of process ``pid`` and its children (python stubs), MiB, from /proc."""
    def children(p: int) -> list[int]:
        try:
            text = Path(f"/proc/{p}/task/{p}/children").read_text()
        except OSError:
            return []
        return [int(c) for c in text.split()]

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo += children(p)
    return total / 1024.0


def run_soak(grpc_url: str, http_url: str, server_pid: int, vocabulary_dir: Path, models: list[str],
             seconds: float = 20.0, clients: int = 32, bad_every: int = 4) -> SoakReport:
    """Run the soak against a running server (see the module docstring); returns the report."""
    good, bad = request_mix(vocabulary_dir, models)
    report = SoakReport(seconds=seconds, clients=clients, models=models)
    with GeneformerClient(grpc_url, "grpc") as client:
        references = [_result(client, r) for r in good]
    lock = threading.Lock()

    def record(request: Request, protocol: str, outcome: object, reference: np.ndarray | None) -> None:
        with lock:
            if request.bad:
                report.bad_requests += 1
                refused = isinstance(outcome, InferenceError) and \
                    str(getattr(outcome.__cause__, "status", lambda: "")()) == INVALID[protocol]
                if not refused:
                    report.bad_not_refused += 1
                    report.examples.append(f"bad {request.model}/{request.name} ({protocol}): {outcome!r}"[:300])
                return
            report.good_requests += 1
            if isinstance(outcome, Exception):
                report.good_errors += 1
                report.examples.append(f"good {request.model}/{request.name} ({protocol}): {outcome!r}"[:300])
                return
            if request.model == TOKENIZER_MODEL:
                deviation = 0.0 if np.array_equal(outcome, reference) else float("inf")
            else:
                deviation = float(np.max(np.abs(np.asarray(outcome, np.float64) - reference)))
            key = request.model
            report.max_abs_deviation[key] = max(report.max_abs_deviation.get(key, 0.0), deviation)
            if deviation > TOLERANCE.get(request.model, 1e-5):
                report.mismatches += 1
                report.examples.append(f"mismatch {request.model}/{request.name} ({protocol}): {deviation:.3g}")

    def worker(index: int, stop_at: float) -> None:
        protocol = "grpc" if index % 2 == 0 else "http"
        rng = np.random.default_rng(index)
        with GeneformerClient(grpc_url if protocol == "grpc" else http_url, protocol,
                              retry=RetryPolicy(attempts=3, backoff_s=0.2)) as client:
            count = index  # staggered: a quarter of the clients start with a bad request
            while time.monotonic() < stop_at:
                count += 1
                if count % bad_every == 0:
                    request, reference = bad[int(rng.integers(len(bad)))], None
                else:
                    k = int(rng.integers(len(good)))
                    request, reference = good[k], references[k]
                try:
                    outcome: object = _result(client, request)
                except Exception as error:  # noqa: BLE001 - recorded and judged
                    outcome = error
                record(request, protocol, outcome, reference)

    started = time.monotonic()
    for _ in range(3):
        stop_at = time.monotonic() + seconds / 3
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda i, stop_at=stop_at: worker(i, stop_at), range(clients)))
        report.rss_mib_per_pass.append(round(server_rss_mib(server_pid), 1))
        LOGGER.info("pass %d: %d good, %d bad so far, server RSS %.1f MiB", len(report.rss_mib_per_pass),
                    report.good_requests, report.bad_requests, report.rss_mib_per_pass[-1])
    report.requests_per_s = round((report.good_requests + report.bad_requests) / (time.monotonic() - started), 2)
    report.examples = report.examples[:10]
    return report.finish()


def write_report(report: SoakReport, out: Path) -> list[Path]:
    """``soak.json`` and ``soak.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    (out / "soak.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        f"# Soak test: {report.seconds:.0f} s, {report.clients} concurrent clients (half gRPC, half HTTP)",
        "",
        f"Models: {', '.join(report.models)}",
        "",
        "| measure | value |", "|---|---|",
        f"| good requests | {report.good_requests} |",
        f"| errors on good requests | {report.good_errors} |",
        f"| results differing from the sequential reference | {report.mismatches} |",
        f"| bad requests | {report.bad_requests} |",
        f"| bad requests not refused with 400 / INVALID_ARGUMENT | {report.bad_not_refused} |",
        f"| requests/s (all) | {report.requests_per_s} |",
        f"| server RSS at the end of passes 1-3 (MiB) | {', '.join(f'{r:.1f}' for r in report.rss_mib_per_pass)} |",
        f"| max abs deviation from the reference | "
        f"{', '.join(f'{m}: {d:.2g}' for m, d in sorted(report.max_abs_deviation.items()))} |",
        "", f"Result: **{'PASSED' if report.passed else 'FAILED'}**",
    ]
    if report.examples:
        lines += ["", "Examples:", *[f"- `{e}`" for e in report.examples]]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    return [out / "soak.json", out / "soak.md"]


def main(argv: list[str] | None = None) -> int:
    from geneformer_triton.serving.server import LocalTritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="an exported model repository (gftriton export)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--out", default=f"bench/results/soak-{time.strftime('%Y-%m-%d')}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repository = Path(args.repository)
    models = [*ENSEMBLES, TOKENIZER_MODEL, ISP_MODEL]
    with LocalTritonServer(repository, model_config_name="cpu") as server:
        report = run_soak(server.grpc_url, server.http_url, server.pid, repository / TOKENIZER_MODEL / "1", models,
                          seconds=args.seconds, clients=args.clients)
    paths = write_report(report, Path(args.out))
    LOGGER.info("%s; wrote %s", "PASSED" if report.passed else "FAILED", ", ".join(map(str, paths)))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
