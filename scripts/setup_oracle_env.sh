#!/usr/bin/env bash
# Reference environment for the ISP oracle tests (tests/test_isp_oracle.py): upstream Geneformer's unmodified
# InSilicoPerturber runs in helical's venv (Python 3.12, torch, transformers 5, datasets) plus four small
# packages installed into a folder of their own (../shared/reference/oracle/README.md, "environment A").
# Idempotent: a stamp file records the installed pins; rerunning with the same pins does nothing.
# Usage: scripts/setup_oracle_env.sh [OVERLAY_DIR] [HELICAL_PYTHON]
set -euo pipefail
OVERLAY=${1:-.oracle-overlay}
PY=${2:-${GFTRITON_HELICAL_PYTHON:-.venv-helical/bin/python}}
PINS="peft==0.21.2 tdigest==0.5.2.2 accumulation_tree pyudorandom"
STAMP="$OVERLAY/.installed"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" ]]; then
  exit 0
fi
if [[ ! -x "$PY" ]]; then
  echo "setup_oracle_env: helical's Python $PY not found: run 'make helical-venv' (or set GFTRITON_HELICAL_PYTHON)" >&2
  exit 1
fi
rm -rf "$OVERLAY.tmp"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$OVERLAY.tmp" $PINS
rm -rf "$OVERLAY"
mv "$OVERLAY.tmp" "$OVERLAY"
echo "$PINS" > "$STAMP"
echo "setup_oracle_env: installed $PINS into $OVERLAY"
