"""Shared factories for the test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvcache import BlockManager, CacheConfig


@pytest.fixture
def make_manager() -> Callable[..., BlockManager]:
    """A manager with small blocks (4 tokens) so scenarios stay readable."""

    def make(
        num_blocks: int = 8, block_size: int = 4, vocab_size: int | None = 1000, **kw: Any
    ) -> BlockManager:
        return BlockManager(
            CacheConfig(num_blocks=num_blocks, block_size=block_size, vocab_size=vocab_size, **kw)
        )

    return make


def toks(start: int, n: int) -> list[int]:
    """``n`` consecutive token ids from ``start``: distinct prompts from distinct starts."""
    return list(range(start, start + n))


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module's tests: tiny models on a shared 2-core machine run
    many times faster on one thread than on two contending ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real default model (SmolLM2-135M-Instruct), float32 on CPU, loaded once per test session.

    Converted on first use into the model cache (``$KVCACHE_HOME`` or ``~/.cache/kvcache/models``),
    so a run after ``make demo`` or a previous run reuses the converted checkpoint. Fails loudly
    (ModelError naming the install command) when the weights package is missing."""
    import torch

    from kvcache.model import registry as models

    return models.load("smollm2-135m", device="cpu", dtype=torch.float32, show_progress=False)
