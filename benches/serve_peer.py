"""What proving a worker costs per request: a pooled connection vs proven links, in one run.

    .venv/bin/python benches/serve_peer.py --requests 300 --rounds 3

One aiohttp server answers ``GET /hello`` (the challenge, ``serve.peer``) and ``POST /generate``
(a fixed two-line answer; no engine, so only transport and proof are timed). The baseline posts
over one pooled session, as the front did before workers proved themselves. Ours: a
``peer.LinkPool`` (what the front uses: the proof once per connection, connections kept), and a
``peer.connect`` link per request (a new connection and the challenge every time: the front's
cost when every kept connection has expired). Client and server share one process and event
loop, so both ends' CPU is in the figure. Prints the median latency of each, per round and over
rounds, the ratios to the baseline, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import aiohttp
from aiohttp import web

from kvcache.serve import auth, peer

KEYS = auth.DeploymentKeys.from_secret(bytes(range(32)))
IDENTITY = ("w0", "i0")


async def _hello(request: web.Request) -> web.Response:
    challenge = bytes.fromhex(request.headers[peer.CHALLENGE_HEADER])
    proof = KEYS.hello_proof(*IDENTITY, challenge)
    return web.json_response({"worker_id": IDENTITY[0], "instance": IDENTITY[1], "proof": proof})


async def _generate(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"token_id": 1, "index": 0}\n{"done": true}\n')


async def _median_ms(requests: int, send: object) -> float:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        await send()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


async def main(requests: int, rounds: int) -> None:
    app = web.Application()
    app.router.add_get(peer.HELLO_PATH, _hello)
    app.router.add_post("/generate", _generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    payload = json.dumps({"token_ids": list(range(512))})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=60)
    times: dict[str, list[float]] = {
        "pooled connection (baseline)": [],
        "LinkPool (ours)": [],
        "new link per request": [],
    }
    links = peer.LinkPool(KEYS, timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def baseline() -> None:
            headers = KEYS.call_headers(*IDENTITY)
            async with session.post(url + "/generate", data=payload, headers=headers) as r:
                await r.read()

        async def kept() -> None:
            async with links.link(url, IDENTITY) as link, link.post("/generate", data=payload) as r:
                await r.read()

        async def fresh() -> None:
            async with (
                peer.connect(url, KEYS, timeout=timeout, expect=IDENTITY) as link,
                link.post("/generate", data=payload) as r,
            ):
                await r.read()

        for _ in range(rounds):
            for name, send in zip(times, (baseline, kept, fresh), strict=True):
                times[name].append(await _median_ms(requests, send))
    await links.close()
    await runner.cleanup()
    base = statistics.median(next(iter(times.values())))
    for name, per_round in times.items():
        mid = statistics.median(per_round)
        rounds_ms = [round(x, 2) for x in per_round]
        print(f"{name:30s} {mid:.2f} ms/request ({mid / base:.1f}x)  rounds {rounds_ms}")
    print("load average", ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
