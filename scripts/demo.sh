#!/usr/bin/env bash
# make demo: the whole OAuth and token lifecycle, end to end, through the real handlers.
#
#   scripts/demo.sh [--verbose]
#
# Builds .venv if needed (scripts/bootstrap-venv.sh), starts a throwaway Redis and
# Postgres (scripts/with-services.sh, as `make test` does), and runs devtools/demo.py,
# which starts the Sonos stand-in and the local API itself. Exits 0 only if every step
# of the story did what it should.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/bootstrap-venv.sh
exec scripts/with-services.sh .venv/bin/python -m devtools.demo "$@"
