"""The field as torch operators: `poissonflow::field` and `poissonflow::field_backward`.

Both are `torch.library.custom_op`s with fake (meta) implementations, so torch.compile and meta
tensors see opaque kernels with known shapes; `register_autograd` links them, so gradients flow
to the queries, the charges and the weights. The backward op recomputes the softmax weights
from the forward's log_scale (nothing N x B is saved). Second derivatives are not provided: the
backward op has no autograd of its own and says so if asked.

The kernel behind each op is chosen by the `backend` argument, already resolved by
`poissonflow.field` ("cpu" or "cuda"); every backend module implements the protocol of
docs/ARCHITECTURE.md. The Triton backend registers its own ops (poissonflow/triton/ops.py)
through `torch.library.triton_op`, so that torch.compile can trace into its kernels.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

__all__ = ["field", "backend_module"]

_BACKEND_MODULES = {"cpu": "poissonflow._cpu", "cuda": "poissonflow._cuda_backend"}


def backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


@torch.library.custom_op("poissonflow::field", mutates_args=())
def field(
    x: Tensor,
    charges: Tensor,
    weights: Optional[Tensor],
    power: float,
    eps: float,
    exclude: Optional[Tensor],
    eps_rows: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(v, log_scale) of the charges at x; see poissonflow.poisson_field."""
    return backend_module(backend).field_forward(
        x, charges, weights, power, eps, exclude=exclude, eps_rows=eps_rows
    )


@field.register_fake
def _field_fake(x, charges, weights, power, eps, exclude, eps_rows, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1])


@torch.library.custom_op("poissonflow::field_backward", mutates_args=())
def field_backward(
    x: Tensor,
    charges: Tensor,
    weights: Optional[Tensor],
    power: float,
    eps: float,
    exclude: Optional[Tensor],
    eps_rows: Optional[Tensor],
    v: Tensor,
    log_scale: Tensor,
    grad_v: Optional[Tensor],
    grad_log_scale: Optional[Tensor],
    need_x: bool,
    need_charges: bool,
    need_weights: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for x, charges, weights; the ones not needed are empty (0,) tensors."""
    need_weights = need_weights and weights is not None
    gx, gy, gw = backend_module(backend).field_backward(
        x, charges, weights, power, eps, v, log_scale, _as_grad(grad_v, x),
        _as_grad(grad_log_scale, x), need_x=need_x, need_y=need_charges, need_w=need_weights,
        exclude=exclude, eps_rows=eps_rows,
    )
    empty = x.new_empty((0,))
    return (
        gx if gx is not None else empty,
        gy if gy is not None else empty.clone(),
        gw if gw is not None else empty.clone(),
    )


def _as_grad(g: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Upstream gradients may arrive strided (expanded views) or in another dtype: the kernels
    take them contiguous and in the inputs' dtype."""
    if g is None:
        return None
    return g.to(like.dtype).contiguous()


@field_backward.register_fake
def _field_backward_fake(
    x, charges, weights, power, eps, exclude, eps_rows, v, log_scale, grad_v, grad_log_scale,
    need_x, need_charges, need_weights, backend,
):
    need_weights = need_weights and weights is not None
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        charges.new_empty(charges.shape) if need_charges else x.new_empty((0,)),
        weights.new_empty(weights.shape) if need_weights else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, charges, weights, power, eps, exclude, eps_rows, backend = inputs
    v, log_scale = output
    ctx.save_for_backward(x, charges, weights, exclude, eps_rows, v, log_scale)
    ctx.power, ctx.eps, ctx.backend = power, eps, backend


def _backward(ctx, grad_v, grad_log_scale):
    x, charges, weights, exclude, eps_rows, v, log_scale = ctx.saved_tensors
    need_x, need_y, need_w = ctx.needs_input_grad[:3]
    gx, gy, gw = field_backward(
        x, charges, weights, ctx.power, ctx.eps, exclude, eps_rows, v, log_scale,
        grad_v, grad_log_scale, need_x, need_y, bool(need_w and weights is not None),
        ctx.backend,
    )
    return (
        gx if need_x else None,
        gy if need_y else None,
        gw if (need_w and weights is not None) else None,
        None, None, None, None, None,
    )


field.register_autograd(_backward, setup_context=_setup_context)
