"""The CPU backend's own argument handling: poissonflow.kernels.cpu's validation of the flow's
solver
and step count, and the keyword binding of poissonflow._C (one keyword per field of the kernels'
argument struct, csrc/common/field_args.h; the CUDA module binds the same way)."""

from __future__ import annotations

import pytest
import torch

from poissonflow import _C
from poissonflow.kernels import cpu as _cpu


def small_problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)


@pytest.mark.parametrize("solver", ["midpoint", "RK4", None])
def test_flow_steps_rejects_an_unknown_solver(solver):
    x, y = small_problem()
    with pytest.raises(ValueError, match="solver must be one of \\('euler', 'rk4'\\)"):
        _cpu.flow_steps(x, y, None, -1.0, 0.1, 2, solver)


@pytest.mark.parametrize("n_steps", [0, -3, 2.0, True, "4"])
def test_flow_steps_rejects_a_bad_step_count(n_steps):
    x, y = small_problem()
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        _cpu.flow_steps(x, y, None, -1.0, 0.1, n_steps, "euler")


def test_flow_steps_accepts_integer_likes():
    x, y = small_problem()
    a = _cpu.flow_steps(x, y, None, -1.0, 0.1, 3, "rk4")
    b = _cpu.flow_steps(x, y, None, -1.0, 0.1, torch.tensor(3).item(), "rk4")
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_kernel_keywords_are_the_argument_struct_fields():
    names = _C.arg_names()
    for required in (
        "x",
        "y",
        "w",
        "exclude",
        "N",
        "B",
        "D",
        "power",
        "v",
        "log_scale",
        "gv",
        "gx",
        "t0",
        "dt",
        "n_steps",
        "solver",
        "x_out",
        "num_threads",
    ):
        assert required in names
    with pytest.raises(TypeError, match="field_forward: unknown argument 'vv'"):
        _C.field_forward(vv=0)
    with pytest.raises(TypeError, match="argument 'N' has the wrong type"):
        _C.field_forward(N="five")
