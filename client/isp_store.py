"""Append-only, resumable store of ``gftriton isp`` results (Parquet dataset folder or one CSV file).

Parquet: part files renamed into place whole; a flushed block of cells (a batch) is committed by a marker
``_commits/<batch>`` once all its parts are written; uncommitted parts are never read and are deleted on
reopen (see :mod:`geneformer_triton.client.isp`). CSV: whole-cell appends + fsync; torn tails and partial cells repaired.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from geneformer_triton.client.outputs import fsync_dir
from geneformer_triton.core.isp_schema import COLUMNS, COMMIT_FOLDER, ERROR_COLUMNS, GENE_COLUMNS, GENE_FOLDER, IspRunError

LOGGER = logging.getLogger(__name__)


def empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


class ResultStore:
    """Append-only, resumable store of per-perturbation rows (Parquet dataset folder or one CSV file)."""

    def __init__(self, path: str | Path, spec_fingerprint: dict, overwrite: bool = False,
                 columns: Sequence[str] = COLUMNS) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.csv = self.path.suffix.lower() == ".csv"
        if overwrite:
            self._remove()
        if self.csv:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.errors_path = self.path.with_suffix(".errors.csv")
            self.run_path = self.path.with_suffix(".run.json")
            lock_path = self.path.with_suffix(".lock")
        else:
            if self.path.exists() and not self.path.is_dir():
                raise IspRunError(f"{self.path} exists and is not a Parquet dataset folder")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "_errors").mkdir(exist_ok=True)
            (self.path / GENE_FOLDER).mkdir(exist_ok=True)
            self.errors_path = self.path / "_errors"
            self.genes_path = self.path / GENE_FOLDER
            self.commits_path = self.path / COMMIT_FOLDER
            self.run_path = self.path / "_run.json"
            lock_path = self.path / "_lock"
        self._lock = open(lock_path, "w")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise IspRunError(f"another run is writing {self.path} (lock {lock_path})") from None
        self._check_settings(spec_fingerprint)
        self._write_lock = threading.Lock()
        self._recover()

    # -- housekeeping
    def _remove(self) -> None:
        import shutil

        if self.path.is_dir():
            shutil.rmtree(self.path)
        for suffix in ("", ".errors.csv", ".run.json"):
            target = self.path if suffix == "" else self.path.with_suffix(suffix)
            if target.is_file():
                target.unlink()

    def _check_settings(self, fingerprint: dict) -> None:
        if self.run_path.is_file():
            stored = json.loads(self.run_path.read_text())
            if stored != json.loads(json.dumps(fingerprint)):
                diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != json.loads(json.dumps(fingerprint)).get(k))
                raise IspRunError(
                    f"{self.path} holds results of a run with other settings ({', '.join(diff)}); "
                    "use another output or overwrite it"
                )
        else:
            tmp = self.run_path.with_name("." + self.run_path.name + ".tmp")
            tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.run_path)

    def _part_folders(self) -> tuple[Path, Path, Path]:
        return self.path, self.errors_path, self.genes_path

    @staticmethod
    def _batch(part: Path) -> str:
        return part.name[len("part-"): -len(".parquet")]

    def _committed(self) -> set[str]:
        return {marker.name for marker in self.commits_path.iterdir() if not marker.name.startswith(".")}

    def _parts(self, folder: Path) -> list[Path]:
        """Committed part files of ``folder`` (rows, ``_errors`` or ``_genes``), in write order."""
        committed = self._committed()
        return [p for p in sorted(folder.glob("part-*.parquet")) if self._batch(p) in committed]

    def _commit(self, batch: str) -> None:
        tmp = self.commits_path / f".{batch}.tmp"
        with open(tmp, "wb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.commits_path / batch)
        fsync_dir(self.commits_path)

    def _recover(self) -> None:
        """Remove leftovers of a killed run: temporary and uncommitted parts (Parquet), torn or partial
        cells (CSV)."""
        if not self.csv:
            if not self.commits_path.is_dir():  # written before commit markers: adopt every part
                self.commits_path.mkdir()
                for batch in sorted({self._batch(p) for f in self._part_folders() for p in f.glob("part-*.parquet")}):
                    self._commit(batch)
            for folder in (*self._part_folders(), self.commits_path):
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink()
            committed = self._committed()
            stale = [p for f in self._part_folders() for p in f.glob("part-*.parquet") if self._batch(p) not in committed]
            if stale:
                LOGGER.warning("%s: deleting %d uncommitted part(s) of an interrupted run (those cells are redone)",
                               self.path, len(stale))
                for part in stale:
                    part.unlink()
            return
        for file in (self.path, self.errors_path):
            if not file.is_file() or file.stat().st_size == 0:
                continue
            data = file.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                LOGGER.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", file, len(data) - cut)
                with open(file, "r+b") as handle:
                    handle.truncate(cut)
            if file == self.path and cut > 0:
                frame = pd.read_csv(file, dtype={"cell_id": str})
                counts = frame.groupby("cell_id")["n_perturbations"].agg(["size", "first"])
                partial = counts.index[counts["size"] != counts["first"]]
                if len(partial):
                    LOGGER.warning("%s: dropping %d incomplete cell(s) of an interrupted run", file, len(partial))
                    self._rewrite_csv(frame[~frame["cell_id"].isin(partial)], file)

    @staticmethod
    def _rewrite_csv(frame: pd.DataFrame, file: Path) -> None:
        tmp = file.with_name("." + file.name + ".tmp")
        frame.to_csv(tmp, index=False)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, file)
        fsync_dir(file.parent)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading
    def read(self) -> pd.DataFrame:
        """Every stored row (empty frame with the columns when none)."""
        if self.csv:
            if not self.path.is_file() or self.path.stat().st_size == 0:
                return empty_frame(self.columns)
            return pd.read_csv(self.path, dtype={"cell_id": str, "gene_id": str, "gene_symbol": str})
        parts = self._parts(self.path)
        if not parts:
            return empty_frame(self.columns)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def read_genes(self) -> pd.DataFrame:
        """Every stored (perturbed, affected) gene cosine (emb_mode cell_and_gene; Parquet outputs only)."""
        parts = [] if self.csv else self._parts(self.genes_path)
        if not parts:
            return empty_frame(GENE_COLUMNS)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def read_errors(self) -> pd.DataFrame:
        if self.csv:
            if not self.errors_path.is_file() or self.errors_path.stat().st_size == 0:
                return empty_frame(ERROR_COLUMNS)
            return pd.read_csv(self.errors_path, dtype={"cell_id": str})
        parts = self._parts(self.errors_path)
        if not parts:
            return empty_frame(ERROR_COLUMNS)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def finished(self, include_errors: bool = True) -> set[str]:
        done = set(self.read()["cell_id"].astype(str))
        if include_errors:
            done |= set(self.read_errors()["cell_id"].astype(str))
        return done

    def forget_errors(self) -> None:
        """Drop the recorded server-rejected cells so that they are retried."""
        if self.csv:
            if self.errors_path.is_file():
                self.errors_path.unlink()
        else:
            for part in self.errors_path.glob("part-*.parquet"):
                part.unlink()

    # -- writing
    def _write_parquet(self, frame: pd.DataFrame, folder: Path, batch: str) -> Path:
        """Write ``frame`` as ``folder/part-<batch>.parquet`` (atomic; read only once ``batch`` is committed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{batch}.parquet"
        tmp = folder / f".{name}.tmp"
        table = pa.Table.from_pandas(frame, preserve_index=False)
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / name)
        fsync_dir(folder)
        return folder / name

    def _append_csv(self, frame: pd.DataFrame, file: Path, columns: Sequence[str]) -> None:
        header = not file.is_file() or file.stat().st_size == 0
        buffer = io.StringIO()
        frame.reindex(columns=list(columns)).to_csv(buffer, index=False, header=header)
        data = buffer.getvalue().encode()
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, rows: pd.DataFrame, errors: pd.DataFrame, genes: Optional[Sequence[pd.DataFrame]] = None) -> None:
        """Persist finished cells as one batch: ``rows`` (whole cells only), ``errors`` (rejected cells,
        dropped targets) and ``genes`` (gene-cosine frames of those cells); Parquet: committed together."""
        genes = [g for g in genes or () if len(g)]
        with self._write_lock:
            if self.csv:
                if genes:
                    raise IspRunError("gene cosines (emb_mode cell_and_gene) are written to Parquet outputs only")
                if len(rows):
                    self._append_csv(rows, self.path, self.columns)
                if len(errors):
                    self._append_csv(errors, self.errors_path, ERROR_COLUMNS)
                return
            batch = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            parts = [(pd.concat(genes, ignore_index=True) if genes else None, self.genes_path),
                     (rows, self.path), (errors, self.errors_path)]
            written = [self._write_parquet(frame, folder, batch) for frame, folder in parts
                       if frame is not None and len(frame)]
            if written:
                self._commit(batch)
