"""Padding-free serving: the packed ONNX encoder (export/packed_export.py) and its ensemble on a real
tritonserver through Triton's C++ onnxruntime backend with ragged batching.

Gates: the fp32 packed encoder equals the fp32 PyTorch reference (the padded encoder's arithmetic) within
the fp32 gate on real celltypist cells, in process and served (HTTP and gRPC, encoder and ensemble, one
request of several cells and one request per cell merged by the dynamic batcher); int8 holds the reduced-
precision gate. Negative control: the same graph with attention across the whole batch (the block-diagonal
restriction removed: cells attend to each other's tokens) is served the same way and must fail the gate.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO_ROOT

from geneformer_triton.client.check import check_server, discover_models, local_manifests
from geneformer_triton.client.triton_client import GeneformerClient
from geneformer_triton.core.contract import EXPORTED_VARIANTS, PACKED_GRAPH
from geneformer_triton.core.fidelity import compare_variant
from geneformer_triton.export.packed_export import (
    DYNAMIC_AXES,
    INPUT_NAMES,
    OUTPUT_NAMES,
    PackedEncoder,
    _example_inputs,
    flat_batch,
)
from geneformer_triton.export.repository import export_model_repository
from geneformer_triton.model.runtimes import embed_token_cells, onnx_encode_fn

PACKED = [name for name, fmt in EXPORTED_VARIANTS.items() if fmt.graph == PACKED_GRAPH]
LEAKY = "geneformer_onnx_packed_leaky"
N_CELLS = 6


class CrossCellAttention(PackedEncoder):
    """Broken on purpose: every token attends to every token of the batch (one block for all cells)."""

    def _attend(self, layer, x, ends):
        return super()._attend(layer, x, ends[-1:])


def _export_leaky(loaded_model, repository: Path) -> None:
    """``LEAKY``: the fp32 packed model's config (renamed) serving :class:`CrossCellAttention`."""
    source = repository / EXPORTED_VARIANTS["onnx_packed"].model
    target = repository / LEAKY
    (target / "1").mkdir(parents=True)
    (target / "config.pbtxt").write_text((source / "config.pbtxt").read_text().replace(source.name, LEAKY))
    module = CrossCellAttention(loaded_model.encoder(attention="math")).eval()
    vocab = loaded_model.config.vocab_size
    with torch.no_grad():
        torch.onnx.export(module, _example_inputs(vocab), str(target / "1" / "model.onnx"), input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES, opset_version=17, dynamo=False)


@pytest.fixture(scope="module")
def packed_repository(tmp_path_factory, loaded_model):
    repository = tmp_path_factory.mktemp("packed") / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository,
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "__pycache__"))
    export_model_repository(loaded_model, repository, formats=PACKED)
    _export_leaky(loaded_model, repository)
    return repository


def _served() -> list[str]:
    return [m for name in PACKED for m in (EXPORTED_VARIANTS[name].model, EXPORTED_VARIANTS[name].ensemble)]


@pytest.fixture(scope="module")
def packed_server(packed_repository):
    from geneformer_triton.serving.server import LocalTritonServer

    with LocalTritonServer(packed_repository, models=["geneformer_tokenizer", *_served(), LEAKY],
                           model_config_name="cpu", backends="real") as server:
        yield server


@pytest.fixture(scope="module")
def cells(celltypist_tokens):
    """Real cells of different lengths, the longest at the 2,048-token cap."""
    chosen = sorted(celltypist_tokens[:40], key=len)
    return [chosen[0], chosen[10], chosen[20], chosen[30], chosen[-1], chosen[5]]


@pytest.fixture(scope="module")
def reference(reference_encoder, cells):
    return embed_token_cells(reference_encoder, cells, batch_size=1)


def test_exported_packed_graph_matches_the_padded_encoder(packed_repository, cells, reference):
    """In process: one flat batch of cells of different lengths (Triton's ragged layout), and a padded
    multi-cell request flattened, equal the reference per cell; the graph is ragged and loops over cells."""
    import onnxruntime as ort

    assert max(map(len, cells)) == 2048 and len({len(c) for c in cells}) == len(cells)
    path = packed_repository / "geneformer_onnx_packed" / "1" / "model.onnx"
    graph = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["elements"], "attention_mask": ["elements"], "item_width": ["cells", 1]}
    assert sum(n.op_type == "Loop" for n in graph.node) == 6  # one per layer: attention per cell
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask, widths = flat_batch(cells)
    (flat,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "item_width": widths})
    assert compare_variant("packed flat", "fp32", flat, reference).passed
    padded = embed_token_cells(onnx_encode_fn(path), cells, batch_size=len(cells), sort_by_length=False)
    assert compare_variant("packed padded rows", "fp32", padded, reference).passed
    leaky = onnx_encode_fn(packed_repository / LEAKY / "1" / "model.onnx")
    assert not compare_variant("cross-cell", "fp32", embed_token_cells(leaky, cells, len(cells)), reference).passed
    # a batch of one cell has nothing to leak into: the broken graph is right there (the gate needs batches)
    assert compare_variant("one cell", "fp32", embed_token_cells(leaky, cells, 1), reference).passed


def test_int8_packed_graph_quantizes_the_weight_matmuls(packed_repository):
    model = onnx.load(str(packed_repository / "geneformer_onnx_int8_packed" / "1" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 36  # Q, K, V, output, 2 feed-forward x 6 layers
    assert ops.count("Loop") == 6 and "MatMul" in ops  # attention and pooling stay fp32
    onnx.checker.check_model(model)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_packed_models_pass_their_gates(packed_server, packed_repository, loaded_model, protocol):
    """``gftriton check``'s gate: every packed encoder and ensemble, cells sent several per request."""
    url = packed_server.http_url if protocol == "http" else packed_server.grpc_url
    manifests = local_manifests(packed_repository)
    with GeneformerClient(url, protocol) as client:
        models = discover_models(client, manifests, only=_served())
        assert {m.name: m.precision for m in models} == {
            m: EXPORTED_VARIANTS[n].precision for n in PACKED for m in (EXPORTED_VARIANTS[n].model, EXPORTED_VARIANTS[n].ensemble)}
        report = check_server(client, loaded_model, n_cells=N_CELLS, models=models, manifests=manifests)
    assert report.token_mismatches == 0
    assert report.passed, [str(r) for r in report.results]


def _stats(client: GeneformerClient, model: str, at_least: int = 0) -> tuple[int, int]:
    """(inference count, execution count) of ``model`` from Triton's statistics API (HTTP), once the
    inference count reaches ``at_least`` (Triton records an execution just after sending its responses)."""
    deadline = time.monotonic() + 10
    while True:
        stats = client._client().get_inference_statistics(model)["model_stats"][0]
        if int(stats["inference_count"]) >= at_least or time.monotonic() > deadline:
            return int(stats["inference_count"]), int(stats["execution_count"])
        time.sleep(0.05)


@pytest.mark.parametrize("model,passes", [("geneformer_onnx_packed", True), (LEAKY, False)])
def test_dynamic_batcher_merges_cells_of_different_lengths(packed_server, cells, reference, model, passes):
    """One cell per request (no padding on the wire), several in flight: Triton merges requests of different
    lengths into one execution; the embeddings hold the fp32 gate, and the cross-cell control fails it."""
    with GeneformerClient(packed_server.http_url, "http", concurrency=len(cells)) as client:
        assert client.is_ragged(model) and not client.is_ragged("geneformer_tokenizer")
        before = _stats(client, model)
        runs = [client.embed_tokens(cells, model, batch_size=1) for _ in range(3)]
        after = _stats(client, model, at_least=before[0] + 3 * len(cells))
        inferences, executions = (a - b for a, b in zip(after, before))
    assert inferences == 3 * len(cells)
    assert executions < inferences, "the dynamic batcher merged no requests"
    # the control: at least one pass had cells merged with others (executions < inferences) and leaked
    assert all(compare_variant(model, "fp32", served, reference).passed for served in runs) is passes


def test_served_flops_count_padding_only_for_padded_models():
    """Hand-computed (H=2, I=4, one layer: 32 MACs per token, 2 L H per token of attention): cells of 1 and 3
    tokens in one request cost 2 x 3 x (32 + 12) = 264 FLOPs each padded, 72 and 264 at their own lengths."""
    from geneformer_triton.bench.cells import Architecture, CellSet
    from geneformer_triton.bench.triton_bench import SERVED, served_flops

    Cells = CellSet(tokens=[np.array([5]), np.array([5, 6, 7])], rows=np.arange(2))

    arch = Architecture(hidden=2, intermediate=4, layers=1, vocab=10)
    useful = (72 + 264) / 2 / 1e9
    assert served_flops(SERVED["geneformer_onnx"], Cells, 2, arch) == (useful, 264 / 1e9)
    assert served_flops(SERVED["geneformer_onnx"], Cells, 1, arch) == (useful, useful)
    for model in ("geneformer_onnx_packed", "geneformer_embed_onnx_int8_packed"):
        assert SERVED[model].ragged and served_flops(SERVED[model], Cells, 2, arch) == (useful, useful)
