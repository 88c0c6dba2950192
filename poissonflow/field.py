"""`poisson_field`: the empirical Poisson field of weighted charges, on every backend.

    r2_ij       = ||x_i - y_j||^2 + eps^2
    s_ij        = log w_j - (p/2) log r2_ij
    pi_ij       = softmax_j(s_ij)
    v_i         = sum_j pi_ij (x_i - y_j)  =  x_i - sum_j pi_ij y_j
    log_scale_i = logsumexp_j(s_ij) - log sum_j w_j

The physical field (mean over the charges of (x - y)/|x - y|^p) is exp(log_scale) * v; returning
the pair keeps everything finite (DESIGN.md section 2).
"""

from __future__ import annotations

import torch

import os

from . import _checks, ops
from ._ext import backends, cuda_extension_built
from .reference import poisson_field_reference

__all__ = ["poisson_field", "BACKENDS"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on tensors of `device` (errors name what is missing).

    "auto": the C++ kernel on CPU tensors; on CUDA tensors the CUDA kernels when compiled into
    this install, else Triton (the faster of the two on a given GPU is to be measured with
    bench/gpu_check.py; $POISSONFLOW_GPU_BACKEND=triton|cuda overrides the choice).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            preferred = os.environ.get("POISSONFLOW_GPU_BACKEND", "cuda")
            order = ["cuda", "triton"] if preferred != "triton" else ["triton", "cuda"]
            for name in order:
                if _gpu_backend_ready(name):
                    return name
            raise ValueError(
                "backend='auto' found no GPU kernel for CUDA tensors: the CUDA extension is not "
                "compiled and triton is not installed (pip install 'poissonflow[triton]')"
            )
        raise ValueError(f"no backend runs on tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        from . import triton as triton_backend

        if not triton_backend.available():
            raise ValueError(
                "backend='triton' is not available: it needs the triton package and a CUDA "
                "device (or TRITON_INTERPRET=1 for CPU tensors, for testing); "
                f"{backends()['triton']['detail']}"
            )
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not _gpu_backend_ready("cuda"):
            raise ValueError(f"backend='cuda' is not available: {backends()['cuda']['detail']}")
    return backend


def _gpu_backend_ready(name: str) -> bool:
    if name == "cuda":
        return cuda_extension_built() and torch.cuda.is_available()
    from . import triton as triton_backend

    return triton_backend.available()


def poisson_field(
    x: torch.Tensor,
    charges: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    power: float | None = None,
    eps: float = 0.0,
    exclude: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Field of `charges` (B, D) at queries `x` (N, D): returns `(v, log_scale)`.

    Args:
        x: queries (N, D), float32 or float64 (any float dtype for backend="reference").
        charges: charge positions (B, D), same dtype and device as x, B >= 1.
        weights: optional non-negative charge weights (B,) with a positive sum.
        power: p in r^-p; defaults to D.
        eps: softening >= 0, added as eps^2 to every squared distance.
        exclude: optional int64 (N,): for each query the index of one charge to ignore, or -1
            (leave-one-out when the queries are the charges: `exclude=torch.arange(N)`).
        backend: "auto" (the fastest kernel for the tensors' device), "reference" (float64
            pure PyTorch), "cpu" (C++), "triton" or "cuda".

    Returns:
        v (N, D) = x - sum_j pi_ij y_j and log_scale (N,), in x's dtype.

    Differentiable with respect to x, charges and weights on every backend (the "cpu" and
    "cuda" kernels through the custom op poissonflow::field, whose backward recomputes the
    softmax weights from log_scale; "reference" through plain autograd).

    Exact coincidence (a query equal to a charge, eps = 0): r2 is floored at the smallest normal
    number of the dtype, so that charge dominates, contributes exactly zero to v, and log_scale
    is large and finite. A query that no charge reaches (all weights zero) gets v = 0 and
    log_scale = -inf.
    """
    p, e = _checks.check_field_inputs(x, charges, weights, power, eps, exclude)
    which = resolve_backend(backend, x.device)
    if which == "reference":
        return poisson_field_reference(x, charges, weights, p, e, exclude=exclude)
    if which == "cpu" and x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"x has dtype {x.dtype}; the cpu backend computes in float32 or float64 "
            "(convert with x.float(), or use backend='reference')"
        )
    if which == "triton":
        from .triton import ops as triton_ops  # registers the triton_op kernels on first use

        v, log_scale, _, _ = triton_ops.triton_field_fwd(x, charges, weights, p, e, exclude, None)
        return v, log_scale
    return ops.field(x, charges, weights, p, e, exclude, None, which)
