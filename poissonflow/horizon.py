"""Where the flow starts and ends: the "auto" rules for z_min and z_max, from the charges.

* z_min = Z_MIN_FACTOR (0.5) x the median nearest-neighbour distance of the charges. Below the
  nearest-neighbour scale the flux through the plane z = z_min is that of point charges, not of
  the density the queries come from; well above it the start is no longer "on the plane".
  Larger z_min keeps more class structure at the cost of uniformity: the horizon is a
  trade-off, and the experiment sweeps it.
* z_max = Z_MAX_FACTOR (1e3) x the data scale (root-mean-square distance of the charges to their
  mean): far enough that the end directions have settled (the far field is that of one charge
  at the centre, corrections fall off like scale / z).
* flux start: delta = FLUX_DELTA_FACTOR (1e-3) x the median nearest-neighbour distance (the
  flux start needs delta far below the nearest-neighbour distance).

The reasoning is docs/DESIGN.md, "The flow" ("The horizon"); the measurements behind the three
factors, with the commands that repeat them, are its facts H2 (z_min), H4 (z_max) and H5 (the
trade-off).
"""

from __future__ import annotations

import torch

__all__ = ["median_nn_distance", "data_scale", "auto_z_min", "auto_z_max", "flux_delta"]

Z_MIN_FACTOR = 0.5
Z_MAX_FACTOR = 1e3
FLUX_DELTA_FACTOR = 1e-3
NN_SAMPLE = 2048  # charges whose nearest neighbour is measured (a fixed, seeded subsample)


def median_nn_distance(charges: torch.Tensor, *, sample: int = NN_SAMPLE, seed: int = 0) -> float:
    """Median over (a seeded subsample of) the charges of the distance to the nearest other
    charge, by direct differences (torch.cdist's direct mode), in float64 chunks. Exact
    duplicates count as distance 0; if that makes the median 0, the median over the charges'
    positive nearest-neighbour distances is used instead."""
    y = charges.detach().to(torch.float64)
    idx = nn_sample(y.shape[0], sample=sample, seed=seed)
    return median_positive(nearest_distances(y[idx], y, idx))


def nn_sample(B: int, *, sample: int = NN_SAMPLE, seed: int = 0) -> torch.Tensor:
    """The sorted, seeded subsample of charge indices the nearest-neighbour rule looks at (the
    same on one process and over process shards, so both give the same horizon)."""
    if B < 2:
        raise ValueError("the horizon rule needs at least 2 charges (nearest-neighbour distance)")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(B, generator=g)[: min(sample, B)].sort().values


def nearest_distances(queries: torch.Tensor, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Distance from each float64 query row to its nearest row of y, by direct differences in
    chunks of ~2**22 pairs, ignoring for query i the row skip[i] of y (-1: none). inf where y
    is empty."""
    nn = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64)
    if y.shape[0] == 0:
        return nn
    chunk = max(1, 2**22 // y.shape[0])
    for s0 in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[s0 : s0 + chunk], y, compute_mode="donot_use_mm_for_euclid_dist")
        sel = skip[s0 : s0 + chunk]
        here = torch.nonzero(sel >= 0).flatten()
        d[here, sel[here]] = float("inf")
        nn[s0 : s0 + chunk] = d.min(1).values
    return nn


def median_positive(nn: torch.Tensor) -> float:
    """Median of nearest-neighbour distances; if exact duplicates make it 0, the median of the
    positive ones."""
    med = float(nn.median())
    if med > 0:
        return med
    positive = nn[nn > 0]
    if positive.numel() == 0:
        raise ValueError("all charges coincide: there is no length scale to start the flow from")
    return float(positive.median())


def data_scale(charges: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Root-mean-square distance of the charges to their (weighted) mean."""
    y = charges.detach().to(torch.float64)
    if weights is None:
        c = y.mean(0)
        s = ((y - c) ** 2).sum(1).mean()
    else:
        w = weights.detach().to(torch.float64)
        w = w / w.sum()
        c = (w[:, None] * y).sum(0)
        s = (w * ((y - c) ** 2).sum(1)).sum()
    return float(s.sqrt())


def auto_z_min(charges: torch.Tensor) -> float:
    return Z_MIN_FACTOR * median_nn_distance(charges)


def auto_z_max(charges: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    s = data_scale(charges, weights)
    if not s > 0:
        raise ValueError("the charges have zero spread: z_max='auto' needs a data scale")
    return Z_MAX_FACTOR * s


def flux_delta(charges: torch.Tensor) -> float:
    return FLUX_DELTA_FACTOR * median_nn_distance(charges)
