"""``gftriton export`` and ``gftriton export-tensorrt``."""

from __future__ import annotations

import argparse
import logging

from geneformer_triton.core.contract import EXPORTED_VARIANTS, PRECISIONS
from geneformer_triton.export.formats import DEFAULT_FORMATS, formats_for
from geneformer_triton.model.args import add_model_arguments, load_model_from_args

LOGGER = logging.getLogger(__name__)


def run_export(args: argparse.Namespace) -> int:
    from geneformer_triton.export.repository import RepositoryConflictError, export_model_repository

    loaded = load_model_from_args(args)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.precision:
        formats = formats_for([p.strip() for p in args.precision.split(",") if p.strip()], formats)
    try:
        written = export_model_repository(loaded, args.repository, formats, args.emb_layer, args.pooling,
                                          replace_configs=args.replace_configs)
    except RepositoryConflictError as error:
        LOGGER.error("%s", error)
        return 2
    for name, path in written.items():
        LOGGER.info("%-12s -> %s", name, path)
    if args.save_checkpoint:
        from geneformer_triton.export.checkpoint import save_checkpoint

        save_checkpoint(loaded, args.save_checkpoint)
    if loaded.random_weights:
        LOGGER.warning("exported RANDOM weights (%s): fine for serving tests and benchmarks, not for biology", loaded.source)
    return 0


def run_export_tensorrt(args: argparse.Namespace) -> int:
    from geneformer_triton.export import tensorrt_build

    return tensorrt_build.main(["build", "--onnx", args.onnx, "--plan", args.plan, "--precision", args.precision])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export encoders (ONNX fp32/fp16/int8, TorchScript fp32/bf16) and tokenizer files into a Triton model repository")
    add_model_arguments(parser)
    parser.add_argument("--repository", default="model_repository",
                        help="model repository folder (an empty or new folder gets a complete, servable repository)")
    parser.add_argument("--replace-configs", action="store_true",
                        help="overwrite configs generated for another model size (default: refuse and say which)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma list of {sorted(EXPORTED_VARIANTS)}")
    parser.add_argument("--precision", default="",
                        help=f"comma list of {list(PRECISIONS)}: export only the formats of these precisions "
                             f"({', '.join(f'{f.precision}: {f.name}' for f in EXPORTED_VARIANTS.values())})")
    parser.add_argument("--emb-layer", type=int, default=-1, help="hidden_states index to embed (helical meaning; -1 = last layer)")
    parser.add_argument("--save-checkpoint", metavar="DIR",
                        help="also write the served weights as a Hugging Face BertForMaskedLM folder (config.json + "
                             "model.safetensors) that upstream Geneformer loads as is")
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="cell embedding: mean of gene tokens or <cls> (V2)")
    parser.set_defaults(func=run_export)

    trt = subparsers.add_parser("export-tensorrt", help="build a TensorRT plan from the portable ONNX encoder (needs TensorRT and a GPU)")
    trt.add_argument("--onnx", default="model_repository/geneformer_onnx/1/model.portable.onnx")
    trt.add_argument("--plan", default="model_repository/geneformer_trt/1/model.plan")
    trt.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    trt.set_defaults(func=run_export_tensorrt)
