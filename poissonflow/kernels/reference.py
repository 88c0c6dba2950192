"""Pure-PyTorch float64 reference of the Poisson field: the oracle every kernel is tested against.

Small and deliberately plain. It follows docs/DESIGN.md, "The field operator" line by line:

    r2_ij       = max(||x_i - y_j||^2 + eps^2, tiny)      (direct differences, never expanded)
    s_ij        = log w_j - (p/2) log r2_ij
    pi_ij       = softmax_j(s_ij)  =  w_j e^(u_ij - m_i) / sum_k w_k e^(u_ik - m_i),
                  u = -(p/2) log r2, m_i = max over counted charges (differentiable at w = 0)
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

__all__ = [
    "poisson_field_reference",
    "field_backward_reference",
    "flow_velocity_reference",
    "field_forward",
    "field_backward",
    "flow_steps",
]

DEFAULT_BLOCK = 2**22  # pair-dimension elements per chunk: 32 MiB of float64
_EXP_CAP = 700.0  # largest exponent of a charge that does not count (see the forward)


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
    w = None if weights is None else weights.to(torch.float64)
    log_wsum = math.log(B) if w is None else torch.log(w.sum())
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
        # u_ij = -(p/2) log r2_ij; the weight multiplies exp(u) (rather than adding log w to u)
        # so that the reference stays differentiable at w_j = 0.
        us = []
        for j0, j1 in _chunks(B, b_chunk):
            diff = xi[:, None, :] - y[None, j0:j1, :]
            r2 = (diff * diff).sum(-1) + e2[i0:i1, None]
            us.append(-0.5 * p * torch.log(r2.clamp_min(tiny)))
        u = torch.cat(us, dim=1)
        valid = torch.ones_like(u, dtype=torch.bool)  # pairs not excluded
        if exclude is not None:
            ex = exclude[i0:i1]
            rows = torch.nonzero(ex >= 0).flatten()
            valid[rows, ex[rows]] = False
        counts = valid if w is None else valid & (w > 0)[None, :]
        # shift by the largest exponent among the charges that count (it cancels exactly);
        # zero-weight charges stay in the sum (as w * e = 0) so that d/dw is right at w = 0
        m = torch.where(counts, u, -math.inf).amax(dim=1).detach()
        dead = torch.isneginf(m)  # no charge reaches these queries
        # excluded pairs are masked before exp: an excluded coincident charge has u ~ 1e3 and
        # exp(u - m) = inf, whose gradient through the mask would be 0 * inf = NaN
        # A zero-weight charge can lie far above the shift m (a query exactly on it): its
        # exp(u - m) would overflow and w * inf = NaN. Its term is 0 whatever the cap, so the
        # exponent of charges that do not count is capped (e^700 ~ 1e304 is finite in float64);
        # only d/dw of such a charge, astronomically large in truth, is then capped too.
        shifted = torch.where(valid, u, -math.inf) - torch.where(dead, 0.0, m)[:, None]
        e = torch.exp(torch.where(counts, shifted, shifted.clamp_max(_EXP_CAP)))
        ew = e if w is None else e * w[None, :]
        ew = torch.where(valid, ew, 0.0)
        Z = ew.sum(1)
        pi = torch.where(dead[:, None], 0.0, ew / torch.where(dead, 1.0, Z)[:, None])
        v = torch.zeros_like(xi)
        for j0, j1 in _chunks(B, b_chunk):
            diff = xi[:, None, :] - y[None, j0:j1, :]
            v = v + (pi[:, j0:j1, None] * diff).sum(1)
        vs.append(v)
        lse = torch.where(dead, -math.inf, m + torch.log(torch.where(dead, 1.0, Z)))
        lss.append(lse - log_wsum)
    if N == 0:
        return x.new_zeros((0, D), dtype=out_dtype), x.new_zeros((0,), dtype=out_dtype)
    return torch.cat(vs).to(out_dtype), torch.cat(lss).to(out_dtype)


@torch.no_grad()
def field_backward_reference(
    x, charges, weights, power, eps, grad_v, grad_log_scale, *, exclude=None, block=DEFAULT_BLOCK
):
    """Gradients (dx, dy, dw) of <v, grad_v> + <log_scale, grad_log_scale> in float64 from the
    closed-form expressions of docs/ARCHITECTURE.md, chunked over queries with no autograd graph:
    the oracle for large shapes, where autograd through poisson_field_reference would keep the
    whole N x B x D computation alive. Checked against that autograd on small shapes
    (tests/test_field_autograd.py)."""
    tiny = torch.finfo(x.dtype).tiny  # the input dtype's, as in the forward
    x = x.double()
    y = charges.double()
    N, D = x.shape
    B = y.shape[0]
    p = float(D) if power is None else float(power)
    w = None if weights is None else weights.double()
    gv = torch.zeros_like(x) if grad_v is None else grad_v.double()
    gl = x.new_zeros(N) if grad_log_scale is None else grad_log_scale.double()
    v, _ = poisson_field_reference(x, y, w, p, eps, exclude=exclude, r2_floor=tiny)
    dx = gv.clone()
    dy = torch.zeros_like(y)
    dw = torch.zeros(B, dtype=torch.float64)
    rows = max(1, block // max(1, B * D))
    for i0, i1 in _chunks(N, rows):
        diff = x[i0:i1, None, :] - y[None, :, :]  # x_i - y_j
        r2raw = (diff * diff).sum(-1) + float(eps) ** 2
        r2 = r2raw.clamp_min(tiny)
        u = -0.5 * p * torch.log(r2)
        valid = torch.ones_like(u, dtype=torch.bool)
        if exclude is not None:
            ex = exclude[i0:i1]
            sel = torch.nonzero(ex >= 0).flatten()
            valid[sel, ex[sel]] = False
        counts = valid if w is None else valid & (w > 0)[None, :]
        m = torch.where(counts, u, -math.inf).amax(1, keepdim=True)
        m = torch.where(torch.isneginf(m), 0.0, m)
        e = torch.where(valid, torch.exp(u - m), 0.0)  # pi / w up to the row normaliser
        ew = e if w is None else e * w[None, :]
        Z = ew.sum(1, keepdim=True)
        Zs = torch.where(Z > 0, Z, 1.0)
        pi = ew / Zs
        piw = e / Zs
        g = gv[i0:i1]
        h = (g[:, None, :] * diff).sum(-1) - (g * v[i0:i1]).sum(1, keepdim=True) + gl[i0:i1, None]
        gs = pi * h
        c = torch.where(r2raw < tiny, 0.0, p * gs / r2)
        dx[i0:i1] -= (c[:, :, None] * diff).sum(1)
        dy += (c[:, :, None] * diff).sum(0) - pi.T @ g
        dw += (piw * h).sum(0)
    if w is None:
        return dx, dy, None
    return dx, dy, dw - gl.sum() / w.sum()


def flow_velocity_reference(
    x: torch.Tensor, z: torch.Tensor, charges: torch.Tensor, weights=None, *, exclude=None
) -> torch.Tensor:
    """dx/dt = x - mu(x, z) of the Poisson flow in t = log z (docs/DESIGN.md, "The flow"): the
    field of the augmented charges (y, 0) at (x, z) in d + 1 dimensions, power d + 1, per-query
    height z.
    """
    d = x.shape[1]
    v, _ = poisson_field_reference(x, charges, weights, power=d + 1, eps_rows=z, exclude=exclude)
    return v


# -------------------------------------------------------------------------------------------
# The backend protocol (docs/ARCHITECTURE.md) on the reference: registry entry "reference".
# Computed in float64 and returned in x's dtype, with the r2 floor of x's dtype.


def field_forward(x, y, w, power, eps, *, exclude=None, eps_rows=None):
    """(v, log_scale) of the protocol; differentiable by autograd."""
    return poisson_field_reference(x, y, w, power, eps, exclude=exclude, eps_rows=eps_rows)


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
    """(dL/dx, dL/dy, dL/dw) of L = <v, gv> + <log_scale, gl> by autograd through the float64
    reference (v and log_scale are recomputed; the arguments only complete the protocol). Rows
    that no charge reaches (log_scale = -inf) carry no log_scale gradient."""
    need_w = bool(need_w and w is not None)
    wanted = (bool(need_x), bool(need_y), need_w)
    if not any(wanted):
        return None, None, None
    floor = torch.finfo(x.dtype).tiny
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().double().requires_grad_(n)
            for t, n in zip((x, y, w), wanted)
        ]
        e = None if eps_rows is None else eps_rows.detach().double()
        vr, lr = poisson_field_reference(
            *leaves, power, eps, exclude=exclude, eps_rows=e, r2_floor=floor
        )
        loss = vr.new_zeros(())
        if gv is not None:
            loss = loss + (vr * gv.detach().double()).sum()
        if gl is not None:
            live = torch.isfinite(lr)
            loss = loss + torch.where(live, lr * gl.detach().double(), 0.0).sum()
        asked = [t for t, n in zip(leaves, wanted) if n]
        got = (
            list(torch.autograd.grad(loss, asked, allow_unused=True))
            if loss.requires_grad
            else [None] * len(asked)
        )
    out = []
    for t, n in zip(leaves, wanted):
        if not n:
            out.append(None)
            continue
        g = got.pop(0)
        out.append((torch.zeros_like(t) if g is None else g).to(x.dtype))
    return tuple(out)


def flow_steps(x, y, w, t0, dt, n_steps, solver, *, exclude=None):
    """Euler / classic RK4 of dx/dt = v(x; z = e^t, p = d + 1) in float64 with the package's one
    RK4 driver (poissonflow.ode.integrate); t0, dt (N,) or scalars, taken in float64; the end
    state in x's dtype."""
    from ..ode import integrate

    xd = x.double()
    yd = y.double()
    wd = None if w is None else w.double()
    t0 = torch.as_tensor(t0, dtype=torch.float64, device=x.device).expand(x.shape[0])
    h = torch.as_tensor(dt, dtype=torch.float64, device=x.device).expand(x.shape[0])

    def velocity(xx, tt):
        return flow_velocity_reference(xx, torch.exp(tt), yd, wd, exclude=exclude)

    return integrate(velocity, xd, t0, h, int(n_steps), solver).to(x.dtype)
