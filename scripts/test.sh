#!/usr/bin/env bash
# Runs the whole test suite: Rust unit, integration and doc tests on SQLite, PostgreSQL and
# Redis, and the JavaScript acceptance suite with the real DCRF client.
# PostgreSQL and Redis are started if installed and down; tests that need one skip with a
# visible message when its URL is unset.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash scripts/services.sh)"
if [[ -n "${DATABASE_URL:-}" ]]; then
  # Leftover schemas of interrupted runs.
  psql "$DATABASE_URL" -Atqc "select 'drop schema ' || nspname || ' cascade;' from pg_namespace where nspname like 'dcrf_test_%'" 2>/dev/null \
    | psql "$DATABASE_URL" -q >/dev/null 2>&1 || true
fi
echo "DATABASE_URL=${DATABASE_URL:-<unset: PostgreSQL tests skip>}"
echo "REDIS_URL=${REDIS_URL:-<unset: Redis tests skip>}"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
cargo test --workspace --doc

if [[ -f tests/acceptance/package.json ]]; then
  (cd tests/acceptance && npm ci --no-audit --no-fund && npm test)
fi
