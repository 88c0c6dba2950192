"""Throughput of the Poisson-field kernels against their peers and the machine's GEMM rate.

    python bench/field_throughput.py            # the headline row and a sweep
    python bench/field_throughput.py --quick    # under a minute
    python bench/field_throughput.py --json out.json --plot out.png

Method (docs/DESIGN.md section 7): 4*D floating-point operations per (query, charge) pair for the
forward field; every figure is also given as a ratio measured in the same run: against float32
GEMM (torch.mm of two 4096 x 4096 matrices) and against the peers in bench/peers.py. Each
implementation is checked against the float64 reference before it is timed, and its error is
printed beside its speed. Times are the minimum over repeats after one warm-up call. Slow peers
are timed on a subset of the queries against all charges (throughput is per pair).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

import poissonflow  # noqa: E402
from poissonflow import flow, reference, registry  # noqa: E402
from poissonflow.reference import field_backward_reference  # noqa: E402
from poissonflow.testing import flow_errors, row_errors  # noqa: E402


def timed(fn, repeat):
    """Minimum over `repeat` calls after one warm-up call; repeat=0 times a single call
    without warm-up (for long runs whose kernels are already warm)."""
    if repeat == 0:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(n=4096, repeat=3):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    return 2.0 * n**3 / timed(lambda: torch.mm(a, b), repeat) / 1e9


def available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def forward_rows(N, D, impls, gemm, repeat, peer_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.randn(N, D, generator=g)
    power = float(D)
    rows = []
    for impl in impls:
        row = {"impl": impl.name, "op": "forward", "N": N, "B": N, "D": D, "dtype": "float32"}
        need = impl.peak_bytes(min(N, peer_rows) if impl.slow else N, N, D, 4)
        if need > 0.5 * available_memory_bytes():
            row["status"] = f"out of memory: needs {need / 2**30:.1f} GiB"
            rows.append(row)
            continue
        try:
            err_v, err_l = peers.reference_error(impl, x, y, power)
            n_timed = min(N, peer_rows) if impl.slow else N
            xs = x[:n_timed]
            sec = timed(lambda: impl.fn(xs, y, power), repeat)
        except (RuntimeError, MemoryError) as exc:  # allocation failures of naive peers
            row["status"] = f"failed: {str(exc).splitlines()[0][:80]}"
            rows.append(row)
            continue
        pairs = n_timed * N
        gflops = 4.0 * D * pairs / sec / 1e9
        row.update(
            status="ok", queries_timed=n_timed, seconds=sec * N / n_timed,
            pairs_per_s=pairs / sec, gflops=gflops, frac_gemm=gflops / gemm,
            err_v=err_v, err_log_scale=err_l,
        )
        rows.append(row)
    base = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    ours = base.get("poissonflow-cpu")
    for r in rows:
        if ours and r.get("status") == "ok":
            r["speedup_of_poissonflow"] = ours["gflops"] / r["gflops"]
    return rows


def backward_rows(N, D, gemm, repeat, peer_rows, seed=0):
    """Forward + backward (gradients for x and charges) of the cpu kernel against its forward
    alone, and against autograd through the pure-PyTorch field (on peer_rows queries)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.randn(N, D, generator=g)
    gv = torch.randn(N, D, generator=g)
    gl = torch.randn(N, generator=g)
    power = float(D)
    ours = peers.poissonflow_backward("cpu")
    # checked first: the first 128 queries against all charges (a complete sub-problem)
    n_chk = min(N, 128)
    dx, dy = ours(x[:n_chk], y, power, gv[:n_chk], gl[:n_chk])
    rx, ry, _ = field_backward_reference(x[:n_chk], y, None, power, 0.0, gv[:n_chk], gl[:n_chk])
    err_dx, err_dy = row_errors(dx, rx), row_errors(dy, ry)
    # forward and backward timed separately in the same autograd calls (min over repeats)
    fwd, bwd = float("inf"), float("inf")
    for _ in range(repeat + 1):
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        t0 = time.perf_counter()
        v, ls = poissonflow.poisson_field(xl, yl, power=power, backend="cpu")
        t1 = time.perf_counter()
        torch.autograd.grad([v, ls], [xl, yl], [gv, gl])
        t2 = time.perf_counter()
        fwd, bwd = min(fwd, t1 - t0), min(bwd, t2 - t1)
    both = fwd + bwd
    rows = [{
        "impl": "poissonflow-cpu", "op": "fwd+bwd", "N": N, "B": N, "D": D, "status": "ok",
        "seconds": both, "forward_seconds": fwd, "backward_seconds": bwd,
        "backward_over_forward": bwd / fwd, "err_dx": err_dx, "err_dy": err_dy,
        "gflops": 4.0 * D * N * N / both / 1e9, "frac_gemm": 4.0 * D * N * N / both / 1e9 / gemm,
    }]
    n = min(N, peer_rows)
    need = 12 * n * N * 4  # the autograd graph keeps ~a dozen n x B float32 matrices
    if need < 0.5 * available_memory_bytes():
        xs, gvs, gls = x[:n], gv[:n], gl[:n]
        sec = timed(lambda: peers.torch_autograd_backward(xs, y, power, gvs, gls), repeat)
        ours_n = timed(lambda: ours(xs, y, power, gvs, gls), repeat)
        rows.append({
            "impl": "torch-autograd", "op": "fwd+bwd", "N": n, "B": N, "D": D, "status": "ok",
            "seconds": sec, "gflops": 4.0 * D * n * N / sec / 1e9,
            "frac_gemm": 4.0 * D * n * N / sec / 1e9 / gemm,
            "speedup_of_poissonflow": sec / ours_n,
        })
    return rows


def ode_rows(N, d, gemm, euler_steps, rk4_steps, seed=0):
    """Seconds per Euler / RK4 step of the fused trajectory kernel, against one field
    evaluation and against an unfused loop (poisson_field call + update in Python)."""
    flow_steps = registry.get("cpu").module().flow_steps
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    y = torch.randn(N, d, generator=g)
    z = torch.full((N,), 0.5)
    field = timed(
        lambda: poissonflow.ops.field(x, y, None, float(d + 1), 0.0, None, z, "cpu"), 1
    )
    rows = []
    for solver, steps, evals in (("euler", euler_steps, 1), ("rk4", rk4_steps, 4)):
        t0 = torch.full((N,), math.log(0.5), dtype=torch.float64)
        dt = torch.full((N,), 0.05, dtype=torch.float64)
        # checked first: 32 queries against all charges, against the float64 reference flow
        n = min(N, 32)
        want = reference.flow_steps(x[:n].double(), y, None, t0[:n], dt[:n], steps, solver)
        err = flow_errors(flow_steps(x[:n], y, None, t0[:n], dt[:n], steps, solver), want, x[:n])
        err_unfused = flow_errors(_unfused_flow(x[:n], y, 0.5, 0.05, steps, solver), want, x[:n])
        fused = timed(lambda: flow_steps(x, y, None, t0, dt, steps, solver), 0) / steps
        unfused = timed(lambda: _unfused_flow(x, y, 0.5, 0.05, steps, solver), 0) / steps
        rows.append({
            "impl": "poissonflow-cpu", "op": f"{solver} step", "N": N, "B": N, "D": d,
            "status": "ok", "steps": steps, "seconds_per_step": fused,
            "field_seconds": field, "step_over_field": fused / field,
            "target_over_field": 1.1 * evals, "unfused_seconds_per_step": unfused,
            "fused_speedup": unfused / fused, "err": err, "err_unfused": err_unfused,
        })
    return rows


def _unfused_flow(x, y, z0, h, steps, solver):
    """The same ODE as a Python loop of field calls and tensor updates (no fusion), through
    the package's one Python RK4 driver (poissonflow.flow.integrate); flow time in float64."""
    d = x.shape[1]
    p = float(d + 1)

    def vel(xx, t):
        zz = torch.exp(t).to(xx.dtype)
        return poissonflow.ops.field(xx, y, None, p, 0.0, None, zz, "cpu")[0]

    n = x.shape[0]
    t0 = torch.full((n,), math.log(z0), dtype=torch.float64)
    dt = torch.full((n,), float(h), dtype=torch.float64)
    return flow.integrate(vel, x, t0, dt, steps, solver)


def print_table(rows, gemm):
    print(f"\nfloat32 GEMM (torch.mm 4096^2) in this run: {gemm:.1f} GFLOP/s")
    fwd = [r for r in rows if r["op"] == "forward"]
    hdr = (
        f"{'impl':20} {'N=B':>6} {'D':>4} {'seconds':>9} {'pairs/s':>9} "
        f"{'GFLOP/s':>8} {'xGEMM':>6} {'pf speedup':>10} {'err v':>8} {'err ls':>8}"
    )
    print("\nforward field, float32\n" + hdr + "\n" + "-" * len(hdr))
    for r in fwd:
        if r.get("status") != "ok":
            print(f"{r['impl']:20} {r['N']:>6} {r['D']:>4}  {r['status']}")
            continue
        print(
            f"{r['impl']:20} {r['N']:>6} {r['D']:>4} {r['seconds']:>9.3f} "
            f"{r['pairs_per_s']:>9.2e} {r['gflops']:>8.1f} {r['frac_gemm']:>6.2f} "
            f"{r.get('speedup_of_poissonflow', float('nan')):>9.1f}x "
            f"{r['err_v']:>8.1e} {r['err_log_scale']:>8.1e}"
        )
    bwd = [r for r in rows if r["op"] == "fwd+bwd"]
    if bwd:
        print("\nforward + backward (gradients for x and charges), float32")
        for r in bwd:
            extra = (
                f"backward/forward {r['backward_over_forward']:.2f} (target <= 2.5), "
                f"error dx {r['err_dx']:.1e} dy {r['err_dy']:.1e}"
                if "backward_over_forward" in r
                else f"timed on {r['N']} queries; poissonflow {r['speedup_of_poissonflow']:.1f}x "
                "faster on the same queries"
            )
            print(f"  {r['impl']:16} N=B={r['B']:>6} D={r['D']:>4} {r['seconds']:8.3f} s  "
                  f"{r['gflops']:6.1f} GFLOP/s  {extra}")
    ode = [r for r in rows if r["op"].endswith("step")]
    if ode:
        print("\nflow steps (fused trajectory kernel), float32")
        for r in ode:
            print(f"  {r['op']:11} N=B={r['N']} d={r['D']}: {r['seconds_per_step']:.3f} s/step "
                  f"= {r['step_over_field']:.2f} field evaluations (target <= "
                  f"{r['target_over_field']:.1f}); unfused loop {r['unfused_seconds_per_step']:.3f}"
                  f" s/step ({r['fused_speedup']:.2f}x); error {r['err']:.1e} "
                  f"(unfused {r['err_unfused']:.1e})")


def plot_rows(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = [r for r in rows if r["op"] == "forward" and r.get("status") == "ok"]
    dims = sorted({r["D"] for r in fwd})
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.6), squeeze=False)
    for ax, D in zip(axes[0], dims):
        for impl in sorted({r["impl"] for r in fwd}):
            pts = sorted((r["N"], r["gflops"]) for r in fwd if r["D"] == D and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"D = {D}")
        ax.set_xlabel("N = B")
        ax.set_ylabel("GFLOP/s (4 D per pair)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sweep, under a minute")
    ap.add_argument("--sizes", type=int, nargs="*", help="N = B values")
    ap.add_argument("--dims", type=int, nargs="*", help="D values")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-rows", type=int, default=1024, help="queries timed for slow peers")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-ode", action="store_true")
    ap.add_argument("--json", help="write every figure and setting to this file")
    ap.add_argument("--plot", help="draw GFLOP/s against size to this PNG")
    args = ap.parse_args(argv)

    if args.quick:
        sizes, dims, repeat, peer_rows = [2048], [3, 129], 2, 256
        bwd_sizes, ode = [1024], (1024, 128, 4, 1)
    else:
        sizes, dims = [1024, 4096, 8192, 16384], [3, 33, 129, 513]
        repeat, peer_rows = args.repeat, args.peer_rows
        bwd_sizes, ode = [8192], (8192, 128, 100, 25)
    sizes = args.sizes or sizes
    dims = args.dims or dims

    torch.manual_seed(0)
    gemm = gemm_gflops()
    impls = peers.implementations("cpu")
    rows = []
    for N in sizes:
        for D in dims:
            rows += forward_rows(N, D, impls if N <= 8192 or D == 129 else impls[:1], gemm,
                                 repeat, peer_rows)
    if not args.no_backward:
        for N in bwd_sizes:
            rows += backward_rows(N, 129, gemm, repeat, peer_rows)
    if not args.no_ode:
        rows += ode_rows(*ode[:2], gemm, *ode[2:])
    print_table(rows, gemm)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/field_throughput.py"] + (argv or sys.argv[1:])),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "poissonflow": poissonflow.__version__,
        "cpu_isas": poissonflow._ext.cpu_isas(),
        "backends": poissonflow.backends(),
        "gemm_gflops": gemm,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    if args.plot:
        plot_rows(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
