#!/usr/bin/env bash
# Soak test: two dcrf-demo nodes on PostgreSQL with a Redis channel layer under mixed load
# (requests, writes, subscribe_to_all and live-list subscribers, connection churn, slow readers
# that never read) for a while, with faults: the Redis server restarted and the nodes'
# PostgreSQL backends terminated, alternately every SOAK_FAULT_SECONDS. Every 10 s it prints
# the elapsed time, each node's RSS and open fds, requests ok / errors and the acknowledged
# writes lost so far; at the end it checks that every acknowledged create exists (by the API's
# `list`) and that every subscriber that stayed connected saw it or was sent a resync.
#
#   bench/soak.sh [--minutes N]          # default 10
#
# Settings (environment): DCRF_DEMO_BIN (else a release build), SOAK_PG_URL (a PostgreSQL
# database the script may create a schema in; default postgres://postgres@127.0.0.1:5432/test),
# SOAK_FAULT_SECONDS (75), SOAK_SEED (100), SOAK_WORKERS (6), SOAK_WRITERS (4),
# SOAK_SUBSCRIBERS (4), SOAK_SLOW_READERS (4), SOAK_PAUSE_MS (2, between one worker's requests).
#
# Nothing shared is disturbed: Redis is a private redis-server on a free loopback port (without
# persistence, so a restart loses every stream: subscribers get resyncs), the tables live in a
# schema of their own (dropped at exit), and the backends terminated are only those whose
# application_name is the run's own. Exit status: 0 when nothing was lost.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    *) echo "usage: bench/soak.sh [--minutes N]" >&2; exit 2 ;;
  esac
done

pg_url="${SOAK_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
for tool in redis-server redis-cli psql node npm; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 1; }
done

if [[ -z "${DCRF_DEMO_BIN:-}" ]]; then
  cargo build --release -p dcrf-demo
  DCRF_DEMO_BIN="${CARGO_TARGET_DIR:-target}/release/dcrf-demo"
fi
(cd bench/soak && npm ci --no-audit --no-fund --silent)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tmp="$(mktemp -d)"
schema="dcrf_soak_$$"
app="dcrf_soak_$$"
redis_port="$(free_port)"
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  psql "$pg_url" -qc "drop schema if exists $schema cascade" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

start_redis() {
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$tmp/redis.pid" --logfile "$tmp/redis.log" --dir "$tmp"
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "error: redis-server did not start" >&2
  exit 1
}
start_redis

psql "$pg_url" -qc "create schema $schema" >/dev/null
db_url="$pg_url?options=-c%20search_path%3D$schema&application_name=$app"

nodes=()
node_pids=()
for i in 0 1; do
  seed=0
  [[ $i -eq 0 ]] && seed="${SOAK_SEED:-100}"
  port="$(free_port)"
  NO_COLOR=1 RUST_LOG="${RUST_LOG:-warn}" "$DCRF_DEMO_BIN" --bind "127.0.0.1:$port" --database "$db_url" \
    --layer "redis://127.0.0.1:$redis_port" --seed "$seed" \
    --max-connections 100000 --max-connections-per-ip 100000 \
    >"$tmp/node$i.out" 2>"$tmp/node$i.log" &
  pids+=($!)
  node_pids+=($!)
  for _ in $(seq 100); do grep -q "listening on" "$tmp/node$i.out" && break; sleep 0.1; done
  grep -q "listening on" "$tmp/node$i.out" || { cat "$tmp/node$i.log" >&2; exit 1; }
  nodes+=("ws://127.0.0.1:$port")
  # Node 0 creates and seeds the table; node 1 starts after it.
done

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "nodes: ${nodes[*]} (pids ${node_pids[*]}), redis 127.0.0.1:$redis_port, schema $schema"

export SOAK_NODES="$(IFS=,; echo "${nodes[*]}")"
export SOAK_PIDS="$(IFS=,; echo "${node_pids[*]}")"
export SOAK_SECONDS=$((minutes * 60))
export SOAK_REDIS_RESTART="redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1; sleep 2; \
redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
--pidfile $tmp/redis.pid --logfile $tmp/redis.log --dir $tmp && echo 'down 2 s'"
export SOAK_PG_TERMINATE="psql '$pg_url' -Atc \"select count(pg_terminate_backend(pid)) || ' backends' \
from pg_stat_activity where application_name = '$app' and pid <> pg_backend_pid()\""
# shellcheck disable=SC2016
export SOAK_PG_IDS="psql '$pg_url' -Atc \"select id from $schema.todo where id > \$1\""

status=0
node bench/soak/soak.mjs || status=$?
strip_ansi() { sed -E 's/\x1b\[[0-9;]*m//g' "$1"; }
for i in 0 1; do
  strip_ansi "$tmp/node$i.log" >"$tmp/node$i.txt"
  kill -0 "${node_pids[$i]}" 2>/dev/null || { echo "node $i died:"; tail -20 "$tmp/node$i.log"; status=1; }
  echo "node $i log: $(grep -c ' WARN ' "$tmp/node$i.txt" || true) warnings, $(grep -c ' ERROR ' "$tmp/node$i.txt" || true) errors; the most frequent:"
  grep -E ' (WARN|ERROR) ' "$tmp/node$i.txt" | sed -E 's/^[^ ]+ +//' | cut -c1-150 | sort | uniq -c | sort -rn | head -5 || true
done
exit $status
