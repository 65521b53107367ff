"""Triton's Prometheus metrics endpoint: scrape, diff two scrapes, per-model server-side breakdown.

Counters used (per model and version; durations are cumulative microseconds):
``nv_inference_request_success``, ``nv_inference_request_failure``, ``nv_inference_count`` (inferences,
i.e. batch elements), ``nv_inference_exec_count`` (model executions: their ratio is the average batch
the dynamic batcher formed), ``nv_inference_request_duration_us``, ``nv_inference_queue_duration_us``,
``nv_inference_compute_input_duration_us``, ``nv_inference_compute_infer_duration_us``,
``nv_inference_compute_output_duration_us``. Gauges (machine): ``nv_cpu_utilization``,
``nv_cpu_memory_used_bytes``, and on a GPU host ``nv_gpu_utilization``, ``nv_gpu_memory_used_bytes``.
"""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict

_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

COUNTERS = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
)
GAUGES = ("nv_cpu_utilization", "nv_cpu_memory_used_bytes", "nv_gpu_utilization", "nv_gpu_memory_used_bytes")


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(metric, model): value} for the per-model counters; gauges under model "" (summed over GPUs)."""
    values: dict[tuple[str, str], float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match or match["name"] not in COUNTERS + GAUGES:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        try:
            value = float(match["value"])
        except ValueError:
            continue
        values[(match["name"], labels.get("model", ""))] += value
    return dict(values)


def scrape(url: str, timeout_s: float = 5.0) -> dict[tuple[str, str], float]:
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (loopback)
        return parse_metrics(response.read().decode())


def breakdown(before: dict, after: dict, model: str) -> dict[str, float]:
    """Server-side view of one model between two scrapes: counts, average batch, ms per request."""
    def delta(name: str) -> float:
        return after.get((name, model), 0.0) - before.get((name, model), 0.0)

    requests = delta("nv_inference_request_success")
    inferences = delta("nv_inference_count")
    executions = delta("nv_inference_exec_count")
    per_request = (lambda us: us / requests / 1e3) if requests else (lambda us: float("nan"))
    return {
        "requests": requests,
        "failures": delta("nv_inference_request_failure"),
        "inferences": inferences,
        "executions": executions,
        "avg_batch": inferences / executions if executions else float("nan"),
        "request_ms": per_request(delta("nv_inference_request_duration_us")),
        "queue_ms": per_request(delta("nv_inference_queue_duration_us")),
        "compute_input_ms": per_request(delta("nv_inference_compute_input_duration_us")),
        "compute_infer_ms": per_request(delta("nv_inference_compute_infer_duration_us")),
        "compute_output_ms": per_request(delta("nv_inference_compute_output_duration_us")),
        "compute_infer_ms_per_exec": (delta("nv_inference_compute_infer_duration_us") / executions / 1e3) if executions else float("nan"),
    }


def gauges(snapshot: dict) -> dict[str, float]:
    return {name: snapshot.get((name, ""), float("nan")) for name in GAUGES}
