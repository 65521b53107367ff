"""``gftriton serve``: run the real tritonserver (nvidia-pytriton wheel) on a model repository.

Secure by default: the model-repository, shared-memory, trace and logging APIs need the admin key
(``--admin-key-file``, else ``$GFTRITON_ADMIN_KEY``, else a generated key written to a 0600 file whose
path is logged; the key itself never is). ``--protect-inference`` also puts inference behind a key.
SIGTERM or SIGINT (Ctrl-C) drains: the server stops taking requests, finishes those in flight for up
to ``--exit-timeout`` seconds, then exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from geneformer_triton.serving.security import ADMIN_KEY_ENV, INFERENCE_KEY_ENV, ApiAccess
from geneformer_triton.serving.server import LocalTritonServer

LOGGER = logging.getLogger(__name__)

#: Default drain time on shutdown, in seconds: 64 in-flight requests of a CPU ensemble finish well
#: within it; raise it for bigger queues (in-flight cells / cells per second).
DEFAULT_EXIT_TIMEOUT_S = 60


def run_serve(args: argparse.Namespace) -> int:
    access = ApiAccess(
        admin_key_file=Path(args.admin_key_file) if args.admin_key_file else None,
        protect_inference=args.protect_inference,
        inference_key_file=Path(args.inference_key_file) if args.inference_key_file else None,
    )
    server = LocalTritonServer(
        args.repository,
        models=args.models.split(",") if args.models != "*" else "*",
        model_config_name=args.config_name or None,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_path=args.log_file,
        exit_timeout_s=args.exit_timeout,
        access=access,
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        LOGGER.info("%s received: draining in-flight requests (up to %d s), then stopping",
                    signal.Signals(signum).name, args.exit_timeout)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server.start(timeout_s=args.timeout):
            LOGGER.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s, log %s",
                        server.http_url, server.grpc_url, server.metrics_url, server.log_path)
            LOGGER.info("admin APIs (model load/unload, shared memory, trace, logging) need header 'admin-key' "
                        "(gRPC: 'triton-grpc-protocol-admin-key'); clients read the key from $%s", ADMIN_KEY_ENV)
            while not stop.wait(1.0):
                if not server.is_alive():
                    LOGGER.error("tritonserver exited; log tail:\n%s", server.log_tail())
                    return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run tritonserver on the model repository (admin APIs need a key; Ctrl-C drains and stops)"
    )
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--models", default="*", help="comma list of models to load (default all)")
    parser.add_argument("--config-name", default="cpu", help="per-host config (configs/NAME.pbtxt); '' for config.pbtxt")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (keep loopback unless a proxy authenticates)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-file", help="server log (default: a temporary file)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.add_argument("--exit-timeout", type=int, default=DEFAULT_EXIT_TIMEOUT_S,
                        help=f"seconds to finish in-flight requests on SIGTERM/Ctrl-C (default {DEFAULT_EXIT_TIMEOUT_S})")
    parser.add_argument("--admin-key-file", help=f"file (mode 0600) holding the admin key; default ${ADMIN_KEY_ENV}, "
                                                 "else a generated key in the server's work dir (its path is logged)")
    parser.add_argument("--protect-inference", action="store_true",
                        help="also require header 'inference-key' for inference (no authenticating proxy in front)")
    parser.add_argument("--inference-key-file", help=f"file (mode 0600) holding the inference key; default "
                                                     f"${INFERENCE_KEY_ENV}, else generated")
    parser.set_defaults(func=run_serve)
