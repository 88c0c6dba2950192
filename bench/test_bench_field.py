"""pytest-benchmark suites of the kernels, for regression tracking (not part of the tests).

    pytest bench/ --benchmark-only                          # run
    pytest bench/ --benchmark-only --benchmark-autosave      # save under .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare       # compare with the last save

Each benchmark checks its result against the float64 reference once before timing, so a fast
wrong kernel cannot pass as a speed-up. Sizes are moderate (a few seconds per benchmark on a
2-core CPU); bench/field_throughput.py is the full sweep with peers and GEMM ratios.

Each benchmark's extra_info (in the saved JSON) holds its primary figure, the fraction of this
machine's ceiling for that kernel (bench/ceiling.py, measured once per session on the current
thread count, against the best round), and where it was measured (bench/machine.py: the CPU,
the dispatcher's ISA, threads, torch's BLAS, load average): a saved run compares only with runs
on the same CPU.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import poissonflow
from poissonflow import registry
from poissonflow.kernels import reference  # noqa: E402
from poissonflow.kernels.reference import field_backward_reference
from poissonflow.testing import field_errors, flow_errors, row_errors, tolerance

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import machine  # noqa: E402

SIZES = [(4096, 129), (4096, 3), (2048, 513)]
F32 = tolerance(torch.float32)


def _case(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


@pytest.fixture(scope="module")
def ceil():
    """This machine's ceiling on the current thread count, measured once for the module."""
    return ceiling.measure(torch.get_num_threads())


def _record(benchmark, ceiling_seconds: float) -> None:
    """The fraction of the ceiling (the best round against the kernel's best possible time)
    and where it was measured, into the benchmark's saved extra_info."""
    best = benchmark.stats.stats.min
    rec = machine.machine_record(torch.get_num_threads())
    benchmark.extra_info["ceiling_seconds"] = ceiling_seconds
    benchmark.extra_info["fraction_of_ceiling"] = ceiling_seconds / best
    benchmark.extra_info["cpu"] = machine.cpu_line(rec)
    benchmark.extra_info["machine"] = rec


def _check(x, y, v, ls, rows=64):
    """The first `rows` queries against all charges, the suite's measure and tolerance."""
    rel, _, ls_err = field_errors(x[:rows], y, v[:rows], ls[:rows])
    assert rel <= F32.v and ls_err <= F32.log_scale, (rel, ls_err)


@pytest.mark.parametrize("N,D", SIZES, ids=lambda v: str(v))
def test_forward_cpu(benchmark, ceil, N, D):
    x, y = _case(N, D)
    v, ls = poissonflow.poisson_field(x, y, backend="cpu")
    _check(x, y, v, ls)
    benchmark.extra_info["gflop_per_call"] = 4 * D * N * N / 1e9
    benchmark.pedantic(
        poissonflow.poisson_field, args=(x, y), kwargs={"backend": "cpu"}, rounds=3, warmup_rounds=1
    )
    _record(benchmark, ceil.forward_seconds(N, N, D))


@pytest.mark.parametrize("N,D", [(4096, 129)], ids=lambda v: str(v))
def test_forward_backward_cpu(benchmark, ceil, N, D):
    x, y = _case(N, D)
    g = torch.Generator().manual_seed(1)
    gv, gl = torch.randn(N, D, generator=g), torch.randn(N, generator=g)

    def run(xx=x, gvv=gv, gll=gl):
        xl, yl = xx.clone().requires_grad_(), y.clone().requires_grad_()
        v, ls = poissonflow.poisson_field(xl, yl, backend="cpu")
        return torch.autograd.grad([v, ls], [xl, yl], [gvv, gll])

    # Checked on the first 128 queries against all charges (the charges' gradient sums over
    # the queries given, so the sub-problem is a complete one).
    n = 128
    dx, dy = run(x[:n], gv[:n], gl[:n])
    rx, ry, _ = field_backward_reference(x[:n], y, None, None, 0.0, gv[:n], gl[:n])
    assert row_errors(dx, rx) <= F32.grad and row_errors(dy, ry) <= F32.grad
    benchmark.extra_info["gflop_forward_equivalent"] = 4 * D * N * N / 1e9
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, ceil.forward_seconds(N, N, D) + ceil.backward_seconds(N, N, D))


@pytest.mark.parametrize("solver,steps", [("euler", 8), ("rk4", 2)])
def test_flow_steps_cpu(benchmark, ceil, solver, steps):
    N, d = 4096, 128
    x, y = _case(N, d)
    t0 = torch.full((N,), math.log(0.5), dtype=torch.float64)
    dt = torch.full((N,), 0.05, dtype=torch.float64)
    flow_steps = registry.get("cpu").module().flow_steps
    # 32 queries against all charges through the same steps, against the float64 reference
    n = 32
    got = flow_steps(x[:n], y, None, t0[:n], dt[:n], steps, solver)
    want = reference.flow_steps(x[:n].double(), y, None, t0[:n], dt[:n], steps, solver)
    assert flow_errors(got, want, x[:n]) <= F32.flow
    benchmark.extra_info["field_evaluations"] = steps * (4 if solver == "rk4" else 1)
    benchmark.pedantic(
        flow_steps, args=(x, y, None, t0, dt, steps, solver), rounds=3, warmup_rounds=1
    )
    # the flow of d features: d dimensions at p = d + 1, plus the softening by z
    _record(benchmark, steps * ceil.flow_step_seconds(N, N, d, solver))
