#!/usr/bin/env bash
# Runs the whole test suite: Rust unit, integration and doc tests on SQLite, PostgreSQL and
# Redis, and the JavaScript acceptance suite with the real DCRF client.
# PostgreSQL and Redis are started if installed and down. Tests that need one have `postgres` or
# `redis` in their names and fail when its URL is unset; without the service this script filters
# them out, so the runner's summary counts them as skipped. Under CI (CI=true) a missing service
# fails the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

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
cargo test --workspace --doc

# The real JS client (dcrf-client 0.3.0) against the demo server: SQLite and the in-memory
# layer, then once more on PostgreSQL with the Redis layer.
cargo build -p dcrf-demo
export DCRF_DEMO_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/dcrf-demo"
(cd tests/acceptance && npm ci --no-audit --no-fund && npm test)
if [[ -n "${DATABASE_URL:-}" && -n "${REDIS_URL:-}" ]]; then
  schema="dcrf_accept_$$"
  psql "$DATABASE_URL" -qc "create schema $schema"
  trap 'psql "$DATABASE_URL" -qc "drop schema if exists $schema cascade" >/dev/null 2>&1 || true' EXIT
  (cd tests/acceptance &&
    DCRF_TEST_DATABASE_URL="$DATABASE_URL?options=-c%20search_path%3D$schema" \
    DCRF_TEST_LAYER="$REDIS_URL" npm test)
else
  echo "SKIPPED: acceptance suite on PostgreSQL + Redis (DATABASE_URL or REDIS_URL unset)"
fi
