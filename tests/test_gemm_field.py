"""The GEMM-form field with a certified error (docs/DESIGN.md, "A tensor-core field with a certified
error"): poissonflow.kernels.triton._gemm
and its backend "triton-gemm" / poisson_field(..., algorithm="gemm").

Under TRITON_INTERPRET=1 (no GPU) tl.dot is exact float32. The kernel rounds its dot operands
itself, to nearest by a bit mask on the float32 pattern (TF32: 10 stored mantissa bits; bf16:
7; tf32x3: a TF32 pair hi + lo), before tl.dot, on the GPU and in the interpreter alike, so the
interpreter runs the GEMM-form r2 that a TF32 tensor core computes from the same operands
(whose products of two rounded operands are exact in float32); only the float32 accumulation
order differs, which the bound covers with one ulp per addition. The agreement with the
reference on every conformance shape and feature is the conformance suite's (target
triton-gemm-interp, tests/conformance); here: the cases built so that the plain GEMM form fails,
the certificate, what the exact recomputation saves, the recomputed fractions, the API.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'poissonflow[triton]')")

from conformance.conformance_cases import near_coincident_case  # noqa: E402
from helpers import TOL_GRAD, TOL_LS, TOL_V, field_errors, row_errors  # noqa: E402

import poissonflow  # noqa: E402
from poissonflow.kernels.reference import poisson_field_reference  # noqa: E402
from poissonflow.kernels.triton import _gemm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32
F64 = torch.float64
# The exact path's own float32 rounding (the exact kernel's error against the float64
# reference at these sizes is <= 2e-6, row-relative): what the certificate does not cover.
ROUNDING = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf bounds in numpy


def near_coincident(**kwargs):
    """The conformance suite's near-coincident case (queries 1e-3 from a charge of norm 10, each
    with a near twin 1e-3 away, docs/DESIGN.md, "The field operator") in float32: |x|^2 = 100, whose
    TF32
    rounding of the products (~0.1 in r2) dwarfs r2 ~ 1e-6."""
    x, y = near_coincident_case(**kwargs)
    return x.float(), y.float()


def random_case(N, B, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(B, D, generator=g)


def clustered_case(N, B, D, k=4, spread=1.0, norm=3.0, seed=0):
    """k clusters of radius ~spread around centres of norm `norm`; queries and charges drawn
    from the same clusters (within-cluster pairs compete, the rest are far)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, D, generator=g, dtype=F64)
    c = norm * c / c.norm(dim=1, keepdim=True)

    def draw(n):
        idx = torch.randint(0, k, (n,), generator=g)
        return (c[idx] + spread * torch.randn(n, D, generator=g, dtype=F64) / D**0.5).float()

    return draw(N), draw(B)


def on(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def errors(x, y, res, **kw):
    rel, _, ls_err = field_errors(x.cpu(), y.cpu(), res.v.cpu(), res.log_scale.cpu(), **kw)
    return rel, ls_err


def test_plain_gemm_form_fails_and_certified_passes():
    """Near-coincident queries, D = 129: the plain GEMM form (no recomputation, every pair kept
    with its GEMM-form r2) gets v wrong by ~100%; the certified version meets the float32
    tolerance, without falling back (the exact recomputation of the near pairs saves it)."""
    x, y = on(*near_coincident())
    plain = _gemm.gemm_field_forward(
        x, y, None, 129.0, 0.0, margin=float("inf"), recompute=False, fallback=False
    )
    rel, ls_err = errors(x, y, plain)
    assert rel > 0.5, rel
    assert ls_err > 100 * TOL_LS[F32], ls_err
    # the certificate says so: no finite bound on these rows
    assert bool(torch.isinf(plain.certificate[:, 0]).all())
    cert = _gemm.gemm_field_forward(x, y, None, 129.0, 0.0)
    rel, ls_err = errors(x, y, cert)
    assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32], (rel, ls_err)
    s = cert.summary(y.shape[0])
    assert s["rows_fell_back"] == 0.0, s
    assert 0.0 < s["pairs_recomputed"] < 0.5, s  # the twins and a few more, not everything


@pytest.mark.parametrize("precision", ["tf32", "bf16", "tf32x3", "ieee"])
def test_r2_rounding_bound_holds(precision):
    """|q - |x - y|^2| <= err = C_S (|x|^2 + |y|^2) on every pair of random, clustered and
    near-coincident data, with the emulated operand rounding; and the emulation is real: TF32
    and bf16 errors reach a sizeable share of the bound (the bound is not vacuous), far above
    the float32 ('ieee') products' error."""
    cases = [
        random_case(40, 48, 33, seed=1),
        clustered_case(40, 48, 129, seed=2),
        near_coincident(N=8, B=16),
    ]
    worst = 0.0
    for x, y in cases:
        q, err = _gemm.gemm_r2_bounds(*on(x, y), precision=precision)
        true = ((x.double()[:, None, :] - y.double()[None, :, :]) ** 2).sum(-1)
        ratio = (q.cpu().double() - true).abs() / err.cpu().double()
        assert float(ratio.max()) <= 1.0, (precision, float(ratio.max()))
        worst = max(worst, float(ratio.max()))
    if precision in ("tf32", "bf16"):
        assert worst > 0.05, worst
    # the constant of docs/DESIGN.md, "A tensor-core field with a certified error": c = C_S / u,
    # about 2 + D / 2^12 for TF32
    c_s = _gemm.rounding_constants("tf32", 129)
    assert 2.0 < c_s / 2.0**-11 < 2.04


def test_tf32_emulation_is_as_wrong_as_a_tensor_core():
    """The emulated TF32 r2 equals the float64 evaluation of the expansion from operands
    rounded to 10 stored mantissa bits (round to nearest), up to float32 accumulation."""
    x, y = random_case(24, 40, 65, seed=4)
    q, _ = _gemm.gemm_r2_bounds(*on(x, y), precision="tf32")

    def tf32(t):  # round to nearest even, 13 low bits dropped, on the integer pattern
        b = t.view(torch.int32).to(torch.int64)
        b = (b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF
        return b.to(torch.int32).view(torch.float32).double()

    xd, yd = x.double(), y.double()
    want = (
        (xd * xd).sum(1).float().double()[:, None]
        + (yd * yd).sum(1).float().double()[None, :]
        - 2 * tf32(x) @ tf32(y).T
    )
    scale = (xd * xd).sum(1)[:, None] + (yd * yd).sum(1)[None, :]
    # the bound's accumulation term, gamma_D (one float32 ulp per addition): what a tensor
    # core's float32 accumulation may add to the exact sum of the exact products
    assert float(((q.cpu().double() - want).abs() / scale).max()) <= 2 * 65 * 2.0**-24
    # and TF32 is genuinely worse than float32 products
    qi, _ = _gemm.gemm_r2_bounds(*on(x, y), precision="ieee")
    true = ((xd[:, None] - yd[None]) ** 2).sum(-1)
    e_tf32 = float(((q.cpu().double() - true).abs() / scale).median())
    e_ieee = float(((qi.cpu().double() - true).abs() / scale).median())
    assert e_tf32 > 30 * e_ieee, (e_tf32, e_ieee)


@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("margin", [3.0, 6.0, 12.0])
def test_certificate_holds(data, margin):
    """With small margins many pairs are dropped and the certified bounds are macroscopic;
    the actual error (against the float64 reference) stays within bound + the exact path's
    float32 rounding on every row, and the bound is not vacuous (some rows come within a
    factor of 30 of it)."""
    if data == "random":
        x, y = random_case(32, 48, 17, seed=6)
    else:
        x, y = clustered_case(32, 48, 17, k=3, spread=1.5, norm=2.0, seed=6)
    x, y = on(x, y)
    res = _gemm.gemm_field_forward(x, y, None, 17.0, 0.0, margin=margin, fallback=False)
    v_ref, ls_ref = poisson_field_reference(
        x.cpu().double(), y.cpu().double(), None, 17.0, 0.0, r2_floor=torch.finfo(F32).tiny
    )
    dv = (res.v.cpu().double() - v_ref).norm(dim=1)
    dls = (res.log_scale.cpu().double() - ls_ref).abs()
    b_v, b_ls = res.certificate.cpu().double().unbind(1)
    vn = v_ref.norm(dim=1)
    assert bool((dv <= b_v + ROUNDING * vn).all()), float((dv - b_v - ROUNDING * vn).max())
    assert bool((dls <= b_ls + ROUNDING * (1 + ls_ref.abs())).all())
    active = dv > 10 * ROUNDING * vn
    if margin <= 6.0:
        assert bool(active.any())  # the dropped pairs matter at this margin
        assert float((dv[active] / b_v[active]).max()) > 1 / 30


def test_exact_recomputation_is_what_saves_the_near_pairs():
    """Same inputs and margin, recomputation off: the near pairs keep their GEMM-form r2, the
    error is ~100% and the certificate flags every such row; with fallback on, those rows are
    rescued by the exact kernel (all of them fall back). With recomputation on, nothing falls
    back and the result meets the tolerance."""
    x, y = on(*near_coincident())
    off = _gemm.gemm_field_forward(x, y, None, 129.0, 0.0, recompute=False, fallback=False)
    rel, _ = errors(x, y, off)
    assert rel > 0.5, rel
    assert float(off.certificate[:, 0].min()) > TOL_V[F32]
    rescued = _gemm.gemm_field_forward(x, y, None, 129.0, 0.0, recompute=False)
    assert rescued.summary(y.shape[0])["rows_fell_back"] == 1.0
    assert errors(x, y, rescued)[0] <= TOL_V[F32]
    on_ = _gemm.gemm_field_forward(x, y, None, 129.0, 0.0)
    assert on_.summary(y.shape[0])["rows_fell_back"] == 0.0
    assert errors(x, y, on_)[0] <= TOL_V[F32]
    assert float(on_.certificate[:, 0].max()) <= 1e-5 * float(on_.v.norm(dim=1).min())


def test_fraction_recomputed_random_vs_clustered():
    """D = 129, N = B = 128, p = 129. Random data: every charge is about equally far and the
    margin K = log2(B) + log2(4 / tau) ~ 25.6 keeps the pairs whose r2 is within ~30% of the
    row's smallest, about half of them (52% measured). Clustered data (4 clusters): pairs
    across clusters are dropped, within-cluster ones recomputed (at most a quarter; 16%
    measured). Both meet the tolerance without falling back; what is kept is exactly what is
    recomputed (at this distance scale no logit interval is tight)."""
    fractions = {}
    for name, (x, y) in (
        ("random", random_case(128, 128, 129, seed=7)),
        ("clustered", clustered_case(128, 128, 129, k=4, seed=7)),
    ):
        x, y = on(x, y)
        res = _gemm.gemm_field_forward(x, y, None, 129.0, 0.0)
        rel, ls_err = errors(x, y, res)
        assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32], (name, rel, ls_err)
        s = res.summary(128)
        assert s["rows_fell_back"] == 0.0
        assert s["pairs_recomputed"] == s["pairs_kept"]
        fractions[name] = s["pairs_recomputed"]
    assert 0.2 < fractions["random"] < 0.8, fractions
    assert 0.1 < fractions["clustered"] < 0.4, fractions
    assert fractions["clustered"] < fractions["random"]


def test_sorted_clusters_make_recomputation_tile_sparse():
    """The kernel recomputes (and accumulates) whole tiles: on random or unsorted clustered
    data every tile holds a near pair, so every tile is recomputed however few pairs are near.
    Points sorted by cluster put the near pairs in diagonal blocks: with 4 clusters of ~32
    points and 16 x 16 tiles (the interpreter's), about a quarter of the tiles plus the blocks'
    ragged edges are recomputed (44% measured), and the result meets the tolerance."""
    n = 512 if DEV == "cuda" else 128  # 4 clusters span 4 x 4 tiles of any GPU config
    x, y = clustered_case(n, n, 129, k=4, seed=9)
    res = _gemm.gemm_field_forward(*on(x, y), None, 129.0, 0.0)
    assert res.summary(n)["tiles_recomputed"] == 1.0
    # the same points, sorted by their nearest centre
    g = torch.Generator().manual_seed(9)
    c = torch.randn(4, 129, generator=g, dtype=F64)
    c = 3.0 * c / c.norm(dim=1, keepdim=True)
    xs = x[torch.cdist(x.double(), c).argmin(1).argsort()]
    ys = y[torch.cdist(y.double(), c).argmin(1).argsort()]
    xs, ys = on(xs, ys)
    res = _gemm.gemm_field_forward(xs, ys, None, 129.0, 0.0)
    s = res.summary(n)
    assert s["tiles_recomputed"] < 0.5 and s["tiles_accumulated"] < 0.5, s
    rel, ls_err = errors(xs, ys, res)
    assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32]


def test_far_pairs_keep_their_gemm_value():
    """Large softening (the flow far from the plane: r2 >= z^2 for every pair): every logit
    interval is narrower than `tight`, so no pair is recomputed, and the result is certified
    within the tolerance."""
    x, y = on(*random_case(40, 56, 33, seed=8))
    res = _gemm.gemm_field_forward(x, y, None, 34.0, 2e3)
    s = res.summary(56)
    assert s["pairs_recomputed"] == 0.0 and s["pairs_kept"] == 1.0 and s["rows_fell_back"] == 0.0
    assert s["tiles_recomputed"] == 0.0
    rel, ls_err = errors(x, y, res, power=34.0, eps=2e3)
    assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32], (rel, ls_err)


def test_cancelling_rows_fall_back():
    """Queries midway between two charges: v ~ 0, so no bound relative to |v| can be met
    unless every pair is exact; with a margin that drops pairs those rows go to the exact
    kernel, and the result is right."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(48, 16, generator=g)
    y = y / y.norm(dim=1, keepdim=True)
    x = 0.5 * (y[:20] + y[1:21])
    x, y = on(x, y)
    res = _gemm.gemm_field_forward(x, y, None, 16.0, 0.0, margin=4.0)
    fell = res.stats[:, 2].cpu()
    assert int(fell.sum()) > 0
    assert float(res.certificate[fell.bool().to(res.certificate.device), 0].abs().max()) == 0.0
    _, cond, ls_err = field_errors(x.cpu(), y.cpu(), res.v.cpu(), res.log_scale.cpu(), power=16.0)
    assert cond <= TOL_V[F32] and ls_err <= TOL_LS[F32]


@pytest.mark.parametrize("precision", ["bf16", "tf32x3", "ieee"])
def test_other_precisions_certified(precision):
    x, y = on(*near_coincident(N=8, B=16))
    res = _gemm.gemm_field_forward(x, y, None, 129.0, 0.0, precision=precision)
    rel, ls_err = errors(x, y, res)
    assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32], (precision, rel, ls_err)


@pytest.mark.parametrize("feature", ["weights", "power", "eps", "exclude", "eps_rows"])
def test_features_through_the_api(feature):
    """poisson_field(..., algorithm="gemm") on near-coincident data with each feature of the
    conformance suite (where the suite's cases are random); float32 tolerance."""
    x, y = near_coincident(N=8, B=16, D=33)
    g = torch.Generator().manual_seed(3)
    kw = dict(weights=None, power=33.0, eps=0.0, exclude=None)
    eps_rows = None
    if feature == "weights":
        w = torch.rand(16, generator=g) + 0.1
        w[::3] = 0.0
        kw["weights"] = w
    elif feature == "power":
        kw["power"] = 40.3
    elif feature == "eps":
        kw["eps"] = 1e-3
    elif feature == "exclude":
        kw["exclude"] = torch.arange(0, 16, 2)  # the nearest charge: its twin takes over
    else:
        eps_rows = torch.rand(8, generator=g) * 1e-3
    x, y = on(x, y)
    kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if eps_rows is None:
        v, ls = poissonflow.poisson_field(x, y, algorithm="gemm", **kw)
    else:
        eps_rows = eps_rows.to(DEV)
        v, ls = poissonflow.ops.field(x, y, None, 33.0, 0.0, None, eps_rows, "triton-gemm")
        kw = dict(power=33.0, eps_rows=eps_rows.cpu())
    cpu = {k: (t.cpu() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    rel, _, ls_err = field_errors(x.cpu(), y.cpu(), v.cpu(), ls.cpu(), **cpu)
    assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32], (feature, rel, ls_err)


def test_backward_is_the_exact_one():
    """Gradients through poissonflow::field_triton_gemm (the exact Triton backward from this
    forward's outputs) against autograd through the float64 reference."""
    x, y = near_coincident(N=6, B=12, D=33)
    w = torch.rand(12, generator=torch.Generator().manual_seed(0)) + 0.5
    xl, yl, wl = (t.to(DEV).requires_grad_() for t in (x, y, w))
    v, ls = poissonflow.poisson_field(xl, yl, weights=wl, algorithm="gemm")
    gv = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    gl = torch.randn(ls.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    got = torch.autograd.grad((v * gv).sum() + (ls * gl).sum(), (xl, yl, wl))
    xd, yd, wd = (t.double().requires_grad_() for t in (x, y, w))
    vr, lr = poisson_field_reference(xd, yd, wd, 33.0, 0.0, r2_floor=torch.finfo(F32).tiny)
    want = torch.autograd.grad(
        (vr * gv.cpu().double()).sum() + (lr * gl.cpu().double()).sum(), (xd, yd, wd)
    )
    for a, b in zip(got, want):
        assert row_errors(a, b) <= TOL_GRAD[F32]


def test_algorithm_argument():
    x, y = random_case(5, 7, 3)
    with pytest.raises(ValueError, match="algorithm"):
        poissonflow.poisson_field(x, y, algorithm="fast")
    with pytest.raises(ValueError, match="triton-gemm"):
        poissonflow.poisson_field(x, y, algorithm="gemm", backend="cpu")
    xd, yd = on(x.double(), y.double())
    v, ls = poissonflow.poisson_field(xd, yd, algorithm="gemm")  # float64: the exact kernel
    rel, _, ls_err = field_errors(xd.cpu(), yd.cpu(), v.cpu(), ls.cpu())
    assert rel <= TOL_V[F64] and ls_err <= TOL_LS[F64]
    with pytest.raises(ValueError, match="precision"):
        _gemm.gemm_field_forward(*on(x, y), None, 3.0, 0.0, precision="fp8")


def test_default_margin():
    # K = log2(B) + log2(4 / tau): the dropped pairs' share of the sum is <= tau / 4
    assert math.isclose(_gemm.default_margin(65536, 1e-5), 16 + math.log2(4e5))


def test_op_registration_fake_and_dynamo():
    """poissonflow::field_triton_gemm: the schema of poissonflow::field, a fake and autograd
    registration (opcheck), and Dynamo traces it without a graph break."""
    import poissonflow.kernels.triton.gemm_ops  # noqa: F401

    x, y = random_case(5, 7, 3, seed=9)
    w = torch.rand(7, generator=torch.Generator().manual_seed(1)) + 0.1
    args = (x.to(DEV).requires_grad_(), y.to(DEV), w.to(DEV), 3.0, 0.1, None, None)
    op = torch.ops.poissonflow.field_triton_gemm
    torch.library.opcheck(
        op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
    assert (
        str(op.default._schema).split("(", 1)[1]
        == str(torch.ops.poissonflow.field.default._schema).split("(", 1)[1]
    )

    def total(x):
        return op(x, *args[1:])[0].sum()

    compiled = torch.compile(total, backend="eager", fullgraph=True)
    assert torch.equal(compiled(args[0]), total(args[0]))
