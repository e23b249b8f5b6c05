"""Byte-level fallback tokenizer and incremental decoding."""

from __future__ import annotations

import pytest

from kvcache.serve.tokenize import ByteTokenizer, IncrementalDecoder, plain_chat_text


def test_byte_tokenizer_is_deterministic_and_round_trips() -> None:
    tok = ByteTokenizer(1000)
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode(tok.encode("hé ∑")) == "hé ∑"
    assert tok.decode([104 + 256, 105 + 512]) == "hi"  # any id decodes, as id % 256
    assert tok.encode_chat([("user", "a")]) == list(b"<|user|>\na\n<|assistant|>\n")
    assert plain_chat_text([("system", "s"), ("user", "u")]) == "<|system|>\ns\n<|user|>\nu\n<|assistant|>\n"


def test_byte_tokenizer_needs_256_ids() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        ByteTokenizer(100)


def test_incremental_decoder_never_splits_a_character() -> None:
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(t) for t in "a∑b".encode()]
    assert deltas == ["a", "", "", "∑", "b"]
    assert dec.flush() == ""
    dec = IncrementalDecoder(tok)
    assert dec.push(0xE2) == "" and dec.flush() == "\ufffd"
