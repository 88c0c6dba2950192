#!/usr/bin/env bash
# One prepared call on a lent GPU machine (an H100/H200, sm_90): everything a first session must
# answer, in the order that keeps the most if it is cut short. Plan: one device call of at most
# 10 minutes; the machine's start-up eats several of the 15 device minutes, so the work is
# budgeted at $BUDGET seconds (default 400) with every step time-boxed:
#
#   1. build          offline pip install (CUDA kernels for sm_90) from what the image has
#                     (scikit-build-core, pybind11, cmake, ninja, nvcc); a failure is one line in
#                     the summary, the log is kept, and the steps go on with the source tree
#                     (Triton backends) and without the CUDA backend
#   2. sanitizer      compute-sanitizer memcheck (CUDA and Triton small cases) then racecheck,
#                     started in the background right after the build, stopped before step 4
#   3. correctness    bench/gpu_check.py --only correctness, one process per backend (cuda,
#                     triton, triton-gemm) plus the GEMM form's bound and certificate, in
#                     parallel, under CUDA_LAUNCH_BLOCKING=1; every op, dtype, conformance case,
#                     N = 1 and ragged shapes; each row flushed to rows.jsonl as it completes; a
#                     process that dies or meets a sticky CUDA error is restarted with --resume
#                     (the row it died in is recorded as crashed), so one fault does not fail
#                     the rest
#   4. throughput     N = B = 65,536, D = 129, 33, 3, one backend at a time, as fractions of the
#                     card's FP32 CUDA-core and TF32 tensor-core peaks, KeOps beside it if there
#   5. tests          the GPU tests (pytest -k "cuda or triton or gpu or gemm"), if time is left
#
# Everything is written under $OUT (at most 8 files come back from the device machine):
#   summary.txt  environment, each step's status and seconds, the report
#   rows.jsonl   every check and throughput row (and the card's peaks), streamed
#   report.txt   the tables made from rows.jsonl (bench/gpu_check.py --report)
#   build.log  sanitizer.log  tests.log  steps.log
#
#   bash bench/gpu_session.sh          # on the device machine, from the repository root
#   bash bench/gpu_session.sh --dry    # without a GPU: Triton's interpreter, the CUDA host
#                                      # emulator, tiny sizes, float32 (DRY_FULL=1: all dtypes)
#   POISSONFLOW_GPU_CHECK_FAULT=triton:abort bash bench/gpu_session.sh --dry   # rehearse a fault
#
# Python runs from a scratch directory so that the installed package (with its compiled
# extensions) is imported, not the source tree, which holds none.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d /tmp/gpu_session.XXXXXX)
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-$([ "$DRY" = 1 ] && echo 1200 || echo 400)}
RUN=$(mktemp -d /tmp/pf_run.XXXXXX)
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
ROWS="$OUT/rows.jsonl"
STEPS="$OUT/steps.log"
CHECK="$ROOT/bench/gpu_check.py"
: >"$SUMMARY"
: >"$STEPS"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# step NAME LIMIT LOG CMD...: CMD with at most LIMIT seconds (less if the budget is nearly
# spent; skipped under 10 s), SIGINT first (gpu_check records an "interrupted" row, pytest
# prints what it has), SIGKILL 10 s later. Sets STEP_RC.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local l
  l=$(left)
  STEP_RC=125
  if [ "$l" -lt 10 ]; then
    say "SKIP $name: budget spent"
    return 0
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  say "START $name (limit ${limit}s)"
  local t
  t=$(date +%s)
  ( cd "$RUN" && timeout -s INT -k 10 "$limit" "$@" ) >>"$log" 2>&1
  STEP_RC=$?
  say "END $name rc=$STEP_RC in $(( $(date +%s) - t ))s$([ $STEP_RC -eq 124 ] && echo ' (time limit)')"
  return 0
}

# checks NAME LIMIT ARGS...: gpu_check.py ARGS --resume until it finishes, restarting a process
# that died (abort, segfault, kill) or met a sticky CUDA error (status 3), at most 5 times; each
# such end is a row of its own in rows.jsonl.
checks() {
  local name=$1 limit=$2
  shift 2
  local start attempt rc
  start=$(date +%s)
  for attempt in 1 2 3 4 5 6; do
    local l=$(( limit - ($(date +%s) - start) ))
    [ "$(left)" -lt "$l" ] && l=$(left)
    if [ "$l" -lt 5 ]; then
      echo "{\"id\": \"$name|process|-|limit\", \"backend\": \"$name\", \"op\": \"process\", \"dtype\": \"-\", \"case\": \"time limit\", \"passed\": false, \"status\": \"time limit\"}" >>"$ROWS"
      break
    fi
    ( cd "$RUN" && timeout -s INT -k 10 "$l" "$PY" "$CHECK" "$@" --jsonl "$ROWS" --resume ) >>"$STEPS" 2>&1
    rc=$?
    case $rc in
      0|1|2|130) break ;;  # finished (1: some row failed; 2: backend unavailable; 130: cut short)
      124|137) echo "{\"id\": \"$name|process|-|$attempt\", \"backend\": \"$name\", \"op\": \"process\", \"dtype\": \"-\", \"case\": \"attempt $attempt\", \"passed\": false, \"status\": \"killed at its time limit (rc=$rc)\"}" >>"$ROWS"; break ;;
      *) echo "{\"id\": \"$name|process|-|$attempt\", \"backend\": \"$name\", \"op\": \"process\", \"dtype\": \"-\", \"case\": \"attempt $attempt\", \"passed\": false, \"status\": \"process ended rc=$rc; restarted with --resume\"}" >>"$ROWS" ;;
    esac
  done
  say "$name: done (last rc=$rc) in $(( $(date +%s) - start ))s"
}

say "poissonflow GPU session, dry=$DRY, root=$ROOT, out=$OUT, budget=${BUDGET}s"
{
  echo "---- environment ----"
  uname -a
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | head -5
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import pykeops; print('pykeops', pykeops.__version__)" 2>&1 | tail -1
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>&1
} >>"$SUMMARY" 2>&1

# ---- 1. build ---------------------------------------------------------------------------------
BUILT=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DRYARGS="--dry"
  [ "${DRY_FULL:-0}" = 1 ] || DRYARGS="--dry --quick"
  say "dry run: no build (the current install), Triton's interpreter, the CUDA host emulator"
else
  unset TRITON_INTERPRET
  DRYARGS=""
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
  step build 150 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    -C cmake.define.POISSONFLOW_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 "$ROOT"
  if [ "$STEP_RC" != 0 ]; then
    BUILT=0
    say "BUILD FAILED rc=$STEP_RC (log kept: build.log): $(grep -iE 'error|fatal' "$OUT/build.log" | tail -1 | cut -c1-200)"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the Triton backends need no build
  fi
fi
step import 60 "$STEPS" "$PY" -c "
import poissonflow, json
print('poissonflow from', poissonflow.__file__)
print(json.dumps(poissonflow.backends(), indent=1))
"

# ---- 2. sanitizer, in the background ------------------------------------------------------------
cat >"$RUN/small_cuda_case.py" <<'PYEOF'
import math, sys
import torch
from poissonflow import registry

which = sys.argv[1]
mod = registry.get(which).module()
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(67, 33, device="cuda", generator=g)
y = torch.randn(93, 33, device="cuda", generator=g)
w = torch.rand(93, device="cuda", generator=g) + 0.1
w[3] = 0.0
ex = torch.randint(-1, 93, (67,), device="cuda", generator=g)
v, ls = mod.field_forward(x, y, w, 33.0, 0.0, exclude=ex)
gv, gl = torch.randn_like(v), torch.randn_like(ls)
mod.field_backward(x, y, w, 33.0, 0.0, v, ls, gv, gl, need_x=True, need_y=True, need_w=True,
                   exclude=ex)
t0 = torch.full((67,), math.log(0.5), device="cuda", dtype=torch.float64)
dt = torch.full((67,), 0.1, device="cuda", dtype=torch.float64)
mod.flow_steps(x[:, :32].contiguous(), y[:, :32].contiguous(), w, t0, dt, 2, "rk4")
mod.field_forward(x[:1].bfloat16(), y.bfloat16(), None, 33.0, 0.0)
torch.cuda.synchronize()
print(which, "small case done")
PYEOF
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SAN_PID=""
if [ "$DRY" = 1 ]; then
  say "dry run: sanitizer not run (would run in the background: $SAN --tool memcheck|racecheck $PY small_cuda_case.py cuda|triton)"
  "$PY" -c "import ast; ast.parse(open('$RUN/small_cuda_case.py').read())" && say "small_cuda_case.py parses"
elif [ -x "$SAN" ]; then
  say "START sanitizer (background)"
  cat >"$RUN/sanitize.sh" <<SHEOF
cd "$RUN"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every allocation its own, so overruns are caught
for spec in "memcheck cuda" "memcheck triton" "racecheck cuda"; do
  set -- \$spec
  [ "\$2" = cuda ] && [ "$BUILT" = 0 ] && continue
  echo "==== \$1 \$2 ===="
  extra=""; [ "\$1" = memcheck ] && extra="--leak-check no"
  timeout -k 5 150 "$SAN" --tool "\$1" --error-exitcode 3 \$extra "$PY" "$RUN/small_cuda_case.py" "\$2"
  echo "==== \$1 \$2 rc=\$?"
done
SHEOF
  # its own process group (setsid), so that stopping it stops the sanitizer and Python under it
  setsid bash "$RUN/sanitize.sh" >"$OUT/sanitizer.log" 2>&1 &
  SAN_PID=$!
else
  say "compute-sanitizer not found: skipped"
fi

# ---- 3. correctness ----------------------------------------------------------------------------
CORR_LIMIT=$([ "$DRY" = 1 ] && echo 600 || echo 170)
say "START correctness (parallel per backend, limit ${CORR_LIMIT}s)"
(
  export CUDA_LAUNCH_BLOCKING=1
  for b in cuda triton triton-gemm; do
    checks "$b" "$CORR_LIMIT" --only correctness --backend "$b" $DRYARGS &
  done
  checks gemm-form "$CORR_LIMIT" --only gemm-form $DRYARGS &
  wait
)
say "END correctness: $(grep -c '"status": "done"' "$ROWS") rows done, $(grep -c '"passed": false' "$ROWS") failed"

if [ -n "$SAN_PID" ] && kill -0 "$SAN_PID" 2>/dev/null; then
  say "sanitizer still running: stopped before the throughput runs (timings need the GPU alone)"
  kill -TERM -- -"$SAN_PID" 2>/dev/null || kill "$SAN_PID" 2>/dev/null
fi
[ -n "$SAN_PID" ] && wait "$SAN_PID" 2>/dev/null
[ -n "$SAN_PID" ] && say "sanitizer: $(grep -E '^==== .* rc=' "$OUT/sanitizer.log" | tr '\n' ' ')"

# ---- 4. throughput -----------------------------------------------------------------------------
checks peaks 60 --only peaks $DRYARGS
for b in cuda triton triton-gemm; do
  lim=$(( $(left) / 2 ))
  [ "$b" = triton-gemm ] && lim=$(left)
  [ "$lim" -gt 150 ] && lim=150
  checks "throughput-$b" "$lim" --only throughput --backend "$b" $DRYARGS
done

# ---- 5. the GPU tests, if time is left ---------------------------------------------------------
if [ "$DRY" = 0 ] && [ "$(left)" -gt 60 ]; then
  step tests $(( $(left) - 20 )) "$OUT/tests.log" "$PY" -m pytest -q -x -p no:cacheprovider \
    --durations=10 "$ROOT/tests" -k "cuda or triton or gpu or gemm" \
    --ignore="$ROOT/tests/test_gpu_build_budget.py"
fi

"$PY" "$CHECK" --report "$OUT" >"$OUT/report.txt" 2>&1
say "done in $(( $(date +%s) - T0 ))s"
{ echo "---- report ----"; cat "$OUT/report.txt"; } >>"$SUMMARY"
cat "$OUT/report.txt"
grep -E "BUILD FAILED|SKIP|time limit" "$SUMMARY" | head -5
rm -rf "$RUN"
