"""The front as the official ``openai`` client sees it: error classes and their ``code``/``param``/
``type``, the usage chunk of a stream, ``/v1/models`` behind the API keys and unknown routes, against
a scripted in-process worker (no processes, no Redis)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from test_serve_front import ScriptedWorker, run_front

from kvcache.serve.config import ServeConfig
from kvcache.serve.front import Front

CONFIG = ServeConfig.from_dict({"tenants": {"acme": {"keys": ["sk-acme"]}}})
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def with_client(scenario: Callable[[openai.AsyncOpenAI, str], Awaitable[None]], key: str = "sk-acme") -> None:
    """Run ``scenario(client, front_url)`` with an ``openai.AsyncOpenAI`` pointed at a front."""

    async def run(front: Front, url: str) -> None:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
            await scenario(client, url)

    run_front(ScriptedWorker(), run, config=CONFIG)


def test_an_unknown_model_is_not_found_with_code_model_not_found() -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
        error = info.value
        assert (error.status_code, error.code, error.param, error.type) == (
            404,
            "model_not_found",
            "model",
            "invalid_request_error",
        )
        assert "model 'gpt-9' is not served here; use 'tiny'" in error.message

    with_client(scenario)


def test_a_bad_api_key_is_401_everywhere_models_included() -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: client.models.list(),
            lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=2),
            lambda: client.chat.completions.create(model="tiny", messages=MESSAGES),
        ]
        for call in calls:
            with pytest.raises(openai.AuthenticationError) as info:
                await call()
            error = info.value
            assert (error.status_code, error.code, error.param, error.type) == (
                401,
                "invalid_api_key",
                None,
                "invalid_request_error",
            )
            assert error.body == {
                "message": "unknown API key",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }

    with_client(scenario, key="sk-nobody")


def test_models_lists_the_served_model_for_a_good_key() -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        assert [m.id async for m in client.models.list()] == ["tiny"]

    with_client(scenario)


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("logprobs", True, "this server does not return log probabilities"),
        (
            "tools",
            [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "this server does not call tools",
        ),
        ("response_format", {"type": "json_object"}, "this server does not constrain the output to a format"),
    ],
)
def test_an_unsupported_field_is_a_400_naming_it(field: str, value: Any, what: str) -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="tiny", messages=MESSAGES, **{field: value})
        error = info.value
        assert (error.status_code, error.code, error.param, error.type) == (
            400,
            None,
            field,
            "invalid_request_error",
        )
        assert what in error.message and "greedy" not in error.message

    with_client(scenario)


def test_echo_on_a_completion_is_a_400_naming_it() -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="tiny", prompt="hi", echo=True)
        assert info.value.param == "echo" and "does not echo the prompt" in info.value.message

    with_client(scenario)


def test_include_usage_sends_usage_in_a_final_chunk_without_choices() -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        stream = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        *choices, last = chunks
        assert "".join(c.choices[0].delta.content or "" for c in choices) == "abc"
        assert choices[-1].choices[0].finish_reason == "length"
        assert all(c.usage is None for c in choices)
        assert last.choices == [] and last.usage is not None
        prompt_tokens = last.usage.prompt_tokens
        assert prompt_tokens > 0
        assert (last.usage.completion_tokens, last.usage.total_tokens) == (3, prompt_tokens + 3)
        assert last.usage.prompt_tokens_details is not None
        assert last.usage.prompt_tokens_details.cached_tokens == 0
        completion = await client.completions.create(
            model="tiny", prompt="hi", max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
        *texts, tail = [chunk async for chunk in completion]
        assert [c.choices[0].text for c in texts] == ["a", "b", ""] and tail.choices == []
        assert tail.usage is not None and (tail.usage.prompt_tokens, tail.usage.completion_tokens) == (2, 2)
        plain = await client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True)
        assert [c.usage for c in [chunk async for chunk in plain]] == [None, None, None]

    with_client(scenario)


def test_unknown_routes_and_methods_answer_openai_errors() -> None:
    async def scenario(client: openai.AsyncOpenAI, url: str) -> None:
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("tiny")  # GET /v1/models/tiny: not a route here
        error = info.value
        assert (error.code, error.param, error.type) == (None, None, "invalid_request_error")
        assert error.message.endswith("Invalid URL (GET /v1/models/tiny)")
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/completions") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            assert await resp.json() == {
                "error": {
                    "message": "Method not allowed (GET /v1/completions)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }

    with_client(scenario)
