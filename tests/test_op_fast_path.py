"""poissonflow.ops.field calls the device kernel directly when the custom op would add nothing
(no gradient can flow, nothing traces): the same function, so the same bits; and the op
whenever autograd, torch.compile, a dispatch mode or a tensor subclass is involved."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import poissonflow
from poissonflow import ops


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(70, 6, generator=g), torch.randn(90, 6, generator=g)


def test_direct_call_equals_the_op_bit_for_bit():
    x, y = _inputs()
    v, ls = poissonflow.poisson_field(x, y)
    v_op, ls_op = ops.field_op("cpu")(x, y, None, 6.0, 0.0, None, None)
    assert torch.equal(v, v_op) and torch.equal(ls, ls_op)
    assert not ops._needs_op(x, y, None, None)


def test_the_op_runs_when_a_gradient_can_flow():
    x, y = _inputs()
    xr = x.clone().requires_grad_()
    assert ops._needs_op(xr, y, None, None)
    v, _ = poissonflow.poisson_field(xr, y)
    assert v.grad_fn is not None
    with torch.no_grad():
        assert not ops._needs_op(xr, y, None, None)
        v2, _ = poissonflow.poisson_field(xr, y)
    assert v2.grad_fn is None and torch.equal(v.detach(), v2)


def test_the_op_runs_under_fake_tensors_and_subclasses():
    x, y = _inputs()
    with FakeTensorMode() as mode:
        fx, fy = mode.from_tensor(x), mode.from_tensor(y)
        assert ops._needs_op(fx, fy, None, None)
        v, ls = ops.field(fx, fy, None, 6.0, 0.0, None, None, "cpu")
        assert v.shape == x.shape and ls.shape == (x.shape[0],)

    class Marked(torch.Tensor):
        pass

    assert ops._needs_op(x.as_subclass(Marked), y, None, None)
