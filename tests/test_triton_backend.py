"""The Triton backend against the float64 reference.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (numpy): triton decides
when a kernel is decorated whether it is compiled or interpreted, so TRITON_INTERPRET is set
below before anything imports the kernels (poissonflow.triton imports them lazily, on first
use). The interpreter is slow, so shapes stay small; the interpreter's tiles are 16 x 16 queries
x charges and 32 dimensions, so N, B up to 70 and D up to 129 run several tiles and chunks with
ragged edges.

Tolerances. float64: 1e-10 relative (measured: 4e-14 and below; the kernels and the reference
sum in different orders). float32: scores s = -(p/2) log2 r2 reach ~600 for D = 129, where one
float32 ulp is 6e-5, so the softmax weights carry a few 1e-5 of relative error; measured: up to
1.3e-5 for v (per row) and 1.6e-5 for the gradients (whole tensor), asserted at 1e-4.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'poissonflow[triton]')")

import poissonflow  # noqa: E402
from poissonflow import triton as pft  # noqa: E402
from poissonflow.flow import flow_steps_reference  # noqa: E402
from poissonflow.reference import (  # noqa: E402
    poisson_field_reference,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def make_inputs(N, B, D, *, seed=0, weights=True, zero_weight=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=F64)
    y = torch.randn(B, D, generator=g, dtype=F64)
    w = None
    if weights:
        w = torch.rand(B, generator=g, dtype=F64) + 0.1
        if zero_weight:
            w[B // 2] = 0.0
    return x, y, w


def on(t, dtype):
    return None if t is None else t.to(device=DEV, dtype=dtype)


def row_rel_err(a, ref):
    """max_i ||a_i - ref_i|| / ||ref_i|| (rows with ref_i = 0 compared absolutely)."""
    a = a.detach().to("cpu", F64)
    ref = ref.detach().to("cpu", F64)
    if a.numel() == 0:
        return 0.0
    den = ref.norm(dim=-1).clamp_min(1e-30) if ref.ndim > 1 else ref.abs().clamp_min(1e-30)
    num = (a - ref).norm(dim=-1) if ref.ndim > 1 else (a - ref).abs()
    zero = den <= 1e-30
    return float(torch.where(zero, num, num / den).max())


def rel_err(a, ref):
    """||a - ref|| / ||ref|| over the whole tensor (for gradients, whose rows can be ~0)."""
    a = a.detach().to("cpu", F64)
    ref = ref.detach().to("cpu", F64)
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_log_scale_close(ls, ref, tol):
    ls = ls.detach().to("cpu", F64)
    ref = ref.to(F64)
    assert torch.equal(torch.isneginf(ls), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    err = (ls[finite] - ref[finite]).abs() / (1 + ref[finite].abs())
    assert err.numel() == 0 or float(err.max()) <= tol, float(err.max())


def test_backend_is_available_and_kernels_match_the_device():
    assert pft.available()
    assert poissonflow.backends()["triton"]["available"]
    kernels = pft._kernels("_field_fwd")
    # The interpreter is active exactly when there is no GPU: the variable was read at decoration.
    assert kernels.INTERPRETED == (DEV == "cpu")


@pytest.mark.skipif(DEV == "cuda", reason="checks the CPU-only error path")
def test_interpreter_requested_after_kernel_import_is_a_clear_error():
    # triton reads TRITON_INTERPRET when a kernel is decorated: kernels imported without it are
    # compiled kernels, which cannot take CPU tensors even if the variable is set later.
    code = (
        "import os, torch\n"
        "from poissonflow import triton as pft\n"
        "assert not pft.available()\n"
        "pft._kernels('_field_fwd')\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    pft.field_forward(torch.ones(2, 3), torch.ones(4, 3), None, 3.0, 0.0)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1 was set after" in out.stdout


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "N,B,D", [(1, 1, 1), (7, 5, 3), (37, 53, 33), (23, 19, 129), (17, 70, 1)],
    ids=lambda v: str(v),
)
def test_forward_matches_reference(N, B, D, dtype):
    x, y, w = make_inputs(N, B, D, zero_weight=B > 1)
    v, ls = pft.field_forward(on(x, dtype), on(y, dtype), on(w, dtype), float(D), 0.1)
    assert v.dtype == dtype and ls.dtype == dtype and v.shape == (N, D) and ls.shape == (N,)
    v_ref, ls_ref = poisson_field_reference(on(x, dtype).cpu(), on(y, dtype).cpu(),
                                            on(w, dtype).cpu(), float(D), 0.1)
    assert row_rel_err(v, v_ref) <= TOL[dtype]
    assert_log_scale_close(ls, ls_ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_forward_options_exclude_eps_rows_power_no_weights(dtype):
    N, B, D = 29, 41, 5
    x, y, _ = make_inputs(N, B, D, weights=False)
    g = torch.Generator().manual_seed(1)
    exclude = torch.randint(-1, B, (N,), generator=g)
    eps_rows = torch.rand(N, generator=g, dtype=F64) * 0.5
    for kwargs in ({"exclude": exclude}, {"eps_rows": eps_rows},
                   {"exclude": exclude, "eps_rows": eps_rows}):
        dev_kwargs = {k: (t.to(DEV) if k == "exclude" else on(t, dtype)) for k, t in kwargs.items()}
        v, ls = pft.field_forward(on(x, dtype), on(y, dtype), None, 2.5, 0.3, **dev_kwargs)
        ref_kwargs = {k: (t if k == "exclude" else t.to(dtype)) for k, t in kwargs.items()}
        v_ref, ls_ref = poisson_field_reference(x.to(dtype), y.to(dtype), None, 2.5, 0.3,
                                                **ref_kwargs)
        assert row_rel_err(v, v_ref) <= TOL[dtype]
        assert_log_scale_close(ls, ls_ref, TOL[dtype])
    # Strided (non-contiguous) views are accepted and give the same bits.
    x_strided = torch.cat([x, x], dim=1)[:, :D]
    assert not x_strided.is_contiguous()
    v2, ls2 = pft.field_forward(on(x_strided, dtype), on(y, dtype), None, 2.5, 0.3, **dev_kwargs)
    assert torch.equal(v2, v) and torch.equal(ls2, ls)


def test_forward_near_coincident_points_far_from_origin():
    # DESIGN.md section 2, D = 129, charges of norm 10 in pairs 2e-3 apart. Queries 0-3 sit 1e-3
    # from one charge (r2 formed as |x|^2 + |y|^2 - 2 x.y would be garbage); queries 4-7 are
    # equidistant from both charges of a pair (two weights ~1/2: v formed as x - sum_j pi_j y_j
    # would lose ~4e-4 of its digits).
    D = 129
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, D, generator=g, dtype=F64)
    a = 10.0 * a / a.norm(dim=1, keepdim=True)
    d = torch.randn(20, D, generator=g, dtype=F64)
    d = d / d.norm(dim=1, keepdim=True)
    y = torch.cat([a, a + 2e-3 * d])
    u = torch.randn(8, D, generator=g, dtype=F64)
    u = u - (u * d[:8]).sum(1, keepdim=True) * d[:8]
    u = u / u.norm(dim=1, keepdim=True)
    x = torch.cat([a[:4] + 1e-3 * u[:4], a[4:8] + 1e-3 * (d[4:8] + u[4:8])])
    x32, y32 = x.float(), y.float()
    v_ref, ls_ref = poisson_field_reference(x32, y32, None, None, 0.0)
    v, ls = pft.field_forward(x32.to(DEV), y32.to(DEV), None, float(D), 0.0)
    assert row_rel_err(v, v_ref) <= 1e-4
    assert_log_scale_close(ls, ls_ref, 1e-4)
    # The test has teeth: both cancelling forms, in float32, miss the tolerance.
    r2 = ((x32.double()[:, None, :] - y32.double()[None, :, :]) ** 2).sum(-1)
    pi = torch.softmax(-0.5 * D * torch.log(r2), dim=1).float()
    assert row_rel_err(x32 - pi @ y32, v_ref) > 2e-4
    r2_expanded = (x32 * x32).sum(1)[:, None] + (y32 * y32).sum(1)[None, :] - 2 * x32 @ y32.T
    pi_expanded = torch.softmax(-0.5 * D * torch.log(r2_expanded.clamp_min(1e-38)), dim=1)
    v_expanded = (pi_expanded[:, :, None] * (x32[:, None, :] - y32[None, :, :])).sum(1)
    assert row_rel_err(v_expanded, v_ref) > 0.5


def test_forward_exact_coincidence_and_unreachable_rows():
    D = 4
    x, y, _ = make_inputs(6, 5, D)
    x[0] = y[3]  # exact coincidence, eps = 0: r2 floored at the smallest normal number
    w = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0], dtype=F64)
    # Rows 1 and 2 exclude one of the two weighted charges: each is left with a single one.
    exclude = torch.tensor([-1, 2, 3, -1, -1, -1])
    v, ls = pft.field_forward(x.to(DEV), y.to(DEV), w.to(DEV), float(D), 0.0,
                              exclude=exclude.to(DEV))
    v_ref, ls_ref = poisson_field_reference(x, y, w, None, 0.0, exclude=exclude)
    assert row_rel_err(v, v_ref) <= 1e-10
    assert_log_scale_close(ls, ls_ref, 1e-10)
    assert float(v[0].abs().max()) == 0.0 and math.isfinite(float(ls[0]))
    # Every query excludes the only charge, or the only one with a positive weight: no field.
    for w2 in (None, torch.tensor([0.0, 1.0], dtype=F64).to(DEV)):
        v, ls = pft.field_forward(x.to(DEV), y[:2].to(DEV), w2, float(D), 0.0,
                                  exclude=torch.ones(6, dtype=torch.int64, device=DEV))
        if w2 is None:
            assert bool(torch.isfinite(ls).all())  # charge 0 is still reachable
            continue
        assert torch.equal(v.cpu(), torch.zeros_like(x))
        assert bool(torch.isneginf(ls).all())
    v, ls = pft.field_forward(x.to(DEV), y[:1].to(DEV), None, float(D), 0.0,
                              exclude=torch.zeros(6, dtype=torch.int64, device=DEV))
    assert torch.equal(v.cpu(), torch.zeros_like(x)) and bool(torch.isneginf(ls).all())


def test_forward_multi_tile_online_softmax_rescales():
    # Charges sorted so that the queries' nearest charges come last (the running max rises from
    # tile to tile, rescaling the accumulator) or first (later tiles only add small terms).
    N, B, D = 70, 70, 9
    x, y, w = make_inputs(N, B, D, seed=3)
    x = 0.1 * x
    order = torch.argsort(y.norm(dim=1), descending=True)
    for yy, best_lo, best_hi in ((y[order], 35, 70), (y[order.flip(0)], 0, 35)):
        best = torch.cdist(x, yy).argmin(dim=1)
        assert float(((best >= best_lo) & (best < best_hi)).double().mean()) > 0.9
        for dtype in (torch.float32, F64):
            v, ls = pft.field_forward(on(x, dtype), on(yy, dtype), on(w, dtype), float(D), 0.0)
            v_ref, ls_ref = poisson_field_reference(x.to(dtype), yy.to(dtype), w.to(dtype),
                                                    None, 0.0)
            assert row_rel_err(v, v_ref) <= TOL[dtype]
            assert_log_scale_close(ls, ls_ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_forward_half_precision_inputs(dtype):
    # Computed in float32 from the rounded inputs; the outputs are rounded to `dtype`
    # (bfloat16: 2^-9 relative per element, float16: 2^-12), asserted at 1e-2 and 2e-3.
    x, y, w = make_inputs(37, 53, 33)
    xh, yh, wh = x.to(dtype), y.to(dtype), w.to(dtype)
    v, ls = pft.field_forward(xh.to(DEV), yh.to(DEV), wh.to(DEV), 33.0, 0.0)
    assert v.dtype == dtype and ls.dtype == dtype
    v_ref, ls_ref = poisson_field_reference(xh.double(), yh.double(), wh.double(), None, 0.0)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert row_rel_err(v, v_ref) <= tol
    assert_log_scale_close(ls, ls_ref, tol)


def test_empty_queries():
    x = torch.zeros(0, 3, device=DEV)
    y = torch.randn(4, 3, device=DEV)
    v, ls = pft.field_forward(x, y, None, 3.0, 0.0)
    assert v.shape == (0, 3) and ls.shape == (0,)
    gx, gy, gw = pft.field_backward(x, y, torch.ones(4, device=DEV), 3.0, 0.0, v, ls,
                                    torch.zeros(0, 3, device=DEV), torch.zeros(0, device=DEV),
                                    need_x=True, need_y=True, need_w=True)
    assert gx.shape == (0, 3)
    assert torch.equal(gy.cpu(), torch.zeros(4, 3)) and torch.equal(gw.cpu(), torch.zeros(4))
    t = torch.zeros(0, device=DEV)
    assert pft.flow_steps(x, y, None, t, t, 2, "rk4").shape == (0, 3)


# ---------------------------------------------------------------------------- backward


def reference_grads(x, y, w, p, eps, gv, gl, *, exclude=None, eps_rows=None):
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    v, ls = poisson_field_reference(*leaves, p, eps, exclude=exclude, eps_rows=eps_rows)
    return torch.autograd.grad((v * gv).sum() + (ls * gl).sum(), leaves)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("N,B,D", [(7, 5, 3), (37, 53, 33), (23, 19, 129)], ids=lambda v: str(v))
def test_backward_matches_autograd_through_reference(N, B, D, dtype):
    x, y, w = make_inputs(N, B, D, seed=4)
    g = torch.Generator().manual_seed(5)
    gv = torch.randn(N, D, generator=g, dtype=F64)
    gl = torch.randn(N, generator=g, dtype=F64)
    exclude = torch.randint(-1, B, (N,), generator=g)
    p = D + 0.5
    xd, yd, wd = x.to(dtype), y.to(dtype), w.to(dtype)
    refs = reference_grads(xd.double(), yd.double(), wd.double(), p, 0.2, gv, gl,
                           exclude=exclude)
    v, ls = pft.field_forward(on(xd, dtype), on(yd, dtype), on(wd, dtype), p, 0.2,
                              exclude=exclude.to(DEV))
    grads = pft.field_backward(on(xd, dtype), on(yd, dtype), on(wd, dtype), p, 0.2, v, ls,
                               on(gv, dtype), on(gl, dtype), need_x=True, need_y=True,
                               need_w=True, exclude=exclude.to(DEV))
    for got, ref in zip(grads, refs):
        assert got.dtype == dtype
        assert rel_err(got, ref) <= GRAD_TOL[dtype]
    # Only what is asked for is computed; a missing upstream gradient counts as zero.
    gx, gy, gw = pft.field_backward(on(xd, dtype), on(yd, dtype), on(wd, dtype), p, 0.2, v, ls,
                                    on(gv, dtype), None, need_x=True, need_y=False,
                                    need_w=False, exclude=exclude.to(DEV))
    assert gy is None and gw is None
    gx_ref = reference_grads(xd.double(), yd.double(), wd.double(), p, 0.2, gv, 0 * gl,
                             exclude=exclude)[0]
    assert rel_err(gx, gx_ref) <= GRAD_TOL[dtype]


def test_backward_with_only_a_log_scale_gradient():
    # gv = None (v unused): the projection g . (x - y) drops out of every kernel.
    N, B, D = 13, 11, 5
    x, y, w = make_inputs(N, B, D, seed=16)
    gl = torch.randn(N, generator=torch.Generator().manual_seed(17), dtype=F64)
    v, ls = pft.field_forward(x.to(DEV), y.to(DEV), w.to(DEV), 4.0, 0.1)
    grads = pft.field_backward(x.to(DEV), y.to(DEV), w.to(DEV), 4.0, 0.1, v, ls, None,
                               gl.to(DEV), need_x=True, need_y=True, need_w=True)
    refs = reference_grads(x, y, w, 4.0, 0.1, torch.zeros(N, D, dtype=F64), gl)
    for got, ref in zip(grads, refs):
        assert rel_err(got, ref) <= GRAD_TOL[F64]


def test_backward_weight_gradient_at_zero_weight():
    # d/dw_j at w_j = 0 is finite (pi_ij / w_j stays finite) while autograd through log w is
    # not: compare with a one-sided float64 finite difference of the reference.
    N, B, D = 9, 7, 4
    x, y, w = make_inputs(N, B, D, seed=6, zero_weight=True)
    j = B // 2
    g = torch.Generator().manual_seed(7)
    gv = torch.randn(N, D, generator=g, dtype=F64)
    gl = torch.randn(N, generator=g, dtype=F64)

    def loss(ww):
        v, ls = poisson_field_reference(x, y, ww, None, 0.0)
        return float((v * gv).sum() + (ls * gl).sum())

    h = 1e-7
    w_h = w.clone()
    w_h[j] = h
    fd = (loss(w_h) - loss(w)) / h  # error O(h * second derivative)
    v, ls = pft.field_forward(x.to(DEV), y.to(DEV), w.to(DEV), float(D), 0.0)
    _, _, gw = pft.field_backward(x.to(DEV), y.to(DEV), w.to(DEV), float(D), 0.0, v, ls,
                                  gv.to(DEV), gl.to(DEV), need_x=False, need_y=False,
                                  need_w=True)
    assert abs(float(gw[j]) - fd) <= 1e-5 * (1 + abs(fd))


def test_gradcheck_through_the_triton_op():
    import poissonflow.triton.ops  # noqa: F401  (registers torch.ops.poissonflow.triton_*)

    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, generator=g, dtype=F64).to(DEV).requires_grad_()
    y = torch.randn(6, 3, generator=g, dtype=F64).to(DEV).requires_grad_()
    w = (torch.rand(6, generator=g, dtype=F64) + 0.2).to(DEV).requires_grad_()
    e = (torch.rand(4, generator=g, dtype=F64) + 0.1).to(DEV).requires_grad_()
    exclude = torch.tensor([-1, 2, 0, 5], device=DEV)

    def field(x, y, w, e):
        v, ls, _, _ = torch.ops.poissonflow.triton_field_fwd(x, y, w, 2.5, 0.0, exclude, e)
        return v, ls

    assert torch.autograd.gradcheck(field, (x, y, w, e))


def test_op_registration_fake_and_dynamo():
    import poissonflow.triton.ops  # noqa: F401

    x, y, w = make_inputs(5, 7, 3, seed=9)
    args = (x.to(DEV).requires_grad_(), y.to(DEV), w.to(DEV), 3.0, 0.1, None, None)
    torch.library.opcheck(torch.ops.poissonflow.triton_field_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    v, ls, lse2, v_c = torch.ops.poissonflow.triton_field_fwd(*args)
    assert v.requires_grad and ls.requires_grad and not lse2.requires_grad
    assert v_c.shape == (0,)  # float32 input: v is already in the compute dtype

    def total(x):
        return torch.ops.poissonflow.triton_field_fwd(x, *args[1:])[0].sum()

    # Dynamo traces the op through its fake without a graph break. (Inductor lowering the
    # kernels themselves needs compiled, not interpreted, Triton: GPU only.)
    compiled = torch.compile(total, backend="eager", fullgraph=True)
    assert torch.equal(compiled(args[0]), total(args[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_gradients_through_the_op(dtype):
    # float32 inside; the inputs are rounded to `dtype` (the reference uses the same rounded
    # values), and so are the upstream gradient and the gradients themselves (bfloat16: 2^-9
    # relative each; float16: 2^-12). Measured 4.2e-3 (bf16) and 3.4e-4 (f16); asserted at
    # 1e-2 and 2e-3.
    import poissonflow.triton.ops  # noqa: F401

    x, y, w = make_inputs(21, 26, 17, seed=10)
    xh, yh, wh = (t.to(dtype) for t in (x, y, w))
    g = torch.Generator().manual_seed(11)
    gv = torch.randn(21, 17, generator=g, dtype=F64)
    gl = torch.randn(21, generator=g, dtype=F64)
    leaves = [t.to(DEV).requires_grad_() for t in (xh, yh, wh)]
    v, ls, _, v_c = torch.ops.poissonflow.triton_field_fwd(*leaves, 17.0, 0.0, None, None)
    assert v_c.dtype == torch.float32 and v_c.shape == v.shape
    loss = (v.double() * gv.to(DEV)).sum() + (ls.double() * gl.to(DEV)).sum()
    grads = torch.autograd.grad(loss, leaves)
    refs = reference_grads(xh.double(), yh.double(), wh.double(), 17.0, 0.0, gv, gl)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for got, ref in zip(grads, refs):
        assert got.dtype == dtype
        assert rel_err(got, ref) <= tol


# -------------------------------------------------------------------------------- flow


def reference_flow(x, y, w, t0, dt, n_steps, solver, exclude=None):
    """The package's float64 oracle (poissonflow.flow.flow_steps_reference), in float64 whatever
    the inputs' dtype."""
    return flow_steps_reference(x.double(), y, w, t0, dt, n_steps, solver, exclude=exclude)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_flow_steps_match_reference_loop(solver, dtype):
    N, B, D = 21, 17, 6
    x, y, w = make_inputs(N, B, D, seed=12)
    g = torch.Generator().manual_seed(13)
    t0 = math.log(0.3) + 0.5 * torch.rand(N, generator=g, dtype=F64)
    dt = 0.4 * torch.rand(N, generator=g, dtype=F64) - 0.1  # both signs
    exclude = torch.randint(-1, B, (N,), generator=g)
    args = [on(t, dtype) for t in (x, y, w, t0, dt)]
    out = pft.flow_steps(*args, 3, solver, exclude=exclude.to(DEV))
    assert out.dtype == dtype and out.shape == (N, D)
    ref = reference_flow(*(a.cpu() for a in args), 3, solver, exclude=exclude)
    assert row_rel_err(out, ref) <= TOL[dtype]


def test_flow_rk4_ragged_dimension_float32():
    N, B, D = 19, 35, 33
    x, y, _ = make_inputs(N, B, D, seed=14, weights=False)
    t0 = torch.full((N,), math.log(0.5), dtype=F64)
    dt = torch.full((N,), 0.25, dtype=F64)
    out = pft.flow_steps(*(on(t, torch.float32) for t in (x, y)), None,
                         *(on(t, torch.float32) for t in (t0, dt)), 2, "rk4")
    ref = reference_flow(x.float(), y.float(), None, t0.float(), dt.float(), 2, "rk4")
    assert row_rel_err(out, ref) <= 1e-4


# ----------------------------------------------------------------- determinism, bad input


def test_results_are_bit_identical_run_to_run():
    x, y, w = make_inputs(20, 23, 7, seed=15)
    args = (x.float().to(DEV), y.float().to(DEV), w.float().to(DEV), 7.0, 0.0)
    v1, l1 = pft.field_forward(*args)
    v2, l2 = pft.field_forward(*args)
    assert torch.equal(v1, v2) and torch.equal(l1, l2)
    gv = torch.ones_like(v1)
    g1 = pft.field_backward(*args, v1, l1, gv, None, need_x=True, need_y=True, need_w=True)
    g2 = pft.field_backward(*args, v1, l1, gv, None, need_x=True, need_y=True, need_w=True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    t = torch.zeros(20, device=DEV)
    f1 = pft.flow_steps(args[0], args[1], args[2], t, t + 0.1, 2, "euler")
    f2 = pft.flow_steps(args[0], args[1], args[2], t, t + 0.1, 2, "euler")
    assert torch.equal(f1, f2)


def test_bad_input_names_the_argument():
    x = torch.randn(4, 3, device=DEV)
    y = torch.randn(5, 3, device=DEV)
    with pytest.raises(TypeError, match="x has dtype"):
        pft.field_forward(x.to(torch.int32), y.to(torch.int32), None, 3.0, 0.0)
    with pytest.raises(ValueError, match="exclude"):
        pft.field_forward(x, y, None, 3.0, 0.0, exclude=torch.zeros(3, dtype=torch.int64,
                                                                    device=DEV))
    with pytest.raises(TypeError, match="exclude"):
        pft.field_forward(x, y, None, 3.0, 0.0, exclude=torch.zeros(4, device=DEV))
    with pytest.raises(TypeError, match="eps_rows"):
        pft.field_forward(x, y, None, 3.0, 0.0, eps_rows=torch.zeros(4, dtype=torch.int64,
                                                                     device=DEV))
    v, ls = pft.field_forward(x, y, None, 3.0, 0.0)
    with pytest.raises(ValueError, match="gv"):
        pft.field_backward(x, y, None, 3.0, 0.0, v, ls, v[:2], None, need_x=True,
                           need_y=False, need_w=False)
    t = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="solver"):
        pft.flow_steps(x, y, None, t, t, 1, "midpoint")
    with pytest.raises(ValueError, match="n_steps"):
        pft.flow_steps(x, y, None, t, t, 0, "euler")
    with pytest.raises(ValueError, match="dt"):
        pft.flow_steps(x, y, None, t, t[:2], 1, "euler")
