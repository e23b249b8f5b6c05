"""``POST /generate`` as typed records: the exact bytes a worker writes, what the one client
(``peer.generate``) makes of each kind of line, and the malformed lines it refuses."""

from __future__ import annotations

import pytest

from kvcache.errors import ProtocolError
from kvcache.serve import wire


def test_lines_encode_only_what_they_carry() -> None:
    assert wire.encode_line(wire.GenerateLine(token_id=5, index=1)) == b'{"token_id":5,"index":1}\n'
    done = wire.GenerateLine(done=True, engine_s=0.5, finish_reason="stop")
    assert wire.encode_line(done) == b'{"done":true,"engine_s":0.5,"finish_reason":"stop"}\n'
    request = wire.GenerateRequest("r1", [1, 2], "acme", 4, group=None, seed=7)
    assert wire.encode_request(request) == (
        b'{"request_id":"r1","token_ids":[1,2],"tenant":"acme","max_tokens":4,"seed":7}'
    )


def test_each_kind_of_line_decodes() -> None:
    first = wire.decode_line(
        b'{"token_id":3,"index":0,"prompt_tokens":9,"cached_tokens":8,"tier_hits":{"G1":8}}'
    )
    assert (first.token_id, first.index, first.cached_tokens, first.tier_hits, first.done) == (
        3,
        0,
        8,
        {"G1": 8},
        False,
    )
    end = wire.decode_line(b'{"done":true,"engine_s":1.0,"finish_reason":"length"}')
    assert end.done and end.finish_reason == "length"
    error = wire.decode_line(b'{"error":"quota reached","status":429}')
    assert (error.error, error.status) == ("quota reached", 429)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "malformed"),
        (b'{"token_id":"3","index":0}', "malformed"),  # a string where an int goes
        (b'{"index":0}', "neither a token"),
        (b"{}", "neither a token"),
        (b'{"error":"boom"}', "without its status"),
    ],
)
def test_malformed_lines_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode_line(raw)


def test_a_request_decodes_as_the_type_it_was_encoded_as() -> None:
    request = wire.GenerateRequest("r1", [1, 2], "acme", 4, group="team", salt="s", temperature=0.5, seed=-3)
    assert wire.decode_request(wire.encode_request(request)) == request
    # The front's JSON null for an absent group is the default, as the sender's omitted field.
    raw = b'{"request_id":"r1","token_ids":[1],"tenant":"acme","group":null,"max_tokens":1}'
    assert wire.decode_request(raw) == wire.GenerateRequest("r1", [1], "acme", 1)


BODY = b'"request_id":"r1","token_ids":[1,2],"tenant":"acme","max_tokens":2'


@pytest.mark.parametrize(
    ("raw", "param", "message"),
    [
        (b"{" + BODY + b',"top_k":1.5}', "top_k", "'top_k'=1.5 is refused: Expected `int | null`"),
        (b"{" + BODY + b',"seed":"x"}', "seed", "'seed'='x' is refused: Expected `int | null`, got `str`"),
        (b"{" + BODY + b',"temperature":true}', "temperature", "'temperature'=True is refused"),
        (b"{" + BODY + b',"salt":7}', "salt", "'salt'=7 is refused: Expected `str | null`, got `int`"),
        (b"{" + BODY.replace(b"[1,2]", b'[1,"x"]') + b"}", "token_ids", "'token_ids'=[1, 'x'] is refused"),
        (b"{" + BODY.replace(b'"r1"', b"7") + b"}", "request_id", "'request_id'=7 is refused"),
        (b"{" + BODY.replace(b'"tenant":"acme",', b"") + b"}", "tenant", "'tenant' is missing"),
        (b"[1, 2]", None, "the /generate body must be a JSON object"),
        (b"{" + BODY + b',"extra":' + b"[" * 100_000 + b"}", None, "is not valid JSON"),
        (b'{"request_id":"\\ud800"}', None, "is not valid JSON"),
    ],
)
def test_a_request_that_is_not_one_is_refused_naming_the_field(
    raw: bytes, param: str | None, message: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        wire.decode_request(raw)
    assert message in str(refused.value) and refused.value.param == param
