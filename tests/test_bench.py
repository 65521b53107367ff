"""`gftriton bench --mode quick` end to end: real in-process methods on real cells, a real tritonserver,
real perf_analyzer; the results folder's files, columns and ratios are checked for consistency."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from geneformer_triton.bench import perf
from geneformer_triton.bench.methods import BASELINE, MethodSpec, plan_batches

PLOTS = ("throughput_by_method.png", "speedup_over_baseline.png", "fidelity_by_method.png",
         "latency_percentiles.png", "triton_throughput.png", "scaling.png")


def test_plan_batches_strategies():
    lengths = np.array([100, 900, 300, 2048, 50, 700, 1200, 400])
    sorted_plan = plan_batches(lengths, MethodSpec("s", "", "encoder", "pytorch", "fp32", "sorted", 3))
    assert [list(i) for i, _ in sorted_plan] == [[3, 6, 1], [5, 7, 2], [0, 4]]
    assert [p for _, p in sorted_plan] == [2048, 700, 100]
    input_plan = plan_batches(lengths, MethodSpec("i", "", "baseline", "transformers", "fp32", "input", 3))
    assert [list(i) for i, _ in input_plan] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    bucketed = plan_batches(lengths, MethodSpec("b", "", "encoder", "pytorch", "fp32", "bucketed", 64, token_budget=2500))
    assert sorted(np.concatenate([i for i, _ in bucketed]).tolist()) == list(range(8))
    assert all(len(i) * p <= 2500 or len(i) == 1 for i, p in bucketed)
    padded = plan_batches(lengths, MethodSpec("p", "", "encoder", "pytorch", "fp32", "sorted", 2, pad_multiple=256), 2048)
    assert all(p % 256 == 0 for _, p in padded)


def test_perf_input_groups_share_shapes():
    cells = [np.arange(2, 2 + n) for n in (5, 9, 3, 7, 4)]
    data = perf.encoder_input_data(cells, "onnx", batch_size=2)["data"]
    assert len(data) == 6  # 5 cells, the last group refilled
    for a, b in zip(data[0::2], data[1::2]):
        assert a["input_ids"]["shape"] == b["input_ids"]["shape"] == a["attention_mask"]["shape"]
    single = perf.encoder_input_data(cells, "torchscript", batch_size=1)["data"]
    assert [s["input_ids__0"]["shape"][0] for s in single] == [5, 9, 3, 7, 4]
    assert single[2]["input_ids__0"]["content"] == [2, 3, 4] and single[2]["attention_mask__1"]["content"] == [1, 1, 1]


def test_packed_encoder_matches_padded(loaded_model, celltypist_tokens):
    """The padding-free encoder (GPU method torch_bf16_packed; CPU fallback here) equals the padded one."""
    import torch

    from geneformer_triton.bench.packed import PackedEncoder
    from geneformer_triton.core.tokenizer import pad_token_batch

    encoder = loaded_model.encoder()
    ids, mask = pad_token_batch([c[:n] for c, n in zip(celltypist_tokens[:3], (40, 17, 64))])
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(ids), torch.from_numpy(mask))[0]
        got = PackedEncoder(encoder)(torch.from_numpy(ids), torch.from_numpy(mask))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, exported_repository):
    from geneformer_triton.bench.cli import main

    out = tmp_path_factory.mktemp("bench") / "results"
    work = tmp_path_factory.mktemp("bench_work")
    assert main(["--mode", "quick", "--out", str(out), "--work-dir", str(work), "--repository", str(exported_repository)]) == 0
    return out


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-12)


def test_quick_files(quick_results):
    out = quick_results
    for name in ("inprocess.csv", "inprocess.json", "triton.csv", "triton.json", "triton_metrics.csv", "scaling.csv",
                 "scaling.json", "summary.json", "report.md", *PLOTS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "perf_analyzer").glob("*.csv")), "perf_analyzer's own CSVs are kept"
    assert (out / "perf_inputs" / "onnx_b1.json").is_file() and (out / "perf_inputs" / "ensemble_b1.json").is_file()
    report = (out / "report.md").read_text()
    for heading in ("## Headline: the served path", "## Targets", "## In-process", "## Through Triton", "## Scaling",
                    "![throughput_by_method.png]"):
        assert heading in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "quick" and summary["cells"]["n_cells"] == 8 and summary["cells"]["max_length"] == 512
    assert summary["targets"] and all({"target", "value", "passed"} <= set(t) for t in summary["targets"])
    assert "L²" in summary["flops_formula"]


def test_quick_inprocess_consistent(quick_results):
    table = pd.read_csv(quick_results / "inprocess.csv")
    assert json.loads((quick_results / "inprocess.json").read_text())[0]["method"] == table["method"].iloc[0]
    assert set(table["method"]) >= {BASELINE, "torch_fp32_sorted", "onnx_fp32_b1", "onnx_int8_b1", "torchscript_fp32_b1"}
    assert (table["error"].fillna("") == "").all(), table[["method", "error"]]
    base = table.loc[table["method"] == BASELINE, "cells_per_s"].iloc[0]
    for row in table.itertuples():
        assert row.cells_per_s > 0 and row.n_cells == 8
        assert _close(row.ratio_vs_baseline, row.cells_per_s / base)
        assert _close(row.cells_per_s, row.n_cells / row.wall_s)  # wall_s: the median repeat
        assert row.repeats == 3 and row.cells_per_s_min <= row.cells_per_s <= row.cells_per_s_max
        assert _close(row.cells_per_s_min, row.n_cells / row.wall_s_max)
        assert row.cells_per_cpu_s_min <= row.cells_per_cpu_s <= row.cells_per_cpu_s_max
        assert row.loadavg_before >= 0 and row.loadavg_after >= 0
        assert _close(row.tokens_per_s, row.tokens / row.wall_s)
        assert _close(row.useful_tflop_per_s, row.useful_gflop_per_cell * row.n_cells / row.wall_s / 1e3)
        assert row.executed_gflop_per_cell >= row.useful_gflop_per_cell * (1 - 1e-9)
        assert row.fidelity_pass and row.cosine_min >= row.fidelity_threshold
        assert row.rss_peak_mb > 0 and row.cpu_s >= 0
    # every cell is truncated to 512 tokens: the useful FLOPs per cell follow the formula exactly
    layer = 2 * 512 * (4 * 256**2 + 2 * 256 * 512) + 4 * 512**2 * 256
    assert np.allclose(table["useful_gflop_per_cell"], 6 * layer / 1e9)
    baseline = table[table["method"] == BASELINE].iloc[0]
    lm_head = 2 * 512 * (256**2 + 256 * 25426)
    assert _close(baseline["executed_gflop_per_cell"], (6 * layer + lm_head) / 1e9)
    assert _close(table.loc[table["method"] == "torch_fp32_sorted", "cosine_min"].iloc[0], 1.0)


def test_quick_triton_consistent(quick_results):
    table = pd.read_csv(quick_results / "triton.csv")
    models = ("geneformer_onnx_int8", "geneformer_embed_onnx_int8")
    assert set(zip(table["model"], table["protocol"])) == {(m, p) for m in models for p in ("grpc", "http", "grpc+client")}
    assert (table["error"].fillna("") == "").all(), table[["model", "error"]]
    client = table[table["protocol"] == "grpc+client"]
    for row in client.itertuples():  # the project's client, timed like everything else
        assert row.repeats == 3 and row.cells_per_s_min <= row.cells_per_s <= row.cells_per_s_max
        assert row.server_cpu_s_per_cell > 0 and _close(row.efficiency, row.cells_per_s / row.inprocess_cells_per_s)
    table = table[table["protocol"] != "grpc+client"]
    for row in table.itertuples():
        assert row.cells_per_s > 0 and row.inprocess_cells_per_s > 0
        assert _close(row.efficiency, row.cells_per_s / row.inprocess_cells_per_s)
        assert row.throughput_source == "littles_law"
        assert _close(row.cells_per_s, row.concurrency * row.batch_size / (row.avg_latency_ms / 1e3))
        assert 0.5 < row.cells_per_s / row.cells_per_s_perf_analyzer < 10  # whole-second windows in short runs
        assert _close(row.inprocess_cells_per_s, (row.inprocess_before + row.inprocess_after) / 2)
        assert row.repeats == 3 and row.cells_per_s_min <= row.cells_per_s <= row.cells_per_s_max
        assert row.server_cpu_s_per_cell > 0 and _close(row.cpu_efficiency, row.inprocess_cpu_s_per_cell / row.server_cpu_s_per_cell)
        assert row.loadavg_before >= 0 and row.gate_pass  # the served file's in-process run held its gate
        assert row.p50_ms <= row.p90_ms <= row.p95_ms <= row.p99_ms
        assert row.server_compute_infer_ms > 0 and row.enc_avg_batch >= 1
        assert (quick_results / row.csv).is_file()
        header = (quick_results / row.csv).read_text().splitlines()[0]
        assert "Server Queue" in header and "Server Compute Infer" in header
    ensembles = table[table["model"] == "geneformer_embed_onnx_int8"]
    assert (ensembles["tok_compute_infer_ms"] > 0).all()
    metrics = pd.read_csv(quick_results / "triton_metrics.csv")
    encoder = metrics[(metrics["model"] == "geneformer_onnx_int8") & (metrics["composing_model"] == "geneformer_onnx_int8")]
    assert len(encoder) == 2 and (encoder["failures"] == 0).all()
    served = table[table["model"] == "geneformer_onnx_int8"]
    assert (encoder["requests"].to_numpy() == (served["request_count"] * served["repeats"]).to_numpy()).all()
    assert set(metrics[metrics["model"] == "geneformer_embed_onnx_int8"]["composing_model"]) == {
        "geneformer_tokenizer", "geneformer_onnx_int8"}
    report = (quick_results / "report.md").read_text()
    assert "`geneformer_embed_onnx_int8` (grpc" in report  # the declared headline model, not the fastest row


def test_targets_use_every_concurrency_and_the_seed():
    """The efficiency target must hold at every concurrency >= 2 (one dip fails it), and the served ratio is
    against the seed baseline (helical get_embeddings): a run without it does not meet the target."""
    from geneformer_triton.bench.report import add_served_ratios, evaluate_targets

    inprocess = pd.DataFrame([
        {"method": "helical_get_embeddings", "family": "helical", "cells_per_s": 0.5, "cells_per_s_min": 0.4,
         "cells_per_s_max": 0.6, "cpu_s_per_cell": 4.0, "fidelity_pass": True, "error": ""},
        {"method": "onnx_int8_b1", "family": "encoder", "cells_per_s": 11.0, "cells_per_s_min": 10.0,
         "cells_per_s_max": 12.0, "cpu_s_per_cell": 0.18, "fidelity_pass": True, "error": ""},
    ])
    def served(efficiencies, base=inprocess):
        rows = [{"model": "geneformer_onnx_int8", "protocol": "grpc", "concurrency": c, "cells_per_s": 11.0 * e,
                 "cells_per_s_min": 10.0 * e, "cells_per_s_max": 12.0 * e, "server_cpu_s_per_cell": 0.2,
                 "efficiency": e, "inprocess_method": "onnx_int8_b1", "error": ""} for c, e in efficiencies]
        frame = pd.DataFrame(rows)
        add_served_ratios(frame, base)
        return frame

    good = evaluate_targets(inprocess, served([(1, 0.7), (2, 0.95), (4, 0.92)]), "full")
    by_kind = {t["target"].split(" ")[0] + t["target"].split(" ")[1]: t for t in good}
    assert by_kind["bestserved"]["passed"] and "20.90x" in by_kind["bestserved"]["value"]  # 10.45 / 0.5
    assert by_kind["served>="]["passed"]  # concurrency 1 is not part of the target
    dip = evaluate_targets(inprocess, served([(2, 0.95), (4, 0.6), (8, 0.99)]), "full")
    assert not [t for t in dip if t["target"].startswith("served >=")][0]["passed"]
    faster_seed = inprocess.assign(cells_per_s=[0.6, 11.0])
    slow = evaluate_targets(faster_seed, served([(2, 0.95)], faster_seed), "full")
    assert not [t for t in slow if t["target"].startswith("best served")][0]["passed"]  # 10.45 / 0.6 < 20
    without = inprocess[inprocess["method"] != "helical_get_embeddings"]
    no_seed = evaluate_targets(without, served([(2, 0.95)], without), "full")
    assert not [t for t in no_seed if t["target"].startswith("best served")][0]["passed"]


def test_quick_scaling(quick_results):
    table = pd.read_csv(quick_results / "scaling.csv")
    assert set(table["sweep"]) == {"cells", "length", "batch"}
    assert (table["error"].fillna("") == "").all()
    length = table[table["sweep"] == "length"].sort_values("x")
    assert list(length["x"]) == [128, 256, 512] and np.allclose(length["tokens_mean"], length["x"])
    assert list(table[table["sweep"] == "cells"]["n_cells"]) == [4, 8]
    assert (table["cells_per_s"] > 0).all()


@pytest.mark.parametrize("mode", ["quick", "full", "gpu"])
def test_mode_plans_resolve(mode):
    """Every mode names methods, served models and exports that exist (the GPU one cannot run here)."""
    from geneformer_triton.bench.cli import mode_plan

    plan = mode_plan(mode)
    assert plan["headline"] in plan["served"] and plan["repeats"] >= 3
    if mode == "gpu":
        assert "torch_bf16_packed" in plan["methods"] and "torchscript_bf16" in plan["exports"]


def test_gpu_script_dry_run_on_cpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "VPY": sys.executable, "PYTHONPATH": str(root)}
    result = subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["served"]["geneformer_embed_torchscript_bf16"] == "torchscript_bf16_gpu"


def test_a_reused_export_gets_the_installed_python_models(tmp_path):
    """A bench export reused for its matching weights must not serve stale model.py files (they import modules that moved)."""
    from geneformer_triton.core.contract import ISP_MODEL, TOKENIZER_MODEL
    from geneformer_triton.export.repository import PYTHON_MODEL_SOURCES, copy_python_models

    export = tmp_path / "export"
    stale, same = export / TOKENIZER_MODEL / "1" / "model.py", export / ISP_MODEL / "1" / "model.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("import geneformer_triton.dictionaries\n")
    (stale.parent / "model.onnx").write_bytes(b"weights")
    same.parent.mkdir(parents=True)
    same.write_bytes((PYTHON_MODEL_SOURCES / ISP_MODEL / "1" / "model.py").read_bytes())
    os.utime(same, (1, 1))
    assert copy_python_models(export) == [stale]
    assert stale.read_bytes() == (PYTHON_MODEL_SOURCES / TOKENIZER_MODEL / "1" / "model.py").read_bytes()
    assert (stale.parent / "model.onnx").read_bytes() == b"weights"
    assert same.stat().st_mtime == 1  # an unchanged file is left alone
