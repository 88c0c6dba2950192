"""The CPU kernels' figures of merit as fractions of this machine's own ceiling, over repeated
runs, each run naming the CPU it ran on.

    python bench/cpu_targets.py                 # 3 runs, min / median / max of every figure
    python bench/cpu_targets.py --runs 1 --quick
    python bench/cpu_targets.py --json docs/bench/cpu_targets.json --txt docs/bench/cpu_targets.txt

Per run (docs/performance.md), all on the cpu backend, float32 unless said:

  ceiling          bench/ceiling.py: the vector-pipe micro-benchmark (in the extension, the
                   dispatcher's instruction set) and the kernels' instruction mix give each
                   kernel's best possible time on this machine; measured at the start of the run
  forward_D*       forward field time at best over the measured time: the fraction of the
                   ceiling (the primary figure), at D = 2, 3, 8, 16, 33, 129 (N = B = 16384
                   below D = 16, else 8192; power p = D), with the weights in power form (the
                   default where 2p is an integer) and forced into the log domain
                   ($POISSONFLOW_CPU_WEIGHTS=log, against the log domain's own ceiling); beside
                   each, x GEMM: its 4 D flops per pair over the same run's torch.mm rate (two
                   4096 x 4096 float32 matrices), a reference only (torch's BLAS runs its own
                   instruction set: `gemm_of_fma_peak` is its share of the FMA pipes' peak)
  backward         gradients for queries and charges, N = B = 8192, D = 129: its fraction of its
                   own ceiling, and backward / forward against the floor by operation count (2.0)
                   and against the floor of the compiled loops on this machine's pipes
  *_by_cpu_time    D = 3, 33, 129 and the backward again by the process's CPU time (threads x
                   ceiling over CPU seconds), which other jobs on the machine do not inflate
  float64          the forward in float64 over float32 (time), and its fraction of the float64
                   ceiling, N = B = 4096, D = 129
  small calls      bench/field_throughput.py's small-call rows: latency over the compute time
                   (the call's flops at the large-call rate) and standalone over in-loop speed
  learned epoch    bench/learned_epoch.py: the field target's share of a learned-field epoch

Every run records where it ran (bench/machine.py: CPU model, family/model, microarchitecture,
caches, the dispatcher's ISA, threads, torch's BLAS and its ISA, load average before and after).
The machine is shared: the load average is printed with every run; compare fractions, not
seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import field_throughput as ft  # noqa: E402
import learned_epoch  # noqa: E402
import machine  # noqa: E402

import poissonflow  # noqa: E402
from poissonflow import registry  # noqa: E402

# The targets (name: (bound, "min" if the figure must be at least the bound)): fractions of the
# machine's ceiling for the forward, backward / forward within 10% of the floor by operation count
# (2.0), the small-call rows and the learned epoch's share as before.
BWD_FLOOR = ceiling.floor_ratio_by_ops()
TARGETS = {
    "forward_D3": (0.50, "min"),
    "forward_D33": (0.85, "min"),
    "forward_D129": (0.85, "min"),
    "forward_D3_by_cpu_time": (0.50, "min"),
    "forward_D33_by_cpu_time": (0.85, "min"),
    "forward_D129_by_cpu_time": (0.85, "min"),
    "forward_D513": (0.85, "min"),
    "forward_D513_by_cpu_time": (0.85, "min"),
    "backward_over_forward_D129": (1.1 * BWD_FLOOR, "max"),
    "backward_over_forward_D129_by_cpu_time": (1.1 * BWD_FLOOR, "max"),
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


def timed_both(fn, repeat):
    """Minimum wall-clock and minimum process CPU seconds over `repeat` calls after a warm-up.
    On a shared machine the CPU time (all threads' time on a core) is the steadier of the two:
    other jobs delay the call but do not add to it; OpenMP's brief spinning at the region's
    end does, so on a quiet machine threads x wall >= CPU."""
    fn()
    wall, cpu = float("inf"), float("inf")
    for _ in range(max(repeat, 1)):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def forward_seconds(cpu, N, D, repeat, dtype=torch.float32):
    """(wall, CPU) seconds of one forward call at N = B, power D."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randn(N, D, generator=g, dtype=dtype)
    return timed_both(lambda: cpu.field_forward(x, y, None, float(D), 0.0), repeat)


def backward_seconds(N, D, repeat):
    """(wall, CPU) seconds of the forward and of the backward (dx and dy) through autograd,
    timed separately in the same calls (minimum over repeats after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    gv, gl = torch.randn(N, D, generator=g), torch.randn(N, generator=g)
    best = [float("inf")] * 4
    for _ in range(repeat + 1):
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        w0, c0 = time.perf_counter(), time.process_time()
        v, ls = poissonflow.poisson_field(xl, yl, power=float(D), backend="cpu")
        w1, c1 = time.perf_counter(), time.process_time()
        torch.autograd.grad([v, ls], [xl, yl], [gv, gl])
        w2, c2 = time.perf_counter(), time.process_time()
        for i, t in enumerate((w1 - w0, c1 - c0, w2 - w1, c2 - c1)):
            best[i] = min(best[i], t)
    return {"forward": (best[0], best[1]), "backward": (best[2], best[3])}


def one_run(quick: bool) -> dict:
    cpu = registry.get("cpu").module()
    repeat = 1 if quick else 3
    out = {"meta": machine.machine_record()}
    ceil = ceiling.measure()
    out["ceiling_rates"] = ceil.rates
    gemm = ft.gemm_gflops()
    out["gemm_gflops"] = gemm
    out["fma_peak_gflops"] = ceil.fma_peak_gflops()
    out["gemm_of_fma_peak"] = gemm / ceil.fma_peak_gflops()
    th = torch.get_num_threads()
    # each fraction's measured and ceiling seconds, so that a later ceiling model can rescore
    # the run from its stored pipe rates (docs/performance.md, "The divider")
    timings = out["timings"] = {}
    big = 4096 if quick else 8192
    # (D, N = B, weight forms): the throughput sweep's dimensions, and the top of the forward's
    # target range ("from D = 33 up") in the power form at N = B = 4096 (0.2 s on 2 Zen 4 cores)
    both = ("auto", "log")
    shapes = [(D, big * 2 if D < 16 and not quick else big, both) for D in (2, 3, 8, 16, 33, 129)]
    shapes.append((513, big // 2, ("auto",)))
    for D, N, forms in shapes:
        for form in forms:
            with weight_form(form):
                wall, cpu_s = forward_seconds(cpu, N, D, repeat)
            suffix = "" if form == "auto" else "_log"
            best = ceil.forward_seconds(N, N, D, power_form=form == "auto")
            out[f"forward_D{D}{suffix}"] = best / wall
            timings[f"forward_D{D}{suffix}"] = {"N": N, "wall": wall, "cpu": cpu_s, "ceiling": best}
            out[f"forward_x_gemm_D{D}{suffix}"] = 4.0 * D * N * N / wall / 1e9 / gemm
            if D in (3, 33, 129, 513):
                out[f"forward_D{D}{suffix}_by_cpu_time"] = th * best / cpu_s
    # backward over forward at N = B = 8192, D = 129
    nb = 4096 if quick else 8192
    t = backward_seconds(nb, 129, repeat)
    best = ceil.backward_seconds(nb, nb, 129)
    out["backward_D129"] = best / t["backward"][0]
    timings["backward_D129"] = {
        "N": nb,
        "wall": t["backward"][0],
        "cpu": t["backward"][1],
        "ceiling": best,
    }
    out["backward_D129_by_cpu_time"] = th * best / t["backward"][1]
    out["backward_over_forward_D129"] = t["backward"][0] / t["forward"][0]
    out["backward_over_forward_D129_by_cpu_time"] = t["backward"][1] / t["forward"][1]
    out["backward_floor_compiled_D129"] = ceil.backward_over_forward(129)
    # float64 against float32 and against its own ceiling
    n64 = 2048 if quick else 4096
    t32 = forward_seconds(cpu, n64, 129, repeat)[0]
    t64 = forward_seconds(cpu, n64, 129, repeat, torch.float64)[0]
    ceil64 = ceiling.measure(double=True)
    out["float64_time_over_float32"] = t64 / t32
    out["float64_forward_D129"] = ceil64.forward_seconds(n64, n64, 129) / t64
    for r in ft.small_call_rows(gemm, repeat=2 if quick else 5):
        out[f"small_{r['name']}_latency_over_compute"] = r["latency_over_compute"]
        out[f"small_{r['name']}_op_over_compute"] = r["op_over_compute"]
        out[f"small_{r['name']}_in_loop_over_standalone"] = r["in_loop_over_standalone"]
    ep = learned_epoch.epoch_shares(10000 if quick else 50000, 128, 1 if quick else 3)
    out["learned_epoch_target_share"] = ep["shares"]["target"]
    out["learned_epoch_ms_per_iteration"] = ep["ms_per_iteration"]
    out["load_average_after"] = machine.load_average()
    return out


def summarise(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {
        k: {
            "min": min(r[k] for r in runs),
            "median": statistics.median(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in keys
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="repeated runs (default 3)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, one repeat each")
    ap.add_argument("--json", help="write every run and the summary to this file")
    ap.add_argument("--txt", help="write the printed table to this file")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    runs = []
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    for i in range(args.runs):
        run = one_run(args.quick)
        runs.append(run)
        la, lb = run["meta"]["load_average"], run["load_average_after"]
        say(
            f"run {i + 1}/{args.runs} on {machine.cpu_line(run['meta'])}; load average "
            f"{la[0]:.2f} before, {lb[0]:.2f} after"
        )
    summary = summarise(runs)
    meta = runs[0]["meta"]
    tag = cpu_tag(meta)
    say("")
    say(f"CPU: {machine.cpu_line(meta)}")
    say(
        f"ceiling: FMA peak {runs[0]['fma_peak_gflops']:.0f} GFLOP/s; torch.mm "
        f"{summary['gemm_gflops']['median']:.0f} GFLOP/s = "
        f"{summary['gemm_of_fma_peak']['median']:.2f} of it (bench/ceiling.py, "
        "docs/performance.md)"
    )
    say(f"\n{'figure':42} {'min':>8} {'median':>8} {'max':>8}   {'cpu':14} target")
    for k, s in summary.items():
        bound = TARGETS.get(k)
        target = ""
        if bound:
            value, kind = bound
            ok = s["median"] >= value if kind == "min" else s["median"] <= value
            target = f"{'>=' if kind == 'min' else '<='} {value:g} ({'met' if ok else 'missed'})"
        if is_fraction(k) and s["max"] > 1.0:
            # a kernel faster than its ceiling: the model, not the kernel, is wrong there
            target += " ABOVE THE CEILING: the model is not a bound here"
        say(f"{k:42} {s['min']:8.3f} {s['median']:8.3f} {s['max']:8.3f}   {tag:14} {target}")
    say(
        "\nforward_D* / backward_D129 / float64_forward_D129: fraction of this machine's ceiling "
        "(1.0 = its busiest unit, the pipes or the divider, never idle) by wall-clock time; "
        "*_by_cpu_time: the same by the process's CPU time (threads x ceiling / CPU seconds: "
        "steadier on a shared machine, since other jobs delay a call without adding to it); "
        "*_x_gemm_*: rate over torch.mm's in the same run"
    )
    if args.json:
        doc = {
            "meta": meta,
            "command": " ".join(["python bench/cpu_targets.py"] + (argv or sys.argv[1:])),
            "targets": TARGETS,
            "runs": runs,
            "summary": summary,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    return summary


def is_fraction(key: str) -> bool:
    """Whether a summary row is a fraction of the ceiling (at most 1 if the model bounds)."""
    return (key.startswith(("forward_D", "backward_D", "float64_forward_D"))) and (
        "_x_gemm_" not in key
    )


def cpu_tag(meta: dict) -> str:
    """A short name of where a row ran: microarchitecture (or family/model), ISA, threads."""
    c, p = meta["cpu"], meta["poissonflow"]
    arch = (c.get("uarch") or f"f{c.get('family')}m{c.get('model')}").replace(" ", "")
    return f"{arch}/{p.get('isa_chosen', p['isa'])}/{meta['threads']}t"


if __name__ == "__main__":
    main()
