"""Pure-PyTorch float64 reference of the Poisson field: the oracle every kernel is tested against.

Small and deliberately plain. It follows DESIGN.md section 2 line by line:

    r2_ij       = max(||x_i - y_j||^2 + eps^2, tiny)      (direct differences, never expanded)
    s_ij        = log w_j - (p/2) log r2_ij
    pi_ij       = softmax_j(s_ij)
    v_i         = sum_j pi_ij (x_i - y_j)
    log_scale_i = logsumexp_j(s_ij) - log sum_j w_j

`tiny` is the smallest normal number of the input dtype, the same floor the kernels use, so a
query exactly on a charge (eps = 0) is well defined: that charge dominates, its contribution to v
is exactly zero and log_scale is large but finite. A query whose every charge has zero weight or
is excluded gets v = 0 and log_scale = -inf (there is no field).

It works in query chunks and charge chunks so that no more than `block` pair-dimension elements
exist at once in the forward computation; autograd, when used, keeps every chunk alive for the
backward pass (O(N*B*D) memory), which is fine for an oracle on test-sized inputs.
"""

from __future__ import annotations

import math

import torch

__all__ = ["poisson_field_reference", "flow_velocity_reference"]

DEFAULT_BLOCK = 2**22  # pair-dimension elements per chunk: 32 MiB of float64


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def poisson_field_reference(
    x: torch.Tensor,
    charges: torch.Tensor,
    weights: torch.Tensor | None = None,
    power: float | None = None,
    eps: float = 0.0,
    *,
    exclude: torch.Tensor | None = None,
    eps_rows: torch.Tensor | None = None,
    r2_floor: float | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference field (v, log_scale) computed in float64, returned in x's dtype.

    `exclude` (N,) int64 gives for each query a charge index it ignores (-1: none);
    `eps_rows` (N,) gives a per-query softening that replaces `eps`; `r2_floor` overrides the
    floor of r2 (default: smallest normal of x's dtype; pass float32's when checking a float32
    kernel on float64 copies of its inputs).
    """
    out_dtype = x.dtype
    tiny = torch.finfo(out_dtype).tiny if r2_floor is None else float(r2_floor)
    x = x.to(torch.float64)
    y = charges.to(torch.float64)
    N, D = x.shape
    B = y.shape[0]
    p = float(D) if power is None else float(power)
    if weights is None:
        logw = torch.zeros(B, dtype=torch.float64, device=x.device)
        log_wsum = math.log(B)
    else:
        w = weights.to(torch.float64)
        logw = torch.log(w)
        log_wsum = torch.log(w.sum())
    e2 = (
        torch.full((N,), float(eps) ** 2, dtype=torch.float64, device=x.device)
        if eps_rows is None
        else eps_rows.to(torch.float64) ** 2
    )

    q_chunk = max(1, min(N, block // max(1, B)))
    b_chunk = max(1, min(B, block // max(1, q_chunk * D)))
    vs, lss = [], []
    for i0, i1 in _chunks(N, q_chunk):
        xi = x[i0:i1]
        scores = []
        for j0, j1 in _chunks(B, b_chunk):
            diff = xi[:, None, :] - y[None, j0:j1, :]
            r2 = (diff * diff).sum(-1) + e2[i0:i1, None]
            r2 = r2.clamp_min(tiny)
            scores.append(logw[None, j0:j1] - 0.5 * p * torch.log(r2))
        s = torch.cat(scores, dim=1)
        if exclude is not None:
            ex = exclude[i0:i1]
            rows = torch.nonzero(ex >= 0).flatten()
            if rows.numel():
                mask = torch.zeros_like(s, dtype=torch.bool)
                mask[rows, ex[rows]] = True
                s = s.masked_fill(mask, -math.inf)
        lse = torch.logsumexp(s, dim=1)
        dead = torch.isneginf(lse)  # no charge reaches these queries
        pi = torch.exp(s - torch.where(dead, 0.0, lse)[:, None])
        pi = torch.where(dead[:, None], 0.0, pi)
        v = torch.zeros_like(xi)
        for j0, j1 in _chunks(B, b_chunk):
            diff = xi[:, None, :] - y[None, j0:j1, :]
            v = v + (pi[:, j0:j1, None] * diff).sum(1)
        vs.append(v)
        lss.append(lse - log_wsum)
    if N == 0:
        return x.new_zeros((0, D), dtype=out_dtype), x.new_zeros((0,), dtype=out_dtype)
    return torch.cat(vs).to(out_dtype), torch.cat(lss).to(out_dtype)


def flow_velocity_reference(
    x: torch.Tensor, z: torch.Tensor, charges: torch.Tensor, weights=None, *, exclude=None
) -> torch.Tensor:
    """dx/dt = x - mu(x, z) of the Poisson flow in t = log z (DESIGN.md section 3): the field of
    the augmented charges (y, 0) at (x, z) in d + 1 dimensions, power d + 1, per-query height z.
    """
    d = x.shape[1]
    v, _ = poisson_field_reference(
        x, charges, weights, power=d + 1, eps_rows=z, exclude=exclude
    )
    return v
