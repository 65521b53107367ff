#!/usr/bin/env bash
# Build Triton's real C++ backends (r24.10: libtriton_onnxruntime.so, libtriton_pytorch.so) for the CPU
# against this venv's pip onnxruntime and torch, and assemble a complete --backend-directory
# (python + the stub for the venv's Python, onnxruntime, pytorch) for the wheel's tritonserver 2.51.0.
#
# usage: scripts/build_backends.sh [--source DIR] [--venv DIR] [--out DIR] [--force] [--optional]
#   --source  folder holding common/ core/ backend/ pytorch_backend/ onnxruntime_backend/ ort-include/
#             (default: $GFTRITON_BACKEND_SOURCE, else ${GFTRITON_SHARED_DIR:-../shared}/reference/triton-backends-r24.10;
#             docs/deployment.md says how to fetch them from GitHub)
#   --venv    Python environment with torch, onnxruntime and nvidia-pytriton (default .venv)
#   --out     build folder (default: $GFTRITON_BACKEND_BUILD, else .backends): writes stamp.json,
#             backends/{python,onnxruntime,pytorch} and build/ (cmake trees and logs)
#   --force   rebuild even when the stamp matches
#   --optional  when the sources are not there, warn and exit 0 (the servers then fall back to the
#             Python stand-ins, loudly); `make demo/serve/bench` use it, `make backends/test` do not
# The build is skipped when <out>/stamp.json matches: venv path, Python, torch and onnxruntime versions,
# the wheel's libtritonserver hash, a hash of the source tree and of this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SRC=${GFTRITON_BACKEND_SOURCE:-${GFTRITON_SHARED_DIR:-$ROOT/../shared}/reference/triton-backends-r24.10}
VENV=.venv
OUT=${GFTRITON_BACKEND_BUILD:-$ROOT/.backends}
FORCE=0
OPTIONAL=0
while [ $# -gt 0 ]; do
  case $1 in
    --source) SRC=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --optional) OPTIONAL=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
fail() { echo "error: $*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || fail "no Python environment at $VENV: run 'make venv' first"
for part in common core backend pytorch_backend onnxruntime_backend ort-include; do
  [ -d "$SRC/$part" ] && continue
  message="backend sources not found: $SRC/$part is missing. Pass --source DIR (or set
  GFTRITON_BACKEND_SOURCE) to a folder with the r24.10 sources; docs/deployment.md §9 says where to get them"
  if [ "$OPTIONAL" = 1 ]; then
    echo "WARNING: $message. Until then the local server uses the Python stand-ins." >&2; exit 0
  fi
  fail "$message"
done
SRC=$(cd "$SRC" && pwd) VENV=$(cd "$VENV" && pwd -P)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's stamp code, whatever the venv installed

NEW_STAMP=$("$PY" -m geneformer_triton.serving.backend_build stamp --source "$SRC" --script "$ROOT/scripts/build_backends.sh")
if [ "$FORCE" = 0 ] && [ -f "$OUT/stamp.json" ] && [ "$NEW_STAMP" = "$(cat "$OUT/stamp.json")" ] \
   && "$PY" -m geneformer_triton.serving.backend_build check --folder "$OUT" >/dev/null; then
  echo "backends up to date: $OUT/backends (stamp matches; --force rebuilds)"
  exit 0
fi

# Debian build packages (googletest: common r24.10 always builds its tests)
PACKAGES="cmake g++ ninja-build patchelf rapidjson-dev googletest"
missing=$(for p in $PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: $missing"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
  else
    fail "missing Debian packages: $missing. Install them with: sudo apt-get update && sudo apt-get install -y $missing"
  fi
fi

SP=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# torch's headers include Python.h: the venv's interpreter may not ship headers (pyenv builds do;
# cmake does not find them itself), so take the first include folder that has Python.h
PYINC=""
for python in "$PY" /usr/bin/python3; do
  inc=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null) || continue
  if [ -f "$inc/Python.h" ]; then PYINC=$inc; break; fi
done
[ -n "$PYINC" ] || fail "no Python.h found (install python3-dev)"
TS_LIB=$(cd "$SP/nvidia_pytriton.libs" 2>/dev/null && ls libtritonserver-*.so 2>/dev/null | head -1) \
  || fail "nvidia-pytriton's libtritonserver-*.so not found under $SP/nvidia_pytriton.libs (pip install nvidia-pytriton==0.7.0)"
ORT_LIB=$(ls "$SP"/onnxruntime/capi/libonnxruntime.so.1.* 2>/dev/null | head -1) \
  || fail "onnxruntime's libonnxruntime.so.1.* not found under $SP/onnxruntime/capi"
[ -d "$SP/torch/include" ] || fail "torch's C++ headers not found under $SP/torch/include"
PYV=$("$PY" -c "import sys; print('%d.%d' % sys.version_info[:2])")
SERVER=$SP/pytriton/tritonserver
STUB=$SERVER/python_backend_stubs/$PYV/triton_python_backend_stub
[ -f "$STUB" ] || fail "nvidia-pytriton has no python-backend stub for Python $PYV"

B=$OUT/build
BK=$OUT/backends
rm -rf "$BK" "$OUT/stamp.json"
mkdir -p "$B/ortlib" "$BK"
ln -sf "$ORT_LIB" "$B/ortlib/libonnxruntime.so"   # the cmake files look for this name
CMAKE_COMMON=(-G Ninja -Wno-dev -DCMAKE_BUILD_TYPE=Release -DTRITON_ENABLE_GPU=OFF -DTRITON_ENABLE_NVTX=OFF
  -DFETCHCONTENT_FULLY_DISCONNECTED=ON -DFETCHCONTENT_SOURCE_DIR_REPO-COMMON="$SRC/common"
  -DFETCHCONTENT_SOURCE_DIR_REPO-CORE="$SRC/core" -DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND="$SRC/backend"
  -DFETCHCONTENT_SOURCE_DIR_GOOGLETEST=/usr/src/googletest -DPython3_INCLUDE_DIR="$PYINC")
step() {  # step NAME LOG command...: run quietly, show the log's tail on failure
  local name=$1 log=$2; shift 2
  echo "  $name"
  "$@" >"$log" 2>&1 || { tail -30 "$log" >&2; fail "$name failed (full log: $log)"; }
}
echo "building Triton r24.10 backends from $SRC into $BK (torch/onnxruntime of $VENV)"
step "configure pytorch backend" "$B/pt.cmake.log" cmake -S "$SRC/pytorch_backend" -B "$B/pt" "${CMAKE_COMMON[@]}" \
  -DTRITON_PYTORCH_ENABLE_TORCHVISION=OFF \
  -DTRITON_PYTORCH_INCLUDE_PATHS="$SP/torch/include;$SP/torch/include/torch/csrc/api/include" \
  -DTRITON_PYTORCH_LIB_PATHS="$SP/torch/lib"
step "configure onnxruntime backend" "$B/ort.cmake.log" cmake -S "$SRC/onnxruntime_backend" -B "$B/ort" "${CMAKE_COMMON[@]}" \
  -DTRITON_ONNXRUNTIME_INCLUDE_PATHS="$SRC/ort-include" -DTRITON_ONNXRUNTIME_LIB_PATHS="$B/ortlib"
step "compile pytorch backend" "$B/pt.build.log" ninja -C "$B/pt" -j"${JOBS:-2}" triton-pytorch-backend
step "compile onnxruntime backend" "$B/ort.build.log" ninja -C "$B/ort" -j"${JOBS:-2}" triton-onnxruntime-backend

# assemble: python backend + stub, then the two C++ backends re-linked to the wheel's renamed server
# library (patchelf 0.14 breaks the file when --replace-needed and --set-rpath are combined: two calls)
mkdir -p "$BK/python" "$BK/pytorch" "$BK/onnxruntime"
cp "$SERVER/backends/python/libtriton_python.so" "$SERVER/backends/python/triton_python_backend_utils.py" "$STUB" "$BK/python/"
install -m755 "$B/pt/libtriton_pytorch.so" "$BK/pytorch/"
patchelf --replace-needed libtritonserver.so "$TS_LIB" "$BK/pytorch/libtriton_pytorch.so"
patchelf --set-rpath "\$ORIGIN:$SP/torch/lib" "$BK/pytorch/libtriton_pytorch.so"
install -m755 "$B/ort/libtriton_onnxruntime.so" "$BK/onnxruntime/"
patchelf --replace-needed libtritonserver.so "$TS_LIB" "$BK/onnxruntime/libtriton_onnxruntime.so"
ln -sf "$ORT_LIB" "$BK/onnxruntime/libonnxruntime.so.1"
echo "$NEW_STAMP" >"$OUT/stamp.json"
"$PY" -m geneformer_triton.serving.backend_build check --folder "$OUT"
echo "backends ready: $BK (pass as --backend-directory; gftriton serve, the tests and the bench use it)"
