"""Throughput of the Poisson-field kernels against their peers and the machine's GEMM rate.

    python bench/field_throughput.py            # the headline row and a sweep
    python bench/field_throughput.py --quick    # under a minute
    python bench/field_throughput.py --json out.json --plot out.png
    python bench/field_throughput.py --gpu --json gpu.json   # the GPU rows (below)

Method (docs/DESIGN.md, 'How performance is measured', docs/performance.md): 4*D floating-point
operations per (query,
charge) pair for the forward field; every CPU row gives its fraction of the field's ceiling on
this machine (`ceiling`: bench/ceiling.py, the vector pipes' measured rates and the compiled
loops' instruction mix) and, as references measured in the same run, ratios against float32
GEMM (torch.mm of two 4096 x 4096 matrices) and against the peers in bench/peers.py. The CPU,
its ISA, the threads, torch's BLAS and the load average are printed and stored
(bench/machine.py). Each
implementation is checked against the float64 reference before it is timed, and its error is
printed beside its speed. Times are the minimum over repeats after one warm-up call. Slow peers
are timed on a subset of the queries against all charges (throughput is per pair).

GPU rows (`--gpu`, `gpu_rows`): every registry backend on CUDA tensors (cuda, triton,
triton-gemm) at N = B over `--sizes` (default 4096-65536, swept at D = 129; the other D at
the largest size) and D over `--dims` (3, 33, 129, 513):
forward in float32 and bfloat16, backward (dL/dx, dL/dy) and a fused RK4 step in float32 at the
largest size, timed with CUDA events (median of repeats after a warm-up); GFLOP/s with 4 D flops
per pair (backward 11 D, RK4 step 16 d), as a share of the same run's torch.mm float32 rate
with TF32 off (and beside it the TF32 rate: the GEMM form's ceiling); each row's error on its
first 64 queries against the float64 reference. Then the GEMM form (docs/DESIGN.md, "A tensor-core
field with a certified error")
against the exact Triton and CUDA kernels on random and clustered data (D = 33, 129, 513;
clustered also sorted by cluster, where the near pairs fill diagonal tiles), with
the fraction of pairs recomputed, of tiles touched, of rows that fell back, and the largest
certified bound. Without a GPU, `--gpu` runs the same rows through Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, tiny sizes: a dry run of the code path, not a measurement).
With `--json out.json` the rows are also streamed to out.jsonl as they are made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import machine  # noqa: E402
import peers  # noqa: E402

import poissonflow  # noqa: E402
from poissonflow import ode, registry  # noqa: E402
from poissonflow.kernels import reference  # noqa: E402
from poissonflow.kernels.reference import field_backward_reference  # noqa: E402
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
            status="ok",
            queries_timed=n_timed,
            seconds=sec * N / n_timed,
            pairs_per_s=pairs / sec,
            gflops=gflops,
            frac_gemm=gflops / gemm,
            err_v=err_v,
            err_log_scale=err_l,
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
    rows = [
        {
            "impl": "poissonflow-cpu",
            "op": "fwd+bwd",
            "N": N,
            "B": N,
            "D": D,
            "status": "ok",
            "seconds": both,
            "forward_seconds": fwd,
            "backward_seconds": bwd,
            "backward_over_forward": bwd / fwd,
            "err_dx": err_dx,
            "err_dy": err_dy,
            "gflops": 4.0 * D * N * N / both / 1e9,
            "frac_gemm": 4.0 * D * N * N / both / 1e9 / gemm,
        }
    ]
    n = min(N, peer_rows)
    need = 12 * n * N * 4  # the autograd graph keeps ~a dozen n x B float32 matrices
    if n > 0 and need < 0.5 * available_memory_bytes():  # peer_rows=0: no peer
        xs, gvs, gls = x[:n], gv[:n], gl[:n]
        sec = timed(lambda: peers.torch_autograd_backward(xs, y, power, gvs, gls), repeat)
        ours_n = timed(lambda: ours(xs, y, power, gvs, gls), repeat)
        rows.append(
            {
                "impl": "torch-autograd",
                "op": "fwd+bwd",
                "N": n,
                "B": N,
                "D": D,
                "status": "ok",
                "seconds": sec,
                "gflops": 4.0 * D * n * N / sec / 1e9,
                "frac_gemm": 4.0 * D * n * N / sec / 1e9 / gemm,
                "speedup_of_poissonflow": sec / ours_n,
            }
        )
    return rows


def ode_rows(N, d, gemm, euler_steps, rk4_steps, seed=0):
    """Seconds per Euler / RK4 step of the fused trajectory kernel, against one field
    evaluation and against an unfused loop (poisson_field call + update in Python)."""
    flow_steps = registry.get("cpu").module().flow_steps
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    y = torch.randn(N, d, generator=g)
    z = torch.full((N,), 0.5)
    field = timed(lambda: poissonflow.ops.field(x, y, None, float(d + 1), 0.0, None, z, "cpu"), 1)
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
        rows.append(
            {
                "impl": "poissonflow-cpu",
                "op": f"{solver} step",
                "N": N,
                "B": N,
                "D": d,
                "status": "ok",
                "steps": steps,
                "seconds_per_step": fused,
                "field_seconds": field,
                "step_over_field": fused / field,
                "target_over_field": 1.1 * evals,
                "unfused_seconds_per_step": unfused,
                "fused_speedup": unfused / fused,
                "err": err,
                "err_unfused": err_unfused,
            }
        )
    return rows


# The small calls of training loops (docs/DESIGN.md, "CPU threads and small calls"): (name, N
# queries, B charges, D,
# power, per-row softening?). "learned": one learned-field target (pfgm.field_targets: a small
# batch of 128 perturbed points against a large batch of 1024, d = 128, p = d + 1, heights as
# softening); "riesz": one batch-vs-bank call of the Riesz loss (256 features against a bank of
# 1024 in 32 dimensions, power s + 2 = 4).
SMALL_CALLS = (("learned", 128, 1024, 128, 129.0, True), ("riesz", 256, 1024, 32, 4.0, False))


def small_call_rows(gemm, repeat=5, calls=50, seed=0):
    """Latency of the small calls through the backend protocol (what pfgm.field_targets and
    the losses call) and through the autograd-aware op (poisson_field), standalone and in a
    loop that alternates each call with a Linear(129, 129) forward + backward (a training
    step's torch work), against the pure compute time: the call's flops at the rate of a large
    call (N = B = 8192) of the same D and power in the same run."""
    cpu = registry.get("cpu").module()
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(129, 129)
    xb = torch.randn(128, 129, generator=g)
    rows = []
    for name, N, B, D, power, soft in SMALL_CALLS:
        x = torch.randn(N, D, generator=g)
        y = torch.randn(B, D, generator=g)
        z = torch.rand(N, generator=g) * 0.1 if soft else None
        flops = 4.0 * N * B * D

        def protocol():
            return cpu.field_forward(x, y, None, power, 0.0, eps_rows=z)

        def op():
            return poissonflow.ops.field(x, y, None, power, 0.0, None, z, "cpu")

        def per_call(fn):
            return timed(lambda: [fn() for _ in range(calls)], repeat) / calls

        def torch_step():
            lin.zero_grad()
            lin(xb).square().sum().backward()

        big = torch.randn(8192, D, generator=g)
        big_rate = (
            4.0 * D * 8192 * 8192 / timed(lambda: cpu.field_forward(big, big, None, power, 0.0), 1)
        )
        compute = flops / big_rate
        t_proto, t_op = per_call(protocol), per_call(op)
        t_torch = per_call(torch_step)
        t_loop = per_call(lambda: (protocol(), torch_step())) - t_torch
        rows.append(
            {
                "impl": "poissonflow-cpu",
                "op": "small call",
                "name": name,
                "N": N,
                "B": B,
                "D": D,
                "power": power,
                "status": "ok",
                "protocol_seconds": t_proto,
                "op_seconds": t_op,
                "in_loop_seconds": t_loop,
                "compute_seconds": compute,
                "large_call_gflops": big_rate / 1e9,
                "gflops": flops / t_proto / 1e9,
                "frac_gemm": flops / t_proto / 1e9 / gemm,
                "latency_over_compute": t_proto / compute,
                "op_over_compute": t_op / compute,
                "in_loop_over_standalone": t_proto / t_loop,
            }
        )
    return rows


def _unfused_flow(x, y, z0, h, steps, solver):
    """The same ODE as a Python loop of field calls and tensor updates (no fusion), through
    the package's one Python RK4 driver (poissonflow.ode.integrate); flow time in float64."""
    d = x.shape[1]
    p = float(d + 1)

    def vel(xx, t):
        zz = torch.exp(t).to(xx.dtype)
        return poissonflow.ops.field(xx, y, None, p, 0.0, None, zz, "cpu")[0]

    n = x.shape[0]
    t0 = torch.full((n,), math.log(z0), dtype=torch.float64)
    dt = torch.full((n,), float(h), dtype=torch.float64)
    return ode.integrate(vel, x, t0, dt, steps, solver)


def print_table(rows, gemm, meta=None):
    if meta:
        print(f"\nCPU: {machine.cpu_line(meta)}")
    print(f"\nfloat32 GEMM (torch.mm 4096^2) in this run: {gemm:.1f} GFLOP/s")
    fwd = [r for r in rows if r["op"] == "forward"]
    hdr = (
        f"{'impl':20} {'N=B':>6} {'D':>4} {'seconds':>9} {'pairs/s':>9} "
        f"{'GFLOP/s':>8} {'ceiling':>7} {'xGEMM':>6} {'pf speedup':>10} {'err v':>8} "
        f"{'err ls':>8}"
    )
    print(
        "\nforward field, float32 (ceiling: the fraction of the field's ceiling on this machine, "
        "bench/ceiling.py)\n" + hdr + "\n" + "-" * len(hdr)
    )
    for r in fwd:
        if r.get("status") != "ok":
            print(f"{r['impl']:20} {r['N']:>6} {r['D']:>4}  {r['status']}")
            continue
        print(
            f"{r['impl']:20} {r['N']:>6} {r['D']:>4} {r['seconds']:>9.3f} "
            f"{r['pairs_per_s']:>9.2e} {r['gflops']:>8.1f} "
            f"{r.get('frac_ceiling', float('nan')):>7.2f} {r['frac_gemm']:>6.2f} "
            f"{r.get('speedup_of_poissonflow', float('nan')):>9.1f}x "
            f"{r['err_v']:>8.1e} {r['err_log_scale']:>8.1e}"
        )
    bwd = [r for r in rows if r["op"] == "fwd+bwd"]
    if bwd:
        print("\nforward + backward (gradients for x and charges), float32")
        for r in bwd:
            extra = (
                f"backward/forward {r['backward_over_forward']:.2f} (floor 2.0 by operation "
                f"count), backward {r.get('backward_frac_ceiling', float('nan')):.2f} of its "
                "ceiling, "
                f"error dx {r['err_dx']:.1e} dy {r['err_dy']:.1e}"
                if "backward_over_forward" in r
                else f"timed on {r['N']} queries; poissonflow {r['speedup_of_poissonflow']:.1f}x "
                "faster on the same queries"
            )
            print(
                f"  {r['impl']:16} N=B={r['B']:>6} D={r['D']:>4} {r['seconds']:8.3f} s  "
                f"{r['gflops']:6.1f} GFLOP/s  {extra}"
            )
    small = [r for r in rows if r["op"] == "small call"]
    if small:
        print(
            "\nsmall calls (training loops), float32: latency against the compute time at the "
            "large-call rate"
        )
        for r in small:
            print(
                f"  {r['name']:8} {r['N']}x{r['B']}x{r['D']} p={r['power']:g}: protocol "
                f"{1e6 * r['protocol_seconds']:7.1f} us ({r['latency_over_compute']:.2f}x "
                f"compute, {r['gflops']:.0f} GFLOP/s), poisson_field op "
                f"{1e6 * r['op_seconds']:7.1f} us ({r['op_over_compute']:.2f}x), in a loop "
                f"with torch {1e6 * r['in_loop_seconds']:7.1f} us "
                f"({r['in_loop_over_standalone']:.2f}x standalone speed)"
            )
    ode = [r for r in rows if r["op"].endswith("step")]
    if ode:
        print("\nflow steps (fused trajectory kernel), float32")
        for r in ode:
            print(
                f"  {r['op']:11} N=B={r['N']} d={r['D']}: {r['seconds_per_step']:.3f} s/step "
                f"= {r['step_over_field']:.2f} field evaluations (target <= "
                f"{r['target_over_field']:.1f}); unfused loop {r['unfused_seconds_per_step']:.3f}"
                f" s/step ({r['fused_speedup']:.2f}x); error {r['err']:.1e} "
                f"(unfused {r['err_unfused']:.1e})"
            )


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


# --------------------------------------------------------------------------------------------
# GPU rows


def device_timed(fn, repeat, device):
    """Median seconds of fn() over `repeat` calls after one warm-up call (CUDA events on a
    GPU, the host clock otherwise)."""
    fn()
    times = []
    for _ in range(max(repeat, 1)):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gpu_mm_gflops(device, n=4096, tf32=False):
    """torch.mm float32 rate on `device` (TF32 off unless asked for)."""
    if device != "cuda":
        return gemm_gflops(n=min(n, 1024), repeat=1)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        return 2.0 * n**3 / device_timed(lambda: torch.mm(a, b), 5, "cuda") / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def clustered_points(N, D, *, k=64, spread=0.5, norm=3.0, seed=0, device="cpu", sort=False):
    """N points from k clusters of radius ~spread around centres of norm `norm` (float32):
    the within-cluster pairs compete in every row, so far more pairs are near than for
    Gaussian data. sort=True orders the points by cluster, so that the near pairs fill
    diagonal blocks of the N x B pair matrix and the GEMM form's recomputation touches about
    1/k of the tiles (the field is permutation-equivariant: a caller may sort)."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = torch.randn(
        k, D, generator=torch.Generator(device=device).manual_seed(12345), device=device
    )
    c = norm * c / c.norm(dim=1, keepdim=True)
    idx = torch.randint(0, k, (N,), generator=g, device=device)
    if sort:
        idx = idx.sort().values
    return c[idx] + spread * torch.randn(N, D, generator=g, device=device) / D**0.5


def _gpu_error(fwd, x, y, power, rows=64):
    from poissonflow.testing import field_errors

    xs = x[:rows]
    v, ls = fwd(xs, y)
    rel, _, ls_err = field_errors(xs, y, v, ls, power=power)
    return rel, ls_err


def gpu_rows(sizes, dims, repeat, device, *, gemm_dims=(33, 129, 513), log=print, sweep_dim=129):
    """The GPU rows of the module docstring (a list of dicts). The sizes are swept at D =
    sweep_dim; the other dimensions run at the largest size only. `log(text, row)` sees each
    row as it is made (the session script keeps them should a time limit stop the run)."""
    rows = []
    names = [
        n
        for n, e in registry.REGISTRY.items()
        if n != "reference" and device in e.supported_devices() and registry.available(n)
    ]
    mm = gpu_mm_gflops(device)
    mm_tf32 = gpu_mm_gflops(device, tf32=True) if device == "cuda" else None
    rows.append(
        {
            "impl": "torch.mm",
            "op": "gemm",
            "dtype": "float32",
            "status": "ok",
            "gflops": mm,
            "gflops_tf32": mm_tf32,
        }
    )
    log(
        f"torch.mm float32 {mm:.0f} GFLOP/s (TF32 off)"
        + (f", {mm_tf32:.0f} with TF32" if mm_tf32 else ""),
        rows[-1],
    )
    big = max(sizes)

    def add(name, op, dtype, N, D, flops, fn, err=None, **extra):
        row = {"impl": name, "op": op, "dtype": dtype, "N": N, "B": N, "D": D}
        try:
            sec = device_timed(fn, repeat, device)
            row.update(
                status="ok",
                seconds=sec,
                gflops=flops / sec / 1e9,
                frac_fp32_mm=flops / sec / 1e9 / mm,
                **extra,
            )
            if err is not None:
                row["err_v"], row["err_log_scale"] = err()
        except Exception as exc:  # noqa: BLE001 - a failed row is reported, not fatal
            row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        rows.append(row)
        log(_gpu_row_text(row), row)
        return row

    for D in dims:
        for N in sizes if D == sweep_dim else [big]:
            g = torch.Generator(device=device).manual_seed(N + D)
            x = torch.randn(N, D, device=device, generator=g)
            y = torch.randn(N, D, device=device, generator=g)
            for name in names:
                mod = registry.get(name).module()
                for dt in ("float32", "bfloat16") if N == big else ("float32",):
                    xd, yd = (x, y) if dt == "float32" else (x.bfloat16(), y.bfloat16())
                    add(
                        name,
                        "forward",
                        dt,
                        N,
                        D,
                        4 * D * N * N,
                        lambda m=mod, a=xd, b=yd: m.field_forward(a, b, None, float(D), 0.0),
                        err=lambda m=mod, a=xd, b=yd: _gpu_error(
                            lambda q, c: m.field_forward(q, c, None, float(D), 0.0), a, b, float(D)
                        ),
                    )
                if N != big or name == "triton-gemm":  # its backward and flow are triton's
                    continue
                v, ls = mod.field_forward(x, y, None, float(D), 0.0)
                gv, gl = torch.randn_like(v), torch.randn_like(ls)
                add(
                    name,
                    "backward",
                    "float32",
                    N,
                    D,
                    11 * D * N * N,
                    lambda m=mod: m.field_backward(
                        x,
                        y,
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
                )
                if D >= 2:
                    d = D - 1
                    xf, yf = x[:, :d].contiguous(), y[:, :d].contiguous()
                    t0 = torch.full((N,), math.log(0.5), device=device, dtype=torch.float64)
                    dt_ = torch.full((N,), 0.1, device=device, dtype=torch.float64)
                    add(
                        name,
                        "rk4 step",
                        "float32",
                        N,
                        d,
                        16 * d * N * N,
                        lambda m=mod: m.flow_steps(xf, yf, None, t0, dt_, 1, "rk4"),
                    )
    rows += gemm_form_rows(big, gemm_dims, repeat, device, names, mm, log=log)
    return rows


def gemm_form_rows(N, dims, repeat, device, names, mm, *, log=print):
    """The GEMM form against the exact kernels on random and clustered data, with the
    fraction of pairs recomputed (docs/DESIGN.md, "A tensor-core field with a certified error")."""
    if "triton-gemm" not in names:
        return []
    from poissonflow.kernels.triton import _gemm

    rows = []
    for D in dims:
        for data in ("random", "clustered", "clustered-sorted"):
            if data == "random":
                g = torch.Generator(device=device).manual_seed(D)
                x = torch.randn(N, D, device=device, generator=g)
                y = torch.randn(N, D, device=device, generator=g)
            else:
                sort = data == "clustered-sorted"
                x = clustered_points(N, D, seed=D, device=device, sort=sort)
                y = clustered_points(N, D, seed=D + 1, device=device, sort=sort)
            for name in [n for n in ("cuda", "triton") if n in names]:
                mod = registry.get(name).module()
                row = {
                    "impl": name,
                    "op": "forward",
                    "data": data,
                    "dtype": "float32",
                    "N": N,
                    "B": N,
                    "D": D,
                }
                try:
                    sec = device_timed(
                        lambda: mod.field_forward(x, y, None, float(D), 0.0), repeat, device
                    )
                    row.update(
                        status="ok",
                        seconds=sec,
                        gflops=4 * D * N * N / sec / 1e9,
                        frac_fp32_mm=4 * D * N * N / sec / 1e9 / mm,
                    )
                    row["err_v"], row["err_log_scale"] = _gpu_error(
                        lambda q, c: mod.field_forward(q, c, None, float(D), 0.0), x, y, float(D)
                    )
                except Exception as exc:  # noqa: BLE001
                    row["status"] = f"failed: {type(exc).__name__}: {exc}"
                rows.append(row)
                log(_gpu_row_text(row), row)
            for precision in ("tf32", "bf16", "tf32x3"):
                row = {
                    "impl": f"triton-gemm[{precision}]",
                    "op": "forward",
                    "data": data,
                    "dtype": "float32",
                    "N": N,
                    "B": N,
                    "D": D,
                }
                try:

                    def run(q=x, c=y, precision=precision):
                        return _gemm.gemm_field_forward(
                            q, c, None, float(D), 0.0, precision=precision
                        )

                    sec = device_timed(run, repeat, device)
                    res = run()
                    row.update(
                        status="ok",
                        seconds=sec,
                        gflops=4 * D * N * N / sec / 1e9,
                        frac_fp32_mm=4 * D * N * N / sec / 1e9 / mm,
                        **res.summary(N),
                    )
                    row["err_v"], row["err_log_scale"] = _gpu_error(
                        lambda q, c: tuple(run(q, c)[:2]), x, y, float(D)
                    )
                    exact = [
                        r
                        for r in rows
                        if r.get("data") == data
                        and r["D"] == D
                        and r["impl"] in ("cuda", "triton")
                        and r.get("status") == "ok"
                    ]
                    for r in exact:
                        row[f"speedup_over_{r['impl']}"] = r["seconds"] / sec
                except Exception as exc:  # noqa: BLE001
                    row["status"] = f"failed: {type(exc).__name__}: {exc}"
                rows.append(row)
                log(_gpu_row_text(row), row)
    return rows


def _gpu_row_text(r):
    head = (
        f"{r['impl']:20} {r['op']:9} {r.get('data', ''):16} {r['dtype']:8} "
        f"N=B={r.get('N', '')} D={r.get('D', '')}"
    )
    if r.get("status") != "ok":
        return f"{head}  {r.get('status')}"
    if r["op"] == "gemm":
        return f"{head}  {r['gflops']:.0f} GFLOP/s"
    text = (
        f"{head}  {r['seconds'] * 1e3:9.2f} ms {r['gflops']:8.0f} GFLOP/s "
        f"{r['frac_fp32_mm']:5.2f} x mm"
    )
    if "err_v" in r:
        text += f"  err v {r['err_v']:.1e} ls {r['err_log_scale']:.1e}"
    if "pairs_recomputed" in r:
        text += (
            f"  recomputed {r['pairs_recomputed']:.2%} pairs, {r['tiles_recomputed']:.0%}"
            f" tiles; fell back {r['rows_fell_back']:.2%} rows"
        )
    for k, v in r.items():
        if k.startswith("speedup_over_"):
            text += f"  {v:.2f}x {k[len('speedup_over_') :]}"
    return text


def gpu_main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "--gpu without a GPU needs TRITON_INTERPRET=1 (a dry run through Triton's interpreter)"
        )
    sizes = args.sizes or ([4096, 16384, 65536] if device == "cuda" else [48])
    dims = args.dims or ([3, 33, 129, 513] if device == "cuda" else [3, 33])
    gemm_dims = [d for d in dims if d >= 33] or dims
    sweep = 129 if 129 in dims else dims[0]
    stream = open(args.json + "l", "w") if args.json else None

    def log(text, row):
        print(text, flush=True)
        if stream is not None:
            stream.write(json.dumps(row, default=str) + "\n")
            stream.flush()

    rows = gpu_rows(sizes, dims, args.repeat, device, gemm_dims=gemm_dims, log=log, sweep_dim=sweep)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/field_throughput.py"] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "poissonflow": poissonflow.__version__,
        "backends": poissonflow.backends(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sweep, under a minute")
    ap.add_argument("--sizes", type=int, nargs="*", help="N = B values")
    ap.add_argument("--dims", type=int, nargs="*", help="D values")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-rows", type=int, default=1024, help="queries timed for slow peers")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-ode", action="store_true")
    ap.add_argument("--no-small", action="store_true", help="skip the small-call rows")
    ap.add_argument("--json", help="write every figure and setting to this file")
    ap.add_argument("--plot", help="draw GFLOP/s against size to this PNG")
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU rows (CUDA tensors; without a GPU: interpreter dry run)",
    )
    args = ap.parse_args(argv)
    if args.gpu:
        return gpu_main(args)

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
    record = machine.machine_record()
    ceil = ceiling.measure()
    gemm = gemm_gflops()
    impls = peers.implementations("cpu")
    rows = []
    for N in sizes:
        for D in dims:
            rows += forward_rows(
                N, D, impls if N <= 8192 or D == 129 else impls[:1], gemm, repeat, peer_rows
            )
    if not args.no_backward:
        for N in bwd_sizes:
            rows += backward_rows(N, 129, gemm, repeat, peer_rows)
    if not args.no_ode:
        rows += ode_rows(*ode[:2], gemm, *ode[2:])
    if not args.no_small:
        rows += small_call_rows(gemm, repeat=2 if args.quick else 5)
    for r in rows:  # every row's share of the kernel's ceiling on this machine
        if r.get("status") != "ok":
            continue
        if r["op"] == "forward":
            r["frac_ceiling"] = ceil.forward_seconds(r["queries_timed"], r["B"], r["D"]) / (
                r["seconds"] * r["queries_timed"] / r["N"]
            )
        elif "backward_seconds" in r:
            r["backward_frac_ceiling"] = (
                ceil.backward_seconds(r["N"], r["B"], r["D"]) / r["backward_seconds"]
            )
            r["forward_frac_ceiling"] = (
                ceil.forward_seconds(r["N"], r["B"], r["D"]) / r["forward_seconds"]
            )
    record["load_average_after"] = machine.load_average()
    print_table(rows, gemm, record)
    meta = {
        **record,
        "command": " ".join(["python bench/field_throughput.py"] + (argv or sys.argv[1:])),
        "backends": poissonflow.backends(),
        "gemm_gflops": gemm,
        "ceiling_rates": ceil.rates,
        "fma_peak_gflops": ceil.fma_peak_gflops(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    if args.plot:
        plot_rows(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
