"""The Poisson flow ODE (docs/DESIGN.md, "The flow"): integrators and their time parameterisations.

State x~ = (x, z) in R^(d+1), charges (y_j, 0) on the plane z = 0.

* log-z time ("logz", PFGM's change of variable): z = e^t and dx~/dt = z f / f_z for a field f.
  For the exact empirical field f_z is proportional to z, so the ODE collapses to
  dx/dt = x - mu(x, z) = v(x; eps = z, p = d + 1): the fused kernels integrate it.
* radial ("radial", the blog's preset): y~ <- y~ + delta f / (f . y~), each step raising
  |y~|^2 / 2 by at least delta whatever the sign of f . y~; guarded (frozen and counted) only
  where |f . y~| is at the level of its own rounding error (`radial_guard_threshold`).

`empirical_flow` runs the fused Euler/RK4 kernels of a backend (one call integrates a batch of
queries through a chunk of steps; the chunking is fixed so results do not depend on whether a
progress bar is shown). `field_flow` integrates any field callable (a learned network, or the
empirical field for the radial preset) step by step in Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import registry
from .ode import SOLVERS, integrate, step

__all__ = [
    "empirical_flow",
    "field_flow",
    "FlowStats",
    "radial_guard_threshold",
]

STEP_CHUNKS = 20  # calls per batch: progress granularity (does not depend on `progress`)


@dataclass
class FlowStats:
    """What happened during an integration (reported by transform and the estimator)."""

    steps: int = 0
    solver: str = ""
    parameterization: str = ""
    guard_fired: int = 0  # point-evaluations guarded: f_z <= guard |f| (logz), or
    #                       |f . y~| <= radial_guard_threshold |f| |y~| (radial)
    evaluations: int = 0  # field evaluations per point
    points: int = 0  # points integrated
    guarded_points: int = 0  # points guarded at least once
    on_plane: int = 0  # radial only: points that end exactly on the plane z = 0 (never lifted)


def radial_guard_threshold(dim: int, dtype: torch.dtype) -> float:
    """Relative size c below which the radial update's |f . y~| <= c |f| |y~| is treated as 0.

    The computed dot product of n = dim terms carries a rounding error of up to about
    n u |f| |y~| (Higham's gamma_n, u the unit roundoff of `dtype`), so below that bound its
    sign and size are rounding noise and delta / (f . y~) is not the blog's update but an
    arbitrary jump; above it the update is well defined and is taken whatever its sign
    (docs/DESIGN.md, "The flow"). c = max(1e-12, n u): 1e-12 in float64 up to n = 9000, 7.7e-6
    for n = 129 in float32. At the bound one step moves a point by at most delta / (c |y~|)."""
    return max(1e-12, float(dim) * torch.finfo(dtype).eps / 2.0)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pt-step", leave=False)


def empirical_flow(
    x0: torch.Tensor,
    z0: torch.Tensor,
    charges: torch.Tensor,
    weights: torch.Tensor | None,
    z_end: float,
    steps: int,
    solver: str,
    *,
    exclude: torch.Tensor | None = None,
    backend: str = "cpu",
    progress: bool = False,
    batch_size: int = 16384,
) -> torch.Tensor:
    """x at height z_end for points starting at (x0, z0) (z0 per point), log-z time, `steps`
    fused steps per point (per-point step dt = (log z_end - log z0) / steps). Flow time t0 and
    dt are float64 on every backend (what each kernel does with them: docs/ARCHITECTURE.md)."""
    t0 = torch.log(z0.to(torch.float64))
    dt = (math.log(z_end) - t0) / steps
    step_fn = registry.get(backend).module().flow_steps
    n = x0.shape[0]
    chunk = max(1, math.ceil(steps / STEP_CHUNKS))
    bar = _progress_bar(n * steps, progress, f"Poisson flow ({solver})")
    out = []
    for i0 in range(0, n, batch_size):
        i1 = min(n, i0 + batch_size)
        x = x0[i0:i1]
        ex = None if exclude is None else exclude[i0:i1]
        done = 0
        while done < steps:
            k = min(chunk, steps - done)
            t_start = t0[i0:i1] + done * dt[i0:i1]
            x = step_fn(x, charges, weights, t_start, dt[i0:i1], k, solver, exclude=ex)
            done += k
            if bar is not None:
                bar.update((i1 - i0) * k)
        out.append(x)
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else x0.clone()


FieldFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def field_flow(
    field: FieldFn,
    x0: torch.Tensor,
    z0: torch.Tensor,
    *,
    parameterization: str,
    solver: str,
    steps: int,
    z_end: float | None = None,
    delta: float | None = None,
    guard: float = 1e-5,
    radial_guard: float | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, FlowStats]:
    """Integrates a field f(x, z) -> (f_x (N, d), f_z (N,)) given up to a positive factor.

    parameterization="logz": dx~/dt = z f / f_z from t = log z0 to log z_end. Where f_z <=
    `guard` |f| the direction is undefined: the point is frozen for that evaluation and the
    event is counted in the returned stats (guard_fired).
    parameterization="radial": `steps` steps of y~ += delta f / (f . y~) (the blog's update,
    origin at 0), taken wherever it is defined, for either sign of f . y~ (a point with
    f . y~ < 0 moves along -f; |y~|^2 / 2 still grows by >= delta). Only where |f . y~| <=
    c |f| |y~| with c = `radial_guard` (default radial_guard_threshold(d + 1, dtype)) is the
    step skipped for that point and counted: there the division is by rounding noise.

    stats: guard_fired counts guarded point-evaluations, guarded_points the points guarded at
    least once, on_plane (radial) the points whose final z is exactly 0.
    """
    if parameterization not in ("logz", "radial"):
        raise ValueError(f"parameterization must be 'logz' or 'radial', got {parameterization!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    stats = FlowStats(
        steps=steps, solver=solver, parameterization=parameterization, points=int(x0.shape[0])
    )
    x = x0.clone()
    z = z0.clone().to(x.dtype)
    if radial_guard is None:
        radial_guard = radial_guard_threshold(x.shape[1] + 1, x.dtype)
    ever = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    bar = _progress_bar(steps, progress, f"Poisson flow ({parameterization}, {solver})")

    def velocity(xx, zz):
        fx, fz = field(xx, zz)
        stats.evaluations += 1
        if parameterization == "logz":
            # Where the field does not point upward (f_z <= guard |f|) z f / f_z is undefined or
            # huge; the point is frozen for that evaluation (zero horizontal velocity; z still
            # follows e^t) and the event counted. PFGM's sampler has no such guard (it divides
            # by v_z + 1e-5); clamping f_z instead was measured on the 2-D toy to throw points
            # ~1e5 z away (worst angular error 62-103 deg against the exact flow; 26 deg frozen).
            norm = torch.sqrt((fx * fx).sum(1) + fz * fz)
            bad = fz <= guard * norm
            stats.guard_fired += int(bad.sum())
            ever.logical_or_(bad)
            safe = torch.where(bad, torch.ones_like(fz), fz)
            vx = zz[:, None] * fx / safe[:, None]
            return torch.where(bad[:, None], torch.zeros_like(vx), vx), zz
        # The blog's update divides by f . y~ whatever its sign (its code has no guard); the
        # earlier `dot <= 0` guard froze 29-34% of CIFAR points on the plane for good (a point
        # at z = 0 with f . y~ <= 0 never changes, so it is guarded at every later step).
        # Only a dot product within its rounding error of 0 is skipped (docs/DESIGN.md
        # "The flow", radial_guard_threshold).
        dot = (fx * xx).sum(1) + fz * zz
        size = torch.sqrt((fx * fx).sum(1) + fz * fz) * torch.sqrt((xx * xx).sum(1) + zz * zz)
        bad = dot.abs() <= radial_guard * size
        stats.guard_fired += int(bad.sum())
        ever.logical_or_(bad)
        scale = torch.where(bad, torch.zeros_like(dot), 1.0 / torch.where(bad, 1.0, dot))
        return fx * scale[:, None], fz * scale

    if parameterization == "logz":
        # in log-z time z is known exactly: z = exp(t); only x is integrated. t and h are
        # float64 (as on every flow path); z is handed to the field in x's dtype.
        t = torch.log(z0.to(torch.float64))
        h = (math.log(z_end) - t) / steps

        def f(xx, tt):
            return velocity(xx, torch.exp(tt).to(xx.dtype))[0]

        x = integrate(f, x, t, h, steps, solver, on_step=None if bar is None else bar.update)
        z = torch.exp(t + steps * h).to(x.dtype)
    else:
        h = torch.full_like(z, float(delta))
        for _ in range(steps):
            state = torch.cat([x, z[:, None]], 1)

            def g(st, _t):
                vx, vz = velocity(st[:, :-1], st[:, -1])
                return torch.cat([vx, vz[:, None]], 1)

            state = step(g, state, torch.zeros_like(z), h, solver)
            x, z = state[:, :-1], state[:, -1]
            if bar is not None:
                bar.update(1)
        stats.on_plane = int((z == 0).sum())
    stats.guarded_points = int(ever.sum())
    if bar is not None:
        bar.close()
    return x, z, stats
