"""How a benchmark starts a ``kvcache serve`` deployment of its own, on loopback.

A free loopback port, the ``kvcache serve`` command line (this interpreter in safe-path mode, the
flags every serving benchmark sets, then its own), and an environment without another
deployment's Redis URL or secret, so the server starts its own Redis and secret.

Not here: waiting for readiness, loading the server (``serve_bench``), or stopping it.
"""

from __future__ import annotations

import os
import socket

from kvcache.child import python_argv
from kvcache.serve import auth

__all__ = ["free_port", "own_deployment_env", "serve_command"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(
    *, model: str, port: int, workers: int, threads: int, num_blocks: int, extra: tuple[str, ...] = ()
) -> list[str]:
    """``kvcache serve`` on ``port`` with these flags, then ``extra``."""
    return [
        *python_argv("-m", "kvcache.cli", "serve"),
        *("--model", model, "--port", str(port), "--workers", str(workers)),
        *("--threads", str(threads), "--num-blocks", str(num_blocks)),
        *extra,
    ]


def own_deployment_env() -> dict[str, str]:
    """This process's environment less a deployment's Redis URL and secret."""
    return {k: v for k, v in os.environ.items() if k not in (auth.REDIS_URL_ENV, auth.SECRET_ENV)}
