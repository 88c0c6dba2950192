#!/usr/bin/env bash
# One prepared call on a lent GPU machine (an H100/H200, sm_90): build, check every GPU kernel
# against the float64 reference, run the GPU tests, compute-sanitizer on a small CUDA case,
# and the GPU rows of the throughput bench, the GEMM-form field (docs/DESIGN.md, "A tensor-core field with a certified error")
# included. Every step is time-boxed so that the whole call ends inside $BUDGET seconds
# (default 540, well inside one 10-minute call); everything is written under $OUT:
#
#   summary.txt      environment, each step's exit status and seconds, the tails of the logs
#   build.log        pip install (CUDA kernels for sm_90)
#   gpu_check.txt    bench/gpu_check.py: pass/fail per kernel, op and dtype; throughput
#   tests.log        pytest tests/ -k "cuda or triton or gpu or gemm" (TRITON_INTERPRET unset)
#   sanitizer.log    compute-sanitizer memcheck and racecheck on a small CUDA case
#   throughput.txt   bench/field_throughput.py --gpu (table as it runs)
#   throughput.json  its rows (throughput.jsonl, streamed, is kept if the step was cut short)
#
#   bash bench/gpu_session.sh          # on the device machine, from the repository root
#   bash bench/gpu_session.sh --dry    # without a GPU: the CPU-possible parts at tiny sizes
#                                      # (no build, the interpreter, no sanitizer)
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
BUDGET=${BUDGET:-540}
RUN=$(mktemp -d /tmp/pf_run.XXXXXX)
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1

say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT LOG CMD...: runs CMD with at most LIMIT seconds (less if the budget is
# nearly spent; skipped under 10 s), SIGINT first so that pytest and Python print what they
# have, then SIGKILL 15 s later. Appends the tail of LOG to the summary.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 10 ]; then
    say "SKIP $name: budget spent"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "START $name (limit ${limit}s)"
  local t=$(date +%s)
  ( cd "$RUN" && timeout -s INT -k 15 "$limit" "$@" ) >>"$log" 2>&1
  local rc=$?
  say "END $name rc=$rc in $(( $(date +%s) - t ))s$([ $rc -eq 124 ] && echo ' (time limit)')"
  { echo "---- tail of $(basename "$log") ----"; tail -n 25 "$log"; } >>"$SUMMARY"
  return 0
}

say "poissonflow GPU session, dry=$DRY, root=$ROOT, out=$OUT, budget=${BUDGET}s"
{
  echo "---- environment ----"
  uname -a
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | head -5
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>&1
} >>"$SUMMARY" 2>&1

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  say "dry run: no build (the current install), Triton's interpreter, tiny sizes"
else
  unset TRITON_INTERPRET
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
  step build 180 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps \
    -C cmake.define.POISSONFLOW_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 "$ROOT"
fi

step import 30 "$OUT/build.log" "$PY" -c "
import poissonflow, json
print('poissonflow from', poissonflow.__file__)
print(json.dumps(poissonflow.backends(), indent=1))
"

# 1. every GPU kernel against the float64 reference (and the throughput table at 65536 x 129)
if [ "$DRY" = 1 ]; then
  step gpu_check 120 "$OUT/gpu_check.txt" "$PY" "$ROOT/bench/gpu_check.py"
  step gpu_check_gemm 300 "$OUT/gpu_check.txt" "$PY" -c "
import sys; sys.path.insert(0, '$ROOT/bench')
import gpu_check
for r in gpu_check.check_gemm_form(device='cpu', n=16, dims=(33,)):
    print(r)
    assert r['passed'], r
"
else
  step gpu_check 110 "$OUT/gpu_check.txt" "$PY" "$ROOT/bench/gpu_check.py"
fi

# 2. the GPU tests (the interpreter's stand-ins are replaced by the real kernels)
if [ "$DRY" = 1 ]; then
  step tests 300 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests/test_gemm_field.py" -k "plain or r2_rounding or recomputation"
else
  step tests 110 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider --durations=10 \
    "$ROOT/tests" -k "cuda or triton or gpu or gemm"
fi

# 3. the GPU rows of the throughput bench: every backend, the GEMM form on random/clustered data
if [ "$DRY" = 1 ]; then
  step throughput 300 "$OUT/throughput.txt" "$PY" "$ROOT/bench/field_throughput.py" --gpu \
    --sizes 32 --dims 33 --repeat 1 --json "$OUT/throughput.json"
else
  step throughput 200 "$OUT/throughput.txt" "$PY" "$ROOT/bench/field_throughput.py" --gpu \
    --repeat 3 --json "$OUT/throughput.json"
fi
[ -s "$OUT/throughput.json" ] && rm -f "$OUT/throughput.jsonl"

# 4. compute-sanitizer on a small CUDA case: forward, backward, fused RK4 through the kernels
cat >"$RUN/small_cuda_case.py" <<'PYEOF'
import math
import torch
from poissonflow import registry

mod = registry.get("cuda").module()
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(67, 33, device="cuda", generator=g)
y = torch.randn(93, 33, device="cuda", generator=g)
w = torch.rand(93, device="cuda", generator=g) + 0.1
ex = torch.randint(-1, 93, (67,), device="cuda", generator=g)
v, ls = mod.field_forward(x, y, w, 33.0, 0.0, exclude=ex)
gv, gl = torch.randn_like(v), torch.randn_like(ls)
mod.field_backward(x, y, w, 33.0, 0.0, v, ls, gv, gl, need_x=True, need_y=True, need_w=True,
                   exclude=ex)
t0 = torch.full((67,), math.log(0.5), device="cuda", dtype=torch.float64)
dt = torch.full((67,), 0.1, device="cuda", dtype=torch.float64)
mod.flow_steps(x[:, :32].contiguous(), y[:, :32].contiguous(), w, t0, dt, 2, "rk4")
xb, yb = x.bfloat16(), y.bfloat16()
mod.field_forward(xb, yb, None, 33.0, 0.0)
torch.cuda.synchronize()
print("small CUDA case done")
PYEOF
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$DRY" = 1 ]; then
  say "dry run: sanitizer skipped (would run: $SAN --tool memcheck|racecheck $PY small_cuda_case.py)"
  bash -n "$0" && say "bash -n $0: ok"
elif [ -x "$SAN" ]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every allocation its own, so overruns are caught
  step memcheck 45 "$OUT/sanitizer.log" "$SAN" --tool memcheck --leak-check no \
    --error-exitcode 3 "$PY" "$RUN/small_cuda_case.py"
  step racecheck 45 "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 3 \
    "$PY" "$RUN/small_cuda_case.py"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  say "compute-sanitizer not found: skipped"
fi


say "done in $(( $(date +%s) - T0 ))s"
grep -E "^\[.*(END|SKIP)" "$SUMMARY" | tail -n 12
grep -E "FAIL|passed|failed" "$OUT/gpu_check.txt" "$OUT/tests.log" 2>/dev/null | tail -n 20
rm -rf "$RUN"
