"""Training losses of the papers whose metrics `poissonflow.metrics` reports, so encoders can be
trained the ways the literature compares (DESIGN.md section 5). Each is a torch function of
features (N, D) that returns a 0-dim tensor with gradients; lower is better for all of them.

| loss | source |
|---|---|
| `align_uniform_loss` | Wang & Isola (ICML 2020) |
| `wasserstein_uniformity_loss` | Fang et al. (ICLR 2024), auxiliary term |
| `contrastive_l2_loss` | the blog's closing proposal, ||x - x+||^a - lambda sum ||x - x-||^b |
| `noise_injected_infonce` | Butakov et al. (2024), noise-injected Deep InfoMax |
"""

from __future__ import annotations

import torch

from . import _checks
from .metrics import align_loss, as_features, check_pairs, l2_normalize, powered_norm
from .metrics import uniform_loss, wasserstein_uniformity

__all__ = [
    "align_uniform_loss",
    "wasserstein_uniformity_loss",
    "contrastive_l2_loss",
    "noise_injected_infonce",
]

NOISE_TARGETS = ("sphere", "gaussian", "uniform")
CRITICS = ("sqdist", "dot")

# Added to the batch variance before dividing, as torch.nn.BatchNorm1d does, so that a constant
# coordinate (a dead unit early in training) gives 0 rather than 0/0.
BATCH_NORM_EPS = 1e-5


def align_uniform_loss(
    x,
    y,
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


def wasserstein_uniformity_loss(x, y=None, *, weight: float = 1.0) -> torch.Tensor:
    """Fang et al.'s auxiliary term, added to a base self-supervised loss (they use BYOL, Barlow
    Twins, MoCo): loss = base_loss + weight * W2, with W2 the `wasserstein_uniformity` of x, or
    of both views stacked (x on top of y, one W2 over 2N rows) when y is given. Rank-deficient
    batches (N < D) give finite gradients."""
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
    x,
    x_pos,
    x_neg=None,
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
    z1,
    z2,
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
    the same loss. Returns a 0-dim tensor with gradients through z1 and z2.
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

