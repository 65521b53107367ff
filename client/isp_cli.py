"""``gftriton isp``: in-silico perturbation of the cells of an .h5ad through the ``geneformer_isp`` model.

Examples (a server running the model repository: ``gftriton serve``)::

    gftriton isp --n-cells 20 --output isp_delete.parquet                      # celltypist sample, delete all
    gftriton isp --h5ad cells.h5ad --perturbation overexpress --targets GATA1,SPI1 --output oe.csv
    gftriton isp --h5ad cells.h5ad --goal-cells cell_type=B --gene-shift --rank-by goal
    gftriton isp --summary-only --output isp_delete.parquet                    # summary + plot, no server
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from geneformer_triton.client.dask_engine import add_cluster_arguments, cluster_requested
from geneformer_triton.client.isp import CellTable, cell_table, select_cells
from geneformer_triton.client.isp_run import run_isp
from geneformer_triton.client.isp_spec import IspSpec, state_embedding, upstream_state_embedding
from geneformer_triton.client.isp_store import ResultStore
from geneformer_triton.client.isp_summary import format_summary, plot_top_shifts, summarize
from geneformer_triton.core.contract import ENSEMBLE_FOR, ISP_DEFAULT_ENCODER, ISP_MODEL, TOKENIZER_MODEL
from geneformer_triton.core.isp_schema import PERTURBATIONS, RANK_BY, IspRunError

LOGGER = logging.getLogger("gftriton.isp")


def _gene_list(text: Optional[str], cells: CellTable, name_to_id: dict) -> Optional[tuple[str, ...]]:
    """Comma list of Ensembl ids or symbols -> Ensembl ids (None for 'all' / empty)."""
    if text is None or text.strip().lower() == "all":
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    symbol_to_id = {s: e for e, s in cells.symbols.items()}
    genes = []
    for item in items:
        if item.upper().startswith("ENS"):
            genes.append(item.split(".")[0])
        elif item in symbol_to_id:
            genes.append(symbol_to_id[item])
        elif item in name_to_id:
            genes.append(name_to_id[item])
            cells.symbols.setdefault(name_to_id[item], item)  # a gene the dataset does not measure (e.g. KLF1)
        else:
            raise IspRunError(f"gene {item!r} is neither an Ensembl id nor a known symbol of the dataset/dictionaries")
    if not genes:
        raise IspRunError("the gene list is empty")
    return tuple(genes)


def _select_rows(cells: CellTable, selector: str) -> list[int]:
    """``column=value`` over obs -> row indices."""
    column, sep, value = selector.partition("=")
    if not sep or cells.obs is None or column not in cells.obs:
        columns = [] if cells.obs is None else list(cells.obs.columns)
        raise IspRunError(f"reference cells must be given as OBS_COLUMN=VALUE with a column of obs ({columns}), got {selector!r}")
    rows = np.flatnonzero(cells.obs[column].astype(str).to_numpy() == value)
    if len(rows) == 0:
        raise IspRunError(f"no cell has {column} == {value!r}")
    return [int(r) for r in rows]


def _state(args, client, cells: CellTable, which: str) -> Optional[tuple[float, ...]]:
    path, selector = getattr(args, f"{which}_embedding"), getattr(args, f"{which}_cells")
    if path and selector:
        raise IspRunError(f"give --{which}-embedding or --{which}-cells, not both")
    if path:
        return tuple(float(v) for v in np.load(path).reshape(-1))
    if selector:
        embed_model = args.embed_model or ENSEMBLE_FOR.get(args.encoder or ISP_DEFAULT_ENCODER, ENSEMBLE_FOR[ISP_DEFAULT_ENCODER])
        rows = _select_rows(cells, selector)
        LOGGER.info("%s state: mean embedding of %d reference cells (%s) via %s", which, len(rows), selector, embed_model)
        return tuple(float(v) for v in state_embedding(client, cells, rows, embed_model))
    return None


def _report(store: ResultStore, args) -> None:
    rows = store.read()
    errors = store.read_errors()
    LOGGER.info("%s: %d rows from %d cells (%d cells rejected or skipped)", store.path, len(rows),
                rows["cell_id"].nunique() if len(rows) else 0, len(errors))
    if rows.empty:
        return
    min_cells = min(args.min_cells, max(1, rows["cell_id"].nunique()))
    summary = summarize(rows, args.rank_by, min_cells)
    base = store.path.with_name(store.path.stem)
    summary_csv = Path(args.summary_csv) if args.summary_csv else Path(f"{base}_summary.csv")
    plot = Path(args.plot) if args.plot else Path(f"{base}_top_shifts.png")
    summary_csv.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(summary_csv, index=False)
    if summary.empty:
        print(f"no perturbed gene was scored in >= {min_cells} cells ({rows['cell_id'].nunique()} cells, "
              f"{rows['gene_id'].nunique()} genes): lower --min-cells or select more cells; no plot written\n"
              f"summary: {summary_csv}\nresults: {store.path}")
        return
    plot_top_shifts(summary, plot, args.rank_by, args.top,
                    title=f"{rows['perturbation'].iloc[0]}: top {min(args.top, len(summary))} genes by mean shift "
                          f"over {rows['cell_id'].nunique()} cells")
    print(f"top {min(args.top, len(summary))} genes by {args.rank_by} shift "
          f"({rows['cell_id'].nunique()} cells, genes in >= {args.min_cells} cells):")
    print(format_summary(summary, args.top))
    print(f"summary: {summary_csv}\nplot: {plot}\nresults: {store.path}")


def run_isp_command(args: argparse.Namespace) -> int:
    from geneformer_triton.client.triton_client import GeneformerClient, RetryPolicy, ServerUnavailableError

    if not args.summary_only and cluster_requested(args):  # Dask scale-out (client/dask_jobs.py)
        from geneformer_triton.client.dask_jobs import run_isp_on_cluster

        return run_isp_on_cluster(args)

    name_to_id = gene_name_map(args)
    if args.summary_only:
        store = ResultStore(args.output, _stored_fingerprint(args.output))
        with store:
            _report(store, args)
        return 0

    cells = load_isp_cells(args, name_to_id)
    rows = selected_rows(args, cells)
    retry = RetryPolicy(attempts=args.retries)
    with GeneformerClient(args.url, args.protocol, concurrency=args.concurrency, timeout_s=args.timeout, retry=retry) as client:
        try:
            client.wait_ready(args.wait, args.model)
        except ServerUnavailableError as error:
            raise IspRunError(f"{error}; start one with `gftriton serve`") from error
        spec = build_spec(args, client, cells, name_to_id)
        with ResultStore(args.output, spec.fingerprint(), overwrite=args.overwrite, columns=spec.columns()) as store:
            if args.retry_errors:
                store.forget_errors()
            try:
                stats = run_isp(client, cells, spec, store, args.concurrency, args.flush_every, args.flush_seconds,
                                rows=rows, progress=not args.no_progress)
            except ServerUnavailableError as error:
                raise IspRunError(f"{error}; finished cells are saved, rerun to resume") from error
            LOGGER.info(
                "%d cells perturbed (%d perturbations, %.1f perturbations/s), %d already done, %d rejected, %d without targets",
                stats.cells_done, stats.perturbations, stats.perturbations_per_s, stats.cells_skipped_done,
                stats.cells_rejected, stats.cells_without_targets,
            )
            if store.read().empty:
                errors = store.read_errors()
                why = "; ".join(sorted(set(errors["error"].astype(str)))[:3]) if len(errors) else "no cell was selected"
                raise IspRunError(f"no cell produced a result ({len(errors)} skipped or rejected): {why}")
            _report(store, args)
    return 0


def gene_name_map(args: argparse.Namespace) -> dict:
    """Gene symbol -> Ensembl id from ``--dictionaries`` or the local repository's tokenizer files."""
    dictionaries = args.dictionaries or _repository_dictionaries(args.repository)
    if not dictionaries:
        return {}
    from geneformer_triton.core.dictionaries import load_vocabulary

    return load_vocabulary(dictionaries).gene_name_to_id or {}


def load_isp_cells(args: argparse.Namespace, name_to_id: dict) -> CellTable:
    """The input cells of an ``isp`` run (--h5ad, else the celltypist sample), read by the input layer
    (``geneformer_triton.core.cell_inputs``: the same gene, total-count and integer rules as ``embed``)."""
    from geneformer_triton.core.cell_inputs import InputOptions, SymbolMap, cells_from_anndata, read_cells

    symbols = SymbolMap(name_to_id, "the tokenizer's gene_name_id_dict.json") if name_to_id else None
    options = InputOptions(layer=args.counts_layer, gene_column=args.gene_column, n_counts_key=args.n_counts_key,
                           allow_non_integer=args.allow_non_integer, max_cells=args.n_cells)
    if args.h5ad is None:
        from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

        sample = load_celltypist_sample(n_cells=args.n_cells, symbol_to_ensembl=name_to_id or None)
        matrix = cells_from_anndata(sample, options, symbols, "celltypist sample")
    else:
        matrix = read_cells(args.h5ad, options, symbols)
    cells = cell_table(matrix)
    LOGGER.info("%d cells, %d genes with Ensembl ids", len(cells), int((cells.gene_ids != "").sum()))
    return cells


def selected_rows(args: argparse.Namespace, cells: CellTable) -> list[int]:
    """Rows to perturb: ``--cells`` filters (plus the start state with cell states), ``--max-cells``,
    ``--cell-index-range`` (:func:`geneformer_triton.client.isp.select_cells`)."""
    states = _states_option(args)
    filters = list(args.cells or [])
    if states is not None:  # upstream perturbs only start-state cells
        filters.append(f"{states['state_key']}={states['start_state']}")
    return select_cells(cells, filters, args.max_cells, _index_range(args.cell_index_range))


def build_spec(args: argparse.Namespace, client, cells: CellTable, name_to_id: dict) -> IspSpec:
    """The run's :class:`IspSpec` from the options; ``client`` embeds reference cells for states
    (``None`` where no state needs embedding)."""
    semantics = "ours" if (args.semantics == "ours" or args.one_at_a_time) else "upstream"
    targets = _gene_list(args.targets, cells, name_to_id)
    spec = IspSpec(
        perturbation=args.perturbation,
        targets=targets,
        target_mode=args.target_mode or ("each" if args.one_at_a_time or targets is None else "set"),
        anchor_genes=_gene_list(args.anchor, cells, name_to_id) or (),
        rank_shift=args.rank_shift,
        gene_shift=args.gene_shift,
        goal_embedding=_state(args, client, cells, "goal"),
        start_embedding=_state(args, client, cells, "start"),
        encoder_model=args.encoder,
        model=args.model,
        strict_targets=args.strict_targets,
        semantics=semantics,
        emb_layer=args.emb_layer,
        emb_mode=args.emb_mode,
    )
    states = _states_option(args)
    if states is not None:
        if client is None:
            raise IspRunError("cell states need a server to embed the state cells: give --servers with --cluster")
        spec = _with_states(spec, client, cells, states, args.concurrency)
    if args.rank_by == "goal" and spec.goal_embedding is None:
        raise IspRunError("--rank-by goal needs a goal state (--goal-cells or --goal-embedding)")
    if args.rank_by == "gene" and not spec.gene_shift:
        raise IspRunError("--rank-by gene needs --gene-shift")
    return spec


def _repository_dictionaries(repository: Optional[str]) -> Optional[str]:
    """The served tokenizer's dictionaries in a local model repository (symbol -> Ensembl id), if there."""
    folder = Path(repository or "model_repository") / TOKENIZER_MODEL / "1"
    return str(folder) if (folder / "token_dictionary.json").is_file() else None


def _index_range(text: Optional[str]) -> Optional[tuple[int, int]]:
    if not text:
        return None
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit() or int(end) <= int(start):
        raise IspRunError(f"--cell-index-range takes START:END with 0 <= START < END, got {text!r}")
    return int(start), int(end)


def _states_option(args) -> Optional[dict]:
    """cell_states_to_model from --state-key/--start-state/--goal-state/--alt-states (None without)."""
    given = [args.state_key, args.start_state, args.goal_state]
    if not any(given) and not args.alt_states:
        return None
    if not all(given):
        raise IspRunError("cell states need --state-key, --start-state and --goal-state (and optionally --alt-states)")
    alt = [a for a in (args.alt_states or "").split(",") if a]
    return {"state_key": args.state_key, "start_state": args.start_state, "goal_state": args.goal_state, "alt_states": alt}


def _with_states(spec: IspSpec, client, cells: CellTable, states: dict, concurrency: int) -> IspSpec:
    """``spec`` with upstream state embeddings (every cell of the file labelled with each state)."""
    from dataclasses import replace

    if not spec.upstream:
        raise IspRunError("cell states (--state-key ...) are upstream semantics; for ours use --goal-cells/--start-cells")
    names = [states["start_state"], states["goal_state"], *states["alt_states"]]
    if cells.obs is None or states["state_key"] not in cells.obs:
        raise IspRunError(f"obs has no column {states['state_key']!r} for --state-key")
    labels = cells.obs[states["state_key"]].astype(str).to_numpy()
    embeddings = []
    for name in names:
        rows = [int(r) for r in np.flatnonzero(labels == name)]
        if not rows:
            raise IspRunError(f"no cell has {states['state_key']} == {name!r}")
        LOGGER.info("state %s: mean of %d cells' embeddings (upstream get_state_embs)", name, len(rows))
        embeddings.append(tuple(float(v) for v in upstream_state_embedding(client, cells, rows, spec, concurrency)))
    return replace(spec, state_names=tuple(names), state_embeddings=tuple(embeddings))


def _stored_fingerprint(output: str) -> dict:
    fingerprint = ResultStore.stored_fingerprint(output)
    if fingerprint is None:
        raise IspRunError(f"{output} holds no ISP results (no settings file {ResultStore.settings_path(output)})")
    return fingerprint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "isp", help="in-silico perturbation of many cells through the geneformer_isp Triton model (resumable)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server = parser.add_argument_group("server")
    server.add_argument("--url", default="127.0.0.1:8001", help="host:port (gRPC 8001, HTTP 8000)")
    server.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    server.add_argument("--model", default=ISP_MODEL, help="ISP model name")
    server.add_argument("--encoder", help="encoder model the ISP model calls (one of its allowed_encoder_models; "
                                          "default: its encoder_model parameter)")
    server.add_argument("--concurrency", type=int, default=4,
                        help="cells in flight (the server merges them into shared encoder batches)")
    server.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    server.add_argument("--retries", type=int, default=6, help="tries per request while the server is unreachable")
    server.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the server to be ready")

    data = parser.add_argument_group("cells")
    data.add_argument("--h5ad", help="AnnData of raw counts (default: the celltypist sample)")
    data.add_argument("--n-cells", type=int, help="only the first N cells")
    data.add_argument("--gene-column", help="var column with Ensembl ids (default: 'ensembl_id' if present, else var names)")
    data.add_argument("--counts-layer", help="raw counts: 'X' (default), 'raw' (.raw.X) or a layer name")
    data.add_argument("--n-counts-key", default="n_counts", help="obs column with each cell's total counts (default "
                      "%(default)s; when absent: obs ncounts or total_counts, else the sum of the cell's counts)")
    data.add_argument("--dictionaries", help="Geneformer dictionary folder (symbol -> Ensembl id mapping; default: "
                                             "the tokenizer's in --repository when there)")
    data.add_argument("--repository", default="model_repository",
                      help="local model repository: its dictionaries, and what each --cluster worker's own tritonserver serves")
    data.add_argument("--cells", action="append", metavar="COL=VALUE[,VALUE]",
                      help="only cells whose obs COL is one of the values (upstream filter_data; repeatable)")
    data.add_argument("--max-cells", type=int, help="at most N cells: more are shuffled with seed 42 and cut "
                                                   "(upstream max_ncells)")
    data.add_argument("--cell-index-range", metavar="START:END", help="rows START..END-1 of the selected cells "
                                                                      "(upstream cell_inds_to_perturb, in file order)")
    data.add_argument("--allow-non-integer", action="store_true",
                      help="tokenize non-integer X as counts when raw counts cannot be recovered (log1p-normalized X "
                           "with uns['log1p'] is converted back to counts where that is exact; geneformer_triton.core.cell_inputs)")

    pert = parser.add_argument_group("perturbation")
    pert.add_argument("--perturbation", choices=PERTURBATIONS, default="delete")
    pert.add_argument("--targets", default="all", help="'all' or a comma list of Ensembl ids / symbols")
    pert.add_argument("--semantics", choices=["upstream", "ours"], default="upstream",
                      help="upstream (default): Geneformer InSilicoPerturber's perturbations and numbers; ours: "
                           "--target-mode/--one-at-a-time, inhibit/activate, goal/start embeddings")
    pert.add_argument("--one-at-a-time", action="store_true",
                      help="ours: one perturbation per listed gene (upstream perturbs a list jointly)")
    pert.add_argument("--target-mode", choices=["each", "set"],
                      help="with --semantics ours: each = one perturbation per target, set = all together "
                           "(default: set for a list, like upstream; each with --one-at-a-time)")
    pert.add_argument("--emb-layer", type=int, default=-1,
                      help="upstream ISP convention: hidden_states[n_layers + EMB_LAYER]; -1 (default) = second-to-last "
                           "hidden state (hidden_states[5] of 6 layers; helical / `gftriton export` --emb-layer -2), 0 = last "
                           "layer (helical -1)")
    pert.add_argument("--emb-mode", choices=["cell", "cell_and_gene"], default="cell",
                      help="cell_and_gene also streams every (perturbed, affected) gene cosine to OUTPUT/_genes/; "
                           "on a V2 model (<cls>/<eos>) these are upstream's cls / cls_and_gene (the <cls> cosine)")
    pert.add_argument("--state-key", help="cell states: obs column of the labels (upstream cell_states_to_model)")
    pert.add_argument("--start-state", help="label of the cells to perturb")
    pert.add_argument("--goal-state", help="label of the goal state")
    pert.add_argument("--alt-states", help="comma list of alternative state labels")
    pert.add_argument("--anchor", help="comma list of genes perturbed together with every target")
    pert.add_argument("--rank-shift", type=float, help="inhibit/activate: positions (>= 1) or fraction of genes (0..1)")
    pert.add_argument("--gene-shift", action="store_true", help="also compute the gene-embedding shift (slower)")
    pert.add_argument("--strict-targets", action="store_true",
                      help="send every target even where a cell does not express it (the server rejects such cells)")
    for which in ("goal", "start"):
        pert.add_argument(f"--{which}-embedding", help=f"{which} state embedding (.npy of the hidden size)")
        pert.add_argument(f"--{which}-cells", help=f"{which} state = mean embedding of the cells with OBS_COLUMN=VALUE")
    pert.add_argument("--embed-model", help="embedding ensemble for reference cells (default: the one of --encoder)")

    out = parser.add_argument_group("output")
    out.add_argument("--output", default="isp_results.parquet", help="NAME.parquet (dataset folder) or NAME.csv")
    out.add_argument("--overwrite", action="store_true", help="start the output afresh")
    out.add_argument("--retry-errors", action="store_true", help="retry cells the server rejected in an earlier run")
    out.add_argument("--flush-every", type=int, default=8, help="cells per appended block")
    out.add_argument("--flush-seconds", type=float, default=10.0, help="append at least this often")
    out.add_argument("--summary-only", action="store_true", help="only summarize an existing output (no server)")
    out.add_argument("--rank-by", choices=sorted(RANK_BY), default="cell")
    out.add_argument("--top", type=int, default=20, help="genes in the printed summary and the plot")
    out.add_argument("--min-cells", type=int, default=2, help="summary: genes perturbed in at least this many cells")
    out.add_argument("--summary-csv", help="default: <output>_summary.csv")
    out.add_argument("--plot", help="default: <output>_top_shifts.png")
    out.add_argument("--no-progress", action="store_true")
    add_cluster_arguments(parser, repository=False)
    parser.set_defaults(func=run_isp_command)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the ``isp`` subcommand (``parse_args(["isp", ...])``)."""
    parser = argparse.ArgumentParser(prog="python -m geneformer_triton.client.isp_cli")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Optional[list] = None) -> int:
    """``python -m geneformer_triton.client.isp_cli ...``: the ``isp`` subcommand alone (starts faster than ``gftriton``,
    which imports every subcommand's dependencies)."""
    import sys

    args = build_parser().parse_args(["isp", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as error:
        from geneformer_triton.client.cli import EXIT_UNAVAILABLE, server_unavailable

        LOGGER.error("%s", error)
        return EXIT_UNAVAILABLE if server_unavailable(error) else 2


if __name__ == "__main__":
    raise SystemExit(main())
