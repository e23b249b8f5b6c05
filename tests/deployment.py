"""One deployment's keys for tests that build a front, a pool or a worker in-process."""

from __future__ import annotations

from kvcache.serve import auth
from kvcache.serve.wire import Registration

SECRET = bytes(range(32))
KEYS = auth.DeploymentKeys.from_secret(SECRET)


def registration(
    worker_id: str = "w0",
    url: str = "http://127.0.0.1:1",
    instance: str | None = None,
    *,
    model_id: str = "tiny",
    block_size: int = 16,
    num_blocks: int = 64,
    keys: auth.DeploymentKeys = KEYS,
) -> Registration:
    """A registration as a worker of ``keys``' deployment serving ``model_id`` writes it."""
    check = auth.key_check(keys.hasher(block_size=block_size, model_id=model_id, adapter_id=None))
    return Registration(
        worker_id, url, instance or f"inst-{worker_id}", 1, model_id, block_size, 256, None, num_blocks, check
    )
