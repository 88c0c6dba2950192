"""The ODE driver: one Euler or classic RK4 step of dx/dt = f(x, t) and a loop of them.

A leaf module (it imports nothing of the package), so that every backend may take the driver
and the RK4 tableau from here without importing anything above it: the reference flow, the
CUDA backend's per-stage fallback and the Triton flow kernel's tableau all read this file, as
do the learned and radial flows of `poissonflow.flow`.
"""

from __future__ import annotations

__all__ = ["SOLVERS", "RK4_A", "RK4_B", "RK4_B_DIV", "RK4_C", "step", "integrate"]

SOLVERS = ("euler", "rk4")

# The classic RK4 tableau, the one copy on the Python side (this driver and the Triton flow
# kernel read it; the compiled kernels' copy, poissonflow._C.numerics(), is checked equal to it
# by tests/conformance): stage i is evaluated at t + C[i] h on the state x + A[i] h k_(i-1),
# and the step is x + h (B[0] k_0 + ... + B[3] k_3) / RK4_B_DIV.
RK4_A = (0.0, 0.5, 0.5, 1.0)
RK4_C = (0.0, 0.5, 0.5, 1.0)
RK4_B = (1.0, 2.0, 2.0, 1.0)
RK4_B_DIV = 6.0


def step(f, x, t, h, solver):
    """One Euler or classic RK4 step of dx/dt = f(x, t): x (N, d), t and h (N,) per point.

    The only RK4 written in Python: every unfused path (the reference flow, the learned and
    radial flows of poissonflow.flow, the CUDA backend's per-stage fallback, the benchmarks' unfused
    loop)
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
