"""`poissonflow.transform`: push features through a Poisson flow, get uniformised features.

    z = poissonflow.transform(features)            # (N, d) -> (N, d + 1) on the unit sphere

The features are charges on the plane z = 0 of R^(d+1) (or `charges` are, when given); each
point starts at (x, z_min) ("plane") or on a tiny hemisphere around its own charge ("flux") and
follows the field up to z_max. `output="sphere"` returns the end points as directions from the
charges' centre, (x - c, z) / |(x - c, z)| on the upper hemisphere of S^d; `"raw"` the end points.

Train and test points are treated alike: a query that coincides exactly with a charge ignores
that charge (`exclude_self=True`, leave-one-out), so the features that are charges move like
held-out ones (docs/DESIGN.md, "The flow" and fact H6: without it, training points sitting on their
own charge become a different population).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from . import _checks, horizon, registry
from .field import resolve_backend
from .flow import empirical_flow, field_flow
from .ode import SOLVERS

__all__ = ["transform", "coincident_charge", "DEFAULT_STEPS"]

DEFAULT_STEPS = {"rk4": 32, "euler": 256}
# More steps than this is a mistake, not a finer integration: RK4's error falls 12-20x per
# doubling of the steps (docs/DESIGN.md, fact H1), so a few hundred steps are already at float32
# rounding, while a million steps of a 10k-point flow is hours of kernel time on a CPU.
MAX_STEPS = 1_000_000
STARTS = ("plane", "flux")
OUTPUTS = ("sphere", "raw")
PARAMETERIZATIONS = ("logz", "radial")


def transform(
    features: torch.Tensor | np.ndarray,
    *,
    charges: torch.Tensor | np.ndarray | None = None,
    weights: torch.Tensor | np.ndarray | None = None,
    field: Any = "empirical",
    start: str = "plane",
    solver: str | None = None,
    steps: int | None = None,
    z_min: float | str = "auto",
    z_max: float | str = "auto",
    parameterization: str | None = None,
    output: str | None = None,
    exclude_self: bool = True,
    seed: int | None = None,
    backend: str = "auto",
    progress: bool | None = None,
    batch_size: int = 16384,
    return_info: bool = False,
) -> torch.Tensor | np.ndarray | tuple[torch.Tensor | np.ndarray, dict[str, Any]]:
    """Poisson-flow transform of `features` (N, d), a torch tensor or numpy array; returns the
    same kind, in the input's floating dtype (float64 for integer input) and, for torch, on the
    input's device. float32 input is computed in float32, everything else in float64.

    Not differentiable: a tensor that requires grad (with grad mode on) is refused rather than
    silently detached. The flow's fused kernels have no backward, and an unfused RK4 through the
    autograd-aware field op was measured at 6.0x the fused flow's time (N = B = 2048, d = 32,
    RK4 x 32, forward + backward) with every stage's state kept for the backward; the exclusion by
    exact coincidence and the data-driven horizon are not differentiable choices either. For a
    differentiable objective use `poisson_field` (autograd-aware) or `poissonflow.losses`.

    Args:
        features: (N, d) points to flow (torch tensor or numpy array).
        charges: (B, d) charge positions; default: the features themselves.
        weights: optional (B,) non-negative charge weights.
        field: "empirical" (the exact field of the charges, fused kernels) or a learned field
            (an object with `field_fn(x, z) -> (f_x, f_z)` and `default_flow()`, e.g.
            poissonflow.LearnedField), integrated step by step.
        start: "plane" - (x, z_min); "flux" - (y_j + delta u_x, delta |u_z|) with u uniform on
            S^d, seeded, around each point's own charge: exactly uniform end points
            (docs/DESIGN.md, "The flow"); needs every query to be a charge.
        solver: "rk4" (default) or "euler".
        steps: solver steps per point (default 32 for RK4, 256 for Euler).
        z_min: the height where the flow starts, or "auto" (0.5 x the median
            nearest-neighbour distance of the charges).
        z_max: the height where it stops, or "auto" (1e3 x the data scale).
        parameterization: "logz" (PFGM, default for the empirical field) or "radial" (the
            blog's y <- y + delta f / (f . y), delta = (z_max^2 - z_min^2) / (2 steps)).
        output: "sphere" (d + 1 columns on the unit sphere, directions from the charges' mean,
            or from a learned field's training mean) or "raw" (end points (x, z)); default
            "sphere", or the learned field's preset's ("raw" for the blog, as it fed them to
            its classifier).
        exclude_self: a query equal to a charge ignores it (leave-one-out; empirical field only,
            a learned field is one fixed function); default True.
        seed: for start="flux" directions.
        backend: field kernels: "auto", "cpu", "cuda", "triton" or "reference".
        progress: tqdm bar with an estimate of the time left; None shows it only for long runs
            (> 1e10 pair-steps) when stderr is a terminal.
        batch_size: queries per kernel call (an integer >= 1; memory, not results, depends on
            it).
        return_info: also return a dict with the horizon, steps, exclusions and timing.

    Returns:
        The (N, d + 1) flowed features, or `(flowed, info)` with `return_info=True`.
    """
    t_start = time.perf_counter()
    x, kind, x_dtype = _as_tensor(features, "features", keep_dtype=True)
    batch_size = _check_count(batch_size, "batch_size", 1, None)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if not isinstance(exclude_self, (bool, np.bool_)):
        raise TypeError(f"exclude_self must be True or False, got {exclude_self!r}")
    _validate_enums(start, output, solver, parameterization)
    learned = not isinstance(field, str)
    if not learned and field != "empirical":
        raise ValueError(f"field must be 'empirical' or a learned field object, got {field!r}")
    y, w = _resolve_charges(charges, weights, x)
    N, d = x.shape

    # A learned field brings its own defaults (its preset's ODE); explicit arguments win.
    defaults = field.default_flow() if learned else {}
    output = output or defaults.get("output", "sphere")
    solver = solver or defaults.get("solver", "rk4")
    parameterization = parameterization or defaults.get("parameterization", "logz")
    if steps is None:
        steps = defaults.get("steps", DEFAULT_STEPS[solver])
    steps = _check_count(steps, "steps", 1, MAX_STEPS)
    # z_min = 0 (the blog's start on the plane) is defined only for a learned field in the
    # radial parameterisation; log-z time needs z > 0.
    zero_ok = learned and parameterization == "radial"
    zmin = _horizon_value(
        z_min,
        "z_min",
        lambda: defaults.get("z_min", None) if "z_min" in defaults else horizon.auto_z_min(y),
        allow_zero=zero_ok,
    )
    zmax = _horizon_value(z_max, "z_max", lambda: defaults.get("z_max") or horizon.auto_z_max(y, w))
    if not zmin < zmax:
        raise ValueError(f"z_min must be < z_max, got z_min={zmin:.4g}, z_max={zmax:.4g}")
    if zmin <= 0 and not zero_ok:
        raise ValueError("z_min must be > 0 (log-z time starts at log z_min)")
    delta = defaults.get("delta") if parameterization == "radial" else None
    if parameterization == "radial" and delta is None:
        delta = (zmax**2 - zmin**2) / (2.0 * steps)  # |y~|^2 / 2 rises by this per step

    exclude = (
        coincident_charge(x, y) if (not learned and (exclude_self or start == "flux")) else None
    )
    if learned and start == "flux":
        raise ValueError("start='flux' needs the empirical field (it starts next to a charge)")
    if start == "flux":
        if bool((exclude < 0).any()):
            raise ValueError(
                f"start='flux' starts each point next to its own charge, but "
                f"{int((exclude < 0).sum())} of the {N} features are not charges; use "
                "start='plane' for held-out points"
            )
        x0, z0 = _flux_start(y, exclude, horizon.flux_delta(y), seed)
        excl_used = None  # a flux start must feel its own charge: that is where its line starts
    else:
        x0 = x
        z0 = torch.full((N,), zmin, dtype=torch.float64, device=x.device)
        excl_used = exclude if (exclude_self and not learned) else None

    which = resolve_backend(backend, x.device)
    if progress is None:
        progress = sys.stderr.isatty() and (
            N * y.shape[0] * steps * (4 if solver == "rk4" else 1) > 1e10
        )
    info: dict[str, Any] = {
        "z_min": zmin,
        "z_max": zmax,
        "steps": steps,
        "solver": solver,
        "start": start,
        "parameterization": parameterization,
        "backend": which,
        "exclude_self": bool(exclude_self) and not learned,
        "field": "learned" if learned else "empirical",
        "output": output,
        "excluded": 0 if excl_used is None else int((excl_used >= 0).sum()),
        "delta": delta,
    }
    if not learned and parameterization == "logz":
        xe = empirical_flow(
            x0,
            z0,
            y,
            w,
            zmax,
            steps,
            solver,
            exclude=excl_used,
            backend=which,
            progress=progress,
            batch_size=batch_size,
        )
        ze = torch.full((N,), zmax, dtype=x.dtype, device=x.device)
    else:
        fn = field.field_fn if learned else _empirical_field_fn(y, w, excl_used, which)
        xe, ze, stats = field_flow(
            fn,
            x0,
            z0.to(x.dtype),
            parameterization=parameterization,
            solver=solver,
            steps=steps,
            z_end=zmax,
            delta=delta,
            progress=progress,
        )
        info["guard_fired"] = stats.guard_fired
        info["guarded_points"] = stats.guarded_points  # points guarded at least once
        info["on_plane"] = stats.on_plane  # radial: points whose final z is exactly 0
    centre = getattr(field, "center_", None) if learned else None
    out = _output(xe, ze, y, w, output, centre)
    info["seconds"] = time.perf_counter() - t_start
    result = _back(out, kind, x_dtype, features)
    return (result, info) if return_info else result


def coincident_charge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) int64: for each query the index of the first charge with bitwise identical
    coordinates, or -1. O((N + B) d) through a hash of the rows."""
    if x is y:
        return torch.arange(x.shape[0], device=x.device)
    ya = np.ascontiguousarray(y.detach().cpu().numpy())
    xa = np.ascontiguousarray(x.detach().to(y.dtype).cpu().numpy())
    first: dict[bytes, int] = {}
    for j in range(ya.shape[0] - 1, -1, -1):
        first[ya[j].tobytes()] = j
    out = np.fromiter((first.get(r.tobytes(), -1) for r in xa), dtype=np.int64, count=len(xa))
    return torch.from_numpy(out).to(x.device)


def _empirical_field_fn(y, w, exclude, backend):
    """f(x, z) of the exact field for the radial parameterisation: (v, z) up to exp(log_scale)
    (the z component of sum_j pi_ij (x~_i - y~_j) is z, as the charges sit at z = 0)."""
    mod = registry.get(backend).module()

    def fn(xx, zz):
        v, _ = mod.field_forward(
            xx, y, w, float(xx.shape[1] + 1), 0.0, exclude=exclude, eps_rows=zz
        )
        return v, zz

    return fn


def _flux_start(y, own, delta, seed):
    """(y_j + delta u_x, delta |u_z|) for each point's own charge j, u uniform on S^d."""
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    d = y.shape[1]
    u = torch.randn(own.shape[0], d + 1, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    x0 = (y[own].double() + delta * u[:, :d]).to(y.dtype)
    z0 = (delta * u[:, d].abs()).clamp_min(1e-300 if y.dtype == torch.float64 else 1e-30)
    return x0, z0.to(y.device)


def _output(xe, ze, y, w, output, centre=None):
    if output == "raw":
        return torch.cat([xe, ze[:, None].to(xe.dtype)], dim=1)
    if centre is not None:  # a learned field: its training mean, whatever is in this batch
        c = torch.as_tensor(centre).to(xe.device, xe.dtype)
    elif w is None:
        c = y.mean(0)
    else:
        c = (w[:, None] * y).sum(0) / w.sum()
    u = torch.cat([(xe - c).double(), ze[:, None].double()], dim=1)
    return (u / u.norm(dim=1, keepdim=True)).to(xe.dtype)


def _horizon_value(value, name, auto, allow_zero=False):
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be a positive number or 'auto', got {value!r}")
        return float(auto())
    v = _checks.check_positive(value, name, allow_zero=allow_zero)
    if v > 1e18:
        raise ValueError(f"{name} = {v:.3g} is too large (z^2 must fit in float32)")
    return v


def _validate_enums(start, output, solver, parameterization):
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if output is not None and output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if parameterization is not None and parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )


def _as_tensor(a, name: str, keep_dtype: bool = False):
    """A 2-D float tensor (float32 stays float32, everything else becomes float64), N >= 1; with
    keep_dtype also the floating dtype the result goes back in."""
    if isinstance(a, torch.Tensor):
        kind = "torch"
        if a.is_complex():
            raise TypeError(
                f"{name} is a complex tensor ({a.dtype}); the flow is defined for real features"
            )
        if not (a.is_floating_point() or a.dtype in _INT_DTYPES):
            raise TypeError(f"{name} must be a real numeric tensor, got dtype {a.dtype}")
        if a.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but transform is not differentiable (its ODE kernels "
                f"have no backward): pass {name}.detach(), or call it under torch.no_grad(); "
                "poisson_field and poissonflow.losses are the differentiable pieces"
            )
        t = a.detach()
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
    elif isinstance(a, np.ndarray):
        kind = "numpy"
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(a))
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(a).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples): nothing to transform")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    if t.dtype != torch.float32:
        t = t.to(torch.float64)
    _checks.check_finite(t, name, dim=t.shape[1] + 1)
    if keep_dtype:
        return t.contiguous(), kind, out_dtype
    return t.contiguous(), kind


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_count(value, name: str, least: int, most: int | None) -> int:
    """An integer in [least, most], named in the error (bools and floats are refused: 2.5
    steps or batch_size=True is a mistake, not a request)."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))
    if not ok or value < least or (most is not None and value > most):
        bound = f"an integer >= {least}" + ("" if most is None else f" and <= {most:,}")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(value)


def _resolve_charges(charges, weights, x):
    if charges is None:
        y = x
    else:
        y, _ = _as_tensor(charges, "charges")
        y = y.to(device=x.device, dtype=x.dtype)
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"charges have {y.shape[1]} features but the features to transform have "
                f"{x.shape[1]}"
            )
    w = None
    if weights is not None:
        w, _ = _as_tensor(
            np.asarray(weights)[:, None]
            if not isinstance(weights, torch.Tensor)
            else weights[:, None],
            "weights",
        )
        w = w[:, 0].to(device=x.device, dtype=x.dtype)
        if w.shape[0] != y.shape[0]:
            raise ValueError(f"weights must have one entry per charge ({y.shape[0]})")
        if bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("weights must be non-negative with a positive sum")
    return y, w


def _back(out: torch.Tensor, kind: str, dtype: torch.dtype, like):
    out = out.to(dtype)
    if kind == "numpy":
        return out.cpu().numpy()
    return out.to(like.device)
