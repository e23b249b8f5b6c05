"""Build a worker's engine: the HF engine with the deployment's tenancy rules and the pod tier.

Block hashes are keyed with the deployment's ``block_key`` (``auth``). The server config's
k-anonymity and per-tenant quotas apply to every worker's block manager
(through ``EngineConfig``). With a Redis URL the engine also gets the pod tier
(blocks shared by every worker through Redis); ``tier_names`` lists the engine's tiers below the
device pool, in lookup order, for the per-tier metrics.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from kvcache.costs import ENGINE_MAX_NUM_SEQS
from kvcache.errors import ConfigError
from kvcache.serve.config import ServeConfig

if TYPE_CHECKING:
    from kvcache.engine import Engine


def load_engine(
    model: str,
    config: ServeConfig,
    *,
    num_blocks: int,
    block_size: int,
    threads: int,
    seed: int,
    redis_url: str | None,
    worker_id: str = "",
    pod_capacity_blocks: int = 1 << 20,
    deployment_key: bytes | None = None,
    tier_secret: bytes | None = None,
    dtype: str | None = None,
    device: str | None = None,
    max_num_seqs: int = ENGINE_MAX_NUM_SEQS,
) -> tuple[Engine, tuple[str, ...]]:
    import torch

    from kvcache.engine import EngineConfig
    from kvcache.serve.podtier import POD, PodTieredEngine

    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as exc:
            raise ConfigError(f"--device {device!r} is not a torch device: {exc}") from exc
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}, but torch sees no CUDA device here; use --device cpu")
    torch.set_num_threads(threads)
    tiers = None
    if redis_url is not None:
        index = zlib.crc32(worker_id.encode()) & 0xFFFF
        tiers = PodTieredEngine.pod_tier(redis_url, pod_capacity_blocks, index, tier_secret)
    engine_config = EngineConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        seed=seed,
        tiers=tiers,
        dtype=dtype,
        device=device,
        k_anonymity=config.k_anonymity,
        quotas=config.quotas(),
        deployment_key=deployment_key,
        max_num_seqs=max_num_seqs,
    )
    engine = PodTieredEngine.load(model, engine_config)
    return engine, (POD,) if redis_url is not None else ()
