#!/usr/bin/env bash
# Makes sure the PostgreSQL and Redis servers the tests use are running on loopback, starting
# them if they are installed but down. Prints the URLs to export.
# Under CI (CI=true) a service that is still unreachable after trying to start it is an error:
# CI must never go green on SQLite and the in-memory layer alone.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  if [[ -d /etc/postgresql ]]; then
    echo "starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
  for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
fi
if ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
  for _ in $(seq 1 50); do redis_up && break; sleep 0.2; done
fi

missing=()
if pg_up; then
  echo "export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
else
  missing+=(PostgreSQL)
fi
if redis_up; then
  echo "export REDIS_URL=redis://127.0.0.1:6379"
else
  missing+=(Redis)
fi
if [[ ${#missing[@]} -gt 0 && "${CI:-}" == "true" ]]; then
  echo "error: ${missing[*]} unreachable after trying to start it; CI needs both" >&2
  exit 1
fi
exit 0
