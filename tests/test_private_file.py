"""Secret files: only an owner-only regular file is read, and nothing else can make start-up wait."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kvcache.errors import ConfigError, TierError
from kvcache.private_file import PrivateFileError, read_private_file
from kvcache.serve import auth
from kvcache.tiers import seal

HANG_S = 10.0  # far above the few microseconds a refusal takes; only a blocked open gets near it


def outcome_within(call: Callable[[], object]) -> BaseException | object:
    """What ``call`` returned or raised; fails the test if it is still waiting after ``HANG_S``."""
    result: list[BaseException | object] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # a hung open must not hold the test run
    thread.start()
    thread.join(HANG_S)
    assert result, f"still blocked after {HANG_S:.0f} s"
    return result[0]


def test_a_fifo_as_the_deployment_secret_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "secret"
    os.mkfifo(fifo, 0o600)
    error = outcome_within(lambda: auth.load_secret({auth.SECRET_FILE_ENV: str(fifo)}))
    assert isinstance(error, ConfigError)
    assert str(error).startswith(f"KVCACHE_SECRET_FILE={fifo} is not a regular file (mode prw-------)")


def test_a_fifo_as_the_tier_secret_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "tier-secret"
    os.mkfifo(fifo, 0o600)
    error = outcome_within(lambda: seal.secret_from_environment({seal.SECRET_FILE_ENV: str(fifo)}))
    assert isinstance(error, TierError)
    assert str(error).startswith(f"KVCACHE_TIER_SECRET_FILE={fifo} is not a regular file (mode prw-------)")


def test_only_an_owner_only_regular_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"ab" * 40)
    secret.chmod(0o600)
    assert read_private_file(str(secret)) == b"ab" * 40
    assert read_private_file(str(secret), max_bytes=3) == b"aba"
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(PrivateFileError, match="cannot be opened"):
        read_private_file(str(link))
    with pytest.raises(PrivateFileError, match=r"is not a regular file \(mode drwx"):
        read_private_file(str(tmp_path))
    secret.chmod(0o604)
    with pytest.raises(PrivateFileError, match=r"has mode -rw----r--.*chmod 600"):
        read_private_file(str(secret))
