"""Leftovers of a killed local server: its ``/tmp/gftriton-server-*`` work dir and python-backend
shared-memory regions in ``/dev/shm``. :class:`~geneformer_triton.serving.server.LocalTritonServer` records
who owns a work dir (``gftriton-owner.json``: the owning Python process, the tritonserver process and
the shared-memory prefix) and removes, at the next start, only what belongs to processes that are gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["OWNER_FILE", "WORK_DIR_PREFIX", "write_owner_file", "remove_stale_leftovers", "pid_alive"]

LOGGER = logging.getLogger(__name__)

OWNER_FILE = "gftriton-owner.json"
WORK_DIR_PREFIX = "gftriton-server-"
#: Our shared-memory regions: ``triton_python_backend_shm_region_gft<owner pid>_<random>_...``.
_SHM_NAME = re.compile(r"^triton_python_backend_shm_region_gft(\d+)_[0-9a-f]+_")


def pid_alive(pid: Optional[int]) -> bool:
    """Whether process ``pid`` exists (a zombie counts as gone)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_owner_file(work_dir: Path, server_pid: Optional[int], shm_prefix: str) -> Path:
    """Record this process, the server process and the shared-memory prefix in ``work_dir``."""
    path = Path(work_dir) / OWNER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"owner_pid": os.getpid(), "server_pid": server_pid, "shm_prefix": shm_prefix}))
    tmp.replace(path)
    return path


def _mapped_shm_files() -> set[str]:
    """Names of /dev/shm files that some readable process currently maps."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text(errors="replace").splitlines():
                if "/dev/shm/" in line:
                    names.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
    return names


def remove_stale_leftovers(tmp_root: Optional[Path] = None, shm_dir: Path = Path("/dev/shm")) -> list[Path]:
    """Remove work dirs (under ``tmp_root``, default the system temp dir) whose owner and server are
    both dead, and our shared-memory regions whose owner is dead and that no process maps.
    Dirs without an owner file are left alone. Returns what was removed."""
    removed: list[Path] = []
    root = Path(tmp_root or tempfile.gettempdir())
    for work_dir in root.glob(WORK_DIR_PREFIX + "*"):
        try:
            owner = json.loads((work_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(owner.get("owner_pid")) or pid_alive(owner.get("server_pid")):
            continue
        shutil.rmtree(work_dir, ignore_errors=True)
        removed.append(work_dir)
    if shm_dir.is_dir():
        candidates = [p for p in shm_dir.iterdir()
                      if (m := _SHM_NAME.match(p.name)) and not pid_alive(int(m.group(1)))]
        if candidates:
            mapped = _mapped_shm_files()
            for path in candidates:
                if path.name not in mapped:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed.append(path)
    if removed:
        LOGGER.info("removed %d leftover(s) of killed servers: %s", len(removed),
                    ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed
