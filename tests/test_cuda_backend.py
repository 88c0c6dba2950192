"""Tests of the CUDA backend (csrc/cuda, poissonflow/kernels/cuda.py).

CI machines have nvcc but no GPU, so the tests come in four layers:
  (a) build: with a CUDA compiler present, the installed package contains poissonflow._cuda
      (this is what proves that `pip install .` compiled the .cu files);
  (b) emulation: the kernels' own block program (csrc/cuda/field_block.cuh) runs on the CPU
      through the host emulator (tests/cuda_emulation), driven by the real Python backend,
      against the float64 reference. Partial validation: no real concurrency, warp behaviour,
      register pressure or CUDA math library (see csrc/cuda/emulate/field_emulate.cpp);
  (c) GPU: the real kernels against the reference, skipped without a CUDA device;
  (d) errors: CPU tensors, a missing module, bad arguments, gpu_check.py without a GPU.

Tolerances. A float32 kernel rounds each score s = log2 w - (p/2) log2 r2 with a relative error
of about 2^-24, so pi carries a relative error of about ln2 * 2^-24 * |s|; with p = 129 and
|s| up to ~600 that is ~3e-5, hence the 2e-4 (float32, relative to the largest entry) below.
float64 gets 1e-11 by the same argument (2^-53 * 600 ~ 7e-14, with margin for the sums).
bfloat16/float16 outputs are compared after rounding both sides to the dtype: one unit in the
last place, 2^-8 (bf16) relative, so 2^-7 of the largest entry.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poissonflow import _C as poissonflow_C
from poissonflow.kernels import cuda as cb
from poissonflow.kernels.reference import field_backward_reference, poisson_field_reference
from poissonflow.kernels.reference import flow_steps as flow_steps_reference

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 2e-4, torch.float64: 1e-11, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference entry."""
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1e-300)
    return float((got - want).abs().max() / scale)


def make_problem(N, B, D, dtype, *, seed=0, weights=True, zero_weight=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.1 if weights else None
    if zero_weight and w is not None:
        w[B // 2] = 0.0
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(y), cast(w)


def reference_grads(x, y, w, power, eps, gv, gl, *, exclude=None, eps_rows=None):
    """dL/dx, dL/dy, dL/dw of L = sum gv . v + sum gl . log_scale by autograd, in float64."""
    x = x.detach().to(torch.float64, copy=True).requires_grad_()
    y = y.detach().to(torch.float64, copy=True).requires_grad_()
    wd = torch.ones(y.shape[0], dtype=torch.float64, device=y.device) if w is None else w
    wd = wd.detach().to(torch.float64, copy=True).requires_grad_()
    v, ls = poisson_field_reference(x, y, wd, power, eps, exclude=exclude, eps_rows=eps_rows)
    loss = (v * gv.double()).sum() + (ls * gl.double()).sum()
    return torch.autograd.grad(loss, (x, y, wd))


def reference_flow(x, y, w, t0, dt, n_steps, solver, *, exclude=None):
    """Euler / classic RK4 of dx/dt = v(x; z = e^t, power d + 1) in float64: the package's
    oracle, poissonflow.kernels.reference.flow_steps."""
    return flow_steps_reference(x.double(), y, w, t0, dt, n_steps, solver, exclude=exclude)


# ---------------------------------------------------------------------------------------------
# (a) The compiled module in the installed package.


def _cuda_compiler_present() -> bool:
    return bool(
        shutil.which("nvcc")
        or os.environ.get("CUDACXX")
        or Path("/usr/local/cuda/bin/nvcc").exists()
    )


@pytest.mark.skipif(not _cuda_compiler_present(), reason="no CUDA compiler: _cuda is not built")
@pytest.mark.skipif(
    os.environ.get("POISSONFLOW_CUDA", "").upper() == "OFF",
    reason="built with POISSONFLOW_CUDA=OFF",
)
def test_cuda_module_is_compiled_into_the_install():
    spec = importlib.util.find_spec("poissonflow._cuda")
    assert spec is not None, (
        "a CUDA compiler is present but poissonflow._cuda is missing from the install: "
        "the CUDA sources were not compiled (check the CMake output of `pip install .`)"
    )
    mod = importlib.import_module("poissonflow._cuda")  # must import without a GPU or driver
    for name in ("launch", "plan", "device_count", "device_info", "compiled_archs"):
        assert callable(getattr(mod, name)), name
    archs = mod.compiled_archs().split(",")
    assert "800" in archs and "900" in archs, archs
    assert mod.device_count() >= 0
    # The module plans with the same code as the emulator (block_plan.h).
    assert mod.plan(cb.MODE_FORWARD, False, 129, 232448) == {
        "upt": 3,
        "window": 132,
        "splits": 1,
        "packs": 33,
        "smem_bytes": 94752,
    }
    # The module, the CPU module and the emulator are built from the same numerics header.
    from cuda_emulation.emulator import Emulator, build

    emu = Emulator(build())
    assert mod.numerics() == poissonflow_C.numerics() == emu.numerics()
    assert mod.arg_names() == emu.arg_names()
    with pytest.raises(TypeError, match="unknown argument 'tiny'"):
        mod.launch(tiny=1.0)
    if mod.device_count() == 0:
        # Every LaunchArgs field is a keyword the binding accepts: the call gets past argument
        # parsing and fails only for want of a GPU.
        args = {name: 0 for name in mod.arg_names()}
        buf = torch.zeros(8)
        args.update(
            x=buf.data_ptr(),
            y=buf.data_ptr(),
            v=buf.data_ptr(),
            lse2=buf.data_ptr(),
            N=1,
            B=1,
            D=1,
            ld=4,
        )
        with pytest.raises(RuntimeError, match="poissonflow CUDA: cudaGetDevice"):
            mod.launch(**args)


def test_importing_poissonflow_does_not_load_cuda(tmp_path):
    code = "import sys, poissonflow; print('poissonflow._cuda' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# (b) Emulation of the kernels on the CPU.


@pytest.fixture(scope="session")
def emulator():
    from cuda_emulation import emulator as emu_mod

    if emu_mod.compiler() is None:
        pytest.skip("no C++ compiler to build the CUDA kernel emulator")
    return emu_mod.Emulator(emu_mod.build())


@pytest.fixture
def runner(emulator):
    from cuda_emulation.emulator import EmulatorRunner

    return lambda **kw: EmulatorRunner(emulator, **kw)


FORWARD_CASES = [
    # (N, B, D, weights, eps): ragged tiles on both sides, D = 1, D = 129 (the blog's setting)
    pytest.param(70, 150, 13, True, 0.1, id="ragged-D13"),
    pytest.param(5, 3, 1, False, 0.0, id="tiny-D1"),
    pytest.param(130, 70, 129, True, 0.0, id="D129"),
    pytest.param(64, 64, 4, True, 0.5, id="full-tiles"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("N,B,D,weights,eps", FORWARD_CASES)
def test_emulated_forward_matches_reference(runner, dtype, N, B, D, weights, eps):
    x, y, w = make_problem(N, B, D, dtype, weights=weights)
    exclude = torch.arange(N) % (B + 3) - 1  # -1 (none) or a charge index
    exclude[exclude >= B] = -1
    v, ls = cb._field_forward(runner(), x, y, w, float(D), eps, exclude=exclude)
    vr, lsr = poisson_field_reference(x, y, w, float(D), eps, exclude=exclude)
    assert v.dtype == dtype and v.shape == (N, D) and ls.shape == (N,)
    assert rel_err(v, vr) < TOL[dtype]
    assert rel_err(ls, lsr) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_emulated_forward_per_query_softening(runner, dtype):
    x, y, w = make_problem(40, 90, 7, dtype, seed=3)
    eps_rows = torch.linspace(0.0, 2.0, 40, dtype=dtype)
    v, ls = cb._field_forward(runner(), x, y, w, 5.5, 0.3, eps_rows=eps_rows)
    vr, lsr = poisson_field_reference(x, y, w, 5.5, 0.3, eps_rows=eps_rows)
    assert rel_err(v, vr) < TOL[dtype] and rel_err(ls, lsr) < TOL[dtype]


def test_emulated_near_coincident_query_keeps_direct_differences(runner):
    # A query 1e-3 from a charge of norm 10 in D = 129 (docs/DESIGN.md, "The field operator"): the
    # expansion
    # |x|^2 + |y|^2 - 2 x.y loses r2 entirely in float32; direct differences keep it.
    D = 129
    x, y, _ = make_problem(6, 300, D, torch.float64, seed=5)
    y[0] = y[0] / y[0].norm() * 10
    step = torch.randn(D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x[0] = y[0] + 1e-3 * step / step.norm()
    x[1] = y[7]  # exact coincidence with eps = 0: r2 floored at tiny, v = 0, log_scale finite
    x32, y32 = x.float(), y.float()
    expanded = (x32[0] ** 2).sum() + (y32[0] ** 2).sum() - 2 * x32[0] @ y32[0]
    assert abs(float(expanded) - 1e-6) >= 0.5e-6  # the trap is real: r2 = 1e-6 is lost
    v, ls = cb._field_forward(runner(), x32, y32, None, float(D), 0.0)
    vr, lsr = poisson_field_reference(x32, y32, None, float(D), 0.0)
    assert float((v[0] - vr[0]).double().norm() / vr[0].double().norm()) < 1e-5
    assert torch.equal(v[1], torch.zeros(D)) and math.isfinite(float(ls[1]))
    assert abs(float(ls[1] - lsr[1])) <= 1e-6 * abs(float(lsr[1]))
    assert rel_err(v[2:], vr[2:]) < TOL[torch.float32]


def test_emulated_dead_rows_have_no_field(runner):
    # Only charge 2 has weight; query 0 excludes it: no charge reaches query 0.
    x, y, _ = make_problem(3, 5, 4, torch.float32, seed=2)
    w = torch.tensor([0.0, 0.0, 1.5, 0.0, 0.0])
    exclude = torch.tensor([2, -1, 0])
    v, ls = cb._field_forward(runner(), x, y, w, 4.0, 0.0, exclude=exclude)
    vr, lsr = poisson_field_reference(x, y, w, 4.0, 0.0, exclude=exclude)
    assert torch.equal(v[0], torch.zeros(4)) and ls[0] == -math.inf
    assert rel_err(v[1:], vr[1:]) < TOL[torch.float32]
    assert rel_err(ls[1:], lsr[1:]) < TOL[torch.float32]
    gx, gy, gw = cb._field_backward(
        runner(),
        x,
        y,
        w,
        4.0,
        0.0,
        v,
        ls,
        torch.ones(3, 4),
        torch.ones(3),
        need_x=True,
        need_y=True,
        need_w=True,
        exclude=exclude,
    )
    assert torch.equal(gx[0], torch.ones(4))  # dL/dx = g_v where there is no field
    assert torch.isfinite(gy).all() and torch.isfinite(gw).all()


def test_emulated_misaligned_views_are_copied(runner):
    # A contiguous view starting 4 bytes into its storage cannot be read in 16-byte packs.
    x, y, w = make_problem(10, 20, 4, torch.float32, seed=15)
    storage = torch.zeros(10 * 4 + 1)
    storage[1:] = x.flatten()
    x_view = storage[1:].view(10, 4)
    assert x_view.data_ptr() % 16 != 0
    v, ls = cb._field_forward(runner(), x_view, y, w, 4.0, 0.0)
    vr, lsr = poisson_field_reference(x, y, w, 4.0, 0.0)
    assert rel_err(v, vr) < TOL[torch.float32] and rel_err(ls, lsr) < TOL[torch.float32]


def test_emulated_no_queries(runner):
    x, y, w = make_problem(0, 10, 3, torch.float32)
    v, ls = cb._field_forward(runner(), x, y, w, 3.0, 0.0)
    assert v.shape == (0, 3) and ls.shape == (0,)
    gx, gy, gw = cb._field_backward(
        runner(), x, y, w, 3.0, 0.0, v, ls, None, None, need_x=True, need_y=True, need_w=True
    )
    assert gx.shape == (0, 3)
    assert torch.equal(gy, torch.zeros(10, 3)) and torch.equal(gw, torch.zeros(10))
    out = cb._flow_steps(runner(), x, y, w, 0.0, 0.1, 2, "rk4")
    assert out.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_emulated_dimension_splits_are_bitwise_identical(runner, dtype, emulator):
    # max_window = 8 splits D = 37 over 5 windows (blockIdx.y): each recomputes r2 in the same
    # order, so results equal the single-window ones bit for bit.
    x, y, w = make_problem(70, 90, 37, dtype, seed=4)
    narrow = runner(max_window=8)
    assert emulator.plan(cb.MODE_FORWARD, dtype == torch.float64, 37, max_window=8)["splits"] == 5
    a = cb._field_forward(runner(), x, y, w, 37.0, 0.2)
    b = cb._field_forward(narrow, x, y, w, 37.0, 0.2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gv, gl = torch.randn(70, 37, dtype=dtype), torch.randn(70, dtype=dtype)
    need = dict(need_x=True, need_y=True, need_w=True)
    ga = cb._field_backward(runner(), x, y, w, 37.0, 0.2, *a, gv, gl, **need)
    gb = cb._field_backward(narrow, x, y, w, 37.0, 0.2, *a, gv, gl, **need)
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


def test_emulated_results_do_not_depend_on_thread_order(runner):
    # Threads of every phase run ascending, descending and shuffled: a shared-memory datum
    # written and read by different threads of one phase would change some result.
    x, y, w = make_problem(70, 100, 21, torch.float32, seed=6, zero_weight=True)
    exclude = torch.randint(-1, 100, (70,), generator=torch.Generator().manual_seed(1))
    gv, gl = torch.randn(70, 21), torch.randn(70)
    results = []
    for order in (0, 1, 2):
        run = runner(order=order, seed=11)
        v, ls = cb._field_forward(run, x, y, w, 21.0, 0.0, exclude=exclude)
        grads = cb._field_backward(
            run,
            x,
            y,
            w,
            21.0,
            0.0,
            v,
            ls,
            gv,
            gl,
            need_x=True,
            need_y=True,
            need_w=True,
            exclude=exclude,
        )
        flow = cb._flow_steps(run, x, y, w, -1.0, 0.25, 2, "rk4", exclude=exclude)
        results.append([v, ls, *grads, flow])
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "N,B,D", [(70, 150, 13), (130, 70, 129), (5, 3, 1)], ids=["D13", "D129", "D1"]
)
def test_emulated_backward_matches_autograd(runner, dtype, N, B, D):
    x, y, w = make_problem(N, B, D, dtype, seed=7)
    exclude = torch.randint(-1, B, (N,), generator=torch.Generator().manual_seed(2))
    eps_rows = torch.rand(N, dtype=dtype) * 0.5
    p = float(D) + 0.5
    v, ls = cb._field_forward(runner(), x, y, w, p, 0.0, exclude=exclude, eps_rows=eps_rows)
    gv, gl = torch.randn(N, D, dtype=dtype), torch.randn(N, dtype=dtype)
    gx, gy, gw = cb._field_backward(
        runner(),
        x,
        y,
        w,
        p,
        0.0,
        v,
        ls,
        gv,
        gl,
        need_x=True,
        need_y=True,
        need_w=True,
        exclude=exclude,
        eps_rows=eps_rows,
    )
    rx, ry, rw = reference_grads(x, y, w, p, 0.0, gv, gl, exclude=exclude, eps_rows=eps_rows)
    assert rel_err(gx, rx) < TOL[dtype]
    assert rel_err(gy, ry) < TOL[dtype]
    assert rel_err(gw, rw) < TOL[dtype]
    only_w = cb._field_backward(
        runner(),
        x,
        y,
        w,
        p,
        0.0,
        v,
        ls,
        gv,
        gl,
        need_x=False,
        need_y=False,
        need_w=True,
        exclude=exclude,
        eps_rows=eps_rows,
    )
    assert only_w[0] is None and only_w[1] is None and torch.equal(only_w[2], gw)


def test_emulated_weight_gradient_is_finite_at_zero_weight(runner):
    # dL/dw_j at w_j = 0 is the limit w_j -> 0+ (pi_ij / w_j stays finite): compare with the
    # reference at w_j = 1e-9, where the gradient differs from the limit by O(1e-9).
    x, y, w = make_problem(20, 30, 5, torch.float64, seed=8)
    gv, gl = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    w0 = w.clone()
    w0[4] = 0.0
    v, ls = cb._field_forward(runner(), x, y, w0, 5.0, 0.1)
    gw = cb._field_backward(
        runner(), x, y, w0, 5.0, 0.1, v, ls, gv, gl, need_x=False, need_y=False, need_w=True
    )[2]
    w_eps = w0.clone()
    w_eps[4] = 1e-9
    rw = reference_grads(x, y, w_eps, 5.0, 0.1, gv, gl)[2]
    assert torch.allclose(gw, rw, rtol=1e-6, atol=1e-6 * float(rw.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_emulated_low_precision_inputs(runner, dtype):
    x, y, w = make_problem(50, 80, 9, dtype, seed=10)
    v, ls = cb._field_forward(runner(), x, y, w, 9.0, 0.1)
    vr, lsr = poisson_field_reference(x, y, w, 9.0, 0.1)  # float64 on the same rounded inputs
    assert v.dtype == dtype and ls.dtype == dtype
    assert rel_err(v, vr) < TOL[dtype] and rel_err(ls, lsr) < TOL[dtype]
    gv, gl = torch.randn(50, 9).to(dtype), torch.randn(50).to(dtype)
    gx, gy, gw = cb._field_backward(
        runner(), x, y, w, 9.0, 0.1, v, ls, gv, gl, need_x=True, need_y=True, need_w=True
    )
    rx, ry, rw = reference_grads(x, y, w, 9.0, 0.1, gv, gl)
    for got, want in ((gx, rx), (gy, ry), (gw, rw)):
        assert got.dtype == dtype
        assert rel_err(got, want.to(dtype)) < TOL[dtype]


def test_emulated_gradcheck_float64(runner):
    run = runner()
    exclude = torch.tensor([1, -1, 0, 3])

    class Field(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, w):
            v, ls = cb._field_forward(run, x, y, w, 3.5, 0.2, exclude=exclude)
            ctx.save_for_backward(x, y, w, v, ls)
            return v, ls

        @staticmethod
        def backward(ctx, gv, gl):
            x, y, w, v, ls = ctx.saved_tensors
            return cb._field_backward(
                run,
                x,
                y,
                w,
                3.5,
                0.2,
                v,
                ls,
                gv,
                gl,
                need_x=True,
                need_y=True,
                need_w=True,
                exclude=exclude,
            )

    x, y, w = make_problem(4, 6, 3, torch.float64, seed=12)
    inputs = tuple(t.requires_grad_() for t in (x, y, w))
    assert torch.autograd.gradcheck(Field.apply, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("weighted", [False, True], ids=["unit", "weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_emulated_leave_one_out_gradients_at_exact_coincidence(runner, dtype, weighted):
    # Queries are the charges and each excludes its own (as transform and the pairwise losses
    # call the field): the excluded pair has r2 = 0, floored, so its weight overflows; it must be
    # dropped by a select, never multiplied by 0 (inf * 0 = NaN in every dL/dy and dL/dw entry).
    N, D, p = 50, 6, 4.0
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    w = torch.rand(N, generator=torch.Generator().manual_seed(21), dtype=torch.float64) + 0.5
    x, w = x.to(dtype), (w.to(dtype) if weighted else None)
    exclude = torch.arange(N)
    exclude[::7] = -1  # some queries keep their own charge: a clamped (zero-slope) pair
    v, ls = cb._field_forward(runner(), x, x, w, p, 0.0, exclude=exclude)
    gv, gl = torch.ones(N, D, dtype=dtype), torch.ones(N, dtype=dtype)
    got = cb._field_backward(
        runner(),
        x,
        x,
        w,
        p,
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
    want = field_backward_reference(x, x, w, p, 0.0, gv, gl, exclude=exclude)
    for name, g, r in zip("xyw", got, want):
        if r is None or (name == "w" and not weighted):
            continue
        assert bool(torch.isfinite(g).all()), f"dL/d{name} has non-finite entries"
        assert rel_err(g, r) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_emulated_low_precision_exact_coincidence_uses_the_input_dtype_floor(runner, dtype):
    # float16/bfloat16 are computed in float32 but r2 is floored at the input dtype's smallest
    # normal number (float16: 2^-14, far above float32's): log_scale of a query sitting on a
    # charge is then -(p/2) log(floor) + ..., as in the reference on the same inputs.
    x, y, w = make_problem(20, 30, 5, dtype, seed=22)
    x[3], x[11] = y[7], y[0]
    v, ls = cb._field_forward(runner(), x, y, w, 5.0, 0.0)
    vr, lsr = poisson_field_reference(x, y, w, 5.0, 0.0)  # floor of x's dtype
    assert rel_err(ls, lsr) < TOL[dtype] and rel_err(v, vr) < TOL[dtype]
    if dtype == torch.float16:  # float32's floor would give a clearly different log_scale
        f32_floor = torch.finfo(torch.float32).tiny
        ls32 = poisson_field_reference(x, y, w, 5.0, 0.0, r2_floor=f32_floor)[1]
        assert float((ls.double() - ls32.double()).abs()[[3, 11]].min()) > 1.0


@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("N,B,d", [(70, 150, 13), (20, 40, 128)], ids=["d13", "d128"])
def test_emulated_fused_flow_matches_reference(runner, solver, dtype, N, B, d):
    x, y, w = make_problem(N, B, d, dtype, seed=13)
    x = x * 1.5
    t0 = torch.linspace(math.log(0.3), math.log(0.6), N, dtype=dtype)  # per-query start and step
    dt = torch.linspace(0.05, 0.15, N, dtype=dtype)
    exclude = torch.arange(N) % B
    run = runner()
    out = cb._flow_steps(run, x, y, w, t0, dt, 3, solver, exclude=exclude)
    assert [a["mode"] for a in run.launches] == [cb.MODE_FLOW]  # all steps in one launch
    want = reference_flow(x, y, w, t0, dt, 3, solver, exclude=exclude)
    assert out.dtype == dtype and out.shape == (N, d)
    assert rel_err(out - x, want - x) < TOL[dtype]


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_emulated_unfused_flow_fallback(runner, solver):
    # A state wider than the fused kernel's window takes the per-stage path (forced here by a
    # narrow window); it must agree with the reference as well.
    x, y, w = make_problem(66, 40, 8, torch.float64, seed=14)
    t0 = torch.full((66,), -0.7, dtype=torch.float64)
    dt = torch.full((66,), 0.2, dtype=torch.float64)
    run = runner(max_window=4)
    out = cb._flow_steps(run, x, y, w, t0, dt, 2, solver)
    stages = 4 if solver == "rk4" else 1
    assert [a["mode"] for a in run.launches] == [cb.MODE_FORWARD] * (2 * stages)
    want = reference_flow(x, y, w, t0, dt, 2, solver)
    assert rel_err(out - x, want - x) < TOL[torch.float64]


def test_emulated_plan_covers_every_dimension(emulator):
    from cuda_emulation.emulator import A100_SMEM_OPTIN

    for is_double, tn, cap in ((False, 4, 256), (True, 2, 128)):
        for D in list(range(1, 300, 7)) + [512, 513, 1024, 2048]:
            for mode in (cb.MODE_FORWARD, cb.MODE_BACKWARD_X, cb.MODE_BACKWARD_Y):
                p = emulator.plan(mode, is_double, D)
                dv = -(-D // tn) * tn
                assert p["window"] % tn == 0 and p["window"] <= cap
                assert (p["splits"] - 1) * p["window"] < dv <= p["splits"] * p["window"]
                assert p["smem_bytes"] <= A100_SMEM_OPTIN
                assert 16 * p["upt"] * tn >= p["window"]  # the registers hold the window
                assert p["packs"] * tn == p["window"]
    assert emulator.plan(cb.MODE_FLOW, False, 128)["splits"] == 1
    assert emulator.plan(cb.MODE_FORWARD, False, 129)["upt"] == 3
    with pytest.raises(ValueError, match="fused flow"):
        emulator.plan(cb.MODE_FLOW, False, 300)


# ---------------------------------------------------------------------------------------------
# (c) The real kernels (GPU only).

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("poissonflow._cuda") is None,
    reason="no CUDA device (or no compiled poissonflow._cuda): real-kernel tests need a GPU",
)


@needs_gpu
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"]
)
@pytest.mark.parametrize(
    "N,B,D", [(300, 500, 13), (257, 1000, 129), (64, 3, 300)], ids=["D13", "D129", "D300-splits"]
)
def test_gpu_forward_backward_match_reference(dtype, N, B, D):
    x, y, w = make_problem(N, B, D, dtype, seed=20)
    x, y, w = x.cuda(), y.cuda(), w.cuda()
    exclude = torch.randint(-1, B, (N,), device="cuda")
    v, ls = cb.field_forward(x, y, w, float(D), 0.0, exclude=exclude)
    vr, lsr = poisson_field_reference(x, y, w, float(D), 0.0, exclude=exclude)
    assert rel_err(v, vr) < TOL[dtype] and rel_err(ls, lsr) < TOL[dtype]
    gv, gl = torch.randn(N, D, device="cuda").to(dtype), torch.randn(N, device="cuda").to(dtype)
    got = cb.field_backward(
        x,
        y,
        w,
        float(D),
        0.0,
        v,
        ls,
        gv,
        gl,
        need_x=True,
        need_y=True,
        need_w=True,
        exclude=exclude,
    )
    want = reference_grads(x, y, w, float(D), 0.0, gv, gl, exclude=exclude)
    for g, r in zip(got, want):
        assert rel_err(g, r.to(dtype)) < TOL[dtype]
    again = cb.field_forward(x, y, w, float(D), 0.0, exclude=exclude)
    assert torch.equal(again[0], v) and torch.equal(again[1], ls)  # bit-identical reruns


@needs_gpu
@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_flow_matches_reference(solver, dtype):
    x, y, w = make_problem(500, 700, 128, dtype, seed=21)
    x, y, w = x.cuda(), y.cuda(), w.cuda()
    t0 = torch.full((500,), math.log(0.5), device="cuda")
    dt = torch.full((500,), 0.1, device="cuda")
    out = cb.flow_steps(x, y, w, t0, dt, 4, solver)
    want = reference_flow(x, y, w, t0, dt, 4, solver)
    # The fused kernel keeps the state in float32 and rounds it to bf16 once, at the end.
    assert rel_err(out, want.to(dtype)) < TOL[dtype]


@needs_gpu
def test_gpu_gradcheck_float64():
    x, y, w = (t.cuda().requires_grad_() for t in make_problem(5, 7, 3, torch.float64, seed=22))

    class Field(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, w):
            v, ls = cb.field_forward(x, y, w, 3.0, 0.1)
            ctx.save_for_backward(x, y, w, v, ls)
            return v, ls

        @staticmethod
        def backward(ctx, gv, gl):
            x, y, w, v, ls = ctx.saved_tensors
            return cb.field_backward(
                x, y, w, 3.0, 0.1, v, ls, gv, gl, need_x=True, need_y=True, need_w=True
            )

    assert torch.autograd.gradcheck(Field.apply, (x, y, w), eps=1e-6, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (d) Errors.


def test_cpu_tensors_are_rejected_before_any_kernel():
    x, y, w = make_problem(3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors, got x on cpu"):
        cb.field_forward(x, y, w, 2.0, 0.0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cb.field_backward(
            x, y, w, 2.0, 0.0, x, x[:, 0], None, None, need_x=True, need_y=False, need_w=False
        )
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cb.flow_steps(x, y, w, 0.0, 0.1, 1, "euler")


def test_missing_module_gives_a_clear_error(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "poissonflow._cuda":
            raise ImportError("No module named 'poissonflow._cuda'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(RuntimeError, match="installed without its CUDA kernels"):
        cb._cuda_module()


def test_bad_flow_arguments(runner):
    x, y, w = make_problem(3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="solver"):
        cb._flow_steps(runner(), x, y, w, 0.0, 0.1, 1, "midpoint")
    with pytest.raises(ValueError, match="n_steps"):
        cb._flow_steps(runner(), x, y, w, 0.0, 0.1, 0, "euler")
    with pytest.raises(ValueError, match=r"t0 must have shape \(3,\)"):
        cb._flow_steps(runner(), x, y, w, torch.zeros(2), 0.1, 1, "euler")
    with pytest.raises(ValueError, match="dt contains NaN"):
        cb._flow_steps(runner(), x, y, w, 0.0, float("nan"), 1, "euler")
    with pytest.raises(TypeError, match="dtype"):
        cb._field_forward(runner(), x.to(torch.int32), y, w, 2.0, 0.0)


def test_launch_checks_reject_bad_layouts(emulator):
    x = torch.zeros(4, 3)  # row stride 3 floats: not a multiple of 16 bytes
    with pytest.raises(RuntimeError, match="row stride"):
        emulator.launch(
            dict(
                mode=0,
                x=x.data_ptr(),
                y=x.data_ptr(),
                v=x.data_ptr(),
                lse2=x.data_ptr(),
                N=4,
                B=4,
                D=3,
                ld=3,
            )
        )


def test_launch_checks_reject_an_input_dtype_that_does_not_match(emulator):
    x = torch.zeros(4, 4)
    args = dict(
        mode=0,
        x=x.data_ptr(),
        y=x.data_ptr(),
        v=x.data_ptr(),
        lse2=x.data_ptr(),
        N=4,
        B=4,
        D=3,
        ld=4,
    )
    with pytest.raises(RuntimeError, match="input_dtype float64 is computed in double"):
        emulator.launch(dict(args, input_dtype=1))  # float64 floor on float buffers
    with pytest.raises(RuntimeError, match="input_dtype must be"):
        emulator.launch(dict(args, input_dtype=7))


def test_numerics_are_one_definition(emulator):
    # The CPU module and the emulator (hence the CUDA block program) read one header.
    consts = poissonflow_C.numerics()
    assert emulator.numerics() == consts
    for dtype, code in cb._INPUT_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        assert consts[f"input_dtype_{name}"] == code
        assert consts[f"r2_floor_{name}"] == torch.finfo(dtype).tiny  # the input dtype's floor
    assert consts["rk4_stages"] == 4 and consts["lazy_rescale_tau_log2"] == 8
    b = [consts[f"rk4_b{s}"] for s in range(1, 5)]
    assert b == [1 / 6, 1 / 3, 1 / 3, 1 / 6]
    assert consts["rk4_weight_denominator"] == 6  # the kernels sum k1 + 2 k2 + 2 k3 + k4
    assert [consts[f"rk4_c{s}"] for s in range(1, 5)] == [0.0, 0.5, 0.5, 1.0]
    assert [consts[k] for k in ("rk4_a21", "rk4_a32", "rk4_a43")] == [0.5, 0.5, 1.0]
    assert consts["no_charge_float32"] == float(torch.tensor(-1e30, dtype=torch.float32))
    assert consts["no_charge_float64"] == -1e300


def test_gpu_check_script_exits_cleanly_without_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "no GPU present" in out.stdout
    js = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    import json

    report = json.loads(js.stdout)
    assert js.returncode == 0 and report["gpu"] is False and report["results"] == []
