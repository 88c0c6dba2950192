"""Phase A's two forms of broadcast operands in the CPU kernels (csrc/cpu/simd.h
vsub_broadcast, docs/performance.md "Zen 4"): a query coordinate broadcast once into a register
and shared by its subtractions, or broadcast by each subtraction's own memory operand (chosen on
Zen 4, where stand-alone 512-bit broadcast loads slow phase A by half). They are the same IEEE
operations, so the kernels' results must not depend on the form: fields, log-scales, both
gradients and fused flow steps are compared bit for bit, on every ISA copy this CPU runs (the
avx512 copy is the one whose code differs; elsewhere both forms compile alike), in float32 and
float64, in the power form and the log domain, at near-coincident queries with exclusions.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_isas, forced_broadcasts, forced_isa, forced_weights

from poissonflow import _ext
from poissonflow.kernels import cpu as _cpu

FORMS = ("shared", "embedded")


def _case(D, dtype, N=75, B=203, seed=0):
    g = torch.Generator().manual_seed(seed + D)
    y = torch.randn(B, D, generator=g, dtype=torch.float64) * 3 + 10
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 3 + 10
    x[:6] = y[:6] + 1e-4 * torch.randn(6, D, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    exclude = torch.full((N,), -1, dtype=torch.int64)
    exclude[:3] = torch.arange(3)
    return x.to(dtype), y.to(dtype), w.to(dtype), exclude


def _everything(x, y, w, exclude, p):
    v, ls = _cpu.field_forward(x, y, w, p, 0.0, exclude=exclude)
    gx, gy, gw = _cpu.field_backward(
        x,
        y,
        w,
        p,
        0.0,
        v,
        ls,
        torch.cos(x),
        torch.sin(ls),
        need_x=True,
        need_y=True,
        need_w=True,
        exclude=exclude,
    )
    N = x.shape[0]
    end = _cpu.flow_steps(
        x, y, w, torch.full((N,), -2.0), torch.full((N,), 0.25), 3, "rk4", exclude=exclude
    )
    return v, ls, gx, gy, gw, end


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("weights", ["power", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("D", [3, 16, 33, 129])
def test_both_forms_give_the_same_bits(isa, weights, dtype, D):
    x, y, w, exclude = _case(D, dtype)
    out = {}
    for form in FORMS:
        with forced_isa(isa), forced_weights(weights), forced_broadcasts(form):
            out[form] = _everything(x, y, w, exclude, float(D))
    for name, a, b in zip(("v", "log_scale", "gx", "gy", "gw", "flow"), *out.values()):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), f"{name} differs between the broadcast forms"


def test_auto_resolves_by_cpu_and_forced_forms_are_kept():
    C = _ext.cpu_module()
    assert C.resolve_broadcasts(0) in (1, 2)
    assert C.resolve_broadcasts(1) == 1
    assert C.resolve_broadcasts(2) == 2
    assert _ext.BROADCAST_FORMS == {"auto": 0, "shared": 1, "embedded": 2}


def test_broadcast_variable_is_checked():
    x, y, _, _ = _case(3, torch.float32)
    with forced_broadcasts("fast"), pytest.raises(ValueError, match="POISSONFLOW_CPU_BROADCASTS"):
        _cpu.field_forward(x, y, None, 3.0, 0.0)
