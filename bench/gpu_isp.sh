#!/usr/bin/env bash
# In-silico `delete all` benchmark on a GPU (target: >= 10,000 perturbations/s for gf-6L-10M-i2048 at
# 2,048 tokens on an H100), baseline (Geneformer-style BertForMaskedLM fp32 eager) measured in the same run.
#
#   bash bench/gpu_isp.sh --prepare      # here (data + dictionaries): writes the cells file, then
#   bash bench/gpu_isp.sh                # on the GPU host, from the repository root (< 3 minutes)
#
# Cells: real celltypist cells with >= 2,048 tokens, as token ids in bench/results/data/isp_cells_2048.npz
# (ignored by git: written by --prepare, carried to a GPU host that has neither the data nor network);
# without that file the celltypist sample and ../shared/geneformer/v1 dictionaries must be present.
# Python: $PYTHON, else .venv/bin/python, else python3; needs torch with CUDA, transformers, numpy, pandas, scipy.
# Extra arguments go to `python -m geneformer_triton.bench.isp_bench` (e.g. --cells 4 --no-compile). Results:
# bench/results/<date>-<host>/isp/ (and copied to $OUT when set). The run is cut at $ISP_BENCH_TIMEOUT
# seconds (default 175); figures are written after every method, so a cut run keeps what it measured.
#
# Upstream baseline (upstream Geneformer's own InSilicoPerturber, bench/isp_upstream_bench.py --mode gpu):
#   bash bench/gpu_isp.sh --upstream --dry-run   # anywhere: prepare, check, print the commands, run nothing
#   bash bench/gpu_isp.sh --upstream             # GPU host: upstream (CUDA, batch 100) vs ours in process (CUDA)
# Needs the shared layout under $GFTRITON_SHARED_DIR (reference/geneformer, reference/oracle, geneformer/v1) and
# an upstream Python: $GFTRITON_UPSTREAM_PYTHON with upstream's pins (torch with CUDA, transformers, datasets,
# peft, tdigest, statsmodels: oracle README "environment B"), else helical's venv + overlay (needs PyPI).
# Results: bench/results/<date>-<host>/isp-upstream-gpu/ (copied to $OUT/isp-upstream when set).
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS=bench/results/data/isp_cells_2048.npz
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi

if [ "${1:-}" = "--prepare" ]; then
  shift
  exec "$py" -m geneformer_triton.bench.isp_bench --prepare-cells "$CELLS" --cells 16 --length 2048 "$@"
fi

if [ "${1:-}" = "--upstream" ]; then
  shift
  dry=0
  for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
  upy=${GFTRITON_UPSTREAM_PYTHON:-${GFTRITON_HELICAL_PYTHON:-.venv-helical/bin/python}}
  shared=${GFTRITON_SHARED_DIR:-../shared}
  for f in "$shared/reference/geneformer/geneformer/in_silico_perturber.py" "$shared/reference/oracle/run_oracle.py" \
           "$shared/geneformer/v1/token_dictionary.json"; do
    [ -f "$f" ] || { echo "gpu_isp.sh --upstream: $f not found (set GFTRITON_SHARED_DIR)" >&2; exit 2; }
  done
  [ -x "$upy" ] || { echo "gpu_isp.sh --upstream: upstream Python $upy not found (set GFTRITON_UPSTREAM_PYTHON)" >&2; exit 2; }
  need_cuda=$([ "$dry" = 1 ] && echo 0 || echo 1)
  "$upy" - "$need_cuda" <<'PY'
import sys
try:
    import torch, transformers, datasets  # noqa: F401
except ImportError as error:
    sys.exit(f"gpu_isp.sh --upstream: upstream Python lacks {error.name}; install upstream's pins (oracle README)")
if sys.argv[1] == "1" and not torch.cuda.is_available():
    sys.exit(f"gpu_isp.sh --upstream: upstream's torch {torch.__version__} sees no CUDA device")
print(f"upstream Python: torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, datasets {datasets.__version__}", flush=True)
PY
  args=(--mode gpu)
  [ -f "$CELLS" ] && args+=(--cells-file "$CELLS")
  out=bench/results/$(date +%Y-%m-%d)-$(hostname | tr -c 'A-Za-z0-9_\n-' '-')/isp-upstream-gpu
  status=0
  timeout --signal=TERM "${ISP_BENCH_TIMEOUT:-540}" "$py" -m geneformer_triton.bench.isp_upstream_bench "${args[@]}" --out "$out" "$@" || status=$?
  [ "$status" = 124 ] && echo "gpu_isp.sh --upstream: cut after ${ISP_BENCH_TIMEOUT:-540} s" >&2
  if [ "$dry" = 0 ] && [ -n "${OUT:-}" ] && [ -d "$out" ]; then mkdir -p "$OUT/isp-upstream" && cp -r "$out"/. "$OUT/isp-upstream/"; fi
  exit "$status"
fi

"$py" - <<'PY'
import sys
try:
    import torch, transformers, numpy, pandas, scipy  # noqa: F401
except ImportError as error:
    sys.exit(f"gpu_isp.sh: missing Python package ({error}); install torch (CUDA), transformers, numpy, pandas, scipy")
if not torch.cuda.is_available():
    sys.exit(f"gpu_isp.sh: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

args=(--mode gpu)
if [ -f "$CELLS" ]; then args+=(--cells-file "$CELLS")
else echo "gpu_isp.sh: $CELLS not found; loading the celltypist sample (needs its data and the dictionaries)" >&2; fi

out=bench/results/$(date +%Y-%m-%d)-$(hostname | tr -c 'A-Za-z0-9_\n-' '-')/isp
status=0
timeout --signal=TERM "${ISP_BENCH_TIMEOUT:-175}" "$py" -m geneformer_triton.bench.isp_bench "${args[@]}" --out "$out" "$@" || status=$?
[ "$status" = 124 ] && echo "gpu_isp.sh: cut after ${ISP_BENCH_TIMEOUT:-175} s; partial figures in $out" >&2
if [ -n "${OUT:-}" ] && [ -d "$out" ]; then mkdir -p "$OUT/isp" && cp -r "$out"/. "$OUT/isp/"; fi
exit "$status"
