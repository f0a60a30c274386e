#!/usr/bin/env bash
# make local-api: the whole service on this machine, to click through in a browser.
#
#   scripts/local-api.sh            (LOCAL_API_PORT=3000, SONOS_STANDIN_PORT=8710 by default)
#
# Builds .venv if needed, starts a throwaway Redis and Postgres (scripts/with-services.sh),
# then the Sonos stand-in and the local API (routes from template.yaml, the real handlers
# in-process) with settings seeded to match: a fresh key ring, the stand-in's client, and
# http://127.0.0.1:$LOCAL_API_PORT/sonos/oauth/callback as the redirect URI. Prints the URLs
# to open; Ctrl-C stops everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/bootstrap-venv.sh
exec scripts/with-services.sh .venv/bin/python -m devtools.local_stack \
  --api-port "${LOCAL_API_PORT:-3000}" --standin-port "${SONOS_STANDIN_PORT:-8710}" "$@"
