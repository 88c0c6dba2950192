"""The Triton backend: the backend protocol of docs/ARCHITECTURE.md on Triton kernels.

    field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None) -> (v, log_scale)
    field_backward(x, y, w, power, eps, v, log_scale, gv, gl, *, need_x, need_y, need_w,
                   exclude=None, eps_rows=None) -> (gx | None, gy | None, gw | None)
    flow_steps(x, y, w, t0, dt, n_steps, solver, *, exclude=None) -> x_end

with r2_ij = max(||x_i - y_j||^2 + e_i^2, tiny), s_ij = log w_j - (p/2) log r2_ij,
pi = softmax_j(s), v_i = sum_j pi_ij (x_i - y_j), log_scale_i = logsumexp_j s_ij - log sum_j w_j.
Inputs are validated by poissonflow._checks before these are called; here only what is specific
to this backend is checked (dtype, device, the optional per-query tensors).

The kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter when
TRITON_INTERPRET=1 is set before the kernels are first imported (triton reads it when the
kernels are decorated). float16/bfloat16/float32 inputs are computed in float32, float64 inputs
in float64; outputs are in the input dtype. The r2 floor `tiny` is the smallest normal number of
the input dtype. The differentiable op poissonflow::field_triton (torch.library.triton_op,
traceable by torch.compile; same schema and backward as poissonflow::field) lives in
poissonflow.kernels.triton.ops.

Importing this package imports neither triton nor the kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers

import torch

__all__ = ["available", "field_forward", "field_backward", "flow_steps"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SOLVERS = ("euler", "rk4")


def available() -> bool:
    """True when triton is installed and there is a CUDA device or TRITON_INTERPRET=1 (the
    registry's probe, poissonflow/registry.py)."""
    from ... import registry

    return registry.available("triton")


def _kernels(name: str):
    """Imports one kernel module (and triton) on first use."""
    if importlib.util.find_spec("triton") is None:
        raise ImportError(
            "backend='triton' needs the triton package: pip install 'poissonflow[triton]'"
        )
    return importlib.import_module(f"poissonflow.kernels.triton.{name}")


def _check_runnable(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; the triton backend takes float16, bfloat16, float32 or float64"
        )
    fwd = _kernels("_field_fwd")
    if x.device.type == "cuda":
        return
    if x.device.type != "cpu":
        raise ValueError(f"backend='triton' runs on CUDA tensors, got x on {x.device}")
    if fwd.INTERPRETED:
        return
    if fwd.interpreter_requested():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after poissonflow's Triton kernels were imported "
            "(they were compiled for the GPU): set it before the first use of backend='triton'"
        )
    raise ValueError(
        "backend='triton' runs on CUDA tensors, got x on cpu (set TRITON_INTERPRET=1 before "
        "first use to run the kernels on CPU tensors through Triton's interpreter, for testing)"
    )


def _check_rows(t, name: str, x: torch.Tensor, *, integer: bool = False) -> None:
    """An optional per-query tensor: shape (N,), on x's device, integer or floating."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must have shape ({x.shape[0]},) (one per query), got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (charge indices), got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None):
    """Field (v, log_scale) of charges y (weights w or None) at queries x; see the module doc.

    exclude (N,) int: a charge index each query ignores (-1: none); eps_rows (N,): per-query
    softening replacing eps. A row with no reachable charge gets v = 0, log_scale = -inf.
    """
    _check_runnable(x)
    _check_rows(exclude, "exclude", x, integer=True)
    _check_rows(eps_rows, "eps_rows", x)
    v, log_scale, _, _ = _kernels("_field_fwd").field_forward_launch(
        x, y, w, float(power), float(eps), exclude, eps_rows
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
):
    """(dL/dx, dL/dy, dL/dw) of the field from its forward outputs (v, log_scale) and upstream
    gradients gv (N, D) and gl (N,), either None for zero; an output is None unless asked for
    (dL/dw also when w is None). The softmax weights are recomputed from
    lse_i = log_scale_i + log sum_k w_k (docs/ARCHITECTURE.md gives the formulas).
    """
    _check_runnable(x)
    _check_rows(exclude, "exclude", x, integer=True)
    _check_rows(eps_rows, "eps_rows", x)
    N, D = x.shape
    if gv is not None and gv.shape != (N, D):
        raise ValueError(f"gv must have shape {(N, D)} like v, got {tuple(gv.shape)}")
    if gl is not None and gl.shape != (N,):
        raise ValueError(f"gl must have shape ({N},) like log_scale, got {tuple(gl.shape)}")
    gx, gy, gw = backward_from_outputs(
        x, y, w, power, eps, exclude, eps_rows, v, log_scale, gv, gl, need_x, need_y, need_w
    )
    return gx, gy, gw


def backward_from_outputs(
    x, y, w, power, eps, exclude, eps_rows, v, log_scale, gv, gl, need_x, need_y, need_w
):
    """The backward kernels from the forward's outputs (v, log_scale): the one implementation
    behind field_backward above and the op poissonflow::field_triton_backward (no checks here:
    traceable by make_fx, as torch.library.triton_op requires).

    float32/float64 input: lse_i = log_scale_i + log sum_k w_k (in float64, then in log2 units
    of the compute dtype), from which the kernels recompute the softmax weights. float16 and
    bfloat16 input: v and log_scale arrive rounded to 8-11 bits, and pi = 2^(s - lse2) would
    inherit an error of |log_scale| 2^-8 in its exponent, delta_i = g_i . v_i the rounding of v;
    the forward is recomputed in float32 instead (as the CUDA backend does), one extra pass.
    """
    fwd = _kernels("_field_fwd")
    cdt = fwd.compute_dtype(x.dtype)
    if cdt != x.dtype:
        _, _, lse2, v = fwd.field_forward_launch(
            x, y, w, float(power), float(eps), exclude, eps_rows
        )
    else:
        _, log_wsum = fwd.charge_terms(y, w, cdt)
        lse2 = ((log_scale.detach().to(torch.float64) + log_wsum) / math.log(2.0)).to(cdt)
    return _kernels("_field_bwd").field_backward_launch(
        x,
        y,
        w,
        float(power),
        float(eps),
        lse2,
        v,
        gv,
        gl,
        need_x=bool(need_x),
        need_y=bool(need_y),
        need_w=bool(need_w),
        exclude=exclude,
        eps_rows=eps_rows,
    )


def flow_steps(x, y, w, t0, dt, n_steps, solver, *, exclude=None):
    """End state of n_steps of the Poisson flow dx/dt = v(x; eps_rows = e^t, power = d + 1)
    from per-query log-heights t0 with per-query steps dt (any sign); solver "euler" or "rk4".
    t0 and dt are taken in float64 by the kernel (the stage times are formed in float64; the
    heights and the step enter the state update in the compute dtype).
    """
    _check_runnable(x)
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if t0 is None or dt is None:
        raise ValueError("t0 and dt must be given (one start log-height and step per query)")
    _check_rows(t0, "t0", x)
    _check_rows(dt, "dt", x)
    _check_rows(exclude, "exclude", x, integer=True)
    return _kernels("_flow").flow_steps_launch(x, y, w, t0, dt, int(n_steps), solver, exclude)
