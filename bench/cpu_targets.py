"""The CPU kernels' figures of merit, each a ratio measured within one run, over repeated runs.

    python bench/cpu_targets.py                 # 3 runs, min / median / max of every ratio
    python bench/cpu_targets.py --runs 1 --quick
    python bench/cpu_targets.py --json docs/bench/cpu_targets.json

Per run (docs/DESIGN.md, "How performance is measured", "Weights without log/exp: the power form" and "CPU threads and small calls"), all on the cpu backend, float32 unless said:

  forward x GEMM   forward field rate (4 D flops per pair) over the same run's torch.mm rate
                   (two 4096 x 4096 float32 matrices), at D = 2, 3, 8, 16, 33, 129 (N = B =
                   16384 below D = 16, else 8192; power p = D), with the weights in power form
                   (the default where 2p is an integer) and forced into the log domain
                   ($POISSONFLOW_CPU_WEIGHTS=log) in the same run
  backward / fwd   gradients for queries and charges over the forward, N = B = 8192, D = 129
  float64          the forward in float64 over float32 (time), and its rate over torch.mm's
                   float64 rate (its own limit), N = B = 4096, D = 129
  small calls      bench/field_throughput.py's small-call rows: latency over the compute time
                   (the call's flops at the large-call rate) and standalone over in-loop speed
  learned epoch    bench/learned_epoch.py: the field target's share of a learned-field epoch

The machine is shared: run on a quiet machine, and compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import field_throughput as ft  # noqa: E402
import learned_epoch  # noqa: E402

import poissonflow  # noqa: E402
from poissonflow import registry  # noqa: E402

# The targets (name: (bound, "min" if the ratio must be at least the bound)).
TARGETS = {
    "forward_x_gemm_D3": (0.35, "min"),
    "forward_x_gemm_D33": (0.65, "min"),
    "backward_over_forward_D129": (2.0, "max"),
    "small_learned_in_loop_over_standalone": (0.9, "min"),
    "small_riesz_latency_over_compute": (1.5, "max"),
    "learned_epoch_target_share": (0.20, "max"),
}


@contextlib.contextmanager
def weight_form(form):
    old = os.environ.get("POISSONFLOW_CPU_WEIGHTS")
    os.environ["POISSONFLOW_CPU_WEIGHTS"] = form
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("POISSONFLOW_CPU_WEIGHTS", None)
        else:
            os.environ["POISSONFLOW_CPU_WEIGHTS"] = old


def forward_rate(cpu, N, D, repeat, dtype=torch.float32):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randn(N, D, generator=g, dtype=dtype)
    return 4.0 * D * N * N / ft.timed(lambda: cpu.field_forward(x, y, None, float(D), 0.0),
                                      repeat) / 1e9


def one_run(quick: bool) -> dict:
    cpu = registry.get("cpu").module()
    repeat = 1 if quick else 3
    out = {}
    gemm = ft.gemm_gflops()
    out["gemm_gflops"] = gemm
    big = 4096 if quick else 8192
    for D in (2, 3, 8, 16, 33, 129):
        N = big * 2 if D < 16 and not quick else big
        for form in ("auto", "log"):
            with weight_form(form):
                rate = forward_rate(cpu, N, D, repeat)
            key = f"forward_x_gemm_D{D}" + ("" if form == "auto" else "_log")
            out[key] = rate / gemm
    # backward over forward at the shape
    bwd = ft.backward_rows(4096 if quick else 8192, 129, gemm, repeat, peer_rows=0)
    out["backward_over_forward_D129"] = bwd[0]["backward_over_forward"]
    # float64 against float32 and against its own GEMM
    n64 = 2048 if quick else 4096
    r32 = forward_rate(cpu, n64, 129, repeat)
    r64 = forward_rate(cpu, n64, 129, repeat, torch.float64)
    a = torch.randn(4096, 4096, dtype=torch.float64)
    gemm64 = 2.0 * 4096**3 / ft.timed(lambda: torch.mm(a, a), 2) / 1e9
    out["float64_time_over_float32"] = r32 / r64
    out["float64_x_gemm64"] = r64 / gemm64
    out["gemm64_gflops"] = gemm64
    for r in ft.small_call_rows(gemm, repeat=2 if quick else 5):
        out[f"small_{r['name']}_latency_over_compute"] = r["latency_over_compute"]
        out[f"small_{r['name']}_op_over_compute"] = r["op_over_compute"]
        out[f"small_{r['name']}_in_loop_over_standalone"] = r["in_loop_over_standalone"]
    ep = learned_epoch.epoch_shares(10000 if quick else 50000, 128, 1 if quick else 3)
    out["learned_epoch_target_share"] = ep["shares"]["target"]
    out["learned_epoch_ms_per_iteration"] = ep["ms_per_iteration"]
    return out


def summarise(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: {"min": min(r[k] for r in runs), "median": statistics.median(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="repeated runs (default 3)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, one repeat each")
    ap.add_argument("--json", help="write every run and the summary to this file")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.quick))
        print(f"run {i + 1}/{args.runs} done (load average {os.getloadavg()[0]:.2f})",
              flush=True)
    summary = summarise(runs)
    print(f"\n{'ratio':42} {'min':>8} {'median':>8} {'max':>8}   target")
    for k, s in summary.items():
        bound = TARGETS.get(k)
        target = ""
        if bound:
            value, kind = bound
            ok = s["median"] >= value if kind == "min" else s["median"] <= value
            target = f"{'>=' if kind == 'min' else '<='} {value:g} ({'met' if ok else 'missed'})"
        print(f"{k:42} {s['min']:8.3f} {s['median']:8.3f} {s['max']:8.3f}   {target}")
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["python bench/cpu_targets.py"] + (argv or sys.argv[1:])),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "poissonflow": poissonflow.__version__,
            "cpu_isas": poissonflow._ext.cpu_isas(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "targets": TARGETS, "runs": runs, "summary": summary}, f,
                      indent=2, default=str)
    return summary


if __name__ == "__main__":
    main()
