"""Trace readers: both formats auto-detected, round trips, and errors naming line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache import TraceError
from kvcache.lab.trace import (
    FORMAT_MOONCAKE,
    FORMAT_TOKENS,
    TraceRequest,
    read_trace,
    to_block_ids,
    write_trace,
)


def write_lines(path: Path, objs: list[object]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def test_reads_mooncake(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            {"timestamp": 0, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]},
            {"timestamp": 40, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 2]},
        ],
    )
    trace = read_trace(path)
    assert trace.format == FORMAT_MOONCAKE and trace.block_tokens == 512
    assert trace.requests[1] == TraceRequest(40.0, 1100, 7, block_ids=(0, 1, 2))
    assert trace.unique_blocks() == 3
    assert trace.duration_ms == 40.0


def test_reads_tokens_and_text(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 1.5, "tenant": "acme", "session": "s1", "tokens": [5, 6, 7], "output_length": 2},
            {"timestamp": 2, "tenant": "acme", "session": "s1", "text": "hé", "output_length": 1},
        ],
    )
    trace = read_trace(path)
    assert trace.format == FORMAT_TOKENS and trace.block_tokens is None
    assert trace.requests[0] == TraceRequest(1.5, 3, 2, "acme", "s1", tokens=(5, 6, 7))
    assert trace.requests[1].tokens == (104, 195, 169)  # UTF-8 bytes of "hé"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"input_length": 10, "output_length": 1, "hash_ids": [0]}, "2: field 'timestamp' is missing"),
        (
            {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [0]},
            "2: field 'hash_ids' has 1 ids for input_length=1024; expected ceil(1024/512) = 2",
        ),
        (
            {"timestamp": 0, "input_length": 10, "output_length": 0, "hash_ids": [0]},
            "2: field 'output_length'=0",
        ),
        (
            {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [-1]},
            "2: field 'hash_ids'[0]=-1",
        ),
        ({"timestamp": 0, "tenant": "a", "output_length": 1}, "2: field 'tokens' (or 'text'"),
        (
            {"timestamp": 0, "tenant": "a", "tokens": [1], "output_length": 1},
            "2: a tokens line in a mooncake trace",
        ),
        (
            {"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": [0]},
            "2: field 'timestamp'=-5",
        ),
        ([1, 2], "2: expected a JSON object, got list"),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path: Path, line: object, message: str) -> None:
    good = {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}
    path = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert f"{path}:{message}" in str(err.value)


def test_bad_json_and_time_order(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n{oops\n')
    with pytest.raises(TraceError, match=r"b.jsonl:2: not valid JSON"):
        read_trace(path)
    write_lines(
        path,
        [
            {"timestamp": 9, "input_length": 10, "output_length": 1, "hash_ids": [0]},
            {"timestamp": 3, "input_length": 10, "output_length": 1, "hash_ids": [0]},
        ],
    )
    with pytest.raises(TraceError, match=r"b.jsonl:2: field 'timestamp'=3 goes back in time"):
        read_trace(path)
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="has no requests"):
        read_trace(tmp_path / "empty.jsonl")


def test_round_trip_and_block_ids(tmp_path: Path) -> None:
    reqs = [
        TraceRequest(0.0, 10, 3, "a", "s", tokens=tuple(range(10))),
        TraceRequest(5.25, 9, 2, "b", "t", tokens=(0, 1, 2, 3, 9, 9, 9, 9, 7)),
    ]
    assert write_trace(tmp_path / "t.jsonl", reqs) == 2
    assert read_trace(tmp_path / "t.jsonl").requests == reqs
    ids = to_block_ids(reqs, block_tokens=4)
    # Same first block -> same id; different second block -> a new id; partial tails are blocks too.
    assert [r.block_ids for r in ids] == [(0, 1, 2), (0, 3, 4)]
    assert write_trace(tmp_path / "m.jsonl", ids) == 2
    back = read_trace(tmp_path / "m.jsonl", block_tokens=4)
    assert back.requests == ids and back.unique_blocks() == 5
    assert read_trace(tmp_path / "t.jsonl").unique_blocks(4) == 5
