"""Tenant isolation: private by default, opt-in sharing, k-anonymity, quotas.

Each isolation check is paired with a same-scope hit as a positive control, so a test cannot
pass because nothing is ever cached.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import toks

from kvcache import BlockManager, InvalidTokensError, QuotaError, Scope, ScopeError, TenantQuota

MakeManager = Callable[..., BlockManager]


def test_private_by_default(make_manager: MakeManager) -> None:
    m = make_manager()
    a = m.allocate("a", toks(0, 9), "alice")
    assert m.lookup(toks(0, 9), "alice") == 8  # positive control
    assert m.lookup(toks(0, 9), "bob") == 0
    b = m.allocate("b", toks(0, 9), "bob")
    assert b.num_cached_tokens == 0
    assert not set(a.block_ids) & set(b.block_ids)
    # bob writing the same tokens did not overwrite alice's blocks
    m.free("a")
    assert m.allocate("a2", toks(0, 9), "alice").block_ids[:2] == a.block_ids[:2]
    m.check_invariants()


def test_public_prefix_is_shared_and_the_rest_stays_private(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16)
    system = toks(900, 8)  # 2 blocks
    assert m.publish(system) == 2
    a = m.allocate("a", system + toks(0, 5), "alice")
    b = m.allocate("b", system + toks(0, 5), "bob")
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]  # same private tokens, different scopes
    assert m.lookup(system + toks(0, 5), "alice") == 12  # positive control
    assert m.lookup(system + toks(0, 5), "carol") == 8  # only the public part
    assert {m.pool.blocks[i].scope for i in a.block_ids[:2]} == {"public"}
    assert m.pool.blocks[a.block_ids[2]].scope == "tenant:alice"
    m.check_invariants()


def test_private_prompt_outside_a_published_prefix_still_hits(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16)
    m.publish(toks(900, 8))  # a public prefix exists, but this prompt does not start with it
    m.allocate("a", toks(0, 9), "alice")
    m.free("a")
    assert m.lookup(toks(0, 9), "alice") == 8
    assert m.allocate("a2", toks(0, 9) + toks(50, 3), "alice").num_cached_tokens == 8
    assert m.lookup(toks(0, 9), "bob") == 0
    m.check_invariants()


def test_publish_after_hashing_rehashes_stale_prompts(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16)
    prompt = m.hash(toks(900, 8) + toks(0, 4), "alice")
    assert prompt.num_public_blocks == 0
    m.publish(toks(900, 8))
    a = m.allocate("a", prompt)
    assert m.pool.blocks[a.block_ids[0]].scope == "public"


def test_set_published_replaces_the_public_set(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=32)
    tools, docs = toks(900, 8), toks(700, 8)  # 2 blocks each
    assert m.set_published([tools, docs]) == [2, 2]
    m.allocate("a", tools + toks(0, 5), "alice")
    m.free("a")
    assert m.lookup(tools + toks(0, 5), "bob") == 8  # positive control: public for bob
    assert m.set_published([docs]) == [2]  # tools withdrawn
    assert m.lookup(tools + toks(0, 5), "bob") == 0  # bob now keys those tokens privately
    assert m.lookup(tools + toks(0, 5), "alice") == 0  # and so does alice: her old chain ran through public
    assert m.hash(docs + toks(0, 4), "bob").num_public_blocks == 2
    assert m.hash(tools + toks(0, 4), "bob").num_public_blocks == 0
    m.check_invariants()


def test_set_published_validates_every_prefix_first(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16)
    m.set_published([toks(900, 8)])
    with pytest.raises(InvalidTokensError):
        m.set_published([toks(0, 8), [1, 2, 10**6]])  # the second is past vocab_size
    assert m.hash(toks(900, 8) + toks(0, 4), "bob").num_public_blocks == 2  # unchanged
    assert m.hash(toks(0, 8), "bob").num_public_blocks == 0


def test_share_group(make_manager: MakeManager) -> None:
    m = make_manager()
    team = {"alice": Scope("alice", group="team"), "bob": Scope("bob", group="team")}
    m.allocate("a", toks(0, 9), team["alice"])
    assert m.lookup(toks(0, 9), team["bob"]) == 8
    assert m.lookup(toks(0, 9), "bob") == 0  # bob outside the group sees nothing
    assert m.lookup(toks(0, 9), Scope("carol", group="other")) == 0


def test_k_anonymity(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=32, k_anonymity=3)
    g = {t: Scope(t, group="g") for t in ("a", "b", "c", "d")}
    prompt = toks(0, 9)
    m.allocate("a1", prompt, g["a"])
    assert m.lookup(prompt, g["a"]) == 8  # a wrote it: no other tenant is revealed
    assert m.lookup(prompt, g["b"]) == 0  # 1 writer < k
    assert m.allocate("b1", prompt, g["b"]).num_cached_tokens == 0
    assert m.lookup(prompt, g["c"]) == 0  # 2 writers < k
    assert m.allocate("c1", prompt, g["c"]).num_cached_tokens == 0
    assert m.lookup(prompt, g["d"]) == 8  # 3 writers: a hit for everyone in the group
    assert m.allocate("d1", prompt, g["d"]).num_cached_tokens == 8
    assert m.lookup(prompt, g["b"]) == 8
    m.check_invariants()


def test_k_anonymity_with_k_1_is_plain_sharing(make_manager: MakeManager) -> None:
    m = make_manager(k_anonymity=1)
    m.allocate("a", toks(0, 9), Scope("a", group="g"))
    assert m.allocate("b", toks(0, 9), Scope("b", group="g")).num_cached_tokens == 8


def test_floor_protects_a_working_set_from_a_flood(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=8, quotas={"alice": TenantQuota(floor_blocks=2)})
    m.allocate("a", toks(0, 8), "alice")
    m.free("a")
    for i in range(10):  # mallory floods with fresh prompts
        m.allocate(f"m{i}", toks(100 + 10 * i, 8), "mallory")
        m.free(f"m{i}")
    assert m.lookup(toks(0, 8), "alice") == 8
    m.check_invariants()


def test_without_floor_a_flood_evicts(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=8)
    m.allocate("a", toks(0, 8), "alice")
    m.free("a")
    for i in range(10):
        m.allocate(f"m{i}", toks(100 + 10 * i, 8), "mallory")
        m.free(f"m{i}")
    assert m.lookup(toks(0, 8), "alice") == 0


def test_cap_evicts_own_blocks_first(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16, quotas={"mallory": TenantQuota(cap_blocks=4)})
    m.allocate("a", toks(0, 8), "alice")
    m.free("a")
    for i in range(6):
        m.allocate(f"m{i}", toks(100 + 10 * i, 8), "mallory")
        m.free(f"m{i}")
        assert m.stats().owned_blocks["mallory"] <= 4
    assert m.lookup(toks(0, 8), "alice") == 8
    m.allocate("m-big", toks(500, 16), "mallory")
    with pytest.raises(QuotaError, match="cap_blocks=4"):
        m.allocate("m-more", toks(600, 4), "mallory")
    m.check_invariants()


def test_scope_validation() -> None:
    with pytest.raises(ScopeError):
        Scope("")
    with pytest.raises(ScopeError):
        Scope("a", group="")
    assert Scope("a").chain_scope == "tenant:a"
    assert Scope("a", group="g").chain_scope == "group:g"


def test_a_salt_narrows_its_own_scope_and_never_names_another(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16)
    m.allocate("a", toks(0, 9), "alice")
    m.allocate("s", toks(0, 9), Scope("alice", salt="s"))
    assert m.lookup(toks(0, 9), Scope("alice", salt="s")) == 8  # positive control: its own sub-scope
    assert m.lookup(toks(0, 9), "alice") == 8
    # a salt spelling another tenant's name (or a chain scope) is still the caller's sub-scope
    assert m.lookup(toks(0, 9), Scope("mallory", salt="alice")) == 0
    assert m.lookup(toks(0, 9), Scope("mallory", salt="tenant:alice")) == 0
    assert m.lookup(toks(0, 9), Scope("alice", salt="t")) == 0
    m.check_invariants()


def test_a_salted_sub_scope_counts_against_its_tenants_quota(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16, quotas={"alice": TenantQuota(cap_blocks=4)})
    m.allocate("a", toks(0, 9), "alice")  # 3 blocks, held
    with pytest.raises(QuotaError, match="cap_blocks=4"):
        m.allocate("s", toks(0, 9), Scope("alice", salt="s"))
    m.check_invariants()


def test_salted_chain_scopes_are_distinct_from_every_other_scope() -> None:
    assert Scope("a", salt="s").chain_scope == "salted:8:tenant:a:s"
    assert Scope("a", group="g", salt="s").chain_scope == "salted:7:group:g:s"  # the group's sub-scope
    # the length prefix fixes where the tenant ends, so no tenant/salt pair spells another's
    assert Scope("a:b", salt="c").chain_scope != Scope("a", salt="b:c").chain_scope
    assert Scope("salted:8:tenant:a:s").chain_scope != Scope("a", salt="s").chain_scope
    for bad in ("", "x" * 257, 7):
        with pytest.raises(ScopeError, match="salt="):
            Scope("a", salt=bad)  # type: ignore[arg-type]
