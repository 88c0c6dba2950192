"""Streaming forms of the metrics: accumulated over batches, synced over processes.

The contract is torchmetrics' (`update(...)` per batch, `compute()`, `reset()`), without the
dependency (docs/DESIGN.md, "Streaming metrics"): each metric keeps sufficient statistics in
float64, and `compute()` returns a 0-dim tensor (no autograd; `float(...)` or `.item()` to log
it), as torchmetrics does, equal to the one-shot metric of `poissonflow.metrics` on the
concatenation of every batch passed to `update` (on every rank, when synced).

Syncing: with torch.distributed initialised and `sync=True` (default), `compute()` is
collective (every rank of `process_group` calls it) and combines the ranks' states (an
all-reduce of the sums; an all-gather of the rows for `Uniformity`); the local state is left as
it was, so `update` may go on. `sync=False` computes on this rank's batches only.

| metric | one-shot form | state kept (memory) |
|---|---|---|
| `Alignment` | `align_loss` | a sum and a count: O(1) |
| `Uniformity` | `uniform_loss` | the rows themselves: O(N D) (no exact smaller statistic) |
| `WassersteinUniformity` | `wasserstein_uniformity` | sum and Gram of the unit rows: O(D^2) |
| `EffectiveRank` (`RankMe`) | `effective_rank` (`rankme`) | sum and Gram of the rows: O(D^2) |
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _checks
from . import as_features, check_pairs, l2_normalize, powered_norm, uniform_loss

__all__ = [
    "StreamingMetric",
    "Alignment",
    "Uniformity",
    "WassersteinUniformity",
    "EffectiveRank",
    "RankMe",
]


def _wire(group) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (and the others) move CPU tensors
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StreamingMetric:
    """The update / compute / reset contract with a sync over ranks.

    Args:
        sync: combine the states of every rank of `process_group` in `compute()` when
            torch.distributed is initialised (then `compute()` is collective).
        process_group: the process group (None: the default group).
    """

    def __init__(self, *, sync: bool = True, process_group: Any = None) -> None:
        self.sync = _checks.check_bool(sync, "sync")
        self.process_group = process_group
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen."""
        raise NotImplementedError

    def update(self, *args: Any) -> None:
        """Adds a batch."""
        raise NotImplementedError

    def compute(self) -> torch.Tensor:
        """The metric of every batch seen (on every rank when synced), a 0-dim tensor."""
        raise NotImplementedError

    def _synced(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized()

    def _all_reduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of the float64 tensors summed over the ranks (or themselves, unsynced)."""
        if not self._synced():
            return tensors
        group = self.process_group or dist.group.WORLD
        wire = _wire(group)
        flat = torch.cat([t.reshape(-1).to(wire) for t in tensors])
        dist.all_reduce(flat, group=group)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].reshape(t.shape).to(t.device))
            i += t.numel()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return f"sync={self.sync}"


def _as_batch(x: Any, name: str, min_rows: int = 0) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[0] == 0 and min_rows == 0:
        if x.shape[1] == 0 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float (N, D) batch with D >= 1")
        return x.detach()
    return as_features(x, name, min_rows=max(1, min_rows)).detach()


class _GramState(StreamingMetric):
    """Count, row sum (D) and Gram X^T X (D x D) of the rows (optionally L2-normalised), float64."""

    _normalize = False

    def reset(self) -> None:
        self._n = torch.zeros((), dtype=torch.float64)
        self._sum: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None

    def update(self, x: Any) -> None:
        """Adds the rows of x (N, D), N >= 0 (numpy or torch; detached).

        Args:
            x: a batch of features (N, D).
        """
        x = _as_batch(x, "x")
        z = x.to(torch.float64)
        if self._normalize and z.shape[0]:
            z = l2_normalize(z, "x")
        if self._sum is None:
            self._sum = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
            self._gram = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
            self._n = self._n.to(z.device)
        elif z.shape[1] != self._sum.shape[0]:
            raise ValueError(
                f"x has {z.shape[1]} columns; earlier batches had {self._sum.shape[0]}"
            )
        self._n = self._n + z.shape[0]
        self._sum = self._sum + z.sum(0).to(self._sum.device)
        self._gram = self._gram + (z.T @ z).to(self._gram.device)

    def _state(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        if self._sum is None:
            if self._synced():
                raise ValueError(
                    f"{type(self).__name__}.compute() before any update on this "
                    "rank: update every rank at least once (an empty (0, D) "
                    "batch will do)"
                )
            raise ValueError(f"{type(self).__name__}.compute() needs at least one update")
        n, s, g = self._all_reduce([self._n, self._sum, self._gram])
        return int(round(float(n))), s, g


class WassersteinUniformity(_GramState):
    """Streaming Wasserstein uniformity (Fang et al.): `poissonflow.metrics.wasserstein_uniformity`
    of all rows seen.

    State: the count, sum and Gram matrix of the L2-normalised rows, float64, O(D^2) memory
    (D^2 + D + 1 numbers, whatever the number of rows): the mean mu = sum / N and the biased
    covariance Sigma = Gram / N - mu mu^T are exactly what the metric uses. The one-shot form
    computes Sigma from centred rows; the two agree to float64 rounding of order D * eps64
    relative to the metric's terms (unit rows).

    Args:
        sync: see `StreamingMetric`.
        process_group: see `StreamingMetric`.
    """

    _normalize = True

    def compute(self) -> torch.Tensor:
        """W2 of every row seen (all ranks' when synced).

        Returns:
            The metric, a 0-dim float64 tensor.
        """
        n, s, g = self._state()
        if n < 2:
            raise ValueError(f"WassersteinUniformity needs at least 2 rows, got {n}")
        m = s.shape[0]
        mu = s / n
        sigma = g / n - torch.outer(mu, mu)
        sigma = 0.5 * (sigma + sigma.T)
        lam = torch.linalg.eigvalsh(sigma)
        tol = m * torch.finfo(torch.float64).eps
        trace_sqrt = torch.where(lam > tol, lam.clamp_min(0.0).sqrt(), 0.0).sum()
        w2_sq = (
            (mu * mu).sum() + 1.0 + torch.diagonal(sigma).sum() - 2.0 / math.sqrt(m) * trace_sqrt
        )
        eps = torch.finfo(torch.float64).eps
        return torch.where(w2_sq > eps, w2_sq.clamp_min(eps).sqrt(), 0.0)


class EffectiveRank(_GramState):
    """Streaming effective rank (Roy & Vetterli) or RankMe (Garrido et al.):
    `poissonflow.metrics.effective_rank` / `rankme` of all rows seen.

    State: the count, sum and Gram matrix X^T X of the rows (L2-normalised first with
    normalize=True), float64, O(D^2) memory. The singular values of the stacked rows are the
    square roots of the Gram matrix's eigenvalues (centred: of X^T X - N mu mu^T); eigenvalues
    below D * eps64 times the largest count as 0, and only the min(N, D) largest are kept, as
    the one-shot SVD has min(N, D) values. Squaring loses relative precision on singular values
    below about 1e-8 of the largest, which moves the entropy by about 1e-7 at most.

    Args:
        eps: None for the effective rank; RankMe's constant (1e-7 in the paper) otherwise.
        center: subtract the mean of all rows first.
        normalize: L2-normalise each row first.
        sync: see `StreamingMetric`.
        process_group: see `StreamingMetric`.
    """

    def __init__(
        self,
        *,
        eps: float | None = None,
        center: bool = False,
        normalize: bool = False,
        sync: bool = True,
        process_group: Any = None,
    ) -> None:
        self.eps = None if eps is None else _checks.check_scalar(eps, "eps", minimum=0.0)
        self.center = _checks.check_bool(center, "center")
        self._normalize = _checks.check_bool(normalize, "normalize")
        super().__init__(sync=sync, process_group=process_group)

    def compute(self) -> torch.Tensor:
        """The effective rank (or RankMe) of every row seen (all ranks' when synced).

        Returns:
            The metric, a 0-dim float64 tensor.
        """
        n, s, g = self._state()
        if n < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 rows, got {n}")
        if self.center:
            g = g - torch.outer(s, s) / n
        g = 0.5 * (g + g.T)
        lam = torch.linalg.eigvalsh(g).flip(0)[: min(n, g.shape[0])]
        lam = torch.where(lam > g.shape[0] * torch.finfo(torch.float64).eps * lam[0], lam, 0.0)
        sv = lam.sqrt()
        total = sv.sum()
        if not float(total) > 0.0:
            raise ValueError("the rows have no non-zero singular value (all zero after centering)")
        p = sv / total
        if self.eps is not None:
            p = p + self.eps
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
        return torch.exp(-plogp.sum())

    def _describe(self) -> str:
        return (
            f"eps={self.eps}, center={self.center}, normalize={self._normalize}, sync={self.sync}"
        )


class RankMe(EffectiveRank):
    """RankMe of Garrido et al. (ICML 2023), streamed: `EffectiveRank` with eps = 1e-7 by
    default (`poissonflow.metrics.rankme`).

    Args:
        eps: the constant added to the normalised singular values.
        center: subtract the mean of all rows first.
        normalize: L2-normalise each row first.
        sync: see `StreamingMetric`.
        process_group: see `StreamingMetric`.
    """

    def __init__(
        self,
        *,
        eps: float = 1e-7,
        center: bool = False,
        normalize: bool = False,
        sync: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            eps=eps, center=center, normalize=normalize, sync=sync, process_group=process_group
        )


class Alignment(StreamingMetric):
    """Streaming alignment (Wang & Isola): `poissonflow.metrics.align_loss` of all pairs seen,
    the mean of ||x_i - y_i||^alpha.

    State: the sum (float64) and the count: O(1) memory. Exact.

    Args:
        alpha: the exponent, > 0.
        normalize: L2-normalise both views first (the one-shot form takes them as given).
        sync: see `StreamingMetric`.
        process_group: see `StreamingMetric`.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        *,
        normalize: bool = False,
        sync: bool = True,
        process_group: Any = None,
    ) -> None:
        self.alpha = _checks.check_scalar(alpha, "alpha", minimum=0.0, allow_equal=False)
        self.normalize = _checks.check_bool(normalize, "normalize")
        super().__init__(sync=sync, process_group=process_group)

    def reset(self) -> None:
        """Forgets every pair seen."""
        self._stats = torch.zeros(2, dtype=torch.float64)  # sum, count

    def update(self, x: Any, y: Any) -> None:
        """Adds the pairs (x_i, y_i) of two views x, y (N, D), N >= 0.

        Args:
            x: first view (N, D).
            y: second view (N, D).
        """
        x, y = _as_batch(x, "x"), _as_batch(y, "y")
        check_pairs(x, y)
        if x.shape[0] == 0:
            return
        x, y = x.to(torch.float64), y.to(torch.float64)
        if self.normalize:
            x, y = l2_normalize(x, "x"), l2_normalize(y, "y")
        total = powered_norm(x - y, self.alpha).sum().cpu()
        self._stats = self._stats + torch.stack([total, total.new_tensor(x.shape[0])])

    def compute(self) -> torch.Tensor:
        """The mean of ||x_i - y_i||^alpha over every pair seen (all ranks' when synced).

        Returns:
            The metric, a 0-dim float64 tensor.
        """
        (stats,) = self._all_reduce([self._stats])
        if not float(stats[1]) > 0:
            raise ValueError("Alignment.compute() needs at least one pair")
        return stats[0] / stats[1]

    def _describe(self) -> str:
        return f"alpha={self.alpha}, normalize={self.normalize}, sync={self.sync}"


class Uniformity(StreamingMetric):
    """Streaming uniformity (Wang & Isola): `poissonflow.metrics.uniform_loss` of all rows seen,
    log of the mean of exp(-t ||x_i - x_j||^2) over distinct pairs.

    The mean runs over all pairs of the epoch, and the Gaussian kernel has no finite-dimensional
    exact statistic (its feature space is infinite-dimensional), so the state is the rows
    themselves: O(N D) memory (a copy in x's dtype; 50,000 rows of 128 float32 features are
    26 MB), never an N x N matrix. `compute()` scores the pairs in blocks of at most 2**22
    entries (`uniform_loss`, O(N^2 D) time); synced, it all-gathers the rows first, so each
    rank holds all N rows for the computation. Exact.

    Args:
        t: the temperature, > 0.
        normalize: L2-normalise the rows first (the one-shot form takes them as given).
        sync: see `StreamingMetric`.
        process_group: see `StreamingMetric`.
    """

    def __init__(
        self,
        t: float = 2.0,
        *,
        normalize: bool = False,
        sync: bool = True,
        process_group: Any = None,
    ) -> None:
        self.t = _checks.check_scalar(t, "t", minimum=0.0, allow_equal=False)
        self.normalize = _checks.check_bool(normalize, "normalize")
        super().__init__(sync=sync, process_group=process_group)

    def reset(self) -> None:
        """Forgets every row seen."""
        self._rows: list[torch.Tensor] = []

    def update(self, x: Any) -> None:
        """Adds the rows of x (N, D), N >= 0 (a detached copy is kept).

        Args:
            x: a batch of features (N, D).
        """
        x = _as_batch(x, "x")
        if self.normalize and x.shape[0]:
            x = l2_normalize(x, "x")
        if self._rows and (
            x.shape[1] != self._rows[0].shape[1]
            or x.dtype != self._rows[0].dtype
            or x.device != self._rows[0].device
        ):
            first = self._rows[0]
            raise ValueError(
                f"x ({x.shape[1]} columns, {x.dtype}, {x.device}) must match the "
                f"earlier batches ({first.shape[1]}, {first.dtype}, {first.device})"
            )
        self._rows.append(x.clone())

    def compute(self) -> torch.Tensor:
        """The uniformity of every row seen (all ranks' when synced).

        Returns:
            The metric, a 0-dim tensor in the rows' dtype (as `uniform_loss`).
        """
        rows = torch.cat(self._rows) if self._rows else None
        if self._synced():
            rows = self._gather(rows)
        if rows is None or rows.shape[0] < 2:
            raise ValueError("Uniformity.compute() needs at least 2 rows")
        with torch.no_grad():
            return uniform_loss(rows, self.t)

    def _gather(self, rows: torch.Tensor | None) -> torch.Tensor:
        group = self.process_group or dist.group.WORLD
        wire = _wire(group)
        world = dist.get_world_size(group)
        d = -1 if rows is None else rows.shape[1]
        meta = torch.tensor(
            [0 if rows is None else rows.shape[0], d], dtype=torch.int64, device=wire
        )
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        sizes = [int(m[0]) for m in metas]
        dims = {int(m[1]) for m in metas if int(m[1]) >= 0}
        if not dims:
            return None
        if len(dims) > 1:
            raise ValueError(f"the ranks' rows have different dimensions: {sorted(dims)}")
        dim = dims.pop()
        dtype = torch.float64 if rows is None else rows.dtype
        most = max(sizes)
        pad = torch.zeros(most, dim, dtype=torch.float64, device=wire)
        if rows is not None:
            pad[: rows.shape[0]] = rows.to(wire, torch.float64)
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        out = torch.cat([p[:k] for p, k in zip(parts, sizes)])
        device = torch.device("cpu") if rows is None else rows.device
        return out.to(device, dtype)

    def _describe(self) -> str:
        return f"t={self.t}, normalize={self.normalize}, sync={self.sync}"
