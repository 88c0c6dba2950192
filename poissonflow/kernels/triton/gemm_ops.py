"""The GEMM-form forward as a torch op pair with the schema of poissonflow::field:

    torch.ops.poissonflow.field_triton_gemm(x, charges, weights, power, eps, exclude, eps_rows)
    torch.ops.poissonflow.field_triton_gemm_backward(...)      the exact Triton backward

built by poissonflow.ops.define_field_ops like poissonflow::field_triton (same fakes, saved
state and autograd); the backward is the exact Triton one (poissonflow.kernels.triton_gemm).
Importing this module imports triton and registers the ops.
"""

from __future__ import annotations

import torch

from ... import ops
from ..triton_gemm import forward_outputs
from . import backward_from_outputs

__all__ = ["field_triton_gemm", "field_triton_gemm_backward"]

triton_op = getattr(torch.library, "triton_op", None) or torch.library.custom_op

_OPS = ops.define_field_ops(
    "field_triton_gemm", forward_outputs, backward_from_outputs, decorator=triton_op
)
field_triton_gemm, field_triton_gemm_backward = _OPS.forward, _OPS.backward
