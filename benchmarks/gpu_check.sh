#!/usr/bin/env bash
# One command that proves jaxconv's CUDA path on a (lent) GPU machine with the CUDA toolkit and
# JAX preinstalled and no network:
#   1. build for this GPU's architecture only (pip install --no-build-isolation -e .),
#   2. the whole test suite on the gpu backend (JAXCONV_TEST_BACKENDS=gpu),
#   3. compute-sanitizer memcheck and racecheck over benchmarks/sanitize_all.py (every kernel),
#   4. python -m jaxconv.bench --device gpu in bfloat16 and float32, JSON into OUTDIR,
#   5. a one-screen summary (also OUTDIR/summary.txt).
# Every step has its own time limit (seconds, overridable: LIMIT_BUILD, LIMIT_TESTS,
# LIMIT_MEMCHECK, LIMIT_RACECHECK, LIMIT_BENCH) and the defaults add up to 8 minutes. Logs stay
# small: full logs in OUTDIR (at most 8 files on a GPU: summary.txt, build.log, pytest.log,
# memcheck.log, racecheck.log, bench.log and two JSON files), only tails in the summary.
#
# Usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run (automatic where nvidia-smi finds no GPU) runs the same steps without a GPU: a
#   CPU-only build, test collection plus one small test file on cpu, sanitize_all.py on cpu
#   without the sanitizer, and a --quick cpu benchmark; so the script is known to work up to
#   the GPU.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
: "${LIMIT_BUILD:=140}" "${LIMIT_TESTS:=180}" "${LIMIT_MEMCHECK:=40}" "${LIMIT_RACECHECK:=30}"
: "${LIMIT_BENCH:=40}"  # each of the two runs; 140 + 180 + 40 + 30 + 2 * 40 = 470 s
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT LOG COMMAND...: runs COMMAND under `timeout`, output to LOG; records status.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT after ${limit}s"
  elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; fi
  say "$(printf '%-22s %-28s %4ss  %s' "$name" "$status" "$dt" "$(basename "$log")")"
  return $rc
}

# ---- the GPU ----------------------------------------------------------------------------------
ARCH=""
if [ $DRY -eq 0 ]; then
  if GPU=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader \
           2>/dev/null | head -1) && [ -n "$GPU" ]; then
    ARCH=$(echo "$GPU" | cut -d, -f2 | tr -d ' .')
  else
    DRY=1
  fi
fi
say "jaxconv gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ $DRY -eq 1 ]; then
  say "DRY RUN: no GPU (or --dry-run); GPU steps replaced by their CPU stand-ins"
else
  say "GPU: $GPU (sm_$ARCH); nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not on PATH')"
fi

# ---- 1. build ----------------------------------------------------------------------------------
if [ $DRY -eq 1 ]; then
  step build "$LIMIT_BUILD" "$OUT/build.log" env CMAKE_ARGS="-DJAXCONV_CUDA=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps -e .
else
  # Only this GPU's architecture: one SASS target, the fastest build that runs here.
  step build "$LIMIT_BUILD" "$OUT/build.log" env CMAKE_ARGS="-DJAXCONV_CUDA=ON" \
    JAXCONV_CUDA_ARCHITECTURES="${ARCH}-real" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
BUILD_RC=$?
if [ $BUILD_RC -ne 0 ]; then
  say "--- build.log (tail)"; tail -n 15 "$OUT/build.log" | tee -a "$SUMMARY"
fi

# From here on, Python runs outside the checkout's root so that the installed (editable)
# package, not the bare source tree, is imported; XLA allocates on demand so that the test
# workers and the sanitizer share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
IMPORT_CHECK=$(cd /tmp && "$PY" -c "import warnings; warnings.simplefilter('always')
import jaxconv, jax
from jaxconv import _ffi
m = _ffi._jaxconv_cuda
print('cuda module:', 'built, runtime %d, driver %d' % (m.runtime_version(), m.driver_version())
      if m is not None else 'absent', '| jax', jax.__version__, jax.devices()[0].platform)" 2>&1 | tail -n 3)
say "import: $IMPORT_CHECK"

# ---- 2. tests ----------------------------------------------------------------------------------
PYTEST_ARGS=(-q -p no:cacheprovider -rfE)
if "$PY" -c "import xdist" 2>/dev/null; then
  PYTEST_ARGS+=(-n 8 --dist loadfile)  # compilation-bound: 8 processes share the one GPU
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout 150); fi
if [ $DRY -eq 1 ]; then
  # Collection of the whole suite, and one small file run, on cpu.
  step tests-collect "$LIMIT_TESTS" "$OUT/pytest.log" env JAXCONV_TEST_BACKENDS=cpu \
    "$PY" -m pytest -q -p no:cacheprovider --collect-only tests
  step tests-sample "$LIMIT_TESTS" "$OUT/pytest-sample.log" env JAXCONV_TEST_BACKENDS=cpu \
    "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_examples.py
else
  step tests "$LIMIT_TESTS" "$OUT/pytest.log" env JAXCONV_TEST_BACKENDS=gpu \
    "$PY" -m pytest "${PYTEST_ARGS[@]}" tests
fi
# Failures (-rfE lines) and pytest's closing count line, e.g. "3 failed, 900 passed in 200s".
say "--- pytest (tail)"
grep -hE "^(FAILED|ERROR) | in [0-9.]+s( \(|$)" "$OUT"/pytest*.log | tail -n 12 | cut -c1-160 \
  | tee -a "$SUMMARY"

# ---- 3. compute-sanitizer ----------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)
sanitize() {  # sanitize TOOL LIMIT DTYPES
  local tool=$1 limit=$2 dtypes=$3
  # Only jaxconv's kernels are instrumented (their names hold the jaxconv namespace); a nonzero
  # exit code marks a reported error.
  step "$tool" "$limit" "$OUT/$tool.log" "$SANITIZER" --tool "$tool" --kernel-name kns=jaxconv \
    --error-exitcode 17 --print-limit 20 "$PY" "$ROOT/benchmarks/sanitize_all.py" \
    --device gpu --dtypes "$dtypes"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_all:|Device not supported|rror" \
    "$OUT/$tool.log" | head -n 4 | cut -c1-160 | tee -a "$SUMMARY"
}
if [ $DRY -eq 1 ]; then
  step sanitize_all-cpu "$LIMIT_MEMCHECK" "$OUT/sanitize_all.log" \
    "$PY" "$ROOT/benchmarks/sanitize_all.py" --device cpu --dtypes float32
  tail -n 1 "$OUT/sanitize_all.log" | tee -a "$SUMMARY"
  say "compute-sanitizer: ${SANITIZER:-not found} (not run: dry run)"
elif [ -z "$SANITIZER" ]; then
  say "compute-sanitizer: not found in this toolkit, memcheck and racecheck skipped"
else
  sanitize memcheck "$LIMIT_MEMCHECK" float32,bfloat16,float16,float64
  sanitize racecheck "$LIMIT_RACECHECK" float32,bfloat16
fi

# ---- 4. benchmarks -----------------------------------------------------------------------------
# The device tool brings back at most 8 files: the two runs' tables go into one bench.log.
BENCH_TMP=$(mktemp -d)
: >"$OUT/bench.log"
for dtype in bfloat16 float32; do
  if [ $DRY -eq 1 ]; then
    step "bench-$dtype" "$LIMIT_BENCH" "$BENCH_TMP/$dtype.log" "$PY" -m jaxconv.bench \
      --device cpu --dtype "$dtype" --quick --set lenet --json "$OUT/bench-cpu-$dtype.json"
  else
    # ResNet-50's 13 layers in NHWC, forward and forward+backward: what fits 40 s with
    # compilation; the full set (python -m jaxconv.bench --device gpu) needs a longer lease.
    step "bench-$dtype" "$LIMIT_BENCH" "$BENCH_TMP/$dtype.log" "$PY" -m jaxconv.bench \
      --device gpu --dtype "$dtype" --set resnet50 --layout NHWC --budget 0.05 \
      --json "$OUT/bench-gpu-$dtype.json"
  fi
  { echo "=== $dtype"; cat "$BENCH_TMP/$dtype.log"; } >>"$OUT/bench.log"
  sed -n "/geometric mean/,/^$/p" "$BENCH_TMP/$dtype.log" | cut -c1-100 | tee -a "$SUMMARY"
done
rm -rf "$BENCH_TMP"

say "total $(( $(date +%s) - START ))s; logs and JSON in $OUT"
