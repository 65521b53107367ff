"""``gftriton serve``: run the real tritonserver (nvidia-pytriton wheel) on a model repository."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from geneformer_triton.server import LocalTritonServer

LOGGER = logging.getLogger(__name__)


def run_serve(args: argparse.Namespace) -> int:
    server = LocalTritonServer(
        args.repository,
        models=args.models.split(",") if args.models != "*" else "*",
        model_config_name=args.config_name or None,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_path=args.log_file,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server.start(timeout_s=args.timeout):
        LOGGER.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s, log %s",
                    server.http_url, server.grpc_url, server.metrics_url, server.log_path)
        try:
            while not stop.wait(1.0):
                if not server.is_alive():
                    LOGGER.error("tritonserver exited; log tail:\n%s", server.log_tail())
                    return 1
        except KeyboardInterrupt:
            pass
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run tritonserver on the model repository (Ctrl-C stops it)")
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--models", default="*", help="comma list of models to load (default all)")
    parser.add_argument("--config-name", default="cpu", help="per-host config (configs/NAME.pbtxt); '' for config.pbtxt")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (Triton has no authentication: keep loopback)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-file", help="server log (default: a temporary file)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.set_defaults(func=run_serve)
