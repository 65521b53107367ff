"""Our ISP methods for the upstream benchmark, one per process (so each method's peak memory is its own).

    python -m geneformer_triton.bench.isp_worker PLAN.json

PLAN.json (written by :mod:`geneformer_triton.bench.isp_upstream_bench`): ``method`` (``inprocess`` | ``served``),
``checkpoint`` (the BertForMaskedLM folder upstream also loads), ``cells`` (lists of V1 token ids),
``emb_modes`` (``cell`` and/or ``cell_and_gene``, run one after the other; the current one is written to
``phase_file``), ``emb_layer`` (upstream's convention), ``repeats``, ``threads``, ``device``,
``max_tokens`` / ``max_batch`` (in process: the chunking the served model uses), and for ``served``:
``repository`` (exported, with ``geneformer_onnx_isp``), ``concurrency``; ``work_dir``.

* ``inprocess``: our numpy planner/reducer with upstream semantics (``plan_upstream`` + ``UpstreamJob``,
  every cell's rows packed into shared batches by ``perturbation.run_packed``) over the PyTorch fp32
  encoder at ``hidden_states[n_layers + emb_layer]`` (token embeddings reduced by ``reduce_token_rows``).
* ``served``: ``geneformer_triton.client.isp_run.run_isp`` (what ``gftriton isp`` runs) against a real local tritonserver
  serving ``geneformer_isp`` -> ``geneformer_onnx_isp_reduced`` (the reduction inside the ONNX graph);
  one warm-up request first (not timed).

Writes ``PLAN.json``'s ``output`` (JSON ``{emb_mode: {repeats: [{seconds, perturbations...}], ...}}``) and,
per emb_mode, ``work_dir/values_<emb_mode>.npz`` (the last repeat: ``cell_keys`` [N, 2] (cell, perturbed
token), ``cell_cos`` [N], ``gene_keys`` [M, 3] (cell, perturbed, affected token), ``gene_cos`` [M]).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("geneformer_triton.bench.isp_worker")
#: the encoder geneformer_isp picks for upstream's emb_layer -1 (the reduced graph, export/isp_reduction_export.py)
ISP_ENCODER = "geneformer_onnx_isp_reduced"


def our_encoder_layer(upstream_emb_layer: int) -> int:
    """Our encoders index ``hidden_states`` like helical (-1 = last); upstream's ISP ``emb_layer`` is
    ``hidden_states[n_layers + emb_layer]`` (-1 = second-to-last): ours = upstream - 1."""
    return upstream_emb_layer - 1


def set_phase(plan: dict, phase: str) -> None:
    Path(plan["phase_file"]).write_text(phase)


def run_inprocess(plan: dict) -> dict[str, tuple[dict, dict]]:
    import torch

    from geneformer_triton.core.isp_upstream import plan_upstream
    from geneformer_triton.core.isp_upstream_service import UpstreamJob
    from geneformer_triton.core.perturbation import run_packed, token_reduced_encode
    from geneformer_triton.model.loading import load_checkpoint
    from geneformer_triton.model.runtimes import torch_encode_fn

    torch.set_num_threads(plan["threads"])
    loaded = load_checkpoint(plan["checkpoint"])
    vocabulary = loaded.vocabulary
    device = plan.get("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {device} asked for, but torch {torch.__version__} sees no CUDA device")
    encode_tokens = torch_encode_fn(loaded.encoder(emb_layer=our_encoder_layer(plan["emb_layer"])).to(device))
    encode_seconds = [0.0]

    def timed_encode(ids: np.ndarray, mask: np.ndarray):
        started = time.perf_counter()
        out = encode_tokens(ids, mask)
        encode_seconds[0] += time.perf_counter() - started
        return out

    encode = token_reduced_encode(timed_encode)

    cells = [np.asarray(c, dtype=np.int64) for c in plan["cells"]]

    def one_pass(batch: list[np.ndarray], emb_mode: str) -> list[tuple[object, dict]]:
        jobs = []
        for tokens in batch:
            upstream_plan = plan_upstream(tokens, "delete", "all", max_len=loaded.input_size)
            labels = [vocabulary.gene_for_token(int(p.label[0])) for p in upstream_plan.perturbations]
            jobs.append(UpstreamJob(plan=upstream_plan, labels=labels, cell_genes=vocabulary.genes_for_tokens(tokens),
                                    emb_mode=emb_mode, states=None, max_tokens=plan["max_tokens"],
                                    max_batch=plan["max_batch"], pad_token_id=vocabulary.pad_id))
        errors = run_packed(jobs, encode, plan["max_tokens"], plan["max_batch"], vocabulary.pad_id)
        failed = [str(e) for e in errors if e is not None]
        if failed:
            raise RuntimeError(f"in-process ISP failed cells: {failed}")
        return [(job.plan, job.outputs()) for job in jobs]

    where = device if device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    described = (f"PyTorch fp32 SDPA encoder, hidden_states[{loaded.config.num_hidden_layers}{plan['emb_layer']:+d}], "
                 f"{where}")
    out = {}
    for emb_mode in plan["emb_modes"]:
        set_phase(plan, emb_mode)
        one_pass([cells[0][: min(cells[0].size, 32)]], emb_mode)  # warm-up (thread pools, allocator), not timed
        repeats, results = [], []
        for _ in range(plan["repeats"]):
            encode_seconds[0] = 0.0
            started = time.perf_counter()
            results = one_pass(cells, emb_mode)
            seconds = time.perf_counter() - started
            repeats.append({"seconds": seconds, "perturbations": sum(len(p.perturbations) for p, _ in results),
                            "encoder_s": encode_seconds[0], "plan_and_reduce_s": seconds - encode_seconds[0]})
        out[emb_mode] = ({"repeats": repeats, "encoder": described}, _inprocess_values(results))
    return out


def _inprocess_values(results) -> dict:
    cell_keys, cell_cos, gene_keys, gene_cos = [], [], [], []
    for index, (upstream_plan, out) in enumerate(results):
        perturbed = np.array([p.label[0] for p in upstream_plan.perturbations], dtype=np.int64)
        cell_keys.append(np.stack([np.full(perturbed.size, index), perturbed], axis=1))
        cell_cos.append(out["cell_emb_shift"].astype(np.float64))
        if "gene_cos" in out:
            affected = upstream_plan.cell[out["gene_affected"]]
            gene_keys.append(np.stack([np.full(affected.size, index), perturbed[out["gene_perturbation"]], affected], axis=1))
            gene_cos.append(out["gene_cos"].astype(np.float64))
    return _pack(cell_keys, cell_cos, gene_keys, gene_cos)


def _pack(cell_keys, cell_cos, gene_keys, gene_cos) -> dict:
    return {
        "cell_keys": np.concatenate(cell_keys).astype(np.int64), "cell_cos": np.concatenate(cell_cos),
        "gene_keys": np.concatenate(gene_keys).astype(np.int64) if gene_keys else np.zeros((0, 3), np.int64),
        "gene_cos": np.concatenate(gene_cos) if gene_cos else np.zeros(0),
    }


def served_cell_table(vocabulary, cells: list[np.ndarray]):
    """A :class:`geneformer_triton.client.isp.CellTable` whose cells tokenize back to exactly ``cells`` (rank-preserving counts)."""
    import scipy.sparse as sp

    from geneformer_triton.bench.isp_bench import rank_preserving_counts
    from geneformer_triton.client.isp import CellTable

    per_cell = [rank_preserving_counts(vocabulary, c) for c in cells]
    ids = sorted({g.decode() for genes, _, _ in per_cell for g in genes})
    column = {g: i for i, g in enumerate(ids)}
    rows = [sp.csr_matrix((counts, ([0] * len(genes), [column[g.decode()] for g in genes])), shape=(1, len(ids)))
            for genes, counts, _ in per_cell]
    matrix = sp.vstack(rows).tocsr()
    matrix.sort_indices()
    return CellTable(matrix.astype(np.float32), np.array(ids, dtype=object), np.array([n for _, _, n in per_cell]),
                     [f"cell{i}" for i in range(len(cells))])


def backend_kind(server) -> str:
    """Which onnxruntime backend the server loaded: Triton's C++ library or the project's Python stand-in."""
    folder = Path(server.work_dir) / "backends" / "onnxruntime"
    if (folder / "libtriton_onnxruntime.so").is_file():
        return "C++ onnxruntime backend (libtriton_onnxruntime.so)"
    if (folder / "model.py").is_file():
        return "Python stand-in onnxruntime backend (geneformer_triton/serving/local_backends/onnxruntime, onnxruntime in a python stub)"
    return f"unknown (no onnxruntime backend found under {folder})"


def stub_import_root(server_dir: Path) -> Path:
    """Make the python-backend stubs import THIS checkout's ``geneformer_triton``.

    The stubs ignore ``PYTHONPATH`` (their ``sys.path`` is the venv's plus ``""`` = their working directory,
    the server's ``work_dir``); with an editable install pointing at another checkout they would import that
    one's code. A link to our package in the server's working directory comes first on their ``sys.path``.
    """
    import geneformer_triton

    server_dir.mkdir(parents=True, exist_ok=True)
    link = server_dir / "geneformer_triton"
    if not link.exists():
        link.symlink_to(Path(geneformer_triton.__file__).resolve().parent, target_is_directory=True)
    return link


def run_served(plan: dict) -> dict[str, tuple[dict, dict]]:
    from geneformer_triton.bench.triton_metrics import breakdown, scrape
    from geneformer_triton.client.isp_run import run_isp
    from geneformer_triton.client.isp_spec import IspSpec
    from geneformer_triton.client.isp_store import ResultStore
    from geneformer_triton.client.triton_client import GeneformerClient
    from geneformer_triton.core.dictionaries import load_vocabulary
    from geneformer_triton.serving.server import LocalTritonServer

    vocabulary = load_vocabulary(Path(plan["checkpoint"]))
    cells = [np.asarray(c, dtype=np.int64) for c in plan["cells"]]
    table = served_cell_table(vocabulary, cells)
    warm = served_cell_table(vocabulary, [cells[0][: min(cells[0].size, 32)]])
    work = Path(plan["work_dir"])
    models = [ISP_ENCODER, "geneformer_isp"]
    out = {}
    stub_import_root(work / "server")
    set_phase(plan, "server start")
    with LocalTritonServer(plan["repository"], models=models, model_config_name="cpu", work_dir=work / "server") as server:
        kind = backend_kind(server)
        with GeneformerClient(server.grpc_url, "grpc", concurrency=plan["concurrency"], timeout_s=3600) as client:
            client.wait_ready(300, "geneformer_isp")
            for emb_mode in plan["emb_modes"]:
                set_phase(plan, emb_mode)
                spec = IspSpec(perturbation="delete", emb_layer=plan["emb_layer"], emb_mode=emb_mode)
                with ResultStore(work / f"warmup_{emb_mode}.parquet", spec.fingerprint(), columns=spec.columns()) as store:
                    run_isp(client, warm, spec, store, concurrency=1)
                repeats, profile = [], {}
                for r in range(plan["repeats"]):
                    before = scrape(server.metrics_url)
                    path = work / f"{emb_mode}_repeat{r}.parquet"
                    with ResultStore(path, spec.fingerprint(), columns=spec.columns()) as store:
                        stats = run_isp(client, table, spec, store, concurrency=plan["concurrency"])
                        rows, genes, errors = store.read(), store.read_genes(), store.read_errors()
                    after = scrape(server.metrics_url)
                    if len(errors) or stats.cells_done != len(cells):
                        raise RuntimeError(f"served ISP rejected cells: {errors.to_dict('records')}")
                    repeats.append({"seconds": stats.seconds, "perturbations": stats.perturbations})
                    if r == 0:
                        profile = {m: breakdown(before, after, m) for m in models}
                out[emb_mode] = ({"repeats": repeats, "backend": kind, "triton_profile": profile, "encoder":
                                  f"{ISP_ENCODER} (ONNX fp32, hidden_states[n_layers - 1], per-gene cosines and means "
                                  "computed in the graph) via geneformer_isp (python BLS, cells packed per encoder batch)"},
                                 _served_values(rows, genes, vocabulary, table.cell_ids))
    return out


def _served_values(rows, genes, vocabulary, cell_ids) -> dict:
    index = {c: i for i, c in enumerate(cell_ids)}
    token = vocabulary.token_ids
    cell_keys = np.array([[index[c], token[g]] for c, g in zip(rows["cell_id"], rows["gene_id"])], dtype=np.int64)
    gene_keys, gene_cos = [], []
    if len(genes):
        gene_keys = [np.array([[index[c], token[g], token[a]] for c, g, a in
                               zip(genes["cell_id"], genes["gene_id"], genes["affected_gene_id"])], dtype=np.int64)]
        gene_cos = [genes["cos"].to_numpy(np.float64)]
    return _pack([cell_keys], [rows["cell_emb_shift"].to_numpy(np.float64)], gene_keys, gene_cos)


METHODS = {"inprocess": run_inprocess, "served": run_served}


def main(plan_path: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = json.loads(Path(plan_path).read_text())
    results = METHODS[plan["method"]](plan)
    for emb_mode, (_, values) in results.items():
        np.savez(Path(plan["work_dir"]) / f"values_{emb_mode}.npz", **values)
    summaries = {emb_mode: summary for emb_mode, (summary, _) in results.items()}
    Path(plan["output"]).write_text(json.dumps(summaries, indent=1, default=float) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m geneformer_triton.bench.isp_worker PLAN.json")
    main(sys.argv[1])
