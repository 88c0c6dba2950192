"""The CPU kernels' power-form softmax weights (csrc/cpu/power_form.h, docs/DESIGN.md, "Weights
without log/exp: the power form").

Where 2p is an integer the kernels compute the weight of a pair relative to its row's
reference as (q / Q)^(p/2) by multiplications and square roots instead of a log2 and an exp2.
Both forms are checked against the float64 reference with the suite's tolerances (the same
bound as every other kernel: poissonflow/testing.py), at the powers that matter, at
near-coincident queries and exact coincidences (the r2 floor), at far-away queries (weights
that underflow relative to the nearest charge must become exactly 0, never subnormal or NaN),
with weights, exclusions and per-row softening. The choice between the forms is observed
through bits: where the power form does not apply (2p not an integer, or a range the plan
refuses) the default must equal the forced log domain bit for bit; where it applies the two
differ in rounding only.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_field_close, cpu_isas, forced_isa, forced_weights

import poissonflow
from poissonflow.kernels import cpu as _cpu
from poissonflow.testing import row_errors, tolerance

# From p = 2 (below it the plan takes the log domain: test_the_log_domain_where_...); 2.5, 3, 5,
# 8.5: the square roots (and 2.5's and 8.5's fourth roots) shared with the FMA pipes on AVX-512
# float; 11 (p/2 = 5.5, above power_form.h kNewtonMaxWhole): on the divider again
POWERS = [2.0, 2.5, 3.0, 4.0, 5.0, 8.5, 11.0]
DTYPES = [torch.float32, torch.float64]


def _case(D, dtype, *, scale=1.0, seed=0, N=97, B=301):
    g = torch.Generator().manual_seed(seed + 31 * D)
    y = torch.randn(B, D, generator=g, dtype=torch.float64) * scale
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    x[:8] = y[:8] + 1e-5 * scale * torch.randn(8, D, generator=g, dtype=torch.float64)
    x[8] = y[11]  # exact coincidence: the r2 floor
    x[9:13] = y[20:24] + 1e4 * scale  # far from every charge
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.05
    w[5] = 0.0  # a zero weight
    exclude = torch.full((N,), -1, dtype=torch.int64)
    exclude[:4] = torch.arange(4)  # near queries ignoring their charge
    return x.to(dtype), y.to(dtype), w.to(dtype), exclude


def _forward(form, x, y, w, p, **kw):
    with forced_weights(form):
        return _cpu.field_forward(x, y, w, p, 0.0, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("p", POWERS)
@pytest.mark.parametrize("D", [2, 3, 8])
def test_power_form_matches_reference(D, p, dtype):
    x, y, w, exclude = _case(D, dtype)
    if p < 4:
        # at p < 4 an exact coincidence leaves v ~ B * tiny * |x - y|, below what float32
        # represents (both forms and the reference disagree there by design): the query
        # ignores its coincident charge instead, the excluded-coincidence path
        exclude[8] = 11
    for form in ("power", "log"):
        v, ls = _forward(form, x, y, w, p, exclude=exclude)
        assert torch.isfinite(v).all() and torch.isfinite(ls).all(), form
        assert_field_close(x, y, v, ls, weights=w, power=p, exclude=exclude)
    v_pow, _ = _forward("power", x, y, w, p, exclude=exclude)
    v_log, _ = _forward("log", x, y, w, p, exclude=exclude)
    assert not torch.equal(v_pow, v_log), "the power form did not run"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("p", [3.0, 8.5, 33.0, 129.0])
def test_power_form_unweighted_softened_and_every_isa(p, dtype):
    x, y, _, _ = _case(16, dtype, N=83, B=200)
    x = x[13:]  # ordinary rows (the near and far ones are the test above's)
    eps_rows = torch.linspace(0.0, 2.0, x.shape[0], dtype=dtype)
    for isa in cpu_isas():
        with forced_isa(isa):
            v, ls = _forward("auto", x, y, None, p, eps_rows=eps_rows)
        assert_field_close(x, y, v, ls, power=p, eps_rows=eps_rows)


def test_far_away_queries_have_no_subnormal_or_nan_weights():
    # every charge but one is far from the query: their weights underflow to exactly 0
    # relative to the near one, so v is exactly the difference to that charge
    y = torch.cat(
        [torch.zeros(1, 3), 1e3 + torch.randn(500, 3, generator=torch.Generator().manual_seed(1))]
    )
    x = torch.tensor([[1e-3, 0.0, 0.0]])
    v, ls = _forward("power", x, y, None, 8.0)
    assert torch.equal(v, x - y[:1]) and torch.isfinite(ls).all()


@pytest.mark.parametrize("scale", [1e-12, 1e12])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_extreme_scales_stay_accurate(scale, dtype):
    x, y, w, exclude = _case(3, dtype, scale=scale)
    v, ls = _forward("auto", x, y, w, 3.0, exclude=exclude)
    assert torch.isfinite(v).all() and torch.isfinite(ls).all()
    assert_field_close(x, y, v, ls, weights=w, power=3.0, exclude=exclude)


def test_the_log_domain_where_the_power_form_does_not_apply():
    x, y, w, exclude = _case(3, torch.float32)
    # 2p not an integer: the default is the log domain, bit for bit
    a = _forward("auto", x, y, w, 7.3, exclude=exclude)
    b = _forward("log", x, y, w, 7.3, exclude=exclude)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a range the plan refuses (q = g / r2 could leave the normal numbers): log domain too
    far = x * 1e17
    a = _forward("auto", far, y * 1e17, w, 3.0)
    b = _forward("log", far, y * 1e17, w, 3.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # weights spanning more than 1e30: log domain
    w2 = w.clone()
    w2[7] = 1e-35
    a = _forward("auto", x, y, w2, 3.0)
    b = _forward("log", x, y, w2, 3.0)
    assert torch.equal(a[0], b[0])
    # p < 2, even forced: the cut (2^(-126 / (p/2)) in float32) lies under the normal numbers
    for p in (0.5, 1.0, 1.5):
        a = _forward("power", x, y, w, p, exclude=exclude)
        b = _forward("log", x, y, w, p, exclude=exclude)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), p


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_a_query_on_a_charge_at_p_below_2(dtype):
    # D = 1, p = D = 1, no softening: the coincident charge's weight (at the r2 floor) dwarfs the
    # far one's by ~1e22 in float32, yet the far one sets v. In the power form its base
    # t = q / Q (~1e-44) was subnormal, 3 bits, and v 3% off (found by
    # tests/test_field_properties.py); the log domain keeps it to the suite's tolerance.
    x = torch.zeros(1, 1, dtype=dtype)
    y = torch.tensor([[0.0], [1000.0]], dtype=dtype)
    v, ls = poissonflow.poisson_field(x, y, eps=0.0, backend="cpu")
    assert_field_close(x, y, v, ls, eps=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("p", [2.0, 3.0, 8.5, 129.0])
def test_power_form_backward_matches_log_domain(p, dtype):
    # the backward recomputes pi in power form (without dL/dw); both forms against each other
    # and against the float64 reference gradient of the autograd op
    x, y, _, exclude = _case(8, dtype, N=60, B=150)
    g = torch.Generator().manual_seed(5)
    gv = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    gl = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(dtype)
    grads = {}
    for form in ("power", "log"):
        with forced_weights(form):
            v, ls = _cpu.field_forward(x, y, None, p, 0.0, exclude=exclude)
            grads[form] = _cpu.field_backward(
                x,
                y,
                None,
                p,
                0.0,
                v,
                ls,
                gv,
                gl,
                need_x=True,
                need_y=True,
                need_w=False,
                exclude=exclude,
            )
    xd, yd = x.double().requires_grad_(), y.double().requires_grad_()
    vr, lr = poissonflow.poisson_field(xd, yd, power=p, exclude=exclude, backend="reference")
    ((vr * gv.double()).sum() + (lr * gl.double()).sum()).backward()
    tol = tolerance(dtype).grad
    for form, (gx, gy, _) in grads.items():
        assert row_errors(gx, xd.grad) <= tol, form
        assert row_errors(gy, yd.grad) <= tol, form
    assert not torch.equal(grads["power"][0], grads["log"][0]), "the power form did not run"


def test_power_form_is_deterministic_across_thread_counts():
    x, y, w, exclude = _case(33, torch.float32, N=900, B=1300)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            v, ls = _forward("power", x, y, w, 33.0, exclude=exclude)
            gx, gy, _ = _cpu.field_backward(
                x,
                y,
                w,
                33.0,
                0.0,
                v,
                ls,
                torch.ones_like(x),
                None,
                need_x=True,
                need_y=True,
                need_w=False,
                exclude=exclude,
            )
            outs.append((v, ls, gx, gy))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_weight_form_variable_is_checked():
    x, y, _, _ = _case(3, torch.float32)
    with forced_weights("fast"), pytest.raises(ValueError, match="POISSONFLOW_CPU_WEIGHTS"):
        _cpu.field_forward(x, y, None, 3.0, 0.0)
