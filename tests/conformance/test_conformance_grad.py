"""Gradients of every backend that runs here against autograd through the float64 reference.

Each target's protocol functions (field_forward, then field_backward from its v and log_scale)
are combined by poissonflow.ops.gradients, the one backward formula of every op pair, so the
per-query softening's gradient (from the augmented problem) is checked on every backend too.
One measure (poissonflow.testing.row_errors) and one table (TOLERANCES[dtype].grad).
"""

from __future__ import annotations

import conformance_targets as ct
import pytest
import torch
from conformance_cases import field_case, upstream
from helpers import reference_gradients, row_errors, tolerance

from poissonflow import ops
from poissonflow.kernels.reference import poisson_field_reference

GRAD_FEATURES = [
    "plain",
    "weights",
    "power",
    "eps",
    "exclude",
    "eps_rows",
    "gl-only",
    "gv-only",
    "zero-weight-nearest",
]


def target_gradients(target, case, gv, gl, *, need=(True, True, True, True)):
    x, y, w = case["x"], case["y"], case["w"]
    v, ls = target.forward(
        x, y, w, case["power"], case["eps"], exclude=case["exclude"], eps_rows=case["eps_rows"]
    )
    return ops.gradients(
        ops.protocol_backward(target.backward),
        x,
        y,
        w,
        case["power"],
        case["eps"],
        case["exclude"],
        case["eps_rows"],
        v,
        ls,
        gv,
        gl,
        *need,
    )


def assert_gradients_close(got, want, dtype, label):
    tol = tolerance(dtype).grad
    for name, g, r in zip(("x", "charges", "weights", "eps_rows"), got, want):
        if r is None:
            assert g is None, f"{label}: gradient for absent {name}"
            continue
        assert g is not None, f"{label}: no gradient for {name}"
        assert g.shape == r.shape, (label, name)
        assert bool(torch.isfinite(g).all()), f"{label}: non-finite gradient for {name}"
        err = row_errors(g, r)
        assert err <= tol, f"{label}: {name} gradient error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("tid,dtype,feature", ct.params([(f, f) for f in GRAD_FEATURES]))
def test_gradients(tid, dtype, feature):
    target = ct.get(tid)
    case_feature = "weights" if feature in ("gl-only", "gv-only") else feature
    case = field_case(13, 17, 5, case_feature, dtype, seed=4, device=target.device)
    gv, gl = upstream(13, 5, dtype, device=target.device)
    if feature == "gl-only":
        gv = None  # v unused: the projection g . (x - y) drops out of every kernel
    if feature == "gv-only":
        gl = None
    if case["w"] is None and feature == "plain":
        case["w"] = torch.ones(17, dtype=dtype, device=target.device)  # d/dw at w = 1
    if feature == "zero-weight-nearest":
        # dL/dw of a zero-weight charge next to a query is q (a - delta + g_l), q = pi / w far
        # beyond the float range: every other gradient is compared (dL/dy of those charges is 0)
        got = target_gradients(target, case, gv, gl, need=(True, True, False, True))
        want = reference_gradients(case, gv, gl)
        want[2] = None
        got = (got[0], got[1], None, got[3])
    else:
        got = target_gradients(target, case, gv, gl)
        want = reference_gradients(case, gv, gl)
    assert_gradients_close(got, want, dtype, tid)


@pytest.mark.parametrize(
    "tid,dtype,weighted",
    ct.params([(False, "loo"), (True, "loo-weights")], dtypes=(torch.float32, torch.float64)),
)
def test_leave_one_out_coincident_gradients(tid, dtype, weighted):
    """Queries that are the charges, each excluding its own (`exclude = arange(N)`, as the
    transform and every pairwise loss use it): the excluded pair has r2 = 0, and a backward
    that forms its r2 derivative before masking it gets 0 * inf = NaN. Gradients for queries,
    charges and weights must be finite and equal the reference's (N = 50, D = 6, power 4,
    L = sum v + sum log_scale)."""
    target = ct.get(tid)
    g = torch.Generator().manual_seed(12)
    N, D = 50, 6
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).to(target.device)
    w = (torch.rand(N, generator=g, dtype=torch.float64) + 0.2).to(dtype).to(target.device)
    case = dict(
        x=x,
        y=x.clone(),
        w=w if weighted else torch.ones_like(w),
        power=4.0,
        eps=0.0,
        exclude=torch.arange(N, device=target.device),
        eps_rows=None,
    )
    gv = torch.ones(N, D, dtype=dtype, device=target.device)
    gl = torch.ones(N, dtype=dtype, device=target.device)
    got = target_gradients(target, case, gv, gl)
    want = reference_gradients(case, gv, gl)
    assert_gradients_close(got, want, dtype, tid)


@pytest.mark.parametrize("tid,dtype", ct.params())
def test_dead_rows_gradients(tid, dtype):
    """Rows that no charge reaches (v = 0, log_scale = -inf): every gradient is finite and
    equals the reference's, with upstream gradients on every row. v is 0 whatever x is there,
    so a dead row's dL/dx is exactly 0 on every backend."""
    target = ct.get(tid)
    case = field_case(13, 17, 5, "dead-rows", dtype, seed=4, device=target.device)
    gv, gl = upstream(13, 5, dtype, device=target.device)
    got = target_gradients(target, case, gv, gl)
    for g in got[:3]:
        assert bool(torch.isfinite(g).all()), tid
    want = reference_gradients(case, gv, gl)
    assert_gradients_close(got, want, dtype, tid)
    _, log_scale = target.forward(
        case["x"],
        case["y"],
        case["w"],
        case["power"],
        case["eps"],
        exclude=case["exclude"],
        eps_rows=case["eps_rows"],
    )
    dead = torch.isneginf(log_scale.cpu().double())
    assert bool(dead.any()), "the case must hold dead rows"
    assert torch.equal(got[0].cpu()[dead], torch.zeros_like(got[0].cpu()[dead]))


@pytest.mark.parametrize("tid,dtype", ct.params(dtypes=(torch.float32, torch.float64)))
def test_gradients_empty_queries(tid, dtype):
    """N = 0: every sum over queries is empty, the charges' gradients are exactly zero."""
    target = ct.get(tid)
    case = field_case(0, 6, 3, "weights", dtype, device=target.device)
    gv, gl = upstream(0, 3, dtype, device=target.device)
    gx, gy, gw, _ = target_gradients(target, case, gv, gl, need=(True, True, True, False))
    assert gx.shape == (0, 3)
    assert torch.equal(gy.cpu(), torch.zeros(6, 3, dtype=dtype))
    assert torch.equal(gw.cpu(), torch.zeros(6, dtype=dtype))


@pytest.mark.parametrize("tid,dtype", ct.params(dtypes=(torch.float64,)))
def test_only_requested_gradients(tid, dtype):
    target = ct.get(tid)
    case = field_case(9, 11, 4, "weights", dtype, seed=8, device=target.device)
    gv, gl = upstream(9, 4, dtype, device=target.device)
    v, ls = target.forward(case["x"], case["y"], case["w"], case["power"], case["eps"])
    gx, gy, gw = target.backward(
        case["x"],
        case["y"],
        case["w"],
        case["power"],
        case["eps"],
        v,
        ls,
        gv,
        gl,
        need_x=False,
        need_y=False,
        need_w=True,
    )
    assert gx is None and gy is None and gw.shape == (11,)


@pytest.mark.parametrize("tid,dtype", ct.params(dtypes=(torch.float64,)))
def test_weight_gradient_at_zero_weight_is_the_one_sided_derivative(tid, dtype):
    """dL/dw_j at w_j = 0 is finite (pi_ij / w_j stays finite) while autograd through log w is
    not: compare with a one-sided float64 finite difference of the reference."""
    target = ct.get(tid)
    g = torch.Generator().manual_seed(6)
    N, B, D = 9, 7, 4
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.rand(B, generator=g, dtype=dtype) + 0.1
    j = B // 2
    w[j] = 0.0
    gv = torch.randn(N, D, generator=g, dtype=dtype)
    gl = torch.randn(N, generator=g, dtype=dtype)

    def loss(ww):
        v, ls = poisson_field_reference(x, y, ww, None, 0.0)
        return float((v * gv).sum() + (ls * gl).sum())

    h = 1e-7
    w_h = w.clone()
    w_h[j] = h
    fd = (loss(w_h) - loss(w)) / h  # error O(h * second derivative)
    dev = target.device
    v, ls = target.forward(x.to(dev), y.to(dev), w.to(dev), float(D), 0.0)
    _, _, gw = target.backward(
        x.to(dev),
        y.to(dev),
        w.to(dev),
        float(D),
        0.0,
        v,
        ls,
        gv.to(dev),
        gl.to(dev),
        need_x=False,
        need_y=False,
        need_w=True,
    )
    assert abs(float(gw[j]) - fd) <= 1e-5 * (1 + abs(fd))
