"""Public prefixes end to end: declared in the config and through the admin endpoint, hit by every
tenant from its first request, and never more than the public part.

A deployment of its own (two workers, ``serve_harness.CONFIG`` plus a public system prompt and a
prefix declared for another model, which this server ignores), so the prefixes and the late
worker never meet another module's exact block counts. Every isolation check comes with a
positive control (the same tenant's repeat hits its private continuation), so a test cannot pass
because nothing is cached. Blocks are 16 tokens.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from serve_harness import ADMIN_KEY, CONFIG, Deployment, deploy, ids

from kvcache.model.tokenize import ByteTokenizer
from kvcache.serve.public import chat_prefix

ADMIN = "/admin/public-prefixes"
BLOCK = 16
PUBLIC_SYSTEM = "You are the tools agent. Tools: search(query), open(url), summarize(text). Be brief."
PUBLIC_CONFIG = f"""{CONFIG}
[[public_prefixes]]
system = "{PUBLIC_SYSTEM}"
[[public_prefixes]]
token_ids = [1, 2, 3]
model = "another-model"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deploy(tmp_path_factory.mktemp("public"), workers=2, config=PUBLIC_CONFIG)
    yield dep
    dep.stop()


def listing(server: Deployment) -> dict[str, Any]:
    status, body = server.request(ADMIN, key=ADMIN_KEY)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def wait_applied(server: Deployment, num_workers: int = 2) -> dict[str, Any]:
    """The listing once every worker acknowledged the current set (published and prefilled)."""

    def done() -> dict[str, Any] | None:
        body = listing(server)
        applied = body["applied"]
        return body if len(applied) == num_workers and all(applied.values()) else None

    return server.wait_for("every worker to apply the public prefixes", done)  # type: ignore[no-any-return]


def cached(body: dict[str, Any]) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[no-any-return]


def chat(server: Deployment, key: str, messages: list[tuple[str, str]]) -> dict[str, Any]:
    body = {"messages": [{"role": r, "content": c} for r, c in messages], "max_tokens": 2}
    status, answer = server.request("/v1/chat/completions", body, key=key)
    assert status == 200, answer
    return answer  # type: ignore[no-any-return]


def complete(server: Deployment, key: str, prompt: list[int]) -> dict[str, Any]:
    status, answer = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 2}, key=key)
    assert status == 200, answer
    return answer  # type: ignore[no-any-return]


def public_hits(server: Deployment) -> float:
    return server.metric("kvcache:public_prefix_hits_total")


def test_the_config_prefix_is_hit_by_every_tenants_first_chat_request(server: Deployment) -> None:
    body = wait_applied(server)
    rendered = chat_prefix(ByteTokenizer(), PUBLIC_SYSTEM)
    assert [p["token_ids"] for p in body["data"]] == [rendered]  # the other entry is for another model
    public = len(rendered) // BLOCK * BLOCK
    assert public >= 96
    # Routing sees the shared blocks: each worker's prefill of them reached the router.
    server.wait_for(
        "the router to index the public blocks",
        lambda: all(w["indexed_blocks"] >= public // BLOCK for w in server.workers().values()),
    )
    system = ("system", PUBLIC_SYSTEM)
    question = [system, ("user", "Summarize the acme quarterly report, please, in detail.")]
    hits = public_hits(server)
    for key in ("sk-acme", "sk-globex", "sk-initech"):  # private tenants and a share-group member
        assert cached(chat(server, key, [system, ("user", f"first question of {key}")])) == public
    assert public_hits(server) == hits + 3 * public
    assert cached(chat(server, "sk-acme", question)) == public
    again = cached(chat(server, "sk-acme", question))
    assert again > public  # positive control: acme's private continuation is cached for acme
    assert cached(chat(server, "sk-globex", question)) == public  # never acme's continuation
    assert cached(chat(server, "sk-acme", [("system", PUBLIC_SYSTEM + "!"), ("user", "hi")])) < public


def test_admin_prefix_diverging_prompts_stay_private_after_the_divergence(server: Deployment) -> None:
    tools = ids(7100, 64)  # 4 blocks
    status, added = server.request(ADMIN, {"token_ids": tools}, key=ADMIN_KEY)
    assert status == 201 and added["added"] is True and added["num_tokens"] == 64
    try:
        wait_applied(server)
        assert cached(complete(server, "sk-globex", tools + ids(7200, 40))) == 64  # a first request
        diverging = tools[:40] + ids(7300, 60)  # leaves the public text inside block 3
        assert cached(complete(server, "sk-acme", diverging)) == 32
        assert cached(complete(server, "sk-acme", diverging)) == 96  # positive control: acme's own
        assert cached(complete(server, "sk-globex", diverging)) == 32  # public part only
        assert cached(complete(server, "sk-hooli", diverging)) == 32
    finally:
        status, removed = server.request(f"{ADMIN}/{added['id']}", key=ADMIN_KEY, method="DELETE")
    assert status == 200 and removed == {"id": added["id"], "deleted": True, "version": removed["version"]}
    wait_applied(server)
    assert cached(complete(server, "sk-piper", tools + ids(7400, 40))) == 0  # withdrawn: private now


def test_adding_and_removing_are_idempotent(server: Deployment) -> None:
    docs = {"text": "The handbook, chapter one: caches are shared only when an operator says so."}
    first = server.request(ADMIN, docs, key=ADMIN_KEY)
    second = server.request(ADMIN, docs, key=ADMIN_KEY)
    assert (first[0], second[0]) == (201, 200)
    assert second[1]["id"] == first[1]["id"] and second[1]["added"] is False
    assert second[1]["version"] == first[1]["version"]
    assert [p["id"] for p in listing(server)["data"]].count(first[1]["id"]) == 1
    path = f"{ADMIN}/{first[1]['id']}"
    assert server.request(path, key=ADMIN_KEY, method="DELETE")[1]["deleted"] is True
    assert server.request(path, key=ADMIN_KEY, method="DELETE")[1]["deleted"] is False
    assert first[1]["id"] not in [p["id"] for p in listing(server)["data"]]


@pytest.mark.parametrize(
    ("method", "path", "key", "status"),
    [
        ("GET", ADMIN, None, 401),
        ("GET", ADMIN, "sk-acme", 403),
        ("POST", ADMIN, "sk-acme", 403),
        ("POST", ADMIN, "sk-nobody", 403),
        ("DELETE", f"{ADMIN}/pp-0000000000000000", "sk-globex", 403),
    ],
)
def test_only_admins_manage_public_prefixes(
    server: Deployment, method: str, path: str, key: str | None, status: int
) -> None:
    before = listing(server)
    body = {"token_ids": ids(7500, 64)} if method == "POST" else None
    got, answer = server.request(path, body, key=key, method=method)
    assert got == status and "admin key" in answer["error"]["message"]
    assert listing(server)["version"] == before["version"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"text": "a", "token_ids": [1]}', "exactly one of"),
        (b'{"token_ids": [1, 99999]}', "vocab_size"),
        (b'{"token_ids": [1, 2, 3]}', "fewer than one block"),
        (b'{"system": "x", "model": "gpt-9"}', "'gpt-9' is not served here"),
    ],
)
def test_bad_admin_requests_are_named_and_change_nothing(server: Deployment, raw: bytes, needle: str) -> None:
    before = listing(server)
    got, answer = server.request(ADMIN, raw=raw, key=ADMIN_KEY)
    assert got in (400, 404) and needle in answer["error"]["message"]
    assert listing(server)["version"] == before["version"]


def test_a_worker_that_joins_later_gets_the_public_prefixes(server: Deployment) -> None:
    process = server.start_worker("w-late")
    try:
        server.wait_for("the late worker", lambda: "w-late" in server.workers(), 120)
        wait_applied(server, num_workers=3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    server.wait_for("the late worker to leave", lambda: "w-late" not in server.workers())
