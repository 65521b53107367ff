"""Geneformer client for Triton over gRPC or HTTP: one API for both protocols.

``GeneformerClient`` sends cells (gene ids + raw counts, tokenized on the server by the ensembles) or
token ids (client-side tokenization, straight to an encoder) and returns float32 embeddings. Requests
are split to the model's ``max_batch_size``, run with bounded concurrency (one tritonclient per worker
thread: the HTTP client is not thread-safe), and retried with exponential backoff while the server is
unreachable or not ready. Errors the server reports about the input are raised at once, unretried
(``InferenceError``); a refusal of a key-protected API is a ``PermissionDeniedError`` (HTTP 403, or
gRPC UNAVAILABLE "This protocol is restricted", which is NOT retried as a down server).

Keys: ``admin_key`` (default ``$GFTRITON_ADMIN_KEY``) is sent with admin calls (model index,
load/unload), ``inference_key`` (default ``$GFTRITON_INFERENCE_KEY``) with inference requests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import scipy.sparse as sp

from geneformer_triton.core.contract import SERVED_MODELS, TORCHSCRIPT_TENSORS

LOGGER = logging.getLogger(__name__)

Protocol = Literal["grpc", "http"]
T = TypeVar("T")

TORCHSCRIPT_NAMES = TORCHSCRIPT_TENSORS.as_dict()  # logical tensor name -> the libtorch backend's name


class ServerUnavailableError(ConnectionError):
    """The server could not be reached (or was not ready) within the retry budget."""


class InferenceError(RuntimeError):
    """The server rejected a request; the message is the server's (it says what was wrong)."""


class PermissionDeniedError(InferenceError):
    """The server refused a key-protected API: the key is missing or wrong (exit code 2, not retried)."""


ADMIN_KEY_ENV = "GFTRITON_ADMIN_KEY"
INFERENCE_KEY_ENV = "GFTRITON_INFERENCE_KEY"
_RESTRICTED_MARKERS = ("this protocol is restricted", "this api is restricted")

#: The project's models: probed one by one (health API) when the model index is refused.
KNOWN_MODELS = SERVED_MODELS  # probed for readiness when the model index (an admin API) is refused


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for unreachable servers: ``attempts`` tries, waits ``backoff_s * 2**i`` (capped)."""

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


def _is_permission_denied(error: Exception) -> bool:
    """Whether an error is Triton refusing a restricted API (HTTP 403; gRPC UNAVAILABLE with 'restricted')."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(error, InferenceServerException):
        return False
    text = str(error.message() or "").lower()
    return str(error.status() or "") == "403" or any(marker in text for marker in _RESTRICTED_MARKERS)


def _is_unavailable(error: Exception) -> bool:
    """Whether an error means 'server not reachable/ready' (retry) rather than 'bad request'."""
    from tritonclient.utils import InferenceServerException

    if _is_permission_denied(error):
        return False
    if isinstance(error, (ConnectionError, OSError, TimeoutError)):
        return True
    if type(error).__name__ == "HTTPConnectionClosed":  # geventhttpclient: the server closed a pooled connection
        return True
    if isinstance(error, InferenceServerException):
        status = str(error.status() or "")
        text = str(error.message() or "").lower()
        return (
            "UNAVAILABLE" in status
            or "DEADLINE_EXCEEDED" in status
            or "connection" in text
            or "failed to connect" in text
            or "not ready" in text
            or "unavailable" in text
            or "server is stopping" in text  # draining after SIGTERM: the restarted server will take it
            or "has no available versions" in text  # known model, unloaded while the server stops
        )
    return False


def pack_cells(counts: sp.spmatrix | np.ndarray, gene_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Wire format of the tokenizer: each cell's non-zero genes in ``gene_ids`` order.

    Returns ``gene_ids`` [B, G] object array of bytes ("" padding) and ``counts`` [B, G] float32, G the
    largest number of non-zero genes of a cell. Genes with an empty id are left out.
    """
    matrix = sp.csr_matrix(counts)
    matrix.sort_indices()
    names = np.array([str(g).encode() for g in gene_ids], dtype=object)
    named = names != b""
    rows = []
    for row in range(matrix.shape[0]):
        start, stop = matrix.indptr[row], matrix.indptr[row + 1]
        columns, values = matrix.indices[start:stop], matrix.data[start:stop]
        keep = named[columns] & (values != 0)
        rows.append((names[columns[keep]], values[keep]))
    width = max(1, max(len(r[0]) for r in rows))
    packed_ids = np.full((len(rows), width), b"", dtype=object)
    packed_counts = np.zeros((len(rows), width), dtype=np.float32)
    for row, (ids, values) in enumerate(rows):
        packed_ids[row, : len(ids)] = ids
        packed_counts[row, : len(ids)] = values
    return packed_ids, packed_counts


class GeneformerClient:
    """Embeddings from a Triton server running the Geneformer model repository.

    ``url`` is ``host:port`` (gRPC default port 8001, HTTP 8000). ``concurrency`` bounds requests in
    flight; ``timeout_s`` is the per-request network timeout in seconds.
    """

    def __init__(
        self,
        url: str,
        protocol: Protocol = "grpc",
        concurrency: int = 2,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),
        admin_key: str | None = None,
        inference_key: str | None = None,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.concurrency = max(1, concurrency)
        self.timeout_s = timeout_s
        self.retry = retry
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._metadata: dict[str, dict] = {}
        self.admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
        self.inference_key = inference_key or os.environ.get(INFERENCE_KEY_ENV) or None

    def _headers(self, name: str, key: str | None) -> dict[str, str] | None:
        """Header carrying ``key`` under Triton's restricted-API header ``name`` (gRPC adds its prefix)."""
        if key is None:
            return None
        return {f"triton-grpc-protocol-{name}" if self.protocol == "grpc" else name: key}

    @property
    def admin_headers(self) -> dict[str, str] | None:
        return self._headers("admin-key", self.admin_key)

    @property
    def inference_headers(self) -> dict[str, str] | None:
        return self._headers("inference-key", self.inference_key)

    # ------------------------------------------------------------------ connection
    @property
    def module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self.module.InferenceServerClient(self.url)
            else:
                client = self.module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _reset_connection(self) -> None:
        """Close this thread's connection (a stopping server waits for open ones) and drop it."""
        client = getattr(self._local, "client", None)
        self._local = threading.local()
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception as error:  # noqa: BLE001 - a broken connection may fail to close
                LOGGER.debug("closing a failed connection: %s", error)

    def close(self) -> None:
        """Close every connection (do this before stopping a local server)."""
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        self._local = threading.local()

    def __enter__(self) -> "GeneformerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _with_retry(self, what: str, call: Callable[[], T]) -> T:
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                return call()
            except Exception as error:  # classified below: retry only 'server unavailable'
                if _is_permission_denied(error):
                    raise PermissionDeniedError(
                        f"{what}: refused by {self.url} ({self.protocol}): {error.message()}; this API needs "
                        f"a key: set ${INFERENCE_KEY_ENV if 'inference-key' in str(error.message()) else ADMIN_KEY_ENV} "
                        "(the server's operator has it)"
                    ) from error
                if not _is_unavailable(error):
                    message = str(error.message() if callable(getattr(error, "message", None)) else error)
                    raise InferenceError(message if message.startswith(f"{what}: ") else f"{what}: {message}") from error
                last = error
                self._reset_connection()  # reconnect on the next try
                if attempt + 1 == self.retry.attempts:
                    break  # no wait after the last try
                wait = min(self.retry.backoff_s * 2**attempt, self.retry.max_backoff_s)
                LOGGER.warning("%s: server unavailable (%s); retry %d/%d in %.1f s", what, error,
                               attempt + 1, self.retry.attempts - 1, wait)
                time.sleep(wait)
        raise ServerUnavailableError(f"{what}: server {self.url} ({self.protocol}) unavailable after "
                                     f"{self.retry.attempts} tries: {last}")

    def wait_ready(self, timeout_s: float = 60.0, model: str | None = None) -> None:
        """Block until the server (and ``model``, if given) is ready, or raise ServerUnavailableError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                client = self._client()
                if client.is_server_ready() and (model is None or client.is_model_ready(model)):
                    return
            except Exception as error:  # not up yet
                LOGGER.debug("not ready: %s", error)
                self._local = threading.local()
            time.sleep(0.5)
        raise ServerUnavailableError(f"server {self.url} ({self.protocol}) not ready after {timeout_s:.0f} s")

    # ------------------------------------------------------------------ models
    def model_config(self, model: str) -> dict:
        """The model's configuration as a dict (cached)."""
        if model not in self._metadata:
            def fetch() -> dict:
                config = self._client().get_model_config(model, as_json=True) if self.protocol == "grpc" \
                    else self._client().get_model_config(model)
                return config.get("config", config)
            self._metadata[model] = self._with_retry(f"config of {model}", fetch)
        return self._metadata[model]

    def max_batch_size(self, model: str) -> int:
        return int(self.model_config(model).get("max_batch_size", 0)) or 1

    def ready_models(self, candidates: Sequence[str] = KNOWN_MODELS) -> list[str]:
        """Names of the models the server has loaded and ready: from the model index (an admin API),
        or, when the index is refused for want of the admin key, by probing ``candidates``."""
        def fetch() -> list[str]:
            headers = self.admin_headers
            index = self._client().get_model_repository_index(headers=headers, as_json=True) \
                if self.protocol == "grpc" else self._client().get_model_repository_index(headers=headers)
            models = index.get("models", index) if isinstance(index, dict) else index
            return sorted(m["name"] for m in models if m.get("state") == "READY")

        def probe() -> list[str]:
            return sorted(m for m in candidates if self._client().is_model_ready(m))

        try:
            return self._with_retry("model index", fetch)
        except PermissionDeniedError:
            LOGGER.debug("model index needs the admin key; probing %d known model names", len(candidates))
            return self._with_retry("model readiness", probe)

    def load_model(self, model: str, config: str | None = None, files: dict[str, bytes] | None = None) -> None:
        """Load (or reload) ``model``, optionally with a JSON ``config`` override and ``files``
        (``{"file:1/model.py": bytes}``). An admin API: needs the admin key."""
        self._metadata.pop(model, None)
        self._with_retry(f"load {model}", lambda: self._client().load_model(
            model, headers=self.admin_headers, config=config, files=files))

    def unload_model(self, model: str) -> None:
        """Unload ``model``. An admin API: needs the admin key."""
        self._metadata.pop(model, None)
        self._with_retry(f"unload {model}", lambda: self._client().unload_model(model, headers=self.admin_headers))

    def is_ragged(self, model: str) -> bool:
        """Whether ``model`` takes ragged inputs (``allow_ragged_batch``: a packed encoder), so Triton's dynamic
        batcher merges requests of any lengths into one execution."""
        return any(t.get("allow_ragged_batch") for t in self.model_config(model).get("input", []))

    def tensor_name(self, model: str, name: str) -> str:
        """Wire name of a logical tensor (TorchScript models use ``<name>__<index>``)."""
        names = {t["name"] for t in self.model_config(model).get("input", []) + self.model_config(model).get("output", [])}
        return name if name in names else TORCHSCRIPT_NAMES.get(name, name)

    # ------------------------------------------------------------------ inference
    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request: numpy inputs by wire name -> requested outputs by wire name."""
        module = self.module

        def call() -> dict[str, np.ndarray]:
            tensors = []
            for name, array in inputs.items():
                datatype = "BYTES" if array.dtype == object else module_dtype(array.dtype)
                tensor = module.InferInput(name, list(array.shape), datatype)
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            requested = [module.InferRequestedOutput(name) for name in outputs]
            headers = self.inference_headers
            if self.protocol == "grpc":
                result = self._client().infer(model, tensors, outputs=requested, client_timeout=self.timeout_s,
                                              headers=headers)
            else:
                # One connection per request: an idle keep-alive connection would hold a stopping server
                # for its whole exit timeout (Triton waits for open HTTP connections before draining).
                result = self._client().infer(model, tensors, outputs=requested,
                                              headers={**(headers or {}), "Connection": "close"})
            return {name: result.as_numpy(name) for name in outputs}

        return self._with_retry(f"{model}", call)

    def _map_batches(self, batches: Iterator[T], call: Callable[[T], np.ndarray], total: int, progress: bool) -> list[np.ndarray]:
        from tqdm.auto import tqdm

        results: list[np.ndarray] = []
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=total, unit="cell", disable=not progress) as bar:
            for result in pool.map(call, batches):
                results.append(result)
                bar.update(len(result))
        return results

    def embed_cells_batch(
        self,
        gene_ids: np.ndarray,
        counts: np.ndarray,
        n_counts: np.ndarray | None = None,
        model: str = "geneformer_embed_onnx",
    ) -> np.ndarray:
        """One request to an ensemble: packed cells [B, G] (B <= max_batch_size) -> float32 [B, H].

        Trailing columns that are padding in every row (count 0) are trimmed before sending.
        """
        counts = np.asarray(counts, dtype=np.float32)
        totals = counts.sum(axis=1) if n_counts is None else np.asarray(n_counts, dtype=np.float32).reshape(-1)
        nonzero = counts != 0
        # Last column that holds a non-zero count in any row (rows may have zeros before their last gene).
        width = max(1, int(nonzero.shape[1] - np.argmax(nonzero[:, ::-1].any(axis=0)))) if nonzero.any() else 1
        inputs = {
            "gene_ids": np.ascontiguousarray(np.asarray(gene_ids, dtype=object)[:, :width]),
            "counts": np.ascontiguousarray(counts[:, :width]),
            "n_counts": totals.astype(np.float32).reshape(-1, 1),
        }
        return self.infer(model, inputs, ["cell_embedding"])["cell_embedding"]

    def embed_cells(
        self,
        gene_ids: np.ndarray,
        counts: np.ndarray,
        n_counts: np.ndarray | None = None,
        model: str = "geneformer_embed_onnx",
        batch_size: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed packed cells (``pack_cells``) through an ensemble: [B, G] -> float32 [B, H]."""
        size = min(batch_size or self.max_batch_size(model), self.max_batch_size(model))
        counts = np.asarray(counts, dtype=np.float32)
        totals = counts.sum(axis=1) if n_counts is None else np.asarray(n_counts, dtype=np.float32).reshape(-1)

        def batches() -> Iterator[slice]:
            for start in range(0, len(gene_ids), size):
                yield slice(start, start + size)

        def call(rows: slice) -> np.ndarray:
            return self.embed_cells_batch(gene_ids[rows], counts[rows], totals[rows], model)

        return np.concatenate(self._map_batches(batches(), call, len(gene_ids), progress))

    def embed_tokens_batch(self, cells: Sequence[np.ndarray], model: str = "geneformer_onnx", pad_id: int = 0) -> np.ndarray:
        """One request to an encoder: token arrays (B <= max_batch_size), right-padded -> float32 [B, H]."""
        from geneformer_triton.core.tokenizer import pad_token_batch

        cells = [np.asarray(c) for c in cells]
        if any(len(c) == 0 for c in cells):
            raise ValueError("a cell has no tokens: every cell needs at least one gene token")
        if any(c.dtype.kind not in "iu" for c in cells):
            raise ValueError(f"token ids must be integers, got {sorted({str(c.dtype) for c in cells})}")
        if any((c < 0).any() for c in cells):
            # ONNX Gather would silently wrap a negative index around the vocabulary.
            raise ValueError("negative token ids: token ids index the model's vocabulary (>= 0)")
        names = {n: self.tensor_name(model, n) for n in ("input_ids", "attention_mask", "cell_embedding")}
        input_ids, attention_mask = pad_token_batch(cells, pad_id)
        result = self.infer(model, {names["input_ids"]: input_ids, names["attention_mask"]: attention_mask},
                            [names["cell_embedding"]])
        return result[names["cell_embedding"]]

    def embed_tokens(
        self,
        cells: Sequence[np.ndarray],
        model: str = "geneformer_onnx",
        batch_size: int | None = None,
        pad_id: int = 0,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed client-tokenized cells through an encoder: list of int64 token arrays -> float32 [N, H].

        Cells are sent in length order (less padding per request) and returned in input order. A ragged
        (packed) model gets one cell per request by default: no padding on the wire, and the server's
        dynamic batcher merges the ``concurrency`` requests in flight into one execution.
        """
        default = 1 if self.is_ragged(model) else self.max_batch_size(model)
        size = min(batch_size or default, self.max_batch_size(model))
        order = np.argsort([-len(c) for c in cells], kind="stable")

        def call(index: np.ndarray) -> np.ndarray:
            return self.embed_tokens_batch([cells[i] for i in index], model, pad_id)

        chunks = [order[start : start + size] for start in range(0, len(cells), size)]
        embeddings = self._map_batches(iter(chunks), call, len(cells), progress)
        result = np.empty((len(cells), embeddings[0].shape[1]), dtype=np.float32)
        for index, embedding in zip(chunks, embeddings):
            result[index] = embedding
        return result

    def output_size(self, model: str, name: str = "cell_embedding") -> int:
        """Size of a model's 1-D output (the hidden size for ``cell_embedding``), from its config."""
        wire = self.tensor_name(model, name)
        for tensor in self.model_config(model).get("output", []):
            if tensor["name"] == wire:
                return int(tensor["dims"][-1])
        raise InferenceError(f"{model} has no output {wire!r}")


def module_dtype(dtype: np.dtype) -> str:
    """Triton datatype name of a numpy dtype."""
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))
