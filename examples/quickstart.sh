#!/usr/bin/env bash
# Runs the example agent through the sidecar against a local Redis, then reads the run back
# with `tail`. Uses REDIS_URL (default redis://localhost:6379/0); when nothing answers there,
# starts a throwaway redis-server on a free port and stops it at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
PY=.venv/bin/python
URL="${REDIS_URL:-redis://localhost:6379/0}"
tmp=""
cleanup() {
    if [ -n "$tmp" ]; then
        [ -f "$tmp/redis.pid" ] && kill "$(cat "$tmp/redis.pid")" 2>/dev/null || true
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
if ! "$PY" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()" "$URL" \
        >/dev/null 2>&1; then
    command -v redis-server >/dev/null || { echo "no Redis at $URL and no redis-server to start" >&2; exit 1; }
    tmp="$(mktemp -d)"
    port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" \
        --daemonize yes --pidfile "$tmp/redis.pid" --logfile "$tmp/redis.log"
    URL="redis://127.0.0.1:$port/0"
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "== started a throwaway redis-server at $URL"
fi
RUN_ID="demo-$(date +%s)"
echo "== running the example agent through the sidecar (run id $RUN_ID); its output is echoed as usual:"
set +e
"$PY" -m sidecar --redis-url "$URL" --run-id "$RUN_ID" -- "$PY" examples/llm_agent.py
code=$?
set -e
echo "== agent exited with $code; what Redis holds, read back with: python -m sidecar tail $RUN_ID"
"$PY" -m sidecar tail "$RUN_ID" --redis-url "$URL"
echo "== the same as structured records (first 5): python -m sidecar tail $RUN_ID --json"
"$PY" -m sidecar tail "$RUN_ID" --redis-url "$URL" --json --no-status | head -n 5
