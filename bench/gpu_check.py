"""Check every GPU kernel of poissonflow against the float64 reference and measure throughput.

    python bench/gpu_check.py            # pass/fail table + throughput table
    python bench/gpu_check.py --json     # the same as one JSON document on stdout
    python bench/gpu_check.py --no-perf  # correctness only

Backends: every entry of the registry (poissonflow/registry.py) that runs on CUDA tensors
("cuda" when poissonflow._cuda is compiled, "triton" when triton is installed); each exposes the
protocol of docs/ARCHITECTURE.md. Operations: forward, backward (dL/dx, dL/dy, dL/dw), fused
Euler and RK4 flow steps, each in float32 and bfloat16, against poissonflow.kernels.reference in float64
on the same (rounded) inputs, with the test suite's error measure and tolerances
(poissonflow/testing.py: per-row relative errors, TOLERANCES[dtype]).

Throughput (docs/DESIGN.md, "How performance is measured") at N = B = 65536, D = 129 in float32 by default: GFLOP/s with
4*D flops per (query, charge) pair for a field pass (backward: 11*D, its dL/dx kernel forms r2
and g.(x - y) then sum a (y - x), its dL/dy kernel the same plus pi * g), as a ratio to the
float32 GEMM rate of torch.mm on 4096 x 4096 matrices (TF32 off) measured in the same run, and
to the float32 CUDA-core peak (SMs x FP32 lanes x 2 x boost clock) when the clock is known.
Without a GPU it prints "no GPU present" and exits 0. Exit status 1 when any check fails.

The GEMM-form field (backend "triton-gemm", docs/DESIGN.md, "A tensor-core field with a certified error") is checked like every
backend above, and besides on the tensor cores themselves (`check_gemm_form`): its rounding
bound |q - |x - y|^2| <= C_S (|x|^2 + |y|^2) on every pair of random, clustered and
near-coincident data at each precision (error = the largest ratio actual / bound, tolerance
1: the bound's model of the tensor cores' float32 accumulation is checked here, where the
interpreter cannot), its certificate with small margins (error = the largest ratio of the
actual error beyond the exact path's rounding to the certified bound; tolerance 1), and the
near-coincident forward at each precision against the float32 tolerance.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("poissonflow") is None:
    # run from a source checkout too; an installed poissonflow (with its compiled kernels) is
    # not shadowed by the source tree, which holds none (bench/gpu_session.sh relies on this)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poissonflow import registry  # noqa: E402

from poissonflow.kernels import reference  # noqa: E402
from poissonflow.kernels.reference import poisson_field_reference  # noqa: E402
from poissonflow.testing import field_errors, flow_errors, row_errors, tolerance  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from field_throughput import device_timed, gpu_mm_gflops  # noqa: E402  (one timer for both)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROTOCOL = ("field_forward", "field_backward", "flow_steps")


def discover_backends() -> tuple[dict, dict]:
    """({name: protocol module}, {name: why unavailable}) for every registry entry that runs on
    CUDA tensors (the reference is the oracle, not a GPU kernel)."""
    found, missing = {}, {}
    for name, entry in registry.REGISTRY.items():
        if name == "reference" or "cuda" not in entry.devices:
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


def problem(N, B, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, D, device="cuda", generator=g, dtype=torch.float64)
    y = torch.randn(B, D, device="cuda", generator=g, dtype=torch.float64)
    w = torch.rand(B, device="cuda", generator=g, dtype=torch.float64) + 0.1
    # A query 1e-3 from a charge of norm 10: the case that breaks the GEMM expansion of r2.
    y[0] = y[0] / y[0].norm() * 10
    step = torch.randn(D, device="cuda", generator=g, dtype=torch.float64)
    x[0] = y[0] + 1e-3 * step / step.norm()
    return x.to(dtype), y.to(dtype), w.to(dtype)


def reference_grads(x, y, w, p, gv, gl, exclude):
    x, y, w = (t.double().requires_grad_() for t in (x, y, w))
    v, ls = poisson_field_reference(x, y, w, p, 0.0, exclude=exclude)
    loss = (v * gv.double()).sum() + (ls * gl.double()).sum()
    return torch.autograd.grad(loss, (x, y, w))


def reference_flow(x, y, w, t0, dt, n_steps, solver):
    return reference.flow_steps(x.double(), y, w, t0, dt, n_steps, solver)


def check_backend(name, mod, dtype_name) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rows = []

    def record(op, err, tol):
        ok = math.isfinite(err) and err <= tol
        rows.append(dict(backend=name, op=op, dtype=dtype_name, error=err, tol=tol, passed=ok))

    def guarded(op, tol, fn):
        try:
            record(op, fn(), tol)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, not the end
            rows.append(dict(backend=name, op=op, dtype=dtype_name, error=None, tol=tol,
                             passed=False, message=f"{type(exc).__name__}: {exc}"))

    N, B, D = 1000, 3000, 129
    x, y, w = problem(N, B, D, dtype, seed=1)
    gen = torch.Generator("cuda").manual_seed(2)
    exclude = torch.randint(-1, B, (N,), device="cuda", generator=gen)

    def forward():
        v, ls = mod.field_forward(x, y, w, float(D), 0.0, exclude=exclude)
        rel, _, ls_err = field_errors(x, y, v, ls, weights=w, power=float(D), exclude=exclude)
        # one number per check: the larger of the two, each against its own (equal) bound
        return max(rel, ls_err)

    def backward():
        xs, ys, ws = x[:500], y[:800], w[:800]
        ex = exclude[:500].clamp(max=799)
        v, ls = mod.field_forward(xs, ys, ws, float(D), 0.0, exclude=ex)
        gv = torch.randn_like(xs, dtype=torch.float32).to(dtype)
        gl = torch.randn(500, device="cuda").to(dtype)
        got = mod.field_backward(xs, ys, ws, float(D), 0.0, v, ls, gv, gl, need_x=True,
                                 need_y=True, need_w=True, exclude=ex)
        want = reference_grads(xs, ys, ws, float(D), gv, gl, ex)
        return max(row_errors(g, r) for g, r in zip(got, want))

    def flow(solver):
        xs, ys, ws = x[:500, :128].contiguous(), y[:700, :128].contiguous(), w[:700]
        # flow time in float64 on every path (docs/ARCHITECTURE.md)
        t0 = torch.full((500,), math.log(0.5), device="cuda", dtype=torch.float64)
        dt = torch.full((500,), 0.1, device="cuda", dtype=torch.float64)
        out = mod.flow_steps(xs, ys, ws, t0, dt, 4, solver)
        want = reference_flow(xs, ys, ws, t0, dt, 4, solver)
        return flow_errors(out, want, xs)

    tol = tolerance(dtype)
    guarded("forward", tol.v, forward)
    guarded("backward", tol.grad, backward)
    guarded("euler", tol.flow, lambda: flow("euler"))
    guarded("rk4", tol.flow, lambda: flow("rk4"))
    return rows


def check_gemm_form(device="cuda", n=256, dims=(33, 129, 513)) -> list[dict]:
    """The GEMM form's rounding bound and certificate on the GPU (module docstring); n, dims
    and device="cpu" (under TRITON_INTERPRET=1) make bench/gpu_session.sh's dry run."""
    from poissonflow.kernels.triton import _gemm

    rows = []

    def record(op, dtype, fn, tol):
        try:
            err = fn()
            ok = math.isfinite(err) and err <= tol
            rows.append(dict(backend="triton-gemm", op=op, dtype=dtype, error=err, tol=tol,
                             passed=ok))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(backend="triton-gemm", op=op, dtype=dtype, error=None, tol=tol,
                             passed=False, message=f"{type(exc).__name__}: {exc}"))

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
            cases = [(torch.randn(n, D, device=device, generator=g),
                      torch.randn(2 * n, D, device=device, generator=g)),
                     (clustered(n, D), clustered(2 * n, D)), near(n, D)]
            for x, y in cases:
                q, err = _gemm.gemm_r2_bounds(x, y, precision=precision)
                true = (torch.cdist(x.double(), y.double(),
                                    compute_mode="donot_use_mm_for_euclid_dist") ** 2)
                worst = max(worst, float(((q.double() - true).abs() / err.double()).max()))
        return worst

    def certificate(D, margin):
        x, y = clustered(2 * n, D, norm=2.0, spread=1.5), clustered(8 * n, D, norm=2.0, spread=1.5)
        res = _gemm.gemm_field_forward(x, y, None, float(D), 0.0, margin=margin,
                                       fallback=False)
        v_ref, ls_ref = poisson_field_reference(x.double(), y.double(), None, float(D), 0.0,
                                                r2_floor=torch.finfo(torch.float32).tiny)
        dv = (res.v.double() - v_ref).norm(dim=1)
        rounding = 1e-5 * v_ref.norm(dim=1)  # the exact path's float32 rounding
        b_v = res.certificate[:, 0].double()
        excess = (dv - rounding).clamp_min(0.0)
        return float((excess / b_v.clamp_min(1e-300)).max())

    def near_forward(precision):
        x, y = near(2 * n, dims[-1])
        p = float(x.shape[1])
        res = _gemm.gemm_field_forward(x, y, None, p, 0.0, precision=precision)
        rel, _, ls_err = field_errors(x, y, res.v, res.log_scale, power=p)
        return max(rel, ls_err)

    for precision in ("tf32", "bf16", "tf32x3"):
        record(f"r2 bound [{precision}]", "float32", lambda p=precision: r2_ratio(p), 1.0)
    for D in dims[:2]:
        for margin in (4.0, 8.0):
            record(f"certificate D={D} K={margin:g}", "float32",
                   lambda d=D, k=margin: certificate(d, k), 1.0)
    for precision in ("tf32", "bf16", "tf32x3"):
        record(f"near-coincident [{precision}]", "float32",
               lambda p=precision: near_forward(p), tolerance(torch.float32).v)
    return rows


def timed(fn, repeat=3) -> float:
    """Median seconds of fn() on the GPU (one warm-up call)."""
    return device_timed(fn, repeat, "cuda")


def gemm_gflops() -> float:
    """The same run's float32 torch.mm rate, TF32 off (the reference rate of the table)."""
    return gpu_mm_gflops("cuda")


def fp32_lanes_per_sm(major: int, minor: int) -> int:
    """FP32 units per SM: 64 on V100, T4 and A100 (sm_70, sm_75, sm_80), 128 from sm_86 on."""
    return 64 if (major, minor) in ((7, 0), (7, 2), (7, 5), (8, 0)) else 128


def fp32_peak_gflops() -> float | None:
    """SMs x FP32 lanes per SM x 2 (FMA) x boost clock; None when the clock is unknown."""
    if importlib.util.find_spec("poissonflow._cuda") is None:
        return None
    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    info = importlib.import_module("poissonflow._cuda").device_info(device)
    lanes = fp32_lanes_per_sm(props.major, props.minor)
    return props.multi_processor_count * lanes * 2 * info["clock_khz"] * 1e3 / 1e9


def measure(found, N, B, D) -> list[dict]:
    out = []
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(N, D, device="cuda", generator=g)
    y = torch.randn(B, D, device="cuda", generator=g)
    xf, yf = x[:, : D - 1].contiguous(), y[:, : D - 1].contiguous()  # flow state: d = D - 1
    t0 = torch.full((N,), math.log(0.5), device="cuda", dtype=torch.float64)
    dt = torch.full((N,), 0.1, device="cuda", dtype=torch.float64)
    pairs = N * B
    for name, mod in found.items():
        v, ls = mod.field_forward(x, y, None, float(D), 0.0)
        gv, gl = torch.randn_like(v), torch.randn_like(ls)
        cases = [
            ("forward", 4 * D * pairs, lambda: mod.field_forward(x, y, None, float(D), 0.0)),
            ("backward", 11 * D * pairs, lambda: mod.field_backward(
                x, y, None, float(D), 0.0, v, ls, gv, gl, need_x=True, need_y=True, need_w=True)),
            ("euler step", 4 * (D - 1) * pairs,
             lambda: mod.flow_steps(xf, yf, None, t0, dt, 1, "euler")),
            ("rk4 step", 16 * (D - 1) * pairs,
             lambda: mod.flow_steps(xf, yf, None, t0, dt, 1, "rk4")),
        ]
        for op, flops, fn in cases:
            try:
                seconds = timed(fn)
                out.append(dict(backend=name, op=op, seconds=seconds, gflops=flops / seconds / 1e9))
            except Exception as exc:  # noqa: BLE001
                out.append(dict(backend=name, op=op, seconds=None, gflops=None,
                                message=f"{type(exc).__name__}: {exc}"))
    return out


def print_tables(report) -> None:
    print(f"device: {report['device']}")
    for name, why in report["unavailable"].items():
        print(f"  {name}: not checked ({why})")
    print(f"\n{'backend':11} {'op':26} {'dtype':9} {'error':>10} {'tol':>9}  result")
    for r in report["results"]:
        err = "-" if r["error"] is None else f"{r['error']:.2e}"
        line = f"{r['backend']:11} {r['op']:26} {r['dtype']:9} {err:>10} {r['tol']:9.1e}  "
        print(line + ("PASS" if r["passed"] else "FAIL " + r.get("message", "")))
    if not report["perf"]:
        return
    gemm, peak = report["gemm_gflops"], report["fp32_peak_gflops"]
    n, b, d = report["perf_shape"]
    print(f"\nthroughput, float32, N = {n}, B = {b}, D = {d} (flow: d = {d - 1}); "
          f"torch.mm GEMM {gemm:.0f} GFLOP/s" + (f", FP32 peak {peak:.0f} GFLOP/s" if peak else ""))
    print(f"{'backend':11} {'op':11} {'ms':>9} {'GFLOP/s':>9} {'/GEMM':>7} {'/peak':>7} "
          f"{'cuda/triton':>12}")
    by = {(p["backend"], p["op"]): p for p in report["perf"]}
    for p in report["perf"]:
        if p["seconds"] is None:
            print(f"{p['backend']:11} {p['op']:11} failed: {p['message']}")
            continue
        other = by.get(("triton", p["op"])) if p["backend"] == "cuda" else None
        ratio = (f"{other['seconds'] / p['seconds']:.2f}x" if other and other["seconds"] else "")
        frac_peak = f"{p['gflops'] / peak:.1%}" if peak else "n/a"
        print(f"{p['backend']:11} {p['op']:11} {p['seconds'] * 1e3:9.2f} {p['gflops']:9.0f} "
              f"{p['gflops'] / gemm:7.2f} {frac_peak:>7} {ratio:>12}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--no-perf", action="store_true", help="skip the throughput measurements")
    ap.add_argument("--size", type=int, default=65536, help="N = B for the throughput runs")
    ap.add_argument("--dim", type=int, default=129, help="D for the throughput runs")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        msg = "no GPU present (torch.cuda.is_available() is False): nothing to check"
        report = {"gpu": False, "message": msg, "results": [], "perf": []}
        print(json.dumps(report) if args.json else msg)
        return 0

    found, missing = discover_backends()
    report = {
        "gpu": True,
        "device": torch.cuda.get_device_name(0),
        "unavailable": missing,
        "results": [],
        "perf": [],
    }
    for name, mod in found.items():
        for dtype_name in DTYPES:
            report["results"] += check_backend(name, mod, dtype_name)
    if "triton-gemm" in found:
        report["results"] += check_gemm_form()
    if not args.no_perf and found:
        report["gemm_gflops"] = gemm_gflops()
        report["fp32_peak_gflops"] = fp32_peak_gflops()
        report["perf_shape"] = (args.size, args.size, args.dim)
        report["perf"] = measure(found, args.size, args.size, args.dim)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        if not found:
            why = "; ".join(f"{k}: {v}" for k, v in missing.items())
            print(f"no GPU backend is available: {why}")
        print_tables(report)
    return 0 if all(r["passed"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
