"""Embedding outputs: a crash-safe partial store for resuming, and the final files written atomically.

While a run is going, every finished batch is appended to ``<output>.partial/embeddings.bin`` (and
fsync'ed) as one record: header ``b"GFE1"``, number of cells ``n`` (uint32), hidden size ``h``
(uint32), crc32 of the payload (uint32); payload: row indices int64[n], embeddings float32[n, h].
``meta.json`` next to it names the input (fingerprint of cells and counts), the model and the hidden
size, so a rerun resumes only a run of the same input and model. A record torn by a crash fails its
length or crc check and is dropped (those cells are embedded again). At the end the output is written
to a temporary file in the same folder and renamed over ``<output>``; then the partial folder goes.

Output formats (by suffix): ``.h5ad`` (a copy of the input AnnData with ``obsm["X_geneformer"]``),
``.npy`` (float32 [n_cells, hidden]), ``.parquet`` (one row per cell, index ``cell_id``, columns
``geneformer_0..``). Cells that could not be embedded are NaN rows.
"""

from __future__ import annotations

import logging
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from geneformer_triton.client.run_store import (
    OpenRun,
    RunLayout,
    append_durable,
    atomic_write,
    open_run,
    remove_temporaries,
    truncate_tail,
)
from geneformer_triton.client.run_store import ResumeMismatchError as ResumeMismatchError  # re-exported: what open() raises

LOGGER = logging.getLogger(__name__)

OBSM_KEY = "X_geneformer"
FORMATS = (".h5ad", ".npy", ".parquet")
_MAGIC = b"GFE1"
_HEADER = struct.Struct("<4sIII")


def output_format(path: str | Path) -> str:
    """The output format of ``path`` (its suffix), or ValueError naming the supported ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"output {path}: unsupported format {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    return suffix


def partial_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial")


class PartialStore:
    """Append-only store of finished embeddings for one output; see the module docstring.

    Use ``open(meta)`` (resumes when ``meta`` matches what is stored), then ``append(rows, emb)`` from a
    single thread, ``done_rows()`` / ``assemble(n_cells)``, and ``remove()`` when the output is written.
    While open it holds the folder's lock (a second run writing the same output is refused).
    """

    def __init__(self, output: str | Path) -> None:
        self.folder = partial_dir(output)
        self.meta_path = self.folder / "meta.json"
        self.data_path = self.folder / "embeddings.bin"
        self.meta: dict[str, Any] = {}
        self._rows: list[np.ndarray] = []
        self._embeddings: list[np.ndarray] = []
        self._run: Optional[OpenRun] = None

    @property
    def exists(self) -> bool:
        return self.meta_path.is_file()

    def open(self, meta: dict[str, Any], restart: bool = False) -> int:
        """Open for appending; returns the number of cells already done (0 for a fresh store).

        Raises ``ResumeMismatchError`` if partial results of another input/model are there (unless
        ``restart``, which discards them) and ``RunLockedError`` if another run has them open.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        layout = RunLayout(self.meta_path, (self.folder,), self.folder, "--restart", lock=self.folder / "_lock")
        run = open_run(layout, meta, discard=restart)
        try:
            remove_temporaries(self.folder)
            if run.resumed:
                self._load(int(meta["hidden_size"]))
            elif self.data_path.exists():  # records without their meta.json: of no known run
                self.data_path.unlink()
        except BaseException:
            run.close()
            raise
        self._run = run
        self.meta = dict(meta)
        return int(sum(len(r) for r in self._rows))

    def _load(self, hidden: int) -> None:
        """Read complete, intact records; truncate a torn tail left by a crash."""
        if not self.data_path.is_file():
            return
        data = self.data_path.read_bytes()
        offset = 0
        while offset + _HEADER.size <= len(data):
            magic, n, h, crc = _HEADER.unpack_from(data, offset)
            size = n * 8 + n * h * 4
            end = offset + _HEADER.size + size
            if magic != _MAGIC or h != hidden or end > len(data):
                break
            payload = data[offset + _HEADER.size : end]
            if zlib.crc32(payload) != crc:
                break
            self._rows.append(np.frombuffer(payload[: n * 8], dtype=np.int64).copy())
            self._embeddings.append(np.frombuffer(payload[n * 8 :], dtype=np.float32).reshape(n, h).copy())
            offset = end
        truncate_tail(self.data_path, offset, "an incomplete record")

    def append(self, rows: np.ndarray, embeddings: np.ndarray) -> None:
        """Persist one batch (``rows`` int [n], ``embeddings`` [n, h]) before returning."""
        if self._run is None:
            raise RuntimeError("PartialStore.append before open()")
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(rows), int(self.meta["hidden_size"])):
            raise ValueError(f"embeddings {embeddings.shape} do not fit {len(rows)} rows x hidden {self.meta['hidden_size']}")
        payload = rows.tobytes() + embeddings.tobytes()
        append_durable(self.data_path, _HEADER.pack(_MAGIC, len(rows), embeddings.shape[1], zlib.crc32(payload)) + payload)
        self._rows.append(rows)
        self._embeddings.append(embeddings)

    def done_rows(self) -> np.ndarray:
        """Row indices already stored (unique, sorted)."""
        return np.unique(np.concatenate(self._rows)) if self._rows else np.zeros(0, dtype=np.int64)

    def assemble(self, n_cells: int) -> np.ndarray:
        """All stored embeddings as [n_cells, h] float32; raises if a cell is missing."""
        hidden = int(self.meta["hidden_size"])
        result = np.full((n_cells, hidden), np.nan, dtype=np.float32)
        seen = np.zeros(n_cells, dtype=bool)
        for rows, embeddings in zip(self._rows, self._embeddings):
            result[rows] = embeddings
            seen[rows] = True
        if not seen.all():
            raise RuntimeError(f"{int((~seen).sum())} of {n_cells} cells have no embedding yet")
        return result

    def close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def write_embeddings(
    path: str | Path,
    embeddings: np.ndarray,
    cell_ids: list[str],
    adata: Any = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``embeddings`` [n_cells, h] to ``path`` (format by suffix), atomically (temp file + rename).

    ``.h5ad`` needs ``adata`` (the input, same cells): it is copied, ``obsm["X_geneformer"]`` added and
    ``info`` stored in ``uns["geneformer"]``.
    """
    path = Path(path)
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        if fmt == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, np.asarray(embeddings, dtype=np.float32))
        elif fmt == ".parquet":
            import pandas as pd

            try:
                import pyarrow  # noqa: F401
            except ImportError as error:
                raise RuntimeError(f"writing .parquet needs a working pyarrow: {error}") from error
            frame = pd.DataFrame(
                np.asarray(embeddings, dtype=np.float32),
                index=pd.Index(cell_ids, name="cell_id"),
                columns=[f"geneformer_{i}" for i in range(embeddings.shape[1])],
            )
            frame.to_parquet(tmp)
        else:
            if adata is None:
                raise ValueError("an .h5ad output needs the input AnnData")
            out = adata.copy()
            out.obsm[OBSM_KEY] = np.asarray(embeddings, dtype=np.float32)
            if info:
                out.uns["geneformer"] = {k: str(v) for k, v in info.items()}
            out.write_h5ad(tmp)

    return atomic_write(path, write)

