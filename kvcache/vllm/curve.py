"""ZeroMQ CURVE for the KV event sockets: key files, endpoints that stay on the host, and securing
a socket as a CURVE server (the publisher) or client (a subscriber).

CURVE (RFC 26, libzmq's ``ZMQ_CURVE_*``) encrypts a connection and authenticates its server: a
client must know the server's public key to complete the handshake. The server authenticates its
clients through ZAP: a ``CurveServer`` accepts only the client public keys found in its clients
folder (ZeroMQ's "Ironhouse" pattern). Keys are read from certificate files in pyzmq/czmq's
format (``zmq.auth.create_certificates`` writes ``NAME.key`` with the public key and
``NAME.key_secret`` with both), never from the command line: a secret certificate must be a
regular file only its owner can read.

Not here: what travels on the sockets (``vllm.events``).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kvcache.errors import ConfigError


def local_endpoint(spec: str) -> str:
    """A ZMQ endpoint; a bare port means that port on the loopback interface."""
    spec = spec.strip()
    if spec.isdigit():
        return f"tcp://127.0.0.1:{spec}"
    if "://" not in spec:
        raise ConfigError(f"endpoint {spec!r} must be a port or a ZMQ endpoint, e.g. tcp://127.0.0.1:5557")
    return spec


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` stays on this host (ipc, inproc, or tcp on a loopback address)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: not known to stay here
        return False


def _read(path: str | Path, secret: bool) -> bytes:
    # O_NONBLOCK: a FIFO planted at the path must not hang start-up; it is refused below.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"CURVE certificate {path}: cannot open ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"CURVE certificate {path} is not a regular file")
        if secret and mode & 0o077:
            raise ConfigError(
                f"CURVE secret certificate {path} has mode {stat.filemode(mode)}; "
                "it must be readable by its owner only: chmod 600 it"
            )
        return f.read(64 * 1024)


def read_certificate(path: str | Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public key, secret key or None) from a certificate file, Z85-encoded as ZMQ takes them."""
    public: bytes | None = None
    secret_key: bytes | None = None
    for raw in _read(path, secret).splitlines():
        name, sep, value = raw.strip().partition(b"=")
        key = value.strip(b" \t'\"")
        if sep and name.strip() == b"public-key":
            public = key
        elif sep and name.strip() == b"secret-key":
            secret_key = key
    for what, found in (("public-key", public), ("secret-key", secret_key if secret else public)):
        if found is None or len(found) != 40:
            raise ConfigError(
                f"CURVE certificate {path} has no valid {what} (40 Z85 characters); "
                "create one with zmq.auth.create_certificates"
            )
    assert public is not None
    return public, secret_key


@dataclass(frozen=True, slots=True, repr=False)
class CurveServer:
    """The publisher's keys and the subscribers it accepts."""

    public_key: bytes
    secret_key: bytes
    client_keys: frozenset[bytes]

    @classmethod
    def load(cls, secret_file: str | Path, clients_dir: str | Path) -> CurveServer:
        public, secret_key = read_certificate(secret_file, secret=True)
        assert secret_key is not None
        folder = Path(clients_dir)
        if not folder.is_dir():
            raise ConfigError(f"CURVE clients folder {clients_dir} is not a folder of public certificates")
        clients = frozenset(read_certificate(p, secret=False)[0] for p in sorted(folder.glob("*.key")))
        if not clients:
            raise ConfigError(
                f"CURVE clients folder {clients_dir} holds no NAME.key certificate: "
                "no subscriber could connect"
            )
        return cls(public, secret_key, clients)

    def __repr__(self) -> str:
        return f"CurveServer(<{len(self.client_keys)} client keys>)"

    def secure(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def authenticator(self, ctx: zmq.Context[Any]) -> ThreadAuthenticator:
        """ZAP for ``ctx``, started: a handshake from a key not in ``client_keys`` is refused."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=self)
        return auth

    def callback(self, domain: str, key: bytes) -> bool:  # ZAP's credentials provider
        return key in self.client_keys


@dataclass(frozen=True, slots=True, repr=False)
class CurveClient:
    """A subscriber's keys and the publisher's public key it expects."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes

    @classmethod
    def load(cls, secret_file: str | Path, server_file: str | Path) -> CurveClient:
        public, secret_key = read_certificate(secret_file, secret=True)
        assert secret_key is not None
        return cls(public, secret_key, read_certificate(server_file, secret=False)[0])

    def __repr__(self) -> str:
        return "CurveClient(<keys>)"

    def secure(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
