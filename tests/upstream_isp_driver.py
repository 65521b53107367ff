"""Run upstream's ``InSilicoPerturber`` for several configurations in one process (tests only).

Each configuration goes through ``../shared/reference/oracle/run_oracle.py`` (unmodified upstream, CPU
shim) with upstream options that runner does not expose:

* ``"anchor_gene": "ENSG..."``: ``combos=1`` with that anchor gene;
* ``"special": true``: V2 cells (``<cls>`` first, ``<eos>`` last). Upstream refuses ``emb_mode`` ``cell`` /
  ``cell_and_gene`` on such cells; it runs ``cls`` / ``cls_and_gene`` instead, and the state embeddings are
  ``EmbExtractor(emb_mode="cls")``'s. The runner's ``--emb-mode cell`` / ``cell_and_gene`` become those.

One process for every configuration saves the interpreter + torch + datasets start-up per run.

    python upstream_isp_driver.py RUNS.json
    RUNS.json: [{"argv": [run_oracle arguments, incl. --output FILE], "anchor_gene": null, "special": false}, ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("GFTRITON_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
ORACLE_DIR = SHARED / "reference" / "oracle"
sys.path.insert(0, str(ORACLE_DIR))

import gf_cpu_shim  # noqa: E402  (before geneformer; run_oracle imports it too)
import run_oracle  # noqa: E402

SPECIAL_MODES = {"cell": "cls", "cell_and_gene": "cls_and_gene"}
_current: dict = {}
_patch_modules = gf_cpu_shim.patch_modules


def _wrap(cls: type, adjust) -> None:
    """Let ``adjust(kwargs)`` rewrite the keyword arguments of ``cls(...)`` (run_oracle passes keywords only)."""
    original = cls.__dict__.get("_driver_original_init", cls.__init__)
    cls._driver_original_init = original

    def __init__(self, *args, **kwargs):
        original(self, *args, **adjust(dict(kwargs)))

    cls.__init__ = __init__


def _adjust_isp(kwargs: dict) -> dict:
    if _current.get("anchor_gene"):
        kwargs.update(combos=1, anchor_gene=_current["anchor_gene"])
    if _current.get("special"):
        kwargs["emb_mode"] = SPECIAL_MODES.get(kwargs["emb_mode"], kwargs["emb_mode"])
    return kwargs


def _adjust_emb(kwargs: dict) -> dict:
    if _current.get("special"):
        kwargs["emb_mode"] = "cls"
    return kwargs


def patch_modules() -> list:
    """run_oracle calls this right after importing upstream: wrap the two classes it builds."""
    patched = _patch_modules()
    _wrap(sys.modules["geneformer.in_silico_perturber"].InSilicoPerturber, _adjust_isp)
    _wrap(sys.modules["geneformer.emb_extractor"].EmbExtractor, _adjust_emb)
    return patched


gf_cpu_shim.patch_modules = patch_modules


def main(path: str) -> None:
    for run in json.loads(Path(path).read_text()):
        _current.clear()
        _current.update(anchor_gene=run.get("anchor_gene"), special=bool(run.get("special")))
        started = time.perf_counter()
        run_oracle.main(run["argv"])
        output = run["argv"][run["argv"].index("--output") + 1]
        print(f"upstream_isp_driver: {Path(output).stem} done in {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
