#!/usr/bin/env bash
# Set up the environment, then train a small MLSAE on the embedded model and corpus and
# write its report. Extra arguments go to `mlsae-lens demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
exec .venv/bin/mlsae-lens demo "$@"
