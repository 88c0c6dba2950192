"""torch.library registrations of the Triton kernels (namespace "poissonflow").

    torch.ops.poissonflow.triton_field_fwd(x, y, w, power, eps, exclude, eps_rows)
        -> (v, log_scale, lse2, v_c)                              differentiable in x, y, w,
                                                                  eps_rows
    torch.ops.poissonflow.triton_field_bwd(x, y, w, power, eps, exclude, eps_rows, v, lse2,
                                           gv, gl, need_x, need_y, need_w, need_eps_rows)
        -> (gx, gy, gw, ge)                                       empty (0,) where not needed
    torch.ops.poissonflow.triton_flow_steps(x, y, w, t0, dt, n_steps, solver, exclude)
        -> x_end                                                  not differentiable

They are torch.library.triton_op: torch.compile sees the Triton kernels inside them (the
functions launch through wrap_triton and are make_fx-traceable). Two auxiliary outputs serve
the backward and are marked non-differentiable: lse2, the log-sum-exp of the scores in log2
units (float32, or float64 for float64 input), from which the softmax weights are recomputed,
and v_c, v in float32 for float16/bfloat16 input (an empty (0,) tensor otherwise), from which
delta_i = g_i . v_i is formed (the rounded v would spoil it). Backward of backward is not
implemented (first-order gradients only).

Arguments are not validated here: callers run poissonflow._checks (and the checks of
poissonflow.triton's protocol functions) first. Importing this module imports triton and
registers the ops; under TRITON_INTERPRET=1 (CPU tensors) the explicit fake implementations let
Dynamo trace the ops, which triton_op's own fake (the kernel launch traced on fake tensors)
cannot do through the interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._field_bwd import field_backward_launch
from ._field_fwd import compute_dtype, field_forward_launch
from ._flow import flow_steps_launch

__all__ = ["triton_field_fwd", "triton_field_bwd", "triton_flow_steps"]

# torch.library.triton_op needs torch >= 2.6; older torch gets an opaque custom op with the same
# schema, fake and autograd (torch.compile then treats the kernels as a black box).
triton_op = getattr(torch.library, "triton_op", None) or torch.library.custom_op


@triton_op("poissonflow::triton_field_fwd", mutates_args=())
def triton_field_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    w: Optional[torch.Tensor],
    power: float,
    eps: float,
    exclude: Optional[torch.Tensor],
    eps_rows: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    v, log_scale, lse2, v_c = field_forward_launch(x, y, w, power, eps, exclude, eps_rows)
    if v_c is None:
        v_c = x.new_empty((0,), dtype=lse2.dtype)
    return v, log_scale, lse2, v_c


def _half_input(x: torch.Tensor) -> bool:
    return compute_dtype(x.dtype) != x.dtype


@triton_field_fwd.register_fake
def _triton_field_fwd_fake(x, y, w, power, eps, exclude, eps_rows):
    N, D = x.shape
    cdt = compute_dtype(x.dtype)
    return (
        x.new_empty((N, D)),
        x.new_empty((N,)),
        x.new_empty((N,), dtype=cdt),
        x.new_empty((N, D) if _half_input(x) else (0,), dtype=cdt),
    )


@triton_op("poissonflow::triton_field_bwd", mutates_args=())
def triton_field_bwd(
    x: torch.Tensor,
    y: torch.Tensor,
    w: Optional[torch.Tensor],
    power: float,
    eps: float,
    exclude: Optional[torch.Tensor],
    eps_rows: Optional[torch.Tensor],
    v: torch.Tensor,
    lse2: torch.Tensor,
    gv: Optional[torch.Tensor],
    gl: Optional[torch.Tensor],
    need_x: bool,
    need_y: bool,
    need_w: bool,
    need_eps_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = field_backward_launch(
        x, y, w, power, eps, lse2, v, gv, gl, need_x=need_x, need_y=need_y, need_w=need_w,
        need_eps_rows=need_eps_rows, exclude=exclude, eps_rows=eps_rows,
    )
    return tuple(x.new_empty((0,)) if g is None else g for g in grads)


@triton_field_bwd.register_fake
def _triton_field_bwd_fake(x, y, w, power, eps, exclude, eps_rows, v, lse2, gv, gl, need_x,
                           need_y, need_w, need_eps_rows):
    empty = x.new_empty((0,))
    return (
        x.new_empty(x.shape) if need_x else empty,
        y.new_empty(y.shape) if need_y else empty,
        w.new_empty(w.shape) if (need_w and w is not None) else empty,
        eps_rows.new_empty(eps_rows.shape) if (need_eps_rows and eps_rows is not None) else empty,
    )


def _setup_fwd_context(ctx, inputs, output):
    x, y, w, power, eps, exclude, eps_rows = inputs
    v, _, lse2, v_c = output
    ctx.save_for_backward(x, y, w, exclude, eps_rows, v_c if _half_input(x) else v, lse2)
    ctx.power = power
    ctx.eps = eps
    ctx.mark_non_differentiable(lse2, v_c)


def _fwd_backward(ctx, gv, gl, _glse2, _gv_c):
    x, y, w, exclude, eps_rows, v, lse2 = ctx.saved_tensors
    need_x, need_y, need_w, _, _, _, need_e = ctx.needs_input_grad
    need_w = need_w and w is not None
    need_e = need_e and eps_rows is not None
    gx, gy, gw, ge = torch.ops.poissonflow.triton_field_bwd(
        x, y, w, ctx.power, ctx.eps, exclude, eps_rows, v, lse2, gv, gl,
        need_x, need_y, need_w, need_e,
    )
    return (
        gx if need_x else None,
        gy if need_y else None,
        gw if need_w else None,
        None,
        None,
        None,
        ge if need_e else None,
    )


triton_field_fwd.register_autograd(_fwd_backward, setup_context=_setup_fwd_context)


@triton_op("poissonflow::triton_flow_steps", mutates_args=())
def triton_flow_steps(
    x: torch.Tensor,
    y: torch.Tensor,
    w: Optional[torch.Tensor],
    t0: torch.Tensor,
    dt: torch.Tensor,
    n_steps: int,
    solver: str,
    exclude: Optional[torch.Tensor],
) -> torch.Tensor:
    return flow_steps_launch(x, y, w, t0, dt, n_steps, solver, exclude)


@triton_flow_steps.register_fake
def _triton_flow_steps_fake(x, y, w, t0, dt, n_steps, solver, exclude):
    return x.new_empty(x.shape)
