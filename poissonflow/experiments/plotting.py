"""A picture of the flow in three dimensions: charges on the plane, trajectories rising through
the exact field, end points spread over the hemisphere (`poissonflow demo --plot`).

    from poissonflow.experiments.plotting import flow_picture, demo_charges
    charges, queries = demo_charges(seed=0)
    fig = flow_picture(charges, queries)          # matplotlib Figure
    fig.savefig("flow.png", dpi=150)
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["demo_charges", "flow_trajectories", "flow_picture"]


def demo_charges(n_charges: int = 2000, n_queries: int = 2000, seed: int = 0):
    """A 2-D charge distribution far from uniform (two crescents and a blob), and held-out
    points drawn from the same distribution: (charges (B, 2), queries (N, 2)), float64."""
    g = np.random.default_rng(seed)

    def sample(n):
        k = g.integers(0, 3, size=n)
        a = g.uniform(0.0, math.pi, size=n)
        moon = np.stack([np.cos(a), np.sin(a)], 1)
        out = np.where(
            (k == 0)[:, None],
            moon + [-0.5, -0.2],
            np.where((k == 1)[:, None], [0.5, 0.2] - moon, 0.0),
        )
        blob = g.normal([1.6, 1.2], 0.15, size=(n, 2))
        out = np.where((k == 2)[:, None], blob, out)
        return out + g.normal(0.0, 0.06, size=(n, 2))

    return sample(n_charges), sample(n_queries)


def flow_trajectories(charges, queries, *, heights: int = 64, backend: str = "auto"):
    """Points of each query's path at `heights` log-spaced heights from the transform's z_min
    to its z_max (exact field, RK4, plane start, the transform's own horizon and settings):
    (T, N, 3) float64, rows (x1, x2, z).

    Each height is the end of a `poissonflow.transform` run stopped there, so every point lies
    on the path the transform itself takes."""
    from .. import horizon
    from ..transform import transform

    y = np.asarray(charges, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    yt = torch.from_numpy(y)
    z_min, z_max = horizon.auto_z_min(yt), horizon.auto_z_max(yt)
    path = [np.hstack([q, np.full((len(q), 1), z_min)])]
    for z in np.geomspace(z_min, z_max, heights)[1:]:
        path.append(
            transform(
                q,
                charges=y,
                z_min=z_min,
                z_max=float(z),
                output="raw",
                backend=backend,
                progress=False,
            )
        )
    return np.stack(path)


def _clip_to_sphere(path: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """The part of one path (T, 3) inside the sphere of `radius` around (centre, 0), ended by
    its crossing point, interpolated onto the sphere."""
    r = np.linalg.norm(path - np.append(centre, 0.0), axis=1)
    out = np.nonzero(r >= radius)[0]
    if len(out) == 0:
        return path
    k = out[0]
    if k == 0:
        return path[:1]
    a = (radius - r[k - 1]) / (r[k] - r[k - 1])
    return np.vstack([path[:k], path[k - 1] + a * (path[k] - path[k - 1])])


def flow_picture(charges, queries, *, n_paths: int = 120, backend: str = "auto"):
    """A matplotlib Figure: left, the charges on the plane and `n_paths` trajectories rising to
    the hemisphere where they end; right, histograms of the end points' azimuth and height on
    the unit hemisphere, both flat for a uniform hemisphere in 3-D (Archimedes: the height of a
    uniform point on S^2 is uniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..transform import transform

    charges = np.asarray(charges, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    paths = flow_trajectories(charges, queries[:n_paths], backend=backend)
    ends = transform(queries, charges=charges, output="sphere", backend=backend, progress=False)
    centre = charges.mean(0)
    # The paths are drawn up to a hemisphere a few data scales wide; past it they run almost
    # straight out (their directions are the right panel's end points).
    radius = 3.0 * float(np.sqrt(((charges - centre) ** 2).sum(1).mean()))

    fig = plt.figure(figsize=(11, 4.8))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.scatter(charges[:, 0], charges[:, 1], 0 * charges[:, 0], s=1, c="0.3", alpha=0.4)
    u, v = np.meshgrid(np.linspace(0, 2 * math.pi, 36), np.linspace(0, math.pi / 2, 10))
    ax.plot_wireframe(
        centre[0] + radius * np.cos(u) * np.sin(v),
        centre[1] + radius * np.sin(u) * np.sin(v),
        radius * np.cos(v),
        color="0.82",
        linewidth=0.4,
    )
    colours = plt.cm.viridis(np.linspace(0, 1, paths.shape[1]))
    for i in range(paths.shape[1]):
        p = _clip_to_sphere(paths[:, i, :], centre, radius)
        ax.plot(p[:, 0], p[:, 1], p[:, 2], color=colours[i], linewidth=0.7)
        ax.scatter(*p[-1], s=4, color=colours[i])
    ax.set_xlim(centre[0] - radius, centre[0] + radius)
    ax.set_ylim(centre[1] - radius, centre[1] + radius)
    ax.set_zlim(0, radius)
    ax.set_box_aspect((2, 2, 1))
    ax.set_title("charges on the plane, trajectories through the exact field")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_zlabel("z")

    ax2 = fig.add_subplot(1, 2, 2)
    azimuth = (np.arctan2(ends[:, 1], ends[:, 0]) + math.pi) / (2 * math.pi)
    bins = np.linspace(0, 1, 21)
    ax2.hist(
        azimuth,
        bins=bins,
        histtype="step",
        density=True,
        label=f"azimuth / 2pi (KS {_ks_uniform(azimuth):.3f})",
    )
    ax2.hist(
        ends[:, 2],
        bins=bins,
        histtype="step",
        density=True,
        label=f"height on S^2 (KS {_ks_uniform(ends[:, 2]):.3f})",
    )
    ax2.axhline(1.0, color="k", linestyle=":", linewidth=1, label="uniform hemisphere")
    ax2.set_ylim(0, 2)
    ax2.set_title(f"end points of {len(queries)} held-out points")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def _ks_uniform(a: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic of a sample against the uniform law on [0, 1]."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    n = len(a)
    i = np.arange(1, n + 1)
    return float(max((i / n - a).max(), (a - (i - 1) / n).max()))
