"""Flow steps (Euler, classic RK4) of every backend that runs here against the float64
reference flow (poissonflow.kernels.reference.flow_steps, which steps through the package's one
Python
RK4 driver, poissonflow.ode.integrate). One measure (poissonflow.testing.flow_errors: per-row
relative error of the displacement) and one table (TOLERANCES[dtype].flow).

Flow time: t0 and dt are handed over in float64 on every path (per query, both signs of dt).
"""

from __future__ import annotations

import math

import conformance_targets as ct
import pytest
import torch
from helpers import flow_errors, tolerance

from poissonflow.kernels import reference

FLOW_CASES = [
    # (id, (N, B, d), weights, exclude)
    ("d6-weights-exclude", (21, 17, 6), True, True),
    ("d33-ragged", (19, 35, 33), False, False),
    ("d1-B1", (5, 1, 1), False, False),
]


def flow_case(N, B, d, weighted, excluded, dtype, device, seed=12):
    g = torch.Generator().manual_seed(seed + d)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    t0 = math.log(0.3) + 0.5 * torch.rand(N, generator=g, dtype=torch.float64)
    dt = 0.4 * torch.rand(N, generator=g, dtype=torch.float64) - 0.1  # both signs
    exclude = torch.randint(-1, B, (N,), generator=g) if excluded else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return (
        cast(x),
        cast(y),
        cast(w),
        t0.to(device),
        dt.to(device),
        None if exclude is None else exclude.to(device),
    )


@pytest.mark.parametrize(
    "tid,dtype,solver,case",
    ct.params([("euler", "euler"), ("rk4", "rk4")], [(c, c[0]) for c in FLOW_CASES]),
)
def test_flow_steps(tid, dtype, solver, case):
    target = ct.get(tid)
    _, shape, weighted, excluded = case
    x, y, w, t0, dt, exclude = flow_case(*shape, weighted, excluded, dtype, target.device)
    out = target.flow(x, y, w, t0, dt, 3, solver, exclude=exclude)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference.flow_steps(
        x.cpu().double(),
        y.cpu(),
        None if w is None else w.cpu(),
        t0.cpu(),
        dt.cpu(),
        3,
        solver,
        exclude=None if exclude is None else exclude.cpu(),
    )
    err = flow_errors(out.cpu(), ref, x.cpu())
    tol = tolerance(dtype).flow
    assert err <= tol, f"displacement error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("tid,dtype", ct.params(dtypes=(torch.float32,)))
def test_flow_steps_no_queries(tid, dtype):
    target = ct.get(tid)
    x = torch.zeros(0, 3, dtype=dtype, device=target.device)
    y = torch.randn(4, 3, dtype=dtype).to(target.device)
    t = torch.zeros(0, dtype=torch.float64, device=target.device)
    assert target.flow(x, y, None, t, t, 2, "rk4").shape == (0, 3)
