#!/usr/bin/env bash
# Performance regression guard, bounded for CI (a few minutes on two cores once built):
#
#  1. the divan micro-benchmarks (crates/dcrf/benches/hot_path.rs), each function limited to
#     MICRO_MAX_TIME seconds: they must build and run; their figures are printed, not judged;
#  2. a short ratio run: dcrf-demo against the hand-written ceilings of the same machine,
#     echo vs `dcrf-bench raw-echo` and retrieve vs `dcrf-bench raw-retrieve` (on the SQLite
#     file dcrf-demo created with --seed ROWS), server pinned to SERVER_CPU and generator to
#     CLIENT_CPU, the same command shape as bench/run.sh. Demo and ceiling alternate ROUNDS
#     times; the best ratio of the rounds (demo msgs/s ÷ ceiling msgs/s) is compared with the
#     recorded one in GUARD_FILE, and the script fails if
#         ratio < recorded × (1 − margin)
#     or if any run had errors. Ratios rather than absolute rates: the machine is shared, and
#     both sides of a ratio see the same noise.
#
#   bench/guard.sh
#   NO_BUILD=1 NO_MICRO=1 bench/guard.sh       # ratio run only, binaries already built
#   ROUNDS=3 DURATION=5 bench/guard.sh         # longer, to re-record the ratios
#
# Environment (defaults in brackets):
#   DURATION [3]           measured seconds per run
#   WARMUP [1]             unmeasured seconds before each run
#   ROUNDS [2]             demo/ceiling alternations per scenario
#   ROWS [1000]            todos seeded by dcrf-demo
#   CONNECTIONS [50]       connections per run
#   ECHO_WINDOW [16]       requests in flight per connection for echo
#   CRUD_WINDOW [1]        requests in flight per connection for retrieve
#   SERVER_CPU [0], CLIENT_CPU [1]   CPUs for taskset
#   PORT [18500]           the servers listen on PORT (demo) and PORT+1 (ceilings)
#   MICRO_MAX_TIME [1]     divan's --max-time per benchmark function
#   GUARD_FILE [bench/guard.json]   recorded ratios and margins
#   GUARD_OUT              if set, the measured rows (JSON lines) are also written there
#   NO_BUILD=1             skip the release build
#   NO_MICRO=1             skip the micro-benchmarks
#   CARGO_TARGET_DIR       honoured: binaries are taken from $CARGO_TARGET_DIR/release
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DURATION="${DURATION:-3}"
WARMUP="${WARMUP:-1}"
ROUNDS="${ROUNDS:-2}"
ROWS="${ROWS:-1000}"
CONNECTIONS="${CONNECTIONS:-50}"
ECHO_WINDOW="${ECHO_WINDOW:-16}"
CRUD_WINDOW="${CRUD_WINDOW:-1}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
PORT="${PORT:-18500}"
MICRO_MAX_TIME="${MICRO_MAX_TIME:-1}"
GUARD_FILE="${GUARD_FILE:-bench/guard.json}"
GUARD_OUT="${GUARD_OUT:-}"

BIN="${CARGO_TARGET_DIR:-target}/release"
BENCH="$BIN/dcrf-bench"
DEMO="$BIN/dcrf-demo"

log() { echo "[guard +${SECONDS}s] $*" >&2; }

for tool in taskset jq python3; do
  if ! command -v "$tool" >/dev/null; then
    log "error: $tool is required"
    exit 2
  fi
done

started=$SECONDS

# One release build for the servers and the micro-benchmarks. Building the benchmark turns on
# dcrf's dev-dependency features (`testing`, `capture`) for the whole build, so the demo gets
# them too: a separate `cargo bench -p dcrf` would resolve its own feature set and compile dcrf
# and much of its dependency graph a second time (about a minute on two cores). Side by side,
# the demo with and without those features measured the same ratios (BENCHMARKS.md).
MICRO_BIN=""
if [ "${NO_BUILD:-0}" != 1 ]; then
  log "building release dcrf-demo, dcrf-bench and the micro-benchmarks"
  # Diagnostics go to stderr as usual; the artifact messages on stdout name the benchmark.
  MICRO_BIN="$(cargo build --release -p dcrf -p dcrf-demo -p dcrf-bench --bins --bench hot_path \
    --features dcrf/testing --message-format=json-render-diagnostics |
    jq -r 'select(.reason == "compiler-artifact" and .target.name == "hot_path")
      | .executable // empty' | tail -n 1)"
fi
for b in "$BENCH" "$DEMO"; do
  if [ ! -x "$b" ]; then
    log "error: $b is missing (build it, or unset NO_BUILD)"
    exit 2
  fi
done

if [ "${NO_MICRO:-0}" != 1 ]; then
  log "micro-benchmarks (divan, at most ${MICRO_MAX_TIME} s per function)"
  if [ -n "$MICRO_BIN" ]; then
    # As `cargo bench` runs it: from the package's directory, with `--bench`.
    (cd crates/dcrf && "$MICRO_BIN" --bench --max-time "$MICRO_MAX_TIME")
  else
    cargo bench -p dcrf --bench hot_path --features testing -- --max-time "$MICRO_MAX_TIME"
  fi
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/dcrf-guard.XXXXXX")"
DB="sqlite://$TMP/todos.sqlite3?mode=rwc"
ROWS_FILE="$TMP/rows.jsonl"
: >"$ROWS_FILE"
SERVER_PID=""

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
cleanup() {
  stop_server
  rm -rf "$TMP"
}
trap cleanup EXIT

wait_port() {
  local port=$1 i
  for i in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      return 1
    fi
    sleep 0.1
  done
  return 1
}

# start_server NAME: demo | raw-echo | raw-retrieve, pinned to SERVER_CPU.
start_server() {
  local name=$1 port logfile="$TMP/$1.log"
  case "$name" in
    demo)
      port=$PORT
      # All the generator's connections come from 127.0.0.1: lift the per-IP cap.
      DCRF_DEMO_MAX_CONNECTIONS=100000 DCRF_DEMO_MAX_CONNECTIONS_PER_IP=100000 \
      RUST_LOG=warn taskset -c "$SERVER_CPU" "$DEMO" --bind "127.0.0.1:$port" \
        --database "$DB" --seed "$ROWS" >>"$logfile" 2>&1 &
      ;;
    raw-echo)
      port=$((PORT + 1))
      taskset -c "$SERVER_CPU" "$BENCH" raw-echo --bind "127.0.0.1:$port" >>"$logfile" 2>&1 &
      ;;
    raw-retrieve)
      port=$((PORT + 1))
      taskset -c "$SERVER_CPU" "$BENCH" raw-retrieve --bind "127.0.0.1:$port" \
        --database "$DB" >>"$logfile" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  if ! wait_port "$port"; then
    log "error: $name did not start:"
    tail -n 20 "$logfile" >&2 || true
    stop_server
    exit 2
  fi
  sleep 0.3
  SERVER_URL="ws://127.0.0.1:$port"
}

# run_one SCENARIO SERVER ROUND PATH FLAGS...: one pinned run; appends its JSON row, with the
# server and round, to ROWS_FILE.
run_one() {
  local scenario=$1 server=$2 round=$3 path=$4
  shift 4
  start_server "$server"
  local out="$TMP/out.json" err="$TMP/bench.err"
  if ! taskset -c "$CLIENT_CPU" "$BENCH" "$scenario" --url "$SERVER_URL$path" \
    --duration "$DURATION" --warmup "$WARMUP" --server-pid "$SERVER_PID" --label "$server" \
    --json "$@" >"$out" 2>"$err"; then
    log "error: dcrf-bench $scenario against $server failed:"
    cat "$err" >&2
    stop_server
    exit 2
  fi
  stop_server
  tail -n 1 "$out" | jq -c --arg server "$server" --argjson round "$round" \
    '. + {server: $server, round: $round}' >>"$ROWS_FILE"
  log "$scenario / $server (round $round): $(tail -n 1 "$ROWS_FILE" | jq -r '.msgs_per_s | floor') msgs/s"
}

# The database: dcrf-demo creates and seeds it once; every retrieve run (demo and ceiling)
# reads this file.
log "seeding $ROWS todos"
start_server demo
stop_server

for round in $(seq 1 "$ROUNDS"); do
  run_one echo demo "$round" /ws/echo/ --connections "$CONNECTIONS" --window "$ECHO_WINDOW"
  run_one echo raw-echo "$round" /ws/echo/ --connections "$CONNECTIONS" --window "$ECHO_WINDOW"
  run_one retrieve demo "$round" /ws/todos/ --connections "$CONNECTIONS" \
    --window "$CRUD_WINDOW" --rows "$ROWS"
  run_one retrieve raw-retrieve "$round" /ws/todos/ --connections "$CONNECTIONS" \
    --window "$CRUD_WINDOW" --rows "$ROWS"
done

if [ -n "$GUARD_OUT" ]; then
  cp "$ROWS_FILE" "$GUARD_OUT"
fi

# Ratios, the table, the verdict.
status=0
python3 - "$ROWS_FILE" "$GUARD_FILE" <<'EOF' || status=$?
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
guard = json.load(open(sys.argv[2]))
anchors = {"echo": "raw-echo", "retrieve": "raw-retrieve"}
failed = []
print()
print(f"{'scenario':<9} {'round':>5} {'dcrf-demo msg/s':>16} {'ceiling msg/s':>14} {'ratio':>7}")
for scenario, anchor in anchors.items():
    ratios = []
    for r in sorted({row["round"] for row in rows if row["scenario"] == scenario}):
        by = {row["server"]: row for row in rows
              if row["scenario"] == scenario and row["round"] == r}
        demo, raw = by["demo"], by[anchor]
        for row in (demo, raw):
            bad = {k: row.get(k, 0) for k in ("errors", "lost", "connection_errors", "unmatched")}
            if any(bad.values()):
                failed.append(f"{scenario} against {row['server']} (round {r}): {bad}")
            if row.get("client_saturated"):
                print(f"  note: the generator was saturated in {scenario} / {row['server']}"
                      f" (round {r}); that rate is a lower bound")
        ratio = demo["msgs_per_s"] / raw["msgs_per_s"] if raw["msgs_per_s"] else 0.0
        ratios.append(ratio)
        print(f"{scenario:<9} {r:>5} {demo['msgs_per_s']:>16,.0f} {raw['msgs_per_s']:>14,.0f}"
              f" {ratio:>7.3f}")
    best = max(ratios)
    rec = guard[scenario]["recorded"]
    margin = guard[scenario]["margin"]
    floor = rec * (1 - margin)
    verdict = "ok" if best >= floor else "REGRESSION"
    print(f"{scenario:<9}  best {best:.3f}   recorded {rec:.3f}, margin {margin:.0%}"
          f" -> floor {floor:.3f}: {verdict}")
    if best < floor:
        failed.append(f"{scenario}: dcrf-demo / {anchor} = {best:.3f}, below the floor "
                      f"{floor:.3f} (recorded {rec:.3f} - {margin:.0%}, {sys.argv[2]})")
print()
if failed:
    for f in failed:
        print(f"error: {f}", file=sys.stderr)
    sys.exit(1)
EOF

log "done in $((SECONDS - started)) s"
if [ "$status" != 0 ]; then
  log "FAILED: a ratio fell below its floor or a run had errors (see above)"
  exit 1
fi
