#!/usr/bin/env bash
# Runs the whole test suite. Integration tests start their own redis-server processes on
# free loopback ports (the redis-server binary must be installed; .ci/run installs it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
exec .venv/bin/python -m pytest -q "$@"
