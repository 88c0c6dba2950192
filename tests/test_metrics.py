"""Metrics against independent float64 computations (numpy/scipy), known values, Fang et al.'s
four properties, and bad input."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance as ssd
import scipy.special
import torch

from poissonflow import metrics as M

# float64 formulas computed two different ways agree to rounding (~1e-15 relative); 1e-10 leaves
# room for summation-order differences over up to 1e6 terms without hiding any real error.
TIGHT = 1e-10


def rng(seed=0):
    return np.random.default_rng(seed)


def unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def clustered(n=60, m=6, seed=0):
    """Unit features with structure: three tight clusters (far from uniform)."""
    r = rng(seed)
    centers = r.standard_normal((3, m))
    return unit_rows(centers[r.integers(0, 3, n)] + 0.2 * r.standard_normal((n, m)))


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.5, 3.0])
def test_align_loss_matches_numpy(alpha):
    r = rng(1)
    x, y = r.standard_normal((40, 7)), r.standard_normal((40, 7))
    expected = np.mean(np.linalg.norm(x - y, axis=1) ** alpha)
    got = M.align_loss(torch.from_numpy(x), torch.from_numpy(y), alpha)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert float(got) == pytest.approx(expected, rel=TIGHT)
    assert float(M.align_loss(x, y, alpha)) == pytest.approx(expected, rel=TIGHT)  # numpy input


def test_align_loss_coincident_pairs_have_zero_finite_gradient():
    x = torch.randn(5, 3, dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0):
        a = x.clone().requires_grad_(True)
        loss = M.align_loss(a, x.clone(), alpha)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(a.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------- uniformity


def uniform_loss_numpy(x, t):
    d2 = ssd.pdist(x, "sqeuclidean")  # distinct pairs i < j, direct differences
    return math.log(np.mean(np.exp(-t * d2)))


@pytest.mark.parametrize("t", [2.0, 0.5, 7.0])
@pytest.mark.parametrize("n", [2, 3, 17, 50])
def test_uniform_loss_matches_direct_formula(n, t):
    x = unit_rows(rng(n).standard_normal((n, 5)))
    expected = uniform_loss_numpy(x, t)
    for chunk in (None, 1, 3, n):
        got = M.uniform_loss(torch.from_numpy(x), t, chunk_size=chunk)
        assert float(got) == pytest.approx(expected, rel=TIGHT, abs=TIGHT)


def test_uniform_loss_unnormalised_input_is_taken_as_is():
    x = 3.0 * rng(2).standard_normal((30, 4))  # no normalisation inside (Wang & Isola)
    assert float(M.uniform_loss(x)) == pytest.approx(uniform_loss_numpy(x, 2.0), rel=TIGHT)


def test_uniform_loss_chunked_gradient_equals_unchunked():
    x = torch.from_numpy(unit_rows(rng(3).standard_normal((23, 6))))
    grads = []
    for chunk in (None, 4):
        a = x.clone().requires_grad_(True)
        M.uniform_loss(a, chunk_size=chunk).backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=TIGHT, atol=TIGHT)


def test_uniform_loss_chunks_bound_pair_memory(monkeypatch):
    """With the default chunking, no pair block exceeds PAIR_BLOCK entries: shrink the block and
    check each (chunk, N) block that _masked_scores builds, and that the value is unchanged."""
    x = torch.from_numpy(unit_rows(rng(4).standard_normal((64, 5))))
    reference = float(M.uniform_loss(x))
    sizes = []
    real = M._masked_scores

    def spy(*args):
        s = real(*args)
        sizes.append(s.numel())
        return s

    monkeypatch.setattr(M, "PAIR_BLOCK", 64 * 8)
    monkeypatch.setattr(M, "_masked_scores", spy)
    assert float(M.uniform_loss(x)) == pytest.approx(reference, rel=TIGHT)
    assert len(sizes) == 8 and max(sizes) <= 64 * 8


def test_uniform_loss_gradcheck():
    x = torch.from_numpy(unit_rows(rng(5).standard_normal((9, 3)))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: M.uniform_loss(a, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda a: M.uniform_loss(a, 0.7, chunk_size=2), (x,))


def uniform_loss_on_sphere_exact(m, t):
    """Population value for U uniform on S^(m-1): ||u - v||^2 = 2 - 2<u, v>, and <u, v> has the
    density of one coordinate, so E exp(-t||u - v||^2) = e^(-2t) E e^(2t u_1) with
    E e^(k u_1) = Gamma(m/2) (2/k)^(m/2 - 1) I_(m/2 - 1)(k)."""
    k, nu = 2.0 * t, m / 2.0 - 1.0
    log_mgf = (
        scipy.special.gammaln(m / 2) + nu * math.log(2 / k) + math.log(scipy.special.ive(nu, k)) + k
    )  # ive is I scaled by e^-k
    return -2.0 * t + log_mgf


def test_uniform_loss_known_value_on_s127():
    exact = uniform_loss_on_sphere_exact(128, 2.0)
    assert exact == pytest.approx(-3.938, abs=5e-4)  # the value docs/DESIGN.md quotes
    x = M.uniform_sphere(3000, 128, seed=0)
    got = float(M.uniform_loss(x, 2.0))
    # Measured spread of this estimate over seeds at N = 4000: std 1.6e-4; at N = 3000 a few
    # times that at most. 1.5e-3 is about 8 standard deviations.
    assert got == pytest.approx(exact, abs=1.5e-3)


def test_uniform_loss_float32_follows_float64():
    x = unit_rows(rng(6).standard_normal((200, 16)))
    v64 = M.uniform_loss(torch.from_numpy(x))
    v32 = M.uniform_loss(torch.from_numpy(x.astype(np.float32)))
    assert v32.dtype == torch.float32
    assert float(v32) == pytest.approx(float(v64), rel=1e-5)  # float32 rounding, O(1) exponent


# ----------------------------------------------------------------------------- Wasserstein


def wasserstein_numpy(x):
    """Fang et al.'s formula computed independently: numpy covariance, scipy's general matrix
    square root (Schur method, not an eigendecomposition)."""
    z = unit_rows(x)
    m = z.shape[1]
    mu = z.mean(0)
    sigma = np.cov(z, rowvar=False, bias=True)
    root = scipy.linalg.sqrtm(sigma).real
    w2_sq = mu @ mu + 1.0 + np.trace(sigma) - 2.0 / math.sqrt(m) * np.trace(root)
    return math.sqrt(max(w2_sq, 0.0))


@pytest.mark.parametrize("shape", [(50, 4), (200, 16), (30, 3), (100, 2)])
def test_wasserstein_matches_independent_float64(shape):
    x = rng(shape[0]).standard_normal(shape) + 0.5  # off-centre: ||mu|| matters
    got = M.wasserstein_uniformity(torch.from_numpy(x))
    assert got.dtype == torch.float64 and got.ndim == 0
    # sqrtm's Schur iteration is accurate to ~1e-12 relative on these well-conditioned inputs.
    assert float(got) == pytest.approx(wasserstein_numpy(x), rel=1e-9)


def test_wasserstein_normalises_rows_inside():
    x = rng(7).standard_normal((40, 5))
    scales = rng(8).uniform(0.1, 10.0, (40, 1))
    assert float(M.wasserstein_uniformity(x * scales)) == pytest.approx(
        float(M.wasserstein_uniformity(x)), rel=TIGHT
    )


def test_wasserstein_uniform_sphere_is_near_zero():
    n, m = 4000, 128
    w = float(M.wasserstein_uniformity(M.uniform_sphere(n, m, seed=1)))
    # Finite N leaves a bias: the sample covariance's eigenvalues spread (Marchenko-Pastur), so
    # W2^2 ~ m / (4 N) (measured mean 0.0904 over 6 seeds against sqrt(m/4N) = 0.0894, std 0.0012).
    assert w < 0.1
    assert w == pytest.approx(math.sqrt(m / (4 * n)), rel=0.05)


def test_wasserstein_full_collapse_is_sqrt2():
    v = rng(9).standard_normal(12)
    x = np.tile(v, (30, 1)) * rng(10).uniform(0.5, 2.0, (30, 1))  # one direction, any lengths
    assert float(M.wasserstein_uniformity(x)) == pytest.approx(math.sqrt(2.0), abs=1e-12)


def test_fang_instance_permutation_invariance():
    x = clustered(80, 6, seed=11)
    perm = rng(12).permutation(80)
    assert float(M.wasserstein_uniformity(x[perm])) == pytest.approx(
        float(M.wasserstein_uniformity(x)), rel=TIGHT
    )
    assert float(M.uniform_loss(x[perm])) == pytest.approx(float(M.uniform_loss(x)), rel=TIGHT)


def test_fang_instance_cloning_invariance_and_uniform_loss_violation():
    x = clustered(80, 6, seed=13)
    cloned = np.concatenate([x, x])
    assert float(M.wasserstein_uniformity(cloned)) == pytest.approx(
        float(M.wasserstein_uniformity(x)), rel=TIGHT
    )
    # Wang & Isola's metric is not invariant: the N clone pairs at distance 0 each add
    # exp(0) = 1, so cloning makes the set look *less* uniform. With S the sum over x's distinct
    # pairs, the 2N points' distinct pairs sum to S + S (within each copy) + 2S + N (across).
    u, u_cloned = float(M.uniform_loss(x)), float(M.uniform_loss(cloned))
    n = x.shape[0]
    pair_sum = math.exp(u) * n * (n - 1) / 2
    expected = math.log((4 * pair_sum + n) / (2 * n * (2 * n - 1) / 2))
    assert u_cloned == pytest.approx(expected, rel=TIGHT)
    assert u_cloned > u + 1e-3


def test_fang_feature_cloning_strictly_worse():
    x = clustered(80, 6, seed=14)
    m = x.shape[1]
    w = float(M.wasserstein_uniformity(x))
    w_cloned = float(M.wasserstein_uniformity(np.concatenate([x, x], axis=1)))
    assert w_cloned > w + 1e-3
    # [x, x] / sqrt(2) keeps mu's norm and Sigma's nonzero spectrum but doubles m, so only the
    # 2 / sqrt(m) factor changes: check the exact value, not just the direction.
    z = unit_rows(x)
    root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(np.cov(z, rowvar=False, bias=True)), 0, None))
    delta = 2.0 * root_trace.sum() * (1 / math.sqrt(m) - 1 / math.sqrt(2 * m))
    assert w_cloned**2 == pytest.approx(w**2 + delta, rel=1e-9)


@pytest.mark.parametrize("extra", [1, 6, 50])
def test_fang_feature_baby_zero_dimensions_strictly_worse(extra):
    x = clustered(80, 6, seed=15)
    padded = np.concatenate([x, np.zeros((80, extra))], axis=1)
    assert float(M.wasserstein_uniformity(padded)) > float(M.wasserstein_uniformity(x)) + 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.standard_normal((3, 10)),  # N < m
        lambda r: np.tile(r.standard_normal((1, 8)), (20, 1)),  # full collapse
        lambda r: np.concatenate([r.standard_normal((30, 4))] * 2, axis=1),  # feature clones
        lambda r: np.concatenate([r.standard_normal((30, 4)), np.zeros((30, 5))], axis=1),
    ],
    ids=["fewer-samples-than-dims", "collapse", "feature-cloning", "zero-dims"],
)
def test_wasserstein_rank_deficient_gradients_are_finite(make):
    x = torch.from_numpy(make(rng(16))).requires_grad_(True)
    w = M.wasserstein_uniformity(x)
    w.backward()
    assert torch.isfinite(w) and torch.isfinite(x.grad).all()
    assert float(x.grad.abs().max()) < 1e8  # no 1/sqrt(rounding noise) blow-up


def test_wasserstein_gradient_matches_finite_differences_when_degenerate_eigenvalues():
    """An exactly isotropic sample (the 2m points +-e_k) has one m-fold eigenvalue; the
    eigenvalue-only backward must still give the true gradient."""
    m = 3
    x = torch.cat([torch.eye(m), -torch.eye(m)]).double()
    x = (x + 0.05 * torch.from_numpy(rng(17).standard_normal((2 * m, m)))).requires_grad_(True)
    assert torch.autograd.gradcheck(M.wasserstein_uniformity, (x,))
    iso = torch.cat([torch.eye(m), -torch.eye(m)]).double().requires_grad_(True)
    w = M.wasserstein_uniformity(iso)
    w.backward()
    assert float(w.detach()) == pytest.approx(0.0, abs=1e-7) and torch.isfinite(iso.grad).all()


def test_wasserstein_gradcheck_full_rank():
    x = torch.from_numpy(rng(18).standard_normal((15, 4)) + 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(M.wasserstein_uniformity, (x,))


def test_wasserstein_float32_returns_float32():
    x = rng(19).standard_normal((100, 8))
    w32 = M.wasserstein_uniformity(torch.from_numpy(x.astype(np.float32)))
    assert w32.dtype == torch.float32
    assert float(w32) == pytest.approx(wasserstein_numpy(x), rel=1e-5)  # float32 input rounding


# ----------------------------------------------------------------------------- spectrum


def entropy_rank_numpy(x, eps=0.0, center=False):
    s = np.linalg.svd(x - x.mean(0) if center else x, compute_uv=False)
    p = s / s.sum() + eps
    p = p[p > 0]
    return math.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize("center", [False, True])
def test_spectrum_matches_numpy(center):
    x = rng(20).standard_normal((30, 8)) @ np.diag([5, 4, 3, 2, 1, 0.5, 0.1, 0.01]) + 1.0
    xc = x - x.mean(0) if center else x
    np.testing.assert_allclose(
        M.singular_values(x, center=center), np.linalg.svd(xc, compute_uv=False), rtol=1e-12
    )
    assert M.effective_rank(x, center=center) == pytest.approx(
        entropy_rank_numpy(x, center=center), rel=TIGHT
    )
    assert M.rankme(x, center=center) == pytest.approx(
        entropy_rank_numpy(x, 1e-7, center=center), rel=TIGHT
    )


def test_effective_rank_of_isotropic_gaussian_is_near_dimension():
    d = 32
    x = torch.randn(20000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Singular values of an N x d Gaussian matrix lie within sqrt(N)(1 +- sqrt(d/N)) (+-4%), which
    # costs well under 0.1 of entropy-rank: measured 31.99 at N = 10000.
    assert d - 0.1 < M.effective_rank(x) <= d
    assert d - 0.1 < M.rankme(x) <= d


def test_effective_rank_of_low_rank_data():
    r = rng(21)
    x = r.standard_normal((100, 2)) @ r.standard_normal((2, 10))
    assert 1.0 <= M.effective_rank(x) <= 2.0 + 1e-9
    assert M.effective_rank(np.tile(r.standard_normal((1, 5)), (10, 1))) == pytest.approx(1.0)


def test_singular_values_normalize_option():
    x = rng(22).standard_normal((20, 4)) * rng(23).uniform(0.1, 9, (20, 1))
    np.testing.assert_allclose(
        M.singular_values(x, normalize=True),
        np.linalg.svd(unit_rows(x), compute_uv=False),
        rtol=1e-12,
    )


# ----------------------------------------------------------------------------- energy distances


def test_sphere_mean_distance_known_values():
    assert M.uniform_sphere_mean_distance(1) == pytest.approx(1.0, rel=1e-14)
    assert M.uniform_sphere_mean_distance(2) == pytest.approx(4 / math.pi, rel=1e-14)
    assert M.uniform_sphere_mean_distance(3) == pytest.approx(4 / 3, rel=1e-14)
    assert M.uniform_sphere_mean_distance(100000) == pytest.approx(math.sqrt(2), rel=1e-5)


@pytest.mark.parametrize("m", [4, 5, 128])
def test_sphere_mean_distance_monte_carlo(m):
    n = 100000
    u, v = M.uniform_sphere(n, m, seed=1), M.uniform_sphere(n, m, seed=2)
    e1 = torch.zeros(m, dtype=torch.float64)
    e1[0] = 1.0
    c = M.uniform_sphere_mean_distance(m)
    for d in ((u - v).norm(dim=1), (u - e1).norm(dim=1)):  # E||U - U'|| and E||e - U||
        se = float(d.std()) / math.sqrt(n)
        assert float(d.mean()) == pytest.approx(c, abs=5 * se)  # 5 standard errors


def energy_numpy(x, y, unbiased):
    def within(a):
        s = ssd.pdist(a).sum() * 2
        n = a.shape[0]
        return s / (n * (n - 1) if unbiased else n * n)

    return 2 * ssd.cdist(x, y).mean() - within(x) - within(y)


@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_matches_scipy(unbiased):
    r = rng(24)
    x, y = r.standard_normal((40, 5)), r.standard_normal((33, 5)) + 0.3
    assert M.energy_distance(x, y, unbiased=unbiased) == pytest.approx(
        energy_numpy(x, y, unbiased), rel=1e-10
    )


def test_energy_distance_chunking_gives_same_value(monkeypatch):
    r = rng(25)
    x, y = r.standard_normal((50, 4)), r.standard_normal((20, 4))
    full = M.energy_distance(x, y)
    monkeypatch.setattr(M, "PAIR_BLOCK", 37)
    assert M.energy_distance(x, y) == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_to_sphere_closed_form(unbiased):
    x = clustered(70, 5, seed=26)
    n = x.shape[0]
    within = ssd.pdist(x).sum() * 2 / (n * (n - 1) if unbiased else n * n)
    expected = M.uniform_sphere_mean_distance(5) - within
    got = M.energy_distance_to_sphere(x * 3.0, unbiased=unbiased)  # normalised inside
    assert got == pytest.approx(expected, rel=1e-10)


def test_energy_distance_to_sphere_agrees_with_two_sample_estimate():
    x = clustered(60, 4, seed=27)
    closed = M.energy_distance_to_sphere(x, unbiased=True)
    reference = M.uniform_sphere(8000, 4, seed=3)
    sampled = M.energy_distance(x, reference, unbiased=True)
    # Only the reference sample differs: it estimates 2 E||x - U|| = 2 c_m and E||U - U'|| = c_m
    # by Monte Carlo. Measured over 5 reference seeds: 0.202 to 0.207 against closed 0.2066.
    assert closed > 0.2
    assert sampled == pytest.approx(closed, abs=0.01)


def test_energy_distance_to_sphere_extremes():
    u = M.uniform_sphere(2000, 16, seed=4)
    c = M.uniform_sphere_mean_distance(16)
    ed = M.energy_distance_to_sphere(u)
    # V-statistic of a uniform sample: 0 + c / N bias (the N zero diagonal terms), +-noise.
    assert 0.0 < ed < 3 * c / 2000
    assert abs(M.energy_distance_to_sphere(u, unbiased=True)) < 1e-3
    collapse = np.tile(rng(28).standard_normal((1, 16)), (50, 1))
    assert M.energy_distance_to_sphere(collapse) == pytest.approx(c, rel=1e-12)


def test_uniform_hemisphere_samples():
    h = M.uniform_hemisphere(5000, 6, seed=5)
    assert h.dtype == torch.float64 and h.shape == (5000, 6)
    torch.testing.assert_close(h.norm(dim=1), torch.ones(5000, dtype=torch.float64))
    assert bool((h[:, -1] >= 0).all())
    assert torch.equal(h, M.uniform_hemisphere(5000, 6, seed=5))
    assert not torch.equal(h, M.uniform_hemisphere(5000, 6, seed=6))
    # Height of a uniform hemisphere point in R^6: E|u_6| = Gamma(3) / (sqrt(pi) Gamma(3.5)).
    mean_height = math.gamma(3) / (math.sqrt(math.pi) * math.gamma(3.5))
    assert float(h[:, -1].mean()) == pytest.approx(mean_height, abs=0.01)  # ~4 standard errors


def test_energy_distance_to_hemisphere():
    on = M.uniform_hemisphere(800, 5, seed=8)
    full = M.uniform_sphere(800, 5, seed=8)
    ed_on = M.energy_distance_to_hemisphere(on, n_reference=2000, seed=1)
    ed_full = M.energy_distance_to_hemisphere(full, n_reference=2000, seed=1)
    assert ed_on < 0.01 < ed_full
    assert ed_on == M.energy_distance_to_hemisphere(on, n_reference=2000, seed=1)  # seeded


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fn",
    [
        M.uniform_loss,
        M.wasserstein_uniformity,
        M.effective_rank,
        M.rankme,
        M.singular_values,
        M.energy_distance_to_sphere,
        M.energy_distance_to_hemisphere,
    ],
)
def test_single_sample_nan_and_shape_errors(fn):
    with pytest.raises(ValueError, match="x needs at least 2 samples"):
        fn(torch.randn(1, 4))
    bad = torch.randn(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        fn(bad)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fn(torch.randn(5))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fn(np.arange(10).reshape(5, 2))
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        fn([[1.0, 2.0], [3.0, 4.0]])


def test_mismatched_pairs_and_parameters():
    with pytest.raises(ValueError, match="paired row by row"):
        M.align_loss(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="dtype"):
        M.align_loss(torch.randn(5, 3), torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        M.align_loss(torch.randn(5, 3), torch.randn(5, 3), 0.0)
    with pytest.raises(ValueError, match="t must be > 0"):
        M.uniform_loss(torch.randn(5, 3), -1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        M.uniform_loss(torch.randn(5, 3), chunk_size=0)
    with pytest.raises(ValueError, match="same number of columns"):
        M.energy_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="dim must be"):
        M.uniform_sphere_mean_distance(0)
    with pytest.raises(ValueError, match="dim must be an int >= 2"):
        M.uniform_hemisphere(10, 1)


def test_zero_vectors_cannot_be_normalised():
    x = torch.randn(6, 3)
    x[4] = 0.0
    for fn in (M.wasserstein_uniformity, M.energy_distance_to_sphere):
        with pytest.raises(ValueError, match="x has 1 zero row"):
            fn(x)
    with pytest.raises(ValueError, match="unit-norm rows"):
        M.energy_distance_to_sphere(torch.randn(6, 3), normalize=False)
    with pytest.raises(ValueError, match="no non-zero singular value"):
        M.effective_rank(torch.zeros(4, 3))
