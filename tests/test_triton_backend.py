"""What is specific to the Triton backend: the interpreter switch, its op pair
poissonflow::field_triton (gradcheck, opcheck, torch.compile, half-precision gradients through
the op), its accumulator design, determinism and its own argument checks. Its agreement with
the reference on every shape, dtype and feature is the conformance suite's (tests/conformance).

Without a GPU the kernels run on CPU tensors through Triton's interpreter (numpy): triton decides
when a kernel is decorated whether it is compiled or interpreted, so TRITON_INTERPRET is set
below before anything imports the kernels (poissonflow.kernels.triton imports them lazily, on first
use). Tolerances and the error measure: poissonflow/testing.py (through tests/helpers.py).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'poissonflow[triton]')")

from helpers import TOL_GRAD, TOL_V, row_errors  # noqa: E402

import poissonflow  # noqa: E402
from poissonflow.kernels import triton as pft  # noqa: E402
from poissonflow.kernels.reference import poisson_field_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


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
    """The suite's one measure (per-row relative error, poissonflow.testing.row_errors)."""
    return row_errors(a, ref, floor=0.0)


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
def test_interpreter_requested_after_kernel_import_is_a_clear_error(tmp_path):
    # triton reads TRITON_INTERPRET when a kernel is decorated: kernels imported without it are
    # compiled kernels, which cannot take CPU tensors even if the variable is set later.
    code = (
        "import os, torch\n"
        "from poissonflow.kernels import triton as pft\n"
        "assert not pft.available()\n"
        "pft._kernels('_field_fwd')\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    pft.field_forward(torch.ones(2, 3), torch.ones(4, 3), None, 3.0, 0.0)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1 was set after" in out.stdout


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_strided_views_give_the_same_bits(dtype):
    # The launcher makes inputs contiguous; a strided view must give the same bits.
    N, B, D = 29, 41, 5
    x, y, _ = make_inputs(N, B, D, weights=False)
    g = torch.Generator().manual_seed(1)
    kw = dict(
        exclude=torch.randint(-1, B, (N,), generator=g).to(DEV),
        eps_rows=on(torch.rand(N, generator=g, dtype=F64) * 0.5, dtype),
    )
    v, ls = pft.field_forward(on(x, dtype), on(y, dtype), None, 2.5, 0.3, **kw)
    x_strided = torch.cat([x, x], dim=1)[:, :D]
    assert not x_strided.is_contiguous()
    v2, ls2 = pft.field_forward(on(x_strided, dtype), on(y, dtype), None, 2.5, 0.3, **kw)
    assert torch.equal(v2, v) and torch.equal(ls2, ls)


def test_forward_near_coincident_points_far_from_origin():
    # The accumulator is formed from differences, sum_j p_ij (y_j - x_i), never p @ y - l x
    # (docs/DESIGN.md, "The field operator"). D = 129, charges of norm 10 in pairs 2e-3 apart.
    # Queries 0-3
    # sit 1e-3 from one charge (r2 formed as |x|^2 + |y|^2 - 2 x.y would be garbage); queries
    # 4-7 are equidistant from both charges of a pair (two weights ~1/2: v formed as
    # x - sum_j pi_j y_j would lose ~4e-4 of its digits).
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
    assert row_rel_err(v, v_ref) <= TOL_V[torch.float32]
    assert_log_scale_close(ls, ls_ref, TOL_V[torch.float32])
    # The test has teeth: both cancelling forms, in float32, miss the tolerance.
    r2 = ((x32.double()[:, None, :] - y32.double()[None, :, :]) ** 2).sum(-1)
    pi = torch.softmax(-0.5 * D * torch.log(r2), dim=1).float()
    assert row_rel_err(x32 - pi @ y32, v_ref) > 2e-4
    r2_expanded = (x32 * x32).sum(1)[:, None] + (y32 * y32).sum(1)[None, :] - 2 * x32 @ y32.T
    pi_expanded = torch.softmax(-0.5 * D * torch.log(r2_expanded.clamp_min(1e-38)), dim=1)
    v_expanded = (pi_expanded[:, :, None] * (x32[:, None, :] - y32[None, :, :])).sum(1)
    assert row_rel_err(v_expanded, v_ref) > 0.5


# ---------------------------------------------------------------------------- backward


def reference_grads(x, y, w, p, eps, gv, gl, *, exclude=None, eps_rows=None):
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    v, ls = poisson_field_reference(*leaves, p, eps, exclude=exclude, eps_rows=eps_rows)
    return torch.autograd.grad((v * gv).sum() + (ls * gl).sum(), leaves)


def test_gradcheck_through_the_triton_op():
    # Every input, the per-query softening eps_rows included (its gradient comes from the
    # shared backward's augmented problem, poissonflow.ops.gradients).
    import poissonflow.kernels.triton.ops  # noqa: F401  (registers torch.ops.poissonflow.field_triton)

    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, generator=g, dtype=F64).to(DEV).requires_grad_()
    y = torch.randn(6, 3, generator=g, dtype=F64).to(DEV).requires_grad_()
    w = (torch.rand(6, generator=g, dtype=F64) + 0.2).to(DEV).requires_grad_()
    e = (torch.rand(4, generator=g, dtype=F64) + 0.1).to(DEV).requires_grad_()
    exclude = torch.tensor([-1, 2, 0, 5], device=DEV)

    def field(x, y, w, e):
        return torch.ops.poissonflow.field_triton(x, y, w, 2.5, 0.0, exclude, e)

    assert torch.autograd.gradcheck(field, (x, y, w, e))


def test_op_registration_fake_and_dynamo():
    import poissonflow.kernels.triton.ops  # noqa: F401

    x, y, w = make_inputs(5, 7, 3, seed=9)
    args = (x.to(DEV).requires_grad_(), y.to(DEV), w.to(DEV), 3.0, 0.1, None, None)
    torch.library.opcheck(
        torch.ops.poissonflow.field_triton,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    # The same schema as poissonflow::field: (v, log_scale), both differentiable.
    assert (
        str(torch.ops.poissonflow.field_triton.default._schema).split("(", 1)[1]
        == str(torch.ops.poissonflow.field.default._schema).split("(", 1)[1]
    )
    v, ls = torch.ops.poissonflow.field_triton(*args)
    assert v.requires_grad and ls.requires_grad

    def total(x):
        return torch.ops.poissonflow.field_triton(x, *args[1:])[0].sum()

    # Dynamo traces the op through its fake without a graph break. (Inductor lowering the
    # kernels themselves needs compiled, not interpreted, Triton: GPU only.)
    compiled = torch.compile(total, backend="eager", fullgraph=True)
    assert torch.equal(compiled(args[0]), total(args[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_gradients_through_the_op(dtype):
    # float32 inside; the inputs are rounded to `dtype` (the reference uses the same rounded
    # values), and so are the upstream gradient and the gradients themselves (bfloat16: 2^-9
    # relative each; float16: 2^-12). The op saves only (v, log_scale) in `dtype`; its backward
    # recomputes both in float32 (they would spoil pi and g . v), which these bounds check.
    import poissonflow.kernels.triton.ops  # noqa: F401

    x, y, w = make_inputs(21, 26, 17, seed=10)
    xh, yh, wh = (t.to(dtype) for t in (x, y, w))
    g = torch.Generator().manual_seed(11)
    gv = torch.randn(21, 17, generator=g, dtype=F64)
    gl = torch.randn(21, generator=g, dtype=F64)
    leaves = [t.to(DEV).requires_grad_() for t in (xh, yh, wh)]
    v, ls = torch.ops.poissonflow.field_triton(*leaves, 17.0, 0.0, None, None)
    assert v.dtype == dtype and ls.dtype == dtype
    loss = (v.double() * gv.to(DEV)).sum() + (ls.double() * gl.to(DEV)).sum()
    grads = torch.autograd.grad(loss, leaves)
    # the op's upstream gradients are gv, gl rounded to `dtype`: the reference gets the same
    refs = reference_grads(
        xh.double(),
        yh.double(),
        wh.double(),
        17.0,
        0.0,
        gv.to(dtype).double(),
        gl.to(dtype).double(),
    )
    for got, ref in zip(grads, refs):
        assert got.dtype == dtype
        assert row_errors(got, ref) <= TOL_GRAD[dtype]


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
        pft.field_forward(
            x, y, None, 3.0, 0.0, exclude=torch.zeros(3, dtype=torch.int64, device=DEV)
        )
    with pytest.raises(TypeError, match="exclude"):
        pft.field_forward(x, y, None, 3.0, 0.0, exclude=torch.zeros(4, device=DEV))
    with pytest.raises(TypeError, match="eps_rows"):
        pft.field_forward(
            x, y, None, 3.0, 0.0, eps_rows=torch.zeros(4, dtype=torch.int64, device=DEV)
        )
    v, ls = pft.field_forward(x, y, None, 3.0, 0.0)
    with pytest.raises(ValueError, match="gv"):
        pft.field_backward(
            x, y, None, 3.0, 0.0, v, ls, v[:2], None, need_x=True, need_y=False, need_w=False
        )
    t = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="solver"):
        pft.flow_steps(x, y, None, t, t, 1, "midpoint")
    with pytest.raises(ValueError, match="n_steps"):
        pft.flow_steps(x, y, None, t, t, 0, "euler")
    with pytest.raises(ValueError, match="dt"):
        pft.flow_steps(x, y, None, t, t[:2], 1, "euler")
