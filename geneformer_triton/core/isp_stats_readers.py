"""Readers that turn ISP outputs into the stats input table (:data:`geneformer_triton.core.isp_stats.SHIFT_COLUMNS`).

* :func:`shifts_from_upstream_dir`: upstream ``InSilicoPerturber``'s raw pickles (``*_raw.pickle``), so our
  stats run on existing upstream outputs. Pickles are read with an unpickler that only builds dicts,
  lists, tuples and numbers (a pickle is code; these files need nothing else).
* :func:`shifts_from_oracle_json`: the JSON of ``../shared/reference/oracle/run_oracle.py``.
* :func:`shifts_from_isp_results`: ADAPTER for our ``gftriton isp`` results (``client/isp.py``); the
  column mapping lives in :data:`ISP_RESULT_COLUMNS` alone, to repoint when that output changes.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from geneformer_triton.core.isp_schema import COMMIT_FOLDER, PART_GLOB, STATE_PREFIX, UPSTREAM_SCORE, committed_parts
from geneformer_triton.core.isp_stats import CELL_EMB, SHIFT_COLUMNS, GeneDictionaries, IspStatsError, perturbed_key

LOGGER = logging.getLogger(__name__)

UPSTREAM_SUFFIX = "_raw.pickle"
_ALL_MODE_FILE = re.compile(r"_(\d+)batch(-?\d+)" + re.escape(UPSTREAM_SUFFIX) + "$")
_ALLOWED_GLOBALS = {
    ("collections", "defaultdict"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"),
    ("builtins", "float"), ("builtins", "int"), ("builtins", "str"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise IspStatsError(f"refusing to load {module}.{name} from a pickle: upstream's raw ISP pickles hold "
                                "only dicts of lists of numbers")
        return super().find_class(module, name)


def _load_pickle(path: Path):
    with open(path, "rb") as handle:
        return _DataUnpickler(io.BytesIO(handle.read())).load()


def _is_state_dict(content: dict) -> bool:
    return bool(content) and all(isinstance(k, str) and isinstance(v, dict) for k, v in content.items())


def _frame(cells, perturbed, affected, states, values) -> pd.DataFrame:
    return pd.DataFrame({"cell": cells, "perturbed": perturbed, "affected": np.asarray(affected, dtype=np.int64),
                         "state": states, "cos": np.asarray(values, dtype=np.float64)}, columns=list(SHIFT_COLUMNS))


class _Collector:
    """Rows gathered one upstream dict at a time, as numpy arrays (one Python step per key, not per value)."""

    def __init__(self) -> None:
        self.parts: list[pd.DataFrame] = []
        self._keys: dict = {}  # upstream perturbed key (int or tuple) -> our string key

    def _key(self, pert) -> str:
        key = self._keys.get(pert)
        if key is None:
            key = self._keys[pert] = perturbed_key(pert)
        return key

    def add_dict(self, content: dict, state: str, cell: Optional[str]) -> None:
        """``{(perturbed, affected): [values]}``. ``cell``: the file's cell; else (list runs) the value's
        position for cell rows (one value per cell, in upstream's cell order) and "" for gene rows."""
        if not content:
            return
        keys = list(content)
        if not all(isinstance(k, tuple) and len(k) == 2 for k in keys):
            bad = next(k for k in keys if not (isinstance(k, tuple) and len(k) == 2))
            raise IspStatsError(f"unexpected key {bad!r} in an upstream ISP pickle (want (perturbed, affected))")
        counts = np.fromiter((len(v) for v in content.values()), dtype=np.int64, count=len(keys))
        values = np.fromiter(itertools.chain.from_iterable(content.values()), dtype=np.float64, count=int(counts.sum()))
        affected = np.array([CELL_EMB if k[1] == "cell_emb" else int(k[1]) for k in keys], dtype=np.int64)
        perturbed = np.repeat(np.array([self._key(k[0]) for k in keys], dtype=object), counts)
        affected = np.repeat(affected, counts)
        if cell is not None:
            cells = np.full(values.size, cell, dtype=object)
        else:  # position within each cell-embedding list; "" for gene rows
            within = np.arange(values.size) - np.repeat(np.cumsum(counts) - counts, counts)
            cells = np.where(affected == CELL_EMB, within.astype(str).astype(object), "")
        self.parts.append(_frame(cells, perturbed, affected, np.full(values.size, state, dtype=object), values))

    def frame(self) -> pd.DataFrame:
        if not self.parts:
            return _frame([], [], [], [], [])
        return pd.concat(self.parts, ignore_index=True)


def shifts_from_upstream_dir(directory: str | Path, suffix: str = UPSTREAM_SUFFIX) -> pd.DataFrame:
    """Every value of upstream's raw ISP pickles in ``directory`` (files in ``os.listdir`` order, the
    order upstream's stats read them; dict and list order kept). Cell-state pickles (``{state: dict}``)
    give rows per state; gene-embedding pickles beside them are read as stateless rows (upstream's
    ``goal_state_shift`` fails on them). ``cell`` is the cell's position in upstream's processing order
    for "all" runs (the ``{h}batch`` of the file name); in list runs, the value's position for cell rows."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IspStatsError(f"upstream ISP output folder not found: {directory}")
    files = [name for name in os.listdir(directory) if name.endswith(suffix)]
    if not files:
        raise IspStatsError(f"no files ending in {suffix!r} in {directory}: point at InSilicoPerturber's output_directory")
    rows = _Collector()
    for name in tqdm(files, desc="upstream pickles", unit="file", disable=None):
        content = _load_pickle(directory / name)
        if not isinstance(content, dict):
            raise IspStatsError(f"{directory / name} holds a {type(content).__name__}, not upstream's dict of shifts")
        match = _ALL_MODE_FILE.search(name)
        parts = content.items() if _is_state_dict(content) else [("", content)]
        for state, sub in parts:
            rows.add_dict(sub, state, match.group(1) if match else None)
    out = rows.frame()
    LOGGER.info("read %d shifts from %d upstream pickles in %s", len(out), len(files), directory)
    return out


def shifts_from_oracle_json(path: str | Path) -> pd.DataFrame:
    """``cell_shifts`` (affected = cell) and ``gene_shifts`` of a ``run_oracle.py`` JSON output."""
    result = json.loads(Path(path).read_text())
    cells, perturbed, affected, states, values = [], [], [], [], []
    for row in result.get("cell_shifts", []):
        cells.append(str(row["cell"]))
        perturbed.append(perturbed_key(row["perturbed"]))
        affected.append(CELL_EMB)
        states.append(row.get("state") or "")
        values.append(row["cos"])
    for row in result.get("gene_shifts", []):
        cells.append("" if row.get("cell") is None else str(row["cell"]))
        perturbed.append(perturbed_key(row["perturbed"]))
        affected.append(int(row["affected"]))
        states.append("")
        values.append(row["cos"])
    return _frame(cells, perturbed, affected, states, values)


# Our ISP results (`gftriton isp`, layout: geneformer_triton.core.isp_schema). Stateless value: upstream's
# (perturbed, "cell_emb") cosine. With cell states: one value per state column (state name -> column),
# upstream's cos(perturbed, S) - cos(original, S).
ISP_RESULT_COLUMNS = {
    "cell": "cell_id",
    "perturbed_ids": "gene_id",  # Ensembl ids, a group joined with "+"
    "stateless": UPSTREAM_SCORE,
    "state_prefix": STATE_PREFIX,  # + state name
}


def read_isp_results(path: str | Path) -> pd.DataFrame:
    """Rows of a ``gftriton isp`` output: a Parquet dataset folder (its committed parts only: a part without
    its ``_commits/`` marker belongs to an interrupted run and is redone on resume) / file, or a CSV."""
    path = Path(path)
    if not path.exists():
        raise IspStatsError(f"ISP results not found: {path}")
    if path.is_dir():
        parts = sorted(path.glob(PART_GLOB))
        commits = path / COMMIT_FOLDER
        if commits.is_dir():  # outputs written before commit markers have none: every part counts
            committed = committed_parts(path, {marker.name for marker in commits.iterdir()})
            if len(committed) < len(parts):
                LOGGER.warning("%s: ignoring %d uncommitted part(s) of an interrupted run; rerun the same `gftriton isp` "
                               "command to finish it", path, len(parts) - len(committed))
            parts = committed
        if not parts:
            raise IspStatsError(f"{path} holds no committed part-*.parquet files (not a finished `gftriton isp` output)")
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def shifts_from_isp_results(rows: pd.DataFrame, dictionaries: GeneDictionaries,
                            cell_states: Optional[dict] = None) -> pd.DataFrame:
    """Our ISP rows -> stats input via :data:`ISP_RESULT_COLUMNS` (Ensembl ids -> tokens). Without
    ``cell_states`` the stateless column gives the cell rows; with them each state's
    ``state_shift_<state>`` column (start, goal and alternative states) gives that state's rows."""
    names = ISP_RESULT_COLUMNS
    needed = [names["cell"], names["perturbed_ids"]]
    if cell_states:
        states = [cell_states["start_state"], cell_states["goal_state"], *(cell_states.get("alt_states") or [])]
        value_columns = {str(state): names["state_prefix"] + str(state) for state in states if state is not None}
    else:
        value_columns = {"": names["stateless"]}
    missing = [c for c in needed + list(value_columns.values()) if c not in rows.columns]
    if missing:
        raise IspStatsError(f"ISP results lack the columns {missing} (have {list(rows.columns)}); repoint "
                            "geneformer_triton.core.isp_stats_readers.ISP_RESULT_COLUMNS / geneformer_triton.core.isp_schema")
    to_token = dictionaries.id_to_token
    keys = []
    for ids in rows[names["perturbed_ids"]].astype(str):
        tokens = [to_token.get(g) for g in ids.split("+")]
        if None in tokens:
            raise IspStatsError(f"perturbed gene(s) {ids!r} not in the token dictionary: pass the model's dictionaries")
        keys.append(perturbed_key(tokens))
    parts = []
    for state, column in value_columns.items():
        values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=np.float64)
        keep = ~np.isnan(values)
        parts.append(_frame(rows[names["cell"]].astype(str).to_numpy()[keep], np.asarray(keys, dtype=object)[keep],
                            np.full(int(keep.sum()), CELL_EMB), [state] * int(keep.sum()), values[keep]))
    out = pd.concat(parts, ignore_index=True)
    if out.empty:
        raise IspStatsError(f"no values in {list(value_columns.values())}: the ISP run did not compute them")
    return out
