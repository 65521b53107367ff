#!/usr/bin/env bash
# Reference environment for the upstream-oracle tests (tests/test_isp_oracle.py, tests/test_isp_stats.py):
# upstream Geneformer's unmodified InSilicoPerturber / InSilicoPerturberStats run in helical's venv (Python 3.12,
# torch, transformers 5, datasets) plus a few small packages in a folder of their own (peft, tdigest and its
# helpers, statsmodels, patsy). The pins live once, in tests/oracle_env.py; this wrapper installs them
# (idempotent: a stamp records the pins) so `make test` pays the install before the tests start.
# Usage: scripts/setup_oracle_env.sh [OVERLAY_DIR] [HELICAL_PYTHON]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GFTRITON_ORACLE_OVERLAY=${1:-.oracle-overlay}
export GFTRITON_HELICAL_PYTHON=${2:-${GFTRITON_HELICAL_PYTHON:-.venv-helical/bin/python}}
echo "oracle overlay: $(python3 tests/oracle_env.py)"
