"""What a first GPU run would hit that the interpreter can still show: no host-to-device copy or
synchronisation per call (CUDA-graph capture forbids them), a device guard around every
launch, autotune keys that do not carry a configuration across size buckets or solvers, a
launch grid without the y limit, the certificate's terms under approximate exp2, and the
Triton version floor. The kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set before they are imported); the GPU builds themselves are checked by
tests/test_gpu_build_budget.py.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    # before triton is imported: triton.language's own helpers are decorated at its import
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from poissonflow.kernels.triton import _field_bwd, _field_fwd, _flow, _gemm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = Path(_field_fwd.__file__).resolve().parent
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# aten ops that copy host data to the device or read device data on the host
_SYNCING = ("lift_fresh", "_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _problem(N=21, B=19, D=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).to(dtype).to(DEV)
    y = torch.randn(B, D, generator=g).to(dtype).to(DEV)
    w = (torch.rand(B, generator=g) + 0.1).to(dtype).to(DEV)
    return x, y, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_launchers_make_no_host_copy_or_sync(dtype):
    """Every launcher (forward, backward, flow, GEMM form) builds its small parameter buffers on
    the device (fills), never with torch.tensor(list, device=...) (a synchronous host copy,
    illegal under CUDA-graph capture) or a host read of device data."""
    x, y, w = _problem(dtype=dtype)
    gv = torch.randn_like(x)
    gl = torch.randn(x.shape[0], dtype=dtype, device=DEV)
    t0 = torch.zeros(x.shape[0], dtype=torch.float64, device=DEV)
    dt = torch.full_like(t0, 0.1)
    calls = {
        "forward": lambda: _field_fwd.field_forward_launch(x, y, w, 5.0, 0.0),
        "backward": lambda: _field_bwd.field_backward_launch(
            x,
            y,
            w,
            5.0,
            0.0,
            torch.zeros(x.shape[0], dtype=torch.float64, device=DEV),
            x,
            gv,
            gl,
            need_x=True,
            need_y=True,
            need_w=True,
        ),
        "flow": lambda: _flow.flow_steps_launch(x, y, w, t0, dt, 1, "rk4"),
    }
    if dtype != torch.float64:
        calls["gemm"] = lambda: _gemm.gemm_field_forward(x, y, w, 5.0, 0.0)
    for name, call in calls.items():
        with _Recorder() as rec:
            call()
        bad = [op for op in rec.ops if any(f"aten.{s}." in op for s in _SYNCING)]
        assert not bad, f"{name}: {bad}"


def test_scalar_params_are_exact():
    """The device-filled parameters hold p/2 and the r2 floor of the input dtype exactly."""
    for dtype in (torch.float16, torch.float32, torch.float64):
        s = _field_fwd.scalar_params(129.0, dtype, DEV).cpu()
        cdt = _field_fwd.compute_dtype(dtype)
        assert s.dtype == cdt
        assert float(s[0]) == 64.5
        assert float(s[1]) == float(torch.tensor(torch.finfo(dtype).tiny, dtype=cdt))


def _launch_sites(tree):
    """(line, whether inside `with launch_guard(...)`) of every kernel launch kernel[grid](...)."""
    out = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(
                isinstance(item.context_expr, ast.Call)
                and getattr(item.context_expr.func, "id", "") == "launch_guard"
                for item in node.items
            )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            out.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return out


def test_every_launch_is_device_guarded():
    """Tensors on cuda:1 with device 0 current: Triton launches on the current device's stream,
    so every launch site runs inside launch_guard(x) (x's device made current)."""
    sites = {}
    for path in sorted(KERNEL_DIR.glob("*.py")):
        found = _launch_sites(ast.parse(path.read_text()))
        if found:
            sites[path.name] = found
    assert {"_field_fwd.py", "_field_bwd.py", "_flow.py", "_gemm.py"} <= set(sites)
    unguarded = [(f, line) for f, found in sites.items() for line, ok in found if not ok]
    assert not unguarded, unguarded


def test_launch_guard_makes_the_tensors_device_current(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)

    class Fake:
        device = torch.device("cuda", 1)

    with _field_fwd.launch_guard(Fake()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _field_fwd.launch_guard(torch.zeros(1)):
        pass
    assert len(entered) == 1


def _autotuned():
    return {
        "forward": _field_fwd._field_fwd_kernel,
        "backward dx": _field_bwd._field_bwd_dx_kernel,
        "backward dy": _field_bwd._field_bwd_dy_kernel,
        "flow": _flow._flow_kernel,
        "gemm": _gemm._gemm_fwd_kernel,
    }


@pytest.mark.parametrize("name", sorted(_autotuned()))
def test_autotune_key_holds_the_size_bucket(name):
    """A configuration tuned on a 70-point test call is not reused (nor read from the disk
    cache) at N = B = 65,536, and RK4 does not reuse Euler's: the key holds the size bucket
    (and the solver)."""
    kernel = _autotuned()[name]
    assert "D" in kernel.keys and "size_class" in kernel.keys, kernel.keys
    if name == "flow":
        assert "N_STAGES" in kernel.keys
    if name == "gemm":
        assert "PREC" in kernel.keys
    # size_class is a plain argument the compiler does not specialise on: no recompilation per
    # bucket (read from the decorator: the interpreter's functions do not keep it)
    fn = kernel.fn
    path = Path(fn.fn.__code__.co_filename)
    tree = ast.parse(path.read_text())
    node = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn.fn.__name__
    )
    specs = [
        ast.literal_eval(k.value)
        for d in node.decorator_list
        if isinstance(d, ast.Call)
        for k in d.keywords
        if k.arg == "do_not_specialize"
    ]
    assert specs and "size_class" in specs[0]
    assert "size_class" in [a.arg for a in node.args.args]


def test_size_buckets():
    sc = _field_fwd.size_class
    assert sc(70, 70) != sc(65536, 65536)
    assert sc(65536, 70) != sc(70, 65536)
    assert sc(1000, 1000) == sc(1024, 1000)  # factor-4 buckets
    assert sc(1, 1) == 0
    assert sc(2**40, 2**40) == 20 * 32 + 20


def test_f64_configs_are_separate():
    """float64 computation gets its own configurations (twice the registers per value); the
    pruning keeps only the launch's."""
    for kernel in (
        _field_fwd._field_fwd_kernel,
        _field_bwd._field_bwd_dx_kernel,
        _field_bwd._field_bwd_dy_kernel,
        _flow._flow_kernel,
    ):
        for cdt in (torch.float32, torch.float64):
            kept = _field_fwd.prune_configs(
                kernel.configs, {"SCAL": torch.zeros(2, dtype=cdt), "D": 129}
            )
            assert kept and all(cdt in getattr(c, "compute_dtypes", (cdt,)) for c in kept)


def test_r2_bounds_grid_has_no_y_limit():
    """B above ~4.2 M charges: a grid's y extent stops at 65,535 programs; the r2-bounds helper
    launches one program per tile on axis 0 (limit 2^31 - 1)."""
    grid = _gemm.r2_grid(1000, 5_000_000)
    assert len(grid) == 1
    assert grid[0] == triton.cdiv(1000, _gemm.R2_BLOCK) * triton.cdiv(5_000_000, _gemm.R2_BLOCK)
    assert grid[0] < 2**31


def test_r2_bounds_on_a_ragged_grid():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 9, generator=g).to(DEV)
    y = torch.randn(53, 9, generator=g).to(DEV)
    q, err = _gemm.gemm_r2_bounds(x, y, "tf32")
    true = (
        torch.cdist(x.double().cpu(), y.double().cpu(), compute_mode="donot_use_mm_for_euclid_dist")
        ** 2
    )
    assert bool(((q.double().cpu() - true).abs() <= err.double().cpu()).all())


# --------------------------------------------------------------------------------------------
# The certificate under approximate exp2
# --------------------------------------------------------------------------------------------


@triton.jit
def _pair_bound_kernel(S_HI, WIDTH, MREF, APPROX, DROPPED, OUT, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    s_hi = tl.load(S_HI + r[:, None] * 2 + tl.arange(0, 2)[None, :])
    width = tl.load(WIDTH + r[:, None] * 2 + tl.arange(0, 2)[None, :])
    approx = tl.load(APPROX + r[:, None] * 2 + tl.arange(0, 2)[None, :]) != 0
    dropped = tl.load(DROPPED + r[:, None] * 2 + tl.arange(0, 2)[None, :]) != 0
    m_ref = tl.load(MREF + r)
    e = _gemm._pair_error_bound(s_hi, width, m_ref, approx, dropped)
    tl.store(OUT + r[:, None] * 2 + tl.arange(0, 2)[None, :], e)


@pytest.mark.skipif(DEV != "cpu", reason="patches the interpreter's exp2")
def test_certificate_terms_hold_under_approximate_exp2(monkeypatch):
    """The GPU's exp2 (ex2.approx.ftz.f32) is off by up to ~2^-22 relative. A kept-approximate
    pair's term 2^s_hi - 2^s_lo spans ~2.5e-6 of 2^s_hi, so a difference of two approximate
    exponentials could understate it by ~20%: with every exp2 perturbed adversarially by 2^-21
    (twice the hardware's error), each term the kernel forms still bounds the exact one."""
    from triton.runtime import interpreter

    rel = 2.0**-21

    def approx_exp2(self, arg):
        def f(a):
            exact = torch.exp2(torch.from_numpy(a).double()).numpy()
            # low for some arguments, high for others (the worst case for a difference)
            sign = torch.where(
                torch.from_numpy(a).double().frac().abs() * 2**20 % 2 < 1, -1.0, 1.0
            ).numpy()
            return (exact * (1 + sign * rel)).astype(a.dtype)

        return self.unary_op(arg, f)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp2", approx_exp2)
    g = torch.Generator().manual_seed(1)
    n = 64
    m_ref = torch.zeros(n)
    s_hi = torch.rand(n, 2, generator=g) * -4.0
    # interval widths around `tight` = tau / (4 ln 2) for tau = 1e-5 and a few wider ones
    width = (torch.rand(n, 2, generator=g) * 2 + 0.2) * (1e-5 / (4 * math.log(2)))
    width[:4] = torch.tensor([[0.5, 3.0]] * 4)
    approx = torch.ones(n, 2, dtype=torch.int32)
    dropped = torch.zeros(n, 2, dtype=torch.int32)
    approx[::8, 1] = 0
    dropped[::8, 1] = 1
    out = torch.empty(n, 2)
    _pair_bound_kernel[(1,)](s_hi, width, m_ref, approx, dropped, out, BLOCK=n)
    sh = s_hi.double()
    exact = torch.where(
        approx.bool(), torch.exp2(sh) - torch.exp2(sh - width.double()), torch.exp2(sh)
    )
    assert bool((out.double() >= exact).all()), float((out.double() / exact).min())
    # and not loose beyond the inflation: within 1e-5 relative plus the linearisation
    assert bool((out.double() <= exact * (1 + 1e-5) + torch.exp2(sh) * width.double() ** 2).all())


def test_triton_floor_holds_what_the_code_uses():
    """triton.knobs (read at import by the kernels) exists from Triton 3.4: pyproject's floor
    must not promise older."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"triton>=(\d+)\.(\d+)', text)
    assert m, "pyproject names no triton floor"
    assert (int(m.group(1)), int(m.group(2))) >= (3, 4)
    assert "triton.knobs" in (KERNEL_DIR / "_field_fwd.py").read_text()
    assert hasattr(triton, "knobs")
