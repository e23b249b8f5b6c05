#!/usr/bin/env bash
# Install (Debian's package, when missing) and start a private redis-server on loopback, then print
# its URL and wait; Ctrl-C, SIGTERM or SIGHUP stops it (never left running). Usage: scripts/redis.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python - "$@" <<'PY'
import signal, sys, time
from kvcache.redis_server import start_redis
# redis-server runs in its own session: stop it ourselves on every signal that ends this script.
for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
server = start_redis(int(sys.argv[1]) if len(sys.argv) > 1 else None)
print(server.url, flush=True)
try:
    while server.alive():
        time.sleep(1)
finally:
    server.stop()
PY
