"""Argument types for the ``kvcache`` command: checks that run while argparse parses, before any work.

Each function takes the argument's text and returns the parsed value, or raises
``argparse.ArgumentTypeError`` naming the bad value and what is allowed; argparse turns that into
``kvcache COMMAND: error: argument --flag: ...`` and exit status 2. Bad values are therefore refused
before a command loads a model or replays a trace, and a run never ends in a traceback because an
output path it reaches at the end cannot be written. Range checks that depend on other arguments or
on loaded data stay with the command (and raise ``kvcache.errors`` types).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path

from kvcache.errors import ConfigError


def positive_int(text: str) -> int:
    """An integer >= 1 (workers, blocks, requests, threads)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return value


def memory_size(text: str) -> str:
    """A memory size as Redis writes it: ``512mb``, ``2gb`` (digits, then b, kb, mb or gb)."""
    from kvcache.redis_server import is_memory_size

    if not is_memory_size(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be a size above 0 such as '512mb' or '2gb'")
    return text.lower()


def non_negative_int(text: str) -> int:
    """An integer >= 0 (token counts that may be empty)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, durations), or ``inf`` where unbounded makes sense."""
    value = _float(text)
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (delays)."""
    value = _float(text)
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in (0, 1], e.g. 0.1")
    return value


def port(text: str) -> int:
    """A TCP port, 0-65535 (0: the system picks a free one)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a TCP port in 0-65535")
    return value


def output_path(text: str) -> str:
    """A file the command will write: its folder must exist and be writable, and it is not a folder."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def check_port_free(host: str, port_number: int) -> None:
    """Raise ``ConfigError`` when ``host:port_number`` cannot be bound (taken, or not a local address).

    A server checks this before it starts workers, so a taken port fails in a second, not after
    every worker has loaded its model. The socket is closed at once; a race with another process
    that binds in between still surfaces as the server's own bind error."""
    if port_number == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port_number))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port_number}: {exc.strerror or exc}; choose another --port "
                "or stop the process that holds it"
            ) from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


class Renamed(argparse.Action):
    """A flag that was renamed (``new=``): using it is an error that names the new flag."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        ns: argparse.Namespace,
        value: object,
        option: str | None = None,
    ) -> None:
        parser.error(f"{option} was renamed {self.new} (the engine's knob has one name everywhere)")
