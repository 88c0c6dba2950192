"""The Poisson flow ODE (docs/DESIGN.md section 3): integrators and their time parameterisations.

State x~ = (x, z) in R^(d+1), charges (y_j, 0) on the plane z = 0.

* log-z time ("logz", PFGM's change of variable): z = e^t and dx~/dt = z f / f_z for a field f.
  For the exact empirical field f_z is proportional to z, so the ODE collapses to
  dx/dt = x - mu(x, z) = v(x; eps = z, p = d + 1): the fused kernels integrate it.
* radial ("radial", the blog's preset): y~ <- y~ + delta f / (f . y~), each step raising
  |y~|^2 / 2 by exactly delta; undefined where f . y~ <= 0 (counted and frozen, see below).

`empirical_flow` runs the fused Euler/RK4 kernels of a backend (one call integrates a batch of
queries through a chunk of steps; the chunking is fixed so results do not depend on whether a
progress bar is shown). `field_flow` integrates any field callable (a learned network, or the
empirical field for the radial preset) step by step in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import registry
from .reference import flow_steps as flow_steps_reference

__all__ = [
    "empirical_flow",
    "field_flow",
    "flow_steps_reference",
    "integrate",
    "step",
    "FlowStats",
    "SOLVERS",
    "RK4_A",
    "RK4_B",
    "RK4_C",
]

SOLVERS = ("euler", "rk4")
STEP_CHUNKS = 20  # calls per batch: progress granularity (does not depend on `progress`)

# The classic RK4 tableau, the one copy on the Python side (this driver and the Triton flow
# kernel read it; the compiled kernels' copy, poissonflow._C.numerics(), is checked equal to it
# by tests/conformance): stage i is evaluated at t + C[i] h on the state x + A[i] h k_(i-1),
# and the step is x + h (B[0] k_0 + ... + B[3] k_3) / RK4_B_DIV.
RK4_A = (0.0, 0.5, 0.5, 1.0)
RK4_C = (0.0, 0.5, 0.5, 1.0)
RK4_B = (1.0, 2.0, 2.0, 1.0)
RK4_B_DIV = 6.0


@dataclass
class FlowStats:
    """What happened during an integration (reported by transform and the estimator)."""

    steps: int = 0
    solver: str = ""
    parameterization: str = ""
    guard_fired: int = 0  # field evaluations where f_z <= 0 (logz) or f . y~ <= 0 (radial)
    evaluations: int = 0  # field evaluations per point


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
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, FlowStats]:
    """Integrates a field f(x, z) -> (f_x (N, d), f_z (N,)) given up to a positive factor.

    parameterization="logz": dx~/dt = z f / f_z from t = log z0 to log z_end. Where f_z <=
    `guard` |f| the direction is undefined: the point is frozen for that evaluation and the
    event is counted in the returned stats (guard_fired).
    parameterization="radial": `steps` steps of y~ += delta f / (f . y~) (the blog's update,
    origin at 0). Where f . y~ <= 0 the step is skipped for that point (frozen) and counted.
    """
    if parameterization not in ("logz", "radial"):
        raise ValueError(f"parameterization must be 'logz' or 'radial', got {parameterization!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    stats = FlowStats(steps=steps, solver=solver, parameterization=parameterization)
    x = x0.clone()
    z = z0.clone().to(x.dtype)
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
            safe = torch.where(bad, torch.ones_like(fz), fz)
            vx = zz[:, None] * fx / safe[:, None]
            return torch.where(bad[:, None], torch.zeros_like(vx), vx), zz
        dot = (fx * xx).sum(1) + fz * zz
        bad = dot <= 0
        stats.guard_fired += int(bad.sum())
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
    if bar is not None:
        bar.close()
    return x, z, stats


def step(f, x, t, h, solver):
    """One Euler or classic RK4 step of dx/dt = f(x, t): x (N, d), t and h (N,) per point.

    The only RK4 written in Python: every unfused path (the reference flow, the learned and
    radial flows here, the CUDA backend's per-stage fallback, the benchmarks' unfused loop)
    steps through it. t and h may be float64 while x is float32: the stage times stay in t's
    dtype, the state update is in x's.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    hc = h[:, None].to(x.dtype)
    if solver == "euler":
        return x + hc * f(x, t)
    ks = []
    for a, c in zip(RK4_A, RK4_C):
        xi = x if not ks else x + a * hc * ks[-1]
        ks.append(f(xi, t if c == 0.0 else t + c * h))
    total = RK4_B[0] * ks[0]
    for b, k in zip(RK4_B[1:], ks[1:]):
        total = total + b * k
    return x + hc / RK4_B_DIV * total


def integrate(f, x, t0, h, n_steps: int, solver: str, *, on_step=None):
    """n_steps of `step` from per-point times t0 with per-point steps h (N,): t = t0 + s h is
    recomputed each step (not accumulated), so long runs do not drift. on_step(1) after each."""
    for s in range(int(n_steps)):
        x = step(f, x, t0 + s * h, h, solver)
        if on_step is not None:
            on_step(1)
    return x
