"""Text <-> token ids for the server and the chat demo: the model's HF tokenizer, or a byte-level
fallback.

Registry models (``smollm2-135m``) and local folders use their own tokenizer and chat template
(``apply_chat_template``), so each chat turn's tokens extend the previous turn's conversation
token for token and hit its cached blocks. ``stop_ids`` are the ids that end a reply (the HF
tokenizer's end-of-sequence token; none for bytes).

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
    stop_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def encode_chat(
        self, messages: list[tuple[str, str]], add_generation_prompt: bool = True
    ) -> list[int]: ...


def plain_chat_text(messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


class ByteTokenizer:
    """One id per UTF-8 byte; deterministic, no files, any model with ``vocab_size >= 256``."""

    name = "bytes"
    stop_ids: frozenset[int] = frozenset()

    def __init__(self, vocab_size: int = 256) -> None:
        if vocab_size < 256:
            raise ValueError(f"vocab_size={vocab_size} < 256: the byte tokenizer needs one id per byte")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t % 256 for t in token_ids).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(plain_chat_text(messages, add_generation_prompt))


class HFTokenizer:
    """A transformers tokenizer (as ``kvcache.hf.load_tokenizer`` returns it)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else [])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def encode_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The conversation as the model's chat template renders it; without the generation prompt
        it is the prefix every later turn starts with (e.g. a system prompt to publish)."""
        if getattr(self.tokenizer, "chat_template", None):
            conversation = [{"role": role, "content": content} for role, content in messages]
            ids = self.tokenizer.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=add_generation_prompt
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return self.encode(plain_chat_text(messages, add_generation_prompt))


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
    """The HF tokenizer of ``model`` (a registry name, converted on first use, or a local folder)
    when it has one, else ``ByteTokenizer(vocab_size)``."""
    if model.startswith("tiny") and not Path(model).exists():
        return ByteTokenizer(vocab_size)  # random-weight models: no need to import transformers
    from kvcache.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        return ByteTokenizer(vocab_size)
    return HFTokenizer(tokenizer, model)
