"""Environment for upstream Geneformer as an oracle (tests only): helical's venv + a ``--target`` overlay.

Environment A of ``../shared/reference/oracle/README.md``: helical's Python 3.12 venv (torch, transformers,
datasets, pandas, scipy, scikit-learn) plus, in a folder of their own, the small packages upstream imports
that helical lacks: peft, tdigest and its two helpers (``InSilicoPerturber``), statsmodels + patsy
(``InSilicoPerturberStats``). :func:`oracle_overlay` installs them once (idempotent: a stamp file records
the pins) and returns the folder to put on ``PYTHONPATH``. A missing helical venv or a failed install
raises: CI installs everything, so this must fail loudly, never skip.

    python tests/oracle_env.py            # install (or reuse) the overlay and print its path
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
ORACLE_DIR = SHARED / "reference" / "oracle"
UPSTREAM_DIR = SHARED / "reference" / "geneformer"
OVERLAY_PACKAGES = (
    "peft==0.21.2", "tdigest==0.5.2.2", "accumulation_tree==0.6.4", "pyudorandom==1.0.0",
    "statsmodels==0.14.4", "patsy==1.0.1",
)


def helical_python() -> Path:
    """The helical venv's interpreter ($GFTRITON_HELICAL_PYTHON, else .venv-helical in the repository)."""
    python = Path(os.environ.get("GFTRITON_HELICAL_PYTHON", REPO_ROOT / ".venv-helical" / "bin" / "python"))
    if not python.exists():
        raise RuntimeError(f"helical venv not found at {python}: run `make helical-venv` (or set GFTRITON_HELICAL_PYTHON)")
    return python


def overlay_dir() -> Path:
    """Where the overlay lives: $GFTRITON_ORACLE_OVERLAY, else a folder in the temp dir named by the pins."""
    if os.environ.get("GFTRITON_ORACLE_OVERLAY"):
        return Path(os.environ["GFTRITON_ORACLE_OVERLAY"])
    digest = hashlib.sha256("\n".join(OVERLAY_PACKAGES).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gftriton-oracle-overlay-{digest}"


def oracle_overlay() -> Path:
    """Install the overlay for the helical venv unless its stamp says it is there; return its folder."""
    target = overlay_dir()
    stamp = target / ".installed"
    wanted = "\n".join(OVERLAY_PACKAGES) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:  # two test processes must not install into one folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted:
            return target
        command = [str(helical_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                   "--no-deps", "--upgrade", "--target", str(target), *OVERLAY_PACKAGES]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"installing the oracle overlay failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
        stamp.write_text(wanted)
    return target


def oracle_environment() -> dict:
    """``os.environ`` for a helical-venv subprocess that imports upstream (overlay on PYTHONPATH)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(oracle_overlay())
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


if __name__ == "__main__":
    print(oracle_overlay())
    sys.exit(0)
