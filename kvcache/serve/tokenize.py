"""Text <-> token ids for the server: the model's HF tokenizer, or a byte-level fallback.

Random-weight models (``tiny``...) have no tokenizer; ``ByteTokenizer`` then maps each UTF-8
byte to its own id (``id = byte``, needs ``vocab_size >= 256``) and decodes any id as the byte
``id % 256``, so the same text always gives the same ids and every id decodes to something.
Chat messages without a chat template are joined as ``<|role|>\\ncontent\\n`` and end with
``<|assistant|>\\n``.

``IncrementalDecoder`` turns a stream of ids into text deltas without splitting a multi-byte
character. Not here: loading models (``kvcache.hf``), request validation (``protocol``).
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]: ...


def plain_chat_text(messages: list[tuple[str, str]]) -> str:
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"


class ByteTokenizer:
    """One id per UTF-8 byte; deterministic, no files, any model with ``vocab_size >= 256``."""

    name = "bytes"

    def __init__(self, vocab_size: int = 256) -> None:
        if vocab_size < 256:
            raise ValueError(f"vocab_size={vocab_size} < 256: the byte tokenizer needs one id per byte")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t % 256 for t in token_ids).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        return self.encode(plain_chat_text(messages))


class HFTokenizer:
    """A transformers tokenizer (as ``kvcache.hf.load_tokenizer`` returns it)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            conversation = [{"role": role, "content": content} for role, content in messages]
            ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return self.encode(plain_chat_text(messages))


class IncrementalDecoder:
    """Text deltas for a growing list of ids, never splitting a character across deltas."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") if isinstance(
            tokenizer, ByteTokenizer
        ) else None  # fmt: skip

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._bytes is not None:
            delta = self._bytes.decode(bytes([token_id % 256]))
            self.text += delta
            return delta
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next id
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        if self._bytes is not None:
            delta = self._bytes.decode(b"", final=True)
        else:
            text = self.tokenizer.decode(self.ids)
            delta, self.text = text[len(self.text) :], text
            return delta
        self.text += delta
        return delta


def load(model: str, vocab_size: int = 256) -> Tokenizer:
    """The HF tokenizer of ``model`` when it has one, else ``ByteTokenizer(vocab_size)``."""
    if model.startswith("tiny") and not Path(model).exists():
        return ByteTokenizer(vocab_size)  # random-weight models: no need to import transformers
    from kvcache.hf import load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        return ByteTokenizer(vocab_size)
    return HFTokenizer(tokenizer, model)
