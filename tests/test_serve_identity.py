"""Worker identity on a running deployment: a port squatter and a leaked worker credential.

Its own deployment (``serve_harness.deploy``), since the squatter test kills a worker for good.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from serve_harness import CONFIG, Deployment, deploy, ids
from test_serve_attacks import post

from kvcache.serve import auth

KEY = "sk-acme"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = deploy(tmp_path_factory.mktemp("identity"), workers=2, config=CONFIG)
    yield dep
    dep.stop()


class Squatter:
    """Listens on a dead worker's port and answers as a worker would, without the deployment's
    secret: a made-up proof to the challenge, then a token stream to anything else. Records every
    byte it is sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:  # the killed worker's socket is released within moments
            try:
                self.sock.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, f"port {port} was not released"
                time.sleep(0.01)
        self.sock.listen(16)
        self.received = bytearray()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(65536):
                    self.received += data
                    if data.startswith(b"GET /hello"):
                        body = b'{"worker_id": "w0", "instance": "guess", "proof": "' + b"00" * 16 + b'"}'
                    else:
                        body = b'{"token_id": 65, "index": 0, "prompt_tokens": 1, "cached_tokens": 0}\n'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
                        b"\r\n\r\n%s" % (len(body), body)
                    )
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def test_a_credential_captured_from_one_worker_opens_no_other(server: Deployment) -> None:
    workers = server.workers()
    keys = auth.DeploymentKeys.from_secret(server.secret)
    leaked = keys.worker_credential("w0", workers["w0"]["instance"])  # e.g. read off w0's traffic
    body = {
        "request_id": "leak-1",
        "token_ids": ids(9100, 40),
        "tenant": "acme",
        "group": None,
        "max_tokens": 1,
    }
    status, out = post(workers["w0"]["url"] + "/generate", body, leaked)
    assert status == 200 and b'"token_id"' in out  # it opens w0's current instance ...
    assert post(workers["w1"]["url"] + "/generate", {**body, "request_id": "leak-2"}, leaked) == (
        403,
        b'{"error": "wrong worker credential"}',
    )  # ... and no other worker
    old = keys.worker_credential("w0", "an-earlier-instance")  # one captured before w0 restarted
    assert post(workers["w0"]["url"] + "/generate", {**body, "request_id": "leak-3"}, old)[0] == 403


def test_a_squatter_on_a_dead_workers_port_gets_no_request_and_no_credential(server: Deployment) -> None:
    victim = server.workers()["w0"]
    os.kill(victim["pid"], signal.SIGKILL)
    squatter = Squatter(urlsplit(victim["url"]).port or 0)
    try:
        for seed in range(9200, 9240):  # until the router has tried w0 (its heartbeat lives 4 s more)
            prompt = ids(seed, 40)
            status, body = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 2}, key=KEY)
            assert status == 200 and body["usage"]["completion_tokens"] == 2  # w1 served it
            if squatter.connections:
                break
        assert squatter.connections >= 1, "no request was routed to the dead worker's address"
        assert "w0" not in server.workers()  # marked down at the failed challenge, not at heartbeat expiry
        received = bytes(squatter.received)
        assert received.startswith(b"GET /hello ")  # the challenge, and nothing after it
        assert b"POST" not in received and b"/generate" not in received and b"token_ids" not in received
        assert b"Authorization" not in received and b"acme" not in received
        assert "UnprovenWorker" in server.log_path.read_text()
    finally:
        squatter.close()
