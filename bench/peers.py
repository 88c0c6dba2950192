"""Implementations of the field forward that poissonflow's kernels are measured against.

Each peer is a function (x, y, power) -> (v, log_scale) for unit weights and eps = 0, plus a
note on its accuracy. Every peer is checked against the float64 reference before it is timed
(bench/field_throughput.py); its error is printed next to its speed.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import poissonflow
from poissonflow.kernels.reference import poisson_field_reference


@dataclass
class Impl:
    name: str
    fn: Callable  # (x, y, power) -> (v, log_scale)
    note: str
    # bytes of the largest temporary for (N, B, D, itemsize), to refuse runs that cannot fit
    peak_bytes: Callable[[int, int, int, int], int] = lambda N, B, D, s: (N + B) * D * s
    slow: bool = False  # time on a subset of queries (throughput is per pair, so this is fair)


def _tiny(dtype):
    return torch.finfo(dtype).tiny


def naive_pfgm(x, y, power):
    """What public PFGM code does: materialise the N x B x D differences at once."""
    diff = x[:, None, :] - y[None, :, :]
    r2 = (diff * diff).sum(-1).clamp_min(_tiny(x.dtype))
    s = -0.5 * power * torch.log(r2)
    pi = torch.softmax(s, dim=1)
    v = (pi[:, :, None] * diff).sum(1)
    return v, torch.logsumexp(s, 1) - math.log(y.shape[0])


def torch_direct(x, y, power, chunk=1024):
    """Best accurate pure-PyTorch with direct differences: r2 by torch.cdist in its direct mode
    (no |x|^2 + |y|^2 - 2xy), pi by softmax, v = x - pi @ y accumulated in float64 so the
    subtraction does not cancel; chunked over queries (chunk x B scores at a time)."""
    out_v, out_l = [], []
    yd = y.double()
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk]
        r2 = torch.cdist(xi, y, compute_mode="donot_use_mm_for_euclid_dist").square()
        s = -0.5 * power * torch.log(r2.clamp_min(_tiny(x.dtype)))
        out_l.append(torch.logsumexp(s, 1) - math.log(y.shape[0]))
        pi = torch.softmax(s, dim=1)
        out_v.append((xi.double() - pi.double() @ yd).to(x.dtype))
    return torch.cat(out_v), torch.cat(out_l)


def torch_f64_expanded(x, y, power, chunk=1024):
    """Fastest accurate pure-PyTorch found: the GEMM expansion of r2, but in float64, where the
    cancellation error (1e-16 |x|^2) is harmless, and v = x - pi @ y in float64."""
    out_v, out_l = [], []
    yd = y.double()
    yn = (yd * yd).sum(1)
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk].double()
        r2 = (xi * xi).sum(1)[:, None] + yn[None, :] - 2.0 * (xi @ yd.T)
        s = -0.5 * power * torch.log(r2.clamp_min(_tiny(x.dtype)))
        out_l.append((torch.logsumexp(s, 1) - math.log(y.shape[0])).to(x.dtype))
        out_v.append((xi - torch.softmax(s, 1) @ yd).to(x.dtype))
    return torch.cat(out_v), torch.cat(out_l)


def torch_gemm_f32(x, y, power, chunk=2048):
    """The fast and wrong way: r2 = |x|^2 + |y|^2 - 2 x.y in float32 (a GEMM, what torch.cdist
    does for large inputs) and v = x - pi @ y. Catastrophic near coincident points."""
    out_v, out_l = [], []
    yn = (y * y).sum(1)
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk]
        r2 = ((xi * xi).sum(1)[:, None] + yn[None, :] - 2.0 * (xi @ y.T)).clamp_min(_tiny(x.dtype))
        s = -0.5 * power * torch.log(r2)
        out_l.append(torch.logsumexp(s, 1) - math.log(y.shape[0]))
        out_v.append(xi - torch.softmax(s, 1) @ y)
    return torch.cat(out_v), torch.cat(out_l)


def keops_available() -> bool:
    return importlib.util.find_spec("pykeops") is not None


def keops_field(x, y, power):
    """KeOps (pykeops): symbolic N x B reduction, sumsoftmaxweight of the differences."""
    from pykeops.torch import LazyTensor

    xi = LazyTensor(x[:, None, :].contiguous())
    yj = LazyTensor(y[None, :, :].contiguous())
    diff = xi - yj
    r2 = (diff**2).sum(-1)
    s = -0.5 * power * r2.log()
    v = s.sumsoftmaxweight(diff, axis=1)
    lse = s.logsumexp(axis=1).view(-1)
    return v, lse - math.log(y.shape[0])


def poissonflow_backend(backend):
    def fn(x, y, power):
        return poissonflow.poisson_field(x, y, power=power, backend=backend)

    return fn


def implementations(device: str = "cpu") -> list[Impl]:
    impls = (
        [Impl("poissonflow-cpu", poissonflow_backend("cpu"), "C++ kernel, direct differences")]
        if device == "cpu"
        else []
    )
    impls += [
        Impl(
            "naive-pfgm",
            naive_pfgm,
            "materialises N x B x D",
            peak_bytes=lambda N, B, D, s: 3 * N * B * D * s,
            slow=True,
        ),
        Impl("torch-direct", torch_direct, "cdist direct + float64 v", slow=True),
        Impl("torch-f64-expanded", torch_f64_expanded, "float64 GEMM expansion", slow=True),
        Impl("torch-gemm-f32", torch_gemm_f32, "float32 GEMM expansion (inaccurate)", slow=True),
    ]
    if keops_available():
        impls.append(Impl("keops", keops_field, "pykeops sumsoftmaxweight", slow=True))
    return impls


def reference_error(impl: Impl, x, y, power, rows: int = 256) -> tuple[float, float]:
    """(max row-relative error of v, max |log_scale error|/(1+|ref|)) on the first `rows`
    queries against the float64 reference."""
    xs = x[:rows]
    v, ls = impl.fn(xs, y, power)
    v_ref, ls_ref = poisson_field_reference(
        xs.double().cpu(), y.double().cpu(), power=power, r2_floor=_tiny(x.dtype)
    )
    ev = ((v.double().cpu() - v_ref).norm(dim=1) / v_ref.norm(dim=1)).max().item()
    el = ((ls.double().cpu() - ls_ref).abs() / (1 + ls_ref.abs())).max().item()
    return ev, el


def torch_autograd_backward(x, y, power, gv, gl, chunk=1024):
    """The pure-PyTorch backward: autograd through a chunked float32 field with direct
    differences (torch.cdist's direct mode) and pi @ y; its graph holds every N x B chunk, so
    it is timed on sizes it can hold."""
    xl = x.detach().clone().requires_grad_()
    yl = y.detach().clone().requires_grad_()
    vs, ls = [], []
    for i in range(0, x.shape[0], chunk):
        xi = xl[i : i + chunk]
        r2 = torch.cdist(xi, yl, compute_mode="donot_use_mm_for_euclid_dist").square()
        s = -0.5 * power * torch.log(r2.clamp_min(_tiny(x.dtype)))
        ls.append(torch.logsumexp(s, 1))
        vs.append(xi - torch.softmax(s, 1) @ yl)
    loss = (torch.cat(vs) * gv).sum() + (torch.cat(ls) * gl).sum()
    return torch.autograd.grad(loss, [xl, yl])


def poissonflow_backward(backend="cpu"):
    def fn(x, y, power, gv, gl):
        xl = x.detach().clone().requires_grad_()
        yl = y.detach().clone().requires_grad_()
        v, ls = poissonflow.poisson_field(xl, yl, power=power, backend=backend)
        return torch.autograd.grad([v, ls], [xl, yl], [gv, gl])

    return fn
