"""End to end over HTTP: a real ``kvcache serve`` with two worker processes and a real Redis.

The session's shared deployment (``serve_harness.CONFIG``: private tenants acme and globex,
a share group with k=2, a tenant with a 2-block quota). Prompts are token ids, so block counts
are exact (16 tokens per block).
"""

from __future__ import annotations

import urllib.request

import pytest
from serve_harness import Deployment, ids, shared


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Deployment:
    return shared(tmp_path_factory, pytestconfig)


def complete(server: Deployment, key: str, prompt: list[int] | str, max_tokens: int = 4) -> dict[str, object]:
    status, body = server.request("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}, key=key)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def cached(body: dict[str, object]) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index, no-any-return]


def indexed(server: Deployment) -> int:
    return sum(w["indexed_blocks"] for w in server.workers().values())


def complete_and_settle(
    server: Deployment, key: str, prompt: list[int], max_tokens: int = 4
) -> dict[str, object]:
    """``complete``, then wait until the router has indexed the prompt's full blocks (its events)."""
    before = indexed(server)
    body = complete(server, key, prompt, max_tokens)
    new_blocks = (len(prompt) - cached(body)) // 16
    server.wait_for("the router to index the prompt", lambda: indexed(server) >= before + new_blocks)
    return body


def test_models_health_and_a_completion(server: Deployment) -> None:
    assert server.request("/v1/models", key="sk-acme")[1]["data"][0]["id"] == "tiny"
    assert server.request("/health") == (200, {"workers": 2, "redis": True})
    body = complete(server, "sk-acme", "Hello, kvcache!", max_tokens=5)
    assert body["object"] == "text_completion"
    assert body["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 5,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["choices"][0]["finish_reason"] == "length"


def test_streamed_completion_and_chat_match_the_unstreamed_text(server: Deployment) -> None:
    prompt = ids(1000, 40)
    whole = complete(server, "sk-globex", prompt, max_tokens=6)
    body = {"prompt": prompt, "max_tokens": 6, "stream_options": {"include_usage": True}}
    chunks = server.stream("/v1/completions", body, key="sk-globex")
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == whole["choices"][0]["text"]
    assert all(c["usage"] is None for c in chunks[:-2])  # OpenAI's shape: usage comes last, on its own
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["usage"]["prompt_tokens"] == 40

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why cache KV?"}]
    status, chat = server.request(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 3}, key="sk-acme"
    )
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    streamed = server.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 3}, key="sk-acme")
    assert streamed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in streamed[-2]  # only with stream_options.include_usage
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1])
    assert text == chat["choices"][0]["message"]["content"]


def test_cached_tokens_grow_on_a_repeated_prefix(server: Deployment) -> None:
    base = ids(2000, 100)  # 6 full blocks
    assert cached(complete_and_settle(server, "sk-acme", base)) == 0
    assert cached(complete_and_settle(server, "sk-acme", base)) == 96
    longer = base + ids(3000, 50)  # 9 full blocks
    assert cached(complete_and_settle(server, "sk-acme", longer)) == 96
    assert cached(complete(server, "sk-acme", longer)) == 144
    assert server.metric("kvcache:prefix_cache_hits_total", tenant="acme", tier="device") >= 96 + 96 + 144


def test_another_tenant_probing_a_private_prompt_sees_nothing(server: Deployment) -> None:
    secret = ids(4000, 80)
    complete_and_settle(server, "sk-acme", secret)
    assert cached(complete(server, "sk-acme", secret)) == 64
    assert cached(complete_and_settle(server, "sk-globex", secret)) == 0  # B probing A's prompt: a miss
    assert cached(complete(server, "sk-globex", secret)) == 64  # B's own copy from now on


def test_share_group_hits_only_after_k_tenants_wrote_a_block(server: Deployment) -> None:
    shared = ids(5000, 80)
    assert cached(complete_and_settle(server, "sk-initech", shared)) == 0
    assert cached(complete(server, "sk-initech", shared)) == 64  # its own write
    assert cached(complete(server, "sk-hooli", shared)) == 0  # one writer < k=2: looks like a miss
    assert cached(complete(server, "sk-piper", shared)) == 64  # two writers: shared


@pytest.mark.parametrize(
    ("path", "raw", "key", "status", "needle"),
    [
        ("/v1/completions", b"{not json", "sk-acme", 400, "not valid JSON"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', "sk-acme", 400, "'max_tokens'=-1"),
        ("/v1/completions", b'{"prompt": [1, 999999]}', "sk-acme", 400, "vocab_size"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "sk-acme", 400, "'messages'"),
        ("/v1/completions", b'{"prompt": "x"}', "sk-nobody", 401, "unknown API key"),
        ("/v1/completions", b'{"prompt": "x"}', None, 401, "missing API key"),
        ("/v1/completions", b'{"prompt": "x", "model": "gpt-9"}', "sk-acme", 404, "'gpt-9'"),
        (
            "/v1/completions",
            b'{"prompt": "' + b"y" * 200 + b'", "max_tokens": 4000}',
            "sk-acme",
            400,
            "need 263 blocks; a worker's pool holds 256",
        ),
        ("/v1/completions", b'{"prompt": "abc\\ud800"}', "sk-acme", 400, "lone surrogate"),
        ("/v1/completions", b"[" * 100_000, "sk-acme", 400, "nests 100000 levels deep"),
        (
            "/v1/completions",
            b'{"prompt": [' + b"7, " * 4096 + b"7]}",
            "sk-acme",
            400,
            "the prompt has 4097 tokens; this server accepts at most 4096",
        ),
    ],
)
def test_client_errors(
    server: Deployment, path: str, raw: bytes, key: str | None, status: int, needle: str
) -> None:
    got, body = server.request(path, raw=raw, key=key)
    assert got == status
    assert needle in body["error"]["message"]
    assert body["error"]["code"] == {401: "invalid_api_key", 404: "model_not_found"}.get(status)


def test_over_quota_is_429_and_the_worker_lives_on(server: Deployment) -> None:
    status, body = server.request("/v1/completions", {"prompt": ids(6000, 100)}, key="sk-small")
    assert status == 429 and "cap_blocks=2" in body["error"]["message"]
    assert cached(complete(server, "sk-small", ids(6000, 20))) == 0  # 2 blocks fit
    # Decoding past the cap fails in the middle of the answer: 429 still, and in-band when streamed.
    over = {"prompt": ids(6001, 20), "max_tokens": 30}
    status, body = server.request("/v1/completions", over, key="sk-small")
    assert status == 429 and "cap_blocks=2" in body["error"]["message"]
    chunks = server.stream("/v1/completions", over, key="sk-small")
    assert chunks[-1]["error"]["code"] == "rate_limit_exceeded" and "[DONE]" not in chunks
    assert 1 <= len(chunks) - 1 < 30 and all(len(c["choices"]) == 1 for c in chunks[:-1])
    assert server.request("/health")[1]["workers"] == 2


def test_metrics_per_tenant_and_latency_histograms(server: Deployment) -> None:
    assert server.metric("kvcache:prefix_cache_queries_total", tenant="acme", tier="device") > 0
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:  # no admin key
        public = resp.read().decode()
    assert "kvcache:prefix_cache_queries_total{" in public and "tenant=" not in public
    assert server.metric("kvcache:time_to_first_token_seconds_count") >= 10
    assert server.metric("kvcache:request_queue_time_seconds_count") >= 10
    assert server.metric("kvcache:requests_total", status="401") == 2
    assert server.metric("kvcache:workers") == 2
