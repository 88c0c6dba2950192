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
from poissonflow import _cpu
from poissonflow.reference import poisson_field_reference

SIZES = [(4096, 129), (4096, 3), (2048, 513)]


def _case(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


def _check(x, y, v, rows=64):
    ref, _ = poisson_field_reference(x[:rows].double(), y.double())
    err = ((v[:rows].double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("N,D", SIZES, ids=lambda v: str(v))
def test_forward_cpu(benchmark, N, D):
    x, y = _case(N, D)
    v, _ = poissonflow.poisson_field(x, y, backend="cpu")
    _check(x, y, v)
    benchmark.extra_info["gflop_per_call"] = 4 * D * N * N / 1e9
    benchmark.pedantic(poissonflow.poisson_field, args=(x, y), kwargs={"backend": "cpu"},
                       rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("N,D", [(4096, 129)], ids=lambda v: str(v))
def test_forward_backward_cpu(benchmark, N, D):
    x, y = _case(N, D)
    g = torch.Generator().manual_seed(1)
    gv, gl = torch.randn(N, D, generator=g), torch.randn(N, generator=g)

    def run():
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        v, ls = poissonflow.poisson_field(xl, yl, backend="cpu")
        return torch.autograd.grad([v, ls], [xl, yl], [gv, gl])

    benchmark.extra_info["gflop_forward_equivalent"] = 4 * D * N * N / 1e9
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("solver,steps", [("euler", 8), ("rk4", 2)])
def test_flow_steps_cpu(benchmark, solver, steps):
    N, d = 4096, 128
    x, y = _case(N, d)
    t0 = torch.full((N,), math.log(0.5), dtype=torch.float64)
    dt = torch.full((N,), 0.05, dtype=torch.float64)
    benchmark.extra_info["field_evaluations"] = steps * (4 if solver == "rk4" else 1)
    benchmark.pedantic(_cpu.flow_steps, args=(x, y, None, t0, dt, steps, solver),
                       rounds=3, warmup_rounds=1)
