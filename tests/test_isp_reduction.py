"""ISP reduction where the encoder runs (export/isp_reduction_export.py) and cells packed per encoder batch.

The reduced ONNX graph (``geneformer_onnx_isp_reduced``) must give the numbers of the token-embedding
encoder (``geneformer_onnx_isp``) reduced on the host, within 1e-5, in process and through a real
tritonserver; packing several cells into shared batches must give each cell the numbers of its own
solo run, under the token budget, in order, with a bad cell failing alone. The upstream oracle itself is
tests/test_isp_oracle.py (it runs through the reduced encoder, which geneformer_isp prefers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from geneformer_triton.client.isp_spec import infer_cell
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError
from geneformer_triton.core.isp_upstream import plan_upstream
from geneformer_triton.core.isp_upstream_service import UpstreamJob
from geneformer_triton.core.perturbation import pack_rows, reduce_token_rows, run_packed, token_reduced_encode
from geneformer_triton.export.isp_reduction_export import run_isp_reduction
from geneformer_triton.model.runtimes import onnx_encode_fn, onnx_session

ATOL = 1e-5
REDUCED = "geneformer_onnx_isp_reduced"
TOKENS = "geneformer_onnx_isp"
ISP = "geneformer_isp"


def job(cell: np.ndarray, kind: str = "delete", states=None, emb_mode: str = "cell_and_gene") -> UpstreamJob:
    plan = plan_upstream(cell, kind, "all")
    return UpstreamJob(plan=plan, labels=[str(p.label) for p in plan.perturbations], cell_genes=[], emb_mode=emb_mode,
                       states=states, max_tokens=1 << 20, max_batch=None)


def assert_close(a: dict, b: dict, keys=("cell_emb_shift", "cell_shift", "original_embedding", "gene_cos", "state_shift")) -> None:
    for key in keys:
        if key in a or key in b:
            assert a[key].shape == b[key].shape, key
            np.testing.assert_allclose(a[key], b[key], atol=ATOL, rtol=0, err_msg=key)


@pytest.fixture(scope="module")
def cells(celltypist_tokens) -> list[np.ndarray]:
    """Short real cells of different lengths (a celltypist cell's top genes)."""
    return [np.asarray(celltypist_tokens[i][:n], dtype=np.int64) for i, n in enumerate((23, 40, 9, 31))]


@pytest.fixture(scope="module")
def reduced_session(exported_repository):
    return onnx_session(exported_repository / REDUCED / "1" / "model.onnx")


@pytest.fixture(scope="module")
def token_encode(exported_repository):
    return onnx_encode_fn(exported_repository / TOKENS / "1" / "model.onnx")


def graph_encode(session):
    return lambda batch: run_isp_reduction(session, batch.input_ids, batch.attention_mask, batch.original_offset,
                                           batch.position_map)


# ----------------------------------------------------------------------------- the graph


def test_reduced_graph_equals_host_reduction(exported_repository, reduced_session, token_encode, cells):
    manifest = json.loads((exported_repository / REDUCED / "1" / "manifest.json").read_text())
    assert manifest["isp_reduction"] is True and manifest["hidden_state_index"] == manifest["num_hidden_layers"] - 1
    jobs = [job(c, kind) for c in cells for kind in ("delete", "overexpress")]
    batches = pack_rows([j.rows() for j in jobs], max_tokens=1500)
    assert len(batches) > 1 and any(len({m[0] for m in b.members}) > 1 for b in batches)
    for batch in batches:
        means, cos = run_isp_reduction(reduced_session, batch.input_ids, batch.attention_mask, batch.original_offset,
                                       batch.position_map)
        _, tokens = token_encode(batch.input_ids, batch.attention_mask)
        ref_means, ref_cos = reduce_token_rows(tokens, batch.attention_mask, batch.original_offset, batch.position_map)
        assert means.dtype == cos.dtype == np.float32 and cos.shape == batch.input_ids.shape
        np.testing.assert_allclose(means, ref_means, atol=ATOL, rtol=0)
        np.testing.assert_allclose(cos, ref_cos, atol=ATOL, rtol=0)
        compared = batch.position_map >= 0
        assert np.all(cos[~compared] == 0) and compared.sum() > 0
    # negative control: rows of different cells in one batch, every row compared with row 0 (cell 0's original)
    (mixed, *_) = pack_rows([job(c).rows() for c in cells], max_tokens=1 << 16)
    assert len({j for j, _ in mixed.members}) == len(cells)
    _, right = run_isp_reduction(reduced_session, mixed.input_ids, mixed.attention_mask, mixed.original_offset,
                                 mixed.position_map)
    _, wrong = run_isp_reduction(reduced_session, mixed.input_ids, mixed.attention_mask,
                                 np.arange(len(mixed.members))[:, None], mixed.position_map)
    assert np.abs(wrong - right).max() > 0.1


# ----------------------------------------------------------------------------- packing


def test_packing_respects_budget_order_and_originals(cells):
    jobs = [job(c) for c in cells]
    rows = [j.rows() for j in jobs]
    budget = 600
    batches = pack_rows(rows, max_tokens=budget, max_batch=16)
    seen = []
    for batch in batches:
        assert batch.tokens <= budget and len(batch.members) <= 16
        where = {m: b for b, m in enumerate(batch.members)}
        for b, (j, r) in enumerate(batch.members):
            row = rows[j][r]
            np.testing.assert_array_equal(batch.input_ids[b, : row.sequence.size], row.sequence)
            if row.original >= 0:
                assert where[(j, row.original)] == b - batch.original_offset[b, 0]
                seen.append((j, r))
    assert seen == [(j, r) for j in range(len(rows)) for r in range(len(rows[j])) if rows[j][r].original >= 0]
    assert any(len({j for j, _ in b.members}) > 1 for b in batches), "short cells must share batches"
    # a row that does not fit with its original even alone gets a batch of its own
    lonely = pack_rows(rows[:1], max_tokens=10)
    assert all(len(b.members) <= 2 for b in lonely)
    with pytest.raises(ValueError, match="max_batch"):
        pack_rows(rows, max_tokens=budget, max_batch=1)


def test_packed_cells_equal_solo_runs_and_the_chunk_path(reduced_session, token_encode, cells):
    states = np.random.default_rng(0).normal(size=(2, 256))
    packed = [job(c, states=states) for c in cells]
    assert run_packed(packed, graph_encode(reduced_session), max_tokens=2048, max_batch=64) == [None] * len(cells)
    for cell, done in zip(cells, packed):
        solo = job(cell, states=states)
        assert run_packed([solo], token_reduced_encode(token_encode), max_tokens=1 << 16) == [None]
        chunked = job(cell, states=states)
        for k in range(len(chunked.chunks)):  # the token-embedding chunk path (host reduction in isp_upstream.score)
            ids, mask = chunked.batch(k)
            chunked.accumulate(k, *token_encode(ids, mask))
        out = done.outputs()
        assert_close(out, solo.outputs())
        assert_close(out, chunked.outputs())
        assert list(out["perturbed_genes"]) == list(solo.outputs()["perturbed_genes"])
    # negative control: another cell's results do not pass the same comparison
    with pytest.raises(AssertionError):
        assert_close(packed[0].outputs(), packed[3].outputs(), keys=("original_embedding",))


def test_a_bad_cell_fails_alone(reduced_session, cells):
    good = [job(c) for c in cells]
    bad = job(cells[1], states=np.ones((1, 7)))  # state of the wrong hidden size: scoring fails
    jobs = good[:2] + [bad] + good[2:]
    errors = run_packed(jobs, graph_encode(reduced_session), max_tokens=4096)
    assert [e is None for e in errors] == [True, True, False, True, True]
    for cell, done in zip(cells, good):
        solo = job(cell)
        run_packed([solo], graph_encode(reduced_session), max_tokens=4096)
        assert_close(done.outputs(), solo.outputs())
    with pytest.raises(RuntimeError, match="not encoded"):
        bad.outputs()

    def failing(batch):  # an encoder failing every batch holding cell 2's longest row
        if batch.input_ids.shape[1] == cells[2].size:
            raise RuntimeError("encoder down")
        return graph_encode(reduced_session)(batch)

    errors = run_packed([job(c) for c in cells], failing, max_tokens=cells[2].size * 4)
    assert errors[2] is not None and errors[0] is None


# ----------------------------------------------------------------------------- served


def _request(cell_genes: np.ndarray, counts: np.ndarray, states: np.ndarray, encoder: str | None, emb_layer: int = -1) -> dict:
    inputs = {"gene_ids": np.array([g.encode() for g in cell_genes], dtype=object), "counts": counts.astype(np.float32),
              "perturbation": np.array([b"delete"], dtype=object), "emb_mode": np.array([b"cell_and_gene"], dtype=object),
              "state_embeddings": states.astype(np.float32), "emb_layer": np.array([emb_layer], np.int32)}
    if encoder:
        inputs["encoder_model"] = np.array([encoder.encode()], dtype=object)
    return inputs


def test_served_reduced_encoder_equals_token_encoder(triton_server, v1_vocabulary, cells):
    outputs = ["perturbed_genes", "cell_emb_shift", "cell_shift", "state_shift", "original_embedding", "gene_cos"]
    stats = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def count(model: str) -> int:
        return int(stats.get_inference_statistics(model).model_stats[0].inference_stats.success.count)

    states = np.random.default_rng(1).normal(size=(2, 256))
    before = count(REDUCED)
    with GeneformerClient(triton_server.grpc_url, "grpc", concurrency=1, timeout_s=300) as client:
        client.wait_ready(60, ISP)
        for cell in cells[:2]:
            genes = np.array(v1_vocabulary.genes_for_tokens(cell), dtype=object)
            counts = np.arange(cell.size, 0, -1, dtype=np.float32) * 10  # rank order = the cell's order
            reduced = infer_cell(client, ISP, _request(genes, counts, states, None), outputs)
            tokens = infer_cell(client, ISP, _request(genes, counts, states, TOKENS), outputs)
            assert reduced["cell_emb_shift"].size == cell.size
            assert_close(reduced, tokens)
            last_layer = infer_cell(client, ISP, _request(genes, counts, states, None, emb_layer=0), outputs)
            with pytest.raises(AssertionError):  # negative control: another layer's numbers are rejected
                assert_close(reduced, last_layer, keys=("cell_emb_shift",))
        before_error = infer_cell(client, ISP, _request(genes, counts, states, None), outputs)
        with pytest.raises(InferenceError, match="state_embeddings have 7 values per state; the encoder's hidden size is 256"):
            infer_cell(client, ISP, _request(genes, counts, np.ones((1, 7)), None), outputs)
        assert_close(infer_cell(client, ISP, _request(genes, counts, states, None), outputs), before_error)  # still serving
    assert count(REDUCED) > before, "geneformer_isp did not use the reduced encoder by default"
    stats.close()
