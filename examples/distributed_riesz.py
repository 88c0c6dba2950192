"""The Riesz loss over processes: each rank holds a shard of the batch and its own bank.

    torchrun --nproc-per-node 2 examples/distributed_riesz.py [--quick]

`RieszLoss(..., gather_distributed=True)` takes the global batch and the union of the ranks'
banks through poissonflow.distributed, without gathering the banks: every rank gets the same
loss, and each rank's backward the exact gradient in its own rows. The script checks that
against one process on the concatenated data (value and gradients), then trains a small encoder
for a few steps under DistributedDataParallel. gloo on CPUs; nccl when each rank has a GPU.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from poissonflow.distributed import end_process_group
from poissonflow.losses import RieszLoss, riesz_uniformity_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run for CI (seconds)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-per-rank", type=int, default=256)
    parser.add_argument("--bank-size", type=int, default=4096, help="bank rows per rank")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        args.dim, args.batch_per_rank, args.bank_size, args.steps = 16, 32, 128, 3
    if "RANK" not in os.environ:
        raise SystemExit("run me under torchrun: torchrun --nproc-per-node 2 " + __file__)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # 1. the distributed loss equals one process on the concatenated batch (float64)
    torch.manual_seed(rank)
    x = torch.randn(
        args.batch_per_rank + rank,
        args.dim,
        dtype=torch.float64,  # ragged shards
        requires_grad=True,
    )
    loss = RieszLoss(s=2.0, bank_size=args.bank_size, gather_distributed=True)(x)
    loss.backward()
    shards = [None] * world
    dist.all_gather_object(shards, x.detach())
    full = torch.cat(shards).requires_grad_(True)
    reference = riesz_uniformity_loss(full, 2.0)
    reference.backward()
    offset = sum(len(s) for s in shards[:rank])
    grad_error = (x.grad - full.grad[offset : offset + len(x)]).abs().max().item()
    assert abs(loss.item() - reference.item()) < 1e-10 and grad_error < 1e-10
    if rank == 0:
        print(
            f"{world} ranks: loss {loss.item():.6f}, equal to one process on the concatenated "
            f"batch ({reference.item():.6f}); largest gradient difference {grad_error:.1e}"
        )

    # 2. training: each rank its own shard of the data and its own bank shard. DDP averages the
    # ranks' parameter gradients, so a step follows the global loss's gradient / world size.
    encoder = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, args.dim))
    riesz = RieszLoss(s=2.0, bank_size=args.bank_size, gather_distributed=True)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    for step in range(args.steps):
        loss = riesz(encoder(torch.randn(args.batch_per_rank, 64)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step + 1}: global Riesz loss {loss.item():.4f}")
    end_process_group()  # a barrier, then the group torn down (and a clean exit)


if __name__ == "__main__":
    main()
