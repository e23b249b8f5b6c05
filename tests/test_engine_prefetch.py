"""Tier prefetch in the engine: a waiting request's G3 / pod-tier blocks move to host memory on a
background thread, the load at admission then reads host memory, and nothing else changes."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from pathlib import Path

import pytest
import torch

from kvcache import ConfigError
from kvcache.engine import Engine, EngineConfig, RequestOutput, SamplingParams
from kvcache.kernels.dispatch import pack_blocks
from kvcache.model import hf
from kvcache.tiers import (
    BackendUnavailable,
    DiskTier,
    Hierarchy,
    HostTier,
    IcmsTier,
    InProcessBackend,
    LayoutFingerprint,
    TierKey,
)

BS = 16
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def loaded() -> hf.LoadedModel:
    return hf.load_model("tiny-llama", device="cpu", dtype=torch.float32)


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(1, 1024, (n,), generator=g).tolist())


def spilled_blocks(
    loaded: hf.LoadedModel, tokens: list[int], scope: str
) -> list[tuple[TierKey, torch.Tensor]]:
    """The full prompt blocks of ``tokens`` as another engine computed them (a tier's content)."""
    engine = Engine(loaded, EngineConfig(num_blocks=64, block_size=BS))
    engine.generate(tokens, scope, max_new_tokens=1)
    keys = engine.manager.hash(tokens, scope).keys
    ids = torch.tensor([engine.manager.pool.index[k] for k in keys])
    packed = pack_blocks(engine.pool, ids)  # [n, L, 2, bs, H, D]
    return [(TierKey(k, engine.layout), b.clone()) for k, b in zip(keys, packed, strict=True)]


def on_disk(loaded: hf.LoadedModel, root: Path, tokens: list[int], scope: str) -> None:
    disk = DiskTier(root, 256)
    for key, block in spilled_blocks(loaded, tokens, scope):
        disk.store(key, block)


class GatedDisk(DiskTier):
    """A disk tier whose reads from threads other than the test's can fail or wait for a signal."""

    def __init__(self, root: Path, capacity: int, fail: bool = False) -> None:
        super().__init__(root, capacity)
        self.fail = fail
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.proceed.set()
        self.main = threading.current_thread()

    def load_many(
        self, keys: Sequence[TierKey], outs: Sequence[torch.Tensor | None] | None = None
    ) -> list[torch.Tensor | None]:
        if threading.current_thread() is not self.main:
            self.entered.set()
            assert self.proceed.wait(30)
            if self.fail:
                raise OSError("I/O error on the prefetch thread")
        return super().load_many(keys, outs)


def make(
    loaded: hf.LoadedModel, root: Path, prefetch: bool | None, host: int = 32, disk: DiskTier | None = None
) -> Engine:
    def tiers(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [HostTier(layout, host, pin=False), disk or DiskTier(root, 256)])

    return Engine(loaded, EngineConfig(num_blocks=32, block_size=BS, tiers=tiers, prefetch=prefetch))


def run(
    engine: Engine, tokens: list[int], scope: str, wait: bool = True
) -> tuple[list[int], torch.Tensor, int]:
    """Queue, let the prefetch finish (as if the engine were busy meanwhile), then run."""
    rid = engine.add_request(tokens, scope, SamplingParams(max_tokens=4), keep_logits=True)
    seq = engine.sequence(rid)
    if wait and engine.prefetcher is not None:
        assert engine.prefetcher.wait_idle(30)
    while not seq.is_finished:
        engine.step()
    return seq.output_tokens, torch.stack(seq.logits), int(seq.timings.get("tier_tokens", 0))


def take(
    outs: list[RequestOutput], got: dict[Hashable, list[int]], reasons: dict[Hashable, str | None]
) -> None:
    for o in outs:
        if o.step is not None:
            got.setdefault(o.request_id, []).append(o.step.token_id)
        if o.finished:
            reasons[o.request_id] = o.finish_reason


def check_clean(engine: Engine) -> None:
    engine.manager.check_invariants()
    assert engine.tiers is not None
    g2 = engine.tiers.tiers[0]
    assert isinstance(g2, HostTier)
    g2.table.check_invariants()
    if engine.prefetcher is not None:
        assert engine.prefetcher.wait_idle(30)
        assert engine.prefetcher.pending() == [] and engine.prefetcher.stats().reserved_blocks == 0


def test_disk_blocks_load_from_host_memory_after_prefetch_with_identical_logits(
    loaded: hf.LoadedModel, tmp_path: Path
) -> None:
    a = toks(1, 100)  # 6 full blocks on disk
    on_disk(loaded, tmp_path, a, "t")
    results = []
    for prefetch in (False, True):
        engine = make(loaded, tmp_path, prefetch)
        results.append(run(engine, a, "t"))
        assert engine.tiers is not None
        s = engine.tiers.stats()
        g2, g3 = s.tiers["G2"], s.tiers["G3"]
        assert g3.blocks_out == 6  # each block is read from disk once: by the prefetch, or at admission
        if prefetch:
            assert (g2.hits, g2.blocks_in) == (6, 6)  # the admission load read host memory only
            p = engine.prefetch_stats()
            assert (p.requests, p.blocks, p.hits, p.wasted, p.errors) == (1, 6, 6, 0, 0)
            assert p.bytes == 6 * engine.layout.block_nbytes
        else:
            assert g2.hits == 0 and g2.blocks_in == 6  # promoted on the way, after the load
            assert engine.prefetcher is None and engine.prefetch_stats().blocks == 0
        check_clean(engine)
    (off_tokens, off_logits, off_loaded), (on_tokens, on_logits, on_loaded) = results
    assert off_loaded == on_loaded == 96
    assert off_tokens == on_tokens
    assert torch.equal(off_logits, on_logits)


def test_pod_tier_blocks_are_verified_into_host_memory(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    a = toks(2, 100)
    backend = InProcessBackend(64)
    writer = IcmsTier(backend, worker_id=1, write_behind_blocks=1)
    for key, block in spilled_blocks(loaded, a, "t"):
        writer.store(key, block)
    icms = IcmsTier(backend, worker_id=0)

    def tiers(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [HostTier(layout, 32, pin=False), icms])

    engine = Engine(loaded, EngineConfig(num_blocks=32, block_size=BS, tiers=tiers))
    assert engine.prefetcher is not None  # on by default: host memory over a lower tier
    _, _, loaded_tokens = run(engine, a, "t")
    assert loaded_tokens == 96
    s = icms.stats
    assert (s.hits, s.blocks_out, s.cross_worker_hits, s.prestaged_loads) == (6, 6, 6, 0)
    assert engine.prefetch_stats().hits == 6
    check_clean(engine)


def test_abort_while_a_chunk_is_in_flight_leaks_nothing(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    a = toks(3, 100)
    on_disk(loaded, tmp_path, a, "t")
    disk = GatedDisk(tmp_path, 256)
    disk.proceed.clear()
    engine = make(loaded, tmp_path, True, disk=disk)
    rid = engine.add_request(a, "t", SamplingParams(max_tokens=2))
    assert disk.entered.wait(30)  # the worker holds the tier lock, inside its first chunk
    aborter = threading.Thread(target=engine.abort, args=(rid,))
    aborter.start()  # waits for the chunk in progress, then cancels the job
    disk.proceed.set()
    aborter.join(30)
    assert not aborter.is_alive()
    check_clean(engine)
    p = engine.prefetch_stats()
    assert p.cancelled == 1 and p.hits == 0
    assert p.blocks in (4, 6) and p.wasted == p.blocks  # one or both chunks, kept as cached G2 blocks
    assert engine.tiers is not None and len(engine.tiers.tiers[0]) == p.blocks
    # The kept blocks are ordinary G2 blocks: the same prompt now loads them all.
    tokens, _, loaded_tokens = run(engine, a, "t")
    assert loaded_tokens == 96 and len(tokens) == 4
    check_clean(engine)


def test_request_ended_by_the_scheduler_has_its_job_cancelled_at_the_next_step(
    loaded: hf.LoadedModel, tmp_path: Path
) -> None:
    a = toks(4, 100)
    on_disk(loaded, tmp_path, a, "t")
    engine = make(loaded, tmp_path, True)
    rid = engine.add_request(a, "t", SamplingParams(max_tokens=2))
    engine.scheduler.abort(engine.sequence(rid))  # as a closed stream does, without Engine.abort
    assert engine.prefetcher is not None and engine.prefetcher.pending() == [rid]
    engine.step()  # the step notices and cancels the job
    check_clean(engine)
    assert engine.prefetch_stats().cancelled == 1


def test_failing_tier_on_the_prefetch_thread_falls_back_to_the_normal_load(
    loaded: hf.LoadedModel, tmp_path: Path
) -> None:
    a = toks(6, 100)
    on_disk(loaded, tmp_path, a, "t")
    reference = run(make(loaded, tmp_path / "none", False), a, "t")  # recomputed, nothing on that disk
    engine = make(loaded, tmp_path, True, disk=GatedDisk(tmp_path, 256, fail=True))
    tokens, logits, loaded_tokens = run(engine, a, "t")
    p = engine.prefetch_stats()
    assert (p.errors, p.blocks, p.hits) == (1, 0, 0)
    assert loaded_tokens == 96  # the admission load read the disk itself
    assert tokens == reference[0]
    torch.testing.assert_close(logits, reference[1], atol=1e-4, rtol=1e-4)  # loaded vs recomputed
    check_clean(engine)


def test_corrupt_block_ends_the_prefetch_and_the_load_at_the_same_place(
    loaded: hf.LoadedModel, tmp_path: Path
) -> None:
    a = toks(7, 100)
    on_disk(loaded, tmp_path, a, "t")
    engine = make(loaded, tmp_path, True)
    assert engine.tiers is not None
    disk = engine.tiers.tiers[1]
    assert isinstance(disk, DiskTier)
    third = TierKey(engine.manager.hash(a, "t").keys[2], engine.layout)
    with open(disk.path(third), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    _, _, loaded_tokens = run(engine, a, "t")
    p = engine.prefetch_stats()
    # Chunk 1 = blocks 0-3: block 2 fails its checksum, 0, 1 and 3 move up; the prefix ends at 2.
    assert (p.blocks, p.errors, p.hits, p.wasted) == (3, 1, 2, 1)
    assert loaded_tokens == 32 and disk.stats.corrupt == 1
    check_clean(engine)


def test_pod_tier_down_on_the_prefetch_thread_is_counted(loaded: hf.LoadedModel) -> None:
    a = toks(8, 100)
    backend = InProcessBackend(64)
    writer = IcmsTier(backend, worker_id=1, write_behind_blocks=1)
    for key, block in spilled_blocks(loaded, a, "t"):
        writer.store(key, block)
    main = threading.current_thread()
    real_get = backend.get_many

    def get_many(names: Sequence[bytes]) -> list[bytes | None]:
        if threading.current_thread() is not main:
            raise BackendUnavailable("connection refused")
        return real_get(names)

    backend.get_many = get_many  # type: ignore[method-assign]
    icms = IcmsTier(backend, worker_id=0, retry_after_s=0.0)

    def tiers(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [HostTier(layout, 32, pin=False), icms])

    engine = Engine(loaded, EngineConfig(num_blocks=32, block_size=BS, tiers=tiers))
    _, _, loaded_tokens = run(engine, a, "t")
    assert engine.prefetch_stats().errors == 4  # the first chunk's blocks; the job stops there
    assert icms.stats.errors >= 1
    assert loaded_tokens == 96  # at admission the backend answers again
    check_clean(engine)


def test_cap_limits_reserved_blocks(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    a, b = toks(9, 100), toks(10, 100)
    on_disk(loaded, tmp_path, a, "t")
    on_disk(loaded, tmp_path, b, "t")

    def tiers(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [HostTier(layout, 32, pin=False), DiskTier(tmp_path, 256)])

    engine = Engine(loaded, EngineConfig(num_blocks=32, block_size=BS, tiers=tiers, prefetch_max_blocks=8))
    assert engine.prefetcher is not None
    engine.add_request(a, "t", SamplingParams(max_tokens=1))
    engine.add_request(b, "t", SamplingParams(max_tokens=1))
    assert engine.prefetcher.wait_idle(30)
    p = engine.prefetch_stats()
    assert (p.requests, p.blocks, p.capped_blocks, p.reserved_blocks) == (2, 8, 4, 8)
    while engine.has_unfinished():
        engine.step()
    p = engine.prefetch_stats()
    assert (p.hits, p.wasted, p.reserved_blocks) == (8, 0, 0)
    check_clean(engine)


def test_concurrent_requests_match_the_engine_without_prefetch(
    loaded: hf.LoadedModel, tmp_path: Path
) -> None:
    """Many requests arriving while others run, a small host tier that prefetch keeps filling
    (demoting to disk), prefixes shared between requests: the same tokens as without prefetch."""
    prompts = [toks(20 + i, 60 + 16 * (i % 4)) for i in range(4)]
    for p in prompts:
        on_disk(loaded, tmp_path, p, "t")
    requests = [p + toks(40 + i, 9) for i, p in enumerate(prompts * 3)]
    outputs = []
    for prefetch in (False, True):
        engine = make(loaded, tmp_path, prefetch, host=12)
        got: dict[Hashable, list[int]] = {}
        reasons: dict[Hashable, str | None] = {}
        rids = []
        for i, tokens in enumerate(requests):
            rids.append(engine.add_request(tokens, "t", SamplingParams(max_tokens=3)))
            if i % 3 == 2:
                take(
                    engine.step(), got, reasons
                )  # arrivals interleave with steps and with the prefetch thread
        while engine.has_unfinished():
            take(engine.step(), got, reasons)
        outputs.append([got[r] for r in rids])
        assert all(reasons[r] == "length" for r in rids)
        check_clean(engine)
        if prefetch:
            stats = engine.prefetch_stats()
            assert stats.requests >= 1 and stats.errors == 0 and stats.hits + stats.wasted == stats.blocks
    assert outputs[0] == outputs[1]


def test_hierarchy_lock_keeps_tiers_consistent_under_threads(tmp_path: Path) -> None:
    layout = LayoutFingerprint("m", "float32", num_layers=2, kv_heads=2, head_dim=8, block_size=4)
    g2, g3 = HostTier(layout, 8, pin=False), DiskTier(tmp_path, 64)
    h = Hierarchy(layout, [g2, g3])
    keys = [bytes([i]) * 16 for i in range(40)]
    blocks = {k: torch.full(layout.block_shape, float(i)) for i, k in enumerate(keys)}
    h.store(keys, torch.stack([blocks[k] for k in keys]))  # 8 in G2, the rest demoted to G3
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(60):
                i = int(torch.randint(0, 36, (1,), generator=g))
                part = keys[i : i + 4]
                if seed % 2:
                    h.promote(part)
                else:
                    got = h.load(part)
                    for k, b in zip(part, got, strict=False):
                        assert torch.equal(b, blocks[k])
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    g2.table.check_invariants()
    assert len(g2) == 8 and h.lookup_prefix(keys) == 40  # nothing lost: G2 overflow went to G3
    assert all(torch.equal(b, blocks[k]) for k, b in zip(keys, h.load(keys), strict=True))


def test_prefetch_switch(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    def host_only(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [HostTier(layout, 8, pin=False)])

    assert Engine(loaded, EngineConfig(num_blocks=8, block_size=BS, tiers=host_only)).prefetcher is None
    assert make(loaded, tmp_path, None).prefetcher is not None
    assert make(loaded, tmp_path, False).prefetcher is None
    with pytest.raises(ConfigError, match="first tier is a HostTier"):
        Engine(loaded, EngineConfig(num_blocks=8, block_size=BS, tiers=host_only, prefetch=True))
    with pytest.raises(ConfigError, match="prefetch_max_blocks"):
        EngineConfig(prefetch_max_blocks=0)
    engine = make(loaded, tmp_path, True)
    engine.close()
    assert engine.prefetcher is None and engine.generate(toks(11, 40), "t", max_new_tokens=1)
