"""``opd-megatron serve-teacher``: serve a checkpoint's top-k prompt log-probs over HTTP.

    opd-megatron serve-teacher runs/expert/checkpoints --name expert --port 8000 --max-k 20

prints ``serving teacher expert on http://127.0.0.1:8000`` once it listens, and serves until SIGINT or
SIGTERM. Clients (``RemoteTeacherClient``, a ``remote`` teacher of an OPD config) speak vLLM's
completions API, so the same config can point at ``vllm serve <hf-dir> --served-model-name expert
--max-logprobs 20 --api-key $OPD_TEACHER_TOKEN`` instead (see ``opd_megatron/teachers/remote.py``).

The model runs at TP=1 in this one process (GPU when CUDA is present). A model too large for one
device would be served under torchrun, rank 0 answering HTTP and broadcasting each batch: not built yet.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading

TOKEN_ENV = "OPD_TEACHER_TOKEN"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from opd_megatron.teachers.server import ServerLimits

    d = ServerLimits()
    p = subparsers.add_parser(
        "serve-teacher",
        help="serve a teacher checkpoint's prompt log-probs over HTTP (vLLM completions API subset)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint directory, a run directory (its latest checkpoint), or a Hugging Face model directory",
    )
    p.add_argument(
        "--convert-cache",
        default="runs/hf_cache",
        help="where a Hugging Face directory is converted (once; reused while its files are unchanged)",
    )
    p.add_argument("--name", default=None, help="served model name (default: the checkpoint's run name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --token")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed once listening)")
    p.add_argument(
        "--token",
        default=None,
        help=f"bearer token clients must send; prefer ${TOKEN_ENV} (a command line is visible to other users)",
    )
    p.add_argument("--max-k", type=int, default=d.max_k, help="largest prompt_logprobs accepted")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences per forward pass")
    p.add_argument("--max-tokens-per-request", type=int, default=d.max_tokens_per_request)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_s * 1000, help="batching window")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--sizes-only",
        action="store_true",
        help="check the checkpoint's file sizes only, not their SHA-256 (which reads the checkpoint once more)",
    )
    p.add_argument("--log-requests", action="store_true", help="one access-log line per request on stderr")
    p.set_defaults(func=run_serve)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args) -> int:
    from opd_megatron.config import ConfigError
    from opd_megatron.teachers.server import ServerLimits, build_teacher_server

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(args.host) and not token:
        # An open scoring endpoint on a network is free compute for anyone who finds it.
        raise ConfigError("--host", f"{args.host!r} is not a loopback address: set --token or ${TOKEN_ENV}")
    for flag in ("max_k", "max_body_bytes", "max_batch", "max_tokens_per_request"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}", f"must be >= 1, got {getattr(args, flag)}")
    limits = ServerLimits(
        max_k=args.max_k,
        max_body_bytes=args.max_body_bytes,
        max_tokens_per_request=args.max_tokens_per_request,
        max_batch=args.max_batch,
        max_wait_s=max(0.0, args.max_wait_ms / 1000),
    )
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port", f"must be in [0, 65535], got {args.port}")
    try:
        server = build_teacher_server(
            args.checkpoint,
            name=args.name,
            host=args.host,
            port=args.port,
            token=token,
            limits=limits,
            dtype=args.dtype,
            log_requests=args.log_requests,
            convert_cache=args.convert_cache,
            verify_checksums=not args.sizes_only,
        )
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError("--port", f"{args.host}:{args.port} is already in use") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES) or isinstance(e, socket.gaierror):
            raise ConfigError(
                "--host", f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"
            ) from None
        raise

    def stop(signum, frame):
        # shutdown() waits for serve_forever to return, so it must run off the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    # A trainer that started this server may have blocked its stop signals (and children inherit the
    # mask across exec): unblocked, SIGTERM reaches the handler above and Ctrl-C stops the server.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    print(f"serving teacher {server.model_name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.worker.stop()
        print("teacher server stopped", file=sys.stderr, flush=True)
    return 0
