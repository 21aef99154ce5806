#!/usr/bin/env bash
# Two builds of dcrf-demo side by side (e.g. before and after a refactor), alternating, each
# server pinned to CPU 0 and the generator to CPU 1, on a fresh SQLite file per server start:
# echo (50 × 16), retrieve (50 × 1) and fan-out to 1,000 instance subscribers, 5 s each, twice.
#
#   OLD=path/to/old/dcrf-demo NEW=target/release/dcrf-demo bench/compare-builds.sh out.jsonl
#
# BENCH [target/release/dcrf-bench] is the load generator used for both.
set -u
OLD="${OLD:?path of the old dcrf-demo}"
NEW="${NEW:?path of the new dcrf-demo}"
BENCH="${BENCH:-target/release/dcrf-bench}"
out="${1:?output .jsonl}"
: >"$out"
ulimit -n 20000 2>/dev/null || true
run() { # label demo scenario path flags...
  local label=$1 demo=$2 scen=$3 path=$4
  shift 4
  local dir
  dir=$(mktemp -d)
  # Environment, not flags: builds older than the connection caps ignore it.
  DCRF_DEMO_MAX_CONNECTIONS=100000 DCRF_DEMO_MAX_CONNECTIONS_PER_IP=100000 \
    taskset -c 0 "$demo" --bind 127.0.0.1:18499 --database "sqlite://$dir/db.sqlite3?mode=rwc" \
    --seed 1000 >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18499) 2>/dev/null && break; sleep 0.1; done
  taskset -c 1 "$BENCH" "$scen" --url "ws://127.0.0.1:18499$path" --duration 5 --warmup 1 \
    --server-pid "$pid" --label "$label" --json "$@" 2>/dev/null | tail -1 |
    python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['build']='$label'; print(json.dumps(r))" >>"$out"
  kill "$pid"
  wait "$pid" 2>/dev/null
  rm -rf "$dir"
}
for _ in 1 2; do
  for build in old new; do
    demo=$OLD
    [ "$build" = new ] && demo=$NEW
    run "$build" "$demo" echo /ws/echo/ --connections 50 --window 16
    run "$build" "$demo" retrieve /ws/todos/ --connections 50 --window 1 --rows 1000
    run "$build" "$demo" fanout /ws/todos/ --connections 1000 --subscribe instance --pk 1 --timeout 60
  done
done
python3 - "$out" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    v = r.get("deliveries_per_s") or r.get("msgs_per_s")
    print(f"{r['scenario']:9} {r['build']:4} {v:12,.0f}/s  p50 {r.get('p50_us', 0):10,.1f} µs  "
          f"p99 {r.get('p99_us', 0):10,.1f} µs  errors {r.get('errors')} lost {r.get('lost')}")
PY
