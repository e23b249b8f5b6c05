#!/usr/bin/env bash
# Install (Debian's package, when missing) and start a private redis-server on loopback; print its
# URL with the password masked, write the full URL to a file only you can read ($KVCACHE_REDIS_URL_FILE,
# default .redis-url here), and wait; Ctrl-C, SIGTERM or SIGHUP stops it (never left running).
# Usage: scripts/redis.sh [PORT]; then: KVCACHE_REDIS_URL="$(cat .redis-url)" kvcache serve ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python - "$@" <<'PY'
import os, signal, sys, time
from kvcache.redis_server import start_redis
# redis-server runs in its own session: stop it ourselves on every signal that ends this script.
for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
server = start_redis(int(sys.argv[1]) if len(sys.argv) > 1 else None)
path = os.path.abspath(os.environ.get("KVCACHE_REDIS_URL_FILE") or ".redis-url")
try:
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(server.url + "\n")
    print(server.url.replace(server.password, "***"), path, flush=True)
    while server.alive():
        time.sleep(1)
finally:
    server.stop()
PY
