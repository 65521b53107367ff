"""Real cells for the benchmarks and their cost in FLOPs.

Cells are the celltypist sample (559 real cells, raw counts; ``geneformer_triton.core.data.celltypist_sample``)
tokenized with the model's dictionaries (rank-value encoding, helical-identical). The tokenization of the
whole sample is cached in the data cache folder (``$GFTRITON_DATA_DIR``), keyed by the dictionaries'
hash and the model input size. More cells than the sample holds are drawn by resampling real cells
(seeded): the first 559 are the sample in order, the rest are copies of randomly drawn sample cells.

FLOPs per cell (multiply-add = 2 FLOPs; softmax, LayerNorm, activations and embeddings left out: under
1% here) for a BERT encoder with hidden size H, intermediate size I, ``n`` layers and a cell of L tokens::

    per layer:  2·L·(4·H² + 2·H·I)      Q, K, V, output projection and the two feed-forward matmuls
              + 4·L²·H                  Q·Kᵀ and P·V over all heads
    encoder:    n × per layer           (what every method must do at least: "useful" FLOPs)
    LM head:    2·L·(H² + H·V)          BertForMaskedLM's transform + decoder over a V-token vocabulary
                                        (computed, then thrown away, by the baselines)

"Executed" FLOPs count what a method actually computes: padded lengths (each batch padded to its
longest cell) and, for the baselines, the LM head. gf-6L-10M-i2048 (H 256, I 512, 6 layers, V 25,426):
1.05 MFLOP·L + 1,024 FLOP·L² per layer; at L = 1,024 both terms are equal, longer cells are
attention-bound (cost grows with L²), shorter ones projection-bound (cost grows with L).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_cache_dir() -> Path:
    """``$GFTRITON_DATA_DIR`` or ``~/.cache/geneformer_triton`` (as geneformer_triton.core.data, without importing
    anndata: a GPU host may not have it)."""
    return Path(os.environ.get("GFTRITON_DATA_DIR", Path.home() / ".cache" / "geneformer_triton"))


def default_dictionaries(version: str = "v1") -> Path | None:
    """``$GFTRITON_SHARED_DIR/geneformer/<version>`` (default ``../shared``) when it holds dictionaries."""
    shared = Path(os.environ.get("GFTRITON_SHARED_DIR", REPO_ROOT.parent / "shared"))
    folder = shared / "geneformer" / version
    return folder if (folder / "token_dictionary.json").is_file() else None


# ----------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Architecture:
    """The sizes that set the cost of a BERT encoder."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config, layers: int | None = None) -> "Architecture":
        return cls(int(config.hidden_size), int(config.intermediate_size),
                   int(layers if layers is not None else config.num_hidden_layers), int(config.vocab_size))

    def layer_flops(self, length: np.ndarray | int) -> np.ndarray:
        """FLOPs of one layer for sequences of ``length`` tokens (array in, array out)."""
        L = np.asarray(length, dtype=np.float64)
        H, I = self.hidden, self.intermediate
        return 2.0 * L * (4 * H * H + 2 * H * I) + 4.0 * L * L * H

    def projection_flops(self, length: np.ndarray | int) -> np.ndarray:
        L = np.asarray(length, dtype=np.float64)
        return self.layers * 2.0 * L * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)

    def attention_flops(self, length: np.ndarray | int) -> np.ndarray:
        L = np.asarray(length, dtype=np.float64)
        return self.layers * 4.0 * L * L * self.hidden

    def encoder_flops(self, length: np.ndarray | int) -> np.ndarray:
        return self.layers * self.layer_flops(length)

    def lm_head_flops(self, length: np.ndarray | int) -> np.ndarray:
        L = np.asarray(length, dtype=np.float64)
        return 2.0 * L * (self.hidden**2 + self.hidden * self.vocab)

    def formula(self) -> str:
        H, I, n, V = self.hidden, self.intermediate, self.layers, self.vocab
        linear = 2 * (4 * H * H + 2 * H * I)
        return (f"FLOPs(cell of L tokens) = {n} layers x ({linear:,}·L + {4 * H:,}·L²)"
                f"  [H={H}, I={I}]; LM head (baselines only) + {2 * (H * H + H * V):,}·L  [V={V}]")


# ----------------------------------------------------------------------------------------------- cells
@dataclass
class CellSet:
    """Tokenized real cells (int64 token ids, one array per cell) and where they came from."""

    tokens: list[np.ndarray]
    rows: np.ndarray  # row of each cell in the celltypist sample
    source: str = "celltypist sample"
    max_length: int | None = None  # truncation applied (None: the model's input size)
    adata: object = field(default=None, repr=False)  # the whole sample (AnnData), for raw-count inputs

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    def describe(self) -> dict:
        lengths = self.lengths
        return {
            "source": self.source,
            "n_cells": len(self),
            "distinct_cells": int(len(np.unique(self.rows))),
            "max_length": self.max_length,
            "tokens_total": int(lengths.sum()),
            "tokens_mean": float(lengths.mean()),
            "tokens_median": float(np.median(lengths)),
            "tokens_min": int(lengths.min()),
            "tokens_max": int(lengths.max()),
            "tokens_rms": float(np.sqrt((lengths.astype(np.float64) ** 2).mean())),
        }

    def select(self, index: Sequence[int] | np.ndarray) -> "CellSet":
        index = np.asarray(index, dtype=np.int64)
        return CellSet([self.tokens[i] for i in index], self.rows[index], self.source, self.max_length, self.adata)

    def truncate(self, length: int) -> "CellSet":
        """Each cell's first ``length`` tokens (its highest-ranked genes: what a model of that input size sees)."""
        return CellSet([t[:length] for t in self.tokens], self.rows.copy(), self.source, length, self.adata)

    def at_least(self, length: int) -> "CellSet":
        """Only the cells with at least ``length`` tokens."""
        return self.select(np.flatnonzero(self.lengths >= length))


def _cache_key(vocabulary, input_size: int, special_tokens: bool) -> str:
    digest = hashlib.sha256()
    for gene, token in sorted(vocabulary.token_ids.items()):
        digest.update(f"{gene}:{token};".encode())
    for gene, median in sorted(vocabulary.gene_medians.items()):
        digest.update(f"{gene}:{median!r};".encode())
    return f"{digest.hexdigest()[:16]}-{input_size}-{int(special_tokens)}"


SAMPLE_ENV = "GFTRITON_BENCH_SAMPLE"


class CompactSample:
    """The sample as saved by ``save_sample``: CSR raw counts, Ensembl ids, totals (no anndata needed)."""

    def __init__(self, path: str | Path) -> None:
        import pandas as pd
        import scipy.sparse as sp

        data = np.load(path, allow_pickle=False)
        self.X = sp.csr_matrix((data["data"], data["indices"], data["indptr"]), shape=tuple(data["shape"]))
        self.var = pd.DataFrame({"ensembl_id": data["ensembl_id"].astype(str)})
        self.obs = pd.DataFrame({"n_counts": data["n_counts"]}, index=data["obs_names"].astype(str))
        self.n_obs = self.X.shape[0]

    def __getitem__(self, rows):
        import anndata as ad

        return ad.AnnData(X=self.X[rows], obs=self.obs.iloc[rows].copy(), var=self.var.set_index(self.var["ensembl_id"].rename(None), drop=False))


def save_sample(path: str | Path, vocabulary) -> Path:
    """Write the sample compactly (for a host without the data, network or anndata: ``$GFTRITON_BENCH_SAMPLE``)."""
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    adata = load_celltypist_sample(symbol_to_ensembl=vocabulary.gene_name_to_id)
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, data=X.data.astype(np.float32), indices=X.indices.astype(np.int32), indptr=X.indptr,
                        shape=np.array(X.shape), ensembl_id=np.asarray(adata.var["ensembl_id"], dtype=str),
                        n_counts=np.asarray(adata.obs["n_counts"], dtype=np.float64), obs_names=np.asarray(adata.obs_names, dtype=str))
    return path


def _load_sample(vocabulary):
    compact = os.environ.get(SAMPLE_ENV)
    if compact:
        return CompactSample(compact)
    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    return load_celltypist_sample(symbol_to_ensembl=vocabulary.gene_name_to_id)


def sample_tokens(vocabulary, input_size: int = 2048, special_tokens: bool = False, cache_dir: str | Path | None = None):
    """(token arrays of all 559 sample cells, the sample as AnnData); tokens cached on disk.

    ``$GFTRITON_BENCH_SAMPLE`` (a file written by ``save_sample``) replaces the download: the sample
    then loads without network, CSV or anndata (GPU hosts)."""
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    adata = _load_sample(vocabulary)
    folder = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    path = folder / f"bench_tokens_{_cache_key(vocabulary, input_size, special_tokens)}.npz"
    if path.is_file():
        data = np.load(path)
        if int(data["n_cells"]) == adata.n_obs:
            offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
            ids = data["ids"].astype(np.int64)
            return [ids[offsets[i]:offsets[i + 1]] for i in range(len(data["lengths"]))], adata
    tokenizer = RankValueTokenizer(vocabulary, input_size, special_tokens)
    cells = tokenizer.tokenize_matrix(adata.X, list(adata.var["ensembl_id"]), adata.obs["n_counts"].to_numpy())
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.concatenate(cells).astype(np.int32), lengths=np.array([len(c) for c in cells]),
             n_cells=np.int64(adata.n_obs))
    os.replace(tmp, path)
    LOGGER.info("tokenized the celltypist sample (%d cells) -> %s", len(cells), path)
    return cells, adata


def real_cells(
    vocabulary,
    n_cells: int,
    input_size: int = 2048,
    special_tokens: bool = False,
    max_length: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> CellSet:
    """``n_cells`` real cells: the sample's first cells in order, then resampled ones (seeded)."""
    cells, adata = sample_tokens(vocabulary, input_size, special_tokens, cache_dir)
    n_sample = len(cells)
    if n_cells <= n_sample:
        rows = np.arange(n_cells)
    else:
        rng = np.random.default_rng(seed)
        rows = np.concatenate([np.arange(n_sample), rng.integers(0, n_sample, n_cells - n_sample)])
    source = "celltypist sample" + (f" ({n_sample} real cells resampled to {n_cells}, seed {seed})" if n_cells > n_sample else "")
    chosen = CellSet([cells[r] for r in rows], rows, source, None, adata)
    return chosen.truncate(max_length) if max_length else chosen


def sample_cells(vocabulary, input_size: int = 2048, special_tokens: bool = False, cache_dir: str | Path | None = None) -> CellSet:
    """Every cell of the sample, in order (the pool the scaling sweeps draw from)."""
    cells, adata = sample_tokens(vocabulary, input_size, special_tokens, cache_dir)
    return CellSet(cells, np.arange(len(cells)), "celltypist sample", None, adata)


def raw_count_inputs(cellset: CellSet) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Per cell: (Ensembl ids of its expressed genes, their raw counts float32, total counts) — the
    tokenizer ensemble's wire inputs (``gene_ids``, ``counts``, ``n_counts``)."""
    import scipy.sparse as sp

    adata = cellset.adata
    if adata is None:
        raise ValueError("this cell set carries no raw counts")
    matrix = sp.csr_matrix(adata.X)
    genes = np.asarray(adata.var["ensembl_id"], dtype=object)
    totals = np.asarray(adata.obs["n_counts"], dtype=np.float64)
    result = []
    for row in cellset.rows:
        start, stop = matrix.indptr[row], matrix.indptr[row + 1]
        columns, values = matrix.indices[start:stop], matrix.data[start:stop]
        keep = (genes[columns] != "") & (values != 0)
        result.append((genes[columns[keep]].astype(str), values[keep].astype(np.float32), float(totals[row])))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m geneformer_triton.bench.cells --save-sample FILE --dictionaries DIR``: the compact sample for GPU hosts."""
    import argparse

    from geneformer_triton.core.dictionaries import load_vocabulary

    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.bench.cells")
    parser.add_argument("--save-sample", type=Path, required=True)
    parser.add_argument("--dictionaries", type=Path, default=default_dictionaries())
    args = parser.parse_args(argv)
    print(save_sample(args.save_sample, load_vocabulary(args.dictionaries)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
