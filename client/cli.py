"""``gftriton embed`` and ``gftriton check``: the Triton client's command line.

``embed`` reads raw counts (``.h5ad`` or a CSV cell x gene table) and writes cell embeddings
(``.h5ad`` with ``obsm["X_geneformer"]``, ``.npy`` or ``.parquet``), tokenizing on the server (an
ensemble, default) or here (``--client-tokenize``, token ids to an encoder). Finished batches are kept
in ``<output>.partial/``; rerunning the same command after a failure resumes where it stopped.
``check`` compares every served encoder and ensemble with the local fp32 PyTorch reference.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from geneformer_triton.client.dask_engine import add_cluster_arguments, cluster_requested
from geneformer_triton.client.triton_client import GeneformerClient, RetryPolicy, ServerUnavailableError
from geneformer_triton.core.contract import TOKENIZER_MODEL

if TYPE_CHECKING:
    from geneformer_triton.core.cell_inputs import CellMatrix

LOGGER = logging.getLogger(__name__)

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
EXIT_UNAVAILABLE = 3


def server_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a server that could not be reached: every
    gftriton command then exits with EXIT_UNAVAILABLE."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ServerUnavailableError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _url(args: argparse.Namespace) -> str:
    return args.url or f"localhost:{DEFAULT_PORTS[args.protocol]}"


def _client(args: argparse.Namespace) -> GeneformerClient:
    retry = RetryPolicy(attempts=max(1, args.retries + 1), backoff_s=args.retry_backoff)
    return GeneformerClient(_url(args), args.protocol, concurrency=getattr(args, "concurrency", 2),
                            timeout_s=args.timeout, retry=retry)


def _require_ready(client: GeneformerClient, models: list[str]) -> list[str]:
    ready = client.ready_models()
    missing = [m for m in models if m not in ready]
    if missing:
        raise ValueError(f"model(s) {missing} not ready on {client.url} ({client.protocol}); ready: {ready}")
    return ready


def _dictionary_folders(args: argparse.Namespace) -> list[Path]:
    folders = []
    if args.dictionaries:
        folders.append(Path(args.dictionaries))
    if args.repository:
        folders.append(Path(args.repository) / TOKENIZER_MODEL / "1")
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"dictionary folder not found: {folder}")
    return folders


def read_embed_input(args: argparse.Namespace) -> "CellMatrix":
    """The cells of ``gftriton embed`` (``geneformer_triton.core.cell_inputs``: symbols mapped with the
    gene_name_id_dict.json of --dictionaries or of the --repository's tokenizer)."""
    from geneformer_triton.core.cell_inputs import InputOptions, find_symbol_map, read_cells

    return read_cells(args.input, InputOptions.from_args(args), find_symbol_map(args.dictionaries, args.repository))


def _tokenizer_settings(args: argparse.Namespace, client: GeneformerClient, ready: list[str],
                        folders: list[Path], vocabulary) -> tuple[int, bool]:
    """Model input size and special tokens: options, else the served tokenizer's config, else a local
    tokenizer manifest, else what the vocabulary implies (V2 dictionaries: 4,096 and <cls>/<eos>)."""
    size, special = args.model_input_size, args.special_tokens
    if TOKENIZER_MODEL in ready:
        parameters = client.model_config(TOKENIZER_MODEL).get("parameters", {})
        value = lambda key: parameters.get(key, {}).get("string_value")  # noqa: E731
        if size is None and value("model_input_size"):
            size = int(value("model_input_size"))
        if special is None and value("special_tokens"):
            special = value("special_tokens").lower() == "true"
    for folder in folders:
        manifest = folder / "manifest.json"
        if manifest.is_file():
            content = json.loads(manifest.read_text())
            size = size if size is not None else content.get("input_size")
            special = special if special is not None else content.get("special_tokens")
    if special is None:
        special = vocabulary.has_special_tokens
    if size is None:
        size = 4096 if special else 2048
    return int(size), bool(special)


def run_embed(args: argparse.Namespace) -> int:
    if cluster_requested(args):  # Dask scale-out (client/dask_jobs.py)
        from geneformer_triton.client.dask_jobs import run_embed_on_cluster

        return run_embed_on_cluster(args)
    from geneformer_triton.client.embed_job import EmbedRun
    from geneformer_triton.client.outputs import PartialStore, output_format, write_embeddings
    from geneformer_triton.core.dictionaries import TOKEN_DICTIONARY_FILE, load_vocabulary
    from geneformer_triton.core.tokenizer import RankValueTokenizer

    output_format(args.output)  # fail on an unsupported suffix before any work
    folders = _dictionary_folders(args)
    vocabulary_folder = next((f for f in folders if (f / TOKEN_DICTIONARY_FILE).is_file()), None)
    vocabulary = load_vocabulary(vocabulary_folder) if vocabulary_folder is not None else None
    if args.client_tokenize and vocabulary is None:
        raise ValueError("--client-tokenize needs the token dictionaries: give --dictionaries DIR or --repository DIR")
    cells = read_embed_input(args)

    model = args.encoder if args.client_tokenize else args.model
    with _client(args) as client:
        try:
            ready = _require_ready(client, [model])
            tokenizer = None
            if args.client_tokenize:
                size, special = _tokenizer_settings(args, client, ready, folders, vocabulary)
                tokenizer = RankValueTokenizer(vocabulary, size, special)
                LOGGER.info("client-side tokenization: %d tokens max, special tokens %s", size, special)
            run = EmbedRun(client, cells, model, tokenizer, args.batch_size, vocabulary)
            if tokenizer is not None and TOKENIZER_MODEL in ready:
                LOGGER.info("local tokens equal the served tokenizer's on %d cells",
                            run.verify_tokenizer(TOKENIZER_MODEL))
            store = PartialStore(args.output)
            try:
                stats = run.run(store, restart=args.restart, progress=not args.no_progress)
            finally:
                store.close()
        except ServerUnavailableError as error:
            LOGGER.error("%s", error)
            return EXIT_UNAVAILABLE
    embeddings = store.assemble(cells.n_cells)
    info = {"model": model, "url": client.url, "protocol": client.protocol,
            "tokenization": "client" if tokenizer is not None else "server", "input": cells.source}
    write_embeddings(args.output, embeddings, cells.cell_ids, cells.adata, info)
    store.remove()
    LOGGER.info("wrote %d x %d embeddings to %s (%d embedded now at %.1f cells/s, %d resumed, %d NaN)",
                embeddings.shape[0], embeddings.shape[1], args.output, stats.embedded, stats.cells_per_s,
                stats.resumed, len(stats.skipped))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from geneformer_triton.client.check import check_server, discover_models, local_manifests
    from geneformer_triton.core.fidelity import format_fidelity_table, write_fidelity_report
    from geneformer_triton.model.args import load_model_from_args

    manifests = local_manifests(args.repository)
    with _client(args) as client:
        try:
            only = [m for m in args.models.split(",") if m] if args.models else None
            models = discover_models(client, manifests, only)
            if not models:
                raise ValueError(f"no encoder or embedding ensemble is ready on {client.url} ({client.protocol})")
            LOGGER.info("checking %s", ", ".join(f"{m.name} ({m.kind}, {m.precision})" for m in models))
            loaded = load_model_from_args(args)
            report = check_server(client, loaded, args.cells, models, manifests, args.batch_size)
        except ServerUnavailableError as error:
            LOGGER.error("%s", error)
            return EXIT_UNAVAILABLE
    print(format_fidelity_table(report.results))
    if report.token_mismatches is not None:
        print(f"geneformer_tokenizer: {report.n_cells - report.token_mismatches} of {report.n_cells} cells "
              f"tokenized identically to the local tokenizer{'' if not report.token_mismatches else '  FAIL'}")
    for encoder, problem in report.problems.items():
        print(f"{encoder}: served weights differ from the reference: {problem}  FAIL")
    for result in report.results:
        if not result.passed:
            print(f"{result.variant}: {result.detail}")
    if args.out:
        paths = write_fidelity_report(report.results, args.out, stem="served_fidelity")
        LOGGER.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    print("PASSED" if report.passed else "FAILED")
    return 0 if report.passed else 1


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--url", help="HOST:PORT (default localhost:8001 for grpc, localhost:8000 for http)")
    group.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    group.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    group.add_argument("--retries", type=int, default=5, help="retries while the server is unreachable")
    group.add_argument("--retry-backoff", type=float, default=0.5, help="first retry wait, seconds (doubles)")
    group.add_argument("--batch-size", type=int, default=None, help="cells per request (default: 32 / model max)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from geneformer_triton.core.cell_inputs import add_input_arguments

    embed = subparsers.add_parser(
        "embed", help="embed cells (.h5ad / CSV raw counts) through a Triton server; resumable",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    embed.add_argument("input", help=".h5ad of raw counts, or a CSV/TSV table with cells as rows and genes as columns")
    embed.add_argument("-o", "--output", required=True, help="output .h5ad (input copy + obsm['X_geneformer']), .npy or .parquet")
    _connection_arguments(embed)
    embed.add_argument("--model", default="geneformer_embed_onnx", help="ensemble to use (server-side tokenization)")
    embed.add_argument("--client-tokenize", action="store_true", help="tokenize here and send token ids to --encoder")
    embed.add_argument("--encoder", default="geneformer_onnx", help="encoder for --client-tokenize")
    embed.add_argument("--dictionaries", help="folder with token_dictionary.json, gene_median_dictionary.json, "
                                              "gene_name_id_dict.json (symbols), ...")
    embed.add_argument("--repository", help="local model repository: dictionaries from its geneformer_tokenizer/1")
    embed.add_argument("--model-input-size", type=int, help="--client-tokenize: tokens per cell (default: from the server)")
    embed.add_argument("--special-tokens", action=argparse.BooleanOptionalAction, default=None,
                       help="--client-tokenize: add <cls>/<eos> (default: from the server / dictionaries)")
    embed.add_argument("--concurrency", type=_positive, default=2, help="requests in flight")
    embed.add_argument("--max-cells", type=_positive, help="embed only the first N cells")
    add_input_arguments(embed)
    embed.add_argument("--restart", action="store_true", help="discard partial results of an earlier run")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cluster_arguments(embed, repository=False)
    embed.set_defaults(func=run_embed, batch_size=32)

    check = subparsers.add_parser(
        "check", help="served encoders and ensembles vs the local fp32 PyTorch reference on real cells")
    _connection_arguments(check)
    from geneformer_triton.model.args import add_model_arguments

    add_model_arguments(check)
    check.add_argument("--cells", type=_positive, default=16, help="number of celltypist cells")
    check.add_argument("--models", help="comma list of served models (default: every encoder and ensemble)")
    check.add_argument("--repository", help="local copy of the served repository: its manifests must match the reference")
    check.add_argument("--out", help="folder for served_fidelity.csv / .json")
    check.set_defaults(func=run_check)
