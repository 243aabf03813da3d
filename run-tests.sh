#!/usr/bin/env bash
# Second command of the README: the whole test suite (all tiers). Extra args go to pytest,
# e.g. ./run-tests.sh -m "not process and not qemu" for the fast unit tier alone.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
# pytest exits 5 when it collects nothing: that is a failure here too.
exec .venv/bin/python -m pytest -ra "$@"
