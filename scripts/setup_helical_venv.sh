#!/usr/bin/env bash
# helical 3.1.4 as the Geneformer reference, in its own Python 3.12 venv (it pins numpy 2 and torch 2.10,
# which the Triton python-backend environment cannot use). Used by tests and benchmarks only.
set -euo pipefail
venv=${1:-.venv-helical}
find_python312() {
  local root
  root=$( (command -v pyenv >/dev/null && pyenv root) || echo "$HOME/.pyenv")
  for candidate in python3.12 "$root"/versions/3.12*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: helical 3.1.4 needs Python 3.12 (install it, e.g. 'pyenv install 3.12'); none found" >&2
  return 1
}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import helical, importlib.metadata as m; assert m.version("helical") == "3.1.4"' 2>/dev/null; then
  echo "helical environment ready: $venv"; exit 0
fi
python=$(find_python312)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q helical==3.1.4 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c 'import helical.models.geneformer' 
echo "helical environment ready: $venv"
