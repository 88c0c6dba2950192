"""PFGM's training recipe (docs/DESIGN.md, "The learned field"): perturbation, field targets and
the M / z_max rule. What the learned field trains on; poissonflow.learned.training uses it.

Read against PFGM's reference code (github.com/Newbeeer/Poisson_flow):
`models/utils_poisson.py::forward_pz` (perturbation), `losses.py::get_loss_fn` (targets and loss),
`hyperparam_calculator.py` (M and z_max), `configs/poisson/cifar10_ddpmpp.py` and
`configs/default_cifar10_configs.py` (defaults). Nothing here is copied; the formulas are restated.

Perturbation of a clean point x (d dims), m ~ U[0, M) continuous:

    z  = |s| (1 + tau)^m,            s ~ N(0, sigma^2)
    x' = x + ||e|| (1 + tau)^m u,    e ~ N(0, sigma^2 I_d), u uniform on S^(d-1)

restrict_M (PFGM Appendix B.1.1): points with s < sigma / 2 draw m ~ U[0, floor(0.7 M)) instead.
PFGM tests the *signed* draw (`z < 0.005` before `z.abs()`, with sigma = 0.01), so about 69% of
the points are restricted, not the 38% a test on |s| would give; reproduced as written.

Target at (x', z) from the large batch y_1..y_B (charges at height 0 of R^(d+1)):

    v~  = sum_j pi_j (x~' - y~_j),   pi_j = softmax_j(-(d + 1) log ||x~' - y~_j||)
    target = -sqrt(d) v~ / (||v~|| + gamma)          (points toward the data)

v~ has x part v = poissonflow.ops.field(x', y, power = d + 1, eps_rows = z) (the height enters
as per-query softening) and z part exactly z. PFGM forms the same softmax from an explicit
N x B x (d + 1) difference tensor with (min_j r_j / (r_j + 1e-7))^(d + 1) weights and a 1e-7
in the normaliser; the kernel's exact softmax differs from that only by those epsilons.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_positive

__all__ = [
    "pfgm_M",
    "pfgm_z_max",
    "data_norm",
    "pfgm_perturb",
    "field_targets",
    "RESTRICT_Z_FRACTION",
    "RESTRICT_M_FRACTION",
]

# forward_pz: `z < 0.005` with sigma_end = 0.01, i.e. half a sigma; `int(M * 0.7)`.
RESTRICT_Z_FRACTION = 0.5
RESTRICT_M_FRACTION = 0.7


def data_norm(features: torch.Tensor) -> float:
    """Root-mean-square norm sqrt(mean_i ||x_i||^2), measured from the origin (PFGM's DATA_NORM,
    e.g. 32 for CIFAR-10 scaled to [-1, 1]: the typical norm of a data point)."""
    f = features.detach().to(torch.float64)
    return float((f * f).sum(1).mean().sqrt())


def pfgm_M(norm: float, d: int, sigma: float, tau: float) -> int:
    """PFGM's rule M = floor(0.75 ln(norm^2 / (2 sqrt(d) sigma^2)) / ln(1 + tau)) + 1.

    Chosen so that the largest perturbation, of norm about sigma sqrt(d) (1 + tau)^M, lies far
    outside the data (PFGM Appendix B.1.1). CIFAR-10 (norm 32, d = 3072, sigma = 0.01,
    tau = 0.03) gives 291, PFGM's value. PFGM's hyperparam_calculator.py uses sqrt(d + 1);
    docs/DESIGN.md, "The learned field" writes sqrt(d), used here (the two agree on M for d >= 100).
    """
    check_positive(norm, "norm")
    check_positive(sigma, "sigma")
    check_positive(tau, "tau")
    if int(d) < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    ratio = norm**2 / (2.0 * math.sqrt(d) * sigma**2)
    M = math.floor(0.75 * math.log(ratio) / math.log1p(tau)) + 1
    if M < 1:
        raise ValueError(
            f"PFGM's rule gives M = {M} < 1: the data's norm ({norm:.3g}) is not large against "
            f"sigma ({sigma:.3g}) in {d} dimensions; give M explicitly or a smaller sigma"
        )
    return M


def pfgm_z_max(M: float, sigma: float, tau: float) -> float:
    """sqrt(2 / pi) sigma (1 + tau)^M: the mean height E|s| (1 + tau)^M of the most perturbed
    points, where PFGM starts its backward ODE (hyperparam_calculator.py's ZMAX)."""
    return math.sqrt(2.0 / math.pi) * sigma * (1.0 + tau) ** M


def pfgm_perturb(
    x: torch.Tensor,
    M: float,
    sigma: float,
    tau: float,
    restrict_M: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', z): PFGM's perturbation of the clean points x (n, d) (formula in the module doc).

    Every random draw has a fixed shape (the restricted m is drawn for all points and selected
    with `where`), so the stream of the generator does not depend on the data.
    """
    n, d = x.shape
    kw = {"generator": generator, "device": x.device, "dtype": x.dtype}
    m = torch.rand(n, **kw) * M
    s = torch.randn(n, **kw) * sigma
    if restrict_M:
        m_small = torch.rand(n, **kw) * int(M * RESTRICT_M_FRACTION)
        m = torch.where(s < RESTRICT_Z_FRACTION * sigma, m_small, m)
    grow = (1.0 + tau) ** m
    z = s.abs() * grow
    noise_norm = (torch.randn(n, d, **kw) * sigma).norm(dim=1)
    u = torch.randn(n, d, **kw)
    u = u / u.norm(dim=1, keepdim=True)
    return x + u * (noise_norm * grow)[:, None], z


def field_targets(
    x_pert: torch.Tensor,
    z: torch.Tensor,
    charges: torch.Tensor,
    gamma: float,
    backend: str = "auto",
) -> torch.Tensor:
    """(n, d + 1) targets -sqrt(d) v~ / (||v~|| + gamma) at the perturbed points (x_pert, z)
    from the clean large batch `charges` (B, d) at height 0.

    One fused kernel pass, O((n + B) d) memory: the x part of v~ comes from the field of the
    charges in d dims with power d + 1 and per-query softening z (||x~ - y~||^2 = ||x - y||^2 +
    z^2); the z part is z itself. No N x B x (d + 1) tensor is formed (PFGM's code forms one).
    """
    from .. import registry

    d = x_pert.shape[1]
    which = registry.resolve(backend, x_pert.device)
    power = float(d + 1)
    with torch.no_grad():
        # The backend's protocol function directly, not the autograd-aware op: no gradient is
        # needed, and the op's dispatch cost (~0.2 ms a call, measured) is a quarter of this
        # small problem (128 queries x 1024 charges in training).
        v, _ = (
            registry.get(which)
            .module()
            .field_forward(x_pert, charges, None, power, 0.0, eps_rows=z)
        )
        full = torch.cat([v, z[:, None].to(v.dtype)], dim=1)
        return full * (-math.sqrt(d) / (full.norm(dim=1, keepdim=True) + gamma))
