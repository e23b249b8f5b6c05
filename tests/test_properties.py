"""Properties over random operation sequences (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from kvcache import BlockManager, CacheConfig, CapacityError, Scope, TenantQuota

# Small alphabet and short prompts so that prefixes collide often and evictions happen.
prompts = st.lists(st.integers(0, 3), min_size=1, max_size=14)
tenants = st.sampled_from(["alice", "bob", "carol"])


class ManagerMachine(RuleBasedStateMachine):
    """Random allocate/append/free/lookup/publish; invariants after every step."""

    running = Bundle("running")

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(
            CacheConfig(
                num_blocks=12,
                block_size=2,
                vocab_size=8,
                k_anonymity=2,
                quotas={"alice": TenantQuota(floor_blocks=2), "bob": TenantQuota(cap_blocks=6)},
            )
        )
        self.next_id = 0
        self.tokens: dict[int, list[int]] = {}

    @rule(target=running, tokens=prompts, tenant=tenants, shared=st.booleans())
    def allocate(self, tokens: list[int], tenant: str, shared: bool) -> Any:
        scope = Scope(tenant, group="g" if shared else None)
        rid = self.next_id
        self.next_id += 1
        expected_hit = self.m.lookup(tokens, scope)
        try:
            a = self.m.allocate(rid, tokens, scope)
        except CapacityError:
            return None
        assert a.num_cached_tokens <= expected_hit
        assert a.num_cached_tokens < len(tokens)
        assert len(a.block_ids) == -(-len(tokens) // 2) == len(set(a.block_ids))
        self.tokens[rid] = list(tokens)
        return rid

    @rule(rid=running, tokens=st.lists(st.integers(0, 7), min_size=1, max_size=5))
    def append(self, rid: int | None, tokens: list[int]) -> None:
        if rid is None or rid not in self.tokens:
            return
        try:
            self.m.append(rid, tokens)
        except CapacityError:
            return
        self.tokens[rid] += tokens

    @rule(rid=consumes(running))
    def free(self, rid: int | None) -> None:
        if rid is not None and rid in self.tokens:
            self.m.free(rid)
            del self.tokens[rid]

    @rule(tokens=prompts, tenant=tenants)
    def lookup(self, tokens: list[int], tenant: str) -> None:
        hit = self.m.lookup(tokens, tenant)
        assert hit % 2 == 0 and hit <= len(tokens)

    @rule(tokens=prompts)
    def publish(self, tokens: list[int]) -> None:
        self.m.publish(tokens)

    @invariant()
    def consistent(self) -> None:
        self.m.check_invariants()
        pool = self.m.pool
        assert pool.num_used_blocks + pool.num_free_blocks == pool.num_blocks
        # a running request's full blocks hold exactly its tokens
        for rid, tokens in self.tokens.items():
            ids = self.m.block_ids(rid)
            assert len(ids) == -(-len(tokens) // 2)


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---- isolation: nothing mallory does changes what alice observes --------------------------

Op = tuple[str, list[int]]
# Alice draws from a two-letter alphabet so her prompts share prefixes (and hit) often; mallory
# sends long prompts so that, without protection, her load would evict alice's blocks.
alice_ops = st.lists(
    st.tuples(st.sampled_from(["run", "run", "lookup"]), st.lists(st.integers(0, 1), min_size=2, max_size=8)),
    min_size=2,
    max_size=12,
)
mallory_ops = st.lists(
    st.tuples(
        st.sampled_from(["run", "hold", "release", "lookup", "replay_alice"]),
        st.lists(st.integers(0, 7), min_size=6, max_size=16),
    ),
    min_size=3,
    max_size=36,
)
MALLORY_CAP = 10


def play(alice: list[Op], mallory: list[Op] | None, floor: int) -> list[object]:
    """Alice's observations, with mallory's operations interleaved (one per alice step) or not."""
    m = BlockManager(
        CacheConfig(
            num_blocks=floor + MALLORY_CAP,
            block_size=2,
            vocab_size=8,
            quotas={"alice": TenantQuota(floor_blocks=floor), "mallory": TenantQuota(cap_blocks=MALLORY_CAP)},
        )
    )
    seen: list[object] = []
    first_writer: dict[int, tuple[int, int]] = {}  # block id -> (alice step, position) that wrote it
    held: list[str] = []
    mallory = list(mallory or [])
    for step, (kind, tokens) in enumerate(alice):
        for _ in range(3 if mallory else 0):
            if not mallory:
                break
            mkind, mtokens = mallory.pop(0)
            rid = f"m{len(mallory)}"
            if mkind in ("run", "hold"):
                try:
                    m.allocate(rid, mtokens, "mallory")
                except CapacityError:
                    continue
                if mkind == "hold":
                    held.append(rid)
                else:
                    m.free(rid)
            elif mkind == "release" and held:
                m.free(held.pop(0))
            elif mkind == "lookup":
                m.lookup(mtokens, "mallory")
            else:  # mallory replays alice's own tokens in her own scope
                try:
                    m.allocate(rid, tokens, "mallory")
                    m.free(rid)
                except CapacityError:
                    pass
        if kind == "lookup":
            seen.append(("lookup", m.lookup(tokens, "alice")))
            continue
        a = m.allocate(f"a{step}", tokens, "alice")
        cached = a.num_cached_tokens // 2
        seen.append(("hit", a.num_cached_tokens, [first_writer[b] for b in a.block_ids[:cached]]))
        for pos, block_id in enumerate(a.block_ids[cached:], start=cached):
            first_writer[block_id] = (step, pos)
        m.free(f"a{step}")
    stats = m.stats().tenants.get("alice")
    seen.append(("stats", None if stats is None else (stats.requests, stats.query_tokens, stats.hit_tokens)))
    return seen


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alice=alice_ops, mallory=mallory_ops)
def test_one_tenant_cannot_change_another_tenants_observations(alice: list[Op], mallory: list[Op]) -> None:
    floor = sum(-(-len(t) // 2) for _, t in alice)  # alice's whole working set fits her floor
    alone = play(alice, None, floor)
    assert play(alice, mallory, floor) == alone


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 4),
    writers=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=10),
    tokens=st.lists(st.integers(0, 7), min_size=3, max_size=8),
)
def test_k_anonymity_holds(k: int, writers: list[str], tokens: list[int]) -> None:
    """A tenant hits a shared block only if it wrote it itself or k distinct tenants did."""
    m = BlockManager(CacheConfig(num_blocks=64, block_size=2, vocab_size=8, k_anonymity=k))
    wrote: set[str] = set()
    for i, tenant in enumerate(writers):
        scope = Scope(tenant, group="g")
        visible = m.lookup(tokens, scope)
        if tenant in wrote or len(wrote) >= k:
            assert visible == len(tokens) // 2 * 2  # positive: the block is there for this tenant
        else:
            assert visible == 0
        m.allocate(i, tokens, scope)
        m.free(i)
        wrote.add(tenant)
