"""Cells sent concurrently to ``geneformer_isp`` are merged by Triton's dynamic batcher into one ``execute``
and share encoder batches (issue 15), with the same numbers as one cell at a time.

Proof of merging comes from Triton's own statistics, not from our code: the ISP model's
``execution_count`` against its ``inference_count`` (and its ``batch_stats``), and the encoders' execution
counts. Cells: Norman K562 control cells (short, ~15 genes), overexpress KLF1 (not measured in the screen:
one perturbation per cell, the case packing across cells is for) and delete-all. Negative controls: a bad
cell among merged requests fails alone with INVALID_ARGUMENT naming what and where; a request whose batch
dimension is not 1 (or has none) is rejected; one-at-a-time requests are never merged (the statistic
distinguishes). Upstream oracle values for merged requests: tests/test_isp_oracle.py (its runs keep every
cell in flight).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient

from geneformer_triton.client.isp import CellTable, cell_table_from_anndata
from geneformer_triton.client.isp_run import run_isp
from geneformer_triton.client.isp_spec import IspSpec, infer_cell
from geneformer_triton.client.isp_store import ResultStore
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError
from geneformer_triton.core.cell_inputs import InputOptions, SymbolMap
from geneformer_triton.core.contract import ISP_ENCODERS, ISP_MODEL
from geneformer_triton.core.isp_service import batched

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
PERTURBENCH = SHARED / "data" / "perturbench_norman19_k562.h5ad"
N_CELLS = 12
KLF1 = "ENSG00000105610"
SCORES = ("cell_emb_shift", "cell_shift")
ATOL = 1e-6  # merged vs one at a time: same rows, other batch neighbours and padding


@pytest.fixture(scope="module")
def k562(v1_vocabulary) -> CellTable:
    """The first N_CELLS Norman K562 control cells with >= 4 genes (counts recovered from the log-normalized X)."""
    import anndata

    adata = anndata.read_h5ad(PERTURBENCH)
    adata = adata[adata.obs["condition"] == "control"][:400].copy()
    symbols = SymbolMap(v1_vocabulary.gene_name_to_id, "the V1 dictionaries")
    table = cell_table_from_anndata(adata, InputOptions(allow_non_integer=True), symbols, str(PERTURBENCH))
    rows = [r for r in range(len(table)) if len(table.cell(r)[0]) >= 4][:N_CELLS]
    assert len(rows) == N_CELLS
    return CellTable(table.counts[rows], table.gene_ids, table.n_counts[rows], [table.cell_ids[r] for r in rows],
                     dict(table.symbols))


@pytest.fixture(scope="module")
def client(triton_server):
    with GeneformerClient(triton_server.grpc_url, "grpc", concurrency=N_CELLS, timeout_s=300) as c:
        c.wait_ready(120, ISP_MODEL)
        yield c


@pytest.fixture(scope="module")
def stats(triton_server):
    """counts(model) -> (inference_count, execution_count, {batch_size: executions}) from Triton's statistics."""
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def counts(model: str) -> tuple[int, int, dict]:
        found = grpc.get_inference_statistics(model, as_json=True).get("model_stats", [])
        total = [int(s.get("inference_count", 0)) for s in found], [int(s.get("execution_count", 0)) for s in found]
        sizes: dict = {}
        for s in found:
            for entry in s.get("batch_stats", []):
                size = int(entry["batch_size"])
                sizes[size] = sizes.get(size, 0) + int(entry["compute_infer"]["count"])
        return sum(total[0]), sum(total[1]), sizes

    yield counts
    grpc.close()


def _encoder_executions(client: GeneformerClient, stats) -> int:
    loaded = set(client.ready_models())
    return sum(stats(model)[1] for model in ISP_ENCODERS if model in loaded)


def _run(client, cells: CellTable, spec: IspSpec, work: Path, concurrency: int) -> pd.DataFrame:
    with ResultStore(work, spec.fingerprint(), columns=spec.columns()) as store:
        run_isp(client, cells, spec, store, concurrency=concurrency)
        frame = store.read()
    return frame.sort_values(["cell_id", "target_index"]).reset_index(drop=True)


def _delta(before: tuple, after: tuple) -> tuple[int, int, dict]:
    sizes = {k: v - before[2].get(k, 0) for k, v in after[2].items() if v - before[2].get(k, 0)}
    return after[0] - before[0], after[1] - before[1], sizes


@pytest.mark.parametrize("spec", [
    IspSpec(perturbation="overexpress", targets=(KLF1,)),  # one perturbation per cell
    IspSpec(perturbation="delete"),  # delete all: ~15 per cell
    IspSpec(perturbation="delete", semantics="ours", targets=None),  # token protocol: each cell's own chunks
], ids=["overexpress_KLF1", "delete_all", "ours_delete_all"])
def test_concurrent_cells_are_merged_with_one_at_a_time_numbers(client, stats, k562, spec, tmp_path):
    before = stats(ISP_MODEL), _encoder_executions(client, stats)
    alone = _run(client, k562, spec, tmp_path / "alone.parquet", concurrency=1)
    middle = stats(ISP_MODEL), _encoder_executions(client, stats)
    merged = _run(client, k562, spec, tmp_path / "merged.parquet", concurrency=N_CELLS)
    after = stats(ISP_MODEL), _encoder_executions(client, stats)

    requests, executions, sizes = _delta(before[0], middle[0])
    assert (requests, executions, sizes) == (N_CELLS, N_CELLS, {1: N_CELLS}), "one at a time must not merge (control)"
    requests, executions, sizes = _delta(middle[0], after[0])
    assert requests == N_CELLS and executions < N_CELLS, f"no merged execute: {executions} executions, sizes {sizes}"
    assert max(sizes) >= 2 and sum(size * n for size, n in sizes.items()) == N_CELLS, sizes
    if spec.upstream:  # packed rows of several cells: fewer encoder calls than one cell per call
        assert after[1] - middle[1] < middle[1] - before[1], (after[1] - middle[1], middle[1] - before[1])

    assert len(alone) == len(merged) > 0 and set(alone["cell_id"]) == set(k562.cell_ids)
    assert list(alone["gene_id"]) == list(merged["gene_id"])
    if spec.perturbation == "overexpress":
        assert set(alone["gene_id"]) == {KLF1}
    columns = SCORES if spec.upstream else ("cell_shift",)
    for column in columns:
        np.testing.assert_allclose(merged[column], alone[column], rtol=0, atol=ATOL, err_msg=column)
    # negative control: the comparison sees a one-row mix-up
    shuffled = np.roll(alone[columns[0]].to_numpy(), 1)
    assert np.abs(shuffled - merged[columns[0]].to_numpy()).max() > ATOL


def _concurrently(client, requests: list[dict], outputs: list[str]) -> list:
    """Send ``requests`` at the same moment (a barrier); each result or the InferenceError it raised."""
    barrier = threading.Barrier(len(requests))

    def one(inputs: dict):
        barrier.wait()
        try:
            return infer_cell(client, ISP_MODEL, inputs, outputs)
        except InferenceError as error:
            return error

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_bad_cell_among_merged_requests_fails_alone(client, stats, k562):
    spec = IspSpec(perturbation="overexpress", targets=(KLF1,))
    requests = [spec.request_inputs(*k562.cell(r), float(k562.n_counts[r])) for r in range(N_CELLS)]
    bad = dict(requests[5], counts=requests[5]["counts"].copy())
    bad["counts"][2] = np.nan
    outputs = spec.outputs()
    alone = [infer_cell(client, ISP_MODEL, inputs, outputs) for inputs in requests]
    before = stats(ISP_MODEL)
    results = _concurrently(client, requests[:5] + [bad] + requests[6:], outputs)
    _, executions, sizes = _delta(before, stats(ISP_MODEL))
    assert executions < N_CELLS and max(sizes) >= 2, (executions, sizes)

    error = results[5]
    assert isinstance(error, InferenceError), error
    assert str(error.__cause__.status()) == "StatusCode.INVALID_ARGUMENT", error
    assert "geneformer_isp: counts, cell 0: 1 NaN count value(s) (first at gene column 2" in str(error), str(error)
    for k, (result, expected) in enumerate(zip(results, alone)):
        if k == 5:
            continue
        assert not isinstance(result, Exception), (k, result)
        np.testing.assert_allclose(result["cell_emb_shift"], expected["cell_emb_shift"], rtol=0, atol=ATOL)


def test_request_with_batch_dimension_other_than_one_is_rejected(client, k562):
    spec = IspSpec(perturbation="overexpress", targets=(KLF1,))
    one_cell = spec.request_inputs(*k562.cell(0), float(k562.n_counts[0]))
    two = {name: np.concatenate([value, value]) for name, value in batched(one_cell).items()}  # [2, ...]
    with pytest.raises(InferenceError) as info:
        client.infer(ISP_MODEL, two, ["cell_emb_shift"])
    assert str(info.value.__cause__.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "gene_ids has shape [2, " in str(info.value) and "one cell per request" in str(info.value), str(info.value)
    with pytest.raises(InferenceError, match="geneformer_isp") as info:  # no batch dimension: Triton's shape check
        client.infer(ISP_MODEL, one_cell, ["cell_emb_shift"])
    assert str(info.value.__cause__.status()) == "StatusCode.INVALID_ARGUMENT", str(info.value)
    uneven = dict(batched(one_cell), gene_ids=two["gene_ids"], counts=two["counts"])  # batch 2 beside batch 1
    with pytest.raises(InferenceError, match="batch size does not match other inputs"):
        client.infer(ISP_MODEL, uneven, ["cell_emb_shift"])
    # the same cell, well formed, is served
    assert infer_cell(client, ISP_MODEL, one_cell, ["cell_emb_shift"])["cell_emb_shift"].shape == (1,)


def test_wire_batch_dimension_and_one_value_inputs_in_process():
    """The per-request unbatching and the one-value parsing of the served model's core (no server)."""
    from geneformer_triton.core.isp_service import IspInputError, one_cell_inputs, parse_request, unbatched

    cell = {"gene_ids": np.array([b"ENSG00000141510", b"ENSG00000133703"], dtype=object),
            "counts": np.array([3, 1], np.float32), "perturbation": np.array([b"delete"], dtype=object),
            "n_counts": np.array([10.0], np.float32), "rank_shift": None}
    wire = batched(cell)
    assert wire["gene_ids"].shape == (1, 2) and wire["rank_shift"] is None
    parsed = parse_request(one_cell_inputs(wire.get))
    assert list(parsed.gene_ids) == ["ENSG00000141510", "ENSG00000133703"] and parsed.n_counts == 10.0
    assert unbatched({"cell_shift": np.zeros((1, 3))})["cell_shift"].shape == (3,)
    with pytest.raises(ValueError, match=r"cell_shift has shape \[2, 3\]; a geneformer_isp output has batch dimension 1"):
        unbatched({"cell_shift": np.zeros((2, 3))})
    two = dict(wire, gene_ids=np.concatenate([wire["gene_ids"]] * 2))
    with pytest.raises(IspInputError, match=r"gene_ids has shape \[2, 2\]: geneformer_isp takes one cell per request"):
        parse_request(one_cell_inputs(two.get))
    for name, value, message in (("n_counts", [1.0, 2.0], "n_counts must hold one value"),
                                 ("rank_shift", [1.0, 2.0], "rank_shift must hold one value"),
                                 ("emb_layer", np.array([0.5], np.float32), "emb_layer must hold one value"),
                                 ("return_gene_shift", [True, False], "return_gene_shift must hold one value")):
        bad = dict(cell, **{name: np.asarray(value)})
        with pytest.raises(IspInputError, match=message):
            parse_request(bad.get)
