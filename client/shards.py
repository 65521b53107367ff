"""Shards of a cell range and the crash-safe store of their finished results.

A distributed run cuts the cells ``0 .. n_cells`` into fixed shards of ``shard_size`` consecutive
rows (:func:`plan_shards`); each shard is one task. The client process writes each finished shard into
``<output>.shards/`` (:class:`ShardStore`) as one or more pieces (``shard-00003.rows.parquet``,
``shard-00003.embeddings.npy``, ...), each written to a hidden temporary file, fsynced and renamed into
place, and then a marker ``shard-00003.done`` (JSON naming the pieces) the same way: a shard is done
exactly when its marker is there. A rerun skips done shards; a shard finished twice (a task rerun after
its worker was thought lost) is written once. ``_plan.json`` records what the shards are of (input,
settings, shard size); resuming another plan is refused. Reopening deletes pieces without a marker and
temporaries of a killed run (rules: :mod:`geneformer_triton.client.run_store`). The final output is assembled from the pieces
in cell order by the job (``geneformer_triton.client.dask_jobs``) and the folder removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import pandas as pd

from geneformer_triton.client.run_store import (
    CommitLog,
    OpenRun,
    ResumeMismatchError,
    RunLayout,
    atomic_write,
    open_run,
    remove_temporaries,
)

LOGGER = logging.getLogger(__name__)

Piece = Union[pd.DataFrame, np.ndarray]


class ShardPlanMismatchError(ResumeMismatchError):
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
    """Finished shards of one output, in ``<output>.shards/``; see the module docstring.

    While open (:meth:`open` .. :meth:`close` / :meth:`remove`, or a ``with`` block) it holds the folder's
    lock: a second run on the same output is refused (:class:`~geneformer_triton.client.run_store.RunLockedError`)
    before its reopening could delete the first run's pieces that are not yet marked done.
    """

    def __init__(self, output: str | Path) -> None:
        output = Path(output)
        self.folder = output.with_name(output.name + ".shards")
        self.plan_path = self.folder / "_plan.json"
        self._done = CommitLog(self.folder, ".done")
        self._run: Optional[OpenRun] = None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, plan: Mapping[str, Any], restart: bool = False) -> int:
        """Create the folder or resume it; returns the number of shards already done.

        ``plan`` (JSON-able) identifies the run; if the folder holds another plan,
        :class:`ShardPlanMismatchError` (unless ``restart``, which discards the folder). Temporaries and
        pieces of shards without a marker (a killed run) are deleted.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        layout = RunLayout(self.plan_path, (self.folder,), self.folder,
                           "--overwrite (isp) or --restart (embed)", lock=self.folder / "_lock",
                           mismatch=ShardPlanMismatchError)
        run = open_run(layout, plan, discard=restart)
        try:
            remove_temporaries(self.folder)
            self._done.sweep([p for p in self.folder.glob("shard-*") if p.suffix != self._done.suffix],
                             lambda piece: piece.name.split(".", 1)[0])
        except BaseException:
            run.close()
            raise
        self._run = run
        return len(self._done.committed())

    def close(self) -> None:
        """Release the lock (idempotent); the stored shards stay for a resume."""
        if self._run is not None:
            self._run.close()
            self._run = None

    def is_done(self, shard: Shard) -> bool:
        return self._done.is_committed(shard.name)

    def write(self, shard: Shard, pieces: Mapping[str, Piece]) -> bool:
        """Store a finished shard: every piece, then its marker. Returns False (and writes nothing)
        when the shard is already done (a duplicate result)."""
        if self.is_done(shard):
            LOGGER.info("%s is already stored; dropping a duplicate result", shard.name)
            return False
        names = {}
        for key, piece in pieces.items():
            if isinstance(piece, pd.DataFrame):
                path = atomic_write(self.folder / f"{shard.name}.{key}.parquet",
                                    lambda tmp, p=piece: p.to_parquet(tmp, index=False))
            elif isinstance(piece, np.ndarray):
                path = atomic_write(self.folder / f"{shard.name}.{key}.npy",
                                    lambda tmp, p=piece: np.save(tmp, p, allow_pickle=False))
            else:
                raise TypeError(f"piece {key!r} of {shard.name}: expected a DataFrame or ndarray, got {type(piece).__name__}")
            names[key] = path.name
        marker = {"start": shard.start, "stop": shard.stop, "pieces": names}
        self._done.commit(shard.name, json.dumps(marker).encode())
        return True

    def read(self, shard: Shard) -> dict[str, Piece]:
        """The pieces of a done shard, by key."""
        marker = json.loads(self._done.read(shard.name))
        if (marker["start"], marker["stop"]) != (shard.start, shard.stop):
            raise ShardPlanMismatchError(f"{shard.name} in {self.folder} covers rows {marker['start']}..{marker['stop']}, "
                                         f"expected {shard.start}..{shard.stop}")
        pieces: dict[str, Piece] = {}
        for key, name in marker["pieces"].items():
            path = self.folder / name
            pieces[key] = pd.read_parquet(path) if name.endswith(".parquet") else np.load(path, allow_pickle=False)
        return pieces

    def remove(self) -> None:
        """Delete the folder (the job assembled its output), then release the lock: a run that opens the
        output after this starts on a new folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()

