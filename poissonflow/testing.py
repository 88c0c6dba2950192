"""The one error measure and the one table of tolerances for checking a field kernel against the
float64 reference (used by the test suite through tests/helpers.py and by bench/gpu_check.py).

Every comparison is made on the *same* inputs: the kernel's inputs (already rounded to their
dtype) are converted exactly to float64 for the reference.

Error measure (all per row, relative; `field_errors`, `row_errors`, `flow_errors`):

* v: max over rows of ||v_i - v_ref,i|| / ||v_ref,i||, less the error the kernels' flush of
  weights below the smallest normal number allows (B * tiny * max_j ||x_i - y_j||, which
  matters only where v is itself about that small). Rows where v cancels (a query midway
  between charges) make that ratio meaningless, so `field_errors` also reports the error
  relative to sum_j pi_ij ||x_i - y_j||, the natural scale of a weighted mean (always <= the
  relative error, by the triangle inequality); tests built to cancel bound that one.
* log_scale: max |ls - ref| / (1 + |ref|); rows with no field (-inf) must agree exactly.
* gradients: max over rows of ||g_i - g_ref,i|| / max(||g_ref,i||, ROW_FLOOR * max_k
  ||g_ref,k||) (for 1-D gradients, the entries are the rows). A gradient row is a sum over
  the other axis of softmax-weighted terms; rows far below the largest (a charge far from every
  query) collect only weights that the kernels flush to zero below the smallest normal number
  relative to the row maximum, or that carry the same relative error as the large ones but
  cancel; they are compared at ROW_FLOOR of the largest row's scale.
* flow: the displacement, max over rows of ||(x_end - x0) - (x_ref - x0)|| / ||x_ref - x0||:
  stricter than the end state's relative error, which the start state would dilute; for a
  float16/bfloat16 state the end state's (it is rounded to the dtype once, at the end).

Tolerances (`TOLERANCES[dtype]`, argued):

* float32 (v, log_scale 1e-4): the kernel's error comes from r2 (a float32 sum of D squares,
  ~sqrt(D) ulp) and the score s = -(p/2) log2 r2 (rounded at its magnitude): both enter the
  exponent multiplied by p/2 ~ D/2, so the weights carry ~(D/2) x few ulp of relative error,
  about 1e-5 at D = 129 and 5e-5 at D = 300 (measured); v is a weighted mean of x - y_j, so its
  relative error is that of the weights. Measured for log_scale: ~1e-6.
  Gradients 1e-3: the backward recomputes pi from log_scale (its float32 rounding enters the
  exponent: |lse| ulp ~ 4e-5 at |lse| ~ 600) and forms every difference directly, so its error
  is the forward's amplified by at most the conditioning of the softmax Jacobian; measured
  <= 2e-4. Flow 1e-4: each stage is one field evaluation with the forward's error and the
  steps checked are contractive (measured ~1e-5).
* float64 (1e-10 everywhere): the same argument with 2^-53: ~1e-14 measured; the kernels and
  the reference sum in different orders, polynomials are accurate to ~1e-16.
* bfloat16 (2^-6) and float16 (2^-9): computed in float32 from the rounded inputs, then
  rounded to the dtype once. The unit roundoff u is 2^-8 (bf16, 8 significant bits) and 2^-11
  (f16): round-to-nearest leaves u relative per element, and the Triton interpreter's
  float32 -> bfloat16 conversion truncates (a full ulp, 2u), so a row carries up to 2u; the
  float32 computation adds ~1e-5. Twice that, 4u, bounds what is formed from rounded values
  besides (log_scale from rounded weights, gradients from rounded upstream gradients and
  forward outputs). Measured: bf16 6.9e-3 (v, truncating interpreter; 3.0e-3 emulated CUDA),
  6.0e-3 (gradients); f16 4.5e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.reference import poisson_field_reference

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "ROW_FLOOR",
    "tolerance",
    "field_errors",
    "row_errors",
    "flow_errors",
]


@dataclass(frozen=True)
class Tolerance:
    v: float
    log_scale: float
    grad: float
    flow: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(v=1e-10, log_scale=1e-10, grad=1e-10, flow=1e-10),
    torch.float32: Tolerance(v=1e-4, log_scale=1e-4, grad=1e-3, flow=1e-4),
    torch.bfloat16: Tolerance(v=2**-6, log_scale=2**-6, grad=2**-6, flow=2**-6),
    torch.float16: Tolerance(v=2**-9, log_scale=2**-9, grad=2**-9, flow=2**-9),
}

# Gradient rows below this fraction of the largest are compared at this fraction of its scale.
ROW_FLOOR = 1e-3


def tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


def field_errors(x, y, v, ls, *, weights=None, power=None, eps=0.0, exclude=None, eps_rows=None):
    """(max row-relative error of v, max conditioning-scaled error of v, max log_scale error)
    of a kernel's (v, ls) against the float64 reference on the same inputs, with the r2 floor of
    the inputs' dtype (the floor every backend uses)."""
    xd, yd = x.double(), y.double()
    wd = None if weights is None else weights.double()
    floor = torch.finfo(x.dtype).tiny
    er = None if eps_rows is None else eps_rows.double()
    v_ref, ls_ref = poisson_field_reference(
        xd, yd, wd, power, eps, exclude=exclude, eps_rows=er, r2_floor=floor
    )
    if v_ref.shape[0] == 0:
        return 0.0, 0.0, 0.0
    dv = (v.double() - v_ref).norm(dim=1)
    scale, maxdist = _weighted_distance(xd, yd, wd, power, eps, exclude, er, floor)
    # Kernels flush weights below the compute dtype's smallest normal (relative to the largest
    # weight) to zero, by design: that changes v by at most B * tiny * max_j |x_i - y_j|, an
    # error allowed outright (it matters only where v itself is about that small: a query on a
    # charge, softened by almost nothing, beside a near one, whose v is ~1e-41 in float32).
    flush_floor = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).tiny
    flushed = yd.shape[0] * flush_floor * maxdist
    # A row whose v is below the output dtype's smallest normal number is subnormal or zero in
    # that dtype (float16: below 6.1e-5, e.g. a query on a charge, whose v is ~1e-13): it is
    # compared at that scale, the finest the dtype resolves in relative terms.
    resolved = flushed + torch.finfo(v.dtype).tiny
    beyond = (dv - flushed).clamp_min(0.0)
    rel = beyond / (v_ref.norm(dim=1) + resolved).clamp_min(1e-300)
    cond = beyond / (scale + resolved).clamp_min(1e-300)
    finite = torch.isfinite(ls_ref)
    ls_err = torch.zeros_like(ls_ref)
    lsd = ls.double()
    ls_err[finite] = (lsd[finite] - ls_ref[finite]).abs() / (1 + ls_ref[finite].abs())
    # rows with no field must agree exactly (-inf and v = 0)
    assert torch.equal(torch.isneginf(lsd), ~finite), "rows without field differ"
    return rel.max().item(), cond.max().item(), ls_err.max().item()


def _weighted_distance(x, y, w, power, eps, exclude, eps_rows, floor, block=2**22):
    """(sum_j pi_ij ||x_i - y_j||, max_j ||x_i - y_j||) per query: the scale of the terms of the
    weighted mean v_i and their largest size (float64, in query chunks so that no more than
    `block` pair-dimension elements exist at once)."""
    N, D = x.shape
    B = y.shape[0]
    p = float(D) if power is None else float(power)
    rows = max(1, block // max(1, B * D))
    out = []
    for i0 in range(0, N, rows):
        xi = x[i0 : i0 + rows]
        dist = (xi[:, None, :] - y[None, :, :]).norm(dim=-1)
        if eps_rows is None:
            e2 = float(eps) ** 2
        else:
            e2 = eps_rows.double()[i0 : i0 + rows, None] ** 2
        r2 = (dist * dist + e2).clamp_min(floor)
        s = -0.5 * p * torch.log(r2)
        if w is not None:
            s = s + torch.log(w)[None, :]
        if exclude is not None:
            ex = exclude[i0 : i0 + rows]
            sel = torch.nonzero(ex >= 0).flatten()
            s[sel, ex[sel]] = -float("inf")
        s = s - s.max(dim=1, keepdim=True).values.nan_to_num(neginf=0.0)
        pi = torch.exp(s)
        pi = pi / pi.sum(1, keepdim=True).clamp_min(1e-300)
        out.append(torch.stack([(pi * dist).sum(1), dist.amax(1)], 1))
    both = torch.cat(out) if out else x.new_zeros(0, 2)
    return both[:, 0], both[:, 1]


def row_errors(got: torch.Tensor, ref: torch.Tensor, *, floor: float = ROW_FLOOR) -> float:
    """Max over rows of ||got_i - ref_i|| / max(||ref_i||, floor * max_k ||ref_k||); 1-D tensors
    are compared entry by entry. NaN anywhere in `got` is an infinite error. Empty: 0."""
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} against {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    diff = got - ref
    if ref.ndim == 1:
        num, den = diff.abs(), ref.abs()
    else:
        num, den = diff.flatten(1).norm(dim=1), ref.flatten(1).norm(dim=1)
    scale = den.max()
    if float(scale) == 0.0:
        return float(num.max())
    return float((num / torch.maximum(den, floor * scale)).max())


def flow_errors(x_end: torch.Tensor, x_ref: torch.Tensor, x0: torch.Tensor) -> float:
    """Max row-relative error of the displacement x_end - x0 against x_ref - x0; for a
    float16/bfloat16 state, of the end state itself (it is rounded once to the dtype at the
    end, an error relative to the state, which the displacement would magnify)."""
    if x_end.dtype in (torch.float16, torch.bfloat16):
        return row_errors(x_end, x_ref, floor=0.0)
    x0 = x0.detach().to("cpu", torch.float64)
    return row_errors(
        x_end.detach().to("cpu", torch.float64) - x0,
        x_ref.detach().to("cpu", torch.float64) - x0,
        floor=0.0,
    )
