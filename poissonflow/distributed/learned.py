"""`fit_learned_field`: train a `poissonflow.LearnedField` under torchrun, data-parallel over
the small batches (docs/DESIGN.md, "The learned field" and "Sharding the field over processes").

    field = poissonflow.distributed.fit_learned_field(features_local, checkpoint="f.pt",
                                                      epochs=50)   # every rank, same kwargs

How it divides the work, and why the result matches one process:

* The training features are all-gathered once (they are small: 50000 x 128 float32 is 25 MB).
  Every rank then resolves the settings, the centre and the seeded initial network exactly as
  one process does (`LearnedField.fit(X, train=False)`), and replays the same seeded stream of
  permutations and perturbations, so every iteration sees the same large batch and the same
  perturbed small batch as one process would.
* Rank r owns slice r of each large batch (its charges) and slice r of the small batch (its
  queries): the field targets come from `poissonflow.distributed`'s field of the global large
  batch at the local perturbed points (mode "allgather": the same kernel call on the same
  charges as one process, so the targets are the same bits), and the network's forward and
  backward run on the local slice inside DistributedDataParallel, with the local loss scaled
  by R / small_batch so that DDP's average over ranks is the one-process gradient of the mean.
* The optimiser step, gradient clipping and the weights' moving average then run identically
  on every rank; rank 0 writes the checkpoint (`LearnedField.save`).

The epoch is poissonflow.learned.training's `Training.epoch` itself: this module passes it
`_DataParallel`, which replaces the single process's step (`training.SingleProcess`) in what
differs: the rank's slice of the batch, the targets from the distributed field, the DDP forward,
the loss's scale and the epoch's totals summed over the ranks. Batches, perturbations, optimiser,
clipping and averaging are the one loop's, so the two paths cannot drift apart.

Bit-identity with one process is not guaranteed: DDP sums the gradient as per-rank partial
sums reduced over the ranks, one process in one pass over the batch, so the gradients may differ
in the last bits of float32, and Adam carries such differences forward (normalised, so they stay
at rounding level in a short run). tests/test_distributed_learned.py bounds them at 1e-5 of each
weight tensor; in its tiny case (2 ranks, 8 iterations) the weights came out bit-identical and
the loss history, averaged here in float64, within 6e-8.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from . import _comm
from .field import field_with_plan, plan_field

__all__ = ["fit_learned_field"]


def fit_learned_field(features, *, group=None, checkpoint=None, **params):
    """A LearnedField(**params) trained on the union of every rank's `features` (N_r, d),
    the same fitted field on every rank (see the module docstring); rank 0 saves it to
    `checkpoint` when given. Collective: every rank calls it with the same params. The loss
    history is that of the global small batches."""
    from ..learned import LearnedField
    from ..learned.training import Training

    grp = _comm.get_group(group)
    field = LearnedField(**params)
    x_local = torch.as_tensor(features).detach()
    rows = [None] * dist.get_world_size(grp)
    dist.all_gather_object(rows, int(x_local.shape[0]), group=grp)
    X = _comm.gather_rows(x_local.to(torch.float32).cpu(), tuple(rows), grp)
    field.fit(X, train=False)  # settings, centre, the seeded initial network: as one process
    X = X.to(next(field.net_.parameters()).device)
    s = field.settings_
    net = field.net_
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    ddp = torch.nn.parallel.DistributedDataParallel(net, process_group=grp)
    run = Training(net, s, int(field.seed), X.device)
    step = _DataParallel(ddp, field.backend, grp)
    t_fit = time.perf_counter()
    run.run(X, step, s["epochs"])
    seconds = time.perf_counter() - t_fit
    run.finish()  # the averaged network, frozen, as in LearnedField.fit
    field._record_training(run, seconds)
    if checkpoint is not None and dist.get_rank(grp) == 0:
        field.save(checkpoint)
    dist.barrier(group=grp)
    return field


def _slice(n, R, rank):
    sizes = [len(c) for c in torch.arange(n).tensor_split(R)]
    o = sum(sizes[:rank])
    return o, o + sizes[rank]


class _DataParallel:
    """Training.epoch's step (the methods of poissonflow.learned.training.SingleProcess, not
    subclassed so that importing this package does not import scikit-learn) with the small
    batch's slices across the ranks: rank r takes slice r of the perturbed points and of the
    large batch (its charges), the targets come from the field of the global large batch, the
    forward runs in DDP (which averages the gradients over the ranks in backward), and the
    epoch's loss and wrong-sign count are summed over the ranks."""

    history_dtype = torch.float64  # the loss history is averaged in float64

    def __init__(self, ddp, backend: str, group):
        self.net, self.backend, self.group = ddp, backend, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def batch_slice(self, x_pert, z, batch):
        q0, q1 = _slice(x_pert.shape[0], self.world, self.rank)
        c0, c1 = _slice(batch.shape[0], self.world, self.rank)
        return x_pert[q0:q1], z[q0:q1], batch[c0:c1]

    def targets(self, x_pert, z, charges, gamma):
        # the targets of learned.targets.field_targets, from the field of the global large batch
        d = x_pert.shape[1]
        plan = plan_field(
            x_pert,
            charges,
            None,
            float(d + 1),
            0.0,
            None,
            self.group,
            "allgather",
            self.backend,
            grad=False,
        )
        with torch.no_grad():
            v, _ = field_with_plan(plan, x_pert, charges, None, None, eps_rows=z)
            full = torch.cat([v, z[:, None].to(v.dtype)], dim=1)
            return full * (-math.sqrt(d) / (full.norm(dim=1, keepdim=True) + gamma))

    def forward(self, inputs):
        return self.net(inputs)

    def loss(self, per_point, small):
        # DDP averages over the R ranks: R / S times the local sum is the global mean's gradient
        loss = per_point.sum() * (self.world / small)
        return loss, per_point.detach().sum().double() / small

    def epoch_totals(self, loss_sum, wrong, per_epoch):
        stats = torch.stack([loss_sum, wrong.to(torch.float64)])
        wire = stats.to(_comm.wire_device(self.group, stats.device))
        dist.all_reduce(wire, group=self.group)
        return float(wire[0]) / per_epoch, int(wire[1])
