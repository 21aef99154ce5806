#!/usr/bin/env bash
# Runs the whole test suite: Rust unit, integration and doc tests on SQLite, PostgreSQL and
# Redis, the JavaScript acceptance suite with the real DCRF client, the TypeScript client's
# suite and the browser suite of the todo page (Chromium at /usr/bin/chromium; skipped without
# it outside CI).
# PostgreSQL and Redis are started if installed and down. Tests that need one have `postgres` or
# `redis` in their names and fail when its URL is unset; without the service this script filters
# them out, so the runner's summary counts them as skipped. Under CI (CI=true) a missing service
# fails the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

# Where the time goes: each stage's end, in seconds since the start.
mark() { echo "[test.sh] at ${SECONDS} s: $*" >&2; }

services="$(bash scripts/services.sh)"
eval "$services"
if [[ -n "${DATABASE_URL:-}" ]]; then
  # Leftover schemas of interrupted runs.
  psql "$DATABASE_URL" -Atqc "select 'drop schema ' || nspname || ' cascade;' from pg_namespace where nspname like 'dcrf_test_%'" 2>/dev/null \
    | psql "$DATABASE_URL" -q >/dev/null 2>&1 || true
fi
echo "DATABASE_URL=${DATABASE_URL:-<unset: PostgreSQL tests skip>}"
echo "REDIS_URL=${REDIS_URL:-<unset: Redis tests skip>}"

# Tests a missing service rules out, as a nextest filter (and cargo test name filters).
skip=()
[[ -z "${DATABASE_URL:-}" ]] && skip+=("test(/postgres/)")
[[ -z "${REDIS_URL:-}" ]] && skip+=("test(/redis/)")
if cargo nextest --version >/dev/null 2>&1; then
  if [[ ${#skip[@]} -gt 0 ]]; then
    filter="not ($(IFS='|'; echo "${skip[*]}"))"
    echo "SKIPPED (missing services): $filter"
    cargo nextest run --workspace --no-fail-fast -E "$filter"
  else
    cargo nextest run --workspace --no-fail-fast
  fi
else
  skip_args=()
  [[ -z "${DATABASE_URL:-}" ]] && skip_args+=(--skip postgres)
  [[ -z "${REDIS_URL:-}" ]] && skip_args+=(--skip redis)
  cargo test --workspace --no-fail-fast -- "${skip_args[@]}"
fi
mark "Rust tests"
cargo test --workspace --doc
mark "doc tests"

# The real JS client (dcrf-client 0.3.0) against the demo server, then the TypeScript client
# (clients/typescript: its types, the page bundle against its sources, its suite) and the todo
# page in Chromium (tests/browser): SQLite and the in-memory layer, then once more on
# PostgreSQL with the Redis layer.
# The demo binary the Rust tests were built with (`cargo build -p dcrf-demo` alone would build
# dcrf again, without the features its own tests turn on): up to date, so this builds nothing.
cargo test --workspace --no-run
export DCRF_DEMO_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/dcrf-demo"
mark "dcrf-demo build"
(cd tests/acceptance && npm ci --no-audit --no-fund && npm test)
mark "acceptance suite"
(cd clients/typescript && npm ci --no-audit --no-fund && npm run typecheck && npm run check:page && npm test)
mark "TypeScript client suite"
if [[ ! -x /usr/bin/chromium && "${CI:-}" == "true" ]]; then
  echo "error: /usr/bin/chromium is missing; CI needs it for the browser suite" >&2
  exit 1
fi
(cd tests/browser && npm ci --no-audit --no-fund && npm test)
mark "browser suite"
if [[ -n "${DATABASE_URL:-}" && -n "${REDIS_URL:-}" ]]; then
  schemas=("dcrf_accept_$$" "dcrf_ts_$$" "dcrf_browser_$$")
  for schema in "${schemas[@]}"; do psql "$DATABASE_URL" -qc "create schema $schema"; done
  trap 'for schema in "${schemas[@]}"; do psql "$DATABASE_URL" -qc "drop schema if exists $schema cascade" >/dev/null 2>&1 || true; done' EXIT
  on_schema() { echo "$DATABASE_URL?options=-c%20search_path%3D$1"; }
  (cd tests/acceptance &&
    DCRF_TEST_DATABASE_URL="$(on_schema "dcrf_accept_$$")" DCRF_TEST_LAYER="$REDIS_URL" npm test)
  (cd clients/typescript &&
    DCRF_TEST_DATABASE_URL="$(on_schema "dcrf_ts_$$")" DCRF_TEST_LAYER="$REDIS_URL" npm test)
  (cd tests/browser &&
    DCRF_TEST_DATABASE_URL="$(on_schema "dcrf_browser_$$")" DCRF_TEST_LAYER="$REDIS_URL" npm test)
  mark "the three suites on PostgreSQL + Redis"
else
  echo "SKIPPED: acceptance, TypeScript client and browser suites on PostgreSQL + Redis (DATABASE_URL or REDIS_URL unset)"
fi
