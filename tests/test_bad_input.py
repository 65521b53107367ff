"""Bad input over the wire: the real tritonserver answers each malformed request with INVALID_ARGUMENT
(gRPC) / 400 (HTTP) and an error that says what was wrong, where and what is allowed, over HTTP and
gRPC, keeps serving, and the next good request succeeds. Covers the embedding ensemble (tokenizer
first), the encoders as served here, and the ISP model. Plus the client's own errors (unreachable
server, unknown model)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from geneformer_triton.client.isp_spec import infer_cell
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError, RetryPolicy, ServerUnavailableError
from geneformer_triton.serving.server import free_port

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
        [r"counts, cell 0: 1 NaN count value\(s\) \(first at gene column 0", r"finite, >= 0 and <= 1e\+09"]),
    "negative_counts": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.array([[3, -1, 2]], dtype=np.float32)},
        [r"counts, cell 0: 1 negative count value\(s\) \(first at gene column 1", r"finite, >= 0 and <= 1e\+09"]),
    "infinite_counts": (
        lambda: {"gene_ids": np.repeat(GOOD_IDS, 2, axis=0), "counts": np.array([[3, 1, 5], [3, np.inf, 5]], np.float32)},
        [r"counts, cell 1: 1 infinite count value\(s\) \(first at gene column 1"]),
    "absurd_counts_1e30": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.array([[3, 1e30, 5]], dtype=np.float32)},
        [r"counts, cell 0: 1 above 1e\+09 count value\(s\) \(first at gene column 1", r"<= 1e\+09"]),
    "absurd_counts_3e38": (
        lambda: {"gene_ids": GOOD_IDS, "counts": np.array([[3e38, 3e38, 5]], dtype=np.float32)},
        [r"counts, cell 0: 2 above 1e\+09 count value\(s\)"]),
    "n_counts_infinite": (
        lambda: {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS, "n_counts": np.array([[np.inf]], np.float32)},
        [r"n_counts, cell 0: inf", r"finite, > 0 and <= 1e\+12"]),
    "n_counts_nan": (
        lambda: {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS, "n_counts": np.array([[np.nan]], np.float32)},
        [r"n_counts, cell 0: nan"]),
    "n_counts_zero": (
        lambda: {"gene_ids": GOOD_IDS, "counts": GOOD_COUNTS, "n_counts": np.array([[0.0]], np.float32)},
        [r"n_counts, cell 0: 0\.0", "> 0"]),
    "gene_id_not_utf8": (
        lambda: {"gene_ids": np.array([[b"ENSG00000141510", b"ENSG\xff\xfe0001"]], dtype=object),
                 "counts": np.array([[3, 1]], dtype=np.float32)},
        [r"gene_ids, cell 0, gene column 1: b'ENSG\\xff\\xfe0001' is not UTF-8", "UTF-8 strings"]),
    "zero_genes": (
        lambda: {"gene_ids": np.zeros((1, 0), dtype=object), "counts": np.zeros((1, 0), dtype=np.float32)},
        [r"gene_ids is empty"]),
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


INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


def _assert_invalid_argument(error: InferenceError, protocol: str, patterns: list[str]) -> str:
    """The server's status is 400 / INVALID_ARGUMENT, every pattern is in the message, no doubled prefix."""
    status = str(error.__cause__.status())
    message = str(error)
    assert status == INVALID[protocol], f"status {status} for {message!r}"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    for prefix in ("geneformer_tokenizer: ", "geneformer_isp: ", "local python stand-in"):
        assert message.count(prefix) <= 1, f"doubled prefix {prefix!r} in {message!r}"
    return message


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_clear_error_and_server_keeps_serving(client, triton_server, case):
    make_inputs, patterns = CASES[case]
    with pytest.raises(InferenceError) as info:
        client.infer(ENSEMBLE, make_inputs(), ["cell_embedding"])
    _assert_invalid_argument(info.value, client.protocol, patterns)
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


VOCAB = 25_426  # V1 dictionary (conftest: random-weight gf-6L-10M-i2048 with the real V1 dictionaries)
INPUT_SIZE = 2048


def _tokens(ids: list[list[int]], mask: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    input_ids = np.array(ids, dtype=np.int64)
    attention_mask = np.ones_like(input_ids) if mask is None else np.array(mask, dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


TOKEN_CASES = {
    "negative_id": (lambda: _tokens([[5, 7, 9], [5, -3, 9]]),
                    [r"input_ids(__0)?, row 1, token 1: id -3 is outside the vocabulary", rf"\[0, {VOCAB}\)"]),
    "id_equal_to_vocabulary": (lambda: _tokens([[5, VOCAB]]), [rf"row 0, token 1: id {VOCAB} is outside"]),
    "id_far_beyond": (lambda: _tokens([[2**40]]), [rf"id {2**40} is outside the vocabulary"]),
    "mask_two": (lambda: _tokens([[5, 7, 9]], [[1, 2, 1]]),
                 [r"attention_mask(__1)?, row 0, token 1: value 2; only 0 \(padding\) and 1 \(token\) are allowed"]),
    "mask_minus_one": (lambda: _tokens([[5, 7, 9]], [[1, 1, -1]]), [r"token 2: value -1"]),
    "mask_huge": (lambda: _tokens([[5, 7, 9]], [[10**12, 1, 1]]), [r"token 0: value 1000000000000"]),
    "mask_all_zero": (lambda: _tokens([[5, 7], [5, 7]], [[1, 1], [0, 0]]),
                      [r"attention_mask(__1)?, row 1: all zeros; every cell needs at least one token"]),
    "zero_length": (lambda: _tokens(np.zeros((2, 0), dtype=np.int64).tolist() or [[]] * 2),
                    [r"zero tokens per row"]),
    "longer_than_input_size": (lambda: _tokens([[5] * (INPUT_SIZE + 1)]),
                               [rf"{INPUT_SIZE + 1} tokens per row, more than the model's input size {INPUT_SIZE}"]),
}


@pytest.fixture(scope="module")
def stand_in_server(exported_repository):
    """The same repository served through the Python stand-ins (they validate; the C++ backends cannot)."""
    from geneformer_triton.serving.server import LocalTritonServer

    with LocalTritonServer(exported_repository, model_config_name="cpu", backends="stand-in",
                           models=["geneformer_onnx", "geneformer_torchscript"]) as server:
        yield server


@pytest.fixture(scope="module", params=("http", "grpc"))
def stand_in_client(request, stand_in_server):
    url = stand_in_server.http_url if request.param == "http" else stand_in_server.grpc_url
    with GeneformerClient(url, request.param, retry=RetryPolicy(attempts=2, backoff_s=0.1)) as client:
        yield client


@pytest.mark.parametrize("encoder", ("geneformer_onnx", "geneformer_torchscript"))
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_bad_tokens_to_an_encoder_get_invalid_argument(stand_in_client, encoder, case, v1_vocabulary):
    """The Python stand-in encoders validate token ids and masks; what Triton's C++ onnxruntime/libtorch
    backends do instead (they cannot validate) is pinned in tests/test_backends_bad_input.py and documented
    in docs/deployment.md: the ensembles are the validated public entry points."""
    client = stand_in_client
    assert len(v1_vocabulary) == VOCAB
    make_inputs, patterns = TOKEN_CASES[case]
    inputs = {client.tensor_name(encoder, name): value for name, value in make_inputs().items()}
    output = client.tensor_name(encoder, "cell_embedding")
    with pytest.raises(InferenceError) as info:
        client.infer(encoder, inputs, [output])
    _assert_invalid_argument(info.value, client.protocol, patterns)
    good = {client.tensor_name(encoder, n): v for n, v in _tokens([[5, 7, 9], [5, 7, 0]], [[1, 1, 1], [1, 1, 0]]).items()}
    assert np.isfinite(client.infer(encoder, good, [output])[output]).all()


def _isp_request(**overrides) -> dict[str, np.ndarray]:
    genes = np.array([b"ENSG00000141510", b"ENSG00000133703", b"ENSG00000111640", b"ENSG00000075624"], dtype=object)
    request = {"gene_ids": genes, "counts": np.array([3, 1, 5, 2], dtype=np.float32),
               "perturbation": np.array([b"inhibit"], dtype=object), "rank_shift": np.array([1.0], np.float32),
               "semantics": np.array([b"ours"], dtype=object)}  # inhibit by rank shift is ours (not upstream's)
    request.update(overrides)
    return request


ISP_CASES = {
    "rank_shift_negative": (dict(rank_shift=np.array([-2.0], np.float32)), [r"rank_shift: -2\.0 is out of range"]),
    "rank_shift_zero": (dict(rank_shift=np.array([0.0], np.float32)), [r"rank_shift: 0\.0 is out of range"]),
    "rank_shift_nan": (dict(rank_shift=np.array([np.nan], np.float32)), [r"rank_shift: nan is out of range"]),
    "rank_shift_beyond_input_size": (dict(rank_shift=np.array([1e9], np.float32)),
                                     [r"is out of range.*whole number of positions in \[1, 2048\]"]),
    "counts_absurd": (dict(counts=np.array([3, 1, 1e30, 2], np.float32)), [r"counts, cell 0: 1 above 1e\+09"]),
    "n_counts_infinite": (dict(n_counts=np.array([np.inf], np.float32)), [r"n_counts, cell 0: inf"]),
    "gene_id_not_utf8": (dict(gene_ids=np.array([b"ENSG00000141510", b"\xc3\x28", b"ENSG00000111640", b"ENSG00000075624"],
                                                dtype=object)), [r"gene_ids, cell 0, gene column 1: .* is not UTF-8"]),
}


@pytest.mark.parametrize("case", list(ISP_CASES))
def test_bad_isp_request_gets_invalid_argument(client, case):
    overrides, patterns = ISP_CASES[case]
    with pytest.raises(InferenceError) as info:
        infer_cell(client, "geneformer_isp", _isp_request(**overrides), ["cell_shift"])
    _assert_invalid_argument(info.value, client.protocol, patterns)
    assert np.isfinite(infer_cell(client, "geneformer_isp", _isp_request(), ["cell_shift"])["cell_shift"]).all()
