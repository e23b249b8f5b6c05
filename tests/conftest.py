"""Shared factories for the test suite."""

from __future__ import annotations

from collections.abc import Callable
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
