"""Pairwise uniformity losses of the global batch of a data-parallel step (docs/DESIGN.md
"The field as a Riesz-energy loss" and "Sharding the field over processes"): each rank passes its
own rows; the loss is that of the union of all ranks'
rows, the same value on every rank, and each rank's backward yields the exact gradient of that
global loss with respect to its own rows.

The gradient reaches the local rows by two routes: as queries (this rank's terms) and as
charges of the other ranks' terms, which the distributed field's backward returns to their
owner. The final log-sum-exp over the rows of all ranks is formed from one all_gather of the
per-rank log-sum-exps (float64, summed in rank order); its gradient enters through the local
surrogate L + (E - E.detach()) with E = exp(lse_local - L), whose value is L and whose gradient
is exactly dL/dlse_local.

With DistributedDataParallel, which averages the parameters' gradients over the R ranks, a
loss that is the same global value on every rank gets 1/R of its gradient: multiply it by the
world size to descend the global loss at its own scale (as for any loss over gathered
features).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _checks
from ..bank import FeatureBank
from ..metrics import _sq_dists, l2_normalize
from . import _comm
from .field import field_with_plan, plan_field

__all__ = ["riesz_uniformity_loss", "uniform_loss"]


def _rows(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _checks.check_tensor(x, name, ndim=2)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero columns: the feature dimension must be >= 1")
    _checks.check_finite(x, name)
    return x


def _normalised(x, name, normalize):
    if not normalize or x.shape[0] == 0:
        return x
    return l2_normalize(x, name)


def _gather_scalars(values, group, device):
    """Every rank's float64 vector `values`, as a (R, len) tensor in rank order."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts).cpu()


def _lse_local(ls):
    ls64 = ls.to(torch.float64)
    finite = torch.isfinite(ls64)
    if ls.numel() and not bool(finite.all()):
        if bool(finite.any()):  # rows no charge reaches (every other row coincides with them)
            return torch.logsumexp(torch.where(finite, ls64, -math.inf), dim=0)
        return torch.where(finite, ls64, 0.0).sum() * 0.0 - math.inf
    if ls.numel() == 0:
        # -inf, but connected to the field's output: an empty rank's backward must still
        # reach the distributed field's (collective) backward, or the other ranks would wait
        return ls.to(torch.float64).sum() * 0.0 - math.inf
    return torch.logsumexp(ls.to(torch.float64), dim=0)


def _bank_rows(bank, x):
    if bank is None:
        return x.new_zeros((0, x.shape[1]))
    if hasattr(bank, "features") and not isinstance(bank, torch.Tensor):
        bank = bank.features()  # a poissonflow FeatureBank
    bank = _rows(bank, "bank")
    if bank.shape[1] != x.shape[1]:
        raise ValueError(
            f"bank must have D = {x.shape[1]} columns like x, got shape {tuple(bank.shape)}"
        )
    if bank.dtype != x.dtype or bank.device != x.device:
        raise TypeError(f"bank must have x's dtype and device ({x.dtype}, {x.device})")
    return bank.detach()


def riesz_uniformity_loss(
    x: torch.Tensor,
    s: float,
    *,
    bank: torch.Tensor | FeatureBank | None = None,
    normalize: bool = True,
    group: Any = None,
    mode: str = "auto",
    backend: str = "auto",
    coincident: str = "exclude",
) -> torch.Tensor:
    """Riesz s-energy uniformity of the global batch,

        L = log( 1 / (N (N - 1 + K)) * sum_i sum_{j != i} ||u_i - u_j||^(-s) ),

    i over the N = sum_r N_r rows of all ranks' `x`, j over the other N - 1 rows and the
    K = sum_r K_r rows of all ranks' `bank` shards (a constant: detached), u = x / ||x||
    (normalize=True) or x. The single-process definition, coincident rows included (rows equal
    across ranks or to a row of any rank's bank are one point: `coincident` as there), is
    `poissonflow.losses.riesz_uniformity_loss`; here two distributed field calls (charges: the
    rows, detached, each query's own global row excluded, the gradient doubled since the pairs
    are symmetric; then the banks) give every row's log-sum-exp, normalised by N and by K
    (docs/DESIGN.md, "The field as a Riesz-energy loss"). The global batch (N x D) is gathered
    once to find coincident rows; with mode="ring" the banks never are (their shards travel
    around the ring). Collective; returns the same 0-dim tensor (x's dtype) on every rank, whose
    backward gives each rank the exact gradient in its own rows. Empty shards are allowed;
    N + K >= 2 globally.

    Args:
        x: this rank's rows (N_r, D).
        s: the Riesz exponent, > 0.
        bank: this rank's bank shard: None, a (K_r, D) tensor or a `FeatureBank`.
        normalize: L2-normalise the rows and the banks first.
        group: the process group (None: the default group).
        mode: "auto", "allgather" or "ring" (`poisson_field`).
        backend: the field op's backend.
        coincident: "exclude" or "raise".

    Returns:
        The global loss, a 0-dim tensor in x's dtype, the same on every rank.
    """
    from ..losses._coincident import find as find_coincidences
    from ..losses.functions import check_coincident

    grp = _comm.get_group(group)

    def checks():
        xx = _rows(x, "x")
        sv = _checks.check_scalar(s, "s", minimum=0.0, allow_equal=False)
        _checks.check_bool(normalize, "normalize")
        check_coincident(coincident)
        b = _bank_rows(bank, xx)
        return xx, sv, b, _normalised(xx, "x", normalize), _normalised(b, "bank", normalize)

    x, sv, b, u, bu = _comm.check_together(grp, _device(x), checks)
    wire = _meta(grp, x)
    sizes = _gather_scalars([float(x.shape[0]), float(b.shape[0])], grp, wire)
    n_all, k_all = sizes[:, 0], sizes[:, 1]
    n, k = int(n_all.sum()), int(k_all.sum())
    if n < 1 or n + k < 2:
        raise ValueError(
            f"the global batch has {n} row(s) and the banks {k}: the Riesz energy "
            "needs at least one pair"
        )
    rank = dist.get_rank(grp)
    lo = int(n_all[:rank].sum())
    hi = lo + x.shape[0]
    bank_lo = int(k_all[:rank].sum())
    u_all = _comm.gather_rows(u.detach().to(wire), tuple(int(v) for v in n_all), grp)
    u_all = u_all.to(x.device)

    def reduce(op):
        def f(t):
            w = t.to(wire).contiguous()
            dist.all_reduce(w, op=op, group=grp)
            return w.to(t.device)

        return f

    co = find_coincidences(
        u_all,
        bu.detach() if k else None,
        bank_lo,
        reduce(dist.ReduceOp.SUM),
        reduce(dist.ReduceOp.MIN),
    )
    if coincident == "raise" and (co.in_batch or co.with_bank):
        raise ValueError(
            f"coincident rows (equal after normalisation; global rank-major "
            f"indices): {co.describe()}; pass coincident='exclude' to count each "
            "as one point"
        )
    n_pairs = co.pairs(n, k)
    if n_pairs == 0:
        raise ValueError(
            f"all {n} rows of the global batch coincide (and the banks hold no "
            "other point): the Riesz energy has no pair of distinct points"
        )
    pairs = math.log(n_pairs)
    lses, consts, factors = [], [], []
    if co.groups >= 2:
        w = co.batch_weights(lo, hi, x.dtype)
        own = co.batch_exclude(lo, hi)
        uc = u.detach()
        plan = plan_field(u, uc, w, sv, 0.0, own, grp, mode, backend)
        _, ls = field_with_plan(plan, u, uc, w, own)
        lses.append(_lse_local(ls))
        consts.append(math.log(n) - pairs)
        factors.append(2.0)  # symmetric pairs: the charge route equals the query route
    if k > 0:
        w = co.bank_weights(bank_lo, x.dtype)
        ex = co.bank_exclude(lo, hi)
        plan = plan_field(u, bu, w, sv, 0.0, ex, grp, mode, backend)
        _, ls = field_with_plan(plan, u, bu, w, ex)
        lses.append(_lse_local(ls))
        consts.append(math.log(k) - pairs)
        factors.append(1.0)
    return _global_logsumexp(lses, consts, grp, x, factor=factors)


def _global_logsumexp(lses, consts, grp, x, factor):
    """logsumexp over ranks and parts of lse[part] + const[part] (the same value on every rank),
    with the local surrogate of the module docstring; `factor` (one number, or one per part)
    scales the gradient routed through the local rows (2 when the local rows stand for both
    sides of symmetric pairs)."""
    if not isinstance(factor, (list, tuple)):
        factor = [factor] * len(lses)
    every = _gather_scalars([float(t.detach()) for t in lses], grp, _meta(grp, x))
    total = -math.inf
    for r in range(every.shape[0]):  # rank order, then part order: the same bits everywhere
        for p, c in enumerate(consts):
            total = float(
                torch.logaddexp(torch.tensor(total, dtype=torch.float64), every[r, p] + c)
            )
    value = x.new_tensor(total, dtype=torch.float64)
    surrogate = value.new_zeros(())
    for t, c, f in zip(lses, consts, factor):
        e = torch.exp(t + (c - total))  # 0 (with a zero gradient) for an empty rank
        surrogate = surrogate + f * (e - e.detach())
    return (value + surrogate).to(x.dtype)


def _device(x):
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _meta(grp, x):
    return _comm.wire_device(grp, x.device)


def uniform_loss(x, t: float = 2.0, *, group=None, chunk_size: int | None = None):
    """Wang & Isola's uniformity of the global batch, log( 1 / (N (N - 1)) sum_{i != j}
    exp(-t ||x_i - x_j||^2) ) over the N = sum_r N_r rows of all ranks (as
    `poissonflow.metrics.uniform_loss` on the concatenation; pass L2-normalised rows).

    The rows are all-gathered (N x D per rank) and each rank scores its own rows against all
    of them in chunks of `chunk_size` rows (default: 2**22 / N) by plain autograd, which keeps
    the local N_r x N scores for the backward. The pair term is symmetric, so the gradient in a
    local row is twice its gradient as the first member of its pairs. Collective; the same
    0-dim tensor on every rank.
    """
    grp = _comm.get_group(group)
    x, tt = _comm.check_together(
        grp,
        _device(x),
        lambda: (_rows(x, "x"), _checks.check_scalar(t, "t", minimum=0.0, allow_equal=False)),
    )
    sizes = _gather_scalars([float(x.shape[0])], grp, _meta(grp, x))[:, 0]
    n = int(sizes.sum())
    if n < 2:
        raise ValueError(f"the global batch has {n} row(s): uniformity needs at least 2")
    rank = dist.get_rank(grp)
    off = int(sizes[:rank].sum())
    xs = _comm.gather_rows(x.detach(), tuple(int(v) for v in sizes), grp)
    sq_all = (xs * xs).sum(1)
    chunk = chunk_size or max(1, 2**22 // n)
    row_lse = []
    for i0 in range(0, x.shape[0], chunk):
        xi = x[i0 : i0 + chunk]
        sc = _sq_dists(xi, xs, (xi * xi).sum(1), sq_all).mul(-tt)
        rows = torch.arange(xi.shape[0], device=x.device)
        sc = sc.index_put((rows, rows + off + i0), sc.new_tensor(-math.inf))
        row_lse.append(torch.logsumexp(sc.to(torch.float64), dim=1))
    # an empty rank's term is -inf, connected to x so that its loss has a (zero) gradient
    local = (
        torch.logsumexp(torch.cat(row_lse), 0)
        if row_lse
        else x.to(torch.float64).sum() * 0.0 - math.inf
    )
    return _global_logsumexp([local], [-math.log(n * (n - 1))], grp, x, factor=2.0)
