"""pytest-benchmark suites of the kernels, for regression tracking (not part of the tests).

    pytest bench/ --benchmark-only                          # run
    pytest bench/ --benchmark-only --benchmark-autosave      # save under .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare       # compare with the last save

Each benchmark checks its result against the float64 reference once before timing, so a fast
wrong kernel cannot pass as a speed-up. Sizes are moderate (a few seconds per benchmark on a
2-core CPU); bench/field_throughput.py is the full sweep with peers and GEMM ratios.
"""

from __future__ import annotations

import math

import pytest
import torch

import poissonflow
from poissonflow import registry
from poissonflow.kernels import reference  # noqa: E402
from poissonflow.kernels.reference import field_backward_reference
from poissonflow.testing import field_errors, flow_errors, row_errors, tolerance

SIZES = [(4096, 129), (4096, 3), (2048, 513)]
F32 = tolerance(torch.float32)


def _case(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


def _check(x, y, v, ls, rows=64):
    """The first `rows` queries against all charges, the suite's measure and tolerance."""
    rel, _, ls_err = field_errors(x[:rows], y, v[:rows], ls[:rows])
    assert rel <= F32.v and ls_err <= F32.log_scale, (rel, ls_err)


@pytest.mark.parametrize("N,D", SIZES, ids=lambda v: str(v))
def test_forward_cpu(benchmark, N, D):
    x, y = _case(N, D)
    v, ls = poissonflow.poisson_field(x, y, backend="cpu")
    _check(x, y, v, ls)
    benchmark.extra_info["gflop_per_call"] = 4 * D * N * N / 1e9
    benchmark.pedantic(
        poissonflow.poisson_field, args=(x, y), kwargs={"backend": "cpu"}, rounds=3, warmup_rounds=1
    )


@pytest.mark.parametrize("N,D", [(4096, 129)], ids=lambda v: str(v))
def test_forward_backward_cpu(benchmark, N, D):
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


@pytest.mark.parametrize("solver,steps", [("euler", 8), ("rk4", 2)])
def test_flow_steps_cpu(benchmark, solver, steps):
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
