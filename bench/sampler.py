"""Resource sampling while a method runs: CPU% and RSS (psutil), GPU utilization and memory (NVML).

``ResourceSampler`` polls in a background thread (default every 0.1 s) a set of processes (this one,
or a child such as helical's venv, or a tritonserver and its python stubs), the whole machine's CPU
and load, and GPU 0 through NVML when ``libnvidia-ml.so.1`` can be loaded (no Python package needed).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass, field

import psutil


class _NvmlUtilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """Minimal NVML reader (GPU ``index``): utilization % and memory used, via ctypes."""

    def __init__(self, index: int = 0) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self.handle)) != 0:
            raise OSError(f"no NVML device {index}")
        name = ctypes.create_string_buffer(96)
        self.name = name.value.decode() if self.lib.nvmlDeviceGetName(self.handle, name, 96) == 0 else "?"

    @classmethod
    def open(cls, index: int = 0) -> "Nvml | None":
        try:
            return cls(index)
        except OSError:
            return None

    def read(self) -> tuple[float, float]:
        """(GPU utilization %, memory used in MiB)."""
        util, memory = _NvmlUtilization(), _NvmlMemory()
        self.lib.nvmlDeviceGetUtilizationRates(self.handle, ctypes.byref(util))
        self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(memory))
        return float(util.gpu), memory.used / 2**20


@dataclass
class ResourceSummary:
    """What the sampler saw between start and stop (means over samples, peaks)."""

    samples: int = 0
    cpu_pct_mean: float = float("nan")  # of the watched processes; 100 = one core busy
    cpu_pct_max: float = float("nan")
    rss_peak_mb: float = float("nan")  # sum over the watched processes
    system_cpu_pct_mean: float = float("nan")  # whole machine, 100 = all cores busy
    loadavg_1m: float = float("nan")
    gpu_util_mean: float = float("nan")
    gpu_mem_peak_mb: float = float("nan")
    gpu_name: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self, prefix: str = "") -> dict:
        values = {k: v for k, v in self.__dict__.items() if k not in ("extra", "samples")}
        return {f"{prefix}{k}": v for k, v in values.items()}


class ResourceSampler:
    """Context manager polling ``pids`` (default: this process; children included) every ``interval_s``."""

    def __init__(self, pids: list[int] | None = None, interval_s: float = 0.1, include_children: bool = True,
                 gpu: bool = True) -> None:
        self.pids = list(pids) if pids is not None else [os.getpid()]
        self.interval_s = interval_s
        self.include_children = include_children
        self.nvml = Nvml.open() if gpu else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu: list[float] = []
        self._rss: list[float] = []
        self._sys: list[float] = []
        self._gpu: list[float] = []
        self._gmem: list[float] = []
        self._procs: dict[int, psutil.Process] = {}
        self.summary = ResourceSummary()

    def watch(self, pid: int) -> None:
        """Add a process (e.g. a child started after the sampler)."""
        if pid not in self.pids:
            self.pids.append(pid)

    def _processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for pid in self.pids:
            try:
                proc = self._procs.get(pid) or psutil.Process(pid)
                found[pid] = proc
                if self.include_children:
                    for child in proc.children(recursive=True):
                        found[child.pid] = self._procs.get(child.pid) or child
            except psutil.Error:
                continue
        for pid, proc in found.items():
            if pid not in self._procs:
                self._procs[pid] = proc
                try:
                    proc.cpu_percent(None)  # first call primes the counter
                except psutil.Error:
                    pass
        return list(found.values())

    def _poll(self) -> None:
        psutil.cpu_percent(None)
        self._processes()
        while not self._stop.wait(self.interval_s):
            cpu = rss = 0.0
            for proc in self._processes():
                try:
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
            self._cpu.append(cpu)
            self._rss.append(rss)
            self._sys.append(psutil.cpu_percent(None))
            if self.nvml is not None:
                try:
                    util, mem = self.nvml.read()
                    self._gpu.append(util)
                    self._gmem.append(mem)
                except OSError:
                    pass

    def __enter__(self) -> "ResourceSampler":
        self._thread = threading.Thread(target=self._poll, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        s = self.summary
        s.samples = len(self._cpu)
        if self._cpu:
            s.cpu_pct_mean = float(sum(self._cpu) / len(self._cpu))
            s.cpu_pct_max = float(max(self._cpu))
            s.rss_peak_mb = float(max(self._rss))
            s.system_cpu_pct_mean = float(sum(self._sys) / len(self._sys))
        else:  # too short to sample: at least the memory now
            try:
                s.rss_peak_mb = sum(p.memory_info().rss for p in self._processes()) / 2**20
            except psutil.Error:
                pass
        s.loadavg_1m = os.getloadavg()[0]
        if self._gpu:
            s.gpu_util_mean = float(sum(self._gpu) / len(self._gpu))
            s.gpu_mem_peak_mb = float(max(self._gmem))
        if self.nvml is not None:
            s.gpu_name = self.nvml.name


def cpu_times(pid: int | None = None, children: bool = True) -> float:
    """User + system CPU seconds of a process (and its live children)."""
    proc = psutil.Process(pid or os.getpid())
    total = 0.0
    for p in [proc] + (proc.children(recursive=True) if children else []):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def wall() -> float:
    return time.perf_counter()
