"""The ``gftriton isp`` run driver: one request per cell, ``concurrency`` in flight (the server's dynamic
batcher merges the cells in flight into shared encoder batches), finished cells appended to a
:class:`geneformer_triton.client.isp_store.ResultStore` in whole-cell blocks."""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pandas as pd

from geneformer_triton.client.isp_spec import IspSpec, infer_cell
from geneformer_triton.client.isp_store import ResultStore, empty_frame
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError
from geneformer_triton.core.isp_schema import ERROR_COLUMNS, SCORE_OUTPUTS, STATE_PREFIX, UPSTREAM_SCORE, IspRunError

if TYPE_CHECKING:
    from geneformer_triton.client.isp import CellTable

LOGGER = logging.getLogger(__name__)


def cell_rows(cell_id: str, spec: IspSpec, result: dict[str, np.ndarray], cells: CellTable) -> pd.DataFrame:
    """The rows of one finished cell (every score column present; NaN where not computed)."""
    genes = [g.decode() if isinstance(g, bytes) else str(g) for g in result["perturbed_genes"]]
    n = len(genes)
    frame = pd.DataFrame({
        "cell_id": [cell_id] * n,
        "perturbation": [spec.perturbation] * n,
        "gene_id": genes,
        "gene_symbol": [cells.symbol(g) for g in genes],
        "target_index": np.arange(n, dtype=np.int64),
        "n_perturbations": np.full(n, n, dtype=np.int64),
    })
    for name in SCORE_OUTPUTS + (UPSTREAM_SCORE,):
        value = result.get(name)
        frame[name] = np.asarray(value, dtype=np.float32) if value is not None else np.full(n, np.nan, dtype=np.float32)
    if spec.state_names:
        shifts = np.asarray(result["state_shift"], dtype=np.float32).reshape(n, len(spec.state_names))
        for k, name in enumerate(spec.state_names):
            frame[STATE_PREFIX + name] = shifts[:, k]
    return frame


def gene_rows(cell_id: str, result: dict[str, np.ndarray], cells: CellTable) -> Optional[pd.DataFrame]:
    """One cell's (perturbed, affected) gene cosines (emb_mode cell_and_gene), or None when not returned."""
    if "gene_cos" not in result:
        return None
    decode = lambda values: [v.decode() if isinstance(v, bytes) else str(v) for v in values]  # noqa: E731
    perturbed = np.array(decode(result["perturbed_genes"]), dtype=object)
    genes = np.array(decode(result["cell_genes"]), dtype=object)
    affected = genes[np.asarray(result["gene_affected"], dtype=np.int64)]
    return pd.DataFrame({
        "cell_id": cell_id,
        "gene_id": perturbed[np.asarray(result["gene_perturbation"], dtype=np.int64)],
        "affected_gene_id": affected,
        "affected_symbol": [cells.symbols.get(g, g) for g in affected],
        "cos": np.asarray(result["gene_cos"], dtype=np.float32),
    })


@dataclass
class RunStats:
    cells_total: int = 0
    cells_skipped_done: int = 0
    cells_done: int = 0
    cells_rejected: int = 0
    cells_without_targets: int = 0
    perturbations: int = 0
    seconds: float = 0.0

    @property
    def perturbations_per_s(self) -> float:
        return self.perturbations / self.seconds if self.seconds > 0 else 0.0


def run_isp(
    client: GeneformerClient,
    cells: CellTable,
    spec: IspSpec,
    store: ResultStore,
    concurrency: int = 4,
    flush_every: int = 8,
    flush_seconds: float = 10.0,
    rows: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> RunStats:
    """Perturb every cell not yet in ``store``; rows are appended in whole-cell blocks as cells finish."""
    from tqdm.auto import tqdm

    stats = RunStats()
    selected = list(range(len(cells))) if rows is None else list(rows)
    stats.cells_total = len(selected)
    finished = store.finished()
    todo = [r for r in selected if cells.cell_ids[r] not in finished]
    stats.cells_skipped_done = len(selected) - len(todo)
    if stats.cells_skipped_done:
        LOGGER.info("resuming: %d of %d cells already in %s", stats.cells_skipped_done, len(selected), store.path)
    outputs = spec.outputs()
    buffer: list[pd.DataFrame] = []
    genes: list[pd.DataFrame] = []
    errors: list[dict] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal buffer, errors, genes, last_flush
        store.append(pd.concat(buffer, ignore_index=True) if buffer else empty_frame(store.columns),
                     pd.DataFrame(errors, columns=list(ERROR_COLUMNS)), genes)
        buffer, errors, genes, last_flush = [], [], [], time.monotonic()

    def work(row: int):
        gene_ids, counts = cells.cell(row)
        inputs = spec.request_inputs(gene_ids, counts, float(cells.n_counts[row]))
        if inputs is None:
            return row, None, "skipped: the cell expresses none of the targets"
        try:
            return row, infer_cell(client, spec.model, inputs, outputs), None
        except InferenceError as error:  # the server rejected this cell's request
            return row, None, str(error)

    started = time.perf_counter()
    pending: set[Future] = set()
    queue = iter(todo)
    exhausted = False
    fatal: Optional[BaseException] = None
    with ThreadPoolExecutor(max(1, concurrency)) as pool, tqdm(total=len(todo), unit="cell", disable=not progress) as bar:
        try:
            while True:
                while not exhausted and fatal is None and len(pending) < 2 * max(1, concurrency):
                    row = next(queue, None)
                    if row is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(work, row))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        row, result, message = future.result()
                    except Exception as error:  # server gone after retries, or a client-side failure
                        fatal = fatal or error
                        continue
                    cell_id = cells.cell_ids[row]
                    if result is None:
                        errors.append({"cell_id": cell_id, "error": message})
                        if message.startswith("skipped"):
                            stats.cells_without_targets += 1
                        else:
                            stats.cells_rejected += 1
                            LOGGER.warning("cell %s rejected: %s", cell_id, message)
                    else:
                        frame = cell_rows(cell_id, spec, result, cells)
                        buffer.append(frame)
                        gene_frame = gene_rows(cell_id, result, cells)
                        if gene_frame is not None:
                            genes.append(gene_frame)
                        for note in result.get("target_errors", []):
                            errors.append({"cell_id": cell_id, "error": note.decode() if isinstance(note, bytes) else str(note)})
                        stats.cells_done += 1
                        stats.perturbations += len(frame)
                    bar.update(1)
                pending_cells = len(buffer) + len(errors)
                if pending_cells >= flush_every or (pending_cells and time.monotonic() - last_flush >= flush_seconds):
                    flush()
        finally:
            for future in pending:
                future.cancel()
            if buffer or errors:
                flush()
    stats.seconds = time.perf_counter() - started
    if fatal is not None:
        raise IspRunError(f"stopped: {fatal}; finished cells are saved in {store.path}, rerun to resume") from fatal
    return stats
