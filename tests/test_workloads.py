"""Synthetic workloads: seeded, exactly sized, time ordered, with the reuse each workload promises;
every one a list of the replay's ``TraceRequest``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from kvcache import ConfigError
from kvcache.costs import LatencyModel
from kvcache.lab.trace import (
    FORMAT_MOONCAKE,
    Trace,
    offered_load,
    prompt_text,
    read_trace,
    scale_to_load,
    to_block_ids,
    write_trace,
)
from kvcache.lab.workloads import (
    SHAPES,
    ShapeConfig,
    SynthConfig,
    multi_turn_chat,
    persistent_agents,
    synthesize,
    synthesize_shape,
    system_prompt,
)


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


def test_chat_sessions_in_turn_order_extend_their_history() -> None:
    reqs = multi_turn_chat(
        num_tenants=2, sessions_per_tenant=2, turns=3, system_prompt_tokens=32, user_tokens=8, output_tokens=4
    )
    assert [(r.tenant, r.session) for r in reqs[:5]] == [
        ("tenant0", "t0s0"),
        ("tenant0", "t0s1"),
        ("tenant1", "t1s0"),
        ("tenant1", "t1s1"),
        ("tenant0", "t0s0"),
    ]
    # each turn: the history, a user message of 8 tokens; the 4-token reply joins the next turn
    assert [r.num_tokens for r in reqs] == [40] * 4 + [52] * 4 + [64] * 4
    assert {r.timestamp_ms for r in reqs} == {0.0} and {r.output_tokens for r in reqs} == {4}
    system = system_prompt(system_prompt_tokens=32)
    assert all(r.tokens is not None and r.tokens[:32] == tuple(system) for r in reqs)
    first, second = reqs[0].tokens, reqs[4].tokens
    assert first is not None and second is not None and second[:40] == first
    private = multi_turn_chat(num_tenants=2, sessions_per_tenant=1, turns=1, shared_system_prompt=False)
    assert private[0].tokens is not None and private[1].tokens is not None
    assert private[0].tokens[:256] != private[1].tokens[:256]
    assert multi_turn_chat(seed=1) != multi_turn_chat(seed=0) == multi_turn_chat(seed=0)


def test_agents_share_the_system_prompt_their_tenant_document_and_their_history() -> None:
    reqs = persistent_agents(
        num_tenants=2,
        sessions_per_tenant=2,
        turns=3,
        system_words=64,
        document_words=(20, 40),
        question_words=5,
        answer_words=6,
        seed=3,
    )
    assert len(reqs) == 12
    # Turn order, round robin over the sessions, all at time 0.
    assert [r.session for r in reqs[:5]] == ["t0s0", "t0s1", "t1s0", "t1s1", "t0s0"]
    assert {r.timestamp_ms for r in reqs} == {0.0}
    prompts = [prompt_text(r) for r in reqs]
    assert [r.num_tokens for r in reqs] == [len(p.encode()) for p in prompts]
    system = prompts[0].split("\n\nPrivate document")[0]
    assert system.startswith("You are an agent.") and system.count("\n- tool_") == 4
    assert all(
        p.startswith(system + "\n\nPrivate document of " + r.tenant)
        for r, p in zip(reqs, prompts, strict=True)
    )
    doc = {r.tenant: p.split("\n\n")[1] for r, p in zip(reqs, prompts, strict=True)}
    assert doc["tenant0"] != doc["tenant1"]
    assert all(20 <= len(d.split()) - 4 <= 40 for d in doc.values())  # "Private document of tenantN:"
    # Each turn's prompt extends the session's previous one by the scripted answer and a question.
    by_session = {
        s: [p for r, p in zip(reqs, prompts, strict=True) if r.session == s] for s in ("t0s0", "t1s1")
    }
    for turns in by_session.values():
        for earlier, later in itertools.pairwise(turns):
            assert later.startswith(earlier + " ")
            assert later.endswith("?\nAssistant:")
    assert {r.output_tokens for r in reqs} == {32}
    again = persistent_agents(
        num_tenants=2,
        sessions_per_tenant=2,
        turns=3,
        system_words=64,
        document_words=(20, 40),
        question_words=5,
        answer_words=6,
        seed=3,
    )
    assert again == reqs
    assert persistent_agents(seed=4)[0].tokens != persistent_agents(seed=3)[0].tokens
    with pytest.raises(ConfigError, match=r"document_words=\(5, 4\)"):
        persistent_agents(document_words=(5, 4))


def test_an_agent_workload_written_as_a_trace_reads_back_the_same(tmp_path: Path) -> None:
    reqs = persistent_agents(num_tenants=1, sessions_per_tenant=2, turns=2, system_words=16, seed=5)
    write_trace(tmp_path / "agents.jsonl", reqs)
    assert read_trace(tmp_path / "agents.jsonl").requests == reqs


@pytest.mark.parametrize("shape", SHAPES)
def test_seeded_sized_ordered(shape: str) -> None:
    a = synthesize_shape(ShapeConfig(shape, 120, seed=1))
    assert len(a) == 120
    assert a == synthesize_shape(ShapeConfig(shape, 120, seed=1))
    assert a != synthesize_shape(ShapeConfig(shape, 120, seed=2))
    stamps = [r.timestamp_ms for r in a]
    assert stamps == sorted(stamps)
    for r in a:
        assert r.block_ids is not None and len(r.block_ids) == -(-r.num_tokens // 512)


def test_rag_structure() -> None:
    reqs = synthesize_shape(ShapeConfig("rag", 400, num_tenants=5, num_documents=50, seed=0))
    # Every request opens with its tenant's private system prompt (1-4 blocks), so at most
    # 5 distinct first blocks; documents (2-8 blocks each, 2-4 per request) follow.
    assert len({r.block_ids[0] for r in reqs if r.block_ids}) == 5
    for r in reqs:
        assert 1 + 4 <= len(r.block_ids or ()) <= 4 + 4 * 8 + 1
    # Random document order: some second-position blocks differ among same-first-block requests.
    assert len({r.block_ids[:5] for r in reqs if r.block_ids}) > 50


def test_long_agent_transcripts_grow() -> None:
    reqs = synthesize_shape(ShapeConfig("long_agent", 200, seed=0))
    assert max(r.num_tokens for r in reqs) > 32 * 1024
    assert max(r.num_tokens for r in reqs) <= 64 * 1024 + 5000
    # a step re-sends the previous step's whole prompt: most requests extend an earlier one
    seen: set[tuple[int, ...]] = set()
    extending = 0
    for r in reqs:
        ids = r.block_ids or ()
        extending += any(ids[:n] in seen for n in range(2, len(ids)))
        seen.add(ids[:-1])
    assert extending > len(reqs) // 2


def test_scale_to_load() -> None:
    lat = LatencyModel()
    reqs = synthesize_shape(ShapeConfig("rag", 300, seed=0))
    scaled = scale_to_load(reqs, 8, 0.5, lat)
    assert offered_load(scaled, 8, lat) == pytest.approx(0.5, rel=1e-3)
    assert [r.block_ids for r in scaled] == [r.block_ids for r in reqs]
    assert (
        Trace(scaled, FORMAT_MOONCAKE, 512).unique_blocks()
        == Trace(reqs, FORMAT_MOONCAKE, 512).unique_blocks()
    )
    with pytest.raises(ConfigError, match="load=0"):
        scale_to_load(reqs, 8, 0.0)


def test_bad_shape() -> None:
    with pytest.raises(ConfigError, match="shape='chat'"):
        ShapeConfig("chat")
    with pytest.raises(ConfigError, match="block_tokens=100"):
        ShapeConfig("rag", block_tokens=100)
