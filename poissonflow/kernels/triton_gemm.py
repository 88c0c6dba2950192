"""The `triton-gemm` backend: the field with r2 in GEMM form on tensor cores and a certified
error (docs/DESIGN.md, "A tensor-core field with a certified error"), the backend protocol of
docs/ARCHITECTURE.md.

    field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None) -> (v, log_scale)
    field_backward(...)   the exact Triton backward (poissonflow.kernels.triton.field_backward)
    flow_steps(...)       the exact Triton flow kernel (poissonflow.kernels.triton.flow_steps)

The forward is poissonflow.kernels.triton._gemm.gemm_field_forward at TF32 with its defaults: every
row is either certified within a tenth of the float32 tolerance of poissonflow.testing against
the same field with exact r2, or recomputed by the exact kernel in the same launch. The
backward recomputes the softmax weights from the forward's log_scale by direct differences,
exactly as for backend="triton" (the GEMM form is a forward-only algorithm here), and the
fused flow is the exact kernel's. float64 inputs go to the exact kernels (the GEMM form is a
float32 algorithm). The op pair poissonflow::field_triton_gemm lives in
poissonflow.kernels.triton.gemm_ops. Importing this module imports neither triton nor the kernels.
"""

from __future__ import annotations

import importlib

import torch

from .triton import _check_rows, _check_runnable
from .triton import field_backward as _exact_backward
from .triton import field_forward as _exact_forward
from .triton import flow_steps as _exact_flow

__all__ = ["field_forward", "field_backward", "flow_steps", "forward_outputs"]


def _kernel():
    return importlib.import_module("poissonflow.kernels.triton._gemm")


def forward_outputs(x, y, w, power, eps, exclude=None, eps_rows=None):
    """(v, log_scale) without checks (the op's body; traceable, no host synchronisation)."""
    if x.dtype == torch.float64:
        from .triton._field_fwd import field_forward_launch

        v, ls, _, _ = field_forward_launch(x, y, w, float(power), float(eps), exclude, eps_rows)
        return v, ls
    res = _kernel().gemm_field_forward(x, y, w, float(power), float(eps), exclude, eps_rows)
    return res.v, res.log_scale


def field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None):
    """Field (v, log_scale) with r2 in GEMM form, certified or recomputed per row."""
    _check_runnable(x)
    _check_rows(exclude, "exclude", x, integer=True)
    _check_rows(eps_rows, "eps_rows", x)
    if x.dtype == torch.float64:
        return _exact_forward(x, y, w, power, eps, exclude=exclude, eps_rows=eps_rows)
    return forward_outputs(x, y, w, power, eps, exclude, eps_rows)


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
    """The exact Triton backward from this forward's outputs (docs/DESIGN.md, "A tensor-core field
    with a certified error")."""
    return _exact_backward(
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
    """The exact Triton flow kernel (the GEMM form is not fused into the flow yet)."""
    return _exact_flow(x, y, w, t0, dt, n_steps, solver, exclude=exclude)
