"""The byte tokenizer, and incremental decoding with it and with real Hugging Face fast tokenizers."""

from __future__ import annotations

import random

import pytest
from hf_tokenizers import byte_level_bpe, wordpiece

from kvcache.model.tokenize import ByteTokenizer, HFTokenizer, IncrementalDecoder, Tokenizer, plain_chat_text


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


# ---- real Hugging Face fast tokenizers, built offline (``hf_tokenizers``) ------------------------


@pytest.fixture(scope="module")
def hf_tokenizers() -> dict[str, HFTokenizer]:
    return {"bpe": HFTokenizer(byte_level_bpe(), "bpe"), "wordpiece": HFTokenizer(wordpiece(), "wordpiece")}


def stream(tok: Tokenizer, ids: list[int]) -> tuple[str, str]:
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(t) for t in ids]
    deltas.append(dec.flush())
    return "".join(deltas), dec.text


@pytest.mark.parametrize("name", ["bpe", "wordpiece"])
def test_streamed_text_is_the_answer_for_real_tokenizers(
    hf_tokenizers: dict[str, HFTokenizer], name: str
) -> None:
    tok = hf_tokenizers[name]
    rng = random.Random(0)
    vocab = len(tok.tokenizer)
    texts = ["it 's fine . don 't", "héllo wörld ∑ 日本語 ok?", "We can't, they won't; it's 'quoted' text !"]
    randoms = [[rng.randrange(vocab) for _ in range(40)] for _ in range(20)]
    for ids in [tok.encode(t) for t in texts] + randoms:
        streamed, text = stream(tok, ids)
        assert streamed == text
        if name == "bpe":  # byte-level decoding has no clean-up step: exactly decode()
            assert text == tok.decode(ids)
        else:  # the tokenizer's own decoder, without transformers' clean-up that rewrites sent text
            tokens = tok.tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True)
            assert text == tok.tokenizer.convert_tokens_to_string(tokens)


class CountingTokenizer(HFTokenizer):
    def __init__(self, inner: HFTokenizer) -> None:
        super().__init__(inner.tokenizer, inner.name)
        self.num_decoded = 0

    def decode_piece(self, token_ids: list[int]) -> str:
        self.num_decoded += len(token_ids)
        return super().decode_piece(token_ids)


def test_each_token_decodes_a_window_not_the_whole_output(hf_tokenizers: dict[str, HFTokenizer]) -> None:
    tok = CountingTokenizer(hf_tokenizers["bpe"])
    ids = (tok.encode("We can't, they won't; it's 'quoted' text ! ") * 400)[:4096]
    streamed, text = stream(tok, ids)
    assert streamed == text == tok.decode(ids)
    assert tok.num_decoded <= 8 * len(ids)  # a whole-output re-decode per token would be ~8.4 M
