"""Forward field of every backend that runs here against the float64 reference.

One measure (poissonflow.testing.field_errors: per-row relative error of v, log_scale error
relative to 1 + |ref|) and one table of tolerances (poissonflow.testing.TOLERANCES, argued
there). Test ids name the target (backend and, for the CPU, the instruction set), the dtype
and the shape or feature.
"""

from __future__ import annotations

import conformance_targets as ct
import pytest
import torch
from conformance_cases import FEATURES, SHAPES, field_case, near_coincident_case
from helpers import field_errors, tolerance


def run_forward(target, case):
    return target.forward(
        case["x"],
        case["y"],
        case["w"],
        case["power"],
        case["eps"],
        exclude=case["exclude"],
        eps_rows=case["eps_rows"],
    )


def check(case, v, ls, dtype, *, cancelling=False):
    N, D = case["x"].shape
    assert v.shape == (N, D) and ls.shape == (N,)
    assert v.dtype == dtype and ls.dtype == dtype
    cpu = {k: (t.cpu() if isinstance(t, torch.Tensor) else t) for k, t in case.items()}
    rel, cond, ls_err = field_errors(
        cpu["x"],
        cpu["y"],
        v.cpu(),
        ls.cpu(),
        weights=cpu["w"],
        power=cpu["power"],
        eps=cpu["eps"],
        exclude=cpu["exclude"],
        eps_rows=cpu["eps_rows"],
    )
    tol = tolerance(dtype)
    assert (cond if cancelling else rel) <= tol.v, f"v error {rel:.3e} > {tol.v:.1e}"
    assert ls_err <= tol.log_scale, f"log_scale error {ls_err:.3e} > {tol.log_scale:.1e}"


@pytest.mark.parametrize("tid,dtype,shape", ct.params([(s, i) for i, s in SHAPES]))
def test_forward_shapes(tid, dtype, shape):
    target = ct.get(tid)
    case = field_case(*shape, "weights", dtype, device=target.device)
    v, ls = run_forward(target, case)
    check(case, v, ls, dtype)


@pytest.mark.parametrize("tid,dtype,feature", ct.params([(f, f) for f in FEATURES]))
def test_forward_features(tid, dtype, feature):
    target = ct.get(tid)
    case = field_case(29, 41, 5, feature, dtype, seed=1, device=target.device)
    v, ls = run_forward(target, case)
    check(case, v, ls, dtype)
    if feature == "coincident":
        assert torch.equal(v[:5].cpu(), torch.zeros_like(v[:5].cpu()))
        assert bool(torch.isfinite(ls).all())
    if feature == "dead-rows":
        assert torch.equal(v[0::2].cpu(), torch.zeros_like(v[0::2].cpu()))
        assert bool(torch.isneginf(ls[0::2]).all()) and bool(torch.isfinite(ls[1::2]).all())


@pytest.mark.parametrize("tid,dtype", ct.params(dtypes=(torch.float32, torch.float64)))
def test_forward_near_coincident_d129(tid, dtype):
    """A query 1e-3 from a charge of norm 10 with a twin 1e-3 away, D = 129: direct
    differences keep r2 (the expansion would lose it entirely in float32)."""
    target = ct.get(tid)
    x, y = near_coincident_case()
    case = dict(
        x=x.to(dtype).to(target.device),
        y=y.to(dtype).to(target.device),
        w=None,
        power=129.0,
        eps=0.0,
        exclude=None,
        eps_rows=None,
    )
    v, ls = run_forward(target, case)
    check(case, v, ls, dtype)


@pytest.mark.parametrize("tid,dtype", ct.params(dtypes=(torch.float64,)))
def test_forward_unreachable_rows(tid, dtype):
    """A query on a charge next to rows left with a single weighted charge, and rows that
    exclude the only charge, or the only one with a positive weight: no field (v = 0,
    log_scale = -inf), while a row that can still reach a charge gets a finite field."""
    target = ct.get(tid)
    dev = target.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=dtype)
    y = torch.randn(5, 4, generator=g, dtype=dtype)
    x[0] = y[3]  # exact coincidence, eps = 0
    w = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0], dtype=dtype)
    exclude = torch.tensor([-1, 2, 3, -1, -1, -1])  # rows 1, 2: one weighted charge left
    case = dict(
        x=x.to(dev),
        y=y.to(dev),
        w=w.to(dev),
        power=4.0,
        eps=0.0,
        exclude=exclude.to(dev),
        eps_rows=None,
    )
    v, ls = run_forward(target, case)
    check(case, v, ls, dtype)
    assert float(v[0].abs().max()) == 0.0 and bool(torch.isfinite(ls[0]))
    ones = torch.ones(6, dtype=torch.int64, device=dev)
    for w2 in (None, torch.tensor([0.0, 1.0], dtype=dtype, device=dev)):
        v, ls = target.forward(x.to(dev), y[:2].to(dev), w2, 4.0, 0.0, exclude=ones)
        if w2 is None:
            assert bool(torch.isfinite(ls).all())  # charge 0 is still reachable
            continue
        assert torch.equal(v.cpu(), torch.zeros_like(x)) and bool(torch.isneginf(ls).all())
    v, ls = target.forward(
        x.to(dev),
        y[:1].to(dev),
        None,
        4.0,
        0.0,
        exclude=torch.zeros(6, dtype=torch.int64, device=dev),
    )
    assert torch.equal(v.cpu(), torch.zeros_like(x)) and bool(torch.isneginf(ls).all())


@pytest.mark.parametrize(
    "tid,dtype,order,B",
    ct.params(
        [("rising", "max-rises"), ("falling", "max-first")],
        [(70, "B70"), (1100, "B1100")],
        dtypes=(torch.float32, torch.float64),
    ),
)
def test_forward_online_softmax_order(tid, dtype, order, B):
    """Charges sorted so that the queries' nearest charges come last (the running max rises
    from tile to tile, rescaling the accumulator) or first (later tiles only add small
    terms): 70 charges span several tiles of every backend but the CPU's, whose tiles hold
    256 charges at D = 9; 1100 span five of them."""
    target = ct.get(tid)
    g = torch.Generator().manual_seed(3)
    x = 0.1 * torch.randn(70, 9, generator=g, dtype=torch.float64)
    y = torch.randn(B, 9, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    idx = torch.argsort(y.norm(dim=1), descending=(order == "rising"))
    yy, ww = y[idx], w[idx]
    best = torch.cdist(x, yy).argmin(dim=1)
    late = float((best >= B // 2).double().mean())
    assert (late > 0.9) if order == "rising" else (late < 0.1)
    case = dict(
        x=x.to(dtype).to(target.device),
        y=yy.to(dtype).to(target.device),
        w=ww.to(dtype).to(target.device),
        power=9.0,
        eps=0.0,
        exclude=None,
        eps_rows=None,
    )
    v, ls = run_forward(target, case)
    check(case, v, ls, dtype)


HALF = [(torch.float16, "f16"), (torch.bfloat16, "bf16")]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=i) for d, i in HALF])
def test_half_exact_coincidence_agrees_across_backends(dtype):
    """float16/bfloat16 queries exactly on a charge: r2 = 0 is floored at the smallest normal
    number of the *input* dtype on every backend (float16: 6.1e-5, not float32's 1.2e-38), so
    log_scale = -(p/2) log(floor) + ... agrees across the reference, Triton and the CUDA
    kernels (here: the interpreter and the emulator), up to the output rounding."""
    runners = [t for t in ct.TARGET_IDS if dtype in ct.dtypes_of(t)]
    assert "reference" in runners and len(runners) >= 3, runners  # reference, triton, cuda
    case = field_case(9, 13, 4, "coincident", dtype, seed=3)
    ref_v, ref_ls = run_forward(ct.get("reference"), case)
    floor = torch.finfo(dtype).tiny
    # the coincident rows' log_scale is dominated by the floored pair
    assert float(ref_ls[0]) > -0.5 * 4 * float(torch.log(torch.tensor(floor))) - 10.0
    tol = tolerance(dtype)
    for tid in runners:
        target = ct.get(tid)
        on = {
            k: (t.to(target.device) if isinstance(t, torch.Tensor) else t) for k, t in case.items()
        }
        v, ls = run_forward(target, on)
        err = ((ls.cpu().double() - ref_ls.double()).abs() / (1 + ref_ls.double().abs())).max()
        assert float(err) <= tol.log_scale, (tid, float(err))
        assert torch.equal(v[:5].cpu(), torch.zeros_like(v[:5].cpu())), tid
        check(on, v, ls, dtype)
