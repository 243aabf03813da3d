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
# Each test directory's conftest.py is a module named conftest: mypy checks them one at a
# time (pyproject.toml leaves them out of the run above).
for conftest in tests/*/conftest.py; do
	.venv/bin/mypy --no-error-summary "$conftest"
done
# pytest exits 5 when it collects nothing: that is a failure here too.
exec .venv/bin/python -m pytest -ra "$@"
