#!/usr/bin/env bash
# Geneformer benchmark on a lent GPU host (H100; no TensorRT there, CPU-only onnxruntime): in-process
# methods (baselines, encoder fp32/bf16/fp16, bucketed, packed + flash varlen, torch.compile, TorchScript)
# and through Triton (the nvidia-pytriton tritonserver with the Python 3.12 stub, TorchScript fp32/bf16
# on the GPU through the pytorch stand-in, perf_analyzer), plus scaling — in under 8 minutes. Results
# in the same format as the CPU runs: bench/results/<date>-<host>-gpu/ (copied to $OUT when set).
#
#   bash bench/gpu.sh --prepare   # HERE, on a development machine (data, dictionaries, venv): writes
#                                 # .gpu_bundle/ (ignored by git): the compact celltypist sample, the V1
#                                 # dictionaries, tritonserver + python backend + 3.12 stub + its libraries
#                                 # and perf_analyzer (triton.tar.xz), numpy<2 for the stubs (cp312 wheel)
#   bash bench/gpu.sh             # ON THE GPU HOST, repository root; carry .gpu_bundle with the tree
#   bash bench/gpu.sh --dry-run   # anywhere (CPU): check the GPU mode's plan resolves (methods, the
#                                 # exported variants fp32/bf16 TorchScript, served models, packed path)
#
# Covered: the exported precision variants (gftriton export: torchscript fp32 and torchscript_bf16 with
# their ensembles, served on the GPU) and the padding-free packed path in process (torch_bf16_packed:
# flash-attention varlen); padding-free serving through Triton is not built yet (bench/README.md).
#
# The GPU host has python3 with torch (CUDA), transformers, pandas, scipy, onnx, psutil, matplotlib but no
# network, no anndata, no tritonserver and numpy 2 (Triton 2.51's python backend returns empty tensors
# with numpy 2: the stubs get numpy 1.26 first on their PYTHONPATH, the bench process keeps numpy 2).
# Without .gpu_bundle/triton.tar.xz the Triton stage is skipped (in-process + scaling only).
# The run is cut at $GPU_BENCH_TIMEOUT seconds (default 450); results are written after every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu_bundle
PY=${PYTHON:-python3}

if [ "${1:-}" = "--dry-run" ]; then
  shift
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${VPY:-$PY}" -m geneformer_triton.bench.cli --mode gpu --plan-only "$@"
  exit $?
fi

if [ "${1:-}" = "--prepare" ]; then
  shift
  VPY=${VPY:-.venv/bin/python}
  mkdir -p "$BUNDLE"
  grep -qx "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >> .git/info/exclude
  dicts=${DICTIONARIES:-$("$VPY" -c 'from geneformer_triton.bench.cells import default_dictionaries; print(default_dictionaries() or "")')}
  [ -n "$dicts" ] || { echo "gpu.sh: no V1 dictionaries found (set DICTIONARIES=...)" >&2; exit 2; }
  mkdir -p "$BUNDLE/geneformer_v1"
  cp "$dicts"/{token_dictionary,gene_median_dictionary,ensembl_mapping_dict,gene_name_id_dict}.json "$BUNDLE/geneformer_v1/"
  "$VPY" -m geneformer_triton.bench.cells --save-sample "$BUNDLE/celltypist_sample.npz" --dictionaries "$dicts"
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  stage=$(mktemp -d)
  mkdir -p "$stage/site/pytriton/tritonserver/python_backend_stubs" "$stage/site/nvidia_pytriton.libs" "$stage/bin"
  cp "$site/pytriton/__init__.py" "$stage/site/pytriton/"
  cp -r "$site/pytriton/tritonserver/bin" "$site/pytriton/tritonserver/backends" "$site/pytriton/tritonserver/caches" \
        "$stage/site/pytriton/tritonserver/"
  cp -r "$site/pytriton/tritonserver/python_backend_stubs/3.12" "$stage/site/pytriton/tritonserver/python_backend_stubs/"
  # every bundled library but the Python 3.13 one (the 3.12 stub links the host's libpython)
  find "$site/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython3*' -exec cp {} "$stage/site/nvidia_pytriton.libs/" \;
  cp "$(dirname "$VPY")/perf_analyzer" "$stage/bin/"
  tar -C "$stage" -cJf "$BUNDLE/triton.tar.xz" site bin
  rm -rf "$stage"
  "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$BUNDLE" numpy==1.26.4
  du -sh "$BUNDLE"/* && du -sh "$BUNDLE"
  echo "carry $BUNDLE to the GPU host (the device tool's carry: [\"$BUNDLE\"]); the working tree must stay under 64 MiB"
  exit 0
fi

"$PY" - <<'PY'
import sys
try:
    import torch, transformers, numpy, pandas, scipy, psutil  # noqa: F401
except ImportError as error:
    sys.exit(f"gpu.sh: missing Python package ({error})")
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this repository (not pip-installed there)
export GFTRITON_DATA_DIR=${GFTRITON_DATA_DIR:-/tmp/gftriton-data}
args=(--mode gpu)
if [ -f "$BUNDLE/celltypist_sample.npz" ]; then
  export GFTRITON_BENCH_SAMPLE="$PWD/$BUNDLE/celltypist_sample.npz"
  args+=(--dictionaries "$BUNDLE/geneformer_v1")
fi
if [ -f "$BUNDLE/triton.tar.xz" ]; then
  mkdir -p /tmp/gftriton-triton /tmp/gftriton-np
  tar -C /tmp/gftriton-triton -xJf "$BUNDLE/triton.tar.xz"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gftriton-np "$BUNDLE"/numpy-1.26.4-*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gftriton-triton/site"          # pytriton's tritonserver (no Python API used)
  export GFTRITON_PERF_ANALYZER=/tmp/gftriton-triton/bin/perf_analyzer
  export GFTRITON_SERVER_PYTHONPATH=/tmp/gftriton-np                 # numpy<2 for the python-backend stubs only
else
  echo "gpu.sh: $BUNDLE/triton.tar.xz not found: Triton stage skipped (bash bench/gpu.sh --prepare on a dev machine)" >&2
  args+=(--skip-triton)
fi

out=bench/results/$(date +%Y-%m-%d)-$(hostname | tr -c 'A-Za-z0-9_\n-' '-')-gpu
status=0
PYTHONUNBUFFERED=1 timeout --signal=TERM "${GPU_BENCH_TIMEOUT:-450}" "$PY" -m geneformer_triton.bench.cli "${args[@]}" --out "$out" "$@" || status=$?
[ "$status" = 124 ] && echo "gpu.sh: cut after ${GPU_BENCH_TIMEOUT:-450} s; partial figures in $out" >&2
if [ -n "${OUT:-}" ] && [ -d "$out" ]; then
  mkdir -p "$OUT/gpu"
  # at most 8 files come back from the device tool: the tables, the summary and the report
  for f in inprocess.csv triton.csv triton_metrics.csv scaling.csv summary.json report.md tritonserver.log; do
    [ -f "$out/$f" ] && cp "$out/$f" "$OUT/gpu/"
  done
  tar -C "$out" -czf "$OUT/gpu/all.tgz" . || true
fi
exit "$status"
