"""``kvcache route``: an OpenAI-compatible proxy that places requests on vLLM engines by what
their KV event streams say they cache.

Each engine is an HTTP base URL (``/v1/completions``, ``/v1/chat/completions``) with its ZMQ
event endpoint and, optionally, its replay endpoint. The proxy subscribes to every stream
(``vllm_events``), keeps a per-engine index bounded by the engines' pool size, mirrors it into
a ``Router`` (worker id = engine position), keys each request with ``vllm_keys`` and forwards
the request body unchanged to the engine the policy picks, streaming its answer back. Keys
need token ids: a completion whose ``prompt`` is a list of token ids is keyed (with its
``cache_salt`` and, when ``--lora`` names it, the LoRA adapter of its ``model``); text prompts
and chat messages are placed by load alone (no tokenizer here). The router's load accounting
counts a request from forwarding to the end of its response.

With ``api="kvcache"`` the engines are kvcache workers (``kvcache worker --vllm-events``): a
completion with token ids becomes their ``POST /generate`` and the answer an OpenAI
``text_completion`` carrying token ids. Not here: tokenizing, authentication, retries on another
engine (``kvcache serve``'s front does those for kvcache's own workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from kvcache.errors import ConfigError
from kvcache.events import BlockRemoved as KVRemoved
from kvcache.events import BlockStored as KVStored
from kvcache.router.router import Router, RouteRequest
from kvcache.router.vllm_events import EngineIndex, EventSubscriber
from kvcache.router.vllm_keys import VllmKeyer

_SCOPE = "vllm"
APIS = ("openai", "kvcache")  # what the engines speak: OpenAI (vLLM), or kvcache worker's /generate


@dataclass(frozen=True, slots=True)
class Engine:
    url: str
    events: str
    replay: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Engine:
        """``URL,EVENTS[,REPLAY]``, e.g. ``http://h:8000,tcp://h:5557,tcp://h:5558``."""
        parts = spec.split(",")
        if len(parts) not in (2, 3) or not parts[0].startswith(("http://", "https://")):
            raise ConfigError(
                f"--engine {spec!r} must be URL,EVENTS[,REPLAY], e.g. http://h:8000,tcp://h:5557"
            )
        return cls(parts[0].rstrip("/"), parts[1], parts[2] if len(parts) == 3 else None)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


def _token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(type(t) is int and t >= 0 for t in prompt)


def _key_bytes(key: int) -> bytes:
    return key.to_bytes(8, "big")


class RouteProxy:
    def __init__(
        self,
        engines: Sequence[Engine],
        keyer: VllmKeyer,
        capacity_blocks: int,
        policy: str = "affinity",
        lora_models: frozenset[str] = frozenset(),
        api: str = "openai",
        upstream_headers: Mapping[str, str] | None = None,
        connect_worker: Callable[[str], AbstractAsyncContextManager[Any]] | None = None,
    ) -> None:
        if not engines:
            raise ConfigError("kvcache route needs at least one --engine")
        if api not in APIS:
            raise ConfigError(f"api={api!r} is unknown; choose one of {APIS}")
        # Sent with every request to an OpenAI-API engine (e.g. its API key).
        self.upstream_headers = dict(upstream_headers or {})
        if api == "kvcache" and connect_worker is None:
            raise ConfigError("api='kvcache' needs connect_worker (serve.peer.opener): kvcache workers "
                              "answer only a caller that checked who they are")  # fmt: skip
        # kvcache workers: url -> a link to the worker there once it proved itself (``serve.peer``).
        self.connect_worker = connect_worker
        self.api = api
        self.engines = list(engines)
        self.keyer = keyer
        self.lora_models = lora_models
        self.router = Router(policy, "precise", keyer.block_size, capacity_blocks=capacity_blocks)
        self.index = EngineIndex(capacity_blocks)
        self.subscribers = []
        for w, engine in enumerate(self.engines):
            self.router.add_worker(w)
            self.subscribers.append(
                EventSubscriber(str(w), self.index, engine.events, engine.replay, on_change=self._mirror)
            )
        self.ids = itertools.count()
        self.session: aiohttp.ClientSession | None = None

    def _mirror(self, engine: str, stored: list[int], removed: list[int]) -> None:
        w = int(engine)
        held: dict[int, None] = self.index.keys_of.get(engine, {})
        events: list[KVStored | KVRemoved] = []
        for key in dict.fromkeys([*stored, *removed]):  # net effect of the batch
            if key in held:
                events.append(KVStored(_key_bytes(key), b"", 0, _SCOPE))
            else:
                events.append(KVRemoved(_key_bytes(key), 0, _SCOPE))
        self.router.on_events(w, events)

    def poll_events(self) -> int:
        return sum(sub.poll(0) for sub in self.subscribers)

    def place(self, body: dict[str, Any]) -> tuple[str, int]:
        """The request id and engine for one OpenAI request body."""
        request_id = f"route-{next(self.ids)}"
        prompt = body.get("prompt")
        keys: list[bytes] = []
        num_tokens = 1
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            model = body.get("model")
            lora = model if isinstance(model, str) and model in self.lora_models else None
            salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
            keys = [_key_bytes(k) for k in self.keyer.keys(prompt, lora, salt)]
            num_tokens = len(prompt)
        elif isinstance(prompt, str):
            num_tokens = max(1, len(prompt) // 4)  # a length estimate for the load model only
        return request_id, self.router.route(RouteRequest(request_id, keys, num_tokens, _SCOPE))

    async def forward(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "the body is not JSON", "code": 400}}, status=400)
        if not isinstance(body, dict):
            return web.json_response(
                {"error": {"message": "the body must be a JSON object", "code": 400}}, status=400
            )
        if self.api == "kvcache" and not _token_ids(body.get("prompt")):
            return _error(400, "kvcache workers take token ids: send 'prompt' as a list of token ids")
        self.poll_events()
        request_id, w = self.place(body)
        assert self.session is not None
        try:
            if self.api == "kvcache":
                return await self._generate(request_id, w, body)
            url = self.engines[w].url + request.path
            post = self.session.post(url, json=body, headers=self.upstream_headers)
            async with post as upstream:
                response = web.StreamResponse(status=upstream.status)
                response.content_type = upstream.content_type
                response.headers["x-kvcache-engine"] = str(w)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientError as exc:
            return _error(502, f"engine {w} ({self.engines[w].url}): {exc}")
        finally:
            self.router.on_finished(request_id)

    async def _generate(self, request_id: str, w: int, body: dict[str, Any]) -> web.Response:
        """One completion on a kvcache worker (``POST /generate``, NDJSON), answered as OpenAI's
        ``text_completion`` with the token ids and vLLM's ``prompt_tokens_details.cached_tokens``."""
        assert self.session is not None
        salt = body.get("cache_salt")
        request = {
            "request_id": request_id,
            "token_ids": body["prompt"],
            "tenant": salt if isinstance(salt, str) and salt else "default",
            "max_tokens": body.get("max_tokens", 16),
        }
        assert self.connect_worker is not None
        link = self.connect_worker(self.engines[w].url)
        async with link as worker, worker.post("/generate", json=request) as upstream:
            if upstream.status != 200:
                return _error(upstream.status, str((await upstream.json()).get("error", "engine error")))
            tokens: list[int] = []
            first: dict[str, Any] = {}
            async for raw in upstream.content:
                line = json.loads(raw)
                if "error" in line:
                    return _error(int(line.get("status", 500)), str(line["error"]))
                if "token_id" in line:
                    first = first or line
                    tokens.append(int(line["token_id"]))
        prompt_tokens = int(first.get("prompt_tokens", len(body["prompt"])))
        answer = {
            "id": request_id,
            "object": "text_completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "text": "", "token_ids": tokens, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
                "prompt_tokens_details": {"cached_tokens": int(first.get("cached_tokens", 0))},
            },
        }
        return web.json_response(answer, headers={"x-kvcache-engine": str(w)})

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

        async def pump() -> None:
            while True:
                self.poll_events()
                await asyncio.sleep(0.02)

        task = asyncio.create_task(pump())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.session.close()
        for sub in self.subscribers:
            sub.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_post("/v1/completions", self.forward)
        app.router.add_post("/v1/chat/completions", self.forward)
        app.cleanup_ctx.append(self._background)
        return app
