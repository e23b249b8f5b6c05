"""Public prefixes in the server, without processes: rendering, the config, the signed set in
Redis and a worker's follower (the end-to-end behaviour is in ``test_serve_e2e_public``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from deployment import KEYS, registration
from hf_tokenizers import byte_level_bpe

from kvcache import BlockManager, CacheConfig
from kvcache.errors import ConfigError
from kvcache.model.tokenize import ByteTokenizer, HFTokenizer, Tokenizer
from kvcache.router import Router, RouteRequest
from kvcache.serve import wire
from kvcache.serve.auth import DeploymentKeys, new_secret
from kvcache.serve.config import PublicPrefixSpec, ServeConfig
from kvcache.serve.front import Front
from kvcache.serve.public import PublicFollower, PublicPrefixes, chat_prefix, open_set, render

SYSTEM = "You are a careful agent. Tools: search(q), open(url), it's fine."
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [("user", "hello")],
    [("user", " leading space")],
    [("user", "\nnewline first")],
    [("user", "What's up?"), ("assistant", "Not much."), ("user", "ok")],
    [("assistant", "I start")],
]


def bpe_chat() -> HFTokenizer:
    tok = byte_level_bpe()
    tok.chat_template = CHATML
    return HFTokenizer(tok, "bpe-chatml")


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), bpe_chat()], ids=["bytes", "bpe-chatml"])
def test_a_system_prefix_is_shared_token_for_token_by_every_conversation_that_starts_with_it(
    tokenizer: Tokenizer,
) -> None:
    prefix = chat_prefix(tokenizer, SYSTEM)
    alone = tokenizer.encode_chat([("system", SYSTEM)], add_generation_prompt=False)
    assert len(prefix) >= len(alone)  # the whole system message, and what every next message starts with
    for rest in CONVERSATIONS:
        assert tokenizer.encode_chat([("system", SYSTEM), *rest])[: len(prefix)] == prefix, rest
    other = tokenizer.encode_chat([("system", SYSTEM + " More."), ("user", "hello")])
    assert other[: len(prefix)] != prefix  # another system prompt diverges inside it


def test_render_each_source() -> None:
    tok = ByteTokenizer()
    text = render(PublicPrefixSpec("text", "abc"), tok)
    assert text.token_ids == (97, 98, 99) and text.prefix_id.startswith("pp-")
    assert render(PublicPrefixSpec("token_ids", (97, 98, 99)), tok).prefix_id == text.prefix_id  # same ids
    assert render(PublicPrefixSpec("system", "abc"), tok).token_ids == tuple(chat_prefix(tok, "abc"))


def test_the_config_declares_public_prefixes() -> None:
    config = ServeConfig.from_dict(
        {
            "tenants": {"a": {"keys": ["k"]}},
            "public_prefixes": [{"system": "tools"}, {"token_ids": [1, 2, 3], "model": "m"}],
        }
    )
    assert config.public_prefixes == (
        PublicPrefixSpec("system", "tools"),
        PublicPrefixSpec("token_ids", (1, 2, 3), "m"),
    )


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({}, "exactly one of"),
        ({"system": "a", "text": "b"}, "exactly one of"),
        ({"system": ""}, "non-empty string"),
        ({"token_ids": []}, "non-empty list"),
        ({"token_ids": [1, -2]}, "non-empty list"),
        ({"token_ids": [1, True]}, "non-empty list"),
        ({"text": "a", "colour": "red"}, "unknown keys ['colour']"),
        ({"text": "a", "model": 3}, "model=3"),
        ("tools", "must be a table"),
    ],
)
def test_bad_public_prefixes_are_named(entry: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"public_prefixes\[0\]") as err:
        ServeConfig.from_dict({"tenants": {"a": {"keys": ["k"]}}, "public_prefixes": [entry]})
    assert needle in str(err.value)


def test_the_set_is_idempotent_and_its_version_only_grows() -> None:
    public = PublicPrefixes(DeploymentKeys.from_secret(new_secret()))
    prefix = render(PublicPrefixSpec("text", "x" * 40), ByteTokenizer())
    assert public.add(prefix) is True
    version = public.version
    assert public.add(prefix) is False and public.version == version  # nothing changed
    assert public.remove("pp-absent") is False and public.version == version
    assert public.remove(prefix.prefix_id) is True and public.version > version
    assert public.token_lists() == []


def test_only_a_set_signed_by_this_deployment_opens() -> None:
    keys = DeploymentKeys.from_secret(new_secret())
    public = PublicPrefixes(keys)
    public.add(render(PublicPrefixSpec("token_ids", (5, 6, 7)), ByteTokenizer()))
    assert open_set(keys, public.signed()) == (public.version, [[5, 6, 7]])
    assert open_set(DeploymentKeys.from_secret(new_secret()), public.signed()) is None  # another deployment
    forged = json.loads(public.signed())
    forged["notice"] = forged["notice"].replace("[5, 6, 7]", "[5, 6, 8]")
    assert open_set(keys, json.dumps(forged)) is None
    refusal = keys.sign_notice(json.dumps({"instance": "i", "reason": "r"}))  # signed, but not a set
    assert open_set(keys, refusal) is None


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def get(self, key: str) -> Any:
        return self.values.get(key)

    async def set(self, key: str, value: Any, ex: int | None = None) -> None:
        self.values[key] = value


def test_a_worker_applies_newer_sets_only_and_acknowledges_them() -> None:
    keys = DeploymentKeys.from_secret(new_secret())
    public = PublicPrefixes(keys)
    applied: list[list[list[int]]] = []

    async def apply(prefixes: list[list[int]]) -> None:
        applied.append(prefixes)

    async def scenario() -> None:
        redis = FakeRedis()
        follower = PublicFollower(keys, "w0", "inst-1", apply)
        await follower.sync(redis)  # the registering heartbeat: the set is read from the next one
        await follower.sync(redis)  # nothing in Redis yet: the empty set (version 0) is what it has
        assert applied == [] and public.applied_by(redis.values[wire.public_ack_key("w0")], "inst-1")
        public.add(render(PublicPrefixSpec("token_ids", (1, 2)), ByteTokenizer()))
        old = public.signed()
        public.add(render(PublicPrefixSpec("token_ids", (3, 4)), ByteTokenizer()))
        redis.values[wire.PUBLIC_KEY] = public.signed()
        assert not public.applied_by(redis.values[wire.public_ack_key("w0")], "inst-1")
        await follower.sync(redis)
        await asyncio.sleep(0)  # the background apply
        await follower.sync(redis)  # the same version again: not re-applied
        assert applied == [[[1, 2], [3, 4]]]
        ack = redis.values[wire.public_ack_key("w0")]
        assert public.applied_by(ack, "inst-1") and not public.applied_by(ack, "inst-2")
        redis.values[wire.PUBLIC_KEY] = old  # a replay of an older set
        await follower.sync(redis)
        redis.values[wire.PUBLIC_KEY] = "garbage"
        await follower.sync(redis)
        assert applied == [[[1, 2], [3, 4]]]
        await follower.close()

    asyncio.run(scenario())


def test_the_front_keys_prompts_as_the_workers_block_managers_do() -> None:
    """Routing sees the shared blocks: the front's keys are a worker's block keys, public part included."""
    tools = list(range(1, 41))  # 2 full blocks and 8 tokens
    config = ServeConfig.from_dict(
        {"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["kb"]}}, "public_prefixes": [{"token_ids": tools}]}
    )
    front = Front(
        config=config,
        router=Router("round_robin", block_size=16),
        tokenizer=ByteTokenizer(1024),
        model_name="tiny",
        redis_url=None,
        route_request=RouteRequest,
        keys=KEYS,
    )
    front.pool.add(registration("w0", model_id="tiny-llama"))
    manager = BlockManager(
        CacheConfig(num_blocks=8, block_size=16, model_id="tiny-llama", deployment_key=KEYS.block_key)
    )
    manager.set_published([tools])
    prompt = tools + [200] * 30
    for tenant in config.tenants.values():
        keyed = front._keys(prompt, tenant)
        assert keyed is not None and keyed.num_public_blocks == 2
        assert keyed.keys == manager.hash(prompt, tenant.scope).keys
    a, b = (front._keys(prompt, t) for t in config.tenants.values())
    assert a is not None and b is not None and a.keys[:2] == b.keys[:2] and a.keys[2:] != b.keys[2:]
    front.public.remove(next(iter(front.public.prefixes)))  # withdrawn: keyed privately, as workers will
    manager.set_published([])
    keyed = front._keys(prompt, config.tenants["a"])
    assert keyed is not None and keyed.num_public_blocks == 0
    assert keyed.keys == manager.hash(prompt, config.tenants["a"].scope).keys
