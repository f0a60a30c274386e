#!/usr/bin/env bash
# Creates (or reuses) .venv on the Lambda runtime's Python with the layer's runtime
# requirements and the pinned dev requirements. A second run with unchanged
# requirements does nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
reqs=("$root/layers/token_manager/requirements.txt" "$root/layers/postgres_driver/requirements.txt" "$root/requirements-dev.txt")
stamp="$venv/.requirements.sha256"
want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# Two runs at once (make test beside make demo) must not rebuild the venv under each other.
exec 9>"$root/.venv.lock"
flock 9
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # the other run built it while we waited
fi

# shellcheck source=scripts/python313.sh
source "$root/scripts/python313.sh"

find_python() {
  local p
  find_python313 && return
  if p=$(command -v python3) && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "WARNING: python3.13 (the Lambda runtime) not found; using $("$p" -V 2>&1) instead" >&2
    echo "$p"; return
  fi
  echo "error: need python3.13 (or python3 >= 3.11)" >&2
  return 1
}

py=$(find_python)
echo "venv: creating $venv with $("$py" -V) (first run only, 30-90 s: downloads from PyPI)"
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/pip" install -q "${reqs[@]/#/-r}" >"$venv/pip.log" 2>&1; then
  grep -v "is ignored: it is neither" "$venv/pip.log" >&2
  echo "venv: pip install failed" >&2
  exit 1
fi
echo "$want" > "$stamp"
