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
