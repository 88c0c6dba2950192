"""`transform` over a process group: each rank holds a shard of the features, the charges are
the union of all shards, and the result is `poissonflow.transform` of the union, row for row
(docs/DESIGN.md, "The flow" and "Sharding the field over processes").

Same defaults as `poissonflow.transform`; what is global is computed globally:

* the horizon: z_min = 0.5 x the median nearest-neighbour distance of the same seeded sample of
  the global charges (the sample's rows are gathered, each rank measures them against its own
  shard, one all_reduce(MIN)); z_max = 1e3 x the global data scale (rank-ordered float64 sums);
* leave-one-out: with the features as charges, feature i of rank r is global charge
  offset[r] + i; with separate charges, the first bitwise-equal global charge (one ring pass);
* the flux start's random directions: rows offset[r] + i of the single-process draw.

The flow itself, by mode: "allgather" gathers the charges once and runs the backend's fused
flow kernel on the local queries (no communication per step; the same kernel calls as one
process, so the result is bit-identical to it); "ring" integrates with the package's one RK4
driver (`poissonflow.ode.integrate`) and every stage's field evaluation is a distributed ring
pass (`poissonflow.distributed.poisson_field`'s mode "ring"), for charges too large to gather.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import horizon
from ..flow import empirical_flow, field_flow
from ..ode import integrate
from . import _comm
from .field import _pack, _unpack, field_with_plan, plan_field

__all__ = ["transform", "median_nn_distance", "data_scale"]

# the module poissonflow.transform (the package rebinds the name `transform` to its function)
_tf = importlib.import_module("poissonflow.transform")


def transform(
    features,
    *,
    charges=None,
    weights=None,
    start="plane",
    solver=None,
    steps=None,
    z_min="auto",
    z_max="auto",
    parameterization=None,
    output=None,
    exclude_self=True,
    seed=None,
    backend="auto",
    batch_size=16384,
    return_info=False,
    group=None,
    mode="auto",
):
    """Poisson-flow transform of the union of every rank's `features` (N_r, d), returning this
    rank's rows of `poissonflow.transform(all_features, ...)` (same arguments, same defaults).

    Collective: every rank calls it with its own shard (an empty shard is allowed) and the same
    keyword arguments. `charges` / `weights`: this rank's shard of the charges (default: the
    features). `mode`: "allgather" (charges gathered once, fused local flow), "ring" (unfused
    RK4, every field evaluation a ring pass) or "auto" (poissonflow.distributed.poisson_field's
    rule). The exact field only: a learned field is one fixed function of each point, so its
    flow needs no communication (run poissonflow.transform on each rank's shard, with z_min
    and z_max given).
    """
    t_start = time.perf_counter()
    grp = _comm.get_group(group)

    def checks():
        x, kind, x_dtype = _local_tensor(features, "features")
        bs = _tf._check_count(batch_size, "batch_size", 1, None)
        _tf._validate_enums(start, output, solver, parameterization)
        if not isinstance(exclude_self, (bool, np.bool_)):
            raise TypeError(f"exclude_self must be True or False, got {exclude_self!r}")
        sv = solver or "rk4"
        n_steps = _tf._check_count(
            _tf.DEFAULT_STEPS[sv] if steps is None else steps, "steps", 1, _tf.MAX_STEPS
        )
        if charges is None:
            y = x
        else:
            y = _local_tensor(charges, "charges")[0].to(device=x.device, dtype=x.dtype)
        w = None
        if weights is not None:
            w = torch.as_tensor(
                np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights
            ).to(device=x.device, dtype=x.dtype)
        return x, kind, x_dtype, bs, sv, n_steps, y, w

    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    x, kind, x_dtype, batch_size, solver, steps, y, w = _comm.check_together(grp, device, checks)
    own_charges = charges is None
    output = output or "sphere"
    parameterization = parameterization or "logz"
    d = x.shape[1]
    plan = plan_field(x, y, w, float(d + 1), 0.0, None, grp, mode, backend, grad=False)
    L = plan.layout
    if sum(L.n) == 0:
        raise ValueError("features is empty on every rank (0 samples): nothing to transform")

    gathered = None
    if plan.mode == "allgather":  # the charges, once: every evaluation is then local
        gathered = _unpack(_comm.gather_rows(_pack(y, w), L.b, grp), d, plan.has_w)
    yg, wg = gathered if gathered is not None else (None, None)

    def auto_zmin():
        return (
            horizon.auto_z_min(yg)
            if yg is not None
            else horizon.Z_MIN_FACTOR * median_nn_distance(y, L, grp)
        )

    def auto_zmax():
        if yg is not None:
            return horizon.auto_z_max(yg, wg)
        s = data_scale(y, w, L, grp)[0]
        if not s > 0:
            raise ValueError("the charges have zero spread: z_max='auto' needs a data scale")
        return horizon.Z_MAX_FACTOR * s

    zmin = _tf._horizon_value(z_min, "z_min", auto_zmin)
    zmax = _tf._horizon_value(z_max, "z_max", auto_zmax)
    if not zmin < zmax:
        raise ValueError(f"z_min must be < z_max, got z_min={zmin:.4g}, z_max={zmax:.4g}")
    delta = None
    if parameterization == "radial":
        delta = (zmax**2 - zmin**2) / (2.0 * steps)

    exclude = None
    if exclude_self or start == "flux":
        exclude = _coincident(x, y, own_charges, gathered, plan)
    N, qoff = sum(L.n), sum(L.n[: L.rank])
    if start == "flux":
        missing = _allsum(torch.tensor([float((exclude < 0).sum())], dtype=torch.float64), grp)
        if missing[0] > 0:
            raise ValueError(
                f"start='flux' starts each point next to its own charge, but {int(missing[0])} "
                f"of the {N} features are not charges; use start='plane' for held-out points"
            )
        fd = (
            horizon.flux_delta(yg)
            if yg is not None
            else horizon.FLUX_DELTA_FACTOR * median_nn_distance(y, L, grp)
        )
        x0, z0 = _flux_start(x, fd, seed, N, qoff)
        excl_used = None  # a flux start must feel its own charge
    else:
        x0 = x
        z0 = torch.full((x.shape[0],), zmin, dtype=torch.float64, device=x.device)
        excl_used = exclude if exclude_self else None

    excluded = (
        0
        if excl_used is None
        else int(
            _allsum(torch.tensor([float((excl_used >= 0).sum())], dtype=torch.float64), grp)[0]
        )
    )
    info: dict[str, Any] = {
        "z_min": zmin,
        "z_max": zmax,
        "steps": steps,
        "solver": solver,
        "start": start,
        "parameterization": parameterization,
        "backend": plan.backend,
        "exclude_self": bool(exclude_self),
        "field": "empirical",
        "output": output,
        "excluded": excluded,
        "delta": delta,
        "world_size": L.world,
        "mode": plan.mode,
    }
    if parameterization == "logz":
        if yg is not None:
            xe = empirical_flow(
                x0,
                z0,
                yg,
                wg,
                zmax,
                steps,
                solver,
                exclude=excl_used,
                backend=plan.backend,
                batch_size=batch_size,
            )
        else:
            xe = _ring_flow(plan, x0, z0, y, w, excl_used, zmax, steps, solver, batch_size)
        ze = torch.full((x.shape[0],), zmax, dtype=x.dtype, device=x.device)
    else:
        if yg is not None:
            fn = _tf._empirical_field_fn(yg, wg, excl_used, plan.backend)
        else:

            def fn(xx, zz):
                return field_with_plan(plan, xx, y, w, excl_used, eps_rows=zz)[0], zz

        xe, ze, stats = field_flow(
            fn,
            x0,
            z0.to(x.dtype),
            parameterization=parameterization,
            solver=solver,
            steps=steps,
            z_end=zmax,
            delta=delta,
        )
        info["guard_fired"] = int(
            _allsum(torch.tensor([float(stats.guard_fired)], dtype=torch.float64), grp)[0]
        )
    if output == "sphere" and yg is None:
        centre = data_scale(y, w, L, grp)[1].to(x.dtype)
    else:
        centre = None
    out = _tf._output(
        xe, ze, yg if yg is not None else y, wg if yg is not None else w, output, centre
    )
    info["seconds"] = time.perf_counter() - t_start
    result = _tf._back(out, kind, x_dtype, features)
    return (result, info) if return_info else result


# -------------------------------------------------------------------------------------------


def _local_tensor(a, name):
    """poissonflow.transform's input conversion, except that an empty shard (0 rows) is
    allowed (the global emptiness is checked once the sizes are exchanged)."""
    rows = a.shape[0] if isinstance(a, (torch.Tensor, np.ndarray)) and a.ndim == 2 else None
    if rows == 0:
        t = torch.as_tensor(a) if isinstance(a, np.ndarray) else a.detach()
        dtype = t.dtype if t.is_floating_point() else torch.float64
        kind = "numpy" if isinstance(a, np.ndarray) else "torch"
        comp = torch.float32 if dtype == torch.float32 else torch.float64
        return t.to(comp).contiguous(), kind, dtype
    return _tf._as_tensor(a, name, keep_dtype=True)


def _on_wire(t: torch.Tensor, group) -> torch.Tensor:
    # small host-side tensors go where the group's backend moves data (NCCL: the GPU)
    return t.to(_comm.wire_device(group, t.device))


def _allsum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of a small float64 CPU tensor, in rank order (the same bits on every
    rank)."""
    world = dist.get_world_size(group)
    t = _on_wire(t.contiguous(), group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.cpu()


def data_scale(y, w, layout, group):
    """(root-mean-square distance of the global charges to their weighted mean, the mean as a
    float64 (d,) tensor): poissonflow.horizon.data_scale of the union, from rank-ordered
    float64 sums."""
    yd = y.detach().to("cpu", torch.float64)
    wd = None if w is None else w.detach().to("cpu", torch.float64)
    first = torch.cat(
        [
            (yd if wd is None else wd[:, None] * yd).sum(0),
            torch.tensor(
                [float(yd.shape[0]) if wd is None else float(wd.sum())], dtype=torch.float64
            ),
        ]
    )
    tot = _allsum(first, group)
    c = tot[:-1] / tot[-1]
    sq = ((yd - c) ** 2).sum(1)
    second = torch.tensor([float(sq.sum() if wd is None else (wd * sq).sum())], dtype=torch.float64)
    s = _allsum(second, group)[0] / tot[-1]
    return float(s.sqrt()), c.to(y.device)


def median_nn_distance(y, layout, group, *, sample=horizon.NN_SAMPLE, seed=0):
    """poissonflow.horizon.median_nn_distance of the union of the ranks' charges: the same
    seeded sample of global indices, its rows gathered, each rank's nearest distance from them
    to its own shard (direct differences), the minimum over ranks."""
    idx = horizon.nn_sample(layout.total_b, sample=sample, seed=seed)
    off = layout.offset
    counts = tuple(
        int(((idx >= off[k]) & (idx < off[k] + layout.b[k])).sum()) for k in range(layout.world)
    )
    yd = y.detach().to("cpu", torch.float64)
    lo = off[layout.rank]
    mine = idx[(idx >= lo) & (idx < lo + yd.shape[0])] - lo
    rows = _comm.gather_rows(_on_wire(yd[mine], group), counts, group).cpu()
    sel = idx - lo  # the sampled charge itself, where this rank holds it, is not its neighbour
    skip = torch.where((sel >= 0) & (sel < yd.shape[0]), sel, torch.full_like(sel, -1))
    nn_wire = _on_wire(horizon.nearest_distances(rows, yd, skip), group)
    dist.all_reduce(nn_wire, op=dist.ReduceOp.MIN, group=group)
    return horizon.median_positive(nn_wire.cpu())


def _coincident(x, y, own_charges, gathered, plan):
    """Global index of the charge each local feature coincides with (-1: none), as
    poissonflow.transform.coincident_charge on the union."""
    L = plan.layout
    if own_charges:
        # single-process transform with charges=None takes query i as charge i (x is y)
        return torch.arange(x.shape[0], device=x.device) + L.offset[L.rank]
    if gathered is not None:
        return _tf.coincident_charge(x, gathered[0])
    best = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for s, shard in _comm.ring(y.detach().contiguous(), L, plan.group):
        if not L.b[s] or not x.shape[0]:
            continue
        c = _tf.coincident_charge(x, shard).cpu()
        g = torch.where(c >= 0, c + L.offset[s], torch.full_like(c, -1))
        take = (g >= 0) & ((best < 0) | (g < best))
        best = torch.where(take, g, best)
    return best.to(x.device)


def _flux_start(x, delta, seed, n_total, qoff):
    """poissonflow.transform's flux start for this rank's rows of the single-process draw (the
    features are their own charges, so y[own] is x itself)."""
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    d = x.shape[1]
    u = torch.randn(n_total, d + 1, generator=g, dtype=torch.float64)[qoff : qoff + x.shape[0]]
    u = u / u.norm(dim=1, keepdim=True)
    x0 = (x.double().cpu() + delta * u[:, :d]).to(x.dtype).to(x.device)
    z0 = (delta * u[:, d].abs()).clamp_min(1e-300 if x.dtype == torch.float64 else 1e-30)
    return x0, z0.to(x.device)


def _ring_flow(plan, x0, z0, y, w, exclude, zmax, steps, solver, batch_size):
    """The log-z flow by the one RK4 driver, every stage's field a ring pass. Every rank runs
    the same number of query batches (the largest shard's), so the ring passes line up."""
    L = plan.layout
    n_batches = max(1, math.ceil(max(L.n) / batch_size))
    t0 = torch.log(z0.to(torch.float64))
    h = (math.log(zmax) - t0) / steps
    out = []
    for k in range(n_batches):
        i0, i1 = min(x0.shape[0], k * batch_size), min(x0.shape[0], (k + 1) * batch_size)
        ex = None if exclude is None else exclude[i0:i1]

        def f(xx, tt, ex=ex):
            z = torch.exp(tt).to(xx.dtype)
            return field_with_plan(plan, xx, y, w, ex, eps_rows=z)[0]

        out.append(integrate(f, x0[i0:i1], t0[i0:i1], h[i0:i1], steps, solver))
    return torch.cat(out)
