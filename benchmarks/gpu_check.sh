#!/usr/bin/env bash
# One command that proves jaxconv's CUDA path on a (lent) GPU machine with the CUDA toolkit,
# JAX with its CUDA plugin, pytest-xdist and compute-sanitizer preinstalled and no network.
# docs/gpu.md gives each step's purpose and predicted time; in short (limits in seconds,
# overridable as LIMIT_<STEP>; predictions for a 16-core H100/H200 host in docs/gpu.md):
#   1. build      [LIMIT_BUILD=150]  pip install -e . for this GPU's architecture only
#                                    (28 kernel units in parallel); STOPS the check if it fails
#   2. import     [LIMIT_IMPORT=60]  jaxconv imports, the CUDA module loads, its architectures
#                                    cover this GPU (no warning); STOPS the check if it fails
#   3. harness    [LIMIT_HARNESS=60] the sanitizer harness (benchmarks/sanitize_harness.cu)
#                                    built with nvcc from the module's own kernel objects
#   4. tests      [LIMIT_TESTS=200]  the tests that run kernels on a device, gpu backend,
#                                    8 xdist workers balanced per test; per-test lines survive
#                                    a kill (pytest.log with -v, progress.log)
#   5. sanitizers [LIMIT_MEMCHECK=25, LIMIT_INITCHECK=20, LIMIT_RACECHECK=30,
#                  LIMIT_SYNCCHECK=20] compute-sanitizer over the harness: every kernel family
#                                    on exact-size buffers
#   6. bench      [LIMIT_BENCH=40 each] ResNet-50 NHWC in bfloat16 and float32, JSON rows
#                                    written as they finish
#   7. summary    OUTDIR/summary.txt, one screen
# The whole check ends within TOTAL_LIMIT (470 s, under 8 minutes): the test step gets at most
# what is left once the later steps' limits are set aside, so a slow build shortens the tests
# instead of pushing the benchmarks past the end.
# OUTDIR receives at most 8 files (what the device tool brings back): summary.txt, pytest.log
# and progress.log (written as the tests run, so they survive a kill), the benchmark JSON files,
# and logs.tgz with every other log (packed when the script exits).
# Limits add up to 150 + 60 + 60 + 170 + 4 * 20 + 2 * 40 = 600 s as ceilings; the predicted
# total is under 8 minutes (docs/gpu.md).
#
# Usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run (automatic where nvidia-smi finds no GPU) runs every step that needs no GPU: the
#   same CUDA build (sm_90 unless ARCH is set), the import, the harness build and its buffer
#   list, the GPU test step's selection (collected, not run) plus the host checks of the build
#   (tests/test_sass.py, the architecture check), and a --quick cpu benchmark, each timed.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$(date +%s)
LOGS=$(mktemp -d)  # the other logs, packed into OUTDIR/logs.tgz on exit
trap 'tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; rm -rf "$LOGS"' EXIT

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT LOG COMMAND...: runs COMMAND under `timeout`, output to LOG; records status
# and time in the summary; returns COMMAND's status (124 / 137: killed at the limit).
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
  say "$(printf '%-22s %-26s %4ss  %s' "$name" "$status" "$dt" "$(basename "$log")")"
  return $rc
}

# stop WHY LOG: the check cannot go on (no module, or it does not import): the error lines of
# LOG into the summary, then exit.
stop() {
  say "STOPPED: $1. The error ($(basename "$2"), in logs.tgz):"
  { grep -E -i "error|fatal|undefined|cannot|failed|Traceback" "$2" | grep -v -i "warning" \
      | head -n 15; echo "..."; tail -n 8 "$2"; } | cut -c1-200 | tee -a "$SUMMARY"
  say "total $(( $(date +%s) - START ))s; logs in $OUT"
  exit 1
}

# ---- the GPU ----------------------------------------------------------------------------------
ARCH=${ARCH:-}
if [ $DRY -eq 0 ]; then
  if GPU=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader \
           2>/dev/null | head -1) && [ -n "$GPU" ]; then
    ARCH=${ARCH:-$(echo "$GPU" | cut -d, -f2 | tr -d ' .')}
  else
    DRY=1
  fi
fi
ARCH=${ARCH:-90}
say "jaxconv gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')  $(nproc) cores"
if [ $DRY -eq 1 ]; then
  say "DRY RUN: no GPU (or --dry-run); build for sm_$ARCH, GPU-only steps replaced by host stand-ins"
else
  say "GPU: $GPU (sm_$ARCH)"
fi
say "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not on PATH'); load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ $DRY -eq 1 ]; then
  # A 2-core development machine: the 16-core host's limits would not do; no overall deadline.
  : "${LIMIT_BUILD:=3600}" "${LIMIT_TESTS:=1800}" "${TOTAL_LIMIT:=100000}"
  : "${LIMIT_IMPORT:=300}" "${LIMIT_HARNESS:=600}" "${LIMIT_BENCH:=600}"
fi
: "${LIMIT_BUILD:=150}" "${LIMIT_IMPORT:=60}" "${LIMIT_HARNESS:=60}" "${LIMIT_TESTS:=200}"
: "${LIMIT_MEMCHECK:=25}" "${LIMIT_INITCHECK:=20}" "${LIMIT_RACECHECK:=30}" "${LIMIT_SYNCCHECK:=20}"
: "${LIMIT_BENCH:=40}" "${TOTAL_LIMIT:=470}"
DEADLINE=$(( START + TOTAL_LIMIT ))
# within LIMIT RESERVE: LIMIT, or less so that RESERVE seconds stay before the deadline (>= 1).
within() {
  local left=$(( DEADLINE - $(date +%s) - $2 ))
  [ $left -lt $1 ] && echo $(( left > 1 ? left : 1 )) || echo $1
}

# ---- 1. build ----------------------------------------------------------------------------------
# Only this GPU's architecture: one SASS target, the fastest build that runs here. ninja runs
# one compiler per core over the 28 kernel units (ffi/cuda/kernel_units.cu).
step build "$LIMIT_BUILD" "$LOGS/build.log" env CMAKE_ARGS="-DJAXCONV_CUDA=ON" \
  JAXCONV_CUDA_ARCHITECTURES="${ARCH}-real" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . || stop "the build failed" "$LOGS/build.log"
BUILD_DIR=$(ls -td "$ROOT"/build/*/ 2>/dev/null | head -1)
BUILD_DIR=${BUILD_DIR%/}
# The longest compilations of this build (ninja's log: start and end in ms), to check
# docs/gpu.md's prediction.
if [ -f "$BUILD_DIR/.ninja_log" ]; then
  say "longest units: $(awk -F'\t' 'NR > 1 && $4 ~ /\.o$/ {n = split($4, p, "/"); \
    printf "%.1f %s\n", ($2 - $1) / 1000, p[n - 2] "/" p[n]}' "$BUILD_DIR/.ninja_log" \
    | sort -rn | head -3 | awk '{printf "%ss %s; ", $1, $2}')"
fi

# From here on, Python runs outside the checkout's root so that the installed (editable)
# package, not the bare source tree, is imported; XLA allocates on demand so that the test
# workers and the sanitizer share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

# ---- 2. import ---------------------------------------------------------------------------------
cat >"$LOGS/import_check.py" <<'EOF'
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import jaxconv
    from jaxconv import _ffi
import jax
m = _ffi._jaxconv_cuda
if m is None:
    raise SystemExit("the CUDA module was not built or does not load")
print("cuda module: runtime %d, driver %d, architectures %s, GPUs %s" % (
    m.runtime_version(), m.driver_version(), m.cuda_architectures(), m.device_capabilities()))
print("jax", jax.__version__, "devices", jax.devices())
for w in caught:
    print("WARNING:", w.message)
if any("jaxconv" in str(w.message) for w in caught):
    raise SystemExit("jaxconv warned at import (above): its CUDA kernels cannot run here")
EOF
if [ $DRY -eq 1 ]; then
  step import "$LIMIT_IMPORT" "$LOGS/import.log" env -C /tmp JAX_PLATFORMS=cpu "$PY" "$LOGS/import_check.py" \
    || stop "jaxconv does not import" "$LOGS/import.log"
else
  step import "$LIMIT_IMPORT" "$LOGS/import.log" env -C /tmp "$PY" "$LOGS/import_check.py" \
    || stop "jaxconv does not import, or cannot run on this GPU" "$LOGS/import.log"
fi
head -n 2 "$LOGS/import.log" | cut -c1-200 | tee -a "$SUMMARY"

# ---- 3. the sanitizer harness ------------------------------------------------------------------
HARNESS="$BUILD_DIR/modules/jaxconv_sanitize_harness"
HARNESS_OK=0
if step harness "$LIMIT_HARNESS" "$LOGS/harness.log" \
    cmake --build "$BUILD_DIR" --target jaxconv_sanitize_harness; then
  "$HARNESS" --list >"$LOGS/harness-buffers.txt" 2>&1 && HARNESS_OK=1
  say "harness: $(grep -c . "$LOGS/harness-buffers.txt") (case, layout) buffer sets listed"
fi

# ---- 4. tests ----------------------------------------------------------------------------------
# Only the tests that run kernels on a device: JAXCONV_TEST_DEVICE_ONLY=1 deselects every test
# without the `backend` fixture (emulation, SASS, pure Python) and the cpu_only ones
# (tests/conftest.py); the files below take `backend` but spend their time on the host
# (child interpreters, thousands of calls for a memory trend, the demo's training loop).
HOST_BOUND=(tests/test_versions.py tests/test_leaks.py tests/test_demo.py tests/test_bench.py
            tests/test_sharding.py tests/test_cuda_driver.py)
# Files in order of what a cut-short run must not miss (xdist hands tests out in collection
# order): TF32 and the ops against their oracles first, then every other test file.
FIRST=(tests/test_tf32.py tests/test_conv.py tests/test_conv_transpose.py tests/test_pool.py
       tests/test_kernel_paths.py tests/test_grads.py tests/test_determinism.py)
TEST_FILES=()
for f in "${FIRST[@]}"; do [ -f "$f" ] && TEST_FILES+=("$f"); done
for f in tests/test_*.py; do
  case " ${FIRST[*]} ${HOST_BOUND[*]} " in *" $f "*) ;; *) TEST_FILES+=("$f") ;; esac
done
# -v: a line per finished test; -rA: every outcome again at the end (when the run ends);
# --dist load: tests, not files, to the next free worker.
PYTEST_ARGS=(-v -rfE -p no:cacheprovider)
WORKERS=$(( $(nproc) / 2 < 8 ? $(nproc) / 2 : 8 ))
if [ "$WORKERS" -ge 2 ] && "$PY" -c "import xdist" 2>/dev/null; then
  # Compilation-bound: 8 processes share the one GPU (16 cores); a 2-core machine runs serially.
  PYTEST_ARGS+=(-n "$WORKERS" --dist load)
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout 120); fi
: >"$OUT/progress.log"
if [ $DRY -eq 1 ]; then
  # The GPU step's selection, collected on cpu (what would run), and the host checks that
  # read this build: its SASS, its architecture report.
  step tests-select "$LIMIT_TESTS" "$OUT/pytest.log" env PYTHONUNBUFFERED=1 \
    JAXCONV_TEST_BACKENDS=cpu JAXCONV_TEST_DEVICE_ONLY=1 \
    "$PY" -m pytest -q -p no:cacheprovider --collect-only "${TEST_FILES[@]}"
  say "tests: $(tail -n 1 "$OUT/pytest.log" | cut -c1-120) (the GPU step's selection, on cpu)"
  step host-checks "$LIMIT_TESTS" "$LOGS/pytest-host.log" env PYTHONUNBUFFERED=1 \
    JAXCONV_TEST_PROGRESS="$OUT/progress.log" "$PY" -m pytest "${PYTEST_ARGS[@]}" \
    tests/test_sass.py tests/test_cuda_driver.py
else
  # What the sanitizers and the benchmarks need is set aside first.
  RESERVE=$(( LIMIT_MEMCHECK + LIMIT_INITCHECK + LIMIT_RACECHECK + LIMIT_SYNCCHECK + 2 * LIMIT_BENCH + 10 ))
  step tests "$(within "$LIMIT_TESTS" "$RESERVE")" "$OUT/pytest.log" env PYTHONUNBUFFERED=1 JAXCONV_TEST_BACKENDS=gpu \
    JAXCONV_TEST_DEVICE_ONLY=1 JAXCONV_TEST_PROGRESS="$OUT/progress.log" \
    "$PY" -m pytest "${PYTEST_ARGS[@]}" "${TEST_FILES[@]}"
fi
# From the progress log, which survives a kill: counts, failures, and tests still running.
"$PY" - "$OUT/progress.log" <<'EOF' | tee -a "$SUMMARY"
import collections, sys
started, ended, outcome = [], set(), collections.Counter()
failed = []
for line in open(sys.argv[1]):
    kind, _, rest = line.rstrip("\n").partition(" ")
    if kind == "start":
        started.append(rest)
        continue
    nodeid = rest.rsplit(" ", 1)[0]
    ended.add(nodeid)
    outcome[kind] += 1
    if kind in ("failed", "error"):
        failed.append(f"  {kind.upper()} {nodeid}")
running = [n for n in started if n not in ended]
print("tests: " + (", ".join(f"{v} {k}" for k, v in sorted(outcome.items())) or "none ran")
      + (f"; {len(running)} unfinished (killed while running)" if running else ""))
for line in (failed[:10] + [f"  UNFINISHED {n}" for n in running[:5]]):
    print(line[:200])
EOF

# ---- 5. compute-sanitizer over the harness -----------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)
sanitize() {  # sanitize TOOL LIMIT DTYPES
  local tool=$1 limit=$2 dtypes=$3
  # A reported error gives exit status 17 (also when the harness itself succeeded).
  step "$tool" "$(within "$limit" $(( 2 * LIMIT_BENCH )))" "$LOGS/$tool.log" "$SANITIZER" --tool "$tool" \
    --error-exitcode 17 --print-limit 20 "$HARNESS" --dtypes "$dtypes"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY|INITCHECK SUMMARY|sanitize_harness: [A-Za-z]|FAILED|Device not supported" \
    "$LOGS/$tool.log" | tail -n 3 | cut -c1-160 | tee -a "$SUMMARY"
}
if [ $HARNESS_OK -eq 0 ]; then
  say "sanitizers: skipped (the harness did not build; harness.log)"
elif [ $DRY -eq 1 ]; then
  say "sanitizers: not run (dry run); compute-sanitizer: ${SANITIZER:-not found}"
elif [ -z "$SANITIZER" ]; then
  say "sanitizers: compute-sanitizer not found in this toolkit"
else
  # memcheck and initcheck see every dtype; racecheck and synccheck (shared memory and
  # barriers, the same per dtype size) one 16-bit type and float32 on TF32 tensor cores, plus
  # float64's SIMT kernels.
  sanitize memcheck "$LIMIT_MEMCHECK" f32,tf32,f64,f16,bf16
  sanitize initcheck "$LIMIT_INITCHECK" f32,tf32,f64,f16,bf16
  sanitize racecheck "$LIMIT_RACECHECK" bf16,tf32,f64
  sanitize synccheck "$LIMIT_SYNCCHECK" bf16,tf32,f64
fi

# ---- 6. benchmarks -----------------------------------------------------------------------------
# Each row is written to its JSON as it finishes: a run killed at its limit keeps its rows.
BENCH_TMP="$LOGS/bench"
mkdir -p "$BENCH_TMP"
: >"$LOGS/bench.log"
for dtype in bfloat16 float32; do
  if [ $DRY -eq 1 ]; then
    step "bench-$dtype" "$LIMIT_BENCH" "$BENCH_TMP/$dtype.log" env -C /tmp "$PY" -m jaxconv.bench \
      --device cpu --dtype "$dtype" --quick --set lenet --json "$OUT/bench-cpu-$dtype.json"
  else
    # ResNet-50's 13 layers in NHWC, forward and forward+backward: what fits 40 s with
    # compilation; the full set (python -m jaxconv.bench --device gpu) needs a longer lease.
    step "bench-$dtype" "$(within "$LIMIT_BENCH" 0)" "$BENCH_TMP/$dtype.log" env -C /tmp "$PY" -m jaxconv.bench \
      --device gpu --dtype "$dtype" --set resnet50 --layout NHWC --budget 0.05 \
      --json "$OUT/bench-gpu-$dtype.json"
  fi
  { echo "=== $dtype"; cat "$BENCH_TMP/$dtype.log"; } >>"$LOGS/bench.log"
  sed -n "/geometric mean/,/^$/p" "$BENCH_TMP/$dtype.log" | cut -c1-100 | tee -a "$SUMMARY"
  for j in "$OUT"/bench-*-"$dtype".json; do
    [ -f "$j" ] && "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); \
print('  %s: %d rows%s' % (sys.argv[1].rsplit('/', 1)[-1], len(d['results']), \
'' if d.get('complete') else ' (incomplete: the run was cut short)'))" "$j" | tee -a "$SUMMARY"
  done
done

say "total $(( $(date +%s) - START ))s; logs and JSON in $OUT"
