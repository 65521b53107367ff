"""``gftriton``: one console entry point, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Sequence

COMMAND_MODULES = (
    "geneformer_triton.cli.demo",
    "geneformer_triton.export.cli",
    "geneformer_triton.cli.serve",
    "geneformer_triton.cli.fidelity",
    "geneformer_triton.client.cli",
    "geneformer_triton.cli.evaluate",
    "geneformer_triton.client.isp_cli",
    "geneformer_triton.cli.isp_stats",
    "geneformer_triton.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gftriton",
        description="Geneformer embeddings and in-silico perturbation on NVIDIA Triton Inference Server.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as error:
        from geneformer_triton.client.cli import EXIT_UNAVAILABLE, server_unavailable

        logging.getLogger("gftriton").error("%s", error)
        return EXIT_UNAVAILABLE if server_unavailable(error) else 2

