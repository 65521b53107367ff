"""Append-only, resumable store of ``gftriton isp`` results (Parquet dataset folder or one CSV file).

Parquet: part files renamed into place whole; a flushed block of cells (a batch) is committed by a marker
``_commits/<batch>`` once all its parts are written; uncommitted parts are never read and are deleted on
reopen (see :mod:`geneformer_triton.client.isp`). CSV: whole-cell appends + fsync; torn tails and partial
cells repaired. Settings check, lock, atomic writes and commits: :mod:`geneformer_triton.client.run_store`.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from geneformer_triton.client.run_store import (
    CommitLog,
    ResumeMismatchError,
    RunLayout,
    append_durable,
    atomic_write,
    open_run,
    remove_temporaries,
    stored_settings,
    truncate_tail,
)
from geneformer_triton.core.isp_schema import (
    COLUMNS,
    COMMIT_FOLDER,
    ERROR_COLUMNS,
    GENE_COLUMNS,
    GENE_FOLDER,
    PART_GLOB,
    IspRunError,
    committed_parts,
    part_batch,
    part_file,
)

LOGGER = logging.getLogger(__name__)
DISCARD_OPTION = "--overwrite"


class IspResumeMismatchError(ResumeMismatchError, IspRunError):
    """An ISP output holds results of a run with other settings."""


def empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _layout(path: Path) -> RunLayout:
    if path.suffix.lower() == ".csv":
        settings = path.with_suffix(".run.json")
        return RunLayout(settings, (path, path.with_suffix(".errors.csv"), settings), path, DISCARD_OPTION,
                         lock=path.with_suffix(".lock"), mismatch=IspResumeMismatchError)
    return RunLayout(path / "_run.json", (path,), path, DISCARD_OPTION, lock=path / "_lock", mismatch=IspResumeMismatchError)


class ResultStore:
    """Append-only, resumable store of per-perturbation rows (Parquet dataset folder or one CSV file)."""

    def __init__(self, path: str | Path, spec_fingerprint: dict, overwrite: bool = False,
                 columns: Sequence[str] = COLUMNS) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.csv = self.path.suffix.lower() == ".csv"
        layout = _layout(self.path)
        if self.csv:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.errors_path = self.path.with_suffix(".errors.csv")
        else:
            if self.path.exists() and not self.path.is_dir():
                raise IspRunError(f"{self.path} exists and is not a Parquet dataset folder")
            self.path.mkdir(parents=True, exist_ok=True)
            self.errors_path = self.path / "_errors"
            self.genes_path = self.path / GENE_FOLDER
            self.commits = CommitLog(self.path / COMMIT_FOLDER)
        self._run = open_run(layout, spec_fingerprint, discard=overwrite)
        try:
            self._write_lock = threading.Lock()
            if self.csv:
                self._recover_csv()
            else:
                self._recover_parquet()
        except BaseException:
            self._run.close()
            raise

    @staticmethod
    def settings_path(path: str | Path) -> Path:
        """The JSON file holding the settings fingerprint of the output ``path``."""
        return _layout(Path(path)).settings

    @staticmethod
    def stored_fingerprint(path: str | Path) -> Optional[dict[str, Any]]:
        """The settings fingerprint an output at ``path`` was written with (None: no ISP results there)."""
        return stored_settings(ResultStore.settings_path(path))

    # -- housekeeping
    def _part_folders(self) -> tuple[Path, Path, Path]:
        return self.path, self.errors_path, self.genes_path

    def _all_parts(self) -> list[Path]:
        return [p for folder in self._part_folders() for p in folder.glob(PART_GLOB)]

    def _parts(self, folder: Path) -> list[Path]:
        """Committed part files of ``folder`` (rows, ``_errors`` or ``_genes``), in write order."""
        return committed_parts(folder, self.commits.committed())

    def _recover_parquet(self) -> None:
        """Remove leftovers of a killed run: temporary and uncommitted parts."""
        for folder in self._part_folders()[1:]:
            folder.mkdir(exist_ok=True)
        if not self.commits.folder.is_dir():  # written before commit markers: adopt every part
            self.commits.folder.mkdir()
            for batch in sorted({part_batch(p) for p in self._all_parts()}):
                self.commits.commit(batch)
        for folder in (*self._part_folders(), self.commits.folder):
            remove_temporaries(folder)
        self.commits.sweep(self._all_parts(), part_batch)

    def _recover_csv(self) -> None:
        """Remove leftovers of a killed run: torn last lines and partial cells."""
        for file in (self.path, self.errors_path):
            remove_temporaries(file.parent, of=file)
            if not file.is_file() or file.stat().st_size == 0:
                continue
            data = file.read_bytes()
            cut = data.rfind(b"\n") + 1
            truncate_tail(file, cut, "a torn last line")
            if file == self.path and cut > 0:
                frame = pd.read_csv(file, dtype={"cell_id": str})
                counts = frame.groupby("cell_id")["n_perturbations"].agg(["size", "first"])
                partial = counts.index[counts["size"] != counts["first"]]
                if len(partial):
                    LOGGER.warning("%s: dropping %d incomplete cell(s) of an interrupted run", file, len(partial))
                    kept = frame[~frame["cell_id"].isin(partial)]
                    atomic_write(file, lambda tmp, k=kept: k.to_csv(tmp, index=False))

    def close(self) -> None:
        self._run.close()

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
            for part in self.errors_path.glob(PART_GLOB):
                part.unlink()

    # -- writing
    def _write_parquet(self, frame: pd.DataFrame, folder: Path, batch: str) -> Path:
        """Write ``frame`` as ``folder/part-<batch>.parquet`` (atomic; read only once ``batch`` is committed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        return atomic_write(part_file(folder, batch), lambda tmp: pq.write_table(table, tmp))

    @staticmethod
    def _append_csv(frame: pd.DataFrame, file: Path, columns: Sequence[str]) -> None:
        header = not file.is_file() or file.stat().st_size == 0
        buffer = io.StringIO()
        frame.reindex(columns=list(columns)).to_csv(buffer, index=False, header=header)
        append_durable(file, buffer.getvalue().encode())

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
                self.commits.commit(batch)
