"""Check every GPU kernel of poissonflow against the float64 reference and measure throughput.

    python bench/gpu_check.py            # everything in this process: pass/fail + throughput
    python bench/gpu_check.py --json     # the same as one JSON document on stdout
    python bench/gpu_check.py --no-perf  # correctness only

The lent-GPU session (bench/gpu_session.sh) runs it in pieces, one process per backend, each
row appended and flushed to a JSONL file as it completes:

    python bench/gpu_check.py --only correctness --backend triton --jsonl out.jsonl [--resume]
    python bench/gpu_check.py --only gemm-form --jsonl out.jsonl
    python bench/gpu_check.py --only throughput --backend cuda --jsonl out.jsonl --dims 129 33 3
    python bench/gpu_check.py --only peaks --jsonl out.jsonl
    python bench/gpu_check.py --report DIR     # tables from DIR/*.jsonl
    ... --dry                                  # no GPU: Triton's interpreter and the CUDA host
                                               # emulator on CPU tensors, tiny sizes

Backends: every registry entry that runs on CUDA tensors (poissonflow/registry.py), each with
the protocol of docs/ARCHITECTURE.md; under --dry, triton and triton-gemm through the
interpreter and cuda through the host emulator (tests/cuda_emulation).

Correctness (each row: backend, op, dtype, case, error, tolerance, passed): forward, backward
(dL/dx, dL/dy, dL/dw) and fused Euler/RK4 flow steps, in every dtype the backend takes, against
poissonflow.kernels.reference in float64 on the same (rounded) inputs with the test suite's measure
and
tolerances (poissonflow/testing.py): a near-coincident problem (a query 1e-3 from a charge of
norm 10) with excluded charges; every feature of the conformance suite (tests/conformance,
zero-weight-nearest included) forward and backward; and the shapes N = 1, B = 1, D = 1, all
ones, and ragged sizes. Correctness runs with torch.use_deterministic_algorithms(True), so the
Triton kernels use their first configuration and nothing is autotuned (one compile per
specialisation; the other configurations meet the data in the throughput rows, whose output is
spot-checked).

Fault isolation: before each row a "started" marker is flushed; a row that raises is recorded
as failed; a CUDA error (sticky for the process) ends the process with status 3 after the row
is recorded, and --resume in a fresh process skips the rows already recorded and records a row
whose marker has no result as crashed (bench/gpu_session.sh restarts it). SIGINT (timeout -s
INT) records an "interrupted" row and exits 130. POISSONFLOW_GPU_CHECK_FAULT=<backend>:raise
or <backend>:abort injects a fault (for the session's rehearsal).

Throughput (docs/DESIGN.md, 'How performance is measured') at N = B = --size (65,536), D = --dims
(129, 33, 3),
float32 unless named: GFLOP/s with 4 D flops per (query, charge) pair for a field pass
(backward 11 D, Euler step 4 D, RK4 step 16 D), as fractions of the card's FP32 CUDA-core peak
(SMs x FP32 lanes x 2 x clock) and TF32 tensor-core peak (SMs x dense TF32 flops per clock x
clock), and of the same run's torch.mm rates (float32 and TF32); KeOps's forward beside them
when pykeops is installed. Each throughput row carries the error of its first 64 queries.
Without a GPU (and without --dry) it prints "no GPU present" and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("poissonflow") is None:
    # run from a source checkout too; an installed poissonflow (with its compiled kernels) is
    # not shadowed by the source tree, which holds none (bench/gpu_session.sh relies on this)
    sys.path.insert(0, str(ROOT))

from poissonflow import ops, registry  # noqa: E402
from poissonflow.kernels import reference  # noqa: E402
from poissonflow.kernels.reference import poisson_field_reference  # noqa: E402
from poissonflow.testing import field_errors, flow_errors, row_errors, tolerance  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from field_throughput import device_timed, gpu_mm_gflops  # noqa: E402  (one timer for both)

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
PROTOCOL = ("field_forward", "field_backward", "flow_steps")
FAULT_ENV = "POISSONFLOW_GPU_CHECK_FAULT"
# dense tensor-core flops per SM per clock (TF32, BF16): A100 (sm_80), H100/H200 (sm_90)
TC_FLOPS_PER_SM_CLK = {(8, 0): {"tf32": 512, "bf16": 1024}, (9, 0): {"tf32": 1024, "bf16": 2048}}


class StickyFault(Exception):
    """A CUDA error: the process's context is unusable, the rest goes to a fresh process."""


# --------------------------------------------------------------------------------------------
# Rows, streamed
# --------------------------------------------------------------------------------------------


class Sink:
    """Rows appended to a JSONL file (flushed and fsynced each), and kept in memory."""

    def __init__(self, path=None, resume=False):
        self.path = path
        self.rows = []
        self.done, self.started = set(), set()
        if path and resume and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    (self.started if r.get("status") == "started" else self.done).add(r["id"])
        self.f = open(path, "a") if path else None

    def write(self, row):
        if row.get("status") != "started":
            self.rows.append(row)
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())


def _is_cuda_error(exc) -> bool:
    msg = f"{type(exc).__name__}: {exc}"
    return any(
        s in msg
        for s in (
            "CUDA error",
            "cudaError",
            "illegal memory",
            "device-side",
            "CUDA_ERROR",
            "unspecified launch failure",
        )
    )


def run_row(sink: Sink, row: dict, fn, tol=None, device="cuda"):
    """Runs one check: fn() -> error (or a dict of extra fields with "error")."""
    row["id"] = "|".join(str(row[k]) for k in ("backend", "op", "dtype", "case"))
    if row["id"] in sink.done:
        return
    if row["id"] in sink.started:
        sink.write(
            dict(
                row,
                passed=False,
                status="crashed",
                message="the process died in this row (previous attempt)",
            )
        )
        return
    sink.write(dict(id=row["id"], status="started"))
    t0 = time.perf_counter()
    try:
        _maybe_fault(row["backend"])
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        extra = out if isinstance(out, dict) else {"error": out}
        done = dict(row, tol=tol, seconds=time.perf_counter() - t0)
        done.update(extra)  # a throughput row brings its own seconds and spot-check tol
        err, tol = done.get("error"), done.get("tol")
        ok = True if tol is None else (err is not None and math.isfinite(err) and err <= tol)
        sink.write(dict(done, passed=ok, status="done"))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, not the end
        sink.write(
            dict(
                row,
                error=None,
                tol=tol,
                passed=False,
                status="error",
                seconds=time.perf_counter() - t0,
                message=f"{type(exc).__name__}: {str(exc)[:500]}",
            )
        )
        if device == "cuda" and _is_cuda_error(exc):
            raise StickyFault(str(exc)) from exc


def _maybe_fault(backend):
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    name, _, kind = spec.partition(":")
    if name != backend:
        return
    if kind == "abort":
        sys.stdout.flush()
        os.abort()
    raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def discover_backends(dry=False) -> tuple[dict, dict]:
    """({name: protocol module}, {name: why unavailable}) for every registry entry that runs on
    CUDA tensors (the reference is the oracle, not a GPU kernel). dry: the CPU stand-ins."""
    found, missing = {}, {}
    for name, entry in registry.REGISTRY.items():
        if name == "reference" or "cuda" not in entry.devices:
            continue
        if dry and name == "cuda":
            try:
                found[name] = _emulated_cuda()
            except Exception as err:  # noqa: BLE001
                missing[name] = f"host emulator unavailable: {err}"
            continue
        ok, detail = entry.availability()
        if not ok:
            missing[name] = detail
            continue
        try:
            mod = entry.module()
        except Exception as err:  # noqa: BLE001 - report any import failure
            missing[name] = f"{entry.module_name} does not import: {err}"
            continue
        lacking = [f for f in PROTOCOL if not hasattr(mod, f)]
        if lacking:
            missing[name] = f"{entry.module_name} lacks {lacking}"
        else:
            found[name] = mod
    return found, missing


def _emulated_cuda():
    """The CUDA backend's Python side driving the kernels' block program on the host emulator
    (tests/cuda_emulation), as the conformance suite does without a GPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cuda_emulation import emulator as emu

    from poissonflow.kernels import cuda as cb

    if emu.compiler() is None:
        raise RuntimeError("no C++ compiler for the emulator")
    e = emu.Emulator(emu.build())

    class Mod:
        @staticmethod
        def field_forward(*a, **k):
            return cb._field_forward(emu.EmulatorRunner(e), *a, **k)

        @staticmethod
        def field_backward(*a, **k):
            return cb._field_backward(emu.EmulatorRunner(e), *a, **k)

        @staticmethod
        def flow_steps(*a, **k):
            return cb._flow_steps(emu.EmulatorRunner(e), *a, **k)

    return Mod


def _dtypes_of(name):
    return [n for n, dt in DTYPES.items() if dt in registry.get(name).dtypes]


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------


def problem(N, B, D, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, D, device=device, generator=g, dtype=torch.float64)
    y = torch.randn(B, D, device=device, generator=g, dtype=torch.float64)
    w = torch.rand(B, device=device, generator=g, dtype=torch.float64) + 0.1
    # A query 1e-3 from a charge of norm 10: the case that breaks the GEMM expansion of r2.
    y[0] = y[0] / y[0].norm() * 10
    step = torch.randn(D, device=device, generator=g, dtype=torch.float64)
    x[0] = y[0] + 1e-3 * step / step.norm()
    return x.to(dtype), y.to(dtype), w.to(dtype)


def reference_grads(x, y, w, p, gv, gl, exclude=None, eps=0.0, eps_rows=None):
    """(dx, dy, dw) by autograd through the float64 reference (r2 floor of x's dtype)."""
    floor = torch.finfo(x.dtype).tiny
    leaves = [t.double().requires_grad_() for t in (x, y)]
    wd = None if w is None else w.double().requires_grad_()
    v, ls = poisson_field_reference(
        leaves[0],
        leaves[1],
        wd,
        p,
        eps,
        exclude=exclude,
        eps_rows=None if eps_rows is None else eps_rows.double(),
        r2_floor=floor,
    )
    loss = (v * gv.double()).sum() + torch.where(torch.isfinite(ls), ls * gl.double(), 0.0).sum()
    grads = torch.autograd.grad(loss, leaves + ([wd] if wd is not None else []), allow_unused=True)
    return [
        torch.zeros_like(t) if g is None else g
        for g, t in zip(grads, leaves + ([wd] if wd is not None else []))
    ]


def _check_forward(mod, case):
    v, ls = mod.field_forward(
        case["x"],
        case["y"],
        case["w"],
        case["power"],
        case["eps"],
        exclude=case["exclude"],
        eps_rows=case["eps_rows"],
    )
    cpu = {k: (t.cpu() if isinstance(t, torch.Tensor) else t) for k, t in case.items()}
    rel, _, ls_err = field_errors(
        cpu["x"],
        cpu["y"],
        v.cpu(),
        ls.cpu(),
        weights=cpu["w"],
        power=cpu["power"],
        eps=cpu["eps"],
        exclude=cpu["exclude"],
        eps_rows=cpu["eps_rows"],
    )
    return max(rel, ls_err)


def _check_backward(mod, case, need_w=True, seed=5):
    x, y, w = case["x"], case["y"], case["w"]
    g = torch.Generator(device=x.device).manual_seed(seed)
    gv = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float64).to(x.dtype)
    gl = torch.randn(x.shape[0], generator=g, device=x.device, dtype=torch.float64).to(x.dtype)
    v, ls = mod.field_forward(x, y, w, case["power"], case["eps"], exclude=case["exclude"])
    need_w = need_w and w is not None
    # through ops.gradients, as every op pair does (it zeroes the upstream gradients of rows no
    # charge reaches: the protocol leaves dL/dx = g_v there)
    got = ops.gradients(
        ops.protocol_backward(mod.field_backward),
        x,
        y,
        w,
        case["power"],
        case["eps"],
        case["exclude"],
        None,
        v,
        ls,
        gv,
        gl,
        True,
        True,
        need_w,
        False,
    )
    want = reference_grads(x, y, w, case["power"], gv, gl, case["exclude"], case["eps"])
    errs = []
    for name, gg, r in zip(("dx", "dy", "dw"), got, want[: 2 + need_w]):
        if not bool(torch.isfinite(gg).all()):
            raise FloatingPointError(f"non-finite {name}")
        errs.append(row_errors(gg.cpu(), r.cpu()))
    return max(errs)


def _check_flow(mod, case, solver, n_steps):
    x, y, w = case["x"], case["y"], case["w"]
    N = x.shape[0]
    t0 = torch.full((N,), math.log(0.5), device=x.device, dtype=torch.float64)
    dt = torch.full((N,), 0.1, device=x.device, dtype=torch.float64)
    out = mod.flow_steps(x, y, w, t0, dt, n_steps, solver)
    want = reference.flow_steps(x.double(), y, w, t0, dt, n_steps, solver)
    return flow_errors(out.cpu(), want.cpu(), x.cpu())


QUICK_FEATURES = ("weights", "zero-weight-nearest", "dead-rows")


def correctness(sink, name, mod, device="cuda", dry=False, quick=False):
    """Every op x dtype x case of one backend (module docstring). quick: float32 and three
    conformance features only (the CI's dry rehearsal)."""
    sys.path.insert(0, str(ROOT / "tests" / "conformance"))
    from conformance_cases import FEATURES, field_case

    if quick:
        FEATURES = [f for f in FEATURES if f in QUICK_FEATURES]  # noqa: N806

    forward_only = name == "triton-gemm"  # its backward and flow are the exact Triton kernels
    main = (40, 50, 33) if dry else (1000, 3000, 129)
    for dt_name in _dtypes_of(name):
        if quick and dt_name != "float32":
            continue
        dtype = DTYPES[dt_name]
        tol = tolerance(dtype)

        def row(op, case):
            return dict(backend=name, op=op, dtype=dt_name, case=case)

        N, B, D = main
        x, y, w = problem(N, B, D, dtype, seed=1, device=device)
        g = torch.Generator(device=device).manual_seed(2)
        ex = torch.randint(-1, B, (N,), device=device, generator=g)
        base = dict(x=x, y=y, w=w, power=float(D), eps=0.0, exclude=ex, eps_rows=None)
        run_row(
            sink,
            row("forward", "near-coincident"),
            lambda: _check_forward(mod, base),
            tol.v,
            device,
        )
        small = dict(base, x=x[: N // 2], exclude=ex[: N // 2].clamp(max=B - 1))
        if not forward_only:
            run_row(
                sink,
                row("backward", "near-coincident"),
                lambda: _check_backward(mod, small),
                tol.grad,
                device,
            )
            # without the near-coincident query: 4 steps at z = 0.5 next to a charge amplify
            # float32 rounding beyond the tolerance in every backend (the CPU kernel's too)
            flow_case = dict(
                base,
                x=x[1 : N // 2, : D - 1].contiguous(),
                y=y[: (B * 2) // 3, : D - 1].contiguous(),
                w=w[: (B * 2) // 3],
            )
            for solver in ("euler", "rk4"):
                run_row(
                    sink,
                    row(solver, "4 steps"),
                    lambda s=solver: _check_flow(mod, flow_case, s, 4),
                    tol.flow,
                    device,
                )
        for feature in FEATURES:
            case = field_case(29, 41, 5, feature, dtype, seed=1, device=device)
            run_row(
                sink, row("forward", feature), lambda c=case: _check_forward(mod, c), tol.v, device
            )
            if (
                not forward_only
                and feature
                in ("weights", "exclude", "dead-rows", "coincident", "zero-weight-nearest")
                and case["eps_rows"] is None
            ):
                run_row(
                    sink,
                    row("backward", feature),
                    lambda c=case, f=feature: _check_backward(
                        mod, c, need_w=f != "zero-weight-nearest"
                    ),
                    tol.grad,
                    device,
                )
        if dt_name != "float32":
            continue
        for case_name, (n, b, d) in (
            ("N=1", (1, 7, 3)),
            ("B=1", (7, 1, 3)),
            ("D=1", (17, 70, 1)),
            ("N=B=D=1", (1, 1, 1)),
            ("ragged", (37, 53, 33)),
            ("x16", (64, 48, 32)),
        ):
            case = field_case(n, b, d, "weights", dtype, seed=3, device=device)
            run_row(
                sink,
                row("forward", case_name),
                lambda c=case: _check_forward(mod, c),
                tol.v,
                device,
            )
            if forward_only:
                continue
            run_row(
                sink,
                row("backward", case_name),
                lambda c=case: _check_backward(mod, c),
                tol.grad,
                device,
            )
            run_row(
                sink,
                row("rk4", case_name + " n_steps=1"),
                lambda c=case: _check_flow(mod, c, "rk4", 1),
                tol.flow,
                device,
            )


def check_gemm_form(device="cuda", n=256, dims=(33, 129, 513)) -> list[dict]:
    """The GEMM form's rounding bound and certificate on the GPU: its bound
    |q - |x - y|^2| <= C_S (|x|^2 + |y|^2) on every pair of random, clustered and
    near-coincident data at each precision (error = the largest ratio actual / bound, tolerance
    1: the bound's model of the tensor cores' float32 accumulation is checked here, where the
    interpreter cannot), its certificate with small margins (error = the largest ratio of the
    actual error beyond the exact path's rounding to the certified bound; tolerance 1), and the
    near-coincident forward at each precision against the float32 tolerance. n, dims and
    device="cpu" (under TRITON_INTERPRET=1) make the dry run."""
    sink = Sink()
    gemm_form(sink, device, n, dims)
    return sink.rows


def gemm_form(sink, device="cuda", n=256, dims=(33, 129, 513)):
    from poissonflow.kernels.triton import _gemm

    g = torch.Generator(device=device).manual_seed(7)

    def clustered(n, d, k=16, spread=0.5, norm=10.0):
        c = torch.randn(k, d, device=device, generator=g)
        c = norm * c / c.norm(dim=1, keepdim=True)
        idx = torch.randint(0, k, (n,), device=device, generator=g)
        return c[idx] + spread * torch.randn(n, d, device=device, generator=g) / d**0.5

    def near(n, d):
        y = torch.randn(2 * n, d, device=device, generator=g, dtype=torch.float64)
        y = 10 * y / y.norm(dim=1, keepdim=True)
        u = torch.randn(2 * n, d, device=device, generator=g, dtype=torch.float64)
        u = 1e-3 * u / u.norm(dim=1, keepdim=True)
        y[1::2] = y[0::2] + u[:n]
        return (y[0::2] + u[n:]).float(), y.float()

    def r2_ratio(precision):
        worst = 0.0
        for D in dims:
            cases = [
                (
                    torch.randn(n, D, device=device, generator=g),
                    torch.randn(2 * n, D, device=device, generator=g),
                ),
                (clustered(n, D), clustered(2 * n, D)),
                near(n, D),
            ]
            for x, y in cases:
                q, err = _gemm.gemm_r2_bounds(x, y, precision=precision)
                true = (
                    torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist")
                    ** 2
                )
                worst = max(worst, float(((q.double() - true).abs() / err.double()).max()))
        return worst

    def certificate(D, margin):
        x, y = clustered(2 * n, D, norm=2.0, spread=1.5), clustered(8 * n, D, norm=2.0, spread=1.5)
        res = _gemm.gemm_field_forward(x, y, None, float(D), 0.0, margin=margin, fallback=False)
        v_ref, _ = poisson_field_reference(
            x.double(), y.double(), None, float(D), 0.0, r2_floor=torch.finfo(torch.float32).tiny
        )
        dv = (res.v.double() - v_ref).norm(dim=1)
        rounding = 1e-5 * v_ref.norm(dim=1)  # the exact path's float32 rounding
        b_v = res.certificate[:, 0].double()
        excess = (dv - rounding).clamp_min(0.0)
        return float((excess / b_v.clamp_min(1e-300)).max())

    def near_forward(precision):
        x, y = near(2 * n, dims[-1])
        p = float(x.shape[1])
        res = _gemm.gemm_field_forward(x, y, None, p, 0.0, precision=precision)
        rel, _, ls_err = field_errors(x.cpu(), y.cpu(), res.v.cpu(), res.log_scale.cpu(), power=p)
        return max(rel, ls_err)

    def row(op):
        return dict(backend="triton-gemm", op=op, dtype="float32", case="gemm-form")

    for precision in ("tf32", "bf16", "tf32x3"):
        run_row(sink, row(f"r2 bound [{precision}]"), lambda p=precision: r2_ratio(p), 1.0, device)
    for D in dims[:2]:
        for margin in (4.0, 8.0):
            run_row(
                sink,
                row(f"certificate D={D} K={margin:g}"),
                lambda d=D, k=margin: certificate(d, k),
                1.0,
                device,
            )
    for precision in ("tf32", "bf16", "tf32x3"):
        run_row(
            sink,
            row(f"near-coincident [{precision}]"),
            lambda p=precision: near_forward(p),
            tolerance(torch.float32).v,
            device,
        )


def check_backend(name, mod, dtype_name) -> list[dict]:
    """The correctness rows of one backend and dtype (in-process use)."""
    sink = Sink()
    correctness(sink, name, mod)
    return [r for r in sink.rows if r["dtype"] == dtype_name]


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def fp32_lanes_per_sm(major: int, minor: int) -> int:
    """FP32 units per SM: 64 on V100, T4 and A100 (sm_70, sm_75, sm_80), 128 from sm_86 on."""
    return 64 if (major, minor) in ((7, 0), (7, 2), (7, 5), (8, 0)) else 128


def _clock_khz(device_index):
    """The SM clock the peaks are computed at: the CUDA module's (max) clock, else nvidia-smi's
    max clock, else None."""
    if importlib.util.find_spec("poissonflow._cuda") is not None:
        try:
            return importlib.import_module("poissonflow._cuda").device_info(device_index)[
                "clock_khz"
            ]
        except Exception:  # noqa: BLE001
            pass
    try:
        import subprocess

        out = subprocess.run(
            [
                "nvidia-smi",
                "-i",
                str(device_index),
                "--query-gpu=clocks.max.sm",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return int(float(out.splitlines()[0])) * 1000
    except Exception:  # noqa: BLE001
        return None


def peaks(device="cuda") -> dict:
    """The card's FP32 CUDA-core and dense TF32/BF16 tensor-core peaks (GFLOP/s) from its SM
    count and clock, and the same run's torch.mm rates (float32 and TF32, 4096^3)."""
    if device != "cuda":
        return dict(
            device="cpu (dry run)",
            fp32_peak=None,
            tf32_peak=None,
            bf16_peak=None,
            mm_fp32=gpu_mm_gflops("cpu"),
            mm_tf32=None,
        )
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    clock = _clock_khz(idx)
    out = dict(
        device=props.name,
        sm_count=props.multi_processor_count,
        capability=f"{props.major}.{props.minor}",
        clock_khz=clock,
    )
    ghz = clock * 1e3 / 1e9 if clock else None
    tc = TC_FLOPS_PER_SM_CLK.get((props.major, props.minor))
    out["fp32_peak"] = (
        (props.multi_processor_count * fp32_lanes_per_sm(props.major, props.minor) * 2 * ghz)
        if ghz
        else None
    )
    out["tf32_peak"] = props.multi_processor_count * tc["tf32"] * 2 * ghz if ghz and tc else None
    out["bf16_peak"] = props.multi_processor_count * tc["bf16"] * 2 * ghz if ghz and tc else None
    out["mm_fp32"] = gpu_mm_gflops("cuda")
    out["mm_tf32"] = gpu_mm_gflops("cuda", tf32=True)
    return out


def throughput(sink, name, mod, size, dims, device="cuda", repeat=3, pk=None):
    """Forward (float32, bfloat16), backward, Euler and RK4 step rows of one backend (module
    docstring); each row also gets its first 64 queries' error against the reference."""
    pk = pk or {}
    forward_only = name == "triton-gemm"
    for D in dims:
        g = torch.Generator(device=device).manual_seed(3)
        x32 = torch.randn(size, D, device=device, generator=g)
        y32 = torch.randn(size, D, device=device, generator=g)
        t0 = torch.full((size,), math.log(0.5), device=device, dtype=torch.float64)
        dt = torch.full((size,), 0.1, device=device, dtype=torch.float64)
        pairs = size * size
        cases = []
        for dt_name in ("float32", "bfloat16"):
            if dt_name not in _dtypes_of(name):
                continue
            x, y = x32.to(DTYPES[dt_name]), y32.to(DTYPES[dt_name])
            cases.append(
                (
                    "forward",
                    dt_name,
                    4 * D * pairs,
                    lambda x=x, y=y: mod.field_forward(x, y, None, float(D), 0.0),
                    (x, y),
                )
            )
        if not forward_only:
            v, ls = mod.field_forward(x32, y32, None, float(D), 0.0)
            gv, gl = torch.randn_like(v), torch.randn_like(ls)
            cases += [
                (
                    "backward",
                    "float32",
                    11 * D * pairs,
                    lambda: mod.field_backward(
                        x32,
                        y32,
                        None,
                        float(D),
                        0.0,
                        v,
                        ls,
                        gv,
                        gl,
                        need_x=True,
                        need_y=True,
                        need_w=False,
                    ),
                    None,
                ),
                (
                    "euler step",
                    "float32",
                    4 * D * pairs,
                    lambda: mod.flow_steps(x32, y32, None, t0, dt, 1, "euler"),
                    None,
                ),
                (
                    "rk4 step",
                    "float32",
                    16 * D * pairs,
                    lambda: mod.flow_steps(x32, y32, None, t0, dt, 1, "rk4"),
                    None,
                ),
            ]
        for op, dt_name, flops, fn, spot in cases:
            run_row(
                sink,
                dict(backend=name, op=op, dtype=dt_name, case=f"N=B={size} D={D}", kind="perf"),
                lambda fn=fn, flops=flops, spot=spot, dt_name=dt_name: _timed_row(
                    fn, flops, spot, D, device, repeat, pk, dt_name
                ),
                None,
                device,
            )
        if name == "triton" and importlib.util.find_spec("pykeops") is not None:
            from peers import keops_field

            run_row(
                sink,
                dict(
                    backend="keops",
                    op="forward",
                    dtype="float32",
                    case=f"N=B={size} D={D}",
                    kind="perf",
                ),
                lambda: _timed_row(
                    lambda: keops_field(x32, y32, float(D)),
                    4 * D * pairs,
                    None,
                    D,
                    device,
                    repeat,
                    pk,
                    "float32",
                ),
                None,
                device,
            )


def _timed_row(fn, flops, spot, D, device, repeat, pk, dt_name):
    seconds = device_timed(fn, repeat, device)
    gflops = flops / seconds / 1e9
    out = dict(seconds=seconds, gflops=gflops)
    for key in ("fp32_peak", "tf32_peak", "mm_fp32", "mm_tf32"):
        if pk.get(key):
            out[f"of_{key}"] = gflops / pk[key]
    if spot is not None:
        x, y = spot
        v, ls = fn()
        rel, _, ls_err = field_errors(
            x[:64].cpu(), y.cpu(), v[:64].cpu(), ls[:64].cpu(), power=float(D)
        )
        out["error"] = max(rel, ls_err)
        out["tol"] = tolerance(DTYPES[dt_name]).v
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def load_rows(directory) -> list[dict]:
    rows = {}
    for path in sorted(Path(directory).glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("status") == "started":
                    rows.setdefault(r["id"], dict(id=r["id"], status="started"))
                else:
                    rows[r.get("id", str(len(rows)))] = r
    out = []
    for r in rows.values():
        if r.get("status") == "started":
            b, op, dt, case = (r["id"].split("|") + ["?"] * 4)[:4]
            r = dict(
                backend=b,
                op=op,
                dtype=dt,
                case=case,
                passed=False,
                status="no result",
                message="started, never finished (killed or cut short)",
            )
        out.append(r)
    return out


def print_report(rows, pk=None) -> int:
    pk = pk or next((r for r in rows if r.get("id") == "peaks"), None)
    rows = [r for r in rows if r.get("id") != "peaks"]
    perf = [r for r in rows if r.get("kind") == "perf"]
    checks = [r for r in rows if r.get("kind") != "perf" and r.get("status") != "interrupted"]
    failed = [r for r in checks if not r.get("passed")]
    print(
        f"correctness: {len(checks)} rows, {len(checks) - len(failed)} passed, {len(failed)} failed"
    )
    print(f"{'backend':12} {'op':28} {'dtype':9} {'case':24} {'error':>10} {'tol':>9}  result")
    for r in sorted(checks, key=lambda r: (r.get("passed", False), r.get("backend", ""))):
        if r.get("passed") and len(checks) > 60:
            continue  # passing rows are in the JSONL files; the failures are printed
        err = "-" if r.get("error") is None else f"{r['error']:.2e}"
        tol = "-" if r.get("tol") is None else f"{r['tol']:.1e}"
        res = "PASS" if r.get("passed") else f"FAIL {r.get('status', '')} {r.get('message', '')}"
        print(
            f"{r.get('backend', '?'):12} {r.get('op', '?'):28} {r.get('dtype', '?'):9} "
            f"{str(r.get('case', '')):24} {err:>10} {tol:>9}  {res[:160]}"
        )
    if pk:
        print(
            f"\ndevice {pk.get('device')}: FP32 peak {pk.get('fp32_peak') or 0:.0f}, TF32 "
            f"tensor-core peak {pk.get('tf32_peak') or 0:.0f}, torch.mm float32 "
            f"{pk.get('mm_fp32') or 0:.0f}, TF32 {pk.get('mm_tf32') or 0:.0f} GFLOP/s"
        )
    if perf:
        print(
            f"\n{'backend':12} {'op':11} {'dtype':9} {'case':20} {'ms':>9} {'GFLOP/s':>9} "
            f"{'/FP32pk':>8} {'/TF32pk':>8} {'/mm32':>7} {'err64':>9}"
        )
        for r in perf:
            if r.get("gflops") is None:
                print(
                    f"{r.get('backend'):12} {r.get('op'):11} {r.get('dtype'):9} "
                    f"{r.get('case'):20} failed: {r.get('message', r.get('status'))}"[:200]
                )
                continue

            def frac(k):
                return f"{r[k]:.1%}" if r.get(k) is not None else "n/a"

            err = f"{r['error']:.1e}" if r.get("error") is not None else "-"
            print(
                f"{r['backend']:12} {r['op']:11} {r['dtype']:9} {r['case']:20} "
                f"{r['seconds'] * 1e3:9.2f} {r['gflops']:9.0f} {frac('of_fp32_peak'):>8} "
                f"{frac('of_tf32_peak'):>8} {frac('of_mm_fp32'):>7} {err:>9}"
            )
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--no-perf", action="store_true", help="skip the throughput measurements")
    ap.add_argument("--size", type=int, default=None, help="N = B for the throughput runs")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="D of the throughput runs")
    ap.add_argument("--dim", type=int, default=None, help="(one D; as --dims)")
    ap.add_argument("--only", choices=("correctness", "gemm-form", "throughput", "peaks"))
    ap.add_argument("--backend", help="only this registry backend")
    ap.add_argument("--jsonl", help="append each row to this file as it completes")
    ap.add_argument("--resume", action="store_true", help="skip the rows --jsonl already holds")
    ap.add_argument("--peaks", help="peaks JSON file (read by --only throughput and --report)")
    ap.add_argument("--report", metavar="DIR", help="print the tables of DIR/*.jsonl")
    ap.add_argument(
        "--dry",
        action="store_true",
        help="no GPU: interpreter and host emulator on CPU tensors, tiny sizes",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="correctness in float32 on three conformance features only",
    )
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)

    if args.report:
        pk = (
            json.loads(Path(args.peaks).read_text())
            if args.peaks and Path(args.peaks).exists()
            else None
        )
        return print_report(load_rows(args.report), pk)

    device = "cpu" if args.dry else "cuda"
    if not args.dry and not torch.cuda.is_available():
        msg = "no GPU present (torch.cuda.is_available() is False): nothing to check"
        report = {"gpu": False, "message": msg, "results": [], "perf": []}
        print(json.dumps(report) if args.json else msg)
        return 0
    size = args.size or (48 if args.dry else 65536)
    dims = args.dims or ([args.dim] if args.dim else ([3, 33] if args.dry else [129, 33, 3]))
    sink = Sink(args.jsonl, resume=args.resume)
    try:
        if args.only == "peaks":
            if "peaks" in sink.done:
                return 0
            pk = peaks(device)
            sink.write(dict(id="peaks", status="done", **pk))
            if args.peaks:
                Path(args.peaks).write_text(json.dumps(pk, indent=1))
            print(json.dumps(pk, indent=1))
            return 0
        found, missing = discover_backends(args.dry)
        if args.backend:
            if args.backend not in found:
                # a failure on a GPU; in a dry run (e.g. CI without triton) only a note
                sink.write(
                    dict(
                        id=f"{args.backend}|available|-|-",
                        backend=args.backend,
                        op="available",
                        dtype="-",
                        case="-",
                        passed=args.dry,
                        status="skipped" if args.dry else "error",
                        message=missing.get(args.backend, "unknown"),
                    )
                )
                print(f"{args.backend}: not available ({missing.get(args.backend)})")
                return 2
            found = {args.backend: found[args.backend]}
        if args.dry or args.only == "correctness" or args.only is None:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if args.only in (None, "correctness"):
            for name, mod in found.items():
                correctness(sink, name, mod, device, args.dry, args.quick)
        if args.only == "gemm-form" or (args.only is None and "triton-gemm" in found):
            gemm_form(sink, device, *((16, (33,)) if args.dry else ()))
        torch.use_deterministic_algorithms(False)
        if args.only == "throughput" or (args.only is None and not args.no_perf):
            pk = None
            if args.peaks and Path(args.peaks).exists():
                pk = json.loads(Path(args.peaks).read_text())
            elif args.jsonl and os.path.exists(args.jsonl):
                pk = next(
                    (r for r in load_rows(Path(args.jsonl).parent) if r.get("id") == "peaks"), None
                )
            pk = pk or peaks(device)
            for name, mod in found.items():
                throughput(sink, name, mod, size, dims, device, repeat=1 if args.dry else 3, pk=pk)
    except StickyFault as exc:
        print(f"CUDA error (sticky for this process): {exc}; the rest in a fresh process")
        return 3
    except KeyboardInterrupt:
        sink.write(
            dict(
                id=f"interrupted|{time.time():.0f}",
                status="interrupted",
                message="cut short by SIGINT/SIGTERM",
            )
        )
        print("interrupted: the rows so far are in", args.jsonl or "memory")
        return 130
    if args.jsonl:
        return 0 if all(r.get("passed", True) for r in sink.rows) else 1
    if args.json:
        print(json.dumps({"gpu": device == "cuda", "results": sink.rows}, indent=1))
        return 0 if all(r.get("passed", True) for r in sink.rows) else 1
    return print_report(sink.rows)


if __name__ == "__main__":
    sys.exit(main())
