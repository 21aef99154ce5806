#!/usr/bin/env bash
# Echo throughput of one dcrf-demo build with the Prometheus recorder installed (the default)
# and without it (`--no-metrics`), alternating, each server pinned to CPU 0 and the generator
# to CPU 1, on a fresh SQLite file per server start: echo (50 connections × 16 in flight),
# DURATION seconds measured after 1 s of warm-up, ROUNDS times each.
#
#   bench/metrics-overhead.sh bench/results/metrics-overhead.jsonl
#
# DEMO [target/release/dcrf-demo], BENCH [target/release/dcrf-bench], DURATION [10], ROUNDS [2].
# After each run with metrics on, the server's /metrics is scraped and its
# dcrf_messages_received_total added to the result (proof the recorder counted the run).
set -u
DEMO="${DEMO:-target/release/dcrf-demo}"
BENCH="${BENCH:-target/release/dcrf-bench}"
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-2}"
out="${1:?output .jsonl}"
: >"$out"
ulimit -n 20000 2>/dev/null || true
port=18498
run() { # label demo-flags...
  local label=$1
  shift
  local dir
  dir=$(mktemp -d)
  DCRF_DEMO_MAX_CONNECTIONS=100000 DCRF_DEMO_MAX_CONNECTIONS_PER_IP=100000 \
    taskset -c 0 "$DEMO" --bind "127.0.0.1:$port" --database "sqlite://$dir/db.sqlite3?mode=rwc" \
    "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  local result
  result=$(taskset -c 1 "$BENCH" echo --url "ws://127.0.0.1:$port/ws/echo/" --duration "$DURATION" \
    --warmup 1 --server-pid "$pid" --label "$label" --json --connections 50 --window 16 \
    2>/dev/null | tail -1)
  local counted=None
  if [ "$label" = metrics-on ]; then
    counted=$(curl -s "http://127.0.0.1:$port/metrics" |
      awk '$1 == "dcrf_messages_received_total" { print $2 }')
    counted=${counted:-None}
  fi
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); r['metrics']='$label'; r['server_counted_received']=$counted; print(json.dumps(r))" \
    "$result" >>"$out"
  kill "$pid"
  wait "$pid" 2>/dev/null
  rm -rf "$dir"
}
for _ in $(seq 1 "$ROUNDS"); do
  run metrics-on
  run metrics-off --no-metrics
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    print(f"{r['metrics']:11} {r['msgs_per_s']:12,.0f} msg/s  p50 {r.get('p50_us', 0):8,.1f} µs  "
          f"p99 {r.get('p99_us', 0):8,.1f} µs  errors {r.get('errors')}  counted {r.get('server_counted_received')}")
mean = lambda k: sum(r['msgs_per_s'] for r in rows if r['metrics'] == k) / max(1, sum(r['metrics'] == k for r in rows))
on, off = mean('metrics-on'), mean('metrics-off')
print(f"mean on {on:,.0f} msg/s, off {off:,.0f} msg/s, on/off {on / off:.3f}")
PY
