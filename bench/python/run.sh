#!/usr/bin/env bash
# Starts the Python DCRF baseline under uvicorn: one worker process, uvloop event loop,
# httptools HTTP parser, the sans-I/O `websockets` implementation, warnings-only logging.
# The script execs uvicorn, so its PID is the server's (for taskset and --server-pid). Run
# setup.sh first. The server prints nothing when ready: wait for the port to accept.
#
#   bench/python/run.sh --bind HOST:PORT [--seed N]
#
# --seed N replaces the todos with N fresh ones (ids 1..N) before starting.
# Environment: DATABASE_URL (postgres://user:password@host:port/name: PostgreSQL), else
# DCRF_BENCH_PY_DB (SQLite file, default bench/python/db.sqlite3) and
# DCRF_BENCH_SQLITE_SYNCHRONOUS (default FULL). See benchsite/settings.py.
set -euo pipefail
cd "$(dirname "$0")"

bind=127.0.0.1:8001
seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bind) bind="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
host="${bind%:*}"
port="${bind##*:}"

if [ ! -x .venv/bin/uvicorn ]; then
  echo "bench/python/.venv is missing: run bench/python/setup.sh first" >&2
  exit 1
fi
.venv/bin/python manage.py migrate --noinput -v 0
if [ -n "$seed" ]; then
  .venv/bin/python manage.py seed "$seed" >/dev/null
fi
exec .venv/bin/uvicorn benchsite.asgi:application \
  --host "$host" --port "$port" \
  --loop uvloop --http httptools --ws websockets-sansio \
  --log-level warning --no-access-log
