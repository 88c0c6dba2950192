"""The fused flow kernels and the ODE: steps against the float64 reference, convergence order,
uniformity of the end points (docs/DESIGN.md, "The flow"), continuity and determinism.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import cpu_isas, forced_isa
from scipy import stats

from poissonflow import horizon
from poissonflow.flow import empirical_flow
from poissonflow.kernels import cpu as _cpu
from poissonflow.kernels.reference import flow_steps as flow_steps_reference
from poissonflow.metrics import uniform_hemisphere, wasserstein_uniformity
from poissonflow.transform import transform


def rel_rows(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def step_case(N, B, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    w = (0.5 + torch.rand(B, generator=g, dtype=torch.float64)).to(dtype)
    t0 = torch.log(0.05 + torch.rand(N, generator=g, dtype=torch.float64))  # per-query height
    dt = 0.05 + 0.2 * torch.rand(N, generator=g, dtype=torch.float64)  # per-query step
    return x, y, w, t0, dt


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (45, 70, 2), (33, 129, 16), (20, 50, 128)])
def test_fused_steps_match_reference(isa, solver, dtype, shape):
    """Fused kernel steps against a pure-PyTorch float64 loop of the same ODE. Tolerance:
    1e-5 relative in float32 (tighter than the suite's flow tolerance on the displacement:
    each stage is one field evaluation with the forward's ~1e-5 error, the steps here are
    contractive, and the end state's rows are dominated by the start), 1e-12 in float64."""
    x, y, w, t0, dt = step_case(*shape, dtype)
    ex = torch.arange(shape[0]) % shape[1] if shape[1] > 1 else None
    with forced_isa(isa):
        got = _cpu.flow_steps(x, y, w, t0, dt, 3, solver, exclude=ex)
    ref = flow_steps_reference(x.double(), y.double(), w.double(), t0, dt, 3, solver, exclude=ex)
    assert rel_rows(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-12)


def test_convergence_order():
    """Smooth case (heights well above the charge spacing): RK4's error falls ~16x when the
    steps double, Euler's ~2x. Errors against a 1024-step float64 RK4 solution."""
    x, y, _, _, _ = step_case(30, 40, 3, torch.float64, seed=2)
    z0 = torch.full((30,), 0.5, dtype=torch.float64)

    def run(steps, solver):
        return empirical_flow(x, z0, y, None, 5.0, steps, solver)

    exact = run(1024, "rk4")
    err = {(s, n): (run(n, s) - exact).norm().item() for s in ("rk4", "euler") for n in (8, 16)}
    rk4_ratio = err[("rk4", 8)] / err[("rk4", 16)]
    euler_ratio = err[("euler", 8)] / err[("euler", 16)]
    assert 12.0 <= rk4_ratio <= 20.0, rk4_ratio
    assert 1.6 <= euler_ratio <= 2.5, euler_ratio


def mixture_2d(n, g):
    """An anisotropic mixture of four Gaussians in R^2."""
    comps = torch.randint(0, 4, (n,), generator=g)
    means = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 2.5], [1.0, -3.0]], dtype=torch.float64)
    shapes = torch.tensor(
        [
            [[1.0, 0.0], [0.6, 0.2]],
            [[0.3, 0], [0, 1.2]],
            [[0.8, 0.5], [0, 0.3]],
            [[0.2, 0], [0.1, 0.9]],
        ],
        dtype=torch.float64,
    )
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return means[comps] + torch.einsum("nij,nj->ni", shapes[comps], z)


def test_uniformity_3d_held_out_plane_start():
    """2000 charges in R^2, 1000 held-out points from the same mixture, start='plane' at the
    default z_min, RK4 to 1e4 x the data scale. Measured over 10 seeds: azimuth p-values
    0.028-0.88, height KS 0.016-0.059 (poissonflow/horizon.py)."""
    g = torch.Generator().manual_seed(100)
    y = mixture_2d(2000, g)
    q = mixture_2d(1000, g)
    zmax = 1e4 * horizon.data_scale(y)
    u = transform(q, charges=y, z_max=zmax)
    azimuth = (torch.atan2(u[:, 1], u[:, 0]).numpy() + np.pi) / (2 * np.pi)
    assert stats.kstest(azimuth, "uniform").pvalue > 0.01
    assert stats.kstest(u[:, 2].numpy(), "uniform").statistic <= 0.08


def hemisphere_mean_height(m):
    """E[u_m] for u uniform on the upper hemisphere of S^(m-1)."""
    return math.exp(math.lgamma(m / 2) - math.lgamma((m + 1) / 2)) / math.sqrt(math.pi)


def test_uniformity_d16_flux_start():
    """start='flux' from 1000 of 2000 charges (4-cluster mixture in R^16): by flux conservation
    the end points are uniform on the hemisphere; W2 within 0.03 of uniform samples', mean
    height within 0.02."""
    g = torch.Generator().manual_seed(7)
    centers = 2.0 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    y = centers[torch.randint(0, 4, (2000,), generator=g)] + torch.randn(
        2000, 16, generator=g, dtype=torch.float64
    )
    u = transform(y[:1000], charges=y, start="flux", seed=3)
    ref = uniform_hemisphere(1000, 17, seed=4)
    assert abs(float(wasserstein_uniformity(u)) - float(wasserstein_uniformity(ref))) <= 0.03
    assert abs(u[:, -1].mean().item() - hemisphere_mean_height(17)) <= 0.02


def test_transform_is_continuous_for_held_out_points():
    """Nearby inputs give nearby outputs: |T(x + d u) - T(x)| <= L |d| / scale with L = 20
    (measured max 6.4 in 3-D and 5.9 on digits), and the ratio is the same at d and d / 10
    (locally linear). Away from the charges only: a query exactly on a charge excludes it
    (leave-one-out), which is a jump by design."""
    g = torch.Generator().manual_seed(5)
    y = mixture_2d(2000, g)
    q = mixture_2d(100, g)
    scale = horizon.data_scale(y)
    u = torch.randn(100, 2, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    base = transform(q, charges=y)
    ratios = []
    for d in (1e-4, 1e-5):
        moved = transform(q + d * scale * u, charges=y)
        ratios.append((moved - base).norm(dim=1) / d)
    assert ratios[0].max() <= 20.0
    assert torch.allclose(ratios[0], ratios[1], rtol=0.2, atol=1e-3)


def test_transform_is_deterministic_across_runs_and_threads():
    g = torch.Generator().manual_seed(9)
    x = mixture_2d(300, g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = transform(x, start="flux", seed=1)
        torch.set_num_threads(2)
        b = transform(x, start="flux", seed=1)
        c = transform(x)
        d = transform(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b) and torch.equal(c, d)


# --------------------------------------------------------------- the radial (blog) update


def _radial(field, x0, steps=5, delta=0.01, **kw):
    from poissonflow.flow import field_flow

    z0 = torch.zeros(x0.shape[0], dtype=x0.dtype)
    return field_flow(
        field, x0, z0, parameterization="radial", solver="euler", steps=steps, delta=delta, **kw
    )


def test_radial_update_runs_for_either_sign_and_guards_only_a_vanishing_dot():
    """docs/DESIGN.md, "The flow": y~ += delta f / (f . y~) is taken wherever |f . y~| is above
    its rounding-error level, whatever its sign. Field f = (A x, 1) at z = 0 with A = diag(+1,
    -1, 0): point 0 has f . y~ > 0, point 1 f . y~ < 0, point 2 f . y~ = 0 exactly (f is
    orthogonal to y~ on the plane). Points 0 and 1 both leave the plane and |y~|^2 / 2 grows
    by at least delta a step; point 2 is guarded at every step and stays where it started."""
    A = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)

    def field(x, z):
        return x * A, torch.ones_like(z)

    x0 = torch.eye(3, dtype=torch.float64)
    steps, delta = 5, 0.01
    x, z, stats = _radial(field, x0, steps, delta)
    r2 = (x * x).sum(1) + z * z
    assert torch.all(r2[:2] >= 1.0 + 2 * steps * delta - 1e-12)
    assert z[0] > 0 and z[1] < 0  # f . y~ < 0: the point moves along -f (z_f = 1 > 0)
    assert torch.equal(x[2], x0[2]) and z[2] == 0
    assert stats.guard_fired == steps and stats.guarded_points == 1 and stats.on_plane == 1
    assert stats.points == 3


def test_radial_guard_threshold_is_the_dot_products_rounding_level():
    from poissonflow.flow import radial_guard_threshold

    assert radial_guard_threshold(129, torch.float64) == 1e-12  # 129 u = 1.4e-14 < 1e-12
    assert radial_guard_threshold(129, torch.float32) == pytest.approx(129 * 2.0**-24)
    # a dot product just above the threshold is divided by; just below, guarded
    c = radial_guard_threshold(3, torch.float64)
    for scale, guarded in ((10.0, 0), (0.1, 1)):

        def field(x, z, s=scale):
            f = torch.zeros_like(x)
            f[:, 1] = 1.0
            f[:, 0] = s * c  # f . y~ = s c |y~| on y~ = (1, 0, 0, 0); |f| ~ 1
            return f, torch.zeros_like(z)

        _, _, stats = _radial(field, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), steps=1)
        assert stats.guard_fired == guarded


def test_blog_preset_on_real_features_leaves_no_point_on_the_plane():
    """The blog preset's flow of real-like features (the
    L2-normalised 128-d mixture of tests/test_learned.py) through a briefly trained blog field
    (8 iterations: measured to leave the field pointing toward the plane, f . y~ < 0, at a
    share of the start points, which the former `f . y~ <= 0` guard froze on the plane for
    good) lifts every point off the plane; the counts are in return_info: nothing guarded,
    nothing on the plane, since no |f . y~| is near its rounding level."""
    from poissonflow.learned import LearnedField

    g = torch.Generator().manual_seed(0)
    means = torch.nn.functional.normalize(torch.randn(10, 128, generator=g), dim=1)
    x = means[torch.randint(0, 10, (2600,), generator=g)] + 0.75 * torch.randn(
        2600, 128, generator=g
    ) / math.sqrt(128)
    x = torch.nn.functional.normalize(x, dim=1).double()
    train, held = x[:2048], x[2048:]
    field = LearnedField(preset="blog", epochs=4, device="cpu").fit(train, progress=False)
    fx, fz = field.field_fn(held, torch.zeros(len(held), dtype=held.dtype))
    dot = (fx * held).sum(1)
    assert int((dot < 0).sum()) > 0  # points the former guard froze at z = 0
    out, info = transform(held.numpy(), field=field, output="raw", return_info=True)
    assert info["guard_fired"] == 0 and info["guarded_points"] == 0 and info["on_plane"] == 0
    assert np.all(out[:, -1] != 0)
    assert np.all((out**2).sum(1) >= 3.0 - 1e-9)  # |y~|^2 / 2 rose by >= 100 x 0.01


def test_guarded_points_are_counted_in_return_info():
    """A field orthogonal to y~ on the plane for half the points (f . y~ = 0 exactly): those
    stay on the plane, are guarded at all 100 steps, and return_info counts them."""
    from poissonflow.learned import LearnedField

    x = torch.nn.functional.normalize(
        torch.randn(40, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=1
    )
    field = LearnedField(preset="blog", epochs=1, large_batch=32, small_batch=8, device="cpu").fit(
        x, progress=False
    )
    dead = torch.arange(40) < 20

    def orthogonal_for_half(xx, zz):
        fx = torch.where(
            dead[:, None], torch.stack([-xx[:, 1], xx[:, 0], -xx[:, 3], xx[:, 2]], 1), xx
        )
        return fx, torch.ones_like(zz)

    field.field_fn = orthogonal_for_half
    out, info = transform(x, field=field, output="raw", return_info=True)
    assert info["guard_fired"] == 20 * 100
    assert info["guarded_points"] == 20 and info["on_plane"] == 20
    assert torch.all(out[:20, -1] == 0) and torch.all(out[20:, -1] > 0)
