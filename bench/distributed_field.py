"""The field and one RK4 step over processes: 1 process x 2 threads against 2 processes x 1
thread (gloo on 127.0.0.1), N = B = 8192, D = 128, float32 (docs/DESIGN.md, "Sharding the field over
processes").

    python bench/distributed_field.py [--n 8192 --d 128 --repeats 3 --json OUT.json]

For each configuration: seconds per evaluation (best of `repeats`), bytes each rank receives
per evaluation, and the share of the time spent communicating. Two processes are measured in
both modes of poissonflow.distributed.poisson_field:

* allgather: the gather of the charges is timed alone (it is not overlapped), so the share is
  t_gather / t_total;
* ring: the transfer overlaps the compute, so the share is the exposed part,
  (t_total - t_compute) / t_total, with t_compute the same per-shard kernel calls without any
  communication; the bare transfer (the same hops without compute) is reported too.

The RK4 step: one process runs the fused kernel (flow_steps, 1 step) and the unfused driver
(ode.step, 4 field evaluations); two processes run the distributed flow's two paths: ring
(4 ring passes, one per stage) and allgather (the charges gathered once, then the fused local
kernel; the gather is amortised over every step of a flow, so it is reported per step of a
32-step flow).

**Cost model.** Per field evaluation over R ranks with N_r = N / R queries each, a rank
computes 4·N_r·B·D = 4·N·B·D/R flops and receives B·D·(R - 1)/R values (b bytes each; both
modes move the same volume). In the ring each of the R - 1 hops carries B/R charges while the rank
computes 4·N_r·(B/R)·D flops on the shard it holds, so a hop is hidden when

    4·N_r·(B/R)·D / F  >=  (B/R)·D·b / W + alpha,

F the kernel's counted rate, W the link bandwidth, alpha the per-message latency. The
bandwidth term gives N_r >= F·b / (4·W), independent of B and D (both sides scale with the
shard); the latency term gives N_r·B >= alpha·F·R / (4·D). With float32 (b = 4) and
F = 30 TFLOP/s (the exact kernel near half the FP32 peak of an H100/H200, docs/DESIGN.md
"A tensor-core field with a certified error"):

* NVLink (H100/H200, ~450 GB/s per direction): N_r >= 30e12 / 450e9 ~ 67 queries per rank;
  with alpha ~ 10 us, R = 8, D = 128: N_r·B >= 4.7e6 (e.g. N_r = 1024 queries against
  B >= 4.6e3 charges).
* PCIe Gen5 x16 (~64 GB/s): N_r >= 30e12 / 64e9 ~ 470 queries per rank; the latency bound is
  the same product with PCIe's alpha (~20 us: N_r·B >= 9.4e6).

So a flow (N = B) is compute-bound on either link from a few thousand points per GPU; what
the ring buys over the all-gather is memory (two shards instead of B charges) and the
overlap. The backward moves 3x the bytes of the forward (charges, then float64 gradient
accumulators of the same width), against 2.4-2.7x the forward's compute (fact P3), so it has
about the same crossover. On this CPU, F and W are measured below (the gloo loopback's W and
the kernel's F at one thread) and the same formula gives its crossover.

Development notes (three runs of this script on the shared 2-core development machine with a
load average near 10, so the spread is the machine's, not the method's): 1 process x 2
threads: field 0.52-0.54 s, RK4 step 1.5-2.0 s fused, 1.8-2.5 s unfused; 2 processes x 1
thread, all-gather: field 0.30-0.59 s with 1.1-2.6% of it in the gather (4-12 ms for the
2 MiB each rank receives); ring: field 0.40-0.57 s, 0-10% exposed communication (the bare
transfer alone 1.6-3.8 ms); RK4 step 1.6-2.5 s (ring) and 2.2-4.1 s (all-gather + fused local
kernel). gloo on the loopback moved 0.55-1.3 GB/s and the kernel ran at 31-47 GFLOP/s per
one-thread rank, so here the ring is compute-bound from N_r ~ 25-86 queries per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import machine  # noqa: E402


def _best(fn, repeats):
    fn()  # warm: the first call loads the kernels and wakes the threads
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _data(n, d):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def single(args):
    import math

    import torch

    from poissonflow import registry
    from poissonflow.ode import step

    torch.set_num_threads(2)
    x = _data(args.n, args.d)
    mod = registry.get("cpu").module()
    p = float(args.d)
    t_field = _best(lambda: mod.field_forward(x, x, None, p, 0.0), args.repeats)
    t0 = torch.full((args.n,), math.log(0.3), dtype=torch.float64)
    dt = torch.full((args.n,), 0.1, dtype=torch.float64)
    xs = x[:, :-1].contiguous()  # the flow of d = D - 1 features lives in D dimensions
    t_fused = _best(lambda: mod.flow_steps(xs, xs, None, t0, dt, 1, "rk4"), args.repeats)

    def f(xx, tt):
        return mod.field_forward(
            xx, xs, None, float(xs.shape[1] + 1), 0.0, eps_rows=torch.exp(tt).to(xx.dtype)
        )[0]

    t_unfused = _best(lambda: step(f, xs, t0, dt, "rk4"), args.repeats)
    flops = 4.0 * args.n * args.n * args.d
    return {
        "config": "1 process x 2 threads",
        "field_s": t_field,
        "field_gflops": flops / t_field / 1e9,
        "rk4_fused_s": t_fused,
        "rk4_unfused_s": t_unfused,
        "bytes_per_eval": 0,
    }


def rank_main(args):
    import math

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world
    )
    from poissonflow.distributed import _comm
    from poissonflow.distributed import field as dfield
    from poissonflow.distributed.flow import _ring_flow
    from poissonflow.flow import empirical_flow

    R, r = args.world, args.rank
    x_all = _data(args.n, args.d)
    rows = [len(c) for c in torch.arange(args.n).tensor_split(R)]
    o = sum(rows[:r])
    x = x_all[o : o + rows[r]].contiguous()
    out = {"config": f"{R} processes x 1 thread"}
    mod = dfield.registry.get("cpu").module()
    p = float(args.d)
    for mode in ("allgather", "ring"):
        plan = dfield.plan_field(x, x, None, p, 0.0, None, None, mode, "cpu", grad=False)

        def evaluate(plan=plan):
            dfield.field_with_plan(plan, x, x, None, None)
            dist.barrier()

        total = _best(evaluate, args.repeats)
        L = plan.layout
        own = dfield._pack(x, None)
        if mode == "allgather":

            def comm():
                _comm.gather_rows(own, L.b, plan.group)
                dist.barrier()

            t_comm = _best(comm, args.repeats)
            out["allgather_field_s"] = total
            out["allgather_comm_s"] = t_comm
            out["allgather_comm_share"] = t_comm / total
        else:
            shards = [x_all[sum(rows[:s]) : sum(rows[: s + 1])] for s in range(R)]

            def compute_only():
                for s in range(R):
                    mod.field_forward(x, shards[s], None, p, 0.0)
                dist.barrier()

            def comm_only():
                for _ in _comm.ring(own, L, plan.group):
                    pass
                dist.barrier()

            t_compute = _best(compute_only, args.repeats)
            t_comm = _best(comm_only, args.repeats)
            out["ring_field_s"] = total
            out["ring_compute_only_s"] = t_compute
            out["ring_transfer_only_s"] = t_comm
            out["ring_exposed_comm_share"] = max(0.0, total - t_compute) / total
        out["bytes_per_eval"] = sum(L.b[s] for s in range(R) if s != r) * args.d * 4
    # one RK4 step of the flow of d = D - 1 features
    xs = x[:, :-1].contiguous()
    ys_all = x_all[:, :-1].contiguous()
    t0 = torch.full((xs.shape[0],), math.log(0.3), dtype=torch.float64)
    for mode in ("ring", "allgather"):
        plan = dfield.plan_field(
            xs, xs, None, float(args.d), 0.0, None, None, mode, "cpu", grad=False
        )
        if mode == "ring":

            def one_step(plan=plan):
                _ring_flow(
                    plan, xs, torch.exp(t0), xs, None, None, 0.3 * math.exp(0.1), 1, "rk4", 1 << 30
                )
                dist.barrier()

            out["rk4_ring_s"] = _best(one_step, args.repeats)
        else:

            def gather():
                _comm.gather_rows(dfield._pack(xs, None), plan.layout.b, plan.group)
                dist.barrier()

            def fused_local():
                empirical_flow(
                    xs, torch.exp(t0), ys_all, None, 0.3 * math.exp(0.1), 1, "rk4", backend="cpu"
                )
                dist.barrier()

            tg = _best(gather, args.repeats)
            out["rk4_allgather_fused_s"] = _best(fused_local, args.repeats) + tg / 32
            out["rk4_allgather_gather_s"] = tg
    gathered = [None] * R
    dist.all_gather_object(gathered, out)
    _comm.end_process_group()
    if r == 0:
        print(json.dumps(gathered[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="N = B")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        return rank_main(args)
    rec = machine.machine_record(2)
    # the ceilings of the configurations (bench/ceiling.py, one core's pipes): a rank on one
    # thread with N / 2 of the queries against all the charges, and one process on 2 threads,
    # the whole field at twice one core's rate (the same pairs); the field is D = d at p = d,
    # and an RK4 step of the d - 1 features is four of them
    ceil1 = ceiling.measure(threads=1)
    field_2x1 = ceil1.forward_seconds(args.n // 2, args.n, args.d, float(args.d))
    field_1x2 = ceil1.forward_seconds(args.n, args.n, args.d, float(args.d)) / 2
    one = single(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(r),
                "--world",
                "2",
                "--port",
                str(port),
                "--n",
                str(args.n),
                "--d",
                str(args.d),
                "--repeats",
                str(args.repeats),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a rank failed")
    two = json.loads(outs[0].strip().splitlines()[-1])
    flops = 4.0 * args.n * args.n * args.d
    wire = two["ring_transfer_only_s"]
    two["gloo_bandwidth_GBps"] = two["bytes_per_eval"] / wire / 1e9
    two["kernel_gflops_1_thread"] = flops / 2 / two["ring_compute_only_s"] / 1e9
    # the bandwidth crossover of the cost model with this machine's F (one rank) and W
    two["crossover_queries_per_rank"] = (
        two["kernel_gflops_1_thread"] * 1e9 * 4 / (4 * two["gloo_bandwidth_GBps"] * 1e9)
    )
    one["ceiling_field_s"], two["ceiling_field_s"] = field_1x2, field_2x1
    print(f"# {machine.cpu_line(rec)}")
    print(
        f"N = B = {args.n}, D = {args.d}, float32, best of {args.repeats}; in brackets the "
        "fraction of the configuration's ceiling (bench/ceiling.py: the field's time with every "
        f"vector pipe busy, {1e3 * field_1x2:.1f} ms on 1 x 2 and {1e3 * field_2x1:.1f} ms "
        "per rank on 2 x 1; an RK4 step is four fields)"
    )
    print(
        "| configuration | field (s) | RK4 step (s) | bytes received / eval / rank | "
        "communicating |"
    )
    print("|---|---|---|---|---|")

    def frac(ceil_s, t):
        return f"{t:.3f} ({ceil_s / t:.2f})"

    print(
        f"| 1 process x 2 threads | {frac(field_1x2, one['field_s'])} | "
        f"{frac(4 * field_1x2, one['rk4_fused_s'])} fused, "
        f"{frac(4 * field_1x2, one['rk4_unfused_s'])} unfused | 0 | - |"
    )
    print(
        f"| 2 x 1, allgather | {frac(field_2x1, two['allgather_field_s'])} | "
        f"{frac(4 * field_2x1, two['rk4_allgather_fused_s'])} (fused; gather "
        f"{two['rk4_allgather_gather_s']:.4f} once per flow) | {two['bytes_per_eval']:,} | "
        f"{100 * two['allgather_comm_share']:.1f}% |"
    )
    print(
        f"| 2 x 1, ring | {frac(field_2x1, two['ring_field_s'])} | "
        f"{frac(4 * field_2x1, two['rk4_ring_s'])} (4 ring passes) "
        f"| {two['bytes_per_eval']:,} | {100 * two['ring_exposed_comm_share']:.1f}% exposed "
        f"(bare transfer {two['ring_transfer_only_s']:.4f} s) |"
    )
    print(
        f"gloo loopback bandwidth {two['gloo_bandwidth_GBps']:.2f} GB/s, kernel "
        f"{two['kernel_gflops_1_thread']:.1f} GFLOP/s per rank: the ring is compute-bound "
        f"from N_r = F b / (4 W) = {two['crossover_queries_per_rank']:.0f} queries per rank"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "n": args.n,
                    "d": args.d,
                    "machine": rec,
                    "ceiling_rates_1_thread": ceil1.rates,
                    "single": one,
                    "two": two,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
