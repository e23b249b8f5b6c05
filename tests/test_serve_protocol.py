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
    req = protocol.parse_completion(
        {"prompt": [[5, 6, 7]], "stream": True, "stream_options": {"include_usage": True}}
    )
    assert (req.token_ids, req.max_tokens, req.stream, req.include_usage) == ([5, 6, 7], 16, True, True)


def test_sampling_fields_map_to_the_worker_and_name_the_field_when_bad() -> None:
    req = protocol.parse_completion(
        {"prompt": "hi", "temperature": 0.7, "top_p": 0.9, "top_k": -1, "seed": -1, "stop": "\n\n"}
    )
    assert (req.temperature, req.top_p, req.top_k, req.seed, req.stop) == (0.7, 0.9, 0, 2**63 - 1, ("\n\n",))
    assert req.sampling() == {"temperature": 0.7, "top_p": 0.9, "seed": 2**63 - 1}
    greedy = protocol.parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "bc"], "seed": 0, "n": 1}
    )
    assert greedy.stop == ("a", "bc") and greedy.sampling() == {"seed": 0}
    assert protocol.parse_completion({"prompt": "x", "stop": None, "top_k": 5}).sampling() == {"top_k": 5}
    with pytest.raises(ProtocolError) as info:
        protocol.parse_completion({"prompt": "x", "top_p": 1.5})
    assert info.value.param == "top_p"


def test_chat_messages_and_text_parts() -> None:
    req = protocol.parse_chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 2,
        }
    )
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
        ({"prompt": "x", "stop": ["a", ""]}, "'stop'=['a', '']"),
        ({"prompt": "x", "stop": 3}, "'stop'=3 must be a string or a list"),
        ({"prompt": "x", "stop": list("abcde")}, "at most 4 non-empty strings"),
        ({"prompt": "x", "temperature": -0.1}, "'temperature'=-0.1 must be a number in [0, 2]"),
        ({"prompt": "x", "temperature": "hot"}, "'temperature'='hot'"),
        ({"prompt": "x", "top_p": 0}, "'top_p'=0 must be a number in (0, 1]"),
        ({"prompt": "x", "top_p": True}, "'top_p'=True"),
        ({"prompt": "x", "top_k": -2}, "'top_k'=-2 must be an integer in -1..2147483647"),
        ({"prompt": "x", "top_k": 2.0}, "'top_k'=2.0"),
        ({"prompt": "x", "seed": 1.5}, "'seed'=1.5 must be an integer"),
        ({"prompt": "x", "n": True}, "n=1"),
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
    body = protocol.response(
        chat, request_id="r1", model="m", created=7, text="abc", finish_reason="length", usage_=usage
    )
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert body["usage"] == {
        "prompt_tokens": 40,
        "completion_tokens": 3,
        "total_tokens": 43,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
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
    assert protocol.error_body("bad", status=400, param="prompt") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "prompt", "code": None}
    }
    assert protocol.error_body("no", status=404, param="model", code="model_not_found")["error"] == {
        "message": "no",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert protocol.error_body("busy", status=503)["error"]["code"] == "service_unavailable"
    assert protocol.error_body("boom", status=500)["error"] == {
        "message": "boom",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_no_op_fields_are_accepted_and_others_name_the_field() -> None:
    completion = {"prompt": "x", "logit_bias": {}, "suffix": "", "best_of": 1, "user": "u", "metadata": {}}
    assert protocol.parse_completion(completion).text == "x"
    chat = {
        "messages": [{"role": "user", "content": "x"}],
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "parallel_tool_calls": False,
        "logit_bias": None,
    }
    assert protocol.parse_chat(chat).messages == [("user", "x")]
    refused = [
        (protocol.parse_completion, {"prompt": "x", "logit_bias": {"50256": -100}}, "'logit_bias'="),
        (protocol.parse_completion, {"prompt": "x", "suffix": "end"}, "'suffix'='end' is not supported"),
        (protocol.parse_completion, {"prompt": "x", "best_of": True}, "'best_of'=True"),
        (protocol.parse_chat, {**chat, "tools": [{"type": "function"}]}, "'tools'="),
        (protocol.parse_chat, {**chat, "response_format": {"type": "json_object"}}, "'response_format'="),
        (protocol.parse_chat, {**chat, "tool_choice": "auto"}, 'send null or "none"'),
        (protocol.parse_completion, {"prompt": "x", "max_token": 3}, "unsupported fields ['max_token']"),
    ]
    for parse, body, needle in refused:
        with pytest.raises(ProtocolError) as info:
            parse(body)
        assert needle in str(info.value)


def test_json_depth_is_bounded_before_parsing() -> None:
    assert protocol.json_depth(b'{"a": [1, {"b": "[[[[\\"]]"}]}') == 3  # brackets in strings do not count
    assert protocol.loads(b"[" * 32 + b"]" * 32) is not None
    with pytest.raises(ProtocolError, match="nests 33 levels deep; at most 32"):
        protocol.loads(b"[" * 33 + b"]" * 33)
    with pytest.raises(ProtocolError, match="nests 100000 levels"):
        protocol.loads(b"{" * 100_000)
    with pytest.raises(ProtocolError, match="lone surrogate"):
        protocol.parse_completion(protocol.loads(b'{"prompt": "a\\udc00b"}'))
