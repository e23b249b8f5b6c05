"""``kvcache serve`` refuses to start what cannot serve: one error line naming the cause, exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kvcache.child import python_argv
from kvcache.cli import main
from kvcache.errors import ModelError
from kvcache.model import tokenize
from kvcache.redis_server import _ping, start_redis
from kvcache.serve import auth


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``kvcache serve ARGS`` in-process; it must fail with exit 2; returns its stderr."""
    assert main(["serve", "--port", str(free_port()), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_worker_that_cannot_start_stops_serve_with_its_error() -> None:
    with start_redis() as redis:
        cmd = [
            *python_argv(),
            "-m",
            "kvcache.cli",
            "serve",
            "--port",
            str(free_port()),
            "--device",
            "nosuchdevice",
            "--workers",
            "1",
            "--model",
            "tiny",
        ]
        env = {**os.environ, auth.REDIS_URL_ENV: redis.url}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # start: seconds
    err = done.stderr
    assert done.returncode == 2 and "Traceback" not in err, err
    assert "worker w0 exited with code 2 before joining" in err
    assert "--device 'nosuchdevice' is not a torch device" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--num-blocks", "-1"), "--num-blocks=-1 must be >= 1"),
        (
            ("--policy", "bogus"),
            "round_robin, random, least_loaded, lpm, dynamo, sglang, lpm_balanced, affinity",
        ),
        (("--latency", "/nonexistent/lat.json"), "cannot read a latency model from /nonexistent/lat.json"),
        (("--redis", "redis://127.0.0.1:{port}/0"), "cannot reach Redis at 127.0.0.1:"),
        (("--model", "nosuch-model"), "model 'nosuch-model' has no tokenizer files"),
        (
            ("--redis", "redis://127.0.0.1:{port}/0", "--pod-tier-memory", "1gb"),
            "--pod-tier-memory sizes the Redis serve starts",
        ),
    ],
)
def test_bad_settings_fail_before_any_worker_starts(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    args = tuple(a.format(port=free_port()) for a in args)
    assert needle in serve(capsys, *args)


@pytest.mark.parametrize("size", ["0", "2tb", "lots", "-1gb"])
def test_a_bad_pod_tier_memory_is_refused_while_parsing(
    capsys: pytest.CaptureFixture[str], size: str
) -> None:
    with pytest.raises(SystemExit, match="2"):
        main(["serve", f"--pod-tier-memory={size}"])
    assert (
        f"--pod-tier-memory: {size!r} must be a size above 0 such as '512mb' or '2gb'"
        in capsys.readouterr().err
    )


def test_a_checkpoint_without_tokenizer_files_is_an_error(tmp_path: Path) -> None:
    from kvcache.model.hf import tiny_config

    tiny_config("tiny").save_pretrained(tmp_path)  # config.json only, no tokenizer files
    with pytest.raises(ModelError, match="has no tokenizer files"):
        tokenize.check(str(tmp_path))  # what serve runs before starting workers: names only
    with pytest.raises(ModelError, match="has no tokenizer files"):
        tokenize.load(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    tokenize.check(str(tmp_path))  # a file by that name is there: the load will tell the rest
    for name in ("tiny", "tiny-gpt2", "small-qwen2"):
        tokenize.check(name)  # random-weight models need no files


def test_redis_script_stops_its_server_on_sigterm(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "redis.sh"
    url_file = tmp_path / "redis-url"
    env = {**os.environ, "KVCACHE_REDIS_URL_FILE": str(url_file)}
    process = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        shown, path = process.stdout.readline().decode().split()  # printed once redis-server answers
        assert Path(path) == url_file and url_file.stat().st_mode & 0o077 == 0  # only the owner reads it
        url = urlsplit(url_file.read_text().strip())
        assert url.password and url.password not in shown and "***" in shown  # never printed
        port, password = int(url.port or 0), url.password
        assert _ping(port, password)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _ping(port, password) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _ping(port, password)  # no orphaned redis-server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serving_is_announced_once_every_worker_is_ready(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        *python_argv(),
        "-m",
        "kvcache.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        "2",
        "--model",
        "tiny",
        "--num-blocks",
        "64",
    ]
    env = {k: v for k, v in os.environ.items() if k not in (auth.REDIS_URL_ENV, auth.SECRET_ENV)}
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    watchdog = threading.Timer(300, process.kill)  # a hang fails the test instead of blocking it
    watchdog.start()
    try:
        assert process.stdout is not None
        lines = iter(process.stdout.readline, b"")  # workers print to the same stdout
        line = next((x.decode() for x in lines if x.startswith(b"kvcache serving")), "(none)")
        assert line == f"kvcache serving tiny on http://127.0.0.1:{port}\n", err_path.read_text()
        # Announced means answered: both workers have joined.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"workers": 2, "redis": True}
        progress = [s for s in err_path.read_text().splitlines() if s.startswith("kvcache:")]
        assert progress[0] == "kvcache: starting 2 worker(s) of tiny; waiting for them to load"
        ready = progress[1:]  # "kvcache: worker w1 ready (1/2)": in the order they joined
        assert [s.split()[-1] for s in ready] == ["(1/2)", "(2/2)"]
        assert sorted(s.split()[2] for s in ready) == ["w0", "w1"]
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_worker_flags_carry_dtype_and_device() -> None:
    from kvcache.serve.launch import WorkerArgs

    argv = WorkerArgs(dtype="bfloat16", device="cpu").argv("w3")
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--device") + 1] == "cpu"
    assert "--dtype" not in WorkerArgs().argv("w3")


class FakeRedis:
    """Stands in for ``redis_server.start_redis`` where serve stops before anything uses Redis."""

    url = "redis://127.0.0.1:1/0"
    stops_with_parent = True

    def __init__(self, **kwargs: object) -> None:
        pass

    def stop(self) -> None:
        pass


def test_the_front_builds_its_tokenizer_while_the_workers_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both sides import transformers' model code (seconds): the workers are started first and the
    front builds its tokenizer meanwhile. A model without tokenizer files is still refused before
    any worker starts, and a registry model is converted (``tokenize.check``) before they start."""
    from kvcache import redis_server
    from kvcache.errors import ConfigError
    from kvcache.serve import launch

    calls: list[str] = []
    load = tokenize.load

    def spawn_workers(args: launch.WorkerArgs, redis_url: str, secret: bytes, n: int) -> list[object]:
        calls.append(f"start {n} worker(s) of {args.model}")
        return []

    def load_tokenizer(model: str, vocab_size: int = 256) -> tokenize.Tokenizer:
        calls.append(f"tokenizer of {model}")
        return load(model, vocab_size)

    def make_front(**kwargs: object) -> None:
        raise ConfigError("stopped before serving")

    monkeypatch.setattr(redis_server, "start_redis", FakeRedis)
    monkeypatch.setattr(launch, "spawn_workers", spawn_workers)
    monkeypatch.setattr(tokenize, "load", load_tokenizer)
    monkeypatch.setattr(launch, "make_front", make_front)
    assert "stopped before serving" in serve(capsys, "--model", "tiny", "--workers", "2")
    assert calls == ["start 2 worker(s) of tiny", "tokenizer of tiny"]
    calls.clear()
    assert "model 'nosuch-model' has no tokenizer files" in serve(capsys, "--model", "nosuch-model")
    assert calls == []


def test_read_timeout_reaches_the_front(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--read-timeout S``: how long the front waits on a silent worker (long prompts queued on a slow
    CPU wait longer than the default 60 s for their first token)."""
    from kvcache import redis_server
    from kvcache.errors import ConfigError
    from kvcache.serve import launch

    seen: dict[str, object] = {}

    def make_front(**kwargs: object) -> None:
        seen.update(kwargs)
        raise ConfigError("stopped before serving")

    monkeypatch.setattr(redis_server, "start_redis", FakeRedis)
    monkeypatch.setattr(launch, "spawn_workers", lambda *args: [])
    monkeypatch.setattr(launch, "make_front", make_front)
    assert "stopped before serving" in serve(capsys, "--model", "tiny", "--read-timeout", "600")
    assert seen["read_timeout_s"] == 600.0
    seen.clear()
    serve(capsys, "--model", "tiny")
    assert seen["read_timeout_s"] == 60.0
    seen.clear()
    with pytest.raises(SystemExit, match="2"):
        main(["serve", "--model", "tiny", "--read-timeout", "0"])
    assert "--read-timeout: '0' must be a number > 0" in capsys.readouterr().err
    assert seen == {}  # refused while parsing


def test_make_front_sets_the_read_timeout() -> None:
    from kvcache.serve import auth as serve_auth
    from kvcache.serve.config import ServeConfig
    from kvcache.serve.launch import make_front

    front = make_front(
        config=ServeConfig.load(None),
        model="tiny",
        tokenizer=tokenize.load("tiny"),
        redis_url="redis://127.0.0.1:1/0",
        policy="affinity",
        mode="precise",
        block_size=16,
        keys=serve_auth.DeploymentKeys.from_secret(serve_auth.new_secret()),
        read_timeout_s=600.0,
    )
    assert front.read_timeout_s == 600.0


def _pids(match: Callable[[int, list[bytes], str, int], bool]) -> list[int]:
    """Pids of the processes for which ``match(pid, argv, name, parent pid)`` holds."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid = int(entry.name)
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            name, rest = (entry / "stat").read_text().split(") ", 1)
            if match(pid, argv, name.split("(", 1)[1], int(rest.split()[1])):
                pids.append(pid)
        except (OSError, ProcessLookupError, ValueError, IndexError):
            continue  # gone meanwhile
    return pids


def _workers_of(pgid: int) -> list[int]:
    """Pids of the ``kvcache worker`` processes in process group ``pgid``."""
    return _pids(
        lambda pid, argv, _name, _ppid: (
            os.getpgid(pid) == pgid and b"worker" in argv and b"kvcache.cli" in argv
        )
    )


def _redis_children(pid: int) -> list[int]:
    """Pids of the ``redis-server`` processes whose parent is ``pid``."""
    return _pids(lambda _pid, _argv, name, ppid: name == "redis-server" and ppid == pid)


def _running(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith(("Z", "X"))
    except FileNotFoundError:
        return False


def test_workers_and_redis_stop_by_themselves_when_serve_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves ``kvcache serve`` no chance to stop its workers or its Redis: they stop anyway."""
    port = free_port()
    cmd = python_argv(
        "-m", "kvcache.cli", "serve", "--port", str(port), "--workers", "1", "--model", "tiny",
        "--num-blocks", "64",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in (auth.SECRET_ENV, auth.REDIS_URL_ENV)}
    with (tmp_path / "log").open("wb") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
    redis: list[int] = []
    try:
        assert process.stdout is not None
        lines = iter(process.stdout.readline, b"")
        assert any(x.startswith(b"kvcache serving") for x in lines), (tmp_path / "log").read_text()
        assert len(_workers_of(process.pid)) == 1
        redis = _redis_children(process.pid)
        assert len(redis) == 1, "serve starts one Redis of its own"
        config = Path(f"/proc/{redis[0]}/cwd/redis.conf").read_text()  # its folder is its working dir
        assert "maxmemory 2gb\n" in config and "maxmemory-policy allkeys-lru\n" in config  # bounded
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 60  # the worker checks its parent every second, then stops
        while (_workers_of(process.pid) or _running(redis[0])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _workers_of(process.pid) == [], (tmp_path / "log").read_text()[-2000:]
        assert not _running(redis[0]), "the Redis serve started outlived it"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever else serve started
        for pid in redis:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
