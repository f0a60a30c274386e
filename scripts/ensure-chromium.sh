#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)
# when either is missing: the browser tests (tests/e2e/test_browser.py, marker `browser`)
# drive them headless. Does nothing when both are there.
set -euo pipefail

[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0

log() { echo "chromium: $*" >&2; }
if [ "$(id -u)" != 0 ]; then
  log "missing; install them (apt-get install chromium chromium-driver) or run as root"
  exit 1
fi
log "installing chromium, chromium-driver and fonts-liberation (readable screenshots)"
export DEBIAN_FRONTEND=noninteractive
# Try the package lists already on the machine first: a second `apt-get update` costs time.
if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
fi
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { log "install did not provide both binaries"; exit 1; }
