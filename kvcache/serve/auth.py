"""Trust between the front, the workers and Redis: one deployment secret, keys derived from it.

A deployment has one secret (32 random bytes that ``kvcache serve`` generates, or that an operator
gives in ``KVCACHE_SECRET`` as hex, or in a file named by ``KVCACHE_SECRET_FILE`` that only its
owner may read). Every key is derived from it for one purpose, so no key serves two roles:

    key(purpose) = BLAKE2b-256(key=secret, person="kvcache-kdf-v1", msg=purpose)

- ``worker-instance``: the root of each worker instance's own key,
  ``instance_key = MAC(root, worker_id, instance)`` (the instance id is new at every start). With
  it a worker answers the front's fresh challenge (``hello_proof``) before the front sends it
  anything, and the front presents that instance's credential (``MAC(instance_key, "front-call")``)
  on every call, which only that one instance accepts (401 without it, 403 when wrong). A
  credential captured anywhere opens one instance of one worker, never another, and a listener
  that cannot answer the challenge (someone who took a dead worker's port) gets no credential;
- ``block_key``: the hasher's ``deployment_key``, so block keys in Redis, events and tiers cannot
  be computed (or a guessed prompt tested) without the secret;
- ``registration``/``heartbeat``/``events``: MACs over what a worker writes to Redis (its
  registration with the time it was signed; each heartbeat with its instance, a per-instance beat
  number and the time; each event batch with a per-instance sequence number), which the front
  checks before anything reaches the router;
- ``pseudonym``: events name a chain scope by a keyed pseudonym, never a tenant in clear;
- ``notice``: the MAC of what the front tells a worker through Redis (a refusal), so writing
  Redis is not enough to stop a worker;
- ``tier``: the pod tier's block MAC key (``tiers.seal``), so a block planted in Redis is refused.

MACs are keyed BLAKE2b from ``hashlib``. The secret and the Redis password travel in the
environment (``KVCACHE_SECRET``, ``KVCACHE_REDIS_URL``), never in argv, logs or Redis.

Not here: API keys of tenants (``config``), the Redis process (``kvcache.redis_server``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kvcache.cache.hashing import Hasher
from kvcache.errors import AuthError, ConfigError
from kvcache.private_file import PrivateFileError, read_private_file
from kvcache.redis_server import command_bytes

SECRET_ENV = "KVCACHE_SECRET"
SECRET_FILE_ENV = "KVCACHE_SECRET_FILE"
REDIS_URL_ENV = "KVCACHE_REDIS_URL"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
MAC_BYTES = 16
REGISTRATION_MAX_AGE_S = 30.0  # a worker re-signs on every heartbeat (1 s); allows clock skew
_PERSON = b"kvcache-kdf-v1"
_KEY_CHECK_SCOPE = "kvcache:key-check"  # never a chain scope: those are tenant:/group:/public


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def derive(secret: bytes, purpose: str) -> bytes:
    """The 32-byte key for ``purpose``; distinct purposes give independent keys."""
    return hashlib.blake2b(purpose.encode(), key=secret, digest_size=32, person=_PERSON).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    """Keyed BLAKE2b over length-prefixed parts, so no two part lists give the same message."""
    h = hashlib.blake2b(key=key, digest_size=MAC_BYTES)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.digest()


def _parse_secret(text: str, source: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(
            f"{source} must be hex (e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        ) from None
    if not MIN_SECRET_BYTES <= len(secret) <= 64:
        raise ConfigError(
            f"{source} holds {len(secret)} bytes; a deployment secret is "
            f"{MIN_SECRET_BYTES}..64 bytes (32 recommended)"
        )
    return secret


def load_secret(environ: Mapping[str, str]) -> bytes | None:
    """The secret from ``KVCACHE_SECRET_FILE`` (owner-only file) or ``KVCACHE_SECRET``; else None."""
    path = environ.get(SECRET_FILE_ENV)
    if path:
        try:
            data = read_private_file(path)
        except PrivateFileError as exc:
            raise ConfigError(f"{SECRET_FILE_ENV}={path} {exc.reason}") from exc
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"{SECRET_FILE_ENV}={path} must hold the secret as hex") from None
        return _parse_secret(text, f"{SECRET_FILE_ENV}={path}")
    direct = environ.get(SECRET_ENV)
    return _parse_secret(direct, SECRET_ENV) if direct else None


def write_secret_file(path: str | Path, secret: bytes) -> None:
    """Write ``secret`` (hex) to a new file created 0600 (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())


def redis_url(arg: str | None, environ: Mapping[str, str]) -> str | None:
    """The Redis URL from a command-line flag (credentials refused) or ``KVCACHE_REDIS_URL``."""
    if arg:
        if urlsplit(arg).password is not None:
            raise ConfigError(
                f"the Redis URL on the command line holds a password, which any local user "
                f"can read in `ps`; pass it in the environment as {REDIS_URL_ENV}"
            )
        return arg
    return environ.get(REDIS_URL_ENV) or None


def refuse_open_redis(url: str, timeout_s: float = 1.0) -> None:
    """Raise ``ConfigError`` when the Redis at ``url`` lets in a client that does not know the password:
    one that runs commands unauthenticated (no ACL user or ``requirepass``, or ``protected-mode
    no``), or one that accepts a wrong password for the URL's user (an ACL user ``on nopass``). An
    unreachable Redis passes: the caller's loops wait for it."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return  # rediss:// (TLS) and unix sockets: the transport itself is access-controlled
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    user = unquote(parts.username) if parts.username else "default"
    wrong = secrets.token_hex(16)  # never anyone's password: AUTH must fail with it
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(command_bytes("PING"))
            if _reply_line(sock).startswith(b"+PONG"):
                raise ConfigError(
                    f"Redis at {host}:{port} answers commands without a password: anyone who "
                    "reaches it could read block keys and forge workers. Give it an ACL user "
                    f"with a password (as `kvcache serve` does) and pass the URL in "
                    f"{REDIS_URL_ENV}"
                )
            sock.sendall(command_bytes("AUTH", user, wrong))
            authed = _reply_line(sock)
    except OSError:
        return
    if authed.startswith(b"+OK"):
        raise ConfigError(
            f"Redis at {host}:{port} accepts a wrong password for user {user!r} (an ACL user "
            "`on nopass`?): anyone who reaches it could read block keys and forge workers. "
            f"Give {user!r} a password (`ACL SETUSER {user} resetpass >PASSWORD`) and pass "
            f"the URL in {REDIS_URL_ENV}"
        )


def _reply_line(sock: socket.socket, limit: int = 512) -> bytes:
    """The first line of a Redis reply (up to ``limit`` bytes); empty when the server closed."""
    reply = b""
    while b"\r\n" not in reply and len(reply) < limit:
        chunk = sock.recv(limit - len(reply))
        if not chunk:
            break
        reply += chunk
    return reply


def key_check(hasher: Hasher) -> str:
    """A short fingerprint of how ``hasher`` keys blocks (model, adapter, block size, deployment key):
    equal fingerprints mean the front's router keys match a worker's block keys."""
    return hasher.root(_KEY_CHECK_SCOPE)[:8].hex()


@dataclass(frozen=True, slots=True, repr=False)
class DeploymentKeys:
    """Every key of one deployment, derived from its secret; see the module docstring."""

    instance_root_key: bytes
    block_key: bytes
    registration_key: bytes
    heartbeat_key: bytes
    events_key: bytes
    pseudonym_key: bytes
    notice_key: bytes
    tier_key: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> DeploymentKeys:
        return cls(
            derive(secret, "worker-instance"),
            derive(secret, "block-keys"),
            derive(secret, "registration"),
            derive(secret, "heartbeat"),
            derive(secret, "events"),
            derive(secret, "scope-pseudonym"),
            derive(secret, "front-notice"),
            derive(secret, "pod-tier"),
        )

    def __repr__(self) -> str:
        return "DeploymentKeys(<redacted>)"

    # ---- front <-> worker ------------------------------------------------------------------

    def _instance_key(self, worker_id: str, instance: str) -> bytes:
        return hashlib.blake2b(
            struct.pack("<Q", len(worker_id)) + worker_id.encode() + instance.encode(),
            key=self.instance_root_key,
            digest_size=32,
        ).digest()

    def worker_credential(self, worker_id: str, instance: str) -> str:
        """The bearer credential that opens this one worker instance and no other."""
        return _mac(self._instance_key(worker_id, instance), b"front-call").hex()

    def call_headers(self, worker_id: str, instance: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.worker_credential(worker_id, instance)}"}

    def check_worker_call(self, authorization: str | None, worker_id: str, instance: str) -> int | None:
        """None when ``authorization`` carries this instance's credential, else 401/403."""
        if not authorization:
            return 401
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return 401
        ok = hmac.compare_digest(token.strip().encode(), self.worker_credential(worker_id, instance).encode())
        return None if ok else 403

    def hello_proof(self, worker_id: str, instance: str, challenge: bytes) -> str:
        """A worker instance's answer to the front's fresh ``challenge``: only it (and the front) can."""
        return _mac(self._instance_key(worker_id, instance), b"hello", challenge).hex()

    def check_hello(self, raw: bytes, challenge: bytes, expect: tuple[str, str] | None) -> tuple[str, str]:
        """``(worker_id, instance)`` from a worker's answer to ``challenge``; ``AuthError`` unless the
        proof verifies and, with ``expect``, names that worker instance."""
        try:
            answer = json.loads(raw)
            worker_id, instance, proof = answer["worker_id"], answer["instance"], answer["proof"]
            if not all(isinstance(x, str) for x in (worker_id, instance, proof)):
                raise TypeError("worker_id, instance and proof must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"the answer to the challenge is not a worker's ({type(exc).__name__})") from None
        if expect is not None and (worker_id, instance) != expect:
            raise AuthError(
                f"worker {expect[0]} (instance {expect[1]}) was expected; "
                f"{worker_id!r} (instance {instance!r}) answered"
            )
        if not hmac.compare_digest(proof.encode(), self.hello_proof(worker_id, instance, challenge).encode()):
            raise AuthError("the proof does not verify: what listens there is no worker of this deployment")
        return worker_id, instance

    # ---- hashing -------------------------------------------------------------------------

    def hasher(self, *, block_size: int, model_id: str, adapter_id: str | None) -> Hasher:
        """The hasher every worker's block manager uses for this model: the front routes with it."""
        return Hasher(
            block_size=block_size, model_id=model_id, adapter_id=adapter_id, deployment_key=self.block_key
        )

    def pseudonym(self, scope: str) -> str:
        """A chain scope as events name it: stable within the deployment, meaningless outside it."""
        return "p:" + hashlib.blake2b(scope.encode(), key=self.pseudonym_key, digest_size=8).hexdigest()

    # ---- worker -> Redis -> front --------------------------------------------------------

    def sign_registration(self, registration: str, signed_at: float) -> str:
        mac = _mac(self.registration_key, registration.encode(), repr(signed_at).encode())
        return json.dumps({"registration": registration, "signed_at": signed_at, "mac": mac.hex()})

    def open_registration(self, raw: str | bytes, now: float) -> str:
        """The registration JSON inside a signed envelope; ``AuthError`` if forged, altered or stale."""
        try:
            env = json.loads(raw)
            registration, signed_at, mac = env["registration"], env["signed_at"], bytes.fromhex(env["mac"])
            if not isinstance(registration, str) or not isinstance(signed_at, float):
                raise TypeError("registration must be a string and signed_at a float")
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"registration is not a signed envelope ({type(exc).__name__})") from None
        expected = _mac(self.registration_key, registration.encode(), repr(signed_at).encode())
        if not hmac.compare_digest(mac, expected):
            raise AuthError("registration MAC does not verify (another deployment, or forged)")
        if not -REGISTRATION_MAX_AGE_S <= now - signed_at <= REGISTRATION_MAX_AGE_S:
            raise AuthError(
                f"registration was signed {now - signed_at:.0f} s ago; fresher than "
                f"{REGISTRATION_MAX_AGE_S:.0f} s required"
            )
        return registration

    def sign_heartbeat(self, worker_id: str, instance: str, beat: int, signed_at: float) -> str:
        """A heartbeat: ``beat`` counts up from 0 in each instance, so a replayed one never advances."""
        mac = _mac(
            self.heartbeat_key,
            worker_id.encode(),
            instance.encode(),
            str(beat).encode(),
            repr(signed_at).encode(),
        )
        return json.dumps({"instance": instance, "beat": beat, "signed_at": signed_at, "mac": mac.hex()})

    def open_heartbeat(self, worker_id: str, raw: str | bytes, now: float) -> tuple[str, int]:
        """``(instance, beat)`` of ``worker_id``'s signed heartbeat; ``AuthError`` if it is forged,
        another worker's, altered or signed more than ``REGISTRATION_MAX_AGE_S`` from ``now``."""
        try:
            env = json.loads(raw)
            instance, beat, signed_at = env["instance"], env["beat"], env["signed_at"]
            mac = bytes.fromhex(env["mac"])
            if not isinstance(instance, str) or type(beat) is not int or not isinstance(signed_at, float):
                raise TypeError("instance must be a string, beat an integer and signed_at a float")
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"heartbeat is not a signed envelope ({type(exc).__name__})") from None
        expected = _mac(
            self.heartbeat_key,
            worker_id.encode(),
            instance.encode(),
            str(beat).encode(),
            repr(signed_at).encode(),
        )
        if not hmac.compare_digest(mac, expected):
            raise AuthError("heartbeat MAC does not verify (another deployment or worker, or forged)")
        if not -REGISTRATION_MAX_AGE_S <= now - signed_at <= REGISTRATION_MAX_AGE_S:
            raise AuthError(
                f"heartbeat was signed {now - signed_at:.0f} s ago; fresher than "
                f"{REGISTRATION_MAX_AGE_S:.0f} s required"
            )
        return instance, beat

    # ---- front -> Redis -> worker --------------------------------------------------------

    def sign_notice(self, notice: str) -> str:
        """A message from the front to a worker (a refusal), signed so Redis cannot forge one."""
        return json.dumps({"notice": notice, "mac": _mac(self.notice_key, notice.encode()).hex()})

    def open_notice(self, raw: str | bytes) -> str | None:
        """The notice inside a signed envelope, or None if it is malformed, forged or altered."""
        try:
            env = json.loads(raw)
            notice, mac = env["notice"], bytes.fromhex(env["mac"])
            if not isinstance(notice, str):
                return None
        except (ValueError, KeyError, TypeError):
            return None
        ok = hmac.compare_digest(mac, _mac(self.notice_key, notice.encode()))
        return notice if ok else None

    def sign_events(self, worker_id: str, instance: str, seq: int, data: bytes, load: bytes = b"") -> bytes:
        """The MAC of an event batch and the load it carries (``wire.WorkerLoad``)."""
        return _mac(self.events_key, worker_id.encode(), instance.encode(), str(seq).encode(), data, load)

    def check_events(
        self, worker_id: str, instance: str, seq: int, data: bytes, mac: bytes, load: bytes = b""
    ) -> bool:
        return hmac.compare_digest(mac, self.sign_events(worker_id, instance, seq, data, load))
