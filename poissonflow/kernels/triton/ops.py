"""The Triton kernels as a torch op pair with the schema of poissonflow::field:

    torch.ops.poissonflow.field_triton(x, charges, weights, power, eps, exclude, eps_rows)
        -> (v, log_scale)
    torch.ops.poissonflow.field_triton_backward(x, charges, weights, power, eps, exclude,
                                                eps_rows, v, log_scale, grad_v, grad_log_scale,
                                                need_x, need_charges, need_weights)
        -> (gx, gy, gw)                                     empty (0,) where not needed

Built by poissonflow.ops.define_field_ops, so the fakes, the saved state (the inputs, v and
log_scale) and the autograd (including dL/d eps_rows through the augmented problem) are those
of poissonflow::field. They are a separate pair, not a CUDA kernel of poissonflow::field,
because the CUDA backend already serves that op on CUDA tensors and backend="triton" must still
be honoured there; and they are torch.library.triton_op: torch.compile sees the Triton kernels
inside them (the functions launch through wrap_triton and are make_fx-traceable).

Arguments are not validated here: callers run poissonflow._checks first. Importing this module
imports triton and registers the ops; under TRITON_INTERPRET=1 (CPU tensors) the explicit fake
implementations let Dynamo trace the ops, which triton_op's own fake (the kernel launch traced on
fake tensors) cannot do through the interpreter.
"""

from __future__ import annotations

import torch

from ... import ops
from . import backward_from_outputs
from ._field_fwd import field_forward_launch

__all__ = ["field_triton", "field_triton_backward"]

# torch.library.triton_op needs torch >= 2.6; older torch gets an opaque custom op with the same
# schema, fake and autograd (torch.compile then treats the kernels as a black box).
triton_op = getattr(torch.library, "triton_op", None) or torch.library.custom_op


def _forward(x, y, w, power, eps, exclude, eps_rows):
    v, log_scale, _, _ = field_forward_launch(x, y, w, power, eps, exclude, eps_rows)
    return v, log_scale


_OPS = ops.define_field_ops("field_triton", _forward, backward_from_outputs, decorator=triton_op)
field_triton, field_triton_backward = _OPS.forward, _OPS.backward
