"""Training the field network: the epoch loop, the plateau rule and the weights' average.

Training (PFGM, `losses.py::get_loss_fn`): every iteration takes a large batch of clean points
(the charges), perturbs its first `small_batch` rows (poissonflow.learned.targets.pfgm_perturb),
computes the targets -sqrt(d) v~ / (||v~|| + gamma) of the large batch at the perturbed points
with the fused field kernel (poissonflow.learned.targets.field_targets) and takes one Adam step on

    loss = mean_i || n(x'_i, z_i) - target_i ||^2            (sum over the d + 1 outputs).

Batches are reshuffled every epoch (the blog's code did not shuffle); an incomplete last large
batch is dropped when the data hold more than one (its few charges would give a biased field),
so every epoch has floor(N / large_batch) iterations, or one when N <= large_batch. The preset
"blog-faithful" does what the blog's code does instead: the mean over the d + 1 outputs, fixed
batches in the data's order, the incomplete last one kept (loss, shuffle, drop_last).

One loop trains both ways: `Training.epoch` takes a step object that says what of each
iteration is this process's. `SingleProcess` does all of it; poissonflow.distributed.learned's
data-parallel step works on its rank's slice of every batch and sums over the ranks. Batches,
perturbations, optimiser, clipping and averaging are the loop's, so the two cannot drift apart.

Not reproduced from PFGM: its NCSN++ network, the 5000-iteration learning-rate warm-up, its
adaptive RK45 solver, and its substitution of the network's z output below z_exp (Appendix
B.2.3; measured on the toy: no better than the plain field with z_exp = 0.1 x the data norm,
worse when applied at every height).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .targets import field_targets, pfgm_perturb

__all__ = ["SingleProcess", "Training", "validation_set", "validation_loss", "epoch_bar"]


def _no_sync() -> None:
    return None


class SingleProcess:
    """What of each training iteration one process does, for `Training.epoch`: all of it.
    poissonflow.distributed.learned._DataParallel has the same methods (a test checks) and
    works on its rank's slice of every batch, summing over the ranks."""

    history_dtype = torch.float32  # the epoch's running loss sum

    def __init__(self, net: torch.nn.Module, backend: str):
        self.net = net
        self.backend = backend

    def batch_slice(self, x_pert, z, batch):
        """(queries, their heights, charges) this process works on: the whole small batch of
        perturbed points and the whole large batch."""
        return x_pert, z, batch

    def targets(self, x_pert, z, charges, gamma: float) -> torch.Tensor:
        """PFGM's targets at the queries from the field of the charges."""
        return field_targets(x_pert, z, charges, gamma, self.backend)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def loss(self, per_point: torch.Tensor, small: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to differentiate, its share of the epoch's loss sum) from this
        process's per-point losses, `small` being the global small batch's size."""
        loss = per_point.mean()
        return loss, loss.detach()

    def epoch_totals(
        self, loss_sum: torch.Tensor, wrong: torch.Tensor, per_epoch: int
    ) -> tuple[float, int]:
        """(mean loss per iteration, wrong-sign count) of the epoch."""
        return float(loss_sum) / per_epoch, int(wrong)


class Training:
    """One training run of the network `net` with the resolved settings `s`: Adam, the weights'
    moving average (when s["ema"] is not None), the seeded generator of the batches and
    perturbations, and the history (what LearnedField keeps as its fitted attributes):

        loss_history        mean loss per epoch
        wrong_sign_history  per epoch, perturbed points where the network's field pointed toward
                            the plane (n_z <= 0 away from the data: the log-z flow's guard)
        timing              seconds per epoch: "epoch" and its phases "data" (batch gather +
                            perturbation), "target" (field kernel), "network" (forward,
                            backward, Adam)
        n_iterations        optimiser steps taken
        val_loss_history    (epochs done, validation loss) of the plateau rule's evaluations
        plateau_epoch       the epoch the plateau rule stopped at, or None
    """

    def __init__(self, net: torch.nn.Module, s: dict[str, Any], seed: int, device):
        self.net, self.s = net, s
        self.opt = torch.optim.Adam(net.parameters(), lr=s["lr"])
        # the weights' moving average (ema), copied into the network at the end
        self.shadow = None if s["ema"] is None else [p.detach().clone() for p in net.parameters()]
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.loss_history: list[float] = []
        self.wrong_sign_history: list[int] = []
        self.timing: dict[str, list[float]] = {
            k: [] for k in ("epoch", "data", "target", "network")
        }
        self.n_iterations = 0
        self.val_loss_history: list[tuple[int, float]] = []
        self.plateau_epoch: int | None = None

    def run(
        self,
        X,
        step,
        epochs: int,
        *,
        validation=None,
        sync: Callable[[], None] = _no_sync,
        bar=None,
    ) -> None:
        """`epochs` epochs on X, or fewer when the plateau rule stops them: with a
        `validation` set (validation_set), the validation loss is evaluated every
        s["eval_every"] epochs and training stops when s["patience"] evaluations in a row
        failed to lower the best by 0.1%. `bar`: a tqdm bar advanced once an epoch."""
        s = self.s
        best, stale = math.inf, 0
        for epoch in range(epochs):
            loss = self.epoch(X, step, sync)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4g}")
                bar.update(1)
            if validation is not None and (epoch + 1) % s["eval_every"] == 0:
                val = validation_loss(self.net, validation, s["loss"])
                self.val_loss_history.append((epoch + 1, val))
                # the plateau rule: k evaluations in a row without a 0.1% improvement
                if val < best * (1.0 - 1e-3):
                    best, stale = val, 0
                else:
                    stale += 1
                if stale >= s["patience"]:
                    self.plateau_epoch = epoch + 1
                    break

    def epoch(self, X, step, sync: Callable[[], None] = _no_sync) -> float:
        """One pass over a fresh permutation of X (the data's order without shuffle); appends
        the epoch's mean loss, wrong-sign count and seconds per phase to the history and
        returns the mean loss. `step` (SingleProcess or the data-parallel one) says what of
        each iteration is this process's: its queries and charges, their targets, the forward
        pass, the loss and the epoch's totals. `sync` runs after each phase (CUDA
        synchronisation when profiling)."""
        s, gen = self.s, self.gen
        n, d = X.shape
        large, small = s["large_batch"], s["small_batch"]
        if s["drop_last"] or n <= large:
            per_epoch = max(1, n // large)
        else:  # torch's DataLoader default: the incomplete last batch is kept
            per_epoch = -(-n // large)
        clock = {"data": 0.0, "target": 0.0, "network": 0.0}
        loss_sum = torch.zeros((), dtype=step.history_dtype, device=X.device)
        wrong = torch.zeros((), dtype=torch.int64, device=X.device)
        t_epoch = time.perf_counter()
        perm = (
            torch.randperm(n, generator=gen, device=X.device)
            if s["shuffle"]
            else torch.arange(n, device=X.device)
        )
        for it in range(per_epoch):
            t0 = time.perf_counter()
            batch = X[perm[it * large : (it + 1) * large]]
            x_pert, z = pfgm_perturb(
                batch[:small], s["M"], s["sigma"], s["tau"], s["restrict_M"], gen
            )
            xq, zq, charges = step.batch_slice(x_pert, z, batch)
            sync()
            t1 = time.perf_counter()
            target = step.targets(xq, zq, charges, s["gamma"])
            sync()
            t2 = time.perf_counter()
            pred = step.forward(torch.cat([xq, zq[:, None]], dim=1))
            err = (pred - target) ** 2
            # "sum": PFGM's form; "mean": the blog's code (reduce_op = torch.mean over the
            # d + 1 outputs), the same minimiser with (d + 1) times smaller gradients, which
            # Adam's normalisation largely absorbs (docs/BLOG_FAITHFULNESS.md)
            loss, share = step.loss(
                err.sum(1) if s["loss"] == "sum" else err.mean(1), x_pert.shape[0]
            )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if s["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), s["grad_clip"])
            self.opt.step()
            self.n_iterations += 1
            if self.shadow is not None:
                self._update_average(s["ema"])
            loss_sum += share
            # n_z >= 0 toward the data is n_z <= 0 away from it: the log-z guard's condition
            wrong += (pred.detach()[:, d] >= 0).sum()
            sync()
            t3 = time.perf_counter()
            clock["data"] += t1 - t0
            clock["target"] += t2 - t1
            clock["network"] += t3 - t2
        loss_mean, wrong_count = step.epoch_totals(loss_sum, wrong, per_epoch)
        clock["epoch"] = time.perf_counter() - t_epoch
        self.loss_history.append(loss_mean)
        self.wrong_sign_history.append(wrong_count)
        for k, v in clock.items():
            self.timing[k].append(v)
        return loss_mean

    def _update_average(self, rate: float) -> None:
        """Exponential moving average of the weights with PFGM's warm-up (models/ema.py): the
        decay after k updates is min(rate, (1 + k) / (10 + k)), so a short run averages over
        roughly its last k / 9 iterations instead of keeping the initial weights."""
        k = self.n_iterations
        decay = min(rate, (1.0 + k) / (10.0 + k))
        with torch.no_grad():
            for avg, p in zip(self.shadow, self.net.parameters()):
                avg.lerp_(p, 1.0 - decay)

    def finish(self) -> None:
        """The fitted network: the moving average when there is one, frozen, in eval mode."""
        if self.shadow is not None:  # the field is the averaged network (PFGM samples with it)
            with torch.no_grad():
                for avg, p in zip(self.shadow, self.net.parameters()):
                    p.copy_(avg)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)


def validation_set(X, s: dict[str, Any], seed: int, backend: str):
    """(inputs (n, d + 1), targets) of the plateau rule's fixed validation set: 512 training
    features (or all, if fewer) perturbed once, targets from a fixed large batch. Drawn from a
    generator of its own, so that training's random stream is the same with and without the
    rule."""
    n = X.shape[0]
    gen = torch.Generator(device=X.device).manual_seed(seed + 7919)
    rows = X[torch.randperm(n, generator=gen, device=X.device)[: min(n, 512)]]
    charges = X[torch.randperm(n, generator=gen, device=X.device)[: s["large_batch"]]]
    x_pert, z = pfgm_perturb(rows, s["M"], s["sigma"], s["tau"], s["restrict_M"], gen)
    target = field_targets(x_pert, z, charges, s["gamma"], backend)
    return torch.cat([x_pert, z[:, None]], dim=1), target


def validation_loss(net: torch.nn.Module, validation, loss: str) -> float:
    """The loss ("sum" or "mean" over the d + 1 outputs) of `net` on a validation set."""
    inp, target = validation
    with torch.no_grad():
        err = (net(inp) - target) ** 2
        return float((err.sum(1) if loss == "sum" else err.mean(1)).mean())


def epoch_bar(total: int, enabled: bool):
    """A tqdm bar over the epochs, or None when not enabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="LearnedField", unit="epoch", leave=False)
