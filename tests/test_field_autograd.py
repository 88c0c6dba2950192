"""Gradients of the field: the cpu kernel's backward against autograd through the float64
reference, gradcheck, the custom-op contract (opcheck), torch.compile, determinism.

Tolerance for float32 gradients: relative error per row <= 1e-3 (TOL_GRAD, argued in
poissonflow/testing.py): the backward recomputes pi from the forward's log_scale and forms every
difference directly, so its error is that of the forward (1e-5 .. 5e-5 in the weights) amplified
by at most the conditioning of the softmax Jacobian; measured: <= 2e-4 here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_isas, forced_isa
from test_field_forward import near_coincident_case

import poissonflow
from poissonflow.kernels.reference import field_backward_reference

F32 = torch.float32
F64 = torch.float64


def make_inputs(N, B, D, dtype, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=F64).to(dtype)
    y = torch.randn(B, D, generator=g, dtype=F64).to(dtype)
    w = (0.5 + torch.rand(B, generator=g, dtype=F64)).to(dtype) if weighted else None
    gv = torch.randn(N, D, generator=g, dtype=F64).to(dtype)
    gl = torch.randn(N, generator=g, dtype=F64).to(dtype)
    return x, y, w, gv, gl


def grads(backend, x, y, w, gv, gl, **kw):
    """(dx, dy, dw) of L = <v, gv> + <log_scale, gl>."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, y)]
    wl = None if w is None else w.detach().clone().requires_grad_()
    v, ls = poissonflow.poisson_field(leaves[0], leaves[1], weights=wl, backend=backend, **kw)
    loss = (v * gv).sum() + (ls * gl).sum()
    inputs = leaves + ([wl] if wl is not None else [])
    out = torch.autograd.grad(loss, inputs)
    return out if wl is not None else (*out, None)


def reference_grads(x, y, w, gv, gl, **kw):
    """float64 oracle: autograd through the reference for small problems, the chunked
    closed-form reference backward (checked against autograd below) for large ones."""
    wd = None if w is None else w.double()
    if x.shape[0] * y.shape[0] * x.shape[1] <= 2**22:
        return grads("reference", x.double(), y.double(), wd, gv.double(), gl.double(), **kw)
    return field_backward_reference(
        x, y, wd, kw.get("power"), kw.get("eps", 0.0), gv, gl, exclude=kw.get("exclude")
    )


def row_rel(a, b):
    a, b = a.double(), b.double()
    if b.dim() == 1:
        return ((a - b).abs() / b.abs().max().clamp_min(1e-300)).max().item()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 6, 3), (7, 5, 9), (3, 40, 2)])
@pytest.mark.parametrize("variant", ["plain", "weights", "power", "eps", "exclude"])
def test_gradcheck_cpu_float64(shape, variant):
    N, B, D = shape
    x, y, w, _, _ = make_inputs(N, B, D, F64, seed=N + B + D)
    kw = {}
    if variant != "weights":
        w = None
    if variant == "power":
        kw["power"] = D + 1.7
    if variant == "eps":
        kw["eps"] = 0.3
    if variant == "exclude":
        kw["exclude"] = torch.arange(N) % B if B > 1 else torch.full((N,), -1)
        kw["eps"] = 0.1
    tensors = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    if w is not None:
        tensors.append(w.clone().requires_grad_())

    def f(*ts):
        wt = ts[2] if len(ts) > 2 else None
        return poissonflow.poisson_field(ts[0], ts[1], weights=wt, backend="cpu", **kw)

    # every input together, then each one alone
    assert torch.autograd.gradcheck(f, tensors, atol=1e-8, rtol=1e-6)
    for k in range(len(tensors)):
        alone = [t.detach().requires_grad_(i == k) for i, t in enumerate(tensors)]
        assert torch.autograd.gradcheck(f, alone, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("shape", [(37, 300, 17), (100, 90, 129), (2000, 2000, 129)])
def test_float32_gradients_match_reference(isa, shape):
    if shape[0] == 2000 and isa != cpu_isas()[0]:
        pytest.skip("largest shape on the default ISA only (time budget)")
    x, y, w, gv, gl = make_inputs(*shape, F32, seed=1)
    with forced_isa(isa):
        dx, dy, dw = grads("cpu", x, y, w, gv, gl, eps=0.05)
    rx, ry, rw = reference_grads(x, y, w, gv, gl, eps=0.05)
    assert row_rel(dx, rx) <= 1e-3
    assert row_rel(dy, ry) <= 1e-3
    assert row_rel(dw, rw) <= 1e-3


def test_float32_gradients_near_coincident():
    """Queries 1e-3 from twin charges of norm 10, D = 129 (docs/DESIGN.md, "The field operator")."""
    x, y = near_coincident_case()
    g = torch.Generator().manual_seed(3)
    gv = torch.randn(x.shape, generator=g)
    gl = torch.randn(x.shape[0], generator=g)
    dx, dy, _ = grads("cpu", x, y, None, gv, gl)
    rx, ry, _ = reference_grads(x, y, None, gv, gl)
    assert row_rel(dx, rx) <= 1e-3
    # charges far from every query get tiny gradients: compare rows against the largest one
    scale = ry.norm(dim=1).max()
    assert ((dy.double() - ry).norm(dim=1) / scale).max() <= 1e-3


def test_closed_form_reference_backward_matches_autograd():
    x, y, w, gv, gl = make_inputs(23, 31, 6, F64, seed=10)
    w = w.clone()
    w[3] = 0.0
    ex = torch.randint(-1, 31, (23,), generator=torch.Generator().manual_seed(1))
    auto = grads("reference", x, y, w, gv, gl, eps=0.2, power=4.5, exclude=ex)
    closed = field_backward_reference(x, y, w, 4.5, 0.2, gv, gl, exclude=ex)
    for a, b in zip(closed, auto):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_zero_weights_and_exclusion_gradients():
    x, y, w, gv, gl = make_inputs(30, 50, 5, F64, seed=4)
    w = w.clone()
    w[::5] = 0.0  # d/dw at w = 0 is finite and must be right
    ex = torch.randint(-1, 50, (30,), generator=torch.Generator().manual_seed(0))
    got = grads("cpu", x, y, w, gv, gl, exclude=ex)
    ref = reference_grads(x, y, w, gv, gl, exclude=ex)
    for a, b in zip(got, ref):
        assert row_rel(a, b) <= 1e-10


def test_opcheck():
    x, y, w, _, _ = make_inputs(6, 9, 4, F64, seed=5)
    for args in [
        (x, y, None, 4.0, 0.0, None, None),
        (x.requires_grad_(), y.requires_grad_(), w.requires_grad_(), 2.5, 0.2, None, None),
        (x.float(), y.float(), w.float(), 4.0, 0.0, torch.arange(6), None),
    ]:
        torch.library.opcheck(torch.ops.poissonflow.field.default, args)


def test_torch_compile_gives_eager_gradients():
    x, y, w, _, _ = make_inputs(64, 80, 7, F32, seed=6)

    def loss_fn(x, y, w):
        v, ls = poissonflow.poisson_field(x, y, weights=w, eps=0.1)
        return (v**2).sum() + ls.mean()

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, y, w)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# (2100, 700, 17): 66 query tiles in 8 row groups, so a thread sweeps 8 of its group's tiles
# against each charge tile and then a ragged rest (field_cpu.cpp, backward_rows)
@pytest.mark.parametrize("shape", [(300, 257, 33), (2100, 700, 17)])
def test_gradients_bit_identical_across_runs_and_threads(shape):
    x, y, w, gv, gl = make_inputs(*shape, F32, seed=7)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1 = grads("cpu", x, y, w, gv, gl)
        torch.set_num_threads(2)
        g2 = grads("cpu", x, y, w, gv, gl)
        g3 = grads("cpu", x, y, w, gv, gl)
    finally:
        torch.set_num_threads(old)
    for a, b, c in zip(g1, g2, g3):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_backward_accepts_strided_and_other_dtype_upstream_gradients():
    x, y, _, gv, gl = make_inputs(20, 30, 6, F32, seed=8)
    xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
    v, ls = poissonflow.poisson_field(xl, yl)
    gv_strided = gv.t().contiguous().t()  # same values, column-major strides
    assert not gv_strided.is_contiguous()
    dx1, dy1 = torch.autograd.grad([v, ls], [xl, yl], [gv_strided, gl.double().float()])
    dx2, dy2 = torch.autograd.grad(
        poissonflow.poisson_field(xl, yl), [xl, yl], [gv.contiguous(), gl]
    )
    assert torch.equal(dx1, dx2) and torch.equal(dy1, dy2)
    # upstream gradients of other dtypes are cast to the inputs' dtype by the backward op
    gx, gy, gw = torch.ops.poissonflow.field_backward(
        x,
        y,
        None,
        6.0,
        0.0,
        None,
        None,
        v.detach(),
        ls.detach(),
        gv.double(),
        gl.half(),
        True,
        True,
        False,
    )
    dx3, dy3 = torch.autograd.grad(
        poissonflow.poisson_field(xl, yl), [xl, yl], [gv, gl.half().float()]
    )
    assert torch.equal(gx, dx3) and torch.equal(gy, dy3) and gw.numel() == 0


def test_only_requested_gradients_are_computed():
    x, y, w, gv, gl = make_inputs(10, 12, 3, F64, seed=9)
    gx, gy, gw = torch.ops.poissonflow.field_backward(
        x,
        y,
        w,
        3.0,
        0.0,
        None,
        None,
        *poissonflow.poisson_field(x, y, weights=w),
        gv,
        gl,
        True,
        False,
        False,
    )
    assert gx.shape == x.shape and gy.numel() == 0 and gw.numel() == 0
