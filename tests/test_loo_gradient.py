"""Leave-one-out gradients of the CPU kernels at exact coincidence.

With the queries as the charges and each query excluding its own charge (as `transform` and the
pairwise losses call the field), the excluded pair has r2 = 0, floored at the smallest normal
number, so its unnormalised weight 2^(-(p/2) log2 floor - lse2) overflows to inf. The backward
must drop that pair with a select: multiplying it by a 0/1 mask gave inf * 0 = NaN in every entry
of dL/dy and dL/dw. Rows that keep their own charge (exclude = -1) sit on a clamped pair, whose
slope is zero (docs/DESIGN.md, "The field operator").

Oracle: the closed-form float64 backward `field_backward_reference` (itself checked against
autograd in tests/test_field_autograd.py). Error measure: max |got - want| / max |want| per
gradient. Tolerances: float64 kernels keep ~1e-15 relative per term, sums of 50 terms lose at
most a few ulp more, hence 1e-11; float32 scores carry 2^-24 |s| relative error (|s| < 300 here:
p = 4 and r2 >= floor), amplified through pi into ~2e-5, hence 2e-4.
"""

from __future__ import annotations

import pytest
import torch

import poissonflow
from poissonflow.kernels import cpu as _cpu
from poissonflow.kernels.reference import field_backward_reference

TOL = {torch.float32: 2e-4, torch.float64: 1e-11}
N, D, POWER = 50, 6, 4.0


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def problem(dtype, weighted, keep_some):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    exclude = torch.arange(N)
    if keep_some:
        exclude[::7] = -1  # these rows keep their own (coincident, clamped) charge
    return x, w, exclude


CASES = [
    pytest.param(
        dt,
        wt,
        ks,
        id=f"{'f32' if dt == torch.float32 else 'f64'}-"
        f"{'weights' if wt else 'unit'}-{'mixed' if ks else 'loo'}",
    )
    for dt in (torch.float32, torch.float64)
    for wt in (False, True)
    for ks in (False, True)
]


@pytest.mark.parametrize("dtype,weighted,keep_some", CASES)
def test_cpu_backward_at_excluded_coincidence_matches_reference(dtype, weighted, keep_some):
    x, w, exclude = problem(dtype, weighted, keep_some)
    gen = torch.Generator().manual_seed(1)
    gv = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    gl = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    v, ls = _cpu.field_forward(x, x, w, POWER, 0.0, exclude=exclude)
    assert bool(torch.isfinite(v).all() and torch.isfinite(ls).all())
    got = _cpu.field_backward(
        x,
        x,
        w,
        POWER,
        0.0,
        v,
        ls,
        gv,
        gl,
        need_x=True,
        need_y=True,
        need_w=weighted,
        exclude=exclude,
    )
    want = field_backward_reference(x, x, w, POWER, 0.0, gv, gl, exclude=exclude)
    for name, g_, r in zip("xyw", got, want):
        if not weighted and name == "w":
            continue
        assert bool(torch.isfinite(g_).all()), (
            f"dL/d{name}: {int((~torch.isfinite(g_)).sum())} non-finite entries"
        )
        assert rel_err(g_, r) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_public_op_leave_one_out_loss_has_finite_gradients(dtype):
    # The reported case: loss v.sum() + log_scale.sum() through poisson_field and autograd, with
    # the charges a separate leaf holding the same values as the queries.
    x, w, exclude = problem(dtype, True, False)
    xq = x.clone().requires_grad_()
    yq = x.clone().requires_grad_()
    wq = w.clone().requires_grad_()
    v, ls = poissonflow.poisson_field(
        xq, yq, weights=wq, power=POWER, exclude=exclude, backend="cpu"
    )
    (v.sum() + ls.sum()).backward()
    want = field_backward_reference(
        x,
        x,
        w,
        POWER,
        0.0,
        torch.ones(N, D, dtype=dtype),
        torch.ones(N, dtype=dtype),
        exclude=exclude,
    )
    for name, g_, r in zip("xyw", (xq.grad, yq.grad, wq.grad), want):
        assert bool(torch.isfinite(g_).all()), name
        assert rel_err(g_, r) < TOL[dtype], name
