"""The numerical constants that every implementation must share, checked against the compiled
kernels' one definition (csrc/common/field_numerics.h, read through poissonflow._C.numerics()):
the r2 floor rule (smallest normal number of the input dtype) and the RK4 tableau, as the
Triton kernels receive them and as the Python driver (poissonflow.ode) uses them.

Not shared, by design: Triton's online softmax marks padding, excluded and zero-weight pairs
with -inf and rescales eagerly every charge tile (exact, one exp2 per row and tile), where the
compiled kernels use a finite "no charge" score and rescale lazily (kTau); both are exact
implementations of the same softmax, which the conformance suite checks on their results.
"""

from __future__ import annotations

import pytest
import torch

from poissonflow import ode

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@pytest.fixture(scope="module")
def numerics():
    from poissonflow import _ext

    mod = _ext.cpu_module()
    assert hasattr(mod, "numerics"), (
        "poissonflow._C.numerics() is missing: the extension was built without the shared "
        "numerics header's table (rebuild with `pip install --no-build-isolation -e .`)"
    )
    return dict(mod.numerics())


def python_tableau() -> dict:
    """ode.RK4_* under the header's names (b as fractions, a as the sub-diagonal)."""
    out = {"rk4_stages": len(ode.RK4_B), "rk4_weight_denominator": ode.RK4_B_DIV}
    for s in range(4):
        out[f"rk4_c{s + 1}"] = ode.RK4_C[s]
        out[f"rk4_b{s + 1}"] = ode.RK4_B[s] / ode.RK4_B_DIV
    for s in range(1, 4):
        out[f"rk4_a{s + 1}{s}"] = ode.RK4_A[s]
    return out


@pytest.mark.parametrize("name", list(DTYPES))
def test_r2_floor_is_the_input_dtypes_smallest_normal(numerics, name):
    pytest.importorskip("triton")
    from poissonflow.kernels.triton import _field_fwd

    dtype = DTYPES[name]
    given = float(_field_fwd.scalar_params(1.0, dtype, "cpu")[1])  # what the kernels receive
    assert given == numerics[f"r2_floor_{name}"] == torch.finfo(dtype).tiny


def test_rk4_tableau_is_shared(numerics):
    pytest.importorskip("triton")
    from poissonflow.kernels.triton import _flow

    ours = python_tableau()
    for key, value in ours.items():
        assert key in numerics, f"{key} missing from poissonflow._C.numerics()"
        assert numerics[key] == value, (key, numerics[key], value)
    # the Triton flow kernel's constexprs are built from the same tuples
    assert (_flow.RK4_A, _flow.RK4_B, _flow.RK4_C, _flow.RK4_B_DIV) == (
        ode.RK4_A,
        ode.RK4_B,
        ode.RK4_C,
        ode.RK4_B_DIV,
    )
    assert _flow.SOLVER_STAGES["rk4"] == numerics["rk4_stages"]
