#!/usr/bin/env bash
# Second command of the README: lint, format and type checks, then the whole test suite
# (all tiers). Extra args go to pytest, e.g. ./run-tests.sh -m "not process and not qemu"
# for the fast unit tier alone.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
echo "run-tests: ruff check, ruff format --check, mypy" >&2
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy
# pytest exits 5 when it collects nothing: that is a failure here too.
exec .venv/bin/python -m pytest -ra "$@"
