"""Stop a worker's tritonserver when the worker process dies without tearing down (SIGKILL, OOM kill).

A Dask worker plugin (:class:`client.distributed.TritonServerPlugin`) starts its server in a process
group of its own, so the server outlives a killed worker. This watchdog (a separate small process,
``python -m geneformer_triton.client.triton_watchdog --parent PID --group PGID ...``) polls the worker every
``--interval`` seconds; when the worker is gone it sends SIGTERM to the server's group, SIGKILL after
``--grace`` seconds, and removes the server's python-backend shared-memory files and work folder.
It exits by itself once the server group is gone (a normal teardown stopped it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped by its parent, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group, wait up to ``grace_s`` seconds, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def watch(parent: int, pgid: int, interval_s: float, grace_s: float, shm_prefix: str, remove: Optional[Path]) -> str:
    """Block until the server group is gone ("stopped") or the parent died and the group was stopped
    ("parent died"); returns which."""
    while _group_alive(pgid):
        if not _alive(parent):
            stop_group(pgid, grace_s)
            if shm_prefix:
                for path in Path("/dev/shm").glob(shm_prefix + "*"):
                    with contextlib.suppress(OSError):
                        path.unlink()
            if remove is not None:
                shutil.rmtree(remove, ignore_errors=True)
            return "parent died"
        time.sleep(interval_s)
    return "stopped"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.client.triton_watchdog", description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="pid of the Dask worker process")
    parser.add_argument("--group", type=int, required=True, help="process-group id of the tritonserver")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between checks")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--shm-prefix", default="", help="the server's /dev/shm file prefix")
    parser.add_argument("--remove", type=Path, help="folder to remove after stopping the server")
    args = parser.parse_args(argv)
    watch(args.parent, args.group, args.interval, args.grace, args.shm_prefix, args.remove)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
