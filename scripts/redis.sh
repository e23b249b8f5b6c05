#!/usr/bin/env bash
# Install (Debian's package, when missing) and start a private redis-server on loopback, then print
# its URL and wait; Ctrl-C stops it. Usage: scripts/redis.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python - "$@" <<'PY'
import sys, time
from kvcache.redis_server import start_redis
server = start_redis(int(sys.argv[1]) if len(sys.argv) > 1 else None)
print(server.url, flush=True)
try:
    while server.alive():
        time.sleep(1)
finally:
    server.stop()
PY
