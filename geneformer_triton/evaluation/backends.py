"""Does an optimized backend change downstream results? Labelled cells through every backend.

The same labelled cells (raw counts + a label column) are embedded by

* the **fp32 PyTorch reference**, in process (``pytorch_fp32``), from tokens made client-side with the
  same dictionaries as the server's tokenizer;
* every **served backend** through Triton's ensembles ``geneformer_embed_<backend>`` (server-side
  tokenization: :func:`geneformer_triton.client.triton_client.pack_cells` + ``GeneformerClient.embed_cells`` with the
  cells' ``n_counts``), named ``triton_<backend>_<precision>``; or, in local mode, every exported
  encoder file of a model repository run in process (onnxruntime / TorchScript), ``local_<...>``.

The embeddings then go through :func:`geneformer_triton.evaluation.metrics.compare_methods` (classification,
geometry, fidelity against the reference) and :func:`~geneformer_triton.evaluation.metrics.write_report`.
Weights: when a model repository is given, every encoder's ``manifest.json`` must carry the
reference's ``weights_sha256`` (else ``ValueError``); without one, the fidelity columns are the check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_triton.core.cell_inputs import InputOptions, SymbolMap, cells_from_anndata, read_anndata
from geneformer_triton.core.contract import TOKENIZER_MODEL, EncoderVariant, encoder_variant
from geneformer_triton.core.dictionaries import GeneVocabulary
from geneformer_triton.core.fidelity import gate_for
from geneformer_triton.core.tokenizer import UNKNOWN, RankValueTokenizer

if TYPE_CHECKING:
    from geneformer_triton.model.loading import LoadedGeneformer

LOGGER = logging.getLogger(__name__)

REFERENCE = "pytorch_fp32"
DEFAULT_BACKENDS = ("onnx", "onnx_fp16", "torchscript")
#: Largest |accuracy delta| to the reference tolerated for fp32 backends (1 point).
FP32_ACCURACY_TOLERANCE = 0.01
#: Columns printed by :func:`format_summary`.
SUMMARY_COLUMNS = ("accuracy", "f1_weighted", "silhouette", "knn_consistency", "ari", "nmi", "delta_accuracy", "cosine_min",
                   "centred_cosine_min", "rel_err", "nn_identity", "knn_overlap")


# --------------------------------------------------------------------------------------------
# labelled cells
# --------------------------------------------------------------------------------------------
@dataclass
class LabelledCells:
    """Raw counts of labelled cells, restricted to genes of the model's vocabulary.

    ``counts`` [n_cells, n_genes] float32 CSR raw counts, ``gene_ids`` [n_genes] Ensembl ids (all in the
    vocabulary), ``n_counts`` [n_cells] float32 total counts of each cell over *all* its genes (the
    tokenizer's normalizer), ``labels`` [n_cells] str, ``cell_names`` [n_cells] str.
    """

    counts: sp.csr_matrix
    gene_ids: list[str]
    n_counts: np.ndarray
    labels: np.ndarray
    cell_names: np.ndarray
    source: str
    label_key: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    def subset(self, index: np.ndarray) -> "LabelledCells":
        index = np.asarray(index, dtype=np.int64)
        return LabelledCells(self.counts[index], self.gene_ids, self.n_counts[index], self.labels[index],
                             self.cell_names[index], self.source, self.label_key, dict(self.notes))


def labelled_cells_from_anndata(
    adata: Any,
    label_key: str,
    vocabulary: GeneVocabulary,
    *,
    inputs: InputOptions = InputOptions(),
    source: str = "anndata",
) -> LabelledCells:
    """Labelled raw counts of an AnnData, genes mapped to the vocabulary.

    Counts, gene ids and ``n_counts`` are read by the input layer (:mod:`geneformer_triton.core.cell_inputs`:
    ``inputs`` says the layer, gene column, totals column and whether non-integer values are allowed;
    symbols map with the vocabulary's ``gene_name_id_dict``). ``n_counts`` is taken before genes outside
    the vocabulary are dropped. Cells without a label, with no counts, or expressing no vocabulary gene
    are dropped (logged).
    """
    if label_key not in adata.obs:
        raise ValueError(f"label column {label_key!r} not in obs (columns: {list(adata.obs.columns)})")
    symbols = SymbolMap(vocabulary.gene_name_to_id, "the dictionaries' gene_name_id_dict.json") \
        if vocabulary.gene_name_to_id else None
    read = cells_from_anndata(adata, inputs, symbols, source)
    tokens = RankValueTokenizer(vocabulary, 2, False).gene_tokens(read.gene_ids)
    in_vocabulary = (tokens != UNKNOWN) & np.array([g != "" for g in read.gene_ids])
    if not in_vocabulary.any():
        raise ValueError(f"none of the {len(read.gene_ids)} genes maps to the model's vocabulary "
                         f"(e.g. {list(read.adata.var_names[:3])})")
    n_counts = read.n_counts.astype(np.float64)
    labels_series = adata.obs[label_key]
    has_label = labels_series.notna().to_numpy() & (labels_series.astype(str).str.strip() != "").to_numpy()
    genes = read.counts[:, np.flatnonzero(in_vocabulary)].tocsr()
    genes.eliminate_zeros()
    expresses = np.diff(genes.indptr) > 0
    keep = has_label & expresses & (n_counts > 0)
    dropped = {"no_label": int((~has_label).sum()), "no_vocabulary_gene": int((has_label & ~expresses).sum()),
               "zero_n_counts": int((has_label & expresses & ~(n_counts > 0)).sum())}
    if (~keep).any():
        LOGGER.warning("dropped %d of %d cells: %s", int((~keep).sum()), len(keep), dropped)
    if not keep.any():
        raise ValueError("no cell left to evaluate")
    gene_ids = [read.gene_ids[i] for i in np.flatnonzero(in_vocabulary)]
    notes = {
        "genes": len(read.gene_ids),
        "genes_in_vocabulary": int(in_vocabulary.sum()),
        "n_counts_source": read.notes["n_counts"],
        "cells_dropped": dropped,
    }
    LOGGER.info("%s: %d cells, %d of %d genes in the vocabulary, n_counts from %s", source, int(keep.sum()),
                notes["genes_in_vocabulary"], len(read.gene_ids), notes["n_counts_source"])
    return LabelledCells(
        counts=genes[np.flatnonzero(keep)].astype(np.float32),
        gene_ids=gene_ids,
        n_counts=n_counts[keep].astype(np.float32),
        labels=labels_series.astype(str).to_numpy()[keep],
        cell_names=np.asarray(read.cell_ids)[keep],
        source=source,
        label_key=label_key,
        notes=notes,
    )


def load_labelled_cells(
    vocabulary: GeneVocabulary,
    path: str | Path | None = None,
    dataset: str | None = None,
    label_key: str | None = None,
    **kwargs: Any,
) -> LabelledCells:
    """Labelled cells from an ``.h5ad`` file or a bundled dataset (``"pbmc68k"``: scanpy's
    ``pbmc68k_reduced`` with recovered counts, labels ``bulk_labels``). ``kwargs`` go to
    :func:`labelled_cells_from_anndata` (``inputs``: :class:`~geneformer_triton.core.cell_inputs.InputOptions`)."""
    if (path is None) == (dataset is None):
        raise ValueError("give either an .h5ad file or --dataset")
    if dataset is not None:
        if dataset != "pbmc68k":
            raise ValueError(f"unknown dataset {dataset!r} (known: pbmc68k)")
        from geneformer_triton.core.data.pbmc68k import LABEL_KEY, load_pbmc68k_counts

        adata = load_pbmc68k_counts()
        return labelled_cells_from_anndata(adata, label_key or LABEL_KEY, vocabulary,
                                           source="pbmc68k_reduced (scanpy, counts recovered from raw.X)", **kwargs)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if not label_key:
        raise ValueError("--label-key is required for an .h5ad file")
    return labelled_cells_from_anndata(read_anndata(path), label_key, vocabulary, source=str(path), **kwargs)


def stratified_subsample(labels: Sequence[str] | np.ndarray, max_cells: int, seed: int = 0,
                         keep_labels: Sequence[str] = ()) -> np.ndarray:
    """Sorted indices of at most ``max_cells`` cells keeping the label proportions.

    Each label gets its proportional share (largest remainders), but at least ``min(n_c, 2)`` cells so
    that the 80/20 split can still stratify it; labels in ``keep_labels`` (e.g. the control) keep every
    cell up to their share as well. Cells within a label are drawn with ``numpy.random.default_rng(seed)``.
    ``max_cells <= 0`` or ``>= n`` keeps every cell.
    """
    y = np.asarray(labels).astype(str)
    n = y.size
    if max_cells <= 0 or max_cells >= n:
        return np.arange(n)
    classes, counts = np.unique(y, return_counts=True)
    floor_ = np.minimum(counts, 2)
    if floor_.sum() > max_cells:
        raise ValueError(f"--max-cells {max_cells} cannot hold 2 cells of each of the {classes.size} labels")
    share = counts * (max_cells / n)
    take = np.maximum(np.floor(share).astype(np.int64), floor_)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while take.sum() < max_cells:  # largest remainders first
        c = order[i % classes.size]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > max_cells:  # floors pushed us over: trim the largest classes
        c = int(np.argmax(take - floor_))
        take[c] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[: take[j]] for j, c in enumerate(classes)]
    missing = [k for k in keep_labels if k in set(classes) and take[list(classes).index(k)] == 0]
    if missing:
        raise ValueError(f"subsample lost labels {missing}")
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def backend_spec(name: str, manifest: dict | None = None) -> EncoderVariant:
    """The contract's variant ``name`` (``onnx``, ``onnx_fp16``, ``torchscript``, ``trt``, ...), with the precision
    its manifest records where there is one."""
    variant = encoder_variant(name)
    precision = (manifest or {}).get("precision")
    return dataclasses.replace(variant, precision=str(precision)) if precision else variant


def method_name(spec: EncoderVariant, runtime: str) -> str:
    """Row name of a variant run by ``runtime`` (``triton`` / ``local``): ``triton_onnx_fp16``."""
    return f"{runtime}_{spec.name.replace('_' + spec.precision, '')}_{spec.precision}"


def read_manifests(repository: str | Path, backends: Sequence[str]) -> dict[str, dict | None]:
    """``<repository>/geneformer_<backend>/1/manifest.json`` of each backend (None where missing)."""
    manifests: dict[str, dict | None] = {}
    for name in backends:
        path = Path(repository) / backend_spec(name).model / "1" / "manifest.json"
        manifests[name] = json.loads(path.read_text()) if path.is_file() else None
        if manifests[name] is None:
            LOGGER.warning("no manifest for %s at %s: its weights cannot be checked", name, path)
    return manifests


def check_manifests(loaded: LoadedGeneformer, manifests: dict[str, dict | None], emb_layer: int, pooling: str) -> None:
    """Raise ``ValueError`` if an exported encoder has other weights, embedding layer or pooling than the reference."""
    for name, manifest in manifests.items():
        if manifest is None:
            continue
        if manifest.get("weights_sha256") != loaded.weights_sha256:
            raise ValueError(
                f"{name} was exported from other weights ({manifest.get('weights_source')}) than the reference "
                f"({loaded.source}); give the model options used for `gftriton export` (e.g. --random-weights --seed)"
            )
        for key, want in (("emb_layer", emb_layer), ("pooling", pooling)):
            if key in manifest and manifest[key] != want:
                raise ValueError(f"{name} was exported with {key}={manifest[key]!r} but the reference uses {want!r}")


@dataclass
class EmbeddingRun:
    """One method's embeddings [n_cells, H] float32 (input cell order) and how they were made."""

    method: str
    backend: str
    precision: str
    runtime: str
    embeddings: np.ndarray
    seconds: float


def pack_for_server(cells: LabelledCells) -> tuple[np.ndarray, np.ndarray]:
    """Wire format of the tokenizer (``pack_cells``): gene ids [n, G] bytes and counts [n, G] float32."""
    from geneformer_triton.client.triton_client import pack_cells

    return pack_cells(cells.counts, cells.gene_ids)


def tokenize_like_server(packed_ids: np.ndarray, packed_counts: np.ndarray, n_counts: np.ndarray,
                         vocabulary: GeneVocabulary, input_size: int, special_tokens: bool) -> list[np.ndarray]:
    """Tokens of packed cells exactly as the server's tokenizer computes them (same inputs, same dtypes)."""
    tokenizer = RankValueTokenizer(vocabulary, input_size, special_tokens)
    return tokenizer.tokenize_gene_lists(packed_ids, packed_counts, np.asarray(n_counts, dtype=np.float32))


def compare_server_tokens(client: Any, packed_ids: np.ndarray, packed_counts: np.ndarray, n_counts: np.ndarray,
                          tokens: Sequence[np.ndarray], n_cells: int = 32) -> int:
    """Tokenize the first ``n_cells`` cells on the server's tokenizer; returns how many differ from ``tokens``."""
    rows = slice(0, min(n_cells, len(tokens), client.max_batch_size(TOKENIZER_MODEL)))
    width = max(1, int((packed_counts[rows] != 0).sum(axis=1).max()))
    result = client.infer(TOKENIZER_MODEL, {
        "gene_ids": np.ascontiguousarray(packed_ids[rows, :width]),
        "counts": np.ascontiguousarray(packed_counts[rows, :width], dtype=np.float32),
        "n_counts": np.asarray(n_counts[rows], dtype=np.float32).reshape(-1, 1),
    }, ["input_ids", "attention_mask"])
    differ = 0
    for row, (ids, mask) in enumerate(zip(result["input_ids"], result["attention_mask"])):
        if not np.array_equal(ids[mask.astype(bool)], tokens[row]):
            differ += 1
    return differ


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    result = fn()
    return np.asarray(result, dtype=np.float32), time.perf_counter() - started


def embed_reference(loaded: LoadedGeneformer, tokens: Sequence[np.ndarray], emb_layer: int = -1,
                    pooling: str = "mean", batch_size: int = 16) -> EmbeddingRun:
    """fp32 PyTorch reference embeddings of tokenized cells (in process, length-sorted batches)."""
    from geneformer_triton.model.runtimes import embed_token_cells, torch_encode_fn

    encode = torch_encode_fn(loaded.encoder(emb_layer=emb_layer, pooling=pooling))
    pad_id = loaded.vocabulary.pad_id if loaded.vocabulary else 0
    emb, seconds = _timed(lambda: embed_token_cells(encode, tokens, batch_size=batch_size, pad_id=pad_id))
    return EmbeddingRun(REFERENCE, "pytorch", "fp32", "in-process torch", emb, seconds)


def embed_served(client: Any, spec: EncoderVariant, packed_ids: np.ndarray, packed_counts: np.ndarray,
                 n_counts: np.ndarray, batch_size: int = 16) -> EmbeddingRun:
    """Embeddings through the ensemble ``spec.ensemble`` (server-side tokenization).

    Cells are sent longest first (each request is padded to its longest cell only) and returned in
    input order.
    """
    order = np.argsort(-(packed_counts != 0).sum(axis=1), kind="stable")

    def run() -> np.ndarray:
        emb = client.embed_cells(packed_ids[order], packed_counts[order], np.asarray(n_counts)[order],
                                 model=spec.ensemble, batch_size=batch_size)
        out = np.empty_like(emb)
        out[order] = emb
        return out

    emb, seconds = _timed(run)
    return EmbeddingRun(method_name(spec, "triton"), spec.name, spec.precision, f"triton {client.protocol}", emb, seconds)


def embed_local(repository: str | Path, spec: EncoderVariant, tokens: Sequence[np.ndarray], batch_size: int = 16,
                pad_id: int = 0) -> EmbeddingRun:
    """Embeddings of the exported encoder file of ``spec`` run in process (onnxruntime or TorchScript)."""
    from geneformer_triton.model.runtimes import embed_token_cells, onnx_encode_fn, torchscript_encode_fn

    folder = Path(repository) / spec.model / "1"
    if spec.kind == "onnx":
        encode = onnx_encode_fn(folder / "model.onnx")
    elif spec.kind == "torchscript":
        encode = torchscript_encode_fn(folder / "model.pt")
    else:
        raise ValueError(f"--local runs ONNX and TorchScript encoders only, not {spec.name!r} ({spec.kind})")
    emb, seconds = _timed(lambda: embed_token_cells(encode, tokens, batch_size=batch_size, pad_id=pad_id))
    return EmbeddingRun(method_name(spec, "local"), spec.name, spec.precision, f"in-process {spec.kind}", emb, seconds)


# --------------------------------------------------------------------------------------------
# the whole evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    table: pd.DataFrame
    runs: list[EmbeddingRun]
    paths: dict[str, Path]
    metadata: dict[str, Any]
    checks: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.checks["passed"])


def check_results(table: pd.DataFrame, accuracy_tolerance: float = FP32_ACCURACY_TOLERANCE) -> dict[str, Any]:
    """Pass/fail of the comparison: every backend meets its fidelity threshold and every fp32 backend's
    accuracy is within ``accuracy_tolerance`` of the reference (reduced precision: reported only)."""
    others = table.drop(index=table.attrs.get("reference", REFERENCE), errors="ignore")
    fp32 = others[others["precision"] == "fp32"]
    worst = float(fp32["delta_accuracy"].abs().max()) if len(fp32) else 0.0
    failed_fidelity = [str(m) for m, ok in others["fidelity_passed"].items() if not ok]
    reduced = others[others["precision"] != "fp32"]
    return {
        "fp32_max_abs_delta_accuracy": worst,
        "accuracy_tolerance": accuracy_tolerance,
        "fp32_accuracy_ok": worst <= accuracy_tolerance + 1e-12,
        "reduced_precision_max_abs_delta_accuracy": float(reduced["delta_accuracy"].abs().max()) if len(reduced) else None,
        "fidelity_failed": failed_fidelity,
        "passed": worst <= accuracy_tolerance + 1e-12 and not failed_fidelity,
    }


def _append_backend_section(path: Path, table: pd.DataFrame, checks: dict[str, Any]) -> None:
    lines = ["", "## Backends", "",
             "| method | runtime | precision | embed s | cells/s | centred cosine | rel err | NN identity | kNN-10 overlap "
             "| fidelity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in table.iterrows():
        verdict = "ok" if row["fidelity_passed"] else f"FAIL: {row['fidelity_failures']}"
        lines.append(f"| {method} | {row['runtime']} | {row['precision']} | {row['embed_seconds']:.1f} | "
                     f"{row['cells_per_s']:.1f} | {row['centred_cosine_min']:.6f} | {row['rel_err']:.3g} | "
                     f"{row['nn_identity']:.3f} | {row['knn_overlap']:.3f} | {verdict} |")
    lines += ["", "Gates per precision: `geneformer_triton.core.fidelity.GATES` (docs/fidelity.md)."]
    verdict = "PASS" if checks["passed"] else "FAIL"
    lines += ["", f"**{verdict}**: fp32 backends' largest |Δ accuracy| = {checks['fp32_max_abs_delta_accuracy']:.4f} "
              f"(tolerance {checks['accuracy_tolerance']}); fidelity gate failed: "
              f"{', '.join(checks['fidelity_failed']) or 'none'}. Reduced-precision backends are reported, not judged, "
              "on accuracy.", "",
              "Embed times: the reference runs in this process, served backends include tokenization, transport and "
              "the server's own compute (on the same host here), so compare them with care."]
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


@dataclass(frozen=True)
class EvaluationOptions:
    """What :func:`evaluate_backends` compares and where the report goes.

    ``backends``: backend names (served ensembles are ``geneformer_embed_<name>``); ``repository``: the
    model repository whose manifests are checked against the reference (and give ``emb_layer`` /
    ``pooling``), in ``local`` mode the encoder files run in process; ``control_label``: label of control
    cells (adds ``control_separation``); ``seed``: split / KMeans seed; ``batch_size``: cells per batch;
    ``emb_layer``, ``pooling``: default the manifests' values, else -1 and ``"mean"``; ``out_dir``: report
    folder (none written when None); ``projection``: ``pca`` or ``umap``; ``accuracy_tolerance``: largest
    |accuracy delta| of fp32 backends; ``save_embeddings``: also ``embeddings.npz``; ``metadata``: extra
    facts for the report.
    """

    backends: Sequence[str] = DEFAULT_BACKENDS
    repository: str | Path | None = None
    local: bool = False
    control_label: str | None = None
    seed: int = 0
    batch_size: int = 32
    emb_layer: int | None = None
    pooling: str | None = None
    out_dir: str | Path | None = None
    projection: str = "pca"
    accuracy_tolerance: float = FP32_ACCURACY_TOLERANCE
    save_embeddings: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    """The resolved settings of one evaluation: manifests, encoders and the reference's tokens."""

    manifests: dict[str, dict | None]
    specs: list[EncoderVariant]
    emb_layer: int
    pooling: str
    random_weights: bool
    packed_ids: np.ndarray
    packed_counts: np.ndarray
    tokens: list[np.ndarray]

    @property
    def weights_checked(self) -> bool:
        return any(self.manifests.values())


def _check_request(options: EvaluationOptions, cells: LabelledCells, client: Any) -> None:
    if options.local and options.repository is None:
        raise ValueError("--local needs --repository (the exported encoder files)")
    if not options.local and client is None:
        raise ValueError("served mode needs a client (--url) or use --local with --repository")
    if options.control_label is not None and options.control_label not in set(cells.labels):
        raise ValueError(f"control label {options.control_label!r} is not among the labels ({sorted(set(cells.labels))})")


def _plan(loaded: LoadedGeneformer, cells: LabelledCells, options: EvaluationOptions, vocabulary: GeneVocabulary) -> _Plan:
    """Manifests checked against the reference, the backends' specs, and the cells tokenized as the server does."""
    backends = list(options.backends)
    manifests = read_manifests(options.repository, backends) if options.repository is not None else {}
    known = [m for m in manifests.values() if m]
    emb_layer = options.emb_layer if options.emb_layer is not None else (known[0].get("emb_layer", -1) if known else -1)
    pooling = options.pooling or (known[0].get("pooling", "mean") if known else "mean")
    check_manifests(loaded, manifests, emb_layer, pooling)
    packed_ids, packed_counts = pack_for_server(cells)
    tokens = tokenize_like_server(packed_ids, packed_counts, cells.n_counts, vocabulary, loaded.input_size,
                                  loaded.special_tokens)
    return _Plan(manifests, [backend_spec(name, manifests.get(name)) for name in backends], emb_layer, pooling,
                 bool(loaded.random_weights or any(m.get("random_weights") for m in known)),
                 packed_ids, packed_counts, tokens)


def _metadata(loaded: LoadedGeneformer, cells: LabelledCells, options: EvaluationOptions, plan: _Plan,
              client: Any) -> dict[str, Any]:
    lengths = np.array([len(t) for t in plan.tokens])
    LOGGER.info("%d cells, %d labels, tokens per cell %d-%d (median %d)", cells.n_cells, len(set(cells.labels)),
                lengths.min(), lengths.max(), int(np.median(lengths)))
    return {
        "dataset": cells.source,
        "label_key": cells.label_key,
        "control_label": options.control_label,
        "n_cells": cells.n_cells,
        "n_labels": len(set(cells.labels)),
        "tokens_per_cell": f"{lengths.min()}-{lengths.max()} (median {int(np.median(lengths))})",
        "model": loaded.name,
        "weights": loaded.source,
        "weights_sha256": loaded.weights_sha256[:16],
        "weights_checked_against_manifests": plan.weights_checked,
        "emb_layer": plan.emb_layer,
        "pooling": plan.pooling,
        "mode": "local (exported files in process)" if options.local else f"served (Triton {client.protocol} at {client.url})",
        **cells.notes,
        **options.metadata,
    }


def _check_server(client: Any, plan: _Plan, cells: LabelledCells, meta: dict[str, Any]) -> None:
    """Every ensemble ready; the server's tokenizer gives the reference's tokens (recorded in ``meta``)."""
    ready = set(client.ready_models())
    missing = [s.ensemble for s in plan.specs if s.ensemble not in ready]
    if missing:
        raise ValueError(f"not ready on the server: {missing}; ready models: {sorted(ready)}")
    if TOKENIZER_MODEL in ready:
        differ = compare_server_tokens(client, plan.packed_ids, plan.packed_counts, cells.n_counts, plan.tokens)
        meta["server_tokens_checked"] = f"{differ} of {min(32, len(plan.tokens))} cells differ from the reference's tokens"
        if differ:
            LOGGER.error("the server's tokenizer gives other tokens than the reference's dictionaries for %d "
                         "cells: pass the server's dictionaries (--repository or --dictionaries)", differ)


def _embed_all(loaded: LoadedGeneformer, cells: LabelledCells, options: EvaluationOptions, plan: _Plan,
               client: Any, pad_id: int) -> list[EmbeddingRun]:
    """The reference's run, then one per backend (served or, ``local``, in process)."""
    runs = [embed_reference(loaded, plan.tokens, plan.emb_layer, plan.pooling, options.batch_size)]
    LOGGER.info("%s: %.1f s", runs[0].method, runs[0].seconds)
    for spec in plan.specs:
        if options.local:
            run = embed_local(options.repository, spec, plan.tokens, options.batch_size, pad_id)
        else:
            run = embed_served(client, spec, plan.packed_ids, plan.packed_counts, cells.n_counts, options.batch_size)
        LOGGER.info("%s: %.1f s", run.method, run.seconds)
        runs.append(run)
    return runs


def _comparison(runs: list[EmbeddingRun], cells: LabelledCells, options: EvaluationOptions,
                plan: _Plan) -> tuple[pd.DataFrame, dict[str, Any]]:
    """compare_methods' table with each run's backend, timing and fidelity verdict; the pass/fail checks."""
    from geneformer_triton.evaluation.metrics import compare_methods

    table = compare_methods({r.method: r.embeddings for r in runs}, cells.labels, REFERENCE, options.control_label,
                            seed=options.seed)
    by_method = {r.method: r for r in runs}
    table["backend"] = [by_method[m].backend for m in table.index]
    table["precision"] = [by_method[m].precision for m in table.index]
    table["runtime"] = [by_method[m].runtime for m in table.index]
    table["embed_seconds"] = [by_method[m].seconds for m in table.index]
    table["cells_per_s"] = [cells.n_cells / max(by_method[m].seconds, 1e-9) for m in table.index]
    failures = ["; ".join(gate_for(p).failures(row.to_dict())) for p, (_, row) in zip(table["precision"], table.iterrows())]
    table["fidelity_failures"] = failures
    table["fidelity_passed"] = [not f for f in failures]
    checks = check_results(table, options.accuracy_tolerance)
    for method in checks["fidelity_failed"]:
        hint = " (the served model probably has other weights: check its manifest)" \
            if table.loc[method, "cosine_min"] < 0.99 and not plan.weights_checked else ""
        LOGGER.error("%s: fidelity gate failed: %s%s", method, table.loc[method, "fidelity_failures"], hint)
    return table, checks


def _write_outputs(table: pd.DataFrame, checks: dict[str, Any], runs: list[EmbeddingRun], cells: LabelledCells,
                   options: EvaluationOptions, plan: _Plan, meta: dict[str, Any]) -> dict[str, Path]:
    """The report (evaluation.write_report + the backend section + the checks in the JSON), embeddings.npz."""
    from geneformer_triton.evaluation.metrics import ReportOptions, write_report

    embeddings = {r.method: r.embeddings for r in runs}
    name = Path(cells.source).name if not cells.source.startswith("pbmc") else "pbmc68k_reduced"
    paths = write_report(table, options.out_dir, ReportOptions(
        random_weights=plan.random_weights, embeddings=embeddings, labels=cells.labels, reference=REFERENCE,
        metadata=meta, projection=options.projection, title=f"Embedding quality by backend: {name}"))
    _append_backend_section(paths["markdown"], table, checks)
    payload = json.loads(paths["json"].read_text())
    payload["checks"] = checks
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    if options.save_embeddings:
        paths["embeddings"] = Path(options.out_dir) / "embeddings.npz"
        np.savez_compressed(paths["embeddings"], cell_names=cells.cell_names, labels=cells.labels, **embeddings)
    return paths


def evaluate_backends(
    loaded: LoadedGeneformer,
    cells: LabelledCells,
    options: EvaluationOptions = EvaluationOptions(),
    *,
    client: Any = None,
    vocabulary: GeneVocabulary | None = None,
) -> EvaluationResult:
    """Embed ``cells`` with the fp32 reference and every backend of ``options``, compare them, write the report.

    Args:
        loaded: the reference model (same weights as the served/exported encoders).
        cells: labelled cells (:func:`load_labelled_cells`), already subsampled.
        options: backends, repository, mode, report (:class:`EvaluationOptions`).
        client: a ``GeneformerClient`` (served mode).
        vocabulary: dictionaries the server's tokenizer uses (default ``loaded.vocabulary``).
    """
    _check_request(options, cells, client)
    vocabulary = vocabulary or loaded.vocabulary
    if vocabulary is None:
        raise ValueError("no gene dictionaries: pass --dictionaries or --repository")
    plan = _plan(loaded, cells, options, vocabulary)
    meta = _metadata(loaded, cells, options, plan, client)
    if not options.local:
        _check_server(client, plan, cells, meta)
    runs = _embed_all(loaded, cells, options, plan, client, vocabulary.pad_id)
    table, checks = _comparison(runs, cells, options, plan)
    paths = _write_outputs(table, checks, runs, cells, options, plan, meta) if options.out_dir is not None else {}
    meta["random_weights"] = plan.random_weights
    meta["checks"] = checks
    return EvaluationResult(table, runs, paths, meta, checks)


def format_summary(table: pd.DataFrame) -> str:
    """Fixed-width text table: one row per method."""
    cols = [c for c in SUMMARY_COLUMNS if c in table.columns]
    head = f"{'method':<26} {'prec':<5} " + " ".join(f"{c[:10]:>10}" for c in cols) + f" {'cells/s':>8}"
    lines = [head]
    for method, row in table.iterrows():
        values = []
        for c in cols:
            v = float(row[c])
            values.append(f"{v:>10.7f}" if "cosine" in c else f"{v:>+10.4f}" if c.startswith("delta") else f"{v:>10.4f}")
        lines.append(f"{method:<26} {row['precision']:<5} " + " ".join(values) + f" {row['cells_per_s']:>8.1f}")
    return "\n".join(lines)


def chance_summary(table: pd.DataFrame) -> str:
    row = table.iloc[0]
    parts = [f"majority-class accuracy {row['accuracy_majority']:.4f}", f"kNN chance {row['knn_consistency_chance']:.4f}"]
    return "chance levels: " + ", ".join(parts) + "; ARI/NMI/silhouette ~ 0"


__all__ = [
    "REFERENCE", "DEFAULT_BACKENDS", "EvaluationOptions", "LabelledCells", "load_labelled_cells", "labelled_cells_from_anndata",
    "stratified_subsample", "backend_spec", "method_name", "read_manifests", "check_manifests", "EmbeddingRun",
    "embed_reference", "embed_served", "embed_local", "evaluate_backends", "EvaluationResult", "check_results",
    "format_summary", "chance_summary",
]
