"""Blocks in shared tiers carry a keyed MAC: whoever can write the folder or the Redis, without the
deployment secret, can destroy blocks (a counted miss) but never plant one that is served."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
import redis
import torch
from tiers_helpers import LAYOUT, block, key, same_bits

from kvcache.cache import hashing
from kvcache.errors import CorruptBlockError, TierError
from kvcache.redis_server import start_redis
from kvcache.tiers import DiskTier, IcmsTier, InProcessBackend, RedisBackend, TierKey, codec
from kvcache.tiers.seal import SECRET_ENV, SECRET_FILE_ENV, Seal, secret_from_environment

SECRET = b"0123456789abcdef0123456789abcdef"
KEYED = Seal.keyed(SECRET)
ATTACKER = Seal.keyed(b"a secret chosen by the attacker!!")


@pytest.fixture(autouse=True)
def no_secret_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)


def forged(k: TierKey, seal: Seal) -> bytes:
    """A well-formed block of zeros for ``k``, sealed by someone holding ``seal`` only."""
    return codec.encode(k, torch.zeros(k.layout.block_shape, dtype=k.layout.torch_dtype), seal)


def version_1(k: TierKey, payload: torch.Tensor) -> bytes:
    """A block in the format before seals and weights identities (version 1)."""
    data = codec.tensor_bytes(payload.contiguous())
    lay = k.layout
    fields = struct.pack(
        "<4sHHB3x5I16s16sQQ",
        b"KVCB",
        1,
        128,
        3,
        lay.num_layers,
        2,
        lay.block_size,
        lay.kv_heads,
        lay.head_dim,
        lay.digest,
        k.key,
        data.nbytes,
        hashing.checksum(data),
    )
    head = fields + bytes(120 - len(fields))
    return head + struct.pack("<Q", hashing.checksum(head)) + data.tobytes()


# ---- the codec ---------------------------------------------------------------------------------


def test_keyed_round_trip_and_every_forgery_is_refused() -> None:
    data = codec.encode(key(1), block(1), KEYED)
    assert same_bits(codec.decode(data, key(1), seal=KEYED), block(1))
    with pytest.raises(CorruptBlockError, match="sealed with xxh3_64 checksum; this tier requires keyed"):
        codec.decode(forged(key(1), Seal.checksum()), key(1), seal=KEYED)  # no downgrade
    with pytest.raises(CorruptBlockError, match="payload MAC mismatch"):
        codec.decode(forged(key(1), ATTACKER), key(1), seal=KEYED)
    tampered = bytearray(data)
    tampered[codec.HEADER_BYTES + 5] ^= 1
    with pytest.raises(CorruptBlockError, match="payload MAC mismatch"):
        codec.decode(tampered, key(1), seal=KEYED)
    with pytest.raises(CorruptBlockError, match="holds key"):  # a genuine block under another name
        codec.decode(data, key(2), seal=KEYED)
    with pytest.raises(CorruptBlockError, match="requires xxh3_64 checksum"):
        codec.decode(data, key(1))  # a checksum reader cannot verify a MAC: a miss, not a guess


def test_the_mac_covers_the_header_fields_it_names() -> None:
    """Rewriting the block key inside a genuine block (and fixing the header checksum) breaks the MAC."""
    data = bytearray(codec.encode(key(1), block(1), KEYED))
    data[48:64] = key(2).key
    data[120:128] = struct.pack("<Q", hashing.checksum(bytes(data[:120])))
    with pytest.raises(CorruptBlockError, match="payload MAC mismatch"):
        codec.decode(data, key(2), seal=KEYED)


def test_blocks_of_format_version_1_are_refused() -> None:
    with pytest.raises(CorruptBlockError, match="format version 1"):
        codec.decode(version_1(key(1), block(1)), key(1))


# ---- G3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seal", [Seal.checksum(), ATTACKER], ids=["checksum", "other-secret"])
def test_a_forged_block_file_is_a_counted_miss(tmp_path: Path, seal: Seal) -> None:
    tier = DiskTier(tmp_path, 8, seal=KEYED)
    tier.store(key(1), block(1))
    tier.path(key(1)).write_bytes(forged(key(1), seal))
    assert tier.load(key(1)) is None
    s = tier.stats
    assert (s.hits, s.misses, s.corrupt) == (0, 1, 1) and not tier.path(key(1)).exists()
    tier.store(key(1), block(1))
    assert same_bits(tier.load(key(1)), block(1))


def test_a_version_1_file_is_a_counted_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 8)
    tier.store(key(1), block(1))
    tier.path(key(1)).write_bytes(version_1(key(1), block(1)))
    fresh = DiskTier(tmp_path, 8)
    assert len(fresh) == 1 and fresh.load(key(1)) is None
    assert (fresh.stats.misses, fresh.stats.corrupt) == (1, 1)


def test_a_folder_others_can_write_needs_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(TierError, match=r"writable by other users.*KVCACHE_TIER_SECRET_FILE"):
        DiskTier(shared, 8)
    assert DiskTier(shared, 8, seal=KEYED).seal.authenticated
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    tier = DiskTier(shared, 8)  # the secret from the environment
    tier.store(key(1), block(1))
    assert same_bits(DiskTier(shared, 8, seal=KEYED).load(key(1)), block(1))
    assert oct(DiskTier(tmp_path / "new", 8).root.stat().st_mode & 0o777) == "0o700"


# ---- the pod tier ------------------------------------------------------------------------------


def test_values_planted_in_redis_are_refused_and_the_secret_never_reaches_it() -> None:
    with start_redis() as server:
        writer = IcmsTier(RedisBackend(server.url, 100), 0, write_behind_blocks=1, seal=KEYED)
        reader = IcmsTier(RedisBackend(server.url, 100), 1, seal=KEYED)
        for i in range(3):
            writer.store(key(i), block(i))
        assert all(same_bits(b, block(i)) for i, b in enumerate(reader.load_many([key(0), key(1)])))
        raw = redis.Redis.from_url(server.url)
        prefix = b"kvcache:icms:"
        raw.set(prefix + LAYOUT.digest + key(0).key, b"\0\0\0\0" + forged(key(0), Seal.checksum()))
        raw.set(prefix + LAYOUT.digest + key(1).key, b"\x07\0\0\0" + forged(key(1), ATTACKER))
        raw.set(prefix + LAYOUT.digest + key(9).key, b"\0\0\0\0" + forged(key(9), Seal.checksum()))
        assert reader.load_many([key(0), key(1), key(9), key(2)])[:3] == [None, None, None]
        s = reader.stats
        assert (s.hits, s.corrupt) == (2 + 1, 3)
        values = [raw.get(k) or b"" for k in raw.scan_iter(b"*")]  # KEYS is refused: an admin command
        assert values and not any(SECRET in v or KEYED._mac_key in v for v in values)


def test_a_shared_backend_without_a_secret_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvcache.tiers.icms"):
        IcmsTier(InProcessBackend(8))
        assert caplog.text == ""  # in-process: nobody else can write it
        tier = IcmsTier(RedisBackend("redis://127.0.0.1:1", 8))
    assert "checksummed, not authenticated" in caplog.text and not tier.seal.authenticated
    assert IcmsTier(RedisBackend("redis://127.0.0.1:1", 8), seal=KEYED).seal.authenticated


def test_a_version_1_value_in_the_pod_tier_is_a_counted_miss() -> None:
    backend = InProcessBackend(8)
    backend.put_many([(LAYOUT.digest + key(1).key, b"\0\0\0\0" + version_1(key(1), block(1)))])
    tier = IcmsTier(backend)
    assert tier.load(key(1)) is None and (tier.stats.misses, tier.stats.corrupt) == (1, 1)


# ---- provisioning the secret -------------------------------------------------------------------


def test_secret_from_an_owner_only_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    assert secret_from_environment({SECRET_FILE_ENV: str(path)}) == SECRET
    assert secret_from_environment({SECRET_ENV: SECRET.decode()}) == SECRET
    assert secret_from_environment({}) is None
    path.chmod(0o640)
    with pytest.raises(TierError, match=r"mode -rw-r-----.*chmod 600"):
        secret_from_environment({SECRET_FILE_ENV: str(path)})
    with pytest.raises(TierError, match="set one of them"):
        secret_from_environment({SECRET_FILE_ENV: str(path), SECRET_ENV: "x" * 32})
    with pytest.raises(TierError, match="cannot be opened"):
        secret_from_environment({SECRET_FILE_ENV: str(tmp_path / "missing")})
    link = tmp_path / "link"
    os.symlink(path, link)
    with pytest.raises(TierError, match="cannot be opened"):
        secret_from_environment({SECRET_FILE_ENV: str(link)})
    with pytest.raises(TierError, match="at least 16 bytes"):
        Seal.keyed(b"short")
    assert SECRET.decode() not in repr(KEYED) and "_mac_key" not in repr(KEYED)
    assert Seal.from_environment({SECRET_ENV: SECRET.decode()}) == KEYED
