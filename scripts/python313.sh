# Sourced by the scripts that need the Lambda runtime's Python (bootstrap-venv.sh, sam.sh).
#   find_python313   prints the real path of python3.13, or fails
# pyenv's python3.13 shim answers only when that version is selected: ask pyenv for the
# real path instead of running the shim.
find_python313() {
  local p v
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.13(\.[0-9]+)?$' | sort -rV); do
      if p=$(PYENV_VERSION=$v pyenv which python3.13 2>/dev/null) && [ -x "$p" ]; then echo "$p"; return; fi
    done
  fi
  for p in /usr/bin/python3.13 /usr/local/bin/python3.13; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  return 1
}
