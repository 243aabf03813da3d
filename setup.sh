#!/usr/bin/env bash
# First command of the README: set everything up, then run the demo.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
[ "${1:-}" = "--no-demo" ] || examples/demo.sh
