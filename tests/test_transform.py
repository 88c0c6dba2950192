"""poissonflow.transform: input kinds, outputs, leave-one-out, horizon, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poissonflow import horizon
from poissonflow.transform import coincident_charge, transform


def data(n=120, d=5, seed=0):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    x = data()
    out = transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (120, 6)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert (out[:, -1] > 0).all()  # the upper hemisphere
    t = transform(torch.tensor(x, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert np.allclose(t.numpy(), out, atol=1e-4)


def test_raw_output_ends_at_z_max():
    x = data()
    raw = transform(x, output="raw", z_max=50.0)
    assert raw.shape == (120, 6) and np.allclose(raw[:, -1], 50.0)


def test_leave_one_out_treats_charges_like_held_out_points():
    """A feature that is a charge ignores it: flowing the first rows against all charges gives
    the same result as flowing them as part of the whole set, and differs without exclusion."""
    x = data()
    full = transform(x)
    part = transform(x[:10], charges=x)
    assert np.array_equal(part, full[:10])
    no_loo = transform(x[:10], charges=x, exclude_self=False)
    assert np.abs(no_loo - part).max() > 1e-2


def test_coincident_charge_finds_exact_rows_only():
    y = torch.tensor([[0.0, 1.0], [2.0, 3.0], [2.0, 3.0]])
    q = torch.tensor([[2.0, 3.0], [0.0, 1.0 + 1e-7], [0.0, 1.0]])
    assert coincident_charge(q, y).tolist() == [1, -1, 0]


def test_info_reports_horizon_and_exclusions():
    x = data()
    _, info = transform(x, return_info=True)
    assert info["z_min"] == pytest.approx(horizon.auto_z_min(torch.from_numpy(x)))
    assert info["z_max"] == pytest.approx(horizon.auto_z_max(torch.from_numpy(x)))
    assert info["excluded"] == 120 and info["steps"] == 32 and info["solver"] == "rk4"


def test_radial_euler_step_identity():
    """One Euler step of the blog's update y~' = y~ + delta f / (f . y~) raises |y~|^2 / 2 by
    delta + delta^2 |f|^2 / (2 (f . y~)^2): exactly delta only in the continuous-time limit
    (docs/DESIGN.md's "exactly delta" is first order). |y~| is measured from the origin, as in the
    blog, which suits features around the origin such as these unit vectors."""
    import poissonflow

    x = data()
    z0, steps = 0.1, 1
    raw, info = transform(
        x,
        parameterization="radial",
        solver="euler",
        steps=steps,
        z_min=z0,
        z_max=3.0,
        output="raw",
        return_info=True,
    )
    assert info["guard_fired"] == 0
    xt = torch.from_numpy(x)
    v, _ = poissonflow.ops.field(
        xt,
        xt,
        None,
        6.0,
        0.0,
        torch.arange(120),
        torch.full((120,), z0, dtype=torch.float64),
        "cpu",
    )
    v = v.numpy()
    dot = (v * x).sum(1) + z0 * z0
    f2 = (v * v).sum(1) + z0 * z0
    delta = info["delta"]
    expected = delta + 0.5 * delta**2 * f2 / dot**2
    gained = 0.5 * (raw**2).sum(1) - 0.5 * ((x**2).sum(1) + z0**2)
    assert np.allclose(gained, expected, rtol=1e-9)


def test_reference_backend_agrees_with_cpu():
    x = data(40, 3)
    a = transform(x, steps=8)
    b = transform(x, steps=8, backend="reference")
    assert np.abs(a - b).max() < 1e-10


@pytest.mark.parametrize(
    "features, kwargs, exc, words",
    [
        (np.full((5, 3), np.nan), {}, ValueError, "features contains"),
        (np.array([[np.inf, 0.0], [1.0, 2.0]]), {}, ValueError, "features contains"),
        (np.zeros(5), {}, ValueError, "must be 2-D"),
        (np.zeros((0, 3)), {}, ValueError, "empty"),
        ([[1.0, 2.0]], {}, TypeError, "torch.Tensor or a numpy array"),
        (data(), {"charges": data(20, 4)}, ValueError, "charges have 4 features"),
        (data(), {"z_min": 2.0, "z_max": 1.0}, ValueError, "z_min must be < z_max"),
        (data(), {"z_min": -1.0}, ValueError, "z_min must be > 0"),
        (data(), {"z_max": "far"}, ValueError, "z_max must be a positive number or 'auto'"),
        (data(), {"steps": 0}, ValueError, "steps must be an integer >= 1"),
        (data(), {"steps": 2.5}, ValueError, "steps must be an integer >= 1"),
        (data(), {"solver": "rk45"}, ValueError, "solver must be one of"),
        (data(), {"start": "sky"}, ValueError, "start must be one of"),
        (data(), {"output": "cube"}, ValueError, "output must be one of"),
        (data(), {"field": "magnetic"}, ValueError, "field must be 'empirical'"),
        (data(), {"start": "flux", "charges": data(50, 5, seed=3)}, ValueError, "not charges"),
        (data(), {"weights": -np.ones(120)}, ValueError, "non-negative"),
    ],
)
def test_bad_input(features, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        transform(features, **kwargs)


def test_all_charges_identical_has_no_scale():
    with pytest.raises(ValueError, match="all charges coincide"):
        transform(np.ones((10, 3)))
