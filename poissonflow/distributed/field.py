"""`poisson_field` over a process group: each rank holds shards of the queries and the charges;
the field is that of the union of all ranks' charges (docs/DESIGN.md, "Sharding the field over
processes").

Two ways to move the charges:

* "allgather": one all_gather of every rank's (charges | weights), then one local kernel call
  on the gathered charges: bit for bit what `poissonflow.poisson_field` returns on the gathered
  data. The backward computes the gathered charges' gradients from the local queries and sums
  them over ranks with one all_reduce; each rank keeps its own rows.
* "ring": the shards travel around the ring (R - 1 hops, overlapped isend/irecv, at most two
  shards held) and each rank reduces its queries against each shard to a partial (v_s, lse_s)
  with the backend's protocol `field_forward`; the partials merge exactly,
  lse = logaddexp(lse_acc, lse_s), v = (e^(lse_acc - lse) v_acc + e^(lse_s - lse) v_s), in
  float64 and in the ring's fixed arrival order (bit-identical run to run). The backward
  circulates the shards again with float64 gradient accumulators that end at their owner.

"auto" takes "allgather" when the gathered charges (B x (D + 1) values of the dtype) fit in
AUTO_ALLGATHER_BYTES (256 MiB), else "ring": both move the same B·D·(R - 1)/R values per rank
per evaluation; the all-gather makes one large kernel call, the ring bounds memory by two
shards and hides the transfer behind the compute.

**The per-shard backward's normalisation.** A protocol `field_backward` recomputes
pi_ij = w_j exp(u_ij - lse_i) from the log_scale it is given, with lse_i = log_scale_i +
log W_s (W_s: the weight sum of the charges it is handed). Handing it the global log-sum-exp as
log_scale_i = lse_i - log W_s makes its pi the global softmax restricted to the shard; then,
summed over shards: dL/dx_i = g_v,i + sum_s (gx_s,i - g_v,i) (each call adds the g_v term once),
dL/dy_j is the call's own, and dL/dw_j = gw_s,j + sum_i g_l,i / W_s - sum_i g_l,i / W (each
call subtracts its own shard's normalisation; the global one is W). A shard whose weights are
all zero is skipped in the forward (it contributes nothing) and its dL/dw comes from a call
with unit weights, which makes pi / w the same exp(u_ij - lse_i). This relies on the protocol's
contract that `field_backward` takes pi from the log_scale it is handed (the cpu, triton and
cuda backends do; the reference recomputes its own forward, so ring mode refuses it for
gradients). Half-precision inputs go to the per-shard calls in float32, since a GPU backend's
half-precision backward recomputes the (per-shard) forward instead.
"""

from __future__ import annotations

import math

import torch

from .. import _checks, registry
from ..ops import drop_dead_rows
from . import _comm

__all__ = ["poisson_field", "MODES", "AUTO_ALLGATHER_BYTES", "FieldPlan", "plan_field"]

MODES = ("auto", "allgather", "ring")
AUTO_ALLGATHER_BYTES = 256 * 2**20
_HALF = (torch.float16, torch.bfloat16)


class FieldPlan:
    """What one distributed evaluation needs besides the tensors: group, layout, mode, backend
    module, power, eps. Built once (one exchange of sizes), reused by every evaluation of a
    flow."""

    def __init__(
        self,
        group,
        layout: _comm.Layout,
        mode: str,
        backend: str,
        power: float,
        eps: float,
        has_w: bool,
        need_y: bool = False,
        need_w: bool = False,
    ):
        self.group, self.layout, self.mode, self.backend = group, layout, mode, backend
        self.power, self.eps, self.has_w = power, eps, has_w
        self.need_y, self.need_w = need_y, need_w  # does any rank want these gradients

    def module(self):
        return registry.get(self.backend).module()


def _resolve_mode(mode, total_b, d, dtype):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    size = total_b * (d + 1) * torch.empty((), dtype=dtype).element_size()
    return "allgather" if size <= AUTO_ALLGATHER_BYTES else "ring"


def _local_checks(x, charges, weights, power, eps, exclude):
    """poissonflow._checks on this rank's shard (an empty charge shard is allowed; the global
    conditions, B >= 1 and a positive weight sum, are checked on the exchanged sizes)."""
    _checks.check_tensor(x, "x", ndim=2)
    _checks.check_tensor(charges, "charges", ndim=2)
    # an empty charge shard is checked as one zero charge (shape, dtype, device)
    probe_y = charges if charges.shape[0] else charges.new_zeros((1, charges.shape[1]))
    p, e = _checks.check_field_inputs(x, probe_y, None, power, eps, None)
    if weights is not None:
        _checks.check_tensor(weights, "weights", ndim=1)
        if weights.shape[0] != charges.shape[0]:
            raise ValueError(
                f"weights must have one entry per local charge: got "
                f"{weights.shape[0]} for {charges.shape[0]} charges"
            )
        if weights.dtype != x.dtype:
            raise TypeError(f"weights has dtype {weights.dtype} but x has {x.dtype}")
        if weights.device != x.device:
            raise ValueError(f"weights is on {weights.device} but x is on {x.device}")
        _checks.check_finite(weights, "weights")
        if weights.numel() and bool((weights < 0).any()):
            raise ValueError("weights must be non-negative")
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor) or exclude.dtype not in (torch.int64, torch.int32):
            raise TypeError("exclude must be an int64 tensor of global charge indices")
        if exclude.shape != (x.shape[0],):
            raise ValueError(
                f"exclude must have one entry per local query, shape "
                f"({x.shape[0]},); got {tuple(exclude.shape)}"
            )
        if exclude.device != x.device:
            raise ValueError(f"exclude is on {exclude.device} but x is on {x.device}")
    return p, e


def plan_field(
    x, charges, weights, power, eps, exclude, group, mode, backend, *, grad: bool | None = None
):
    """Validates every rank's arguments and exchanges the sizes (one collective): a FieldPlan.
    An invalid argument on any rank raises on every rank (so that none is left waiting)."""
    group = _comm.get_group(group)
    record: dict = {"error": None}
    try:
        p, e = _local_checks(x, charges, weights, power, eps, exclude)
        which = registry.resolve(backend, x.device, x.dtype)
        if grad is None:
            grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, charges, weights)
            )
        wsum = (
            float(weights.detach().double().sum())
            if weights is not None
            else float(charges.shape[0])
        )
        ex = (
            (int(exclude.min()), int(exclude.max()))
            if exclude is not None and exclude.numel()
            else None
        )
        record.update(
            n=x.shape[0],
            b=charges.shape[0],
            d=x.shape[1],
            dtype=str(x.dtype),
            has_w=weights is not None,
            grad=bool(grad),
            wsum=wsum,
            ex=ex,
            p=p,
            e=e,
            mode=mode,
            backend=which,
            need_y=bool(grad and charges.requires_grad),
            need_w=bool(grad and weights is not None and weights.requires_grad),
        )
    except (TypeError, ValueError) as err:
        record["error"] = f"{type(err).__name__}: {err}"
        mine = err
    else:
        mine = None
    recs = _comm.exchange(group, x.device, record)
    bad = [(k, r["error"]) for k, r in enumerate(recs) if r["error"]]
    if bad:
        if mine is not None:
            raise mine
        k, msg = bad[0]
        raise ValueError(f"rank {k} of the process group got invalid arguments ({msg})")
    first = recs[0]
    for key, what in (
        ("d", "the dimension D"),
        ("dtype", "the dtype"),
        ("has_w", "whether weights are given"),
        ("p", "power"),
        ("e", "eps"),
        ("mode", "mode"),
        ("backend", "the backend"),
        ("grad", "whether the inputs require grad (every rank must take part in the backward)"),
    ):
        vals = [r[key] for r in recs]
        if any(v != vals[0] for v in vals):
            raise ValueError(f"every rank must pass the same {what}; got {vals} by rank")
    total_b = sum(r["b"] for r in recs)
    if total_b == 0:
        raise ValueError("charges is empty on every rank: the field needs at least one charge")
    if not sum(r["wsum"] for r in recs) > 0:
        raise ValueError("weights must have a positive sum over all ranks (all charges are zero)")
    for k, r in enumerate(recs):
        if r["ex"] is not None and (r["ex"][0] < -1 or r["ex"][1] >= total_b):
            raise ValueError(
                f"exclude on rank {k} must hold global charge indices in "
                f"[0, {total_b}) or -1; got values in [{r['ex'][0]}, {r['ex'][1]}]"
            )
    layout = _comm.make_layout(
        group, [r["n"] for r in recs], [r["b"] for r in recs], [r["wsum"] for r in recs]
    )
    m = _resolve_mode(mode, total_b, first["d"], x.dtype)
    if m == "ring" and first["backend"] == "reference" and first["grad"]:
        raise ValueError(
            "mode='ring' differentiates through the backends' field_backward, which "
            "the reference backend does not take a log_scale in; use "
            "mode='allgather' with backend='reference'"
        )
    return FieldPlan(
        group,
        layout,
        m,
        first["backend"],
        first["p"],
        first["e"],
        first["has_w"],
        any(r["need_y"] for r in recs),
        any(r["need_w"] for r in recs),
    )


def poisson_field(
    x,
    charges,
    *,
    weights=None,
    power=None,
    eps=0.0,
    exclude=None,
    group=None,
    mode="auto",
    backend="auto",
):
    """The field of the union of every rank's charges at this rank's queries: `(v, log_scale)`.

    Collective: every rank of `group` (default: the default process group) calls it with its
    own shards, x (N_r, D) and charges (B_r, D) (any sizes, empty shards allowed, B = sum B_r
    >= 1), weights (B_r,) on every rank or on none, and the same power, eps, mode, backend.
    The result equals `poissonflow.poisson_field(x, all_charges, weights=all_weights, ...)` on
    the rank-major concatenation of the shards, log_scale normalised by the global weight sum;
    `exclude` (N_r,) holds global charge indices (rank-major order) or -1.

    mode: "allgather" (gather the charges, one kernel call), "ring" (shards travel around the
    ring, at most two held) or "auto" (allgather while the gathered charges take at most
    256 MiB). Differentiable in x, charges and weights (first derivatives); the charges' and
    weights' gradients arrive at the rank that owns them. If the inputs require grad on one
    rank they must on all, and every rank must run the backward. docs/DESIGN.md, "Sharding the field
    over processes".
    """
    plan = plan_field(x, charges, weights, power, eps, exclude, group, mode, backend)
    return field_with_plan(plan, x, charges, weights, exclude)


def field_with_plan(plan: FieldPlan, x, charges, weights, exclude, eps_rows=None):
    """poisson_field with a FieldPlan (no exchange of sizes); eps_rows (per-query softening,
    no gradient) for the flow."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, charges, weights)
    ):
        return _Field.apply(x, charges, weights, exclude, eps_rows, plan)
    return _forward(plan, x, charges, weights, exclude, eps_rows)[:2]


# -------------------------------------------------------------------------------------------
# Per-shard pieces


def _pack(charges, weights):
    y = charges.detach()
    if weights is None:
        return y.contiguous()
    return torch.cat([y, weights.detach().to(y.dtype)[:, None]], 1).contiguous()


def _unpack(packed, d, has_w):
    return packed[:, :d], (packed[:, d] if has_w else None)


def _local_exclude(exclude, offset, size):
    if exclude is None:
        return None
    inside = (exclude >= offset) & (exclude < offset + size)
    return torch.where(inside, exclude - offset, torch.full_like(exclude, -1)).to(torch.int64)


def _compute_dtype(dtype):
    # half-precision inputs go to the kernels in float32: the per-shard partials are merged,
    # and a GPU backend's half-precision backward recomputes its own (per-shard) softmax
    return torch.float32 if dtype in _HALF else dtype


def _forward(plan, x, charges, weights, exclude, eps_rows):
    """(v, log_scale, gathered) where gathered is the allgather mode's packed charges (for the
    backward) or None."""
    L, d = plan.layout, x.shape[1]
    mod = plan.module()
    if plan.mode == "allgather":
        packed = _comm.gather_rows(_pack(charges, weights), L.b, plan.group)
        y, w = _unpack(packed, d, plan.has_w)
        v, ls = mod.field_forward(
            x.detach(), y, w, plan.power, plan.eps, exclude=exclude, eps_rows=eps_rows
        )
        return v, ls, packed
    cd = _compute_dtype(x.dtype)
    xc = x.detach().to(cd)
    er = None if eps_rows is None else eps_rows.detach().to(cd)
    v_acc = torch.zeros(xc.shape, dtype=torch.float64, device=x.device)
    lse_acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    for s, shard in _comm.ring(_pack(charges, weights).to(cd), L, plan.group):
        if L.b[s] == 0 or not L.wsum[s] > 0 or x.shape[0] == 0:
            continue  # a shard without charge weight contributes nothing
        y, w = _unpack(shard, d, plan.has_w)
        v_s, ls_s = mod.field_forward(
            xc,
            y,
            w,
            plan.power,
            plan.eps,
            exclude=_local_exclude(exclude, L.offset[s], L.b[s]),
            eps_rows=er,
        )
        lse_s = ls_s.double() + math.log(L.wsum[s])
        v_acc, lse_acc = _merge(v_acc, lse_acc, v_s.double(), lse_s)
    ls = lse_acc - L.log_total_w
    return v_acc.to(x.dtype), ls.to(x.dtype), None


def _merge(v_a, lse_a, v_b, lse_b):
    """Exact merge of two partials over disjoint charge sets (docs/DESIGN.md, "Sharding the field
    over processes"); a
    partial with lse = -inf (no charge reached the query) has weight 0."""
    m = torch.maximum(lse_a, lse_b)
    live = torch.isfinite(m)
    m0 = torch.where(live, m, torch.zeros_like(m))
    a, b = torch.exp(lse_a - m0), torch.exp(lse_b - m0)
    tot = a + b
    safe = torch.where(live, tot, torch.ones_like(tot))
    v = (a[:, None] * v_a + b[:, None] * v_b) / safe[:, None]
    v = torch.where(live[:, None], v, torch.zeros_like(v))
    lse = torch.where(live, m0 + torch.log(safe), torch.full_like(m, -math.inf))
    return v, lse


def _shard_backward(
    plan, mod, x, y, w, wsum_s, v, lse, gv, gl, glsum, ex_s, eps_rows, need_x, need_yw
):
    """This rank's queries' gradient contributions for one shard (see the module docstring):
    (dx part without the g_v term (float64) or None, (b_s, D [+1]) float64 dy | dw or None)."""
    b_s, d = y.shape
    if b_s == 0 or x.shape[0] == 0:
        return None, None
    if wsum_s > 0:
        ls_pass = (lse - math.log(wsum_s)).to(x.dtype)
        gx, gy, gw = mod.field_backward(
            x,
            y,
            w,
            plan.power,
            plan.eps,
            v,
            ls_pass,
            gv,
            gl,
            need_x=need_x,
            need_y=need_yw and plan.need_y,
            need_w=need_yw and plan.need_w,
            exclude=ex_s,
            eps_rows=eps_rows,
        )
        dx = None if gx is None else gx.double() - gv.double()
        corr = glsum / wsum_s - glsum / plan.layout.total_w
    else:
        # all weights zero: pi = 0 here, so only dL/dw is non-zero; unit weights give the
        # same pi / w = exp(u - lse) (module docstring)
        dx = None
        gy = None
        gw = None
        if need_yw and plan.need_w:
            ones = torch.ones(b_s, dtype=x.dtype, device=x.device)
            _, _, gw = mod.field_backward(
                x,
                y,
                ones,
                plan.power,
                plan.eps,
                v,
                (lse - math.log(b_s)).to(x.dtype),
                gv,
                gl,
                need_x=False,
                need_y=False,
                need_w=True,
                exclude=ex_s,
                eps_rows=eps_rows,
            )
        corr = glsum / b_s - glsum / plan.layout.total_w
    if not need_yw:
        return dx, None
    cols = []
    if plan.need_y:
        cols.append(
            gy.double()
            if gy is not None
            else torch.zeros((b_s, d), dtype=torch.float64, device=x.device)
        )
    if plan.need_w:
        cols.append(
            (gw.double() + corr)[:, None]
            if gw is not None
            else torch.zeros((b_s, 1), dtype=torch.float64, device=x.device)
        )
    return dx, torch.cat(cols, 1)


class _Field(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, charges, weights, exclude, eps_rows, plan):
        v, ls, packed = _forward(plan, x, charges, weights, exclude, eps_rows)
        ctx.plan = plan
        ctx.has_packed = packed is not None
        ctx.save_for_backward(
            x, charges, weights, exclude, eps_rows, v, ls, packed if packed is not None else None
        )
        return v, ls

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gv, gl):
        plan = ctx.plan
        x, charges, weights, exclude, eps_rows, v, ls, packed = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        L, d = plan.layout, x.shape[1]
        want_yw = plan.need_y or plan.need_w  # collective: does any rank want them
        gv, gl = drop_dead_rows(ls, gv, gl)  # a row no charge reaches has constant outputs
        gv = torch.zeros_like(v) if gv is None else gv
        gl = torch.zeros_like(ls) if gl is None else gl
        gx = gy = gw = None
        if plan.mode == "allgather":
            y, w = _unpack(packed, d, plan.has_w)
            mod = plan.module()
            gxa, gya, gwa = mod.field_backward(
                x.detach(),
                y,
                w,
                plan.power,
                plan.eps,
                v,
                ls,
                gv.to(x.dtype).contiguous(),
                gl.to(x.dtype).contiguous(),
                need_x=need_x,
                need_y=plan.need_y,
                need_w=plan.need_w,
                exclude=exclude,
                eps_rows=eps_rows,
            )
            gx = gxa
            if want_yw:
                cols = []
                if plan.need_y:
                    cols.append(gya)
                if plan.need_w:
                    cols.append(gwa[:, None])
                full = torch.cat(cols, 1).contiguous() if L.world > 1 else torch.cat(cols, 1)
                if L.world > 1:
                    torch.distributed.all_reduce(full, group=plan.group)
                mine = full[L.offset[L.rank] : L.offset[L.rank] + L.b[L.rank]]
                gy, gw = _split(mine, d, plan)
        else:
            gx, gy, gw = _ring_backward(
                plan, x, charges, weights, exclude, eps_rows, v, ls, gv, gl, need_x, want_yw
            )
        return (
            gx.to(x.dtype) if need_x and gx is not None else None,
            gy.to(charges.dtype) if need_y and gy is not None else None,
            gw.to(weights.dtype) if need_w and gw is not None else None,
            None,
            None,
            None,
        )


def _split(mine, d, plan):
    gy = mine[:, :d] if plan.need_y else None
    gw = mine[:, -1] if plan.need_w else None
    return gy, gw


def _ring_backward(plan, x, charges, weights, exclude, eps_rows, v, ls, gv, gl, need_x, want_yw):
    L, d = plan.layout, x.shape[1]
    mod = plan.module()
    cd = _compute_dtype(x.dtype)
    xc = x.detach().to(cd)
    er = None if eps_rows is None else eps_rows.detach().to(cd)
    vc, gvc, glc = v.to(cd), gv.to(cd).contiguous(), gl.to(cd).contiguous()
    lse = ls.double() + L.log_total_w
    glsum = float(glc.double().sum())
    dx_acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    width = (d if plan.need_y else 0) + (1 if plan.need_w else 0)

    def compute(s, shard):
        y, w = _unpack(shard, d, plan.has_w)
        dx, part = _shard_backward(
            plan,
            mod,
            xc,
            y,
            w,
            L.wsum[s],
            vc,
            lse,
            gvc,
            glc,
            glsum,
            _local_exclude(exclude, L.offset[s], L.b[s]),
            er,
            need_x,
            want_yw,
        )
        if dx is not None:
            dx_acc.add_(dx)
        return part

    own = _pack(charges, weights).to(cd)
    if want_yw:
        mine = _comm.ring_with_accumulators(own, width, L, plan.group, compute)
        gy, gw = _split(mine, d, plan)
    else:
        for s, shard in _comm.ring(own, L, plan.group):
            compute(s, shard)
        gy = gw = None
    gx = (dx_acc + gv.double()) if need_x else None
    return gx, gy, gw
