"""The one LRU map: use order, the bound, and what ``put`` and ``extend`` push out."""

from __future__ import annotations

import pytest

from kvcache.cache.lru import LRU
from kvcache.errors import ConfigError


def test_put_refreshes_and_evicts_the_least_recently_used() -> None:
    lru: LRU[str, int] = LRU(2)
    assert lru.put("a", 1) == [] and lru.put("b", 2) == []
    assert lru.touch("a") and not lru.touch("zz")
    assert lru.put("c", 3) == [("b", 2)]  # "a" was touched, so "b" is the oldest
    assert list(lru) == ["a", "c"] and lru.get("a") == 1 and "b" not in lru
    assert lru.put("a", 10) == [] and list(lru) == ["c", "a"] and lru.get("a") == 10


def test_extend_inserts_the_whole_batch_before_evicting() -> None:
    lru: LRU[int, None] = LRU(3)
    lru.put(0, None)
    # A batch of 4 over a bound of 3: the old key goes first, then the batch's oldest.
    assert lru.extend((k, None) for k in (1, 2, 3, 4)) == [(0, None), (1, None)]
    assert list(lru) == [2, 3, 4]
    # A key repeated in the batch is one entry, refreshed to its last position.
    assert lru.extend([(2, None), (5, None), (2, None)]) == [(3, None)]
    assert list(lru) == [4, 5, 2]


def test_unbounded_pop_and_pop_oldest() -> None:
    lru: LRU[str, str] = LRU()
    for k in "abc":
        assert lru.put(k, k.upper()) == []
    assert lru.pop("b") == "B" and lru.pop("b") is None
    assert lru.pop_oldest() == ("a", "A") and len(lru) == 1
    with pytest.raises(KeyError):
        LRU[str, str]().pop_oldest()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bound_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        LRU(bad)  # type: ignore[arg-type]
