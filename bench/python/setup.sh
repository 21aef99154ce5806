#!/usr/bin/env bash
# Sets up the Python DCRF baseline: a virtualenv in bench/python/.venv with the pinned
# packages of requirements.txt, the SQLite schema, and N seeded todos (ids 1..N).
#
#   bench/python/setup.sh [--seed N]        (default N = 1000)
#
# Environment: PYTHON (default python3); the database as for run.sh: DATABASE_URL
# (PostgreSQL), else DCRF_BENCH_PY_DB (SQLite file, default bench/python/db.sqlite3).
set -euo pipefail
cd "$(dirname "$0")"

seed=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# Install only when requirements.txt changed since the last install.
if ! cmp -s requirements.txt .venv/.installed-requirements.txt; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.installed-requirements.txt
fi
.venv/bin/python manage.py migrate --noinput -v 0
.venv/bin/python manage.py seed "$seed"
