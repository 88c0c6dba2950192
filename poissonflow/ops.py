"""The field as torch operators: one schema, one saved state, one backward for every backend.

    torch.ops.poissonflow.field(x, charges, weights, power, eps, exclude, eps_rows)
        -> (v, log_scale)
    torch.ops.poissonflow.field_backward(x, charges, weights, power, eps, exclude, eps_rows,
                                         v, log_scale, grad_v, grad_log_scale,
                                         need_x, need_charges, need_weights)
        -> (gx, gy, gw)                      an empty (0,) tensor where not needed

`poissonflow::field` is dispatched by device: every registry entry whose `op` is "field"
(poissonflow/registry.py: the C++ kernels for CPU tensors, the CUDA kernels for CUDA tensors)
has its protocol functions registered as the op's kernels for its devices
(`register_kernel`). A backend that must be chosen explicitly on a device another backend
already serves (Triton on CUDA tensors) gets its own pair with the same schema, built by
`define_field_ops` here, so the saved state (the inputs, v and log_scale) and the backward
formula are the same: poissonflow/kernels/triton/ops.py builds `poissonflow::field_triton` as a
`torch.library.triton_op`, so that torch.compile can trace into its kernels.

Every pair has a fake (meta) implementation, so torch.compile and meta tensors see ops with
known shapes, and one autograd registration (`_setup_context`, `_backward`): gradients reach the
queries, the charges, the weights and the per-query softening eps_rows. The backward kernels
compute dL/dx, dL/dy, dL/dw; dL/d eps_rows comes from the same kernels on the augmented problem
x~ = (x, e), y~ = (y, 0) in D + 1 dimensions with eps_rows = 0, whose squared distances
||x~_i - y~_j||^2 = ||x_i - y_j||^2 + e_i^2 are those of the original one: the last column of
dL/dx~ is dL/de (docs/DESIGN.md, "The field operator"). The backward recomputes the softmax weights
from
the forward's log_scale; nothing N x B is saved. Second derivatives are not provided.

`field(..., backend)` is the Python entry point: it resolves the backend through the registry
and calls the right op (or, for "reference", the differentiable pure-PyTorch field).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from . import registry

__all__ = [
    "field",
    "define_field_ops",
    "FieldOps",
    "field_op",
    "backward_op",
    "gradients",
    "protocol_backward",
]


# -------------------------------------------------------------------------------------------
# Shared pieces of every op pair: fakes, autograd


def _field_fake(x, charges, weights, power, eps, exclude, eps_rows):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1])


def _backward_fake(
    x,
    charges,
    weights,
    power,
    eps,
    exclude,
    eps_rows,
    v,
    log_scale,
    grad_v,
    grad_log_scale,
    need_x,
    need_charges,
    need_weights,
):
    need_weights = need_weights and weights is not None
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        charges.new_empty(charges.shape) if need_charges else x.new_empty((0,)),
        weights.new_empty(weights.shape) if need_weights else x.new_empty((0,)),
    )


def _as_grad(g: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Upstream gradients may arrive strided (expanded views) or in another dtype: the kernels
    take them contiguous and in the inputs' dtype."""
    if g is None:
        return None
    return g.to(like.dtype).contiguous()


def _setup_context(ctx, inputs, output):
    x, charges, weights, power, eps, exclude, eps_rows = inputs
    v, log_scale = output
    ctx.save_for_backward(x, charges, weights, exclude, eps_rows, v, log_scale)
    ctx.power, ctx.eps = power, eps


def drop_dead_rows(log_scale, grad_v, grad_log_scale):
    """Upstream gradients with the rows no charge reaches set to 0. Such a row's outputs are
    constants (v = 0, log_scale = -inf, whatever the inputs), so its gradients carry nothing:
    dropped here, before any kernel runs, they give dL/dx = 0 on that row (the kernels' g_v
    term) and stay out of the -sum_i g_l,i / sum_k w_k term of dL/dw."""
    dead = torch.isneginf(log_scale)
    if grad_v is not None:
        grad_v = torch.where(dead[:, None], torch.zeros_like(grad_v), grad_v)
    if grad_log_scale is not None:
        grad_log_scale = torch.where(dead, torch.zeros_like(grad_log_scale), grad_log_scale)
    return grad_v, grad_log_scale


def gradients(
    backward,
    x,
    charges,
    weights,
    power,
    eps,
    exclude,
    eps_rows,
    v,
    log_scale,
    grad_v,
    grad_log_scale,
    need_x,
    need_y,
    need_w,
    need_e,
):
    """(dL/dx, dL/dy, dL/dw, dL/d eps_rows), each None unless asked for, from `backward` (a
    callable with the backward op's arguments and results, e.g. the op itself). The one
    backward formula of every op pair (docs/DESIGN.md, "The field operator"): dL/d eps_rows, when
    asked
    for, comes with dL/dx from one pass on the augmented problem (see the module docstring),
    whose dL/dy~ holds dL/dy in its first D columns."""
    need_w = bool(need_w and weights is not None)
    need_e = bool(need_e and eps_rows is not None)
    grad_v, grad_log_scale = drop_dead_rows(log_scale, grad_v, grad_log_scale)
    ge = None
    if need_e:
        xa = torch.cat([x, eps_rows.to(x.dtype)[:, None]], dim=1)
        ya = torch.cat([charges, charges.new_zeros((charges.shape[0], 1))], dim=1)
        va = torch.cat([v, eps_rows.to(v.dtype)[:, None]], dim=1)
        gva = None
        if grad_v is not None:
            gva = torch.cat([grad_v, grad_v.new_zeros((grad_v.shape[0], 1))], dim=1)
        gxa, gya, gw = backward(
            xa,
            ya,
            weights,
            power,
            0.0,
            exclude,
            None,
            va,
            log_scale,
            gva,
            grad_log_scale,
            True,
            need_y,
            need_w,
        )
        gx, ge = gxa[:, :-1], gxa[:, -1].to(eps_rows.dtype)
        gy = gya[:, :-1] if need_y else None
    else:
        gx, gy, gw = backward(
            x,
            charges,
            weights,
            power,
            eps,
            exclude,
            eps_rows,
            v,
            log_scale,
            grad_v,
            grad_log_scale,
            need_x,
            need_y,
            need_w,
        )
    return (
        gx if need_x else None,
        gy if need_y else None,
        gw if need_w else None,
        ge,
    )


def _make_backward(get_backward_op: Callable[[], Callable]):
    def _backward(ctx, grad_v, grad_log_scale):
        x, charges, weights, exclude, eps_rows, v, log_scale = ctx.saved_tensors
        need_x, need_y, need_w, _, _, _, need_e = ctx.needs_input_grad
        gx, gy, gw, ge = gradients(
            get_backward_op(),
            x,
            charges,
            weights,
            ctx.power,
            ctx.eps,
            exclude,
            eps_rows,
            v,
            log_scale,
            grad_v,
            grad_log_scale,
            need_x,
            need_y,
            need_w,
            need_e,
        )
        return gx, gy, gw, None, None, None, ge

    return _backward


def protocol_backward(field_backward):
    """A protocol `field_backward` (docs/ARCHITECTURE.md) as a callable with the backward op's
    arguments and results (for `gradients`)."""
    return _normalised_backward(_protocol_adapter(field_backward))


def _protocol_adapter(field_backward):
    def impl(
        x,
        charges,
        weights,
        power,
        eps,
        exclude,
        eps_rows,
        v,
        log_scale,
        gv,
        gl,
        need_x,
        need_y,
        need_w,
    ):
        return field_backward(
            x,
            charges,
            weights,
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

    return impl


def _normalised_backward(bwd_impl):
    """The backward op's body around a backend's implementation: upstream gradients contiguous
    in the inputs' dtype, gradients not computed as empty (0,) tensors (an op returns tensors)."""

    def body(
        x,
        charges,
        weights,
        power,
        eps,
        exclude,
        eps_rows,
        v,
        log_scale,
        grad_v,
        grad_log_scale,
        need_x,
        need_charges,
        need_weights,
    ):
        need_weights = need_weights and weights is not None
        gx, gy, gw = bwd_impl(
            x,
            charges,
            weights,
            power,
            eps,
            exclude,
            eps_rows,
            v,
            log_scale,
            _as_grad(grad_v, x),
            _as_grad(grad_log_scale, x),
            need_x,
            need_charges,
            need_weights,
        )
        empty = x.new_empty((0,))
        return (
            gx if gx is not None else empty,
            gy if gy is not None else empty.clone(),
            gw if gw is not None else empty.clone(),
        )

    return body


class FieldOps:
    """The forward and backward op of one pair; `register_device` adds per-device kernels."""

    def __init__(self, forward, backward):
        self.forward, self.backward = forward, backward

    def register_device(self, device: str, forward_impl, backward_impl) -> None:
        self.forward.register_kernel(device, forward_impl)
        self.backward.register_kernel(device, _normalised_backward(backward_impl))


def define_field_ops(
    name: str, forward_impl=None, backward_impl=None, *, decorator=torch.library.custom_op
) -> FieldOps:
    """Defines the pair `poissonflow::<name>` / `poissonflow::<name>_backward` with the schema of
    the module docstring, their fakes and the shared autograd.

    forward_impl(x, y, w, power, eps, exclude, eps_rows) -> (v, log_scale) and
    backward_impl(x, y, w, power, eps, exclude, eps_rows, v, log_scale, gv, gl, need_x,
    need_y, need_w) -> (gx | None, gy | None, gw | None); None for either: no default kernel
    (kernels are then added per device with `FieldOps.register_device`). `decorator` is
    torch.library.custom_op or torch.library.triton_op.
    """

    def _no_kernel(x, *args):
        raise NotImplementedError(
            f"poissonflow::{name} has no kernel for tensors on {x.device}: see "
            "poissonflow.backends() for what runs here"
        )

    fwd_impl = forward_impl or _no_kernel
    bwd_body = _normalised_backward(backward_impl or _no_kernel)

    def forward(
        x: Tensor,
        charges: Tensor,
        weights: Optional[Tensor],
        power: float,
        eps: float,
        exclude: Optional[Tensor],
        eps_rows: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        return fwd_impl(x, charges, weights, power, eps, exclude, eps_rows)

    def backward(
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients for x, charges, weights; the ones not needed are empty (0,) tensors."""
        return bwd_body(
            x,
            charges,
            weights,
            power,
            eps,
            exclude,
            eps_rows,
            v,
            log_scale,
            grad_v,
            grad_log_scale,
            need_x,
            need_charges,
            need_weights,
        )

    fwd_op = decorator(f"poissonflow::{name}", forward, mutates_args=())
    bwd_op = decorator(f"poissonflow::{name}_backward", backward, mutates_args=())
    fwd_op.register_fake(_field_fake)
    bwd_op.register_fake(_backward_fake)
    fwd_op.register_autograd(_make_backward(lambda: bwd_op), setup_context=_setup_context)
    return FieldOps(fwd_op, bwd_op)


# -------------------------------------------------------------------------------------------
# The device-dispatched pair: kernels from the registry


def _protocol_forward(backend: str):
    def kernel(x, charges, weights, power, eps, exclude, eps_rows):
        return (
            registry.get(backend)
            .module()
            .field_forward(x, charges, weights, power, eps, exclude=exclude, eps_rows=eps_rows)
        )

    return kernel


def _protocol_backward(backend: str):
    def kernel(*args):
        return _protocol_adapter(registry.get(backend).module().field_backward)(*args)

    return kernel


_FIELD = define_field_ops("field")
_DEVICE_KERNELS: dict[str, str] = {}
for _entry in registry.REGISTRY.values():
    if _entry.op != "field":
        continue
    for _device in _entry.devices:
        if _device in _DEVICE_KERNELS:
            raise RuntimeError(
                f"backends {_DEVICE_KERNELS[_device]!r} and {_entry.name!r} both claim the "
                f"{_device} kernel of poissonflow::field; give one its own op"
            )
        _DEVICE_KERNELS[_device] = _entry.name
        _FIELD.register_device(
            _device, _protocol_forward(_entry.name), _protocol_backward(_entry.name)
        )


def field_op(backend: str):
    """The forward op that differentiates `backend` (None for plain autograd)."""
    name = registry.get(backend).op_qualname()
    return None if name is None else getattr(torch.ops.poissonflow, name)


def backward_op(backend: str):
    name = registry.get(backend).op_qualname()
    return None if name is None else getattr(torch.ops.poissonflow, name + "_backward")


def field(
    x: Tensor,
    charges: Tensor,
    weights: Optional[Tensor],
    power: float,
    eps: float,
    exclude: Optional[Tensor] = None,
    eps_rows: Optional[Tensor] = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(v, log_scale) of the charges at x on `backend` ("auto": by the registry's order for the
    tensors' device), differentiable in x, charges, weights and eps_rows. Arguments are those of
    the protocol, already validated (poissonflow._checks); see poissonflow.poisson_field."""
    which = registry.resolve(backend, x.device, x.dtype)
    op = field_op(which)
    if op is None or not _needs_op(x, charges, weights, eps_rows):
        # the reference (plain autograd), or nothing the op would add: no gradient can flow
        # and no tracer or mode is watching, so its device kernel is called directly (the op's
        # dispatch cost ~40 us a call, a sixth of a learned-field target: docs/DESIGN.md
        # "CPU threads and small calls"); same function, same result
        return (
            registry.get(which)
            .module()
            .field_forward(x, charges, weights, power, eps, exclude=exclude, eps_rows=eps_rows)
        )
    return op(x, charges, weights, float(power), float(eps), exclude, eps_rows)


def _needs_op(*tensors: Optional[Tensor]) -> bool:
    """True when the custom op must run: a gradient may flow through one of `tensors`, or
    torch.compile, a dispatch mode (fake tensors, tracing) or a tensor subclass is involved."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return True
    if _current_dispatch_mode() is not None:
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad) or _functorch_wrapped(t):
            return True
    return False


try:  # private helpers of torch (present in the supported versions); if absent: always the op
    from torch._C._functorch import is_functorch_wrapped_tensor as _functorch_wrapped
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
except ImportError:  # pragma: no cover

    def _functorch_wrapped(t):
        return True

    def _current_dispatch_mode():
        return None
