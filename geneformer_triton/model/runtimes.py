"""In-process encoder runtimes with one calling convention: numpy in, numpy out.

Every runtime is a callable ``encode(input_ids [B, L] int64, attention_mask [B, L] int64) ->
(cell_embedding [B, H] float32, token_embeddings [B, L, H] float32)``, the same contract as the served
encoders. Used by the fidelity harness, the perturbation reference, ``check`` and the benchmarks.
torch and onnxruntime are imported only when a runtime of theirs is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from geneformer_triton.core.contract import PACKED_ITEM_WIDTH, PLAIN_TENSORS
from geneformer_triton.core.encode_fn import EncodeFn, to_numpy


def torch_encode_fn(module: Any, device: Any = None) -> EncodeFn:
    """Wrap a torch module ``(input_ids, attention_mask) -> (cell, tokens)`` (eager or TorchScript)."""
    import torch

    if device is None:
        parameter = next(iter(module.parameters()), None)
        device = parameter.device if parameter is not None else "cpu"

    def encode(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            cell, tokens = module(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device))
        return to_numpy(cell), to_numpy(tokens)

    return encode


def torchscript_encode_fn(path: str | Path) -> EncodeFn:
    """Load a TorchScript encoder (``model.pt``) on CPU."""
    import torch

    return torch_encode_fn(torch.jit.load(str(path), map_location="cpu").eval(), "cpu")


def onnx_encode_fn(path: str | Path, threads: int = 0) -> EncodeFn:
    """Load an ONNX encoder (``model.onnx``) in an onnxruntime CPU session (a packed encoder is handed
    each padded batch flattened, as Triton's ragged batching does, and returns no token embeddings)."""
    session = onnx_session(path, threads)
    run = run_packed_onnx if is_packed_session(session) else run_onnx
    return lambda input_ids, attention_mask: run(session, input_ids, attention_mask)


def is_packed_session(session) -> bool:
    """Whether an onnxruntime session runs a packed encoder (it takes Triton's ``item_width`` batch input)."""
    return PACKED_ITEM_WIDTH in {i.name for i in session.get_inputs()}


def run_packed_onnx(session, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, None]:
    """Run a packed encoder session on a right-padded batch, flattened as Triton's ragged batching hands
    over one request: int64 [B, L] -> (cell_embedding [B, H], None: no token embeddings)."""
    batch, width = input_ids.shape
    (cell,) = session.run([PLAIN_TENSORS.cell_embedding], {
        PLAIN_TENSORS.input_ids: np.ascontiguousarray(input_ids, dtype=np.int64).reshape(-1),
        PLAIN_TENSORS.attention_mask: np.ascontiguousarray(attention_mask, dtype=np.int64).reshape(-1),
        PACKED_ITEM_WIDTH: np.full((batch, 1), width, dtype=np.int32)})
    return cell, None


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session for ``path`` (``threads`` 0 = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an encoder session: int64 [B, L] inputs -> (cell_embedding [B, H], token_embeddings [B, L, H])."""
    cell, tokens = session.run(list(PLAIN_TENSORS.outputs), dict(zip(PLAIN_TENSORS.inputs, (input_ids, attention_mask))))
    return cell, tokens


def embed_token_cells(
    encode: EncodeFn,
    cells: Sequence[np.ndarray],
    batch_size: int = 16,
    pad_id: int = 0,
    sort_by_length: bool = True,
) -> np.ndarray:
    """Cell embeddings [N, H] float32 of tokenized cells, in input order.

    With ``sort_by_length`` cells are batched in length order, so each batch is padded only to its
    own longest cell (the results are the same; only less padding is computed).
    """
    from geneformer_triton.core.tokenizer import pad_token_batch

    order = np.argsort([-len(c) for c in cells], kind="stable") if sort_by_length else np.arange(len(cells))
    result: np.ndarray | None = None
    for start in range(0, len(cells), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = pad_token_batch([cells[i] for i in index], pad_id)
        cell_embedding = encode(input_ids, attention_mask)[0]
        if result is None:
            result = np.empty((len(cells), cell_embedding.shape[1]), dtype=np.float32)
        result[index] = cell_embedding
    if result is None:
        raise ValueError("no cells to embed")
    return result
