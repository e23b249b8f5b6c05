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
character, the way vLLM detokenizes: it keeps a prefix offset and a read offset into the ids,
decodes only the few ids from the prefix offset on (``decode_piece``: no clean-up of spaces,
which would rewrite text already sent), and emits what that adds past the already-read part.
Each token costs a window of a few ids, never a re-decode of the whole output, and the answer of
a non-streamed request is the same deltas joined, so streamed and non-streamed text are equal
for every tokenizer. ``encode_limited`` refuses a text with more than a limit of tokens after
tokenizing a bounded head of it, not the whole text.

A model that is not a random-weight one must come with its tokenizer: ``load`` raises
``ModelError`` rather than serve a real model through the byte tokenizer. ``check`` finds that out
(and converts a registry model once) without importing transformers, so a server can refuse a model
before it starts workers and build the tokenizer while they load.
Not here: loading models (``kvcache.model.hf``), request validation (``protocol``).
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol

from kvcache.errors import ModelError, ProtocolError


class Tokenizer(Protocol):
    name: str
    stop_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def decode_piece(self, token_ids: list[int]) -> str: ...

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

    decode_piece = decode

    def encode_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(plain_chat_text(messages, add_generation_prompt))


class HFTokenizer:
    """A transformers tokenizer (as ``kvcache.model.hf.load_tokenizer`` returns it)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else [])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def decode_piece(self, token_ids: list[int]) -> str:
        tokens = self.tokenizer.convert_ids_to_tokens(token_ids, skip_special_tokens=True)
        return str(self.tokenizer.convert_tokens_to_string(tokens)) if tokens else ""

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
    """Text deltas for a growing list of ids; ``text`` is every delta so far, joined."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] decode to text already sent; they give the context
        self._read = 0
        self._bytes = (
            codecs.getincrementaldecoder("utf-8")(errors="replace")
            if isinstance(tokenizer, ByteTokenizer)
            else None
        )

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._bytes is not None:
            delta = self._bytes.decode(bytes([token_id % 256]))
        else:
            delta = self._advance(final=False)
        self.text += delta
        return delta

    def _advance(self, final: bool) -> str:
        piece = self.tokenizer.decode_piece
        sent = piece(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        text = piece(self.ids[self._prefix :])
        if not final and (len(text) <= len(sent) or text.endswith("\ufffd")):
            return ""  # an incomplete character, or a token that adds no text yet: wait
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(sent) :]

    def flush(self) -> str:
        if self._bytes is not None:
            delta = self._bytes.decode(b"", final=True)
        else:
            delta = self._advance(final=True) if self._read < len(self.ids) else ""
        self.text += delta
        return delta


class StopText:
    """Cuts a stream of text deltas before the first of ``stops`` (OpenAI's ``stop``): ``push``
    returns the text that is safe to send now, holding back a tail short enough to be the start of
    a stop string; ``stopped`` turns true once one appeared (the stop string itself is never sent)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        self.pending += delta
        hits = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = len(self.pending) - self.hold  # a shorter tail may still begin a stop string
        if keep <= 0:
            return ""
        out, self.pending = self.pending[:keep], self.pending[keep:]
        return out

    def flush(self) -> str:
        """The held-back tail at the end of the stream (no stop string completed in it)."""
        out, self.pending = self.pending, ""
        return out


def encode_limited(tokenizer: Tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """``tokenizer.encode(text)``; ``ProtocolError`` past ``max_tokens``. A long text's head is
    tokenized first, so a huge prompt is refused for the cost of a bounded part of it."""
    if max_tokens is not None:
        head_chars = 16 * (max_tokens + 1)
        if len(text) > head_chars and len(tokenizer.encode(text[:head_chars])) > max_tokens + 2:
            raise ProtocolError(
                f"the prompt has more than {max_tokens} tokens; this server accepts at "
                f"most {max_tokens} (--max-prompt-tokens): shorten it"
            )
    token_ids = tokenizer.encode(text)
    if max_tokens is not None and len(token_ids) > max_tokens:
        raise ProtocolError(
            f"the prompt has {len(token_ids)} tokens; this server accepts at most "
            f"{max_tokens} (--max-prompt-tokens): shorten it"
        )
    return token_ids


def _random_weights(model: str) -> bool:
    if model.startswith("tiny") and not Path(model).exists():
        return True  # decided without importing the registry's lists
    from kvcache.model.registry import random_weight_names

    return model in random_weight_names()


def _no_tokenizer(model: str) -> ModelError:
    return ModelError(
        f"model {model!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
        "tokenizer.model or vocab.json) in its folder or the Hugging Face cache (is the "
        "name right?); save the tokenizer with the checkpoint, or serve a random-weight "
        "model (tiny, ...)"
    )


def check(model: str) -> None:
    """That :func:`load` will find its files, in a fraction of its time: a registry model is
    converted now if it is not yet (once converted, this imports neither torch nor transformers),
    and a model without tokenizer files raises :func:`load`'s ``ModelError``."""
    if _random_weights(model):
        return
    from kvcache.model import registry

    if model in registry.REGISTRY:
        registry.prepare(model)  # a converted folder holds the tokenizer's files
    elif not registry.has_tokenizer_files(model):
        raise _no_tokenizer(model)


def load(model: str, vocab_size: int = 256) -> Tokenizer:
    """``ByteTokenizer(vocab_size)`` for a random-weight model, else the model's HF tokenizer (a
    registry name's is converted on first use); ``ModelError`` for a model without one."""
    if _random_weights(model):
        return ByteTokenizer(vocab_size)  # random-weight models: no need to import transformers
    from kvcache.model.registry import load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise _no_tokenizer(model)
    return HFTokenizer(tokenizer, model)
