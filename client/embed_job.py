"""Embed a cell matrix through a Triton server, batch by batch, into a resumable ``PartialStore``.

Two paths: server-side tokenization (an ensemble such as ``geneformer_embed_onnx`` gets each cell's
non-zero genes and counts) or client-side tokenization (``RankValueTokenizer`` here, token ids to an
encoder such as ``geneformer_onnx``). Cells are taken in windows of a few batches, ordered by length
inside a window (less padding per request), and sent with bounded concurrency; each finished batch is
stored before the next result is handled, so an interrupted run loses at most the batches in flight.
Cells that cannot be embedded (no counts, or no gene of the vocabulary when it is known here) are stored
as NaN rows and reported.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from geneformer_triton.client.outputs import PartialStore
from geneformer_triton.client.triton_client import GeneformerClient, InferenceError, pack_cells
from geneformer_triton.core.cell_inputs import CellMatrix
from geneformer_triton.core.dictionaries import GeneVocabulary
from geneformer_triton.core.tokenizer import UNKNOWN, RankValueTokenizer

LOGGER = logging.getLogger(__name__)

WINDOW_BATCHES = 4  # batches per length-sorting window, per unit of concurrency


@dataclass
class EmbedStats:
    n_cells: int
    resumed: int = 0
    embedded: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cells_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def embeddable(cells: CellMatrix, vocabulary: GeneVocabulary | None = None) -> np.ndarray:
    """Bool [n_cells]: the cell has total counts > 0 and a non-zero gene with an Ensembl id (of the
    vocabulary, when one is given). Others cannot be tokenized."""
    ok = (cells.n_counts > 0) & (cells.named_nonzero() > 0)
    if vocabulary is not None:
        tokens = RankValueTokenizer(vocabulary, 2048, False).gene_tokens(cells.gene_ids)
        in_vocab = cells.counts[:, np.flatnonzero(tokens != UNKNOWN)]
        ok &= np.asarray((in_vocab != 0).sum(axis=1)).ravel() > 0
    return ok


class EmbedRun:
    """One embedding run of ``cells`` through ``model`` on ``client``.

    ``tokenizer`` None: ``model`` is an ensemble (server-side tokenization); otherwise ``model`` is an
    encoder fed with the tokenizer's token ids.
    """

    def __init__(
        self,
        client: GeneformerClient,
        cells: CellMatrix,
        model: str,
        tokenizer: RankValueTokenizer | None = None,
        batch_size: int = 32,
        vocabulary: GeneVocabulary | None = None,
    ) -> None:
        self.client = client
        self.cells = cells
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, min(batch_size, client.max_batch_size(model)))
        self.vocabulary = vocabulary if vocabulary is not None else (tokenizer.vocabulary if tokenizer else None)
        self._named_genes = np.array([g != "" for g in cells.gene_ids])

    def meta(self, hidden_size: int) -> dict:
        """What identifies this run's results (compared when resuming)."""
        return {
            "format": 1,
            "input": self.cells.fingerprint(),
            "n_cells": self.cells.n_cells,
            "model": self.model,
            "tokenization": "client" if self.tokenizer is not None else "server",
            "hidden_size": hidden_size,
        }

    # -------------------------------------------------------------- batches
    def _batches(self, rows: np.ndarray, window: int) -> Iterator[tuple[np.ndarray, object]]:
        """(row indices, payload) per request; payload: token arrays or (gene_ids, counts, n_counts)."""
        counts, n_counts = self.cells.counts, self.cells.n_counts
        for start in range(0, len(rows), window):
            chunk = rows[start : start + window]
            sub = counts[chunk]
            if self.tokenizer is not None:
                names = [self.cells.cell_ids[r] for r in chunk]
                tokens = self.tokenizer.tokenize_matrix(sub, self.cells.gene_ids, n_counts[chunk], names)
                lengths = np.array([len(t) for t in tokens])
            else:
                lengths = np.asarray((sub[:, np.flatnonzero(self._named_genes)] != 0).sum(axis=1)).ravel()
            order = np.argsort(-lengths, kind="stable")
            for b in range(0, len(chunk), self.batch_size):
                index = order[b : b + self.batch_size]
                if self.tokenizer is not None:
                    yield chunk[index], [tokens[i] for i in index]
                else:
                    gene_ids, values = pack_cells(sub[index], self.cells.gene_ids)
                    yield chunk[index], (gene_ids, values, n_counts[chunk[index]])

    def verify_tokenizer(self, served_model: str, n_cells: int = 8) -> int:
        """Compare local tokenization of the first ``n_cells`` embeddable cells with the served tokenizer's;
        raise ``ValueError`` if they differ (other dictionaries or settings). Returns the cells compared."""
        if self.tokenizer is None:
            return 0
        rows = np.flatnonzero(embeddable(self.cells, self.vocabulary))[:n_cells]
        if len(rows) == 0:
            return 0
        sub, n_counts = self.cells.counts[rows], self.cells.n_counts[rows]
        local = self.tokenizer.tokenize_matrix(sub, self.cells.gene_ids, n_counts)
        gene_ids, values = pack_cells(sub, self.cells.gene_ids)
        out = self.client.infer(served_model, {"gene_ids": gene_ids, "counts": values,
                                               "n_counts": n_counts.astype(np.float32).reshape(-1, 1)},
                                ["input_ids", "attention_mask"])
        for row, (ids, mask) in enumerate(zip(out["input_ids"], out["attention_mask"])):
            if not np.array_equal(ids[mask.astype(bool)], local[row]):
                raise ValueError(
                    f"local tokenization of cell {self.cells.cell_ids[rows[row]]!r} differs from the served "
                    f"{served_model}'s: the local dictionaries or tokenizer settings are not the served ones "
                    "(use --repository with the served repository, or server-side tokenization)"
                )
        return len(rows)

    def _call(self, rows: np.ndarray, payload: object) -> tuple[np.ndarray, np.ndarray]:
        try:
            if self.tokenizer is not None:
                embeddings = self.client.embed_tokens_batch(payload, self.model, self.tokenizer.vocabulary.pad_id)
            else:
                gene_ids, values, n_counts = payload
                embeddings = self.client.embed_cells_batch(gene_ids, values, n_counts, self.model)
        except InferenceError as error:
            names = [self.cells.cell_ids[r] for r in rows]
            hint = ""
            if "vocabulary" in str(error) and self.vocabulary is None:
                hint = " (give --dictionaries or --repository: cells without vocabulary genes then get NaN embeddings)"
            raise InferenceError(f"batch of cells {names[:4]}{'...' if len(names) > 4 else ''}: {error}{hint}") from error
        return rows, embeddings

    # -------------------------------------------------------------- run
    def run(self, store: PartialStore, restart: bool = False, progress: bool = True) -> EmbedStats:
        """Embed every cell not yet in ``store``; returns statistics. On an error, the batches that
        finished are stored before it is raised (rerun to resume)."""
        from tqdm.auto import tqdm

        hidden = self.client.output_size(self.model)
        stats = EmbedStats(n_cells=self.cells.n_cells)
        stats.resumed = store.open(self.meta(hidden), restart=restart)
        if stats.resumed:
            LOGGER.info("resuming: %d of %d cells already embedded in %s", stats.resumed, self.cells.n_cells, store.folder)
        done = np.zeros(self.cells.n_cells, dtype=bool)
        done[store.done_rows()] = True

        bad = ~embeddable(self.cells, self.vocabulary)
        new_bad = np.flatnonzero(bad & ~done)
        stats.skipped = [self.cells.cell_ids[r] for r in np.flatnonzero(bad)]
        if len(new_bad):
            store.append(new_bad, np.full((len(new_bad), hidden), np.nan, dtype=np.float32))
            done[new_bad] = True
        if stats.skipped:
            LOGGER.warning("%d cells have no counts of a known gene and get NaN embeddings (e.g. %s)",
                           len(stats.skipped), stats.skipped[:3])

        pending = np.flatnonzero(~done)
        concurrency = self.client.concurrency
        window = self.batch_size * concurrency * WINDOW_BATCHES
        started = time.perf_counter()
        error: BaseException | None = None
        inflight: set[Future] = set()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="gf-embed") as pool, \
                tqdm(total=self.cells.n_cells, initial=int(done.sum()), unit="cell", disable=not progress,
                     desc=self.model) as bar:

            def collect(finished: set[Future]) -> None:
                nonlocal error
                for future in finished:
                    inflight.discard(future)
                    try:
                        rows, embeddings = future.result()
                    except BaseException as exc:  # keep the first; the other batches still get stored
                        error = error or exc
                        continue
                    store.append(rows, embeddings)
                    stats.embedded += len(rows)
                    bar.update(len(rows))

            try:
                for rows, payload in self._batches(pending, window):
                    while len(inflight) >= 2 * concurrency:
                        collect(wait(inflight, return_when=FIRST_COMPLETED).done)
                    if error is not None:
                        break
                    inflight.add(pool.submit(self._call, rows, payload))
            except BaseException as exc:  # Ctrl-C or a tokenization error: store what finished
                error = error or exc
            finally:
                if error is not None:  # stop: drop what has not started, keep what is running
                    for future in list(inflight):
                        future.cancel()
                collect(wait(inflight).done if inflight else set())
        stats.seconds = time.perf_counter() - started
        if error is not None:
            LOGGER.error("stopped after %d cells (%d stored in %s; rerun to resume): %s",
                         stats.embedded, int(len(store.done_rows())), store.folder, error)
            raise error
        return stats
