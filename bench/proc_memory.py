"""Peak memory of a process tree, sampled with psutil (benchmarks only).

``TreeMemorySampler(pid)`` polls the sum of the resident set sizes (RSS) of ``pid`` and all its
descendants every ``interval_s`` seconds in a background thread and keeps the maximum. Pages shared
between processes of the tree (e.g. Triton's python-backend shared-memory regions, mapped by the server
and its stubs) are counted once per process that maps them, so the figure is an upper bound of the
tree's footprint. Peaks shorter than the interval can be missed.

With ``phase_file``, the process under test writes the name of what it is doing into that file and each
sample is attributed to the phase named there (``peak_by_phase``); memory kept from an earlier phase
counts in the later one (an upper bound again).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import psutil


def tree_rss_bytes(pid: int) -> int:
    """Sum of RSS (bytes) over ``pid`` and its descendants alive right now (0 if ``pid`` is gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            continue
    return total


class TreeMemorySampler:
    """Context manager sampling :func:`tree_rss_bytes` of ``pid``; ``peak_bytes`` after exit (or live)."""

    def __init__(self, pid: int, interval_s: float = 0.05, phase_file: Optional[Path] = None) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.phase_file = phase_file
        self.peak_bytes = 0
        self.peak_by_phase: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_bytes(self.pid)
            self.peak_bytes = max(self.peak_bytes, rss)
            phase = self._phase()
            self.peak_by_phase[phase] = max(self.peak_by_phase.get(phase, 0), rss)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def _phase(self) -> str:
        if self.phase_file is None:
            return ""
        try:
            return self.phase_file.read_text().strip()
        except OSError:  # not written yet
            return ""

    def phase_peak_mib(self, phase: str) -> float:
        """Peak MiB while ``phase`` was current (0.0 if never sampled)."""
        return self.peak_by_phase.get(phase, 0) / 2**20

    def __enter__(self) -> "TreeMemorySampler":
        self._thread = threading.Thread(target=self._run, name=f"rss-sampler-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


__all__ = ["TreeMemorySampler", "tree_rss_bytes"]
