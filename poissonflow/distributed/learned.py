"""`fit_learned_field`: train a `poissonflow.LearnedField` under torchrun, data-parallel over
the small batches (docs/DESIGN.md sections 4 and 10).

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

Bit-identity with one process is not guaranteed: DDP sums the gradient as per-rank partial
sums reduced over the ranks, one process in one pass over the batch, so the gradients may differ
in the last bits of float32, and Adam carries such differences forward (normalised, so they stay
at rounding level in a short run). tests/test_distributed_learned.py bounds them at 1e-5 of each
weight tensor; in its tiny case (2 ranks, 8 iterations) the weights came out bit-identical and
the loss history, averaged here in float64, within 6e-8. The training loop mirrors
`LearnedField._train_epoch` step by step; the test compares the two, so a change to one without
the other fails there.
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
    from ..pfgm import pfgm_perturb

    grp = _comm.get_group(group)
    field = LearnedField(**params)
    x_local = torch.as_tensor(features).detach()
    rows = [None] * dist.get_world_size(grp)
    dist.all_gather_object(rows, int(x_local.shape[0]), group=grp)
    X = _comm.gather_rows(x_local.to(torch.float32).cpu(), tuple(rows), grp)
    field.fit(X, train=False)  # settings, centre, the seeded initial network: as one process
    X = X.to(next(field.net_.parameters()).device)
    s = field.settings_
    R, rank = dist.get_world_size(grp), dist.get_rank(grp)
    net = field.net_
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    ddp = torch.nn.parallel.DistributedDataParallel(net, process_group=grp)
    opt = torch.optim.Adam(net.parameters(), lr=s["lr"])
    shadow = None if s["ema"] is None else [p.detach().clone() for p in net.parameters()]
    gen = torch.Generator(device=X.device).manual_seed(int(field.seed))
    field.loss_history_, field.wrong_sign_history_ = [], []
    field.n_iterations_ = 0
    t_fit = time.perf_counter()
    for _ in range(s["epochs"]):
        loss, wrong = _epoch(field, ddp, X, s, opt, shadow, gen, grp, R, rank, pfgm_perturb)
        field.loss_history_.append(loss)
        field.wrong_sign_history_.append(wrong)
    field.fit_seconds_ = time.perf_counter() - t_fit
    if shadow is not None:  # the field is the averaged network, as in LearnedField.fit
        with torch.no_grad():
            for avg, p in zip(shadow, net.parameters()):
                p.copy_(avg)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    field.net_ = net
    if checkpoint is not None and rank == 0:
        field.save(checkpoint)
    dist.barrier(group=grp)
    return field


def _slice(n, R, rank):
    sizes = [len(c) for c in torch.arange(n).tensor_split(R)]
    o = sum(sizes[:rank])
    return o, o + sizes[rank]


def _epoch(field, ddp, X, s, opt, shadow, gen, grp, R, rank, pfgm_perturb):
    """One epoch as LearnedField._train_epoch, the small batch's slices across the ranks."""
    n, d = X.shape
    large, small = s["large_batch"], s["small_batch"]
    if s["drop_last"] or n <= large:
        per_epoch = max(1, n // large)
    else:
        per_epoch = -(-n // large)
    perm = (torch.randperm(n, generator=gen, device=X.device) if s["shuffle"]
            else torch.arange(n, device=X.device))
    stats = torch.zeros(2, dtype=torch.float64, device=X.device)  # loss sum, wrong count
    for it in range(per_epoch):
        batch = X[perm[it * large:(it + 1) * large]]
        x_pert, z = pfgm_perturb(batch[:small], s["M"], s["sigma"], s["tau"], s["restrict_M"],
                                 gen)
        q0, q1 = _slice(x_pert.shape[0], R, rank)
        c0, c1 = _slice(batch.shape[0], R, rank)
        xq, zq = x_pert[q0:q1], z[q0:q1]
        # the targets of pfgm.field_targets, from the field of the global large batch
        plan = plan_field(xq, batch[c0:c1], None, float(d + 1), 0.0, None, grp, "allgather",
                          field.backend, grad=False)
        with torch.no_grad():
            v, _ = field_with_plan(plan, xq, batch[c0:c1], None, None, eps_rows=zq)
            full = torch.cat([v, zq[:, None].to(v.dtype)], dim=1)
            target = full * (-math.sqrt(d) / (full.norm(dim=1, keepdim=True) + s["gamma"]))
        pred = ddp(torch.cat([xq, zq[:, None]], dim=1))
        err = (pred - target) ** 2
        per_point = err.sum(1) if s["loss"] == "sum" else err.mean(1)
        # DDP averages over the R ranks: R / S times the local sum is the global mean's gradient
        loss = per_point.sum() * (R / x_pert.shape[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(ddp.module.parameters(), s["grad_clip"])
        opt.step()
        field.n_iterations_ += 1
        if shadow is not None:
            field._update_average(shadow, s["ema"])
        stats[0] += per_point.detach().sum().double() / x_pert.shape[0]
        stats[1] += float((pred.detach()[:, d] >= 0).sum())
    wire = stats.to(_comm.wire_device(grp, stats.device))
    dist.all_reduce(wire, group=grp)
    return float(wire[0]) / per_epoch, int(wire[1])
