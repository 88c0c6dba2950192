"""Thin calls into the C++ CPU kernels: allocate outputs, pass addresses, nothing else.

Callers have validated the arguments (poissonflow._checks); here tensors are only made
contiguous (a copy for strided views) and handed over by address with their sizes, as keyword
arguments named after the fields of the kernels' argument struct (csrc/common/field_args.h).
"""

from __future__ import annotations

import numbers

import torch

from .._ext import cpu_broadcasts, cpu_module, cpu_weight_form, default_cpu_isa

_CPU_DTYPES = (torch.float32, torch.float64)


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# Pair-dimensions of work per thread below which another thread is not woken: waking an OpenMP
# thread costs tens of microseconds on an idle machine and a whole scheduler time slice (ms) on
# a busy one, more than ~0.1 ms of kernel work saves. Results do not depend on the thread count.
WORK_PER_THREAD = 2**21


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // WORK_PER_THREAD))


def check_cpu_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _CPU_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; the cpu backend computes in float32 or float64 "
            "(convert with x.float(), or use backend='reference')"
        )


def field_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    power: float,
    eps: float,
    *,
    exclude: torch.Tensor | None = None,
    eps_rows: torch.Tensor | None = None,
    isa: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_cpu_dtype(x)
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    w = None if w is None else w.detach().contiguous()
    N, D = x.shape
    B = y.shape[0]
    v = torch.empty((N, D), dtype=x.dtype)
    log_scale = torch.empty((N,), dtype=x.dtype)
    if N == 0:
        return v, log_scale
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()
    eps2_rows = None if eps_rows is None else (eps_rows.detach().to(x.dtype) ** 2).contiguous()
    cpu_module().field_forward(
        x=_addr(x),
        y=_addr(y),
        w=_addr(w),
        exclude=_addr(exclude),
        eps2_rows=_addr(eps2_rows),
        N=N,
        B=B,
        D=D,
        power=float(power),
        eps2=float(eps) ** 2,
        is_double=x.dtype == torch.float64,
        v=_addr(v),
        log_scale=_addr(log_scale),
        num_threads=_threads(N * B * D),
        isa=isa or default_cpu_isa(),
        weight_form=cpu_weight_form(),
        broadcasts=cpu_broadcasts(),
    )
    return v, log_scale


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
    isa=None,
):
    """Gradients (dL/dx, dL/dy, dL/dw) of L with dL/dv = gv, dL/dlog_scale = gl (None: zero).

    Inputs must be those of the forward call that produced v and log_scale; outputs not asked
    for are None and cost nothing.
    """
    check_cpu_dtype(x)
    dt = x.dtype

    def prep(t):
        return None if t is None else t.detach().to(dt).contiguous()

    x, y, w, v, log_scale, gv, gl = map(prep, (x, y, w, v, log_scale, gv, gl))
    N, D = x.shape
    B = y.shape[0]
    gx = torch.empty((N, D), dtype=dt) if need_x else None
    gy = torch.empty((B, D), dtype=dt) if need_y else None
    gw = torch.empty((B,), dtype=dt) if (need_w and w is not None) else None
    if N == 0:
        if gy is not None:
            gy.zero_()
        if gw is not None:
            gw.zero_()
        return gx, gy, gw
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()
    eps2_rows = None if eps_rows is None else (eps_rows.detach().to(dt) ** 2).contiguous()
    cpu_module().field_backward(
        x=_addr(x),
        y=_addr(y),
        w=_addr(w),
        exclude=_addr(exclude),
        eps2_rows=_addr(eps2_rows),
        N=N,
        B=B,
        D=D,
        power=float(power),
        eps2=float(eps) ** 2,
        is_double=dt == torch.float64,
        v=_addr(v),
        log_scale=_addr(log_scale),
        gv=_addr(gv),
        gl=_addr(gl),
        gx=_addr(gx),
        gy=_addr(gy),
        gw=_addr(gw),
        num_threads=_threads(2 * N * B * D),
        isa=isa or default_cpu_isa(),
        weight_form=cpu_weight_form(),
        broadcasts=cpu_broadcasts(),
    )
    return gx, gy, gw


SOLVERS = {"euler": 0, "rk4": 1}


def flow_steps(x, y, w, t0, dt, n_steps, solver, *, exclude=None, isa=None):
    """End states after `n_steps` fused Euler/RK4 steps of dx/dt = v(x; z = e^t, p = d + 1)
    from log-heights t0 (N,) with steps dt (N,); one call, each query tile carried through all
    steps and stages inside the kernel."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    check_cpu_dtype(x)
    x = x.detach().contiguous()
    y = y.detach().to(x.dtype).contiguous()
    w = None if w is None else w.detach().to(x.dtype).contiguous()
    N, D = x.shape
    out = torch.empty_like(x)
    if N == 0:
        return out
    t0 = torch.as_tensor(t0, dtype=torch.float64).expand(N).contiguous()
    dt = torch.as_tensor(dt, dtype=torch.float64).expand(N).contiguous()
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()
    cpu_module().flow_steps(
        x=_addr(x),
        y=_addr(y),
        w=_addr(w),
        exclude=_addr(exclude),
        N=N,
        B=y.shape[0],
        D=D,
        power=float(D + 1),
        is_double=x.dtype == torch.float64,
        t0=_addr(t0),
        dt=_addr(dt),
        n_steps=int(n_steps),
        solver=SOLVERS[solver],
        x_out=_addr(out),
        num_threads=_threads(N * y.shape[0] * D * int(n_steps) * (4 if solver == "rk4" else 1)),
        isa=isa or default_cpu_isa(),
        weight_form=cpu_weight_form(),
        broadcasts=cpu_broadcasts(),
    )
    return out


def numerics() -> dict:
    """The CPU kernels' numerical constants by name (csrc/common/field_numerics.h)."""
    return dict(cpu_module().numerics())
