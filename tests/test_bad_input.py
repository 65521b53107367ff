"""Bad input over the wire: the real tritonserver answers each malformed request with an error that says
what was wrong, over HTTP and gRPC, keeps serving, and the next good request succeeds. Plus the
client's own errors (unreachable server, unknown model)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from client.triton_client import GeneformerClient, InferenceError, RetryPolicy, ServerUnavailableError
from geneformer_triton.server import free_port

ENSEMBLE = "geneformer_embed_onnx"
GOOD_IDS = np.array([[b"ENSG00000141510", b"ENSG00000133703", b"ENSG00000111640"]], dtype=object)  # TP53 KRAS GAPDH
GOOD_COUNTS = np.array([[3, 1, 5]], dtype=np.float32)
MAX_BATCH = 64
MAX_GENES = 1_000_000  # geneformer_tokenizer's max_genes_per_request parameter


def _oversize_genes() -> dict[str, np.ndarray]:
    width = MAX_GENES // MAX_BATCH + 1  # 64 rows x 15,626 entries > 1,000,000
    gene_ids = np.full((MAX_BATCH, width), b"", dtype=object)
    gene_ids[:, 0] = GOOD_IDS[0, 0]
    counts = np.zeros((MAX_BATCH, width), dtype=np.float32)
    counts[:, 0] = 1
    return {"gene_ids": gene_ids, "counts": counts}


CASES = {
    "unknown_gene_ids_only": (
        lambda: {"gene_ids": np.array([[b"ENSG99999999999", b"NOT_A_GENE"]], dtype=object),
                 "counts": np.array([[4, 2]], dtype=np.float32)},
        [r"none of its gene ids is in the vocabulary", "NOT_A_GENE"]),
    "all_counts_zero": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.zeros((1, 3), dtype=np.float32)},
        [r"total counts 0\.0", "empty cell"]),
    "no_genes": (
        lambda: {"gene_ids": np.array([[b""]], dtype=object), "counts": np.zeros((1, 1), dtype=np.float32)},
        [r"total counts 0\.0", "empty cell"]),
    "nan_counts": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.array([[np.nan, 1, 2]], dtype=np.float32)},
        [r"cell 0: 1 NaN count values", "finite and >= 0"]),
    "negative_counts": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.array([[3, -1, 2]], dtype=np.float32)},
        [r"cell 0: 1 negative count values", "finite and >= 0"]),
    "lengths_differ": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.array([[3, 1]], dtype=np.float32)},
        [r"gene_ids \[1, 3\] and counts \[1, 2\] must have the same"]),
    "rows_differ": (
        lambda: {"gene_ids": np.repeat(GOOD_IDS, 2, axis=0), "counts": GOOD_COUNTS},
        [r"batch size does not match"]),
    "counts_fp64": (
        lambda: {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS.astype(np.float64)},
        [r"input 'counts' data-type is 'FP64', but model '\w+' expects 'FP32'"]),
    "counts_int32": (
        lambda: {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS.astype(np.int32)},
        [r"input 'counts' data-type is 'INT32', but model '\w+' expects 'FP32'"]),
    "gene_ids_int64": (
        lambda: {"gene_ids": np.array([[7, 8, 9]], dtype=np.int64), "counts": GOOD_COUNTS},
        [r"input 'gene_ids' data-type is 'INT64', but model '\w+' expects 'BYTES'"]),
    "counts_missing": (
        lambda: {"gene_ids": GOOD_IDS},
        [r"missing required input\(s\) \['counts'\]"]),
    "more_rows_than_max_batch_size": (
        lambda: {"gene_ids": np.repeat(GOOD_IDS, MAX_BATCH + 1, axis=0), "counts": np.repeat(GOOD_COUNTS, MAX_BATCH + 1, axis=0)},
        [rf"batch-size must be <= {MAX_BATCH}"]),
    "more_genes_than_max_genes_per_request": (
        _oversize_genes,
        [rf"{MAX_BATCH * (MAX_GENES // MAX_BATCH + 1)} gene entries, more than max_genes_per_request={MAX_GENES}"]),
}


@pytest.fixture(scope="module", params=("http", "grpc"))
def client(request, triton_server):
    url = triton_server.http_url if request.param == "http" else triton_server.grpc_url
    with GeneformerClient(url, request.param, retry=RetryPolicy(attempts=2, backoff_s=0.1)) as client:
        yield client


def _good_request(client: GeneformerClient) -> np.ndarray:
    return client.infer(ENSEMBLE, {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS}, ["cell_embedding"])["cell_embedding"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_clear_error_and_server_keeps_serving(client, triton_server, case):
    make_inputs, patterns = CASES[case]
    with pytest.raises(InferenceError) as info:
        client.infer(ENSEMBLE, make_inputs(), ["cell_embedding"])
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert triton_server.is_alive()
    assert client._client().is_server_live() and client._client().is_model_ready(ENSEMBLE)
    embedding = _good_request(client)
    assert embedding.shape == (1, 256) and np.isfinite(embedding).all()


def test_bad_rows_fail_only_their_own_request(client):
    """Concurrent good and bad requests (they may meet in one dynamic batch): only the bad one fails."""
    from concurrent.futures import ThreadPoolExecutor

    bad = {"gene_ids": GOOD_IDS, "counts": np.array([[np.nan, 1, 2]], dtype=np.float32)}
    good = {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS}
    with GeneformerClient(client.url, client.protocol, concurrency=4) as pool_client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(pool_client.infer, "geneformer_tokenizer", bad if i % 2 else good, ["input_ids"])
                   for i in range(8)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result()["input_ids"].shape)
            except InferenceError as error:
                outcomes.append("NaN" in str(error))
    assert outcomes[0::2] == [(1, 3)] * 4 and outcomes[1::2] == [True] * 4


@pytest.mark.parametrize("protocol", ("http", "grpc"))
def test_unreachable_server_raises_after_retries(protocol):
    client = GeneformerClient(f"127.0.0.1:{free_port('127.0.0.1')}", protocol, timeout_s=2.0,
                              retry=RetryPolicy(attempts=3, backoff_s=0.05))
    started = time.monotonic()
    with client, pytest.raises(ServerUnavailableError, match=r"unavailable after 3 tries"):
        client.infer(ENSEMBLE, {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS}, ["cell_embedding"])
    assert time.monotonic() - started < 10


def test_unknown_model_is_not_retried(client):
    started = time.monotonic()
    with pytest.raises(InferenceError, match="geneformer_nope"):
        client.infer("geneformer_nope", {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS}, ["cell_embedding"])
    assert time.monotonic() - started < 5


def test_client_rejects_bad_arguments(client):
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        GeneformerClient("localhost:8001", "websocket")
    with pytest.raises(ValueError, match="negative token ids"):
        client.embed_tokens_batch([np.array([5, -3])], "geneformer_onnx")
    with pytest.raises(ValueError, match="no tokens"):
        client.embed_tokens_batch([np.array([5, 6]), np.array([], dtype=np.int64)], "geneformer_onnx")
