#!/usr/bin/env bash
# Runs the AWS SAM CLI from its own tool venv (.venv-sam, created on first use):
#   scripts/sam.sh validate   the SAM transform, then `sam validate --lint`
#   scripts/sam.sh build      `sam build` (needs python3.13, found through pyenv)
#   scripts/sam.sh ARGS...    any other sam subcommand, as given
# aws-sam-cli pins boto3, requests and pydantic, so it never shares .venv with the
# layer's runtime requirements.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

SAM_CLI_VERSION=1.170.0
venv="$root/.venv-sam"
stamp="$venv/.sam-cli-version"

# Offline, credential-free runs: no telemetry, and a region so `sam validate` and
# `sam build` do not need an AWS profile.
export SAM_CLI_TELEMETRY=0
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export AWS_REGION="${AWS_REGION:-$AWS_DEFAULT_REGION}"

# shellcheck source=scripts/python313.sh
source "$root/scripts/python313.sh"
py313=$(find_python313) || { echo "error: sam build needs python3.13 (the Lambda runtime) and none was found" >&2; exit 1; }
# `sam build` with BuildMethod python3.13 looks for `python3.13` on PATH; the pyenv
# shim would refuse unless 3.13 is selected, so put the real bin directory first.
export PATH="$(dirname "$py313"):$PATH"

if ! [ -x "$venv/bin/sam" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$SAM_CLI_VERSION" ]; then
  echo "sam: creating $venv with aws-sam-cli==$SAM_CLI_VERSION" >&2
  rm -rf "$venv"
  "$py313" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$venv/bin/pip" install -q "aws-sam-cli==$SAM_CLI_VERSION" >"$venv/pip.log" 2>&1; then
    cat "$venv/pip.log" >&2
    echo "sam: pip install failed" >&2
    exit 1
  fi
  echo "$SAM_CLI_VERSION" >"$stamp"
fi

sam="$venv/bin/sam"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  validate)
    # Plain validate runs the SAM transform itself (what deploy will run); --lint adds cfn-lint.
    "$sam" validate --template-file template.yaml --region "$AWS_DEFAULT_REGION" "$@"
    exec "$sam" validate --lint --template-file template.yaml --region "$AWS_DEFAULT_REGION" "$@" ;;
  build) exec "$sam" build --template-file template.yaml "$@" ;;
  "") echo "usage: scripts/sam.sh validate | build | <any sam subcommand> [args]" >&2; exit 2 ;;
  *) exec "$sam" "$cmd" "$@" ;;
esac
