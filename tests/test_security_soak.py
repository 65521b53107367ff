"""A short soak (~20 s, ``GFTRITON_SOAK_SECONDS`` to change) of geneformer_triton.bench.soak against the suite's real
server: 32 concurrent clients, good and bad requests to every public model. Plus the gates' negative
controls: a wrong reference and a "bad" request that the server accepts must fail the report."""

from __future__ import annotations

import os

import numpy as np

from geneformer_triton.bench.soak import ENSEMBLES, Request, SoakReport, request_mix, run_soak, write_report
from geneformer_triton.core.contract import ISP_MODEL, TOKENIZER_MODEL

MODELS = [*ENSEMBLES, TOKENIZER_MODEL, ISP_MODEL]


def test_soak_good_and_bad_requests_against_every_public_model(triton_server, exported_repository, tmp_path):
    seconds = float(os.environ.get("GFTRITON_SOAK_SECONDS", "20"))
    report = run_soak(triton_server.grpc_url, triton_server.http_url, triton_server.pid,
                      exported_repository / TOKENIZER_MODEL / "1", MODELS, seconds=seconds, clients=32)
    write_report(report, tmp_path)
    assert report.good_requests >= 50 and report.bad_requests >= 10, report
    assert report.good_errors == 0 and report.mismatches == 0 and report.bad_not_refused == 0, report.examples
    assert len(report.rss_mib_per_pass) == 3 and report.passed, report
    assert set(report.max_abs_deviation) == set(MODELS)
    assert "PASSED" in (tmp_path / "soak.md").read_text()


def test_soak_gates_fail_on_wrong_results_accepted_bad_input_and_growing_memory(exported_repository):
    good, bad = request_mix(exported_repository / TOKENIZER_MODEL / "1", MODELS)
    assert {r.model for r in good} == set(MODELS) and {r.model for r in bad} == set(MODELS)
    assert all(r.bad for r in bad) and not any(r.bad for r in good)
    assert isinstance(good[0], Request) and np.asarray(good[0].inputs["counts"]).dtype == np.float32
    ok = dict(good_requests=10, bad_requests=5, rss_mib_per_pass=[500.0, 510.0, 520.0])
    assert SoakReport(1, 1, MODELS, **ok).finish().passed
    assert not SoakReport(1, 1, MODELS, **ok, mismatches=1).finish().passed
    assert not SoakReport(1, 1, MODELS, **ok, bad_not_refused=1).finish().passed
    assert not SoakReport(1, 1, MODELS, **{**ok, "rss_mib_per_pass": [500.0, 600.0, 700.0]}).finish().passed
