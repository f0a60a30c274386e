#!/usr/bin/env bash
# `make bench`: the performance figures against their targets, as one table (docs/benchmarks.md).
# Needs the live services: run it as `scripts/with-services.sh scripts/bench.sh [ARGS]`
# (ARGS go to bench/run.py: --sections, --runs, --calls, --markdown).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root:$root/layers/token_manager${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m bench.run "$@"
