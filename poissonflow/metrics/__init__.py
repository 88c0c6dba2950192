"""Representation metrics: alignment, uniformity, Wasserstein uniformity, spectrum, energy
distances.

Every metric follows its authors' definition (docs/DESIGN.md, "Metrics and probes"). Inputs are
feature matrices
(N, D), as torch tensors or numpy arrays of a floating dtype.

Return types follow one rule:

| function | returns | why |
|---|---|---|
| `align_loss`, `uniform_loss`, `wasserstein_uniformity` | 0-dim tensor, autograd | also losses |
| `effective_rank`, `rankme`, `energy_distance*` | python float (float64 math) | reports |
| `singular_values` | numpy float64 array | a vector report |
| `uniform_sphere`, `uniform_hemisphere` | torch float64 tensor | reference samples |
| `Alignment`, `Uniformity`, ... `.compute()` | 0-dim tensor, no autograd | streaming |

Streaming forms for a training loop (update / compute / reset, synced over processes):
`Alignment`, `Uniformity`, `WassersteinUniformity`, `EffectiveRank`, `RankMe`
(`poissonflow.metrics.streaming`).

Call `float(...)` on a tensor metric to report it. Report metrics detach their input and compute
in float64 on the input's device; tensor metrics compute in the input's dtype (numpy input becomes
a tensor of the same dtype), except the eigendecomposition of the Wasserstein metric, which is
always float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _checks

__all__ = [
    "l2_normalize",
    "align_loss",
    "uniform_loss",
    "wasserstein_uniformity",
    "singular_values",
    "effective_rank",
    "rankme",
    "uniform_sphere_mean_distance",
    "energy_distance",
    "energy_distance_to_sphere",
    "energy_distance_to_hemisphere",
    "uniform_sphere",
    "uniform_hemisphere",
    "StreamingMetric",
    "Alignment",
    "Uniformity",
    "WassersteinUniformity",
    "EffectiveRank",
    "RankMe",
]

# Pair-matrix elements one chunk may hold: 2**22 float64 values is 32 MiB. uniform_loss and the
# energy distances never hold more than this many pairwise entries at once (plus O(N) vectors).
PAIR_BLOCK = 2**22


# ----------------------------------------------------------------------------- input checks


def as_features(x, name: str, *, min_rows: int = 2) -> torch.Tensor:
    """Validates a feature matrix (N, D) and returns it as a torch tensor (numpy is wrapped,
    not copied). Raises TypeError/ValueError naming `name` for non-float, non-2-D, empty,
    too-few-rows or non-finite input."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    _checks.check_tensor(x, name, ndim=2)
    if x.shape[0] < min_rows:
        noun = "sample" if min_rows == 1 else "samples"
        raise ValueError(f"{name} needs at least {min_rows} {noun} (rows), got {x.shape[0]}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero columns: the feature dimension must be >= 1")
    _checks.check_finite(x, name)
    return x


def l2_normalize(x: torch.Tensor | np.ndarray, name: str = "x") -> torch.Tensor:
    """Rows of `x` (N, D) divided by their Euclidean norm, as a tensor (numpy is wrapped); a
    zero row has no direction, so it is an error (F.normalize would silently map it to zero).
    `name` is the argument named in error messages.

    Args:
        x: rows (N, D), a torch tensor or a floating numpy array.
        name: the argument named in error messages.

    Returns:
        The unit rows, a tensor.
    """
    x = as_features(x, name, min_rows=1)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = int((norms == 0).sum())
    if zero:
        raise ValueError(f"{name} has {zero} zero row(s): they cannot be L2-normalised")
    return x / norms


def check_pairs(x: torch.Tensor, y: torch.Tensor, xname: str = "x", yname: str = "y") -> None:
    """Two views paired row by row: same shape, dtype and device."""
    if x.shape != y.shape:
        raise ValueError(
            f"{xname} and {yname} must be paired row by row with the same shape: "
            f"{xname} is {tuple(x.shape)}, {yname} is {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"{yname} has dtype {y.dtype} but {xname} has {x.dtype}; they must match")
    if x.device != y.device:
        raise ValueError(f"{yname} is on {y.device} but {xname} is on {x.device}")


def powered_norm(v: torch.Tensor, power: float) -> torch.Tensor:
    """||v||^power over the last axis, computed as (||v||^2)^(power/2); a zero vector gives 0
    with a zero gradient for any power > 0 (the double-where avoids 0 * inf = NaN when
    power < 2, where the true derivative at 0 is 0 or unbounded)."""
    sq = (v * v).sum(-1)
    keep = sq > 0
    safe = torch.where(keep, sq, torch.ones_like(sq))
    return torch.where(keep, safe.pow(0.5 * power), torch.zeros_like(sq))


def _report64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def _row_chunk(n_rows: int, n_cols: int, block: int) -> int:
    return max(1, min(n_rows, block // max(1, n_cols)))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor):
    """||a_i - b_j||^2 from the Gram matrix (no (n, m, D) tensor). The expansion loses about
    eps * (||a||^2 + ||b||^2) absolutely; for unit vectors that is 1e-16 in float64 and 1e-7 in
    float32, harmless here because these metrics multiply distances by O(1) factors (the field's
    p/2 amplification of docs/DESIGN.md, "The field operator" does not occur)."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


# ----------------------------------------------------------------------------- Wang & Isola


def align_loss(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, alpha: float = 2.0
) -> torch.Tensor:
    """Alignment of Wang & Isola (2020): mean over pairs of ||x_i - y_i||^alpha.

    x, y: (N, D) features of the two views, N >= 1 (normally L2-normalised by the caller);
    alpha > 0.
    Returns a 0-dim tensor with autograd. A coincident pair (x_i = y_i) contributes 0 with a zero
    gradient, never NaN.

    Args:
        x: first view (N, D).
        y: second view (N, D), paired with x row by row.
        alpha: the exponent, > 0.

    Returns:
        A 0-dim tensor with autograd.
    """
    x = as_features(x, "x", min_rows=1)
    y = as_features(y, "y", min_rows=1)
    check_pairs(x, y)
    a = _checks.check_scalar(alpha, "alpha", minimum=0.0, allow_equal=False)
    return powered_norm(x - y, a).mean()


class _PairLogMeanExp(torch.autograd.Function):
    """log( mean_{i != j} exp(-t ||x_i - x_j||^2) ), streamed over row chunks.

    Forward keeps one (chunk, N) block at a time and combines the per-row log-sum-exps at the
    end (an exact streaming logsumexp). Backward recomputes each block from the saved total
    log-sum-exp L: with P_ij = exp(-t d_ij - L) (P symmetric, P_ii = 0),
        dU/dx_k = -4 t sum_j P_kj (x_k - x_j) = -4 t (rowsum(P)_k x_k - (P x)_k),
    so neither pass holds an N x N matrix.
    """

    @staticmethod
    def forward(ctx, x, t, chunk):
        n = x.shape[0]
        sq = (x * x).sum(1)
        row_lse = torch.empty(n, dtype=x.dtype, device=x.device)
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            s = _masked_scores(x, sq, i0, i1, t)
            row_lse[i0:i1] = torch.logsumexp(s, dim=1)
        total = torch.logsumexp(row_lse, dim=0)
        ctx.save_for_backward(x, total)
        ctx.t, ctx.chunk = t, chunk
        return total - math.log(n * (n - 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, total = ctx.saved_tensors
        t, chunk, n = ctx.t, ctx.chunk, x.shape[0]
        sq = (x * x).sum(1)
        gx = torch.empty_like(x)
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            p = torch.exp(_masked_scores(x, sq, i0, i1, t) - total)
            gx[i0:i1] = p.sum(1, keepdim=True) * x[i0:i1] - p @ x
        return gx * (-4.0 * t * grad), None, None


def _masked_scores(x, sq, i0, i1, t):
    """-t ||x_i - x_j||^2 for rows i0:i1 against all rows, with the i == j entries at -inf."""
    s = _sq_dists(x[i0:i1], x, sq[i0:i1], sq).mul_(-t)
    rows = torch.arange(i1 - i0, device=x.device)
    s[rows, rows + i0] = -math.inf
    return s


def uniform_loss(
    x: torch.Tensor | np.ndarray, t: float = 2.0, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Uniformity of Wang & Isola (2020): log of the mean Gaussian potential over distinct pairs,

        U(x) = log( 2 / (N (N-1)) * sum_{i<j} exp(-t ||x_i - x_j||^2) ).

    No normalisation inside (pass L2-normalised features, as the paper does). For uniform samples
    on S^127 with t = 2 it is about -3.938. Memory is O(chunk_size * N): rows are processed in
    chunks (default: as many rows as fit in 2**22 pair entries) with an exact streaming
    logsumexp, in the forward and in the backward pass. Returns a 0-dim tensor with autograd
    (first derivatives only), in x's dtype.

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.
        t: the temperature, > 0.
        chunk_size: rows per block (None: as many as fit in 2**22 pair entries).

    Returns:
        A 0-dim tensor with autograd, in x's dtype.
    """
    x = as_features(x, "x", min_rows=2)
    tt = _checks.check_scalar(t, "t", minimum=0.0, allow_equal=False)
    n = x.shape[0]
    if chunk_size is None:
        chunk = _row_chunk(n, n, PAIR_BLOCK)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        chunk = min(n, chunk_size)
    return _PairLogMeanExp.apply(x, tt, chunk)


# ----------------------------------------------------------------------------- Fang et al.


def wasserstein_uniformity(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Wasserstein uniformity of Fang et al. (ICLR 2024, "Rethinking the Uniformity Metric in
    Self-Supervised Learning"): the 2-Wasserstein distance between N(mu, Sigma), fitted to the
    L2-normalised features, and N(0, I/m), the limit of the uniform distribution on S^(m-1):

        W2 = sqrt( ||mu||^2 + 1 + tr Sigma - (2 / sqrt(m)) tr Sigma^(1/2) ),

    mu the mean and Sigma the biased covariance (divided by N, which makes the metric invariant
    to instance cloning) of the normalised rows. Lower is more uniform: about 0 for uniform
    samples on the sphere, sqrt(2) for a full collapse onto one point.

    tr Sigma^(1/2) is the sum of square roots of the eigenvalues of the symmetric Sigma
    (torch.linalg.eigvalsh, in float64 whatever x's dtype). Eigenvalues at or below the
    eigensolver's noise level, m * eps64 (||Sigma|| <= 1 for unit rows), count as 0 with a zero
    gradient: the true derivative of sqrt is unbounded there, so a rank-deficient Sigma (N < m,
    cloned or collapsed features) gets finite gradients instead of NaN. The eigenvalue-only
    backward needs no 1/(lambda_i - lambda_j) terms, so repeated eigenvalues are harmless too.
    Returns a 0-dim tensor with autograd, in x's dtype. Zero rows are an error (no direction).

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.

    Returns:
        A 0-dim tensor with autograd, in x's dtype.
    """
    x = as_features(x, "x", min_rows=2)
    z = l2_normalize(x.to(torch.float64), "x")
    n, m = z.shape
    mu = z.mean(0)
    zc = z - mu
    sigma = (zc.T @ zc) / n
    sigma = 0.5 * (sigma + sigma.T)  # exact symmetry for eigvalsh's gradient
    lam = torch.linalg.eigvalsh(sigma)
    # Rows are unit vectors, so ||Sigma|| <= tr Sigma <= 1 and the rounding of Sigma and of the
    # eigensolver is about m * eps64 in absolute terms, however small Sigma is (a collapse
    # leaves eigenvalues of 1e-34 that are pure noise).
    tol = m * torch.finfo(torch.float64).eps
    trace_sqrt = _sqrt_above(lam, tol).sum()
    w2_sq = (mu * mu).sum() + 1.0 + torch.diagonal(sigma).sum() - 2.0 / math.sqrt(m) * trace_sqrt
    # W2^2 >= 0 up to rounding; at 0 the metric is at its minimum and 0 is a valid subgradient.
    w2 = _sqrt_above(w2_sq, torch.finfo(torch.float64).eps)
    return w2.to(x.dtype)


def _sqrt_above(v: torch.Tensor, floor) -> torch.Tensor:
    """sqrt(v) where v > floor, else 0 with a zero gradient (the double-where keeps the unused
    branch's gradient finite, so it cannot poison the result with 0 * inf)."""
    keep = v > floor
    safe = torch.where(keep, v, torch.ones_like(v))
    return torch.where(keep, torch.sqrt(safe), torch.zeros_like(v))


# ----------------------------------------------------------------------------- spectrum


def singular_values(
    x: torch.Tensor | np.ndarray, *, center: bool = False, normalize: bool = False
) -> np.ndarray:
    """Singular values of the feature matrix (N, D), largest first, as a float64 numpy array of
    length min(N, D). center subtracts the column means first (then s_k^2 / N are the
    eigenvalues of the biased covariance); normalize L2-normalises the rows first (Fang et al.
    plot the spectrum of normalised features).

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.
        center: subtract the column means first.
        normalize: L2-normalise the rows first.

    Returns:
        A float64 numpy array of length min(N, D), largest first.
    """
    z = _spectrum_input(x, center, normalize)
    return torch.linalg.svdvals(z).cpu().numpy()


def _spectrum_input(x, center, normalize):
    x = _report64(as_features(x, "x", min_rows=2))
    if normalize:
        x = l2_normalize(x, "x")
    if center:
        x = x - x.mean(0)
    return x


def _spectral_distribution(x, center, normalize) -> torch.Tensor:
    s = torch.linalg.svdvals(_spectrum_input(x, center, normalize))
    total = s.sum()
    if not float(total) > 0.0:
        raise ValueError("x has no non-zero singular value (all rows are zero after centering)")
    return s / total


def effective_rank(
    x: torch.Tensor | np.ndarray, *, center: bool = False, normalize: bool = False
) -> float:
    """Effective rank of Roy & Vetterli (2007): exp of the Shannon entropy of the normalised
    singular values, p_k = s_k / sum_j s_j, erank = exp(-sum_k p_k log p_k) with 0 log 0 = 0.
    It lies in [1, min(N, D)]; an isotropic Gaussian sample with N >> D gives nearly D.
    No epsilon (see `rankme` for the version with one).

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.
        center: subtract the column means first.
        normalize: L2-normalise the rows first.

    Returns:
        The effective rank, a float.
    """
    p = _spectral_distribution(x, center, normalize)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return float(torch.exp(-plogp.sum()))


def rankme(
    x: torch.Tensor | np.ndarray,
    *,
    eps: float = 1e-7,
    center: bool = False,
    normalize: bool = False,
) -> float:
    """RankMe of Garrido et al. (ICML 2023): the effective rank with a small constant added,
    p_k = s_k / ||s||_1 + eps, RankMe = exp(-sum_k p_k log p_k), eps = 1e-7 as in the paper.
    Differs from `effective_rank` by O(min(N, D) * eps * log eps).

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.
        eps: the constant added to the normalised singular values, >= 0.
        center: subtract the column means first.
        normalize: L2-normalise the rows first.

    Returns:
        RankMe, a float.
    """
    e = _checks.check_scalar(eps, "eps", minimum=0.0)
    p = _spectral_distribution(x, center, normalize) + e
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return float(torch.exp(-plogp.sum()))


# ----------------------------------------------------------------------------- energy distances


def uniform_sphere_mean_distance(dim: int) -> float:
    """c_m = E||e - U|| for a fixed unit vector e and U uniform on S^(m-1) in R^m, m = dim;
    also E||U - U'|| (average over e). With u = <e, U>, whose density is proportional to
    (1 - u^2)^((m-3)/2), and ||e - U|| = sqrt(2 - 2u), the substitution u = 1 - 2s gives a Beta
    integral:

        c_m = 2^(m-1) Gamma(m/2)^2 / ( sqrt(pi) Gamma(m - 1/2) ),

    evaluated in float64 through math.lgamma. c_1 = 1, c_2 = 4/pi, c_3 = 4/3, c_m -> sqrt(2).

    Args:
        dim: the dimension m of R^m, >= 1.

    Returns:
        c_m, a float.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    m = dim
    log_c = (
        (m - 1) * math.log(2.0)
        + 2.0 * math.lgamma(m / 2.0)
        - 0.5 * math.log(math.pi)
        - math.lgamma(m - 0.5)
    )
    return math.exp(log_c)


def _mean_distance(a: torch.Tensor, b: torch.Tensor | None, unbiased: bool) -> float:
    """Mean Euclidean distance between rows of a and rows of b (float64, chunked over rows of
    a). b = None means within a: the V-statistic averages all N^2 ordered pairs (the diagonal
    counts as 0), the U-statistic (unbiased) only the N (N-1) distinct ones."""
    within = b is None
    b = a if within else b
    n, m = a.shape[0], b.shape[0]
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    chunk = _row_chunk(n, m, PAIR_BLOCK)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        d = _sq_dists(a[i0:i1], b, a_sq[i0:i1], b_sq).sqrt_()
        if within:  # the expansion leaves ~1e-8 on the diagonal; it is exactly 0
            rows = torch.arange(i1 - i0, device=a.device)
            d[rows, rows + i0] = 0.0
        total += d.sum()
    pairs = n * (n - 1) if (within and unbiased) else n * m
    return float(total) / pairs


def energy_distance(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, unbiased: bool = False
) -> float:
    """Two-sample energy distance (Szekely & Rizzo) between the rows of x (N, D) and y (M, D):

        ED = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||.

    Default (unbiased=False): the V-statistic, i.e. the exact energy distance between the two
    empirical distributions; it is >= 0 and 0 only for equal samples. unbiased=True uses the
    U-statistics for the within-sample terms (unbiased for the population value, may be slightly
    negative). Float64, O(N + M) memory beyond one chunk of pair distances.

    Args:
        x: first sample (N, D).
        y: second sample (M, D).
        unbiased: U-statistics for the within-sample terms.

    Returns:
        The energy distance, a float.
    """
    x = _report64(as_features(x, "x", min_rows=2))
    y = _report64(as_features(y, "y", min_rows=2))
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same number of columns: x has {x.shape[1]}, y {y.shape[1]}"
        )
    if x.device != y.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    cross = _mean_distance(x, y, unbiased)
    return 2.0 * cross - _mean_distance(x, None, unbiased) - _mean_distance(y, None, unbiased)


def _unit_rows(x, normalize: bool) -> torch.Tensor:
    x = _report64(as_features(x, "x", min_rows=2))
    if normalize:
        return l2_normalize(x, "x")
    norms = torch.linalg.vector_norm(x, dim=1)
    worst = float((norms - 1.0).abs().max())
    if worst > 1e-5:  # float32 unit vectors are within ~1e-7; anything farther is off-sphere
        raise ValueError(
            "x must have unit-norm rows when normalize=False "
            f"(largest | ||x_i|| - 1 | = {worst:.3g})"
        )
    return x


def energy_distance_to_sphere(
    x: torch.Tensor | np.ndarray, *, normalize: bool = True, unbiased: bool = False
) -> float:
    """Energy distance between the rows of x, as points of S^(m-1), and the uniform distribution
    on S^(m-1), in closed form. For unit x, E||x - U|| = c_m whatever x is
    (`uniform_sphere_mean_distance`), and E||U - U'|| = c_m as well, so

        ED(P, U) = 2 E||X - U|| - E||X - X'|| - E||U - U'|| = c_m - E||X - X'||.

    normalize=True L2-normalises the rows first (zero rows are an error); normalize=False
    requires unit rows. E||X - X'|| is the V-statistic by default (the exact, non-negative
    distance of the empirical distribution), the U-statistic with unbiased=True.

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.
        normalize: L2-normalise the rows first (else they must be unit).
        unbiased: the U-statistic for E||X - X'||.

    Returns:
        The energy distance, a float.
    """
    z = _unit_rows(x, normalize)
    return uniform_sphere_mean_distance(z.shape[1]) - _mean_distance(z, None, unbiased)


def energy_distance_to_hemisphere(
    x: torch.Tensor | np.ndarray,
    *,
    n_reference: int = 4096,
    seed: int = 0,
    normalize: bool = True,
    unbiased: bool = False,
) -> float:
    """Energy distance between the rows of x (N, D) and the uniform distribution on the upper
    hemisphere {u in S^(D-1): u_D >= 0}, where Poisson-flowed features (D = d + 1) end up.
    E||x - U_hemi|| depends on x's height, so there is no constant closed form: this is the
    two-sample `energy_distance` against `n_reference` samples of `uniform_hemisphere` drawn
    with `seed` (reproducible). normalize as in `energy_distance_to_sphere`.

    Args:
        x: features (N, D), a torch tensor or a floating numpy array.
        n_reference: hemisphere samples drawn.
        seed: their seed.
        normalize: L2-normalise the rows first (else they must be unit).
        unbiased: U-statistics for the within-sample terms.

    Returns:
        The energy distance, a float.
    """
    z = _unit_rows(x, normalize)
    ref = uniform_hemisphere(n_reference, z.shape[1], seed=seed).to(z.device)
    return energy_distance(z, ref, unbiased=unbiased)


def uniform_sphere(n: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """n samples uniform on S^(dim-1) in R^dim (normalised standard Gaussians), float64, CPU,
    reproducible from `seed`.

    Args:
        n: samples, >= 1.
        dim: dimension of the ambient space, >= 1.
        seed: the seed.

    Returns:
        A (n, dim) float64 CPU tensor.
    """
    for value, label in ((n, "n"), (dim, "dim")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    g = torch.Generator().manual_seed(int(seed))
    while True:
        z = torch.randn(n, dim, generator=g, dtype=torch.float64)
        norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        if bool((norms > 0).all()):  # a zero Gaussian draw has probability 0; redraw if it occurs
            return z / norms


def uniform_hemisphere(n: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """n samples uniform on the upper hemisphere {u in S^(dim-1): u_dim >= 0} of R^dim: uniform
    sphere samples with the last coordinate replaced by its absolute value (the reflection
    preserves the uniform measure). float64, CPU, reproducible from `seed`.

    Args:
        n: samples, >= 1.
        dim: dimension of the ambient space, >= 2.
        seed: the seed.

    Returns:
        A (n, dim) float64 CPU tensor.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an int >= 2 for a hemisphere, got {dim!r}")
    u = uniform_sphere(n, dim, seed=seed)
    u[:, -1] = u[:, -1].abs()
    return u


# the streaming forms build on the functions above
from .streaming import (  # noqa: E402
    Alignment,
    EffectiveRank,
    RankMe,
    StreamingMetric,
    Uniformity,
    WassersteinUniformity,
)
