#!/usr/bin/env bash
# One command from a fresh machine to a running server on the default backend:
# installs packages, builds release binaries, starts `hearth serve`.
# Extra arguments go to `hearth serve` (e.g. --listen 0.0.0.0:3000).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh release
exec target/release/hearth serve --state-dir ./state "$@"
