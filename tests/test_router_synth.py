"""Synthetic traces: seeded, exactly sized, time ordered, with the reuse each workload promises."""

from __future__ import annotations

import itertools

import pytest

from kvcache import ConfigError
from kvcache.lab.synth import SynthConfig, synthesize
from kvcache.lab.trace import to_block_ids


def test_seeded_and_sized() -> None:
    a = synthesize(SynthConfig(num_requests=60, seed=3))
    assert len(a) == 60
    assert a == synthesize(SynthConfig(num_requests=60, seed=3))
    assert a != synthesize(SynthConfig(num_requests=60, seed=4))
    stamps = [r.timestamp_ms for r in a]
    assert stamps == sorted(stamps)
    assert {r.tenant for r in a} <= {f"tenant{i}" for i in range(4)}


def test_chat_turns_extend_history() -> None:
    reqs = synthesize(SynthConfig(workload="chat", num_requests=40, turns=3, seed=1))
    by_session: dict[str, list[tuple[int, ...]]] = {}
    for r in reqs:
        assert r.tokens is not None
        by_session.setdefault(r.session, []).append(r.tokens)
    grown = [s for s in by_session.values() if len(s) > 1]
    assert grown
    for turns in grown:
        for prev, cur in itertools.pairwise(turns):
            assert cur[: len(prev)] == prev and len(cur) > len(prev)


def test_shared_prefix_shares_first_block_only() -> None:
    reqs = to_block_ids(synthesize(SynthConfig(workload="shared_prefix", num_requests=30, seed=0)), 512)
    assert {r.block_ids[0] for r in reqs if r.block_ids} == {0}
    assert len({r.block_ids[2] for r in reqs if r.block_ids}) == 30


def test_docs_are_zipf_popular() -> None:
    reqs = to_block_ids(synthesize(SynthConfig(workload="docs", num_requests=80, num_system_prompts=1)), 512)
    heads = [r.block_ids[2] for r in reqs if r.block_ids]  # first document block
    top = max(heads.count(h) for h in set(heads))
    assert top >= 12 and len(set(heads)) >= 10  # a hot head (p(1) = 1/zeta(1.2) ~ 18%) and a tail


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="workload='x' is unknown"):
        SynthConfig(workload="x")
    with pytest.raises(ConfigError, match="num_requests=0 must be >= 1"):
        SynthConfig(num_requests=0)
