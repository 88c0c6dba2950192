"""The study's one training loop: Adam steps over seeded permutations of the training images,
with what a step computes (the objective) as a parameter. The supervised encoder
(`encoder.train_encoder`: cross-entropy through a linear head) and the self-supervised ones
(`ssl.train_ssl`: two augmented views and an `ssl` objective) each pass a `Task`.

Per epoch: model.train(), a permutation of the N images from `generator` (or their order, with
shuffle=False), batches of `batch_size` in that order, a last batch of one image skipped
(BatchNorm needs two); per batch: task.loss(idx), zero_grad, backward, step,
task.after_step(idx, loss). The random draws are the permutation's (here) and whatever
task.loss draws from the same generator, in that order, so a task reproduces a loop written
out by hand bit for bit.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

__all__ = ["Task", "train_loop"]


class Task(Protocol):
    def start_epoch(self) -> None: ...

    def loss(self, idx: torch.Tensor) -> torch.Tensor: ...

    def after_step(self, idx: torch.Tensor, loss: torch.Tensor) -> None: ...

    def end_epoch(self, seconds: float) -> None: ...


def train_loop(
    model: torch.nn.Module,
    task: Task,
    *,
    n: int,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    shuffle: bool = True,
    order_device=None,
    bar=None,
) -> None:
    """Trains `model` in place (module docstring); `bar`: a tqdm bar advanced once a batch."""
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if order_device is not None:
            order = order.to(order_device)
        task.start_epoch()
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if bar is not None:
                bar.update(1)
            if idx.numel() < 2:
                continue
            loss = task.loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            task.after_step(idx, loss)
        task.end_epoch(time.perf_counter() - t0)
