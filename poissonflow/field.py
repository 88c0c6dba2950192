"""`poisson_field`: the empirical Poisson field of weighted charges, on every backend.

    r2_ij       = ||x_i - y_j||^2 + eps^2
    s_ij        = log w_j - (p/2) log r2_ij
    pi_ij       = softmax_j(s_ij)
    v_i         = sum_j pi_ij (x_i - y_j)  =  x_i - sum_j pi_ij y_j
    log_scale_i = logsumexp_j(s_ij) - log sum_j w_j

The physical field (mean over the charges of (x - y)/|x - y|^p) is exp(log_scale) * v; returning
the pair keeps everything finite (docs/DESIGN.md, "The field operator").
"""

from __future__ import annotations

import torch

from . import _checks, ops, registry

__all__ = ["poisson_field", "resolve_backend", "BACKENDS"]

# The names `backend=` accepts: "auto" and every registered backend (poissonflow/registry.py).
BACKENDS = ("auto",) + registry.names()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for `backend` on tensors of `device` (errors name what is missing).

    "auto": the first available backend of the registry's order for the device type: the C++
    kernel on CPU tensors; on CUDA tensors the CUDA kernels when compiled into this install,
    else Triton ($POISSONFLOW_GPU_BACKEND=triton|cuda overrides the order; which is faster on a
    given GPU is measured by bench/gpu_check.py). See poissonflow.registry.resolve.
    """
    return registry.resolve(backend, device, dtype)


def poisson_field(
    x: torch.Tensor,
    charges: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    power: float | None = None,
    eps: float = 0.0,
    exclude: torch.Tensor | None = None,
    backend: str = "auto",
    algorithm: str = "exact",
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
            pure PyTorch), "cpu" (C++), "triton", "triton-gemm" or "cuda".
        algorithm: "exact" (r2 by direct differences) or "gemm": r2 in GEMM form on tensor
            cores with a certified per-row error, near pairs recomputed exactly, rows the
            certificate does not cover recomputed by the exact kernel (docs/DESIGN.md
            "A tensor-core field with a certified error"); runs on the "triton-gemm" backend
            (backend "auto", "triton" or
            "triton-gemm"), whose backward is the exact Triton one.

    Returns:
        v (N, D) = x - sum_j pi_ij y_j and log_scale (N,), in x's dtype.

    Differentiable with respect to x, charges and weights on every backend (the kernels through
    the custom ops of poissonflow.ops, whose backward recomputes the softmax weights from
    log_scale; "reference" through plain autograd).

    Exact coincidence (a query equal to a charge, eps = 0): r2 is floored at the smallest normal
    number of the dtype, so that charge dominates, contributes exactly zero to v, and log_scale
    is large and finite. A query that no charge reaches (every charge of non-zero weight is its
    excluded one) gets v = 0 and log_scale = -inf, and dL/dx = 0 there. Weights that are all zero
    are an error (ValueError): there is no field to normalise.
    """
    p, e = _checks.check_field_inputs(x, charges, weights, power, eps, exclude)
    if algorithm == "gemm":
        if backend not in ("auto", "triton", "triton-gemm"):
            raise ValueError(
                f"algorithm='gemm' runs on the Triton GEMM-form kernel "
                f"(backend='auto', 'triton' or 'triton-gemm'), got {backend!r}"
            )
        backend = "triton-gemm"
    elif algorithm != "exact":
        raise ValueError(f"algorithm must be 'exact' or 'gemm', got {algorithm!r}")
    return ops.field(x, charges, weights, p, e, exclude, None, backend)
