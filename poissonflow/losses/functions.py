"""Training losses of the papers whose metrics `poissonflow.metrics` reports, so encoders can be
trained the ways the literature compares (docs/DESIGN.md, "Metrics and probes"). Each is a torch
function of
features (N, D) that returns a 0-dim tensor with gradients; lower is better for all of them.

| loss | source |
|---|---|
| `align_uniform_loss` | Wang & Isola (ICML 2020) |
| `wasserstein_uniformity_loss` | Fang et al. (ICLR 2024), auxiliary term |
| `contrastive_l2_loss` | the blog's closing proposal, ||x - x+||^a - lambda sum ||x - x-||^b |
| `noise_injected_infonce` | Butakov et al. (2024), noise-injected Deep InfoMax |
| `riesz_uniformity_loss` | Riesz s-energy through the field kernel (see `riesz_uniformity_loss`) |

`FeatureBank` (from `poissonflow.bank`) is a FIFO memory bank of detached features; its module
docstring says which of these losses take one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _checks
from ..bank import FeatureBank
from ..field import poisson_field
from ..metrics import (
    align_loss,
    as_features,
    check_pairs,
    l2_normalize,
    powered_norm,
    uniform_loss,
    wasserstein_uniformity,
)
from . import _coincident

__all__ = [
    "align_uniform_loss",
    "wasserstein_uniformity_loss",
    "contrastive_l2_loss",
    "noise_injected_infonce",
    "riesz_uniformity_loss",
    "FeatureBank",
]

NOISE_TARGETS = ("sphere", "gaussian", "uniform")
CRITICS = ("sqdist", "dot")

# Added to the batch variance before dividing, as torch.nn.BatchNorm1d does, so that a constant
# coordinate (a dead unit early in training) gives 0 rather than 0/0.
BATCH_NORM_EPS = 1e-5


def align_uniform_loss(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    align_weight: float = 1.0,
    uniform_weight: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Wang & Isola's combined objective for two views x, y (N, D), paired row by row:

        L = align_weight * align_loss(x, y, alpha)
            + uniform_weight * (uniform_loss(x, t) + uniform_loss(y, t)) / 2.

    The paper applies it to L2-normalised encoder outputs; normalize=True (default) does that
    here (zero rows are an error), normalize=False takes x and y as they are.

    Args:
        x: first view's features (N, D), N >= 2.
        y: second view's features (N, D), paired with x row by row.
        alpha: the alignment exponent, > 0.
        t: the uniformity temperature, > 0.
        align_weight: weight of the alignment term.
        uniform_weight: weight of the uniformity term.
        normalize: L2-normalise x and y first.

    Returns:
        A 0-dim tensor with gradients.
    """
    x = as_features(x, "x", min_rows=2)
    y = as_features(y, "y", min_rows=2)
    check_pairs(x, y)
    wa = _checks.check_scalar(align_weight, "align_weight")
    wu = _checks.check_scalar(uniform_weight, "uniform_weight")
    if normalize:
        x, y = l2_normalize(x, "x"), l2_normalize(y, "y")
    unif = 0.5 * (uniform_loss(x, t) + uniform_loss(y, t))
    return wa * align_loss(x, y, alpha) + wu * unif


def wasserstein_uniformity_loss(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray | None = None,
    *,
    weight: float = 1.0,
) -> torch.Tensor:
    """Fang et al.'s auxiliary term, added to a base self-supervised loss (they use BYOL, Barlow
    Twins, MoCo): loss = base_loss + weight * W2, with W2 the `wasserstein_uniformity` of x, or
    of both views stacked (x on top of y, one W2 over 2N rows) when y is given. Rank-deficient
    batches (N < D) give finite gradients.

    Args:
        x: features (N, D).
        y: optional second view (M, D), stacked under x.
        weight: the term's weight.

    Returns:
        A 0-dim tensor with gradients.
    """
    w = _checks.check_scalar(weight, "weight")
    x = as_features(x, "x", min_rows=1 if y is not None else 2)
    if y is not None:
        y = as_features(y, "y", min_rows=1)
        if x.shape[1] != y.shape[1] or x.dtype != y.dtype or x.device != y.device:
            raise ValueError(
                f"x and y must share columns, dtype and device to be stacked: x is "
                f"{tuple(x.shape)} {x.dtype} on {x.device}, y {tuple(y.shape)} {y.dtype} on "
                f"{y.device}"
            )
        x = torch.cat([x, y], dim=0)
    return w * wasserstein_uniformity(x)


def contrastive_l2_loss(
    x: torch.Tensor | np.ndarray,
    x_pos: torch.Tensor | np.ndarray,
    x_neg: torch.Tensor | np.ndarray | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 1.0,
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """The contrastive L2 loss the blog's closing section proposes, averaged over anchors i:

        L = mean_i [ ||x_i - x_i+||^alpha - lam * sum_k ||x_i - x_ik-||^beta ].

    x, x_pos: (N, D) anchors and their positives. x_neg: (N, K, D) negatives per anchor, (K, D)
    negatives shared by every anchor, or None for in-batch negatives (anchor i's negatives are
    the other anchors' positives x_pos[j], j != i; K = N - 1). The negative term is a sum as in
    the formula, so lam's useful size scales like 1/K. On raw features the loss is bounded below
    only if beta < alpha (scaling all features by s multiplies the terms by s^alpha and
    s^beta); with normalize=True every vector is L2-normalised first and any beta works.
    A zero difference contributes 0 with a zero gradient for any exponent.

    Args:
        x: anchors (N, D).
        x_pos: their positives (N, D).
        x_neg: negatives (N, K, D) or (K, D), or None for in-batch negatives.
        alpha: the positive term's exponent, > 0.
        beta: the negative term's exponent, > 0.
        lam: weight of the negative term.
        normalize: L2-normalise every vector first.

    Returns:
        A 0-dim tensor with gradients.
    """
    x = as_features(x, "x", min_rows=1)
    x_pos = as_features(x_pos, "x_pos", min_rows=1)
    check_pairs(x, x_pos, "x", "x_pos")
    a = _checks.check_scalar(alpha, "alpha", minimum=0.0, allow_equal=False)
    b = _checks.check_scalar(beta, "beta", minimum=0.0, allow_equal=False)
    lm = _checks.check_scalar(lam, "lam")
    if normalize:
        x, x_pos = l2_normalize(x, "x"), l2_normalize(x_pos, "x_pos")
    n, d = x.shape
    if x_neg is None:
        if n < 2:
            raise ValueError("in-batch negatives need at least 2 anchors (rows of x)")
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
        diffs = x[:, None, :] - x_pos[None, :, :]  # (N, N, D): in-batch mode is for batches
        neg = (powered_norm(diffs, b) * off_diagonal).sum(1)
    else:
        x_neg = _negatives(x_neg, x, normalize)
        shared = x_neg.ndim == 2
        diffs = x[:, None, :] - (x_neg[None, :, :] if shared else x_neg)
        neg = powered_norm(diffs, b).sum(1)
    pos = powered_norm(x - x_pos, a)
    return (pos - lm * neg).mean()


def _negatives(x_neg, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not isinstance(x_neg, torch.Tensor):
        x_neg = torch.as_tensor(x_neg)
    n, d = x.shape
    if x_neg.ndim == 2:
        x_neg = as_features(x_neg, "x_neg", min_rows=1)
    else:
        _checks.check_tensor(x_neg, "x_neg", ndim=3)
        if x_neg.shape[0] != n or x_neg.shape[1] < 1:
            raise ValueError(
                f"x_neg of shape (N, K, D) needs N = {n} (one set per anchor) and K >= 1, got "
                f"{tuple(x_neg.shape)}"
            )
        _checks.check_finite(x_neg, "x_neg")
    if x_neg.shape[-1] != d:
        raise ValueError(f"x_neg must have D = {d} columns like x, got shape {tuple(x_neg.shape)}")
    if x_neg.dtype != x.dtype or x_neg.device != x.device:
        raise TypeError(
            f"x_neg ({x_neg.dtype} on {x_neg.device}) must match x ({x.dtype} on {x.device})"
        )
    if normalize:
        flat = l2_normalize(x_neg.reshape(-1, d), "x_neg")
        x_neg = flat.reshape(x_neg.shape)
    return x_neg


def noise_injected_infonce(
    z1: torch.Tensor | np.ndarray,
    z2: torch.Tensor | np.ndarray,
    *,
    target: str = "sphere",
    sigma: float = 0.3,
    temperature: float | None = None,
    critic: str = "sqdist",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """InfoNCE on normalised, noise-injected embeddings: Butakov et al., "Efficient Distribution
    Matching of Representations via Noise-Injected Deep InfoMax" (arXiv:2410.06993). Injecting
    independent noise into the normalised encoder output and keeping the InfoMax objective makes
    the mutual-information maximiser the maximum-entropy distribution under the normalisation,
    so the representation is driven to a chosen target distribution.

    z1, z2: (N, D) encoder outputs for two views of the same N inputs (row i of z1 and of z2 are
    a positive pair). The exact computation:

    1. normalise, by `target`:
       - "gaussian": per-coordinate batch standardisation of each view, (z - mean) / sqrt(var +
         1e-5) with the biased batch variance (BatchNorm1d without affine parameters); the
         target is N(0, I_D), the paper's Gaussian setting;
       - "uniform": sigmoid, into (0, 1)^D; the target is U([0, 1]^D), the paper's uniform
         setting (the squashing function is our choice: any map onto the cube fits the theory);
       - "sphere": L2 normalisation of each row (zero rows are an error); by rotational symmetry
         the maximiser over distributions on S^(D-1) is the uniform one: this target is our
         extension, matching the uniformity this package measures;
    2. inject noise, independent per entry: Gaussian N(0, sigma^2) for "gaussian" and "sphere",
       uniform on [-sigma, sigma] for "uniform" (the paper's epsilon = sigma);
    3. InfoNCE with in-batch negatives, averaged over both directions:
           s_ij = critic(a_i, b_j) / temperature,  critic "sqdist": -||a_i - b_j||^2,
                                                   critic "dot":    <a_i, b_j>,
           L = -(1/2N) sum_i [ (s_ii - logsumexp_j s_ij) + (s_ii - logsumexp_j s_ji) ],
       where a, b are the noisy views; log N - L is InfoNCE's lower bound on the mutual
       information.

    temperature=None matches the critic to the noise, v being the per-entry noise variance
    (sigma^2 for Gaussian noise, sigma^2/3 for uniform): 4 v for "sqdist", 2 v for "dot". Then
    -||a - b||^2 / (4 v) is the log-likelihood of the difference of two noisy views of one
    point (variance 2 v per entry), the Bayes critic for perfectly aligned views; "dot" with
    2 v has the same cross term. (On a 2-D toy set, uniform target, sigma = 0.2, 300 Adam steps:
    energy distance to U([0, 1]^2) 0.05 with this default, 0.16 with temperature 1.) sigma = 0
    needs an explicit temperature.

    `generator` fixes the noise (it must live on z1's device); the same generator state gives
    the same loss.

    Args:
        z1: first view's encoder outputs (N, D), N >= 2.
        z2: second view's encoder outputs (N, D).
        target: "sphere", "gaussian" or "uniform".
        sigma: the noise scale, >= 0.
        temperature: the critic's temperature, or None to match it to the noise.
        critic: "sqdist" or "dot".
        generator: a torch.Generator fixing the noise, or None.

    Returns:
        A 0-dim tensor with gradients through z1 and z2.
    """
    z1 = as_features(z1, "z1", min_rows=2)
    z2 = as_features(z2, "z2", min_rows=2)
    check_pairs(z1, z2, "z1", "z2")
    if target not in NOISE_TARGETS:
        raise ValueError(f"target must be one of {NOISE_TARGETS}, got {target!r}")
    if critic not in CRITICS:
        raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
    s = _checks.check_scalar(sigma, "sigma")
    if temperature is None:
        if s == 0.0:
            raise ValueError("temperature must be given when sigma is 0 (no noise to match)")
        variance = s * s / 3.0 if target == "uniform" else s * s
        tau = (4.0 if critic == "sqdist" else 2.0) * variance
    else:
        tau = _checks.check_scalar(temperature, "temperature", minimum=0.0, allow_equal=False)
    a = _inject_noise(_normalise_for_target(z1, "z1", target), target, s, generator)
    b = _inject_noise(_normalise_for_target(z2, "z2", target), target, s, generator)
    if critic == "dot":
        scores = (a @ b.T) / tau
    else:
        # Gram expansion, O(N^2) memory: its rounding, about eps * (||a||^2 + ||b||^2) / tau,
        # is far below the injected noise's effect on the scores.
        sq_a, sq_b = (a * a).sum(1), (b * b).sum(1)
        scores = -(sq_a[:, None] + sq_b[None, :] - 2.0 * (a @ b.T)).clamp_min(0.0) / tau
    diag = torch.diagonal(scores)
    forward = diag - torch.logsumexp(scores, dim=1)
    backward = diag - torch.logsumexp(scores, dim=0)
    return -0.5 * (forward.mean() + backward.mean())


def _normalise_for_target(z: torch.Tensor, name: str, target: str) -> torch.Tensor:
    if target == "sphere":
        return l2_normalize(z, name)
    if target == "gaussian":
        mean = z.mean(0, keepdim=True)
        var = ((z - mean) ** 2).mean(0, keepdim=True)
        return (z - mean) / torch.sqrt(var + BATCH_NORM_EPS)
    return torch.sigmoid(z)


def _inject_noise(z, target: str, sigma: float, generator) -> torch.Tensor:
    if sigma == 0.0:
        return z
    if target == "uniform":
        u = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return z + sigma * (2.0 * u - 1.0)
    e = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    return z + sigma * e


def riesz_uniformity_loss(
    x: torch.Tensor | np.ndarray,
    s: float,
    *,
    bank: torch.Tensor | FeatureBank | None = None,
    normalize: bool = True,
    coincident: str = "exclude",
    backend: str = "auto",
) -> torch.Tensor:
    """Riesz s-energy uniformity: the log of the mean inverse s-th power distance over pairs,

        L = log( 1 / (N (N - 1 + K)) * sum_i sum_{j != i} ||u_i - u_j||^(-s) ),

    u_i = x_i / ||x_i|| (normalize=True, default; zero rows are an error) or x_i as given
    (normalize=False), i over the N rows of x, j over the other N - 1 rows of x and the K rows of
    `bank`. Lower is more uniform. The bank (a (K, D) tensor or a `FeatureBank`; an empty one
    counts as none) is a constant: it is detached, and L2-normalised too when normalize=True, so
    raw or unit rows both work. Returns a 0-dim tensor in x's dtype, differentiable in x.

    **Through the field kernel** (docs/DESIGN.md, "The field as a Riesz-energy loss"). With charges
    c = (u, bank), power
    p = s, no weights and each query's own charge excluded (exclude = arange(N)), the field op's
    log_scale_i = logsumexp_{j != i}(-(s/2) log r2_ij) - log(N + K): the weight sum that
    normalises it counts all N + K charges, the excluded one included. Hence

        L = logsumexp_i(log_scale_i) + log(N + K) - log(N (N - 1 + K)),

    the excluded (self) pairs counted nowhere. The op's backward is the exact gradient (the
    field itself, exp(log_scale_i) v_i with power s + 2, is mean_j (u_i - c_j) / r_ij^(s+2),
    the force of this energy: -1/s times the gradient of mean_j r_ij^(-s) in u_i). The
    reduction is made in two calls of the op, whose log-sum-exps combine exactly (logaddexp):
    charges u with exclude = arange(N), and charges = the bank with no exclusion, each term
    carrying its own block's weight sum (N and K). The split keeps the bank, a constant, out of
    the charges whose gradient the op computes: the cpu backward sums the charges' gradients
    in private per-group buffers of up to 256 MiB, which a single call with all N + K charges
    fills (N = 4096, K = 65536, D = 128, float32: 349 MB of peak memory added, against 73 MB
    for the split, measured), and the bank's gradient would be computed only to be dropped.
    Time O(N (N + K) D), memory O((N + K) D): no N x N or N x K buffer, where a cdist-based
    loss holds several N x K float32 matrices, 1 GB each at that size (tests/test_riesz.py,
    bench/riesz_loss.py).

    **Relation to the literature.** Riesz s-energies on the sphere are classical (Hardin & Saff,
    "Discretizing manifolds via minimum energy points", Notices AMS 2004): for s < D - 1 the
    minimisers' empirical distribution converges to the uniform distribution on S^(D-1) (for
    s >= D - 1 they still spread uniformly, by the Poppy-seed bagel theorem), the same property
    that makes Wang & Isola's (ICML 2020) uniformity, log mean exp(-t ||u_i - u_j||^2) (a
    Gaussian potential, `metrics.uniform_loss`), a uniformity measure. The two differ in their
    kernel: the Gaussian one is bounded at 0 and decays fast, so it acts mostly on pairs closer
    than about 1/sqrt(t); r^(-s) diverges at 0, so the loss punishes near-collapse without
    bound and, as s grows, the mean is dominated by each point's nearest neighbours (large s
    approaches a max-min-distance packing, a KoLeo-like nearest-neighbour regime; small s is a
    global potential). Minimum hyperspherical energy (Liu et al., "Learning towards Minimum
    Hyperspherical Energy", NeurIPS 2018) minimises the same family as a regulariser on a layer's
    neuron weight vectors; here it acts on features, with a memory bank as MoCo keeps one.

    **Stable for large s.** The mean is never formed from powers: the kernel evaluates
    -(s/2) log r2 and an online (running-maximum) log-sum-exp, as FlashAttention does its
    softmax, then one more logsumexp over i; the gradient is the softmax-weighted sum of
    -s (u_i - u_j) / r2_ij, so its norm in u is at most 2 s / (the smallest pair distance)
    (the query and the charge routes each carry at most the total weight 1). Nothing
    overflows: at s = 128 in float32, where ||u_i - u_j||^(-128) overflows float32 below
    distance 0.5, loss and gradient are finite and accurate (tested).

    **float32 accuracy** (measured against float64 on N = 256 Gaussian features with a bank of
    unit features, D = 128, s = 2): the loss to 1e-6 relative; the gradient to 7e-6 (K = 1024)
    up to 1.8e-4 (K = 65536) of its largest entry, where a Gram-expansion loss in plain
    autograd gets 3e-6. The cause is the geometry, not the sums: the op returns the gradient in
    u, sum_j w_ij (u_i - c_j) / r2_ij, accurate to 1e-6 of its size, but for a near-uniform
    bank it is almost all radial (the tangential part, which survives the normalisation, is
    0.4% of it at K = 65536), so its rounding shows up some 200-fold in the gradient in x.
    Harmless for stochastic training; use float64 where gradients must be exact to float32
    rounding.

    **Coincident rows** (rows equal after the normalisation: a sample drawn twice, a batch
    already pushed into the bank) are one point, not a pair at distance 0, whose r^(-s) would be
    infinite (the kernel floors r2 at the dtype's smallest normal number: the pair would swamp
    the loss, about 79 at s = 2 in float32, and the gradient would vanish, about 1e-36).
    coincident="exclude" (default) leaves their pairs out like a row's own pair: the sums run
    over pairs of distinct points and the pair count above becomes N (N + K) - sum_g c_g (c_g +
    m_g), c_g the rows of the batch equal to one another, m_g the bank rows equal to them; each
    copy gets the gradient of a single point there (the same for every copy).
    coincident="raise" raises a ValueError naming the rows instead. If no pair of distinct
    points is left (every row equal, and the bank empty or equal to them) it is a ValueError.
    Found exactly, without an N x N or N x K buffer (docs/DESIGN.md, "Coincident rows in the
    Riesz loss"); rows that are merely close are not coincident.

    **Symmetric pairs.** The batch-batch sum is symmetric in (i, j), so the gradient through the
    charges equals the gradient through the queries: the first call passes the charges detached
    and doubles its gradient, and the op computes no charge gradient at all.

    Args:
        x: features (N, D), float32 or float64 (what `backend` supports); N >= 2, or N >= 1
            with a non-empty bank.
        s: the Riesz exponent, a finite real > 0.
        bank: None, a (K, D) tensor of x's dtype and device, or a `FeatureBank`.
        normalize: L2-normalise x and the bank first (True) or take them as they are (False:
            then keep them on a sphere yourself; unconfined in R^D the energy only falls as
            the points move apart, without bound).
        coincident: "exclude" (coincident rows are one point) or "raise" (a ValueError naming
            them).
        backend: the field op's backend ("auto", "cpu", "reference", "triton", "cuda").

    Returns:
        The loss, a 0-dim tensor in x's dtype, differentiable in x.
    """
    x = as_features(x, "x", min_rows=1)
    sv = _checks.check_scalar(s, "s", minimum=0.0, allow_equal=False)
    _checks.check_bool(normalize, "normalize")
    check_coincident(coincident)
    n, d = x.shape
    bank = _bank_rows(bank, x)
    k = 0 if bank is None else bank.shape[0]
    if n + k < 2:
        raise ValueError(
            f"x has {n} row and no bank was given (or the bank is empty): the Riesz energy needs "
            "at least one pair (N >= 2, or a non-empty bank)"
        )
    u = l2_normalize(x, "x") if normalize else x
    b = None
    if bank is not None:
        if normalize:
            b = l2_normalize(bank, "bank")  # checks for NaN/inf and zero rows
        else:
            _checks.check_finite(bank, "bank")
            b = bank
    co = _coincident.find(u.detach(), b)
    if coincident == "raise" and (co.in_batch or co.with_bank):
        raise ValueError(
            f"coincident rows (equal after normalisation): {co.describe()}; "
            "pass coincident='exclude' to count each as one point"
        )
    n_pairs = co.pairs(n, k)
    if n_pairs == 0:
        raise ValueError(
            f"all {n} rows of x coincide (and the bank holds no other point): the Riesz energy "
            "has no pair of distinct points (collapsed features?)"
        )
    # Per block of charges, log of its sum over (i, j) of w_j r_ij^(-s) relative to the pair
    # count: the op's log_scale, plus the log of the weight sum it was normalised by (N or K,
    # the excluded charges included), minus log(#pairs). These O(N) reductions run in float64:
    # in float32 the rounding of logs of order log(#pairs) ~ 10, which cancel down to a loss of
    # order 0.1, cost up to 7e-6 of relative error (measured), more than the kernel's own.
    pairs = math.log(n_pairs)
    parts = []
    if co.groups >= 2:
        w = co.batch_weights(0, n, x.dtype)
        _, ls = poisson_field(
            u, u.detach(), weights=w, power=sv, exclude=co.batch_exclude(0, n), backend=backend
        )
        lse = _finite_logsumexp(ls)
        parts.append(2.0 * lse - lse.detach() + (math.log(n) - pairs))  # symmetric pairs
    if b is not None:
        _, ls = poisson_field(
            u,
            b,
            weights=co.bank_weights(0, x.dtype),
            power=sv,
            exclude=co.bank_exclude(0, n),
            backend=backend,
        )
        parts.append(_finite_logsumexp(ls) + (math.log(k) - pairs))
    parts = [p for p in parts if bool(torch.isfinite(p.detach()))]
    total = parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])
    return total.to(x.dtype)


COINCIDENT = ("exclude", "raise")


def check_coincident(coincident: str) -> None:
    """Validates the `coincident` argument of the Riesz losses.

    Args:
        coincident: the value to check.
    """
    if coincident not in COINCIDENT:
        raise ValueError(f"coincident must be one of {COINCIDENT}, got {coincident!r}")


def _finite_logsumexp(ls: torch.Tensor) -> torch.Tensor:
    """logsumexp of ls in float64 over its finite entries (a row that no charge reaches has
    log_scale -inf); -inf, with a zero gradient rather than NaN, when none is finite."""
    ls = ls.to(torch.float64)
    finite = torch.isfinite(ls)
    if bool(finite.all()):
        return torch.logsumexp(ls, dim=0)
    safe = torch.where(finite, ls, 0.0)
    if not bool(finite.any()):
        return safe.sum() * 0.0 - math.inf
    return torch.logsumexp(torch.where(finite, ls, -math.inf), dim=0)


def _bank_rows(bank, x: torch.Tensor):
    """The bank as a detached (K, D) tensor matching x, or None (no bank, or an empty one)."""
    if bank is None:
        return None
    if isinstance(bank, FeatureBank):
        bank = bank.features()
    if not isinstance(bank, torch.Tensor):
        raise TypeError(
            f"bank must be None, a torch.Tensor or a FeatureBank, got {type(bank).__name__}"
        )
    _checks.check_tensor(bank, "bank", ndim=2)
    if bank.shape[1] != x.shape[1]:
        raise ValueError(
            f"bank must have D = {x.shape[1]} columns like x, got shape {tuple(bank.shape)}"
        )
    if bank.dtype != x.dtype:
        raise TypeError(f"bank has dtype {bank.dtype} but x has {x.dtype}; they must match")
    if bank.device != x.device:
        raise ValueError(f"bank is on {bank.device} but x is on {x.device}")
    if bank.shape[0] == 0:
        return None
    return bank.detach()  # its values are checked where it is normalised (or not)
