"""The CUDA backend: the protocol functions of docs/ARCHITECTURE.md on the kernels of `_cuda`.

    field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None) -> (v, log_scale)
    field_backward(x, y, w, power, eps, v, log_scale, gv, gl, *, need_x, need_y, need_w,
                   exclude=None, eps_rows=None) -> (gx, gy, gw)
    flow_steps(x, y, w, t0, dt, n_steps, solver, *, exclude=None) -> x_end

Callers validate the arguments (poissonflow._checks); here tensors are checked to be on a CUDA
device, converted to the compute type (float32 for float16/bfloat16/float32, float64 for
float64), laid out with rows padded to 16 bytes, and handed over by address with the current
CUDA stream. The compiled module `poissonflow._cuda` is imported on first use, never at import
time, so the package imports and works on machines without CUDA.

The kernels return the log-sum-exp in base 2 (`lse2`); here it becomes
log_scale = lse2 * ln 2 - log sum_j w_j, in float64 before the cast to x's dtype.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch

__all__ = ["field_forward", "field_backward", "flow_steps"]

_LN2 = math.log(2.0)
MODE_FORWARD, MODE_FLOW, MODE_BACKWARD_X, MODE_BACKWARD_Y = 0, 1, 2, 3
_SOLVERS = {"euler": 0, "rk4": 1}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# numerics::InputDtype codes (csrc/common/field_numerics.h); the kernels take the r2 floor of the
# input dtype from them. tests/test_cuda_backend.py checks them against the compiled numerics().
_INPUT_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# --------------------------------------------------------------------------------------------
# Where kernels run: the GPU (here) or the host emulator (tests/cuda_emulation), same interface.


def numerics() -> dict:
    """The CUDA kernels' numerical constants by name (csrc/common/field_numerics.h)."""
    return dict(_cuda_module().numerics())


def _cuda_module():
    try:
        return importlib.import_module("poissonflow._cuda")
    except ImportError as err:
        raise RuntimeError(
            "backend='cuda' is not available: poissonflow was installed without its CUDA kernels "
            "(poissonflow._cuda is missing). Reinstall with a CUDA compiler (nvcc) on PATH, e.g. "
            "`pip install .`, or use backend='triton' or 'cpu'."
        ) from err


@functools.cache
def _smem_limit(device_index: int) -> int:
    return int(_cuda_module().device_info(device_index)["smem_optin"])


class _DeviceRunner:
    """Launches kernels on `device` on the current torch CUDA stream of that device."""

    def __init__(self, device: torch.device):
        self.mod = _cuda_module()
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)

    def plan(self, mode: int, is_double: bool, D: int) -> dict:
        return self.mod.plan(mode, is_double, D, _smem_limit(self.index), 0)

    def launch(self, **args) -> None:
        args["device"] = self.index
        args["stream"] = torch.cuda.current_stream(self.device).cuda_stream
        self.mod.launch(**args)


def _require_cuda(**tensors) -> torch.device:
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {name} on {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if not torch.cuda.is_available():  # pragma: no cover - CUDA tensors imply a device
        raise RuntimeError("backend='cuda' needs a CUDA GPU; torch.cuda.is_available() is False")
    return device


# --------------------------------------------------------------------------------------------
# Buffers in the kernels' layout.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _DTYPES:
        raise TypeError(
            f"x has dtype {dtype}; the cuda backend takes float16, bfloat16, float32 or float64"
        )
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_stride(D: int, acc: torch.dtype) -> int:
    vec = 16 // torch.empty((), dtype=acc).element_size()
    return (D + vec - 1) // vec * vec


def _rows(t: torch.Tensor, acc: torch.dtype, ld: int, *, copy: bool = False) -> torch.Tensor:
    """`t` (R, D) as a contiguous (R, ld) buffer of the compute type, zero past column D."""
    t = t.detach()
    R, D = t.shape
    if ld == D:
        out = t.to(acc).contiguous()
        # The kernels load 16-byte packs: a view with an odd storage offset must be copied.
        if (copy and out.data_ptr() == t.data_ptr()) or out.data_ptr() % 16:
            out = out.clone()
        return out
    out = torch.zeros((R, ld), dtype=acc, device=t.device)
    out[:, :D] = t
    return out


def _vector(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(acc).contiguous()


def _per_query(t, n: int, acc: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """t0 / dt: a tensor of shape (N,) or a scalar broadcast to every query."""
    if isinstance(t, torch.Tensor):
        if t.ndim == 0:
            t = t.reshape(1).expand(n)
        if t.shape != (n,):
            raise ValueError(
                f"{name} must have shape ({n},) (one value per query), got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
        t = t.detach().to(acc).contiguous()
    else:
        t = torch.full((n,), float(t), dtype=acc, device=device)
    if n and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _out(buf: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns [0, D) of a padded kernel buffer as a contiguous tensor of `dtype`."""
    if buf.shape[1] == D and buf.dtype == dtype:
        return buf
    return buf[:, :D].to(dtype).contiguous()


def _log_wsum(w: torch.Tensor | None, B: int):
    return math.log(B) if w is None else torch.log(w.detach().double().sum())


class _Problem:
    """Inputs of one call in the kernels' layout (kept alive until the launches are enqueued)."""

    def __init__(self, x, y, w, exclude, eps_rows, power, eps, *, copy_x=False):
        self.dtype = x.dtype
        self.acc = _compute_dtype(x.dtype)
        self.N, self.D = x.shape
        self.B = y.shape[0]
        self.ld = _row_stride(self.D, self.acc)
        self.x = _rows(x, self.acc, self.ld, copy=copy_x)
        self.y = _rows(y, self.acc, self.ld)
        self.w = _vector(w, self.acc)
        self.exclude = None if exclude is None else exclude.detach().to(torch.int64).contiguous()
        self.eps_rows = _vector(eps_rows, self.acc)
        self.power = float(power)
        self.eps2 = float(eps) ** 2
        # The kernels floor r2 at the smallest normal number of the *input* dtype.
        self.input_dtype = _INPUT_DTYPE[x.dtype]

    def args(self, **extra) -> dict:
        a = dict(
            x=_addr(self.x),
            y=_addr(self.y),
            w=_addr(self.w),
            exclude=_addr(self.exclude),
            eps_rows=_addr(self.eps_rows),
            N=self.N,
            B=self.B,
            D=self.D,
            ld=self.ld,
            eps2=self.eps2,
            power=self.power,
            input_dtype=self.input_dtype,
            is_double=int(self.acc == torch.float64),
        )
        a.update(extra)
        return a

    def empty(self, *shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.acc, device=self.x.device)

    def forward(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        """(v as an (N, ld) buffer, lse2 (N,)) in the compute type."""
        v, lse2 = self.empty(self.N, self.ld), self.empty(self.N)
        if self.N:
            run.launch(**self.args(mode=MODE_FORWARD, v=_addr(v), lse2=_addr(lse2)))
        return v, lse2


# --------------------------------------------------------------------------------------------
# Implementations (runner-agnostic) and the protocol functions.


def _field_forward(run, x, y, w, power, eps, *, exclude=None, eps_rows=None):
    pb = _Problem(x, y, w, exclude, eps_rows, power, eps)
    v, lse2 = pb.forward(run)
    log_scale = (lse2.double() * _LN2 - _log_wsum(w, pb.B)).to(x.dtype)
    return _out(v, pb.D, x.dtype), log_scale


def _field_backward(
    run,
    x,
    y,
    w,
    power,
    eps,
    v,
    log_scale,
    gv,
    gl,
    *,
    need_x,
    need_y,
    need_w,
    exclude=None,
    eps_rows=None,
):
    if not (need_x or need_y or need_w):
        return None, None, None
    N, D = x.shape
    B = y.shape[0]
    if N == 0:  # no query: every sum over queries is empty
        return (
            x.new_zeros((0, D)) if need_x else None,
            y.new_zeros((B, D)) if need_y else None,
            y.new_zeros((B,)) if need_w else None,
        )
    pb = _Problem(x, y, w, exclude, eps_rows, power, eps)
    log_wsum = _log_wsum(w, B)
    if pb.acc == x.dtype:
        vb = _rows(v, pb.acc, pb.ld)
        lse2 = ((log_scale.detach().double() + log_wsum) / _LN2).to(pb.acc)
    else:
        # float16/bfloat16: v and log_scale arrive rounded to 8-11 bits, and pi = 2^(s - lse2)
        # would inherit an error of |log_scale| * 2^-8 in its exponent. Recompute both in float32.
        vb, lse2 = pb.forward(run)
    gvb = _rows(gv, pb.acc, pb.ld) if gv is not None else pb.empty(N, pb.ld).zero_()
    glb = _vector(gl, pb.acc)
    delta = (gvb * vb).sum(dim=1).contiguous()  # g_v,i . v_i
    common = dict(gv=_addr(gvb), lse2_in=_addr(lse2), delta=_addr(delta), gl=_addr(glb))
    gx = gy = gw = None
    if need_x:
        gxb = pb.empty(N, pb.ld)
        run.launch(**pb.args(mode=MODE_BACKWARD_X, gx=_addr(gxb), **common))
        gx = _out(gxb, D, x.dtype)
    if need_y or need_w:
        gyb = pb.empty(B, pb.ld) if need_y else None
        gws = pb.empty(B) if need_w else None
        run.launch(**pb.args(mode=MODE_BACKWARD_Y, gy=_addr(gyb), gwsum=_addr(gws), **common))
        if need_y:
            gy = _out(gyb, D, x.dtype)
        if need_w:
            # dL/dw_j = sum_i gs_ij / w_j - sum_i g_l,i / sum_k w_k
            gl_sum = gl.detach().double().sum() if gl is not None else 0.0
            wsum = w.detach().double().sum() if w is not None else float(B)
            gw = (gws.double() - gl_sum / wsum).to(x.dtype)
    return gx, gy, gw


def _flow_steps(run, x, y, w, t0, dt, n_steps, solver, *, exclude=None):
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {tuple(_SOLVERS)}, got {solver!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    N, d = x.shape
    pb = _Problem(x, y, w, exclude, None, d + 1, 0.0, copy_x=True)
    # Times in float64 on every path, as on the CPU: t0 + step * dt must keep the step's bits.
    t0b = _per_query(t0, N, torch.float64, x.device, "t0")
    dtb = _per_query(dt, N, torch.float64, x.device, "dt")
    if N == 0:
        return x.detach().clone()
    try:
        run.plan(MODE_FLOW, pb.acc == torch.float64, d)
    except ValueError:
        _flow_unfused(run, pb, t0b, dtb, n_steps, solver)
    else:
        comb = pb.empty(N, pb.ld) if solver == "rk4" else None
        run.launch(
            **pb.args(
                mode=MODE_FLOW,
                t0=_addr(t0b),
                dt=_addr(dtb),
                comb=_addr(comb),
                n_steps=n_steps,
                solver=_SOLVERS[solver],
            )
        )
    return _out(pb.x, d, x.dtype)


def _flow_unfused(run, pb: _Problem, t0, dt, n_steps: int, solver: str) -> None:
    """Flow for states wider than the fused kernel's window: one field pass per stage, the
    stage arithmetic in PyTorch. Updates pb.x in place; same t and z as the fused kernel."""

    from ..ode import integrate  # the package's one Python RK4 driver

    def velocity(state, t):
        pb.x, pb.eps_rows = state.contiguous(), torch.exp(t).to(pb.acc)
        return pb.forward(run)[0]

    # Stage times in float64 (z = e^t rounded once, to the compute type, per stage).
    pb.x = integrate(velocity, pb.x, t0.double(), dt.double(), n_steps, solver)
    pb.eps_rows = None


def field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None):
    """Field (v, log_scale) of charges y (B, D) at queries x (N, D) on the GPU.

    s_ij = log w_j - (p/2) log max(||x_i - y_j||^2 + e_i^2, tiny),  pi = softmax_j(s)
    v_i = sum_j pi_ij (x_i - y_j),  log_scale_i = logsumexp_j(s_ij) - log sum_j w_j
    """
    device = _require_cuda(x=x, y=y, w=w, exclude=exclude, eps_rows=eps_rows)
    return _field_forward(
        _DeviceRunner(device), x, y, w, power, eps, exclude=exclude, eps_rows=eps_rows
    )


def field_backward(
    x,
    y,
    w,
    power,
    eps,
    v,
    log_scale,
    gv,
    gl,
    *,
    need_x,
    need_y,
    need_w,
    exclude=None,
    eps_rows=None,
):
    """Gradients (dL/dx, dL/dy, dL/dw) of the field, given upstream gv (N, D) and gl (N,):

    gs_ij = pi_ij (gv_i . (x_i - y_j) - gv_i . v_i + gl_i)
    dL/dx_i = gv_i - p sum_j gs_ij (x_i - y_j) / r2_ij
    dL/dy_j = -sum_i pi_ij gv_i + p sum_i gs_ij (x_i - y_j) / r2_ij
    dL/dw_j = sum_i gs_ij / w_j - sum_i gl_i / sum_k w_k
    """
    device = _require_cuda(
        x=x, y=y, w=w, v=v, log_scale=log_scale, gv=gv, gl=gl, exclude=exclude, eps_rows=eps_rows
    )
    return _field_backward(
        _DeviceRunner(device),
        x,
        y,
        w,
        power,
        eps,
        v,
        log_scale,
        gv,
        gl,
        need_x=need_x,
        need_y=need_y,
        need_w=need_w,
        exclude=exclude,
        eps_rows=eps_rows,
    )


def flow_steps(x, y, w, t0, dt, n_steps, solver, *, exclude=None):
    """`n_steps` fused Euler or RK4 steps of dx/dt = v(x; eps_rows = e^t, power = d + 1) from
    t0 with step dt (per query), every stage of every step in one kernel launch."""
    device = _require_cuda(
        x=x,
        y=y,
        w=w,
        exclude=exclude,
        t0=t0 if isinstance(t0, torch.Tensor) else None,
        dt=dt if isinstance(dt, torch.Tensor) else None,
    )
    return _flow_steps(_DeviceRunner(device), x, y, w, t0, dt, n_steps, solver, exclude=exclude)
