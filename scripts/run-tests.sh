#!/usr/bin/env bash
# The checks behind `make test`, run inside scripts/with-services.sh: lint, types,
# template lint, then pytest. Exits with pytest's code; "no tests collected" fails.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=.venv/bin

step() { printf '\n==> %s\n' "$*"; }

step "ruff"
"$bin/ruff" check . || exit 1
step "mypy --strict (layer package)"
"$bin/mypy" || exit 1
step "cfn-lint template.yaml"
"$bin/cfn-lint" --non-zero-exit-code error template.yaml || exit 1
step "pytest"
"$bin/pytest" "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
