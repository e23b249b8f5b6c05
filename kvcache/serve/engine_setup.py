"""Build a worker's engine: the HF engine with the deployment's tenancy rules and the pod tier.

The server config's k-anonymity and per-tenant quotas apply to every worker's block manager;
``load_engine`` gives the engine a manager configured with them (same pool size, block size
and model id, so keys are unchanged). With a Redis URL the engine also gets the pod tier
(blocks shared by every worker through Redis); ``tier_names`` lists the engine's tiers below the
device pool, in lookup order, for the per-tier metrics.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

from kvcache.manager import BlockManager
from kvcache.serve.config import ServeConfig


def apply_tenancy(engine: Any, config: ServeConfig) -> None:
    """Swap in a block manager with ``config``'s k-anonymity and quotas (before any request)."""
    manager: BlockManager = engine.manager
    assert manager.num_running == 0, "tenancy must be applied before the engine serves"
    quotas = config.quotas()
    if config.k_anonymity == manager.config.k_anonymity and not quotas:
        return
    cache_config = dataclasses.replace(manager.config, k_anonymity=config.k_anonymity, quotas=quotas)
    engine.manager = BlockManager(cache_config)
    if getattr(engine, "tiers", None) is not None:  # the engine's write-back of evicted blocks
        engine.manager.set_evict_hook(engine.tiers.evict_hook(engine.pool))


def load_engine(model: str, config: ServeConfig, *, num_blocks: int, block_size: int, threads: int,
                seed: int, redis_url: str | None, worker_id: str = "",
                pod_capacity_blocks: int = 1 << 20) -> tuple[Any, tuple[str, ...]]:  # fmt: skip
    import torch

    from kvcache.engine import EngineConfig
    from kvcache.serve.podtier import POD, PodTieredEngine

    torch.set_num_threads(threads)
    tiers = None
    if redis_url is not None:
        index = zlib.crc32(worker_id.encode()) & 0xFFFF
        tiers = PodTieredEngine.pod_tier(redis_url, pod_capacity_blocks, index)
    engine_config = EngineConfig(num_blocks=num_blocks, block_size=block_size, seed=seed, tiers=tiers)
    engine = PodTieredEngine.load(model, engine_config)
    apply_tenancy(engine, config)
    return engine, (POD,) if redis_url is not None else ()
