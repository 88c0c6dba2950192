"""PFGM training targets with the fused field kernel, against PFGM's dense recipe.

    python examples/pfgm_targets.py [--quick] [--dim D] [--small-batch N] [--large-batch B]

A PFGM training step (Xu et al., 2022) perturbs a small batch of clean points upward into
R^(d+1) and regresses a network on the normalised Poisson field of a large batch of clean
points at them. PFGM's code forms that field from an explicit N x B x (d + 1) difference tensor;
`poissonflow.learned.targets.field_targets` computes the same targets with the field kernel in
O((N + B) d) memory. This script computes both on the same perturbed points, prints their time,
their largest intermediate and the peak memory each added, checks that they agree, and takes
one optimiser step of a small network on the kernel's targets.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from poissonflow.learned import targets as pfgm


def dense_pfgm_targets(
    x_pert: torch.Tensor, z: torch.Tensor, charges: torch.Tensor, gamma: float
) -> torch.Tensor:
    """PFGM's recipe (losses.py of its reference code), restated: the N x B x (d + 1) way."""
    d = x_pert.shape[1]
    pert = torch.cat([x_pert, z[:, None]], dim=1)  # (N, d + 1)
    real = torch.cat([charges, torch.zeros(len(charges), 1)], dim=1)  # (B, d + 1)
    diff = pert[:, None, :] - real[None, :, :]  # (N, B, d + 1)
    dist = diff.pow(2).sum(-1).sqrt()  # (N, B)
    w = (dist.min(dim=1, keepdim=True).values / (dist + 1e-7)) ** (d + 1)
    coeff = w / (w.sum(dim=1, keepdim=True) + 1e-7)
    direction = -(coeff[:, :, None] * diff).sum(dim=1)  # (N, d + 1)
    return direction / (direction.norm(dim=1, keepdim=True) + gamma) * math.sqrt(d)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run for CI (seconds)")
    parser.add_argument("--dim", type=int, default=784, help="data dimension d (784: MNIST)")
    parser.add_argument("--small-batch", type=int, default=128, help="perturbed points N")
    parser.add_argument("--large-batch", type=int, default=1024, help="clean charges B")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.small_batch, args.large_batch = 64, 64, 512
    d, n, b = args.dim, args.small_batch, args.large_batch
    g = torch.Generator().manual_seed(0)

    # stand-in data: B clean points; PFGM's default hyperparameters for the perturbation
    data = torch.rand(b, d, generator=g) * 2 - 1
    sigma, tau, gamma = 0.01, 0.03, 5.0
    M = pfgm.pfgm_M(pfgm.data_norm(data), d, sigma, tau)
    x_pert, z = pfgm.pfgm_perturb(data[:n], M, sigma, tau, restrict_M=True, generator=g)
    print(f"d = {d}, {n} perturbed points, {b} charges, M = {M}")

    base = peak_rss_mb()
    t0 = time.perf_counter()
    fused = pfgm.field_targets(x_pert, z, data, gamma)
    t_fused = time.perf_counter() - t0
    grew_fused = peak_rss_mb() - base

    base = peak_rss_mb()
    t0 = time.perf_counter()
    dense = dense_pfgm_targets(x_pert, z, data, gamma)
    t_dense = time.perf_counter() - t0
    grew_dense = peak_rss_mb() - base

    mb = 4 / 2**20
    print(
        f"poissonflow field_targets: {t_fused * 1e3:8.1f} ms, largest intermediate "
        f"{n * (d + 1) * mb:8.2f} MB (N x (d + 1)), peak memory +{grew_fused:.0f} MB"
    )
    print(
        f"PFGM's dense recipe:       {t_dense * 1e3:8.1f} ms, largest intermediate "
        f"{n * b * (d + 1) * mb:8.2f} MB (N x B x (d + 1)), peak memory +{grew_dense:.0f} MB"
    )
    err = ((fused - dense).norm(dim=1) / dense.norm(dim=1)).max().item()
    print(f"largest relative difference between the two: {err:.1e} (PFGM's 1e-7 epsilons)")
    assert err < 1e-3, err

    # one training step of a (tiny) field network on the kernel's targets
    net = torch.nn.Sequential(
        torch.nn.Linear(d + 1, 256), torch.nn.SiLU(), torch.nn.Linear(256, d + 1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = (net(torch.cat([x_pert, z[:, None]], dim=1)) - fused).pow(2).sum(dim=1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"one training step of a field network: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
