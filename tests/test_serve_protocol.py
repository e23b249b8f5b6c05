"""OpenAI request validation and response shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvcache.errors import ProtocolError
from kvcache.serve import protocol


def test_completion_text_and_token_prompts() -> None:
    req = protocol.parse_completion({"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert (req.text, req.token_ids, req.max_tokens, req.stream, req.chat) == ("hi", None, 3, False, False)
    req = protocol.parse_completion({"prompt": [[5, 6, 7]], "stream": True,
                                     "stream_options": {"include_usage": True}})  # fmt: skip
    assert (req.token_ids, req.max_tokens, req.stream, req.include_usage) == ([5, 6, 7], 16, True, True)


def test_chat_messages_and_text_parts() -> None:
    req = protocol.parse_chat({"messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}],
                               "max_completion_tokens": 2})  # fmt: skip
    assert req.messages == [("system", "be brief"), ("user", "ab")]
    assert (req.max_tokens, req.chat) == (2, True)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([1, 2], "JSON object"),
        ({}, "'prompt'"),
        ({"prompt": ""}, "empty"),
        ({"prompt": [1, -1]}, "'prompt'"),
        ({"prompt": [1, True]}, "'prompt'"),
        ({"prompt": ["a", "b"]}, "one prompt per request"),
        ({"prompt": "x", "max_tokens": 0}, "'max_tokens'=0"),
        ({"prompt": "x", "max_tokens": 10**6}, "'max_tokens'=1000000"),
        ({"prompt": "x", "max_tokens": "4"}, "'max_tokens'='4'"),
        ({"prompt": "x", "n": 2}, "n=1"),
        ({"prompt": "x", "stream": "yes"}, "'stream'"),
        ({"prompt": "x", "logprobs": 3}, "'logprobs'"),
        ({"prompt": "x", "stop": ["\n"]}, "'stop' is not supported"),
        ({"prompt": "x", "model": 3}, "'model'"),
        ({"prompt": "x", "tools": []}, "unsupported fields ['tools']"),
        ({"prompt": "x", "stream_options": {"x": 1}}, "stream_options"),
    ],
)
def test_malformed_completions(body: Any, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_completion(body)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role='wizard'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ],
)
def test_malformed_chat(body: Any, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_chat(body)
    assert needle in str(info.value)


def test_response_shapes_carry_cached_tokens() -> None:
    chat = protocol.parse_chat({"messages": [{"role": "user", "content": "x"}]})
    usage = protocol.usage(40, 3, 32)
    body = protocol.response(chat, request_id="r1", model="m", created=7, text="abc", finish_reason="length",
                             usage_=usage)  # fmt: skip
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
                             "prompt_tokens_details": {"cached_tokens": 32}}  # fmt: skip
    first = protocol.chunk(chat, request_id="r1", model="m", created=7, text="a", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    last = protocol.chunk(chat, request_id="r1", model="m", created=7, text=None, usage_=usage)
    assert last["choices"] == [] and last["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    comp = protocol.parse_completion({"prompt": "x"})
    c = protocol.chunk(comp, request_id="r2", model="m", created=7, text="z", finish_reason="length")
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "z"


def test_sse_framing_and_error_body() -> None:
    assert protocol.sse("[DONE]") == b"data: [DONE]\n\n"
    frame = protocol.sse({"a": 1})
    assert frame.startswith(b"data: ") and json.loads(frame[6:]) == {"a": 1}
    assert protocol.error_body("bad", status=400, type_="invalid_request_error", param="prompt") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "prompt", "code": 400}
    }
