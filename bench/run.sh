#!/usr/bin/env bash
# Side-by-side benchmarks: the hand-written ceilings (raw-echo, raw-retrieve, raw-fanout),
# dcrf-demo, and the Python DCRF 1.3 baseline, each server pinned to one CPU and the load
# generator to another, with the same flags for every server. Results go to
# bench/results/*.jsonl; bench/report.py then writes the goals table and the other tables into
# BENCHMARKS.md and draws bench/results/chart.png and the curve-*.png plots.
#
#   bench/run.sh                         # everything (see "Run time" in bench/README.md)
#   BENCH_DATABASE=postgres bench/run.sh # the main groups on PostgreSQL (BENCH_PG_URL)
#   QUICK=1 bench/run.sh                 # 2 s per run, 1 s per curve point
#   QUICK=1 SCENARIOS="echo idle" bench/run.sh
#
# It refuses to run on a working tree that differs from HEAD (ALLOW_DIRTY=1 overrides, and the
# report then says so), so that every figure belongs to the commit the report names.
#
# Scenarios (SCENARIOS, space-separated; all by default, in this order):
#   echo retrieve list create patch   request/reply at CONNECTIONS connections
#   fanout                             FANOUT_SUBSCRIBERS x FANOUT_SUBSCRIBE
#   idle                               IDLE_CONNECTIONS held open (Python: PY_IDLE_CONNECTIONS)
#   pg                                 retrieve and patch on PostgreSQL (BENCH_PG_URL) for
#                                      raw-retrieve, dcrf and python, results in pg-*.jsonl;
#                                      skipped (with a warning, and "not measured" in the
#                                      report) when that server does not answer, and when
#                                      BENCH_DATABASE=postgres (the main groups are PG then)
#   curve-echo curve-retrieve          throughput and latency at each of CURVE_CONNECTIONS
#                                      (raw, dcrf; python up to CURVE_PYTHON_MAX)
#   curve-fanout                       fan-out (subscribe_instance) at each of
#                                      CURVE_SUBSCRIBERS (raw-fanout, dcrf)
#   curve-idle                         memory per connection at each of CURVE_IDLE (raw, dcrf)
# Curves go to curve-*.jsonl, one line per (point, server), with the point in "point".
# Servers (SERVERS): raw dcrf python. raw is the hand-written ceiling of each scenario:
# dcrf-bench raw-echo for echo and idle, raw-retrieve for retrieve (on a database dcrf-demo has
# just created and seeded, then stopped), raw-fanout for fanout; list, create and patch have
# none.
#
# Environment (defaults in brackets):
#   DURATION [10; 2 with QUICK=1]  measured seconds per run
#   WARMUP [1; 0.5 with QUICK=1]   unmeasured seconds before each run
#   ROWS [1000]                    todos seeded on each server start
#   CONNECTIONS [50]               connections for echo/retrieve/list/create/patch (and pg)
#   ECHO_WINDOW [16]               requests in flight per connection for echo
#   CRUD_WINDOW [1]                requests in flight per connection for the todo scenarios
#   FANOUT_SUBSCRIBERS ["100 1000 10000"]
#   FANOUT_SUBSCRIBE ["instance all"]   subscribe_instance and/or subscribe_to_all
#   FANOUT_PYTHON_MAX [1000]       the Python server runs fan-out only up to this many
#                                  subscribers: at 10,000 it takes about 10 minutes per run
#                                  (4 to accept them, 3 to deliver one write) and delivers
#                                  no write inside the window; FANOUT_PYTHON_MAX=10000 runs it
#   FANOUT_TIMEOUT [120]           seconds a write may take to reach every subscriber
#   FANOUT_WARMUP [0]              warm-up for fan-out runs (subscribing is the warm-up; one
#                                  write to 10,000 subscribers can outlast a short warm-up)
#   IDLE_CONNECTIONS [19000]       (the goal's figure; needs ulimit -n of about 19,300)
#   PY_IDLE_CONNECTIONS [10000; 5000 with QUICK=1]  the Python server's idle run is capped
#                                  at this many connections (its handshakes slow down with every consumer
#                                  already connected); the report says so
#   IDLE_TIMEOUT [60]              seconds one handshake may take while they all connect
#   CURVE_CONNECTIONS ["1 10 100 1000 10000"]   points of curve-echo and curve-retrieve
#   CURVE_PYTHON_MAX [1000]        the Python server runs the curve points up to this many
#                                  connections (0: not at all)
#   CURVE_WINDOW [1]               requests in flight per connection on the curves (so that
#                                  connections = requests in flight)
#   CURVE_SUBSCRIBERS ["10 100 1000 10000"]     points of curve-fanout
#   CURVE_IDLE ["1000 2000 5000 10000 19000"]   points of curve-idle
#   CURVE_DURATION [3; 1 with QUICK=1]          measured seconds per curve point
#   CURVE_WARMUP [0.5]             unmeasured seconds before each curve point (fan-out:
#                                  FANOUT_WARMUP; idle: the settling time)
#   SERVER_CPU [0], CLIENT_CPU [1] CPUs for taskset
#   PORT [18400]                   raw uses PORT, dcrf PORT+1, python PORT+2, raw-retrieve
#                                  PORT+3, raw-fanout PORT+4
#   BENCH_DATABASE [sqlite]        the database of both dcrf-demo and Python in the main
#                                  groups, created fresh for every server start:
#                                    sqlite: a SQLite file in a temporary directory (WAL, see
#                                      SQLITE_SYNCHRONOUS), removed at exit;
#                                    postgres: a database (dcrf_bench_dcrf, dcrf_bench_python)
#                                      dropped and created again on BENCH_PG_URL
#                                  The pg group always uses PostgreSQL that way.
#   BENCH_TMPDIR [$TMPDIR or /tmp] where that temporary directory is made (its filesystem is
#                                  in the report: on tmpfs an fsync costs nothing)
#   SQLITE_SYNCHRONOUS [FULL]      Python's PRAGMA synchronous. It must be what dcrf-demo runs
#                                  with, and dcrf-demo cannot be told: dcrf's Db::connect sets
#                                  journal_mode=WAL and busy_timeout=5000 only, and sqlx 0.9
#                                  leaves synchronous at the bundled SQLite's compiled default,
#                                  FULL. The database probe checks that both sides sync alike.
#   BENCH_PG_URL [postgres://postgres@127.0.0.1:5432]  PostgreSQL server for the pg group and
#                                  BENCH_DATABASE=postgres (no database name; its user may
#                                  create databases)
#   DEMO_DATABASE                  overrides dcrf-demo's --database in the main groups (e.g.
#                                  sqlite::memory:); the report then says the two sides do not
#                                  use the same database
#   DB_PROBE [1]                   before the runs, start each server on its fresh database,
#                                  send creates for 1 s and count its fsync/fdatasync calls per
#                                  committed write under strace (skipped without strace), and
#                                  read the journal mode from the SQLite file; 0 skips it
#   ALLOW_DIRTY [0]                run although files of the repository differ from HEAD (other
#                                  than RESULTS and REPORT); the report then warns loudly that
#                                  its numbers belong to no commit
#   NO_BUILD=1                     skip the build
#   PROFILE [release]              cargo profile of the binaries (debug: only to try the script)
#   CARGO_TARGET_DIR [target]      honoured: binaries are taken from $CARGO_TARGET_DIR/PROFILE
#   RESULTS [bench/results]
#   REPORT [BENCHMARKS.md]         the file whose generated section is rewritten
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  DURATION="${DURATION:-2}"
  WARMUP="${WARMUP:-0.5}"
  CURVE_DURATION="${CURVE_DURATION:-1}"
  FANOUT_PYTHON_MAX="${FANOUT_PYTHON_MAX:-1000}"
  PY_IDLE_CONNECTIONS="${PY_IDLE_CONNECTIONS:-5000}"
  MODE=quick
else
  DURATION="${DURATION:-10}"
  WARMUP="${WARMUP:-1}"
  CURVE_DURATION="${CURVE_DURATION:-3}"
  FANOUT_PYTHON_MAX="${FANOUT_PYTHON_MAX:-1000}"
  PY_IDLE_CONNECTIONS="${PY_IDLE_CONNECTIONS:-10000}"
  MODE=full
fi
DEFAULT_SCENARIOS="echo retrieve list create patch fanout idle pg curve-echo curve-retrieve curve-fanout curve-idle"
SCENARIOS="${SCENARIOS:-$DEFAULT_SCENARIOS}"
SERVERS="${SERVERS:-raw dcrf python}"
ROWS="${ROWS:-1000}"
CONNECTIONS="${CONNECTIONS:-50}"
ECHO_WINDOW="${ECHO_WINDOW:-16}"
CRUD_WINDOW="${CRUD_WINDOW:-1}"
FANOUT_SUBSCRIBERS="${FANOUT_SUBSCRIBERS:-100 1000 10000}"
FANOUT_SUBSCRIBE="${FANOUT_SUBSCRIBE:-instance all}"
FANOUT_TIMEOUT="${FANOUT_TIMEOUT:-120}"
FANOUT_WARMUP="${FANOUT_WARMUP:-0}"
IDLE_CONNECTIONS="${IDLE_CONNECTIONS:-19000}"
IDLE_TIMEOUT="${IDLE_TIMEOUT:-60}"
CURVE_CONNECTIONS="${CURVE_CONNECTIONS:-1 10 100 1000 10000}"
CURVE_PYTHON_MAX="${CURVE_PYTHON_MAX:-1000}"
CURVE_WINDOW="${CURVE_WINDOW:-1}"
CURVE_SUBSCRIBERS="${CURVE_SUBSCRIBERS:-10 100 1000 10000}"
CURVE_IDLE="${CURVE_IDLE:-1000 2000 5000 10000 19000}"
CURVE_WARMUP="${CURVE_WARMUP:-0.5}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
PORT="${PORT:-18400}"
BENCH_DATABASE="${BENCH_DATABASE:-sqlite}"
BENCH_TMPDIR="${BENCH_TMPDIR:-${TMPDIR:-/tmp}}"
SQLITE_SYNCHRONOUS="${SQLITE_SYNCHRONOUS:-FULL}"
BENCH_PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}"
BENCH_PG_URL="${BENCH_PG_URL%/}"
DEMO_DATABASE="${DEMO_DATABASE:-}"
DB_PROBE="${DB_PROBE:-1}"
ALLOW_DIRTY="${ALLOW_DIRTY:-0}"
RESULTS="${RESULTS:-bench/results}"
REPORT="${REPORT:-BENCHMARKS.md}"
for scenario in $SCENARIOS; do
  case "$scenario" in
    echo|retrieve|list|create|patch|fanout|idle|pg|curve-echo|curve-retrieve|curve-fanout|curve-idle) ;;
    *) echo "unknown scenario $scenario (see the header of bench/run.sh)" >&2; exit 2 ;;
  esac
done
case "$BENCH_DATABASE" in
  sqlite|postgres) ;;
  *) echo "BENCH_DATABASE must be sqlite or postgres, not $BENCH_DATABASE" >&2; exit 2 ;;
esac

PROFILE="${PROFILE:-release}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
TARGET_DIR="${TARGET_DIR%/}"
case "$PROFILE" in
  debug|dev) PROFILE=dev; BIN="$TARGET_DIR/debug" ;;
  *) BIN="$TARGET_DIR/$PROFILE" ;;
esac
BENCH="$BIN/dcrf-bench"
DEMO="$BIN/dcrf-demo"
PY=bench/python/.venv/bin/python

log() { echo "[bench] $*" >&2; }

# The numbers must belong to a commit: refuse to run on a tree that differs from HEAD (the
# results and the report excepted), unless ALLOW_DIRTY=1, in which case the report says so.
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
commit_full="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
dirty_files="$(GIT_OPTIONAL_LOCKS=0 git status --porcelain 2>/dev/null \
  | awk -v r="${RESULTS%/}/" -v o="$REPORT" '{ p = substr($0, 4) } index(p, r) != 1 && p != o { print p }')"
if [ -n "$dirty_files" ]; then
  if [ "$ALLOW_DIRTY" != 1 ]; then
    log "error: the working tree differs from HEAD ($commit); commit first, or set ALLOW_DIRTY=1"
    log "(the report will then warn that its numbers belong to no commit):"
    printf '  %s\n' $dirty_files | head -n 20 >&2
    exit 3
  fi
  log "warning: the working tree differs from HEAD ($commit); the report will say so"
fi

# 10,000 connections need more file descriptors than the usual 1024.
if ! ulimit -n 65536 2>/dev/null; then
  ulimit -n "$(ulimit -Hn)"
fi
log "open files limit: $(ulimit -n)"
need=0
for s in $IDLE_CONNECTIONS $FANOUT_SUBSCRIBERS $CURVE_CONNECTIONS $CURVE_SUBSCRIBERS $CURVE_IDLE; do
  [ "$s" -gt "$need" ] && need=$s
done
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
# setup.sh's own check database goes to a throw-away file, not into the repository.
setup_db="$(mktemp -d "$BENCH_TMPDIR/dcrf-bench-setup.XXXXXX")"
env -u DATABASE_URL DCRF_BENCH_PY_DB="$setup_db/setup.sqlite3" bench/python/setup.sh --seed "$ROWS"
rm -rf "$setup_db"

mkdir -p "$RESULTS"
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"

# Machine and toolchain facts for the report (meta.json is written after the database probe).
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
loadavg="$(cut -d' ' -f1-3 /proc/loadavg)"

# Every server start gets a fresh database: SQLite files in this directory, or PostgreSQL
# databases dropped and created again. RUN_DB is the kind of the runs under way: BENCH_DATABASE,
# or postgres in the pg group (IN_PG_GROUP=1).
DBDIR="$(mktemp -d "$BENCH_TMPDIR/dcrf-bench.XXXXXX")"
DB_FS="$(stat -f -c %T "$DBDIR" 2>/dev/null || echo unknown)"
DEMO_DB_URL=""
PY_DB_ENV=()
RUN_DB="$BENCH_DATABASE"
IN_PG_GROUP=0
PG_USED=0
[ "$BENCH_DATABASE" = postgres ] && PG_USED=1

# pg_recreate NAME: drops database NAME on BENCH_PG_URL and creates it again (psycopg, from
# the Python baseline's virtualenv).
pg_recreate() {
  "$PY" - "$BENCH_PG_URL/postgres" "$1" <<'EOF'
import sys
import psycopg
from psycopg import sql
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    name = sql.Identifier(sys.argv[2])
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
    conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
EOF
}

# fresh_db SERVER: a new, empty database for SERVER's next start; sets DEMO_DB_URL (dcrf) or
# PY_DB_ENV (python).
fresh_db() {
  case "$1:$RUN_DB" in
    dcrf:sqlite)
      rm -f "$DBDIR/dcrf.sqlite3" "$DBDIR/dcrf.sqlite3-wal" "$DBDIR/dcrf.sqlite3-shm"
      DEMO_DB_URL="sqlite://$DBDIR/dcrf.sqlite3?mode=rwc"
      ;;
    dcrf:postgres)
      pg_recreate dcrf_bench_dcrf
      DEMO_DB_URL="$BENCH_PG_URL/dcrf_bench_dcrf"
      ;;
    python:sqlite)
      rm -f "$DBDIR/python.sqlite3" "$DBDIR/python.sqlite3-wal" "$DBDIR/python.sqlite3-shm"
      PY_DB_ENV=(DCRF_BENCH_PY_DB="$DBDIR/python.sqlite3"
        DCRF_BENCH_SQLITE_SYNCHRONOUS="$SQLITE_SYNCHRONOUS")
      ;;
    python:postgres)
      pg_recreate dcrf_bench_python
      PY_DB_ENV=(DATABASE_URL="$BENCH_PG_URL/dcrf_bench_python")
      ;;
  esac
  if [ "$1" = dcrf ] && [ -n "$DEMO_DATABASE" ] && [ "$IN_PG_GROUP" = 0 ]; then
    DEMO_DB_URL="$DEMO_DATABASE"
  fi
}

# sanitize TEXT: the temporary directory, the target directory (when CARGO_TARGET_DIR
# moved it) and any password out of a URL or command.
sanitize() {
  local t="${1//"$DBDIR"/\$TMPDIR}"
  if [ "$TARGET_DIR" != target ]; then
    t="${t//"$TARGET_DIR/"/target/}"
  fi
  printf '%s' "$t" | sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#'
}

SERVER_PID=""
SERVER_URL=""

# wait_port PORT [LOGFILE]: until the server accepts on PORT and, with LOGFILE, has printed
# its "listening on" line there (dcrf-demo binds before it migrates and seeds, so an accepting
# port alone does not mean its database is ready); fails if the server exits first.
wait_port() {
  local port=$1 logfile=${2:-} i
  for i in $(seq 1 300); do
    if { [ -z "$logfile" ] || grep -q 'listening on' "$logfile" 2>/dev/null; } \
      && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
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
    raw-retrieve)
      port=$((PORT + 3))
      # The same data as dcrf-demo's runs: the demo creates and seeds a fresh database, stops,
      # and raw-retrieve serves that database.
      fresh_db dcrf
      RUST_LOG=warn taskset -c "$SERVER_CPU" "$DEMO" --bind "127.0.0.1:$port" \
        --database "$DEMO_DB_URL" --seed "$ROWS" >"$logfile" 2>&1 &
      SERVER_PID=$!
      if ! wait_port "$port" "$logfile"; then
        log "error: dcrf-demo did not seed the database for raw-retrieve; see $logfile"
        stop_server
        return 1
      fi
      stop_server
      taskset -c "$SERVER_CPU" "$BENCH" raw-retrieve --bind "127.0.0.1:$port" \
        --database "$DEMO_DB_URL" >>"$logfile" 2>&1 &
      ;;
    raw-fanout)
      port=$((PORT + 4))
      taskset -c "$SERVER_CPU" "$BENCH" raw-fanout --bind "127.0.0.1:$port" >"$logfile" 2>&1 &
      ;;
    dcrf)
      port=$((PORT + 1))
      fresh_db dcrf
      # Every benchmark client is 127.0.0.1: lift the connection caps (default 10,000 and
      # 1,000 per IP) above the largest run.
      DCRF_DEMO_MAX_CONNECTIONS=100000 DCRF_DEMO_MAX_CONNECTIONS_PER_IP=100000 \
      RUST_LOG=warn taskset -c "$SERVER_CPU" "$DEMO" --bind "127.0.0.1:$port" \
        --database "$DEMO_DB_URL" --seed "$ROWS" >"$logfile" 2>&1 &
      ;;
    python)
      port=$((PORT + 2))
      fresh_db python
      # -u: a DATABASE_URL exported for the test suite must not redirect a SQLite run.
      env -u DATABASE_URL "${PY_DB_ENV[@]}" taskset -c "$SERVER_CPU" bench/python/run.sh \
        --bind "127.0.0.1:$port" --seed "$ROWS" >"$logfile" 2>&1 &
      ;;
    *) log "unknown server $name"; return 1 ;;
  esac
  SERVER_PID=$!
  SERVER_URL="ws://127.0.0.1:$port"
  local ready_log="$logfile"
  [ "$name" = python ] && ready_log=""
  if ! wait_port "$port" "$ready_log"; then
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
cleanup() {
  stop_server
  rm -rf "$DBDIR"
  if [ "$PG_USED" = 1 ]; then
    "$PY" - "$BENCH_PG_URL/postgres" <<'EOF' 2>/dev/null || true
import sys
import psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for name in ("dcrf_bench_dcrf", "dcrf_bench_python"):
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
EOF
  fi
}
trap cleanup EXIT

# probe_db SERVER: starts SERVER on a fresh database, sends creates for one second (under
# strace, when available, counting fsync and fdatasync calls), stops it, and prints one JSON
# object: the writes, the sync calls, the SQLite file's journal mode (from its header), and
# for python the settings its connection reports (manage.py dbinfo).
probe_db() {
  local server=$1
  local path="$DBDIR/probe-$server" trace="" spid="" dbinfo="{}" i
  mkdir -p "$path"
  if ! start_server "$server" probe; then
    echo '{"error": "server did not start"}'
    return 0
  fi
  if [ "$server" = python ]; then
    dbinfo="$(cd bench/python && env -u DATABASE_URL "${PY_DB_ENV[@]}" .venv/bin/python \
      manage.py dbinfo 2>/dev/null \
      || echo '{}')"
  fi
  if [ "$BENCH_DATABASE" = sqlite ] && command -v strace >/dev/null; then
    trace="$path/strace.txt"
    taskset -c "$CLIENT_CPU" strace -f -qq -c -e trace=fsync,fdatasync -o "$trace" \
      -p "$SERVER_PID" 2>"$path/strace.err" &
    spid=$!
    # Attached once the server's TracerPid is set.
    for i in $(seq 1 50); do
      if [ "$(awk '/^TracerPid:/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null)" != 0 ]; then
        break
      fi
      sleep 0.1
    done
    if [ "$(awk '/^TracerPid:/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null)" = 0 ]; then
      log "warning: strace could not attach to $server: $(head -n1 "$path/strace.err")"
      kill "$spid" 2>/dev/null || true
      wait "$spid" 2>/dev/null || true
      spid=""
      trace=""
    fi
  fi
  taskset -c "$CLIENT_CPU" "$BENCH" create --url "$SERVER_URL/ws/todos/" --connections 1 \
    --duration 1 --warmup 0 --rows "$ROWS" --json >"$path/bench.json" 2>"$path/bench.err" || true
  # strace writes its summary when the server exits.
  stop_server
  if [ -n "$spid" ]; then
    wait "$spid" 2>/dev/null || true
  fi
  local file=""
  [ "$BENCH_DATABASE" = sqlite ] && file="$DBDIR/$server.sqlite3"
  [ "$server" = dcrf ] && [ -n "$DEMO_DATABASE" ] && file=""
  "$PY" - "$path/bench.json" "$trace" "$file" "$dbinfo" <<'EOF'
import json, sys
bench, trace, file, dbinfo = sys.argv[1:5]
out = {}
try:
    row = json.loads(open(bench).read().splitlines()[-1])
    out["writes"] = row.get("received")
    out["write_errors"] = row.get("errors")
except Exception as e:
    out["error"] = f"no create results: {e}"
if trace:
    calls = 0
    for line in open(trace):
        t = line.split()
        if t and t[-1] in ("fsync", "fdatasync"):
            calls += int(t[3])
    out["sync_calls"] = calls
    if out.get("writes"):
        out["syncs_per_write"] = round(calls / out["writes"], 2)
if file:
    try:
        header = open(file, "rb").read(20)
        out["journal_mode"] = {1: "delete/truncate/persist", 2: "wal"}.get(header[18], "?")
    except (OSError, IndexError) as e:
        out["journal_mode"] = f"unknown ({e})"
try:
    info = json.loads(dbinfo)
    if info:
        out["reported"] = info
except ValueError:
    pass
print(json.dumps(out))
EOF
}

# bench_one TAG SERVER SCENARIO PATH [FLAGS...]: one run; appends its JSON line (with the
# server's name, the database kind of the run, the exact command and, on a curve, the point
# POINT) to RESULTS/TAG.jsonl. The caller may set POINT (a curve's x value, also in the log
# files' names) and DURATION / WARMUP (as locals) for this run.
bench_one() {
  local tag=$1 server=$2 scenario=$3 path=$4
  shift 4
  local point="${POINT:-}" logtag=$tag
  [ -n "$point" ] && logtag="$tag-$point"
  if ! start_server "$server" "$logtag"; then
    record_failure "$tag" "$server" "$scenario" "server did not start" ""
    return 0
  fi
  local warmup=$WARMUP
  [ "$scenario" = fanout ] && warmup=$FANOUT_WARMUP
  local cmd=(taskset -c "$CLIENT_CPU" "$BENCH" "$scenario" --url "$SERVER_URL$path"
    --duration "$DURATION" --warmup "$warmup" --server-pid "$SERVER_PID" --label "$server"
    --json "$@")
  log "$logtag / $server: ${cmd[*]}"
  local out err
  out="$(mktemp)"
  err="$LOGS/$logtag-$server.bench.log"
  if "${cmd[@]}" >"$out" 2>"$err"; then
    "$PY" - "$out" "$RESULTS/$tag.jsonl" "$server" "$MODE" "$(sanitize "${cmd[*]}")" \
      "$RUN_DB" "$point" <<'EOF' || true
import json, sys
src, path, server, mode, command, database, point = sys.argv[1:8]
lines = [l for l in open(src).read().splitlines() if l.strip()]
row = json.loads(lines[-1])
row.update(server=server, mode=mode, command=command, database=database)
if point:
    row["point"] = int(point)
with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
EOF
    tail -n1 "$out" | cut -c1-200 >&2
  else
    log "warning: $logtag / $server failed: $(tail -n3 "$err" | tr '\n' ' ')"
    record_failure "$tag" "$server" "$scenario" "$(tail -n3 "$err")" "$(sanitize "${cmd[*]}")"
  fi
  grep -i '^warning' "$err" >&2 || true
  rm -f "$out"
  stop_server
}

record_failure() {
  "$PY" - "$RESULTS/$1.jsonl" "$2" "$3" "$MODE" "$4" "$5" "$RUN_DB" "${POINT:-}" <<'EOF'
import json, sys
path, server, scenario, mode, error, command, database, point = sys.argv[1:9]
row = {"scenario": scenario, "server": server, "label": server, "mode": mode, "failed": True,
       "error": error.strip(), "command": command, "database": database}
if point:
    row["point"] = int(point)
with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
EOF
}

# wanted SERVER: whether SERVERS includes SERVER (raw-retrieve and raw-fanout are the raw
# server of their scenarios).
wanted() {
  case " $SERVERS " in *" ${1%%-*} "*) return 0 ;; esac
  return 1
}

# run_group TAG SERVERS SCENARIO PATH [FLAGS...]: the same run against each server. With
# POINT set (a curve), the results are appended to TAG.jsonl rather than replacing it.
run_group() {
  local tag=$1 servers=$2 scenario=$3 path=$4
  shift 4
  [ -z "${POINT:-}" ] && : >"$RESULTS/$tag.jsonl"
  local s
  for s in $servers; do
    if wanted "$s"; then bench_one "$tag" "$s" "$scenario" "$path" "$@"; fi
  done
}

# curve TAG SERVERS SCENARIO PATH POINTS PYTHON_MAX [FLAGS...]: run_group at every point of
# POINTS (the number of connections, passed as --connections), each CURVE_DURATION seconds
# after CURVE_WARMUP; python only up to PYTHON_MAX connections. One file, TAG.jsonl.
curve() {
  local tag=$1 servers=$2 scenario=$3 path=$4 points=$5 pymax=$6
  shift 6
  : >"$RESULTS/$tag.jsonl"
  local DURATION=$CURVE_DURATION WARMUP=$CURVE_WARMUP POINT n list s
  for n in $points; do
    list=""
    for s in $servers; do
      [ "$s" = python ] && [ "$n" -gt "$pymax" ] && continue
      list="$list $s"
    done
    POINT=$n run_group "$tag" "$list" "$scenario" "$path" --connections "$n" "$@"
  done
}

# The database settings of both sides, checked rather than assumed.
probe_dcrf="null"
probe_python="null"
pg_info="null"
if [ "$DB_PROBE" = 1 ]; then
  case " $SERVERS " in *" dcrf "*)
    log "database probe: dcrf"
    probe_dcrf="$(probe_db dcrf)" ;;
  esac
  case " $SERVERS " in *" python "*)
    log "database probe: python"
    probe_python="$(probe_db python)" ;;
  esac
  log "database probe: dcrf $probe_dcrf; python $probe_python"
fi
# The pg group runs when asked for, when the main groups are not on PostgreSQL already, and
# when the server at BENCH_PG_URL answers; otherwise it is skipped, visibly (log, meta.json,
# and "not measured" in the report).
PG_GROUP="none"
PG_GROUP_REASON=""
case " $SCENARIOS " in *" pg "*)
  if [ "$BENCH_DATABASE" = postgres ]; then
    PG_GROUP="main"
    PG_GROUP_REASON="BENCH_DATABASE=postgres: the main groups ran on PostgreSQL"
  elif pg_err="$("$PY" - "$BENCH_PG_URL/postgres" 2>&1 <<'EOF'
import sys
import psycopg
try:
    with psycopg.connect(sys.argv[1], connect_timeout=5) as conn:
        conn.execute("SELECT 1")
except Exception as e:
    print(" ".join(str(e).split())[:300])
    sys.exit(1)
EOF
)"; then
    PG_GROUP="run"
    PG_USED=1
  else
    PG_GROUP="skipped"
    PG_GROUP_REASON="PostgreSQL at $(sanitize "$BENCH_PG_URL") did not answer ($(sanitize "$(printf '%s' "$pg_err" | tail -n1)"))"
    log "warning: skipping the pg group: $PG_GROUP_REASON"
  fi
  ;;
esac
if [ "$PG_USED" = 1 ]; then
  pg_info="$("$PY" - "$BENCH_PG_URL/postgres" <<'EOF' || echo null
import json, sys
import psycopg
with psycopg.connect(sys.argv[1]) as conn:
    show = lambda k: conn.execute(f"SHOW {k}").fetchone()[0]
    print(json.dumps({k: show(k) for k in ("server_version", "synchronous_commit", "fsync")}))
EOF
)"
fi
# dcrf-demo's SQLite is compiled in (libsqlite3-sys, bundled): its source id is in the binary.
demo_sqlite_id=""
if [ "$BENCH_DATABASE" = sqlite ]; then
  demo_sqlite_id="$(grep -a -o -m1 -E '20[0-9]{2}-[0-9]{2}-[0-9]{2} [0-9:]{8} [0-9a-f]{64}' "$DEMO" \
    2>/dev/null | head -n1 || true)"
fi
fresh_db dcrf
fresh_db python
meta_demo_url="$(sanitize "$DEMO_DB_URL")"
meta_py_env="$(sanitize "${PY_DB_ENV[*]}")"
cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
invocation="bench/run.sh"
[ "$SCENARIOS" != "$DEFAULT_SCENARIOS" ] && invocation="SCENARIOS=\"$SCENARIOS\" $invocation"
[ "$BENCH_DATABASE" != sqlite ] && invocation="BENCH_DATABASE=$BENCH_DATABASE $invocation"
[ "$MODE" = quick ] && invocation="QUICK=1 $invocation"
[ "$ALLOW_DIRTY" = 1 ] && [ -n "$dirty_files" ] && invocation="ALLOW_DIRTY=1 $invocation"
M_DATE="$started" M_MODE="$MODE" M_DURATION="$DURATION" M_WARMUP="$WARMUP" M_NPROC="$(nproc)" \
M_CPU="$cpu_model" M_KERNEL="$(uname -r)" M_MEMORY="$(free -h | awk '/^Mem:/ {print $2}')" \
M_LOADAVG="$loadavg" M_RUSTC="$(rustc --version 2>/dev/null || echo unknown)" \
M_PYTHON="$("$PY" --version 2>&1)" M_COMMIT="$commit" M_COMMIT_FULL="$commit_full" \
M_DIRTY="$dirty_files" M_SERVER_CPU="$SERVER_CPU" M_CLIENT_CPU="$CLIENT_CPU" M_ROWS="$ROWS" \
M_PROFILE="$PROFILE" M_SCENARIOS="$SCENARIOS" M_INVOCATION="$invocation" \
M_DB_KIND="$BENCH_DATABASE" M_DB_DEMO_URL="$meta_demo_url" M_DB_DEMO_OVERRIDE="$DEMO_DATABASE" \
M_DB_PY_ENV="$meta_py_env" M_DB_FS="$DB_FS" M_DB_SYNC="$SQLITE_SYNCHRONOUS" \
M_PROBE_DCRF="$probe_dcrf" M_PROBE_PYTHON="$probe_python" M_PG="$pg_info" \
M_DEMO_SQLITE_ID="$demo_sqlite_id" M_PG_GROUP="$PG_GROUP" M_PG_GROUP_REASON="$PG_GROUP_REASON" \
M_PG_DEMO_URL="$(sanitize "$BENCH_PG_URL/dcrf_bench_dcrf")" \
M_PG_PY_ENV="$(sanitize "DATABASE_URL=$BENCH_PG_URL/dcrf_bench_python")" \
M_IDLE="$IDLE_CONNECTIONS" M_PY_IDLE="$PY_IDLE_CONNECTIONS" M_CURVE_DURATION="$CURVE_DURATION" \
M_CURVE_WARMUP="$CURVE_WARMUP" M_CURVE_WINDOW="$CURVE_WINDOW" M_CURVE_PYMAX="$CURVE_PYTHON_MAX" \
M_CONNECTIONS="$CONNECTIONS" M_FANOUT_PYMAX="$FANOUT_PYTHON_MAX" \
"$PY" - "$RESULTS/meta.json" <<'EOF'
import json, os, sys
e = os.environ.get
def js(k):
    try:
        return json.loads(e(k) or "null")
    except ValueError:
        return {"error": f"unreadable: {e(k)[:200]}"}
dirty = [f for f in (e("M_DIRTY") or "").splitlines() if f.strip()]
json.dump({
    "date": e("M_DATE"),
    "mode": e("M_MODE"),
    "duration_s": float(e("M_DURATION")),
    "warmup_s": float(e("M_WARMUP")),
    "nproc": int(e("M_NPROC")),
    "cpu_model": e("M_CPU"),
    "kernel": e("M_KERNEL"),
    "memory": e("M_MEMORY"),
    "loadavg": e("M_LOADAVG"),
    "rustc": e("M_RUSTC"),
    "python": e("M_PYTHON"),
    "commit": e("M_COMMIT"),
    "commit_full": e("M_COMMIT_FULL"),
    "dirty": bool(dirty),
    "dirty_files": dirty[:50],
    "server_cpu": e("M_SERVER_CPU"),
    "client_cpu": e("M_CLIENT_CPU"),
    "rows": int(e("M_ROWS")),
    "demo_database": e("M_DB_DEMO_URL"),
    "database": {
        "kind": e("M_DB_KIND"),
        "same_on_both_sides": not e("M_DB_DEMO_OVERRIDE"),
        "fresh_per_start": True,
        "demo_url": e("M_DB_DEMO_URL"),
        "demo_override": bool(e("M_DB_DEMO_OVERRIDE")),
        "python_env": e("M_DB_PY_ENV"),
        "tmpdir_fs": e("M_DB_FS") if e("M_DB_KIND") == "sqlite" else None,
        "sqlite_synchronous_python": e("M_DB_SYNC") if e("M_DB_KIND") == "sqlite" else None,
        "demo_sqlite_source_id": e("M_DEMO_SQLITE_ID") or None,
        "probe": {"dcrf": js("M_PROBE_DCRF"), "python": js("M_PROBE_PYTHON")},
        "postgres": js("M_PG"),
    },
    "postgres_group": {
        # run: the pg group ran; skipped: PostgreSQL did not answer; main: BENCH_DATABASE=
        # postgres (the main groups are the PostgreSQL runs); none: not asked for.
        "status": e("M_PG_GROUP"),
        "reason": e("M_PG_GROUP_REASON") or None,
        "demo_url": e("M_PG_DEMO_URL"),
        "python_env": e("M_PG_PY_ENV"),
        "postgres": js("M_PG"),
    },
    "connections": int(e("M_CONNECTIONS")),
    "idle_connections": int(e("M_IDLE")),
    "python_idle_connections": int(e("M_PY_IDLE")),
    "fanout_python_max": int(e("M_FANOUT_PYMAX")),
    "curve": {
        "duration_s": float(e("M_CURVE_DURATION")),
        "warmup_s": float(e("M_CURVE_WARMUP")),
        "window": int(e("M_CURVE_WINDOW")),
        "python_max_connections": int(e("M_CURVE_PYMAX")),
    },
    "profile": e("M_PROFILE"),
    "scenarios": e("M_SCENARIOS"),
    "invocation": e("M_INVOCATION"),
}, open(sys.argv[1], "w"), indent=2)
EOF

# Run time of each scenario, seconds, for the report (timings.json).
TIMINGS=()
run_started=$SECONDS
for scenario in $SCENARIOS; do
  t0=$SECONDS
  case "$scenario" in
    echo)
      run_group echo "raw dcrf python" echo /ws/echo/ \
        --connections "$CONNECTIONS" --window "$ECHO_WINDOW"
      ;;
    retrieve)
      run_group retrieve "raw-retrieve dcrf python" retrieve /ws/todos/ \
        --connections "$CONNECTIONS" --window "$CRUD_WINDOW" --rows "$ROWS"
      ;;
    list|create|patch)
      run_group "$scenario" "dcrf python" "$scenario" /ws/todos/ \
        --connections "$CONNECTIONS" --window "$CRUD_WINDOW" --rows "$ROWS"
      ;;
    fanout)
      for how in $FANOUT_SUBSCRIBE; do
        for n in $FANOUT_SUBSCRIBERS; do
          servers="raw-fanout dcrf python"
          [ "$n" -gt "$FANOUT_PYTHON_MAX" ] && servers="raw-fanout dcrf"
          run_group "fanout-$how-$n" "$servers" fanout /ws/todos/ \
            --connections "$n" --subscribe "$how" --pk 1 --timeout "$FANOUT_TIMEOUT"
        done
      done
      ;;
    idle)
      # Python's handshakes slow down with every consumer already connected: its run is
      # capped at PY_IDLE_CONNECTIONS (the report says so).
      : >"$RESULTS/idle.jsonl"
      for s in raw dcrf python; do
        n=$IDLE_CONNECTIONS
        [ "$s" = python ] && [ "$n" -gt "$PY_IDLE_CONNECTIONS" ] && n=$PY_IDLE_CONNECTIONS
        if wanted "$s"; then
          bench_one idle "$s" idle /ws/echo/ --connections "$n" --timeout "$IDLE_TIMEOUT"
        fi
      done
      ;;
    pg)
      case "$PG_GROUP" in
        run)
          RUN_DB=postgres
          IN_PG_GROUP=1
          run_group pg-retrieve "raw-retrieve dcrf python" retrieve /ws/todos/ \
            --connections "$CONNECTIONS" --window "$CRUD_WINDOW" --rows "$ROWS"
          run_group pg-patch "dcrf python" patch /ws/todos/ \
            --connections "$CONNECTIONS" --window "$CRUD_WINDOW" --rows "$ROWS"
          RUN_DB="$BENCH_DATABASE"
          IN_PG_GROUP=0
          ;;
        *)
          # No stale PostgreSQL figures in the report.
          rm -f "$RESULTS/pg-retrieve.jsonl" "$RESULTS/pg-patch.jsonl"
          log "pg group not run: $PG_GROUP_REASON"
          ;;
      esac
      ;;
    curve-echo)
      curve curve-echo "raw dcrf python" echo /ws/echo/ "$CURVE_CONNECTIONS" \
        "$CURVE_PYTHON_MAX" --window "$CURVE_WINDOW"
      ;;
    curve-retrieve)
      curve curve-retrieve "raw-retrieve dcrf python" retrieve /ws/todos/ "$CURVE_CONNECTIONS" \
        "$CURVE_PYTHON_MAX" --window "$CURVE_WINDOW" --rows "$ROWS"
      ;;
    curve-fanout)
      curve curve-fanout "raw-fanout dcrf" fanout /ws/todos/ "$CURVE_SUBSCRIBERS" 0 \
        --subscribe instance --pk 1 --timeout "$FANOUT_TIMEOUT"
      ;;
    curve-idle)
      # --warmup is the settling time before the memory is read, --duration the holding
      # time after it: one second each is plenty for a curve point.
      CURVE_WARMUP=1 CURVE_DURATION=1 curve curve-idle "raw dcrf" idle /ws/echo/ "$CURVE_IDLE" 0 \
        --timeout "$IDLE_TIMEOUT"
      ;;
  esac
  TIMINGS+=("$scenario=$((SECONDS - t0))")
  log "$scenario took $((SECONDS - t0)) s"
done
log "all scenarios took $((SECONDS - run_started)) s"

# Append this run's timings to the ones already in the file, so that a run of a few scenarios
# keeps the figures of the others.
"$PY" - "$RESULTS/timings.json" "$MODE" "$((SECONDS - run_started))" "${TIMINGS[@]}" <<'EOF'
import json, sys
path, mode, total = sys.argv[1:4]
try:
    data = json.load(open(path))
except (OSError, ValueError):
    data = {}
scen = data.get("scenarios_s", {})
for kv in sys.argv[4:]:
    k, v = kv.split("=", 1)
    scen[k] = int(v)
data.update(mode=mode, scenarios_s=scen, last_run_s=int(total))
json.dump(data, open(path, "w"), indent=2)
EOF

log "writing the report"
"$PY" bench/report.py --results "$RESULTS" --output "$REPORT"
