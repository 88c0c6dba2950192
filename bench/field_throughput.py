"""Throughput of the Poisson-field kernels against their peers and the machine's GEMM rate.

    python bench/field_throughput.py            # the headline row and a sweep
    python bench/field_throughput.py --quick    # under a minute
    python bench/field_throughput.py --json out.json --plot out.png

Method (DESIGN.md section 7): 4*D floating-point operations per (query, charge) pair for the
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
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

import poissonflow  # noqa: E402


def timed(fn, repeat):
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


def print_table(rows, gemm):
    print(f"\nfloat32 GEMM (torch.mm 4096^2) in this run: {gemm:.1f} GFLOP/s")
    hdr = (
        f"{'op':8} {'impl':20} {'N=B':>6} {'D':>4} {'seconds':>9} {'pairs/s':>9} "
        f"{'GFLOP/s':>8} {'xGEMM':>6} {'pf speedup':>10} {'err v':>8} {'err ls':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['op']:8} {r['impl']:20} {r['N']:>6} {r['D']:>4}  {r['status']}")
            continue
        print(
            f"{r['op']:8} {r['impl']:20} {r['N']:>6} {r['D']:>4} {r['seconds']:>9.3f} "
            f"{r['pairs_per_s']:>9.2e} {r['gflops']:>8.1f} {r['frac_gemm']:>6.2f} "
            f"{r.get('speedup_of_poissonflow', float('nan')):>9.1f}x "
            f"{r['err_v']:>8.1e} {r['err_log_scale']:>8.1e}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sweep, under a minute")
    ap.add_argument("--sizes", type=int, nargs="*", help="N = B values")
    ap.add_argument("--dims", type=int, nargs="*", help="D values")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-rows", type=int, default=1024, help="queries timed for slow peers")
    ap.add_argument("--json", help="write every figure and setting to this file")
    args = ap.parse_args(argv)

    if args.quick:
        sizes, dims, repeat, peer_rows = [2048], [3, 129], 2, 256
    else:
        sizes, dims, repeat, peer_rows = [8192], [3, 33, 129, 513], args.repeat, args.peer_rows
    sizes = args.sizes or sizes
    dims = args.dims or dims

    torch.manual_seed(0)
    gemm = gemm_gflops()
    impls = peers.implementations("cpu")
    rows = []
    for N in sizes:
        for D in dims:
            rows += forward_rows(N, D, impls, gemm, repeat, peer_rows)
    print_table(rows, gemm)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "poissonflow": poissonflow.__version__,
        "backends": poissonflow.backends(),
        "gemm_gflops": gemm,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
