"""Time per training epoch of poissonflow.LearnedField, and the share spent in the field target.

    python bench/learned_epoch.py            # 50000 x 128 features, batches 1024 / 128, 3 epochs
    python bench/learned_epoch.py --quick    # 10000 x 128, 1 timed epoch (a smoke run)

Features: an L2-normalised Gaussian mixture (10 clusters in 128-d, within-cluster cosine about
0.8), like the penultimate-layer features the package is for. Training runs the blog's preset
(batches 1024 / 128, network Linear(129, 129)-ReLU x 2-Linear) through the real `fit` code path
with profile=True; `timing_` splits every epoch into its phases:

    data     batch gather + PFGM perturbation of the small batch
    target   the field targets (poissonflow.learned.targets.field_targets: one fused kernel call)
    network  forward, loss, backward and the Adam step

The figure of merit is target / epoch (the project's target: under 20%). For scale, the same target
computed the way PFGM's code does it (an N x B x (d + 1) difference tensor in PyTorch) is timed
too. The machine's load average is printed: on a shared 2-core machine other processes inflate
every phase, so compare shares, not absolute times, across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import poissonflow
from poissonflow.learned import LearnedField
from poissonflow.learned.targets import field_targets, pfgm_perturb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import machine  # noqa: E402


def mixture_features(n: int, d: int, clusters: int = 10, seed: int = 0) -> torch.Tensor:
    """L2-normalised Gaussian mixture: unit-norm cluster means plus isotropic noise of norm
    about 0.75, so that within-cluster cosines are about 0.8 and between-cluster about 0."""
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    labels = torch.randint(0, clusters, (n,), generator=g)
    x = means[labels] + 0.75 * torch.randn(n, d, generator=g) / math.sqrt(d)
    return torch.nn.functional.normalize(x, dim=1)


def dense_target_seconds(x_pert, z, charges, gamma, repeats: int = 5) -> float:
    """Median seconds of PFGM's dense target (losses.py): an (n, B, d + 1) difference tensor."""

    def dense():
        xt = torch.cat([x_pert, z[:, None]], 1)
        yt = torch.cat([charges, torch.zeros(charges.shape[0], 1)], 1)
        diff = xt[:, None, :] - yt[None, :, :]  # the N x B x D tensor poissonflow avoids
        dist = diff.pow(2).sum(-1).sqrt()
        w = torch.softmax(-(x_pert.shape[1] + 1) * torch.log(dist), dim=1)
        v = (w[:, :, None] * diff).sum(1)
        return -math.sqrt(x_pert.shape[1]) * v / (v.norm(dim=1, keepdim=True) + gamma)

    dense()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dense()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def epoch_shares(
    n: int,
    d: int,
    epochs: int,
    large_batch: int = 1024,
    small_batch: int = 128,
    device: str = "cpu",
) -> dict:
    """One timed fit of the blog preset (after a warm-up fit): per-phase shares of the epoch
    time, ms per iteration, and the kernel's rate inside the loop."""
    X = mixture_features(n, d)
    settings = dict(
        preset="blog", large_batch=large_batch, small_batch=small_batch, device=device, seed=0
    )
    LearnedField(**settings, epochs=1).fit(X[: 4 * large_batch], progress=False)  # warm-up
    t0 = time.perf_counter()
    field = LearnedField(**settings, epochs=epochs).fit(X, progress=False, profile=True)
    wall = time.perf_counter() - t0
    tm = field.timing_
    its = field.n_iterations_
    # the kernel loops over the d feature dimensions (the height enters as a per-row softening)
    flops = 4.0 * d * small_batch * large_batch
    return {
        "X": X,
        "wall": wall,
        "iterations": its,
        "epochs": epochs,
        "epoch_seconds": statistics.median(tm["epoch"]),
        "shares": {k: sum(tm[k]) / sum(tm["epoch"]) for k in ("data", "target", "network")},
        "ms_per_iteration": {k: 1e3 * sum(tm[k]) / its for k in ("data", "target", "network")},
        "kernel_gflops_in_loop": flops / (sum(tm["target"]) / its) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10000 x 128, one timed epoch")
    ap.add_argument("--n", type=int, default=None, help="number of features (default 50000)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs (default 3)")
    ap.add_argument("--large-batch", type=int, default=1024)
    ap.add_argument("--small-batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    n = args.n or (10000 if args.quick else 50000)
    epochs = args.epochs or (1 if args.quick else 3)
    r = epoch_shares(n, args.d, epochs, args.large_batch, args.small_batch, args.device)
    X, shares = r["X"], r["shares"]
    its = r["iterations"] // epochs
    epoch_s = r["epoch_seconds"]

    rec = machine.machine_record()
    print(
        f"poissonflow {poissonflow.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"CPU: {machine.cpu_line(rec)}")
    print(
        f"features {n} x {args.d}, batches {args.large_batch} / {args.small_batch}, "
        f"{its} iterations per epoch, {epochs} timed epoch(s) ({r['wall']:.2f} s)"
    )
    print(f"time per epoch (median): {epoch_s:.3f} s   ({1e3 * epoch_s / its:.2f} ms / iteration)")
    for k in ("data", "target", "network"):
        print(f"  {k:8s} {100 * shares[k]:5.1f} %   {r['ms_per_iteration'][k]:7.3f} ms / iteration")
    # the target kernel's ceiling: the forward at p = d + 1 over d dimensions
    ceil = ceiling.measure() if args.device == "cpu" else None
    frac = (
        f", {r['kernel_gflops_in_loop'] / ceil.forward_gflops(args.d, args.d + 1.0):.2f} "
        "of its ceiling on this machine"
        if ceil
        else ""
    )
    print(
        f"field target share: {100 * shares['target']:.1f} % (target: < 20 %), "
        f"kernel {r['kernel_gflops_in_loop']:.1f} GFLOP/s in the loop (4 d flop per pair)"
        f"{frac}"
    )

    g = torch.Generator().manual_seed(1)
    batch = X[: args.large_batch]
    x_pert, z = pfgm_perturb(batch[: args.small_batch], 20.0, 0.01, 0.03, False, g)
    field_targets(x_pert, z, batch, 0.3)  # warm
    t0 = time.perf_counter()
    for _ in range(20):
        field_targets(x_pert, z, batch, 0.3)
    fused = (time.perf_counter() - t0) / 20
    dense = dense_target_seconds(x_pert, z, batch, 0.3)
    print(
        f"target alone: fused kernel {1e3 * fused:.3f} ms, PFGM-style dense PyTorch "
        f"{1e3 * dense:.3f} ms ({dense / fused:.1f}x)"
    )


if __name__ == "__main__":
    main()
