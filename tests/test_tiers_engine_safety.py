"""The engine over spill tiers that cannot be trusted to hold what was written: a full disk, KV of
other weights under the same model name, and blocks planted in a shared tier. Each ends in a
recomputation and the same answer as a fresh engine, never a failed request or wrong output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvcache.child import python_argv
from kvcache.engine import Engine, EngineConfig
from kvcache.model import hf
from kvcache.tiers import DiskTier, Hierarchy, IcmsTier, InProcessBackend, LayoutFingerprint, TierKey, codec

BS = 16
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1024, (n,), generator=g).tolist()  # type: ignore[no-any-return]


def disk_only(root: Path) -> Callable[[LayoutFingerprint], Hierarchy]:
    def build(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [DiskTier(root, 64)])

    return build


DISK_FULL = """
import json, resource, sys, torch
torch.set_num_threads(1)
from kvcache.model import hf
from kvcache.engine import Engine, EngineConfig
from kvcache.tiers import DiskTier, Hierarchy, HostTier

def toks(seed, n):
    return torch.randint(1, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

loaded = hf.load_model("tiny-llama", device="cpu", dtype=torch.float32)
a, b, c = toks(1, 100), toks(2, 120), toks(3, 120)
fresh = Engine(loaded, EngineConfig(num_blocks=16, block_size=16))
want = fresh.generate(a, "t", max_new_tokens=4).output_tokens
build = lambda layout: Hierarchy(layout, [HostTier(layout, 2, pin=False), DiskTier(sys.argv[1], 64)])
engine = Engine(loaded, EngineConfig(num_blocks=8, block_size=16, tiers=build))
engine.generate(a, "t", max_new_tokens=1)
engine.generate(b, "t", max_new_tokens=1)  # a's 6 blocks: 2 stay in G2, 4 go down to G3
engine.generate(c, "t", max_new_tokens=1)  # b's blocks into G2: all of a's are in G3 now
before = engine.tiers.stats().tiers["G3"].blocks_in
limit = 4096  # smaller than one block file: every later G3 write fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
# c's blocks go to G2, which demotes into the full G3; a's 6 blocks load from G3 and are
# promoted into G2, which demotes again: every demotion fails with EFBIG
got = engine.generate(a, "t", max_new_tokens=4)
g3 = engine.tiers.stats().tiers["G3"]
print(json.dumps({"same": got.output_tokens == want, "cached": got.cached_tokens,
                  "g3_before": before, "dropped": g3.dropped_stores, "blocks_in": g3.blocks_in}))
"""


def test_disk_full_during_generate_is_a_counted_drop(tmp_path: Path) -> None:
    """Under RLIMIT_FSIZE (EFBIG on every G3 write), in a subprocess so the limit binds nothing else."""
    run = subprocess.run(
        [*python_argv(), "-c", DISK_FULL, str(tmp_path / "g3")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["same"] and got["cached"] == 96  # every block of a came back from G2 or G3
    assert got["g3_before"] == got["blocks_in"] >= 6  # nothing written after the limit
    assert got["dropped"] >= 6


def test_kv_of_other_weights_under_the_same_model_id_is_never_a_hit(tmp_path: Path) -> None:
    """G3 written by ``tiny`` seed 0 and read by ``tiny`` seed 1: same model id, shape and dtype."""
    seed0 = hf.load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    seed1 = hf.load_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    assert seed0.model_id == seed1.model_id and seed0.weights_digest != seed1.weights_digest
    a = toks(1, 100)
    writer = Engine(seed0, EngineConfig(num_blocks=8, block_size=BS, tiers=disk_only(tmp_path)))
    writer.generate(a, "t", max_new_tokens=1)
    writer.generate(toks(2, 120), "t", max_new_tokens=1)  # a's 6 full blocks go down to G3
    assert writer.tiers is not None and writer.tiers.stats().tiers["G3"].blocks_in >= 6

    reader = Engine(seed1, EngineConfig(num_blocks=8, block_size=BS, tiers=disk_only(tmp_path)))
    got = reader.generate(a, "t", max_new_tokens=4)
    fresh = Engine(seed1, EngineConfig(num_blocks=16, block_size=BS)).generate(a, "t", max_new_tokens=4)
    assert got.cached_tokens == 0 and got.output_tokens == fresh.output_tokens
    assert reader.tiers is not None and reader.tiers.stats().blocks_loaded == 0

    again = Engine(seed0, EngineConfig(num_blocks=8, block_size=BS, tiers=disk_only(tmp_path)))
    assert again.score(a, "t")[1] == 96  # positive control: the same weights do hit


def test_weights_digest_is_computed_once_at_load_and_names_the_weights() -> None:
    one = hf.load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    assert one.weights_digest == hf.weights_digest(one.model) and len(one.weights_digest) == 16
    twin = hf.load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    assert twin.weights_digest == one.weights_digest
    with torch.no_grad():
        next(iter(one.model.parameters())).view(-1)[0] += 1.0  # one weight changed: another name
    assert hf.weights_digest(one.model) != one.weights_digest
    layout = LayoutFingerprint("tiny-llama", "float32", 2, 2, 16, BS, weights=b"\x01" * 16)
    other = LayoutFingerprint("tiny-llama", "float32", 2, 2, 16, BS, weights=b"\x02" * 16)
    assert layout != other and layout.digest != other.digest


def test_planted_kv_in_the_shared_tier_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever can write the pod tier's backend overwrites a tenant's blocks with zeros sealed with a
    recomputed checksum, or with a MAC under another secret: with the deployment secret the engine
    refuses every one, recomputes, and answers as a fresh engine does."""
    from kvcache.tiers.seal import Seal

    monkeypatch.setenv("KVCACHE_TIER_SECRET", "deployment secret of this pod, 32b")
    loaded = hf.load_model("tiny-llama", device="cpu", dtype=torch.float32)
    backend = InProcessBackend(256)

    def pod(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [IcmsTier(backend, worker_id=0, write_behind_blocks=1)])

    a = toks(7, 300)  # 18 full blocks
    victim = Engine(loaded, EngineConfig(num_blocks=24, block_size=BS, tiers=pod))
    victim.generate(a, "acme", max_new_tokens=1)
    for seed in (8, 9):  # acme's 18 blocks of ``a`` go down to the pod tier
        victim.generate(toks(seed, 300), "acme", max_new_tokens=1)
    control = Engine(loaded, EngineConfig(num_blocks=24, block_size=BS, tiers=pod))
    assert control.score(a, "acme")[1] == 18 * BS  # untouched, the pod tier serves all 18 blocks
    layout = victim.layout
    names = list(backend._values)
    for seal in (Seal.checksum(), Seal.keyed(b"a secret the attacker chose....")):
        for name in names:  # every block the tier holds, rewritten as zeros that pass `seal`
            key = TierKey(name[16:], layout)
            forged = b"\0\0\0\0" + codec.encode(key, torch.zeros(layout.block_shape), seal)
            backend.put_many([(name, forged)])
        reader = Engine(loaded, EngineConfig(num_blocks=24, block_size=BS, tiers=pod))
        got = reader.generate(a, "acme", max_new_tokens=4)
        plain = Engine(loaded, EngineConfig(num_blocks=24, block_size=BS))
        fresh = plain.generate(a, "acme", max_new_tokens=4)
        assert reader.tiers is not None
        icms = reader.tiers.stats().tiers["ICMS"]
        assert got.cached_tokens == 0 and got.output_tokens == fresh.output_tokens
        assert icms.hits == 0 and icms.corrupt >= 1
