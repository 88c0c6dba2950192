"""poissonflow.transform's arguments: bad values are refused before any work, naming the
argument; output dtypes follow the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import poissonflow


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"batch_size": -5}, ValueError, "batch_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, ValueError, "batch_size must be an integer"),
        ({"batch_size": True}, ValueError, "batch_size must be an integer"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 10**12}, ValueError, "steps must be an integer >= 1 and <= 1,000,000"),
        ({"steps": 3.0}, ValueError, "steps must be an integer"),
        ({"progress": "yes"}, TypeError, "progress"),
        ({"exclude_self": 1}, TypeError, "exclude_self"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_bad_arguments_are_named(feats, kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        poissonflow.transform(feats, **kwargs)


def test_complex_tensors_are_refused(feats):
    with pytest.raises(TypeError, match="features is a complex tensor"):
        poissonflow.transform(feats.to(torch.complex128))
    with pytest.raises(TypeError, match="charges is a complex tensor"):
        poissonflow.transform(feats, charges=feats.to(torch.complex64))
    with pytest.raises(TypeError, match="features must be a real numeric tensor"):
        poissonflow.transform(feats > 0)


def test_a_tensor_that_requires_grad_is_refused_not_detached(feats):
    x = feats.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="features requires grad.*not differentiable"):
        poissonflow.transform(x)
    with pytest.raises(ValueError, match="charges requires grad"):
        poissonflow.transform(feats, charges=x)
    with torch.no_grad():  # asked for explicitly: the same numbers as the detached input
        u = poissonflow.transform(x, steps=4)
    assert torch.equal(u, poissonflow.transform(feats, steps=4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_output_keeps_the_input_dtype(feats, dtype):
    u = poissonflow.transform(feats.to(dtype), steps=4)
    assert u.dtype == dtype and u.shape == (40, 5)
    if dtype in (torch.float16, torch.bfloat16):  # computed in float64, rounded once at the end
        ref = poissonflow.transform(feats.to(dtype).double(), steps=4)
        assert torch.equal(u, ref.to(dtype))


def test_integer_and_float16_numpy_inputs(feats):
    ints = np.random.default_rng(0).permutation(40 * 3).reshape(40, 3)
    assert poissonflow.transform(ints, steps=4).dtype == np.float64
    half = feats.numpy().astype(np.float16)
    assert poissonflow.transform(half, steps=4).dtype == np.float16
