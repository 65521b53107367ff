"""Shards of a cell range and the crash-safe store of their finished results.

A distributed run cuts the cells ``0 .. n_cells`` into fixed shards of ``shard_size`` consecutive
rows (:func:`plan_shards`); each shard is one task. The client process writes each finished shard into
``<output>.shards/`` (:class:`ShardStore`) as one or more pieces (``shard-00003.rows.parquet``,
``shard-00003.embeddings.npy``, ...), each written to a hidden temporary file, fsynced and renamed into
place, and then a marker ``shard-00003.done`` (JSON naming the pieces) the same way: a shard is done
exactly when its marker is there. A rerun skips done shards; a shard finished twice (a task rerun after
its worker was thought lost) is written once. ``_plan.json`` records what the shards are of (input,
settings, shard size); resuming another plan is refused. The final output is assembled from the pieces
in cell order by the job (``geneformer_triton.client.dask_jobs``) and the folder removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np
import pandas as pd

from geneformer_triton.client.outputs import fsync_dir

LOGGER = logging.getLogger(__name__)

Piece = Union[pd.DataFrame, np.ndarray]


class ShardPlanMismatchError(ValueError):
    """The shard folder holds results of another input, settings or shard size."""


@dataclass(frozen=True)
class Shard:
    """Rows ``start .. stop`` (stop exclusive) of the cell table; ``index`` numbers the shard."""

    index: int
    start: int
    stop: int

    @property
    def n_cells(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> np.ndarray:
        """Row indices, int64 [n_cells]."""
        return np.arange(self.start, self.stop, dtype=np.int64)

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def plan_shards(n_cells: int, shard_size: int) -> list[Shard]:
    """Consecutive shards of at most ``shard_size`` cells covering ``0 .. n_cells``."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1 cells, got {shard_size}")
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    return [Shard(i, start, min(start + shard_size, n_cells))
            for i, start in enumerate(range(0, n_cells, shard_size))]


def fingerprint(*parts: Iterable[str] | np.ndarray) -> str:
    """sha256 (hex) of string lists and arrays, to recognise an input when resuming."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update("\x1f".join(str(p) for p in part).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


class ShardStore:
    """Finished shards of one output, in ``<output>.shards/``; see the module docstring."""

    def __init__(self, output: str | Path) -> None:
        output = Path(output)
        self.folder = output.with_name(output.name + ".shards")
        self.plan_path = self.folder / "_plan.json"

    def open(self, plan: Mapping[str, Any], restart: bool = False) -> int:
        """Create the folder or resume it; returns the number of shards already done.

        ``plan`` (JSON-able) identifies the run; if the folder holds another plan,
        :class:`ShardPlanMismatchError` (unless ``restart``, which discards the folder).
        """
        if restart and self.folder.exists():
            LOGGER.warning("discarding finished shards in %s", self.folder)
            shutil.rmtree(self.folder)
        wanted = json.loads(json.dumps(dict(plan)))
        if self.plan_path.is_file():
            stored = json.loads(self.plan_path.read_text())
            if stored != wanted:
                keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                raise ShardPlanMismatchError(
                    f"{self.folder} holds shards of another run (differs in: {', '.join(keys)}); "
                    "rerun with the same input, settings and --shard-size, or discard them "
                    "(--overwrite for isp, --restart for embed)")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_atomic(self.plan_path, lambda handle: handle.write(json.dumps(wanted, indent=2).encode()))
        for leftover in self.folder.glob(".*.tmp"):
            leftover.unlink()  # a temporary piece of a killed run
        return len(list(self.folder.glob("shard-*.done")))

    def _marker(self, shard: Shard) -> Path:
        return self.folder / f"{shard.name}.done"

    def is_done(self, shard: Shard) -> bool:
        return self._marker(shard).is_file()

    def _write_atomic(self, path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def write(self, shard: Shard, pieces: Mapping[str, Piece]) -> bool:
        """Store a finished shard: every piece, then its marker. Returns False (and writes nothing)
        when the shard is already done (a duplicate result)."""
        if self.is_done(shard):
            LOGGER.info("%s is already stored; dropping a duplicate result", shard.name)
            return False
        names = {}
        for key, piece in pieces.items():
            if isinstance(piece, pd.DataFrame):
                path = self.folder / f"{shard.name}.{key}.parquet"
                self._write_atomic(path, lambda handle, p=piece: p.to_parquet(handle, index=False))
            elif isinstance(piece, np.ndarray):
                path = self.folder / f"{shard.name}.{key}.npy"
                self._write_atomic(path, lambda handle, p=piece: np.save(handle, p, allow_pickle=False))
            else:
                raise TypeError(f"piece {key!r} of {shard.name}: expected a DataFrame or ndarray, got {type(piece).__name__}")
            names[key] = path.name
        marker = {"start": shard.start, "stop": shard.stop, "pieces": names}
        self._write_atomic(self._marker(shard), lambda handle: handle.write(json.dumps(marker).encode()))
        return True

    def read(self, shard: Shard) -> dict[str, Piece]:
        """The pieces of a done shard, by key."""
        marker = json.loads(self._marker(shard).read_text())
        if (marker["start"], marker["stop"]) != (shard.start, shard.stop):
            raise ShardPlanMismatchError(f"{shard.name} in {self.folder} covers rows {marker['start']}..{marker['stop']}, "
                                         f"expected {shard.start}..{shard.stop}")
        pieces: dict[str, Piece] = {}
        for key, name in marker["pieces"].items():
            path = self.folder / name
            pieces[key] = pd.read_parquet(path) if name.endswith(".parquet") else np.load(path, allow_pickle=False)
        return pieces

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
