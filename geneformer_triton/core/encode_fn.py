"""The encoder calling convention every runtime shares (in process and served): numpy in, numpy out.

``encode(input_ids [B, L] int64, attention_mask [B, L] int64) -> (cell_embedding [B, H] float32,
token_embeddings [B, L, H] float32)``, the served encoders' contract (``contract.PLAIN_TENSORS``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

EncodeFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
