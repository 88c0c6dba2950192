"""The Riesz uniformity loss (losses.riesz_uniformity_loss) and the memory bank (FeatureBank).

Values are checked against an independent float64 computation with explicit pairwise distances
(numpy, direct differences, log domain); gradients against gradcheck, against torch autograd
through the explicit pairwise formula, and between the cpu and reference backends, including
the leave-one-out configuration (queries == charges, each query's own charge excluded) over
more than one tile of queries and charges (N = 300). Memory is measured in a subprocess.

Tolerances. float64: 1e-10 relative (the kernel and numpy sum in different orders; measured
at most 4.5e-15). float32: 1e-5 relative on the loss, whose float32 error is that of the
scores -(s/2) log r2 (a few ulps of r2 times s/2, against losses of order 0.1 to 50; measured
at most 9e-7 on both backends); gradients 1e-4 of the gradient's largest entry (the softmax
weights carry the float32 error of the scores, which reach s/2 * |log r2| ~ 100 at s = 64).
"""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from poissonflow import losses as L
from poissonflow import metrics as M
from poissonflow.bank import FeatureBank

F64 = torch.float64
TIGHT = 1e-10
LOOSE32 = 1e-5
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
BACKENDS = ["cpu", "reference"]
S_VALUES = [0.5, 2.0, 8.0, 64.0]


def data(n=40, d=8, k=56, seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, d)), r.standard_normal((k, d))


def explicit_loss(x, bank, s, normalize=True):
    """log mean_{i, j != i} ||u_i - u_j||^(-s) in float64 numpy, j over x's other rows and the
    bank's rows: an N x (N + K) matrix of direct-difference distances, in the log domain (at
    s = 64 the powers themselves would reach 1e60 and more)."""
    x = np.asarray(x, dtype=np.float64)
    c = x if bank is None else np.concatenate([x, np.asarray(bank, dtype=np.float64)])
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
    r2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    n = x.shape[0]
    terms = -0.5 * s * np.log(r2[~np.eye(n, c.shape[0], dtype=bool)])
    return float(logsumexp(terms) - math.log(terms.size))


def explicit_loss_torch(x, bank, s):
    """The same formula as explicit_loss in torch float64 (no field op), for autograd."""
    u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if bank is not None:
        bank = bank / torch.linalg.vector_norm(bank, dim=1, keepdim=True)
    c = u if bank is None else torch.cat([u, bank])
    r2 = ((u[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    n = u.shape[0]
    keep = ~torch.eye(n, c.shape[0], dtype=torch.bool)
    terms = -0.5 * s * torch.log(r2[keep])
    return torch.logsumexp(terms, 0) - math.log(terms.numel())


def rel(a, b):
    return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("s", S_VALUES)
def test_value_float64_matches_explicit_pairs(s, with_bank, backend):
    x, b = data()
    expected = explicit_loss(x, b if with_bank else None, s)
    bank = torch.from_numpy(b) if with_bank else None
    got = L.riesz_uniformity_loss(torch.from_numpy(x), s, bank=bank, backend=backend)
    assert got.dtype == F64 and got.ndim == 0
    assert rel(float(got), expected) <= TIGHT, (float(got), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("s", S_VALUES)
def test_value_float32_matches_explicit_pairs(s, with_bank, backend):
    x, b = data()
    x32, b32 = torch.from_numpy(x).float(), torch.from_numpy(b).float()
    # The float64 value of the float32-rounded inputs: only the computation's error is measured.
    expected = explicit_loss(x32.double().numpy(), b32.double().numpy() if with_bank else None, s)
    got = L.riesz_uniformity_loss(x32, s, bank=b32 if with_bank else None, backend=backend)
    assert got.dtype == torch.float32
    assert rel(float(got), expected) <= LOOSE32, (float(got), expected)


def test_auto_backend_and_normalize_false():
    x, b = data(seed=1)
    # rows already on the unit sphere: normalize=False must give the normalised loss
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    expected = explicit_loss(u, ub, 2.0, normalize=False)
    got = L.riesz_uniformity_loss(
        torch.from_numpy(u), 2.0, bank=torch.from_numpy(ub), normalize=False
    )
    assert rel(float(got), expected) <= TIGHT
    # raw rows with normalize=False: the energy of the raw points, not of their directions
    raw = explicit_loss(x, b, 2.0, normalize=False)
    got_raw = L.riesz_uniformity_loss(
        torch.from_numpy(x), 2.0, bank=torch.from_numpy(b), normalize=False, backend="auto"
    )
    assert rel(float(got_raw), raw) <= TIGHT
    assert abs(raw - expected) > 0.1  # the two settings really differ on raw rows


def test_single_row_against_a_bank():
    # N = 1: no within-batch pair, K pairs against the bank
    x, b = data(n=1, k=9)
    got = L.riesz_uniformity_loss(torch.from_numpy(x), 3.0, bank=torch.from_numpy(b))
    assert rel(float(got), explicit_loss(x, b, 3.0)) <= TIGHT


def test_feature_bank_argument_and_empty_bank():
    x, b = data()
    xt = torch.from_numpy(x)
    bank = FeatureBank(100, 8, dtype=F64)
    # an empty bank counts as none
    alone = float(L.riesz_uniformity_loss(xt, 2.0))
    assert float(L.riesz_uniformity_loss(xt, 2.0, bank=bank)) == alone
    empty = torch.zeros(0, 8, dtype=F64)
    assert float(L.riesz_uniformity_loss(xt, 2.0, bank=empty)) == alone
    bank.push(torch.from_numpy(b))
    got = L.riesz_uniformity_loss(xt, 2.0, bank=bank)
    assert float(got) == float(L.riesz_uniformity_loss(xt, 2.0, bank=torch.from_numpy(b)))
    assert rel(float(got), explicit_loss(x, b, 2.0)) <= TIGHT


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bank", [False, True])
def test_gradcheck_float64(with_bank, backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=g, dtype=F64, requires_grad=True)
    bank = torch.randn(7, 4, generator=g, dtype=F64) if with_bank else None
    for s in (2.0, 7.5):
        assert torch.autograd.gradcheck(
            lambda t, s=s: L.riesz_uniformity_loss(t, s, bank=bank, backend=backend), (x,)
        )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("with_bank", [False, True])
def test_gradients_leave_one_out_many_tiles(with_bank, dtype):
    """N = 300 queries and 300 (+ 200) charges: several query and charge tiles of the cpu kernel,
    where the charges' gradient of the leave-one-out configuration was once NaN. Both backends
    must give finite gradients equal to autograd through the explicit pairwise formula."""
    g = torch.Generator().manual_seed(4)
    x64 = torch.randn(300, 16, generator=g, dtype=F64)
    b64 = torch.randn(200, 16, generator=g, dtype=F64) if with_bank else None
    x_ref = x64.clone().requires_grad_()
    explicit_loss_torch(x_ref, b64, 8.0).backward()
    expected = x_ref.grad
    grads = {}
    for backend in BACKENDS:
        xt = x64.to(dtype).clone().requires_grad_()
        bank = None if b64 is None else b64.to(dtype)
        L.riesz_uniformity_loss(xt, 8.0, bank=bank, backend=backend).backward()
        assert xt.grad.dtype == dtype
        assert bool(torch.isfinite(xt.grad).all()), f"{backend}: non-finite gradient"
        err = float((xt.grad.double() - expected).abs().max() / expected.abs().max())
        assert err <= GRAD_TOL[dtype], f"{backend}: gradient error {err:.3e}"
        grads[backend] = xt.grad.double()
    between = float((grads["cpu"] - grads["reference"]).abs().max() / expected.abs().max())
    assert between <= GRAD_TOL[dtype]


def test_bank_receives_no_gradient():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 4, generator=g, dtype=F64, requires_grad=True)
    bank = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    L.riesz_uniformity_loss(x, 2.0, bank=bank).backward()
    assert bank.grad is None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_s_float32_is_finite(backend):
    """s = 128 in float32: ||u_i - u_j||^(-128) overflows float32 below distance 0.5, and such
    pairs are present here; the log-domain evaluation stays finite and accurate."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 3, generator=g, dtype=F64)
    b = torch.randn(100, 3, generator=g, dtype=F64)
    x32, b32 = x.float(), b.float()
    u = torch.nn.functional.normalize(x32, dim=1)
    assert bool(torch.isinf(torch.pdist(u) ** -128.0).any())  # the direct powers overflow
    xt = x32.clone().requires_grad_()
    loss = L.riesz_uniformity_loss(xt, 128.0, bank=b32, backend=backend)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(xt.grad).all())
    expected = explicit_loss(x32.double().numpy(), b32.double().numpy(), 128.0)
    assert rel(float(loss.detach()), expected) <= LOOSE32
    x_ref = x32.double().requires_grad_()
    explicit_loss_torch(x_ref, b32.double(), 128.0).backward()
    err = float((xt.grad.double() - x_ref.grad).abs().max() / x_ref.grad.abs().max())
    assert err <= GRAD_TOL[torch.float32]


def distinct_pairs_loss(x, bank, s):
    """The Riesz energy over pairs of distinct points, float64 autograd: coincident rows (equal
    after normalisation) left out like a row's own pair; the mask is a constant, so each copy
    gets the gradient of a single point at its place."""
    u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    c = u
    if bank is not None:
        c = torch.cat([u, bank / torch.linalg.vector_norm(bank, dim=1, keepdim=True)])
    same = (u.detach()[:, None, :] == c.detach()[None, :, :]).all(-1)
    r2 = ((u[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    terms = -0.5 * s * torch.log(r2[~same])
    return torch.logsumexp(terms, 0) - math.log(terms.numel())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_coincident_rows_are_one_point(backend, dtype):
    """A batch drawn with replacement (rows 0 and 1 twice more, row 2 once more, one copy a
    positive multiple) and a bank holding copies of batch rows (two of row 3, one of row 4):
    the loss and its gradient are those over pairs of distinct points, every copy gets the same,
    non-vanishing gradient (the old floor gave a loss of about 79 and a gradient of 1e-36)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(10, 6, generator=g, dtype=F64)
    x = torch.cat([base, base[[0, 1, 0, 2]]]).to(dtype)
    x[-1] = x[-1] * 2.0  # a multiple: the same point after normalisation (bit for bit at 2)
    bank = torch.cat([torch.randn(7, 6, generator=g, dtype=F64), base[[3, 3, 4]]]).to(dtype)
    for b in (None, bank):
        xt = x.clone().requires_grad_()
        loss = L.riesz_uniformity_loss(xt, 2.0, bank=b, backend=backend)
        loss.backward()
        x_ref = x.double().clone().requires_grad_()
        ref = distinct_pairs_loss(x_ref, None if b is None else b.double(), 2.0)
        ref.backward()
        assert rel(float(loss.detach()), float(ref.detach())) <= (
            TIGHT if dtype == F64 else LOOSE32
        )
        err = (xt.grad.double() - x_ref.grad).abs().max() / x_ref.grad.abs().max()
        assert float(err) <= GRAD_TOL[dtype]
        assert float(xt.grad[[0, 10, 12]].norm(dim=1).min()) > 1e-3
        assert torch.allclose(xt.grad[0], xt.grad[12], rtol=1e-4 if dtype != F64 else 1e-12)


def test_push_before_the_loss_is_excluded_and_raise_names_the_rows():
    """The documented trap, a batch pushed into the bank before its loss: every row meets its
    copy. Excluded, the loss equals the loss against the bank without those copies; with
    coincident="raise" the error names the rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    old = torch.randn(9, 4, generator=g, dtype=F64)
    bank = FeatureBank(20, 4, dtype=F64)
    bank.push(old)
    bank.push(x)
    got = L.riesz_uniformity_loss(x, 2.0, bank=bank)
    # the pairs: batch-batch, batch-old bank rows, and each row with the other rows' copies
    xt = x.clone().requires_grad_()
    ref = distinct_pairs_loss(xt, bank.features(), 2.0)
    assert rel(float(got), float(ref.detach())) <= TIGHT
    with pytest.raises(ValueError, match=r"x row 0 and bank row 9"):
        L.riesz_uniformity_loss(x, 2.0, bank=bank, coincident="raise")
    dup = torch.cat([x, x[4:5]])
    with pytest.raises(ValueError, match=r"x rows 4 and 6"):
        L.riesz_uniformity_loss(dup, 2.0, coincident="raise")
    with pytest.raises(ValueError, match="coincident must be one of"):
        L.riesz_uniformity_loss(x, 2.0, coincident="ignore")


def test_all_rows_coincident_is_an_error():
    x = torch.ones(5, 3, dtype=F64)
    with pytest.raises(ValueError, match="no pair of distinct points"):
        L.riesz_uniformity_loss(x, 2.0)
    with pytest.raises(ValueError, match="no pair of distinct points"):
        L.riesz_uniformity_loss(x, 2.0, bank=2.0 * x[:2])
    # a bank with one other point leaves pairs: only the batch-bank ones
    bank = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    xt = x.clone().requires_grad_()
    loss = L.riesz_uniformity_loss(xt, 2.0, bank=bank)
    loss.backward()
    ref = distinct_pairs_loss(x.clone().requires_grad_(), bank, 2.0)
    assert rel(float(loss.detach()), float(ref.detach())) <= TIGHT
    assert bool(torch.isfinite(xt.grad).all())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "s, err",
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("2", TypeError),
        (True, TypeError),
        (None, TypeError),
        (torch.tensor([1.0, 2.0]), TypeError),
    ],
)
def test_bad_s(s, err):
    x = torch.randn(6, 3, dtype=F64)
    with pytest.raises(err, match=r"\bs\b"):
        L.riesz_uniformity_loss(x, s)


def test_bad_x_and_bank():
    x = torch.randn(6, 3, dtype=F64)
    with pytest.raises(ValueError, match="x"):
        L.riesz_uniformity_loss(torch.randn(6, dtype=F64), 2.0)
    with pytest.raises(TypeError, match="x"):
        L.riesz_uniformity_loss(torch.ones(6, 3, dtype=torch.int64), 2.0)
    with pytest.raises(ValueError, match="at least one pair"):
        L.riesz_uniformity_loss(x[:1], 2.0)
    with pytest.raises(ValueError, match="at least one pair"):
        L.riesz_uniformity_loss(x[:1], 2.0, bank=torch.zeros(0, 3, dtype=F64))
    with pytest.raises(ValueError, match="zero row"):
        L.riesz_uniformity_loss(torch.cat([x, torch.zeros(1, 3, dtype=F64)]), 2.0)
    with pytest.raises(ValueError, match="NaN"):
        L.riesz_uniformity_loss(torch.full((4, 3), float("nan"), dtype=F64), 2.0)
    with pytest.raises(ValueError, match="bank must have D = 3"):
        L.riesz_uniformity_loss(x, 2.0, bank=torch.randn(5, 4, dtype=F64))
    with pytest.raises(ValueError, match="bank"):
        L.riesz_uniformity_loss(x, 2.0, bank=torch.randn(5, dtype=F64))
    with pytest.raises(TypeError, match="bank has dtype"):
        L.riesz_uniformity_loss(x, 2.0, bank=torch.randn(5, 3))
    with pytest.raises(ValueError, match="bank is on meta"):
        L.riesz_uniformity_loss(x, 2.0, bank=torch.empty(5, 3, dtype=F64, device="meta"))
    with pytest.raises(TypeError, match="bank must be"):
        L.riesz_uniformity_loss(x, 2.0, bank=[[0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="bank contains"):
        L.riesz_uniformity_loss(x, 2.0, bank=torch.full((2, 3), float("inf"), dtype=F64))
    with pytest.raises(ValueError, match="bank has 1 zero row"):
        L.riesz_uniformity_loss(x, 2.0, bank=torch.zeros(1, 3, dtype=F64))
    with pytest.raises(TypeError, match="normalize"):
        L.riesz_uniformity_loss(x, 2.0, normalize="yes")
    with pytest.raises(ValueError, match="backend"):
        L.riesz_uniformity_loss(x, 2.0, backend="nope")


# ----------------------------------------------------------------------------- memory


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from poissonflow import losses
    torch.manual_seed(0)
    x = torch.randn(4096, 128, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(65536, 128), dim=1)
    losses.riesz_uniformity_loss(x[:8], 2.0, bank=bank[:64]).backward()  # load, warm up
    x.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = losses.riesz_uniformity_loss(x, 2.0, bank=bank, backend="cpu")
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    print((after - before) / 1024.0)  # ru_maxrss is in KiB on Linux
    """
)


def test_forward_backward_memory_with_a_large_bank(tmp_path):
    """N = 4096 against a bank of 65536, D = 128, float32: one N x K float32 matrix is 1 GB; the
    loss's forward and backward must add less than 300 MB of peak RSS over the inputs (measured
    73 MB: the normalised bank and the kernel's packed copy of it, 32 MB each)."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # outside the repository, so the installed package with its extension loads
    )
    assert out.returncode == 0, out.stderr
    added_mb = float(out.stdout.strip().splitlines()[-1])
    assert added_mb < 300.0, f"forward + backward added {added_mb:.1f} MB of peak RSS"


# ----------------------------------------------------------------------------- GPU backends


TRITON_SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels
    import poissonflow
    from poissonflow import losses
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ["triton"] + (["cuda"] if poissonflow.backends()["cuda"]["available"] else [])
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64).to(dev)
    bank = torch.randn(30, 8, generator=g, dtype=torch.float64).to(dev)
    out = {}
    for backend in ["reference"] + backends:
        xt = x.clone().requires_grad_()
        loss = losses.riesz_uniformity_loss(xt, 8.0, bank=bank, backend=backend)
        loss.backward()
        out[backend] = (float(loss.detach()), xt.grad)
    lr, gr = out["reference"]
    for backend in backends:
        lt, gt = out[backend]
        print(backend, abs(lt - lr) / abs(lr), float((gt - gr).abs().max() / gr.abs().max()))
    """
)


def test_gpu_backends_match_reference(tmp_path):
    """The Triton backend (and CUDA's where it runs) against the reference, float64, with a
    bank: one tile of queries and several of charges. Without a GPU, Triton runs through its
    interpreter on CPU tensors; TRITON_INTERPRET must be set before the kernels are decorated,
    hence a subprocess."""
    pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")
    out = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0].startswith("triton ")
    for line in lines:
        backend, loss_err, grad_err = line.split()
        assert float(loss_err) <= TIGHT and float(grad_err) <= TIGHT, line


# ----------------------------------------------------------------------------- training


def test_adam_steps_spread_points_on_the_sphere():
    """64 points bunched near a pole of S^2, 30 Adam steps on the Riesz loss with a bank of the
    previous steps' points: the loss falls, and so does Wang & Isola's uniformity (an
    independent measure)."""
    g = torch.Generator().manual_seed(9)
    start = torch.tensor([0.0, 0.0, 1.0]) + 0.2 * torch.randn(64, 3, generator=g)
    x = start.clone().requires_grad_()
    bank = FeatureBank(128, 3)
    opt = torch.optim.Adam([x], lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = L.riesz_uniformity_loss(x, 1.0, bank=bank)
        loss.backward()
        # push what the loss saw, before the step: pushed after it, the rows would meet their
        # own copies at the next loss (re-normalised, some bit for bit, some an ulp apart)
        bank.push(torch.nn.functional.normalize(x.detach(), dim=1))
        opt.step()
        losses.append(float(loss.detach()))
    final = float(L.riesz_uniformity_loss(x.detach(), 1.0))
    initial = float(L.riesz_uniformity_loss(start, 1.0))
    assert final < initial - 0.5, (initial, final)
    u0 = torch.nn.functional.normalize(start, dim=1)
    u1 = torch.nn.functional.normalize(x.detach(), dim=1)
    assert float(M.uniform_loss(u1)) < float(M.uniform_loss(u0)) - 0.5


# ----------------------------------------------------------------------------- the bank


def test_bank_fifo_order_and_wraparound():
    bank = FeatureBank(5, 2, dtype=F64)
    assert len(bank) == 0 and bank.features().shape == (0, 2) and not bank.full
    rows = torch.arange(16, dtype=F64).reshape(8, 2)  # row r is (2r, 2r + 1)
    bank.push(rows[:3])
    assert torch.equal(bank.features(), rows[:3])  # before wrapping: oldest first
    bank.push(rows[3:4])
    bank.push(rows[4:7])  # 7 rows pushed into 5 slots: rows 0 and 1 are overwritten
    assert bank.full and len(bank) == 5
    # slot order: slots 0, 1 now hold rows 5, 6; slots 2-4 still hold rows 2-4
    assert torch.equal(bank.features(), torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    bank.push(rows[7:8])
    assert torch.equal(bank.features()[2], rows[7])  # the oldest (row 2) went
    # a batch longer than the bank keeps its newest rows, in order
    big = torch.arange(14, dtype=F64).reshape(7, 2) + 100
    bank.push(big)
    assert torch.equal(bank.features(), big[2:])
    bank.push(torch.zeros(0, 2, dtype=F64))  # an empty batch changes nothing
    assert torch.equal(bank.features(), big[2:])
    bank.reset()
    assert len(bank) == 0
    bank.push(rows[:2])
    assert torch.equal(bank.features(), rows[:2])


def test_bank_stores_detached_copies():
    bank = FeatureBank(4, 3)
    x = torch.randn(2, 3, requires_grad=True)
    y = x * 2.0
    bank.push(y)
    assert not bank.features().requires_grad and bank.features().grad_fn is None
    expected = y.detach().clone()
    with torch.no_grad():
        y.mul_(0.0)  # the caller's tensor changes; the bank's copy does not
    assert torch.equal(bank.features(), expected)


def test_bank_errors():
    for size, dim in ((0, 3), (3, 0), (2.5, 3), (True, 3)):
        with pytest.raises(ValueError, match="size|dim"):
            FeatureBank(size, dim)
    with pytest.raises(TypeError, match="dtype"):
        FeatureBank(4, 3, dtype=torch.int64)
    bank = FeatureBank(4, 3)
    with pytest.raises(ValueError, match=r"\(M, 3\)"):
        bank.push(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(M, 3\)"):
        bank.push(torch.randn(3))
    with pytest.raises(TypeError, match="dtype"):
        bank.push(torch.randn(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="meta"):
        bank.push(torch.empty(2, 3, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bank.push([[1.0, 2.0, 3.0]])
    bad = torch.randn(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bank.push(bad)
    assert len(bank) == 0  # a rejected batch leaves the bank as it was


def test_bank_state_dict_round_trip():
    g = torch.Generator().manual_seed(10)
    batches = [torch.randn(3, 4, generator=g) for _ in range(6)]
    a = FeatureBank(7, 4)
    for bt in batches[:4]:
        a.push(bt)
    state = a.state_dict()
    b = FeatureBank(7, 4)
    b.load_state_dict(state)
    assert torch.equal(a.features(), b.features()) and len(a) == len(b)
    state["features"].zero_()  # the state is a copy, not the storage
    assert not torch.equal(a.features(), torch.zeros_like(a.features()))
    for bt in batches[4:]:  # resumed and uninterrupted banks stay identical
        a.push(bt)
        b.push(bt)
    assert torch.equal(a.features(), b.features())
    # a float64 checkpoint loads into a float32 bank (copied into its storage, cast)
    c = FeatureBank(7, 4)
    state64 = dict(a.state_dict(), features=a.state_dict()["features"].double())
    c.load_state_dict(state64)
    assert c.features().dtype == torch.float32 and torch.equal(c.features(), a.features())
    with pytest.raises(ValueError, match=r"\(7, 4\)"):
        FeatureBank(8, 4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"features": state["features"]})
    with pytest.raises(ValueError, match="out of range"):
        b.load_state_dict({"features": state["features"], "ptr": 7, "filled": 7})
    with pytest.raises(ValueError, match="not yet full"):
        b.load_state_dict({"features": state["features"], "ptr": 2, "filled": 5})


def test_bank_with_the_wasserstein_loss():
    """wasserstein_uniformity_loss(x, bank.features()) is W2 of x stacked on the bank, with
    gradients for x only."""
    g = torch.Generator().manual_seed(11)
    bank = FeatureBank(50, 6, dtype=F64)
    bank.push(torch.randn(50, 6, generator=g, dtype=F64))
    x = torch.randn(10, 6, generator=g, dtype=F64, requires_grad=True)
    loss = L.wasserstein_uniformity_loss(x, bank.features())
    stacked = M.wasserstein_uniformity(torch.cat([x, bank.features()]))
    assert float(loss.detach()) == pytest.approx(float(stacked.detach()), rel=TIGHT)
    loss.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert not bank.features().requires_grad


def test_bank_with_the_other_documented_losses():
    """The bank module's table: contrastive_l2_loss takes the bank as shared negatives, and
    uniform_loss runs on x stacked on the bank; both give gradients to x and none to the bank."""
    g = torch.Generator().manual_seed(12)
    bank = FeatureBank(20, 5, dtype=F64)
    bank.push(torch.randn(20, 5, generator=g, dtype=F64))
    x = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    x_pos = torch.randn(6, 5, generator=g, dtype=F64)
    neg = bank.features()
    loss = L.contrastive_l2_loss(x, x_pos, neg, lam=0.1)
    expected = ((x - x_pos).pow(2).sum(1) - 0.1 * torch.cdist(x, neg).sum(1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=TIGHT)
    unif = M.uniform_loss(torch.cat([x, bank.features()]))
    (loss + unif).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert not bank.features().requires_grad


def test_push_after_a_saved_view_fails_loudly():
    """features() is a view: a push before the backward of a graph that saved it is caught by
    autograd's version check, never back-propagated with the overwritten values."""
    bank = FeatureBank(8, 3)
    bank.push(torch.randn(8, 3))
    x = torch.randn(4, 3, requires_grad=True)
    loss = L.riesz_uniformity_loss(x, 2.0, bank=bank, normalize=False)  # the op saves the view
    bank.push(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
