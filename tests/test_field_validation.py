"""Bad input to poisson_field: a clear Python exception naming the argument, before any kernel.

docs/DESIGN.md, "Bad input". Every case is checked on the cpu backend (the one that would crash in
C++
if a check were missing) and, where the check is backend-independent, on the reference too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import poissonflow

X = torch.randn(5, 3)
Y = torch.randn(7, 3)


def call(x=X, y=Y, **kw):
    return poissonflow.poisson_field(x, y, **kw)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(x=X[0]), ValueError, "x must be 2-D"),
        (dict(y=Y[0]), ValueError, "charges must be 2-D"),
        (dict(y=torch.randn(7, 4)), ValueError, "same number of columns"),
        (dict(y=torch.randn(0, 3)), ValueError, "charges is empty"),
        (dict(x=torch.randn(5, 0), y=torch.randn(7, 0)), ValueError, "dimension D must be >= 1"),
        (dict(y=Y.double()), TypeError, "charges has dtype torch.float64"),
        (dict(x=X.int()), TypeError, "x must be a floating-point tensor"),
        (dict(x=X.numpy()), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.tensor([[0.0, float("nan"), 1.0]])), ValueError, "x contains 1 NaN"),
        (dict(y=torch.full((7, 3), float("inf"))), ValueError, "charges contains 21 NaN"),
        (dict(x=torch.full((5, 3), 1e20)), ValueError, "x has values up to 1e+20"),
        (dict(weights=torch.rand(6)), ValueError, "weights must have one entry per charge"),
        (dict(weights=-torch.rand(7)), ValueError, "weights must be non-negative"),
        (dict(weights=torch.zeros(7)), ValueError, "weights must have a positive sum"),
        (dict(weights=torch.rand(7).double()), TypeError, "weights has dtype"),
        (dict(weights=torch.tensor([1.0] * 6 + [float("nan")])), ValueError, "weights contains"),
        (dict(weights=torch.rand(7, 1)), ValueError, "weights must be 1-D"),
        (dict(power=-1.0), ValueError, "power must be >= 0"),
        (dict(power=float("nan")), ValueError, "power must be finite"),
        (dict(power="3"), TypeError, "power must be a real number"),
        (dict(eps=-0.1), ValueError, "eps must be >= 0"),
        (dict(eps=float("inf")), ValueError, "eps must be finite"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_named(backend, kwargs, exc, words):
    kwargs = dict(kwargs)
    if "backend" not in kwargs:
        kwargs["backend"] = backend
    with pytest.raises(exc, match=words.replace("(", r"\(").replace("+", r"\+")):
        call(**kwargs)


def test_cpu_backend_rejects_half_precision_with_hint():
    with pytest.raises(TypeError, match="float32 or float64"):
        call(x=X.half(), y=Y.half(), backend="cpu")


def test_reference_accepts_half_precision():
    v, ls = call(x=X.bfloat16(), y=Y.bfloat16(), backend="reference")
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()


def test_bad_isa_override_is_clear(monkeypatch):
    monkeypatch.setenv("POISSONFLOW_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="POISSONFLOW_CPU_ISA='sse9' is not available"):
        call(backend="cpu")


def test_exclusion_of_the_only_charge_gives_no_field():
    """A query whose every charge is excluded: v = 0 and log_scale = -inf, not NaN."""
    from poissonflow.kernels import cpu as _cpu

    x = torch.randn(2, 3)
    y = torch.randn(1, 3)
    v, ls = _cpu.field_forward(x, y, None, 3.0, 0.0, exclude=torch.tensor([0, -1]))
    assert torch.equal(v[0], torch.zeros(3)) and ls[0].item() == float("-inf")
    assert torch.allclose(v[1], x[1] - y[0]) and torch.isfinite(ls[1])


def test_numpy_scalars_are_accepted():
    v, _ = call(power=np.float32(2.5), eps=np.float64(0.1), backend="cpu")
    assert torch.isfinite(v).all()
