#!/usr/bin/env bash
# Side-by-side benchmarks: the raw WebSocket echo ceiling, dcrf-demo, and the Python DCRF 1.3
# baseline, each server pinned to one CPU and the load generator to another, with the same
# flags for every server. Results go to bench/results/*.jsonl; bench/report.py then writes
# the tables into BENCHMARKS.md and draws bench/results/chart.png.
#
#   bench/run.sh                         # everything, 10 s per run
#   QUICK=1 bench/run.sh                 # 2 s per run
#   QUICK=1 SCENARIOS="echo idle" bench/run.sh
#
# Scenarios (SCENARIOS, space-separated): echo retrieve list create patch fanout idle.
# Servers (SERVERS): raw dcrf python (raw only runs echo and idle).
#
# Environment (defaults in brackets):
#   DURATION [10; 2 with QUICK=1]  measured seconds per run
#   WARMUP [1; 0.5 with QUICK=1]   unmeasured seconds before each run
#   ROWS [1000]                    todos seeded on each server start
#   CONNECTIONS [50]               connections for echo/retrieve/list/create/patch
#   ECHO_WINDOW [16]               requests in flight per connection for echo
#   CRUD_WINDOW [1]                requests in flight per connection for the todo scenarios
#   FANOUT_SUBSCRIBERS ["100 1000 10000"]
#   FANOUT_SUBSCRIBE ["instance all"]   subscribe_instance and/or subscribe_to_all
#   FANOUT_TIMEOUT [120]           seconds a write may take to reach every subscriber
#   FANOUT_WARMUP [0]              warm-up for fan-out runs (subscribing is the warm-up; one
#                                  write to 10,000 subscribers can outlast a short warm-up)
#   IDLE_CONNECTIONS [10000]
#   IDLE_TIMEOUT [60]              seconds one handshake may take while 10,000 connect
#   SERVER_CPU [0], CLIENT_CPU [1] CPUs for taskset
#   PORT [18400]                   raw uses PORT, dcrf PORT+1, python PORT+2
#   DEMO_DATABASE [sqlite::memory:]  dcrf-demo --database
#   NO_BUILD=1                     skip the build
#   PROFILE [release]              cargo profile of the binaries (debug: only to try the script)
#   RESULTS [bench/results]
#   REPORT [BENCHMARKS.md]         the file whose generated section is rewritten
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  DURATION="${DURATION:-2}"
  WARMUP="${WARMUP:-0.5}"
  MODE=quick
else
  DURATION="${DURATION:-10}"
  WARMUP="${WARMUP:-1}"
  MODE=full
fi
SCENARIOS="${SCENARIOS:-echo retrieve list create patch fanout idle}"
SERVERS="${SERVERS:-raw dcrf python}"
ROWS="${ROWS:-1000}"
CONNECTIONS="${CONNECTIONS:-50}"
ECHO_WINDOW="${ECHO_WINDOW:-16}"
CRUD_WINDOW="${CRUD_WINDOW:-1}"
FANOUT_SUBSCRIBERS="${FANOUT_SUBSCRIBERS:-100 1000 10000}"
FANOUT_SUBSCRIBE="${FANOUT_SUBSCRIBE:-instance all}"
FANOUT_TIMEOUT="${FANOUT_TIMEOUT:-120}"
FANOUT_WARMUP="${FANOUT_WARMUP:-0}"
IDLE_CONNECTIONS="${IDLE_CONNECTIONS:-10000}"
IDLE_TIMEOUT="${IDLE_TIMEOUT:-60}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
PORT="${PORT:-18400}"
DEMO_DATABASE="${DEMO_DATABASE:-sqlite::memory:}"
RESULTS="${RESULTS:-bench/results}"
REPORT="${REPORT:-BENCHMARKS.md}"

PROFILE="${PROFILE:-release}"
case "$PROFILE" in
  debug|dev) PROFILE=dev; BIN=target/debug ;;
  *) BIN="target/$PROFILE" ;;
esac
BENCH="$BIN/dcrf-bench"
DEMO="$BIN/dcrf-demo"
PY=bench/python/.venv/bin/python

log() { echo "[bench] $*" >&2; }

# 10,000 connections need more file descriptors than the usual 1024.
if ! ulimit -n 65536 2>/dev/null; then
  ulimit -n "$(ulimit -Hn)"
fi
log "open files limit: $(ulimit -n)"
need=$IDLE_CONNECTIONS
for s in $FANOUT_SUBSCRIBERS; do [ "$s" -gt "$need" ] && need=$s; done
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((need + 256)) ]; then
  log "warning: the open files limit $(ulimit -n) is below the $((need + 256)) the largest run needs"
fi

if [ "${NO_BUILD:-0}" != 1 ]; then
  log "building $PROFILE binaries"
  if [ "$PROFILE" = release ]; then
    cargo build --release -p dcrf-demo -p dcrf-bench
  else
    cargo build --profile "$PROFILE" -p dcrf-demo -p dcrf-bench
  fi
fi
log "setting up the Python baseline"
bench/python/setup.sh --seed "$ROWS"

mkdir -p "$RESULTS"
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"

# Machine and toolchain facts for the report.
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit+uncommitted changes"
fi
cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
"$PY" - "$RESULTS/meta.json" <<EOF
import json, sys
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "mode": "$MODE",
    "duration_s": float("$DURATION"),
    "warmup_s": float("$WARMUP"),
    "nproc": int("$(nproc)"),
    "cpu_model": """$cpu_model""",
    "kernel": "$(uname -r)",
    "memory": "$(free -h | awk '/^Mem:/ {print $2}')",
    "loadavg": "$(cut -d' ' -f1-3 /proc/loadavg)",
    "rustc": "$(rustc --version 2>/dev/null || echo unknown)",
    "python": "$("$PY" --version 2>&1)",
    "commit": "$commit",
    "server_cpu": "$SERVER_CPU",
    "client_cpu": "$CLIENT_CPU",
    "rows": int("$ROWS"),
    "demo_database": "$DEMO_DATABASE",
    "profile": "$PROFILE",
    "scenarios": "$SCENARIOS",
    "invocation": "$( [ "$MODE" = quick ] && printf 'QUICK=1 ')SCENARIOS=\"$SCENARIOS\" bench/run.sh",
}, open(sys.argv[1], "w"), indent=2)
EOF

SERVER_PID=""
SERVER_URL=""

wait_port() {
  local port=$1 i
  for i in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      return 1
    fi
    sleep 0.2
  done
  return 1
}

# start_server NAME TAG: starts the server pinned to SERVER_CPU; sets SERVER_PID, SERVER_URL.
start_server() {
  local name=$1 tag=$2 port
  local logfile="$LOGS/$tag-$name.log"
  case "$name" in
    raw)
      port=$PORT
      taskset -c "$SERVER_CPU" "$BENCH" raw-echo --bind "127.0.0.1:$port" >"$logfile" 2>&1 &
      ;;
    dcrf)
      port=$((PORT + 1))
      RUST_LOG=warn taskset -c "$SERVER_CPU" "$DEMO" --bind "127.0.0.1:$port" \
        --database "$DEMO_DATABASE" --seed "$ROWS" >"$logfile" 2>&1 &
      ;;
    python)
      port=$((PORT + 2))
      taskset -c "$SERVER_CPU" bench/python/run.sh --bind "127.0.0.1:$port" --seed "$ROWS" \
        >"$logfile" 2>&1 &
      ;;
    *) log "unknown server $name"; return 1 ;;
  esac
  SERVER_PID=$!
  SERVER_URL="ws://127.0.0.1:$port"
  if ! wait_port "$port"; then
    log "error: $name did not start; see $logfile"
    stop_server
    return 1
  fi
  sleep 0.5
}

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

# bench_one TAG SERVER SCENARIO PATH [FLAGS...]: one run; appends its JSON line (with the
# server's name and the exact command) to RESULTS/TAG.jsonl.
bench_one() {
  local tag=$1 server=$2 scenario=$3 path=$4
  shift 4
  if ! start_server "$server" "$tag"; then
    record_failure "$tag" "$server" "$scenario" "server did not start" ""
    return 0
  fi
  local warmup=$WARMUP
  [ "$scenario" = fanout ] && warmup=$FANOUT_WARMUP
  local cmd=(taskset -c "$CLIENT_CPU" "$BENCH" "$scenario" --url "$SERVER_URL$path"
    --duration "$DURATION" --warmup "$warmup" --server-pid "$SERVER_PID" --label "$server"
    --json "$@")
  log "$tag / $server: ${cmd[*]}"
  local out err
  out="$(mktemp)"
  err="$LOGS/$tag-$server.bench.log"
  if "${cmd[@]}" >"$out" 2>"$err"; then
    "$PY" - "$out" "$RESULTS/$tag.jsonl" "$server" "$MODE" "${cmd[*]}" <<'EOF' || true
import json, sys
src, path, server, mode, command = sys.argv[1:6]
lines = [l for l in open(src).read().splitlines() if l.strip()]
row = json.loads(lines[-1])
row.update(server=server, mode=mode, command=command)
with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
EOF
    tail -n1 "$out" | cut -c1-200 >&2
  else
    log "warning: $tag / $server failed: $(tail -n3 "$err" | tr '\n' ' ')"
    record_failure "$tag" "$server" "$scenario" "$(tail -n3 "$err")" "${cmd[*]}"
  fi
  grep -i '^warning' "$err" >&2 || true
  rm -f "$out"
  stop_server
}

record_failure() {
  "$PY" - "$RESULTS/$1.jsonl" "$2" "$3" "$MODE" "$4" "$5" <<'EOF'
import json, sys
path, server, scenario, mode, error, command = sys.argv[1:7]
with open(path, "a") as f:
    f.write(json.dumps({"scenario": scenario, "server": server, "label": server, "mode": mode,
                        "failed": True, "error": error.strip(), "command": command}) + "\n")
EOF
}

# run_group TAG SERVERS SCENARIO PATH [FLAGS...]: the same run against each server.
run_group() {
  local tag=$1 servers=$2 scenario=$3 path=$4
  shift 4
  : >"$RESULTS/$tag.jsonl"
  local s
  for s in $servers; do
    case " $SERVERS " in *" $s "*) bench_one "$tag" "$s" "$scenario" "$path" "$@" ;; esac
  done
}

for scenario in $SCENARIOS; do
  case "$scenario" in
    echo)
      run_group echo "raw dcrf python" echo /ws/echo/ \
        --connections "$CONNECTIONS" --window "$ECHO_WINDOW"
      ;;
    retrieve|list|create|patch)
      run_group "$scenario" "dcrf python" "$scenario" /ws/todos/ \
        --connections "$CONNECTIONS" --window "$CRUD_WINDOW" --rows "$ROWS"
      ;;
    fanout)
      for how in $FANOUT_SUBSCRIBE; do
        for n in $FANOUT_SUBSCRIBERS; do
          run_group "fanout-$how-$n" "dcrf python" fanout /ws/todos/ \
            --connections "$n" --subscribe "$how" --pk 1 --timeout "$FANOUT_TIMEOUT"
        done
      done
      ;;
    idle)
      run_group idle "raw dcrf python" idle /ws/echo/ --connections "$IDLE_CONNECTIONS" \
        --timeout "$IDLE_TIMEOUT"
      ;;
    *)
      log "unknown scenario $scenario"
      exit 2
      ;;
  esac
done

log "writing the report"
"$PY" bench/report.py --results "$RESULTS" --output "$REPORT"
