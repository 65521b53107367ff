"""What a ``gftriton isp`` run perturbs (:class:`IspSpec`: the same for every cell), the one-cell request
(:func:`infer_cell`) and the cell-state embeddings it sends (upstream ``get_state_embs``, or reference cells
through an embedding ensemble)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from geneformer_triton.client.triton_client import GeneformerClient
from geneformer_triton.core.contract import ISP_MODEL
from geneformer_triton.core.isp_schema import COLUMNS, PERTURBATIONS, STATE_PREFIX, IspRunError
from geneformer_triton.core.isp_service import batched, unbatched

if TYPE_CHECKING:
    from geneformer_triton.client.isp import CellTable


def infer_cell(client: GeneformerClient, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict:
    """One cell's request to the ISP model: per-cell tensors in and out (the wire's leading batch dimension of
    1 added and removed). Send cells concurrently: the server's dynamic batcher merges them into shared
    encoder batches."""
    return unbatched(client.infer(model, batched(inputs), outputs))


@dataclass(frozen=True)
class IspSpec:
    """What to perturb in every cell (the same for the whole run)."""

    perturbation: str = "delete"
    targets: Optional[tuple[str, ...]] = None  # None = every gene of each cell
    target_mode: str = "each"
    anchor_genes: tuple[str, ...] = ()
    rank_shift: Optional[float] = None
    gene_shift: bool = False
    goal_embedding: Optional[tuple[float, ...]] = None
    start_embedding: Optional[tuple[float, ...]] = None
    encoder_model: Optional[str] = None
    model: str = ISP_MODEL
    strict_targets: bool = False  # send targets a cell does not express (the server rejects the cell)
    semantics: str = "upstream"  # upstream Geneformer's InSilicoPerturber, or "ours" (target_mode, inhibit/activate)
    emb_layer: int = -1  # upstream ISP convention: hidden_states[n_layers + emb_layer]
    emb_mode: str = "cell"  # "cell_and_gene": also every (perturbed, affected) gene cosine
    state_names: tuple[str, ...] = ()  # cell_states_to_model: start, goal, alt... (upstream order)
    state_embeddings: Optional[tuple[tuple[float, ...], ...]] = None

    def __post_init__(self) -> None:
        if self.perturbation not in PERTURBATIONS:
            raise IspRunError(f"unknown perturbation {self.perturbation!r}; expected one of {', '.join(PERTURBATIONS)}")
        if self.target_mode not in ("each", "set"):
            raise IspRunError(f"target_mode must be 'each' or 'set', got {self.target_mode!r}")
        if self.target_mode == "set" and not self.targets:
            raise IspRunError("target_mode 'set' needs an explicit list of target genes")
        if self.targets is not None and len(self.targets) == 0:
            raise IspRunError("the target list is empty (give genes, or 'all')")
        if self.semantics not in ("upstream", "ours"):
            raise IspRunError(f"semantics must be 'upstream' or 'ours', got {self.semantics!r}")
        if self.semantics == "upstream" and self.perturbation not in ("delete", "overexpress"):
            raise IspRunError(f"{self.perturbation} is ours (upstream has not implemented it): add --semantics ours")
        if self.semantics == "ours" and (self.state_embeddings is not None or self.emb_mode != "cell"):
            raise IspRunError("cell states and --emb-mode cell_and_gene are upstream semantics; drop --semantics ours")

    @property
    def upstream(self) -> bool:
        return self.semantics == "upstream"

    def columns(self) -> tuple[str, ...]:
        """Row columns of this run (COLUMNS + one ``state_shift_<state>`` per cell state)."""
        return COLUMNS + tuple(STATE_PREFIX + name for name in self.state_names)

    def fingerprint(self) -> dict:
        """Settings that must match to resume an output (goal/start states by hash)."""
        data = asdict(self)
        for key in ("goal_embedding", "start_embedding"):
            if data[key] is not None:
                data[key] = hashlib.sha256(np.asarray(data[key], dtype=np.float32).tobytes()).hexdigest()[:16]
        data.pop("strict_targets")
        if data["state_embeddings"] is not None:
            data["state_embeddings"] = hashlib.sha256(np.asarray(data["state_embeddings"], dtype=np.float32).tobytes()).hexdigest()[:16]
        return data

    def request_inputs(self, gene_ids: np.ndarray, counts: np.ndarray, n_counts: float) -> Optional[dict]:
        """Wire inputs for one cell; ``None`` when the cell expresses no target (nothing to do)."""
        inputs = {
            "gene_ids": np.array([str(g).encode() for g in gene_ids], dtype=object),
            "counts": np.ascontiguousarray(counts, dtype=np.float32),
            "n_counts": np.array([n_counts], dtype=np.float32),
            "perturbation": np.array([self.perturbation.encode()], dtype=object),
            "semantics": np.array([self.semantics.encode()], dtype=object),
        }
        if self.upstream:
            inputs["emb_layer"] = np.array([self.emb_layer], dtype=np.int32)
            inputs["emb_mode"] = np.array([self.emb_mode.encode()], dtype=object)
            if self.state_embeddings is not None:
                inputs["state_embeddings"] = np.asarray(self.state_embeddings, dtype=np.float32)
        else:
            inputs["target_mode"] = np.array([self.target_mode.encode()], dtype=object)
            inputs["return_gene_shift"] = np.array([self.gene_shift], dtype=bool)
        expressed = set(str(g) for g in gene_ids)
        if self.targets is not None:
            targets = list(self.targets)
            if not self.upstream and self.target_mode == "each" and not self.strict_targets:
                targets = [t for t in targets if t in expressed]
                if not targets:
                    return None
            inputs["targets"] = np.array([t.encode() for t in targets], dtype=object)
        if self.anchor_genes:
            inputs["anchor_genes"] = np.array([a.encode() for a in self.anchor_genes], dtype=object)
        if self.rank_shift is not None:
            inputs["rank_shift"] = np.array([self.rank_shift], dtype=np.float32)
        if self.goal_embedding is not None:
            inputs["goal_embedding"] = np.asarray(self.goal_embedding, dtype=np.float32)
        if self.start_embedding is not None:
            inputs["start_embedding"] = np.asarray(self.start_embedding, dtype=np.float32)
        if self.encoder_model:
            inputs["encoder_model"] = np.array([self.encoder_model.encode()], dtype=object)
        return inputs

    def outputs(self) -> list[str]:
        if self.upstream:
            names = ["perturbed_genes", "cell_emb_shift", "cell_shift", "target_errors"]
            if self.state_embeddings is not None:
                names.append("state_shift")
            if self.emb_mode == "cell_and_gene":
                names += ["cell_genes", "gene_perturbation", "gene_affected", "gene_cos"]
            return names
        names = ["perturbed_genes", "cell_shift", "target_errors"]
        if self.gene_shift:
            names.append("gene_embedding_shift")
        if self.goal_embedding is not None:
            names.append("goal_shift")
        if self.start_embedding is not None:
            names.append("start_shift")
        return names


def upstream_state_embedding(client: GeneformerClient, cells: CellTable, rows: Sequence[int], spec: "IspSpec",
                             concurrency: int = 4) -> np.ndarray:
    """A cell state's embedding as upstream's ``EmbExtractor.get_state_embs`` computes it: the mean over the
    state's cells of each cell's mean over all its tokens at ``spec.emb_layer`` (``embed_only`` requests)."""
    if len(rows) == 0:
        raise IspRunError("no cell selected for a state embedding")

    def one(row: int) -> np.ndarray:
        gene_ids, counts = cells.cell(row)
        inputs = {
            "gene_ids": np.array([str(g).encode() for g in gene_ids], dtype=object),
            "counts": np.ascontiguousarray(counts, dtype=np.float32),
            "n_counts": np.array([cells.n_counts[row]], dtype=np.float32),
            "perturbation": np.array([b"delete"], dtype=object),
            "emb_layer": np.array([spec.emb_layer], dtype=np.int32),
            "embed_only": np.array([True], dtype=bool),
        }
        if spec.encoder_model:
            inputs["encoder_model"] = np.array([spec.encoder_model.encode()], dtype=object)
        return infer_cell(client, spec.model, inputs, ["original_embedding"])["original_embedding"]

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        means = list(pool.map(one, rows))
    return np.asarray(means, dtype=np.float64).mean(axis=0)


def state_embedding(client: GeneformerClient, cells: CellTable, rows: Sequence[int], embed_model: str) -> np.ndarray:
    """Mean cell embedding of reference cells (a start or goal state) through an embedding ensemble."""
    from geneformer_triton.client.triton_client import pack_cells

    if len(rows) == 0:
        raise IspRunError("no reference cell selected for the state embedding")
    packed_ids, packed_counts = pack_cells(cells.counts[list(rows)], list(cells.gene_ids))
    embeddings = client.embed_cells(packed_ids, packed_counts, cells.n_counts[list(rows)], model=embed_model)
    return embeddings.astype(np.float64).mean(axis=0).astype(np.float32)
