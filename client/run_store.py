"""The shared core of the client's resumable result stores (ISP rows, embed partials, Dask shards).

A *run* is the set of files in which one output's unfinished work lives. Every store built on this module
(:mod:`geneformer_triton.client.isp_store`, :mod:`geneformer_triton.client.outputs`,
:mod:`geneformer_triton.client.shards`) keeps the same rules, each in its own on-disk format:

- **Settings** (:func:`open_run`): a JSON file records what the results are of (input, model, settings).
  A later run resumes only if its settings are equal to the stored ones after a JSON round trip;
  otherwise :class:`ResumeMismatchError` names the keys that differ and the option that discards the old
  results. Discarding (``--overwrite`` / ``--restart``) happens only while holding the lock.
- **Whole files** (:func:`atomic_write`): a file is written under a hidden temporary name in its
  folder, fsynced, renamed over its name and the folder fsynced; a reader sees the old file or the new
  one, never a torn one. Temporaries of a killed process are deleted on reopen (:func:`remove_temporaries`).
- **Commits** (:class:`CommitLog`): part files that belong together are read only once their commit
  marker is there. A crash between the parts and the marker leaves the previous state readable; the
  parts without a marker are deleted on reopen (:meth:`CommitLog.sweep`) and their work is redone.
- **Durable appends** (:func:`append_durable`, :func:`truncate_tail`): a record is appended whole and
  fsynced before the call returns; a torn tail left by a crash is cut off on reopen.
- **One writer** (:class:`RunLock`): a store that writes in place holds an exclusive ``flock`` on a lock
  file while it is open; a second writer of the same output is refused with :class:`RunLockedError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

LOGGER = logging.getLogger(__name__)

#: marks a file being written by :func:`atomic_write` (``.<stem>.<token>.tmp<suffix>``)
TEMPORARY_TAG = ".tmp"
_DETAIL_CHARS = 60  # a differing setting's stored / current value is shown up to this many characters


class ResumeMismatchError(ValueError):
    """An output holds results of a run with other settings than the current one."""


class RunLockedError(RuntimeError):
    """Another process is writing the same output."""


# ----------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s directory entries (a rename or a new file in it) to disk; best effort (errors ignored)."""
    with contextlib.suppress(OSError):
        _fsync(path)


def temporary_path(path: Path) -> Path:
    """The hidden name :func:`atomic_write` writes ``path`` under first, in the same folder; it keeps the
    suffix (writers that add or check one see the real one) and is unique per call."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMPORARY_TAG}{path.suffix}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` creates the file at a temporary path
    (:func:`temporary_path`), which is fsynced and renamed over ``path``; then the folder is fsynced.
    On an error in ``write`` the temporary is removed and ``path`` is untouched. Returns ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """:func:`atomic_write` of the bytes ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, value: Any) -> Path:
    """:func:`atomic_write` of ``value`` as indented, key-sorted JSON (one trailing newline)."""
    return write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def remove_temporaries(folder: Path, of: Optional[Path] = None) -> int:
    """Delete what a killed :func:`atomic_write` left in ``folder`` (hidden ``*.tmp*`` files): all of them,
    or (``of``, a file in a folder the store does not own) only those of that file. Returns the count."""
    if not folder.is_dir():
        return 0
    pattern = f".{of.stem}.*{TEMPORARY_TAG}*" if of is not None else f".*{TEMPORARY_TAG}*"
    leftovers = [p for p in folder.glob(pattern) if p.is_file()]
    for leftover in leftovers:
        leftover.unlink()
    if leftovers:
        LOGGER.info("%s: deleted %d temporary file(s) of an interrupted run", folder, len(leftovers))
    return len(leftovers)


def append_durable(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created if missing) in full and fsync it before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate_tail(path: Path, keep: int, what: str) -> None:
    """Cut ``path`` to its first ``keep`` bytes (the intact records) when it is longer: ``what`` (a torn
    line, an incomplete record) was left by an interrupted append and is dropped with a warning."""
    size = path.stat().st_size
    if size <= keep:
        return
    LOGGER.warning("%s: dropping %s (%d bytes) left by an interrupted run", path, what, size - keep)
    with open(path, "r+b") as handle:
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- commits


class CommitLog:
    """Commit markers ``folder/<name><suffix>``: the parts of batch ``name`` count once its marker exists.

    A marker is written atomically after every part of its batch is in place (:meth:`commit`); its
    content (optional bytes, e.g. JSON naming the parts) is read back with :meth:`read`.
    """

    def __init__(self, folder: Path, suffix: str = "") -> None:
        self.folder = Path(folder)
        self.suffix = suffix

    def marker(self, name: str) -> Path:
        return self.folder / f"{name}{self.suffix}"

    def commit(self, name: str, content: bytes = b"") -> None:
        write_bytes_atomic(self.marker(name), content)

    def is_committed(self, name: str) -> bool:
        return self.marker(name).is_file()

    def read(self, name: str) -> bytes:
        return self.marker(name).read_bytes()

    def committed(self) -> set[str]:
        """Names of the committed batches (temporaries and other hidden files excluded)."""
        if not self.folder.is_dir():
            return set()
        return {p.name[: len(p.name) - len(self.suffix)] for p in self.folder.glob(f"*{self.suffix}")
                if not p.name.startswith(".") and p.is_file()}

    def sweep(self, parts: Iterable[Path], batch_of: Callable[[Path], str]) -> int:
        """Delete every part in ``parts`` whose batch (``batch_of(part)``) has no marker: what a run killed
        between writing parts and committing them left; that work is redone. Returns the count."""
        committed = self.committed()
        stale = [p for p in parts if batch_of(p) not in committed]
        if stale:
            LOGGER.warning("%s: deleting %d uncommitted part(s) of an interrupted run (that work is redone)",
                           self.folder, len(stale))
            for part in stale:
                part.unlink()
        return len(stale)


# ----------------------------------------------------------------------------- the run


class RunLock:
    """An exclusive ``flock`` on ``path`` (created if missing), held until :meth:`release`."""

    def __init__(self, path: Path, output: Path) -> None:
        self.path = Path(path)
        self._handle = open(self.path, "a")  # noqa: SIM115 - held while the store is open
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise RunLockedError(f"another run is writing {output} (lock {self.path}); wait for it to finish, "
                                 "stop it, or write to another output") from None

    def release(self) -> None:
        if self._handle.closed:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


@dataclass(frozen=True)
class RunLayout:
    """Where one output's resumable run lives (paths) and how its messages name it.

    ``settings``: the JSON file of the run's settings. ``owned``: the files and folders a discard
    (``--overwrite`` / ``--restart``) removes (the lock file inside them is kept). ``lock``: the lock
    file, or None for a store that is not written in place by concurrent processes. ``output``: the
    output as messages name it. ``discard_option``: the command line option that discards the results.
    ``mismatch``: the :class:`ResumeMismatchError` subclass to raise.
    """

    settings: Path
    owned: tuple[Path, ...]
    output: Path
    discard_option: str
    lock: Optional[Path] = None
    mismatch: type[ResumeMismatchError] = ResumeMismatchError


@dataclass
class OpenRun:
    """A run opened by :func:`open_run`: ``resumed`` is True when equal settings were stored before."""

    layout: RunLayout
    resumed: bool
    lock: Optional[RunLock]

    def close(self) -> None:
        """Release the lock (if any); idempotent."""
        if self.lock is not None:
            self.lock.release()


def _normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def mismatch_detail(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """``key: stored X, now Y`` for every key whose value differs (sorted; long values shortened)."""
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: stored {_short(stored.get(k))}, now {_short(wanted.get(k))}" for k in keys)


def _discard(layout: RunLayout) -> bool:
    """Remove what ``layout`` owns but its lock file; True if anything was there."""
    keep = layout.lock
    found = False
    for path in layout.owned:
        if path.is_dir():
            children = [c for c in path.iterdir() if c != keep]
            found = found or bool(children)
            if keep is None or keep.parent != path:
                shutil.rmtree(path)
                continue
            for child in children:
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif path.exists() and path != keep:
            found = True
            path.unlink()
    return found


def open_run(layout: RunLayout, settings: Mapping[str, Any], discard: bool = False) -> OpenRun:
    """Open the run of ``layout`` for writing with ``settings`` (JSON-able): take the lock (if any), discard
    the stored results when ``discard``, then record the settings (a fresh run) or check them (a resume).

    Raises :class:`RunLockedError` when another process holds the lock and ``layout.mismatch`` when other
    settings are stored; the lock is released again on any error. The caller creates the lock's folder.
    """
    lock = RunLock(layout.lock, layout.output) if layout.lock is not None else None
    try:
        if discard and _discard(layout):
            LOGGER.warning("discarded the stored results of %s (%s)", layout.output, layout.discard_option)
        wanted = _normalised(settings)
        resumed = layout.settings.is_file()
        if resumed:
            stored = json.loads(layout.settings.read_text())
            if stored != wanted:
                raise layout.mismatch(
                    f"{layout.output} holds results of a run with other settings ({mismatch_detail(stored, wanted)}); "
                    f"rerun with the same input and settings to resume, pass {layout.discard_option} to discard "
                    "them, or write to another output")
        else:
            layout.settings.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(layout.settings, wanted)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return OpenRun(layout, resumed, lock)


def stored_settings(path: Path) -> Optional[dict[str, Any]]:
    """The settings recorded in the JSON file ``path``, or None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None
