#!/usr/bin/env bash
# Create the main environment: Python 3.11 (torch 2.13 CPU wheel, Triton 2.51 python-backend stub).
set -euo pipefail
venv=${1:-.venv}
find_python() {
  for candidate in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python" "$(command -v pyenv >/dev/null && pyenv root)/versions/3.11"*/bin/python; do
    if [ -x "$(command -v "$candidate" 2>/dev/null || echo "$candidate")" ] && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then echo python3; return 0; fi
  echo "error: Python 3.11 is required (torch 2.13 CPU wheel and the Triton python-backend stub); install it (e.g. pyenv install 3.11) and retry" >&2
  return 1
}
python=$(find_python)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, onnxruntime, tritonclient, pytriton, numpy; assert numpy.__version__.startswith('1.'), numpy.__version__"
echo "environment ready: $venv"
