"""The process-group plumbing of poissonflow.distributed: the group check, the per-call layout
(every rank's shard sizes and weight sums, exchanged once), gathers of uneven shards and the
ring of overlapped point-to-point transfers (docs/DESIGN.md, "Sharding the field over processes").

Everything goes through torch.distributed (NCCL for CUDA tensors, gloo for CPU tensors); no
communication of its own. Every function here is collective: all ranks of the group call it in
the same order with consistent arguments, or the group blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["get_group", "Layout", "exchange", "gather_rows", "ring", "ring_with_accumulators"]


def get_group(group=None):
    """The process group to use (None: the default group), or a clear error when there is none."""
    if not dist.is_available():
        raise RuntimeError(
            "poissonflow.distributed needs torch.distributed, which this PyTorch "
            "build does not provide"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "poissonflow.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group('gloo') (CPU tensors) or "
            "init_process_group('nccl') (CUDA tensors) on every rank first, e.g. in a script "
            "launched with torchrun; on one process use poissonflow.poisson_field / "
            "poissonflow.transform instead"
        )
    return dist.group.WORLD if group is None else group


def wire_device(group, device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (and others) move CPU tensors.
    if "nccl" in str(dist.get_backend(group)).lower():
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Layout:
    """Every rank's shard: queries n[r], charges b[r] (rows of the global, rank-major charge
    order from offset[r]) and weight sum wsum[r] (float64; b[r] when there are no weights)."""

    rank: int
    world: int
    n: tuple[int, ...]
    b: tuple[int, ...]
    wsum: tuple[float, ...]
    peers: tuple[int, ...]  # global rank of each group rank (point-to-point addresses)

    @property
    def offset(self) -> tuple[int, ...]:
        out, s = [], 0
        for k in self.b:
            out.append(s)
            s += k
        return tuple(out)

    @property
    def total_b(self) -> int:
        return sum(self.b)

    @property
    def total_w(self) -> float:
        # summed in rank order, so every rank holds the same bits
        s = 0.0
        for w in self.wsum:
            s += w
        return s

    @property
    def log_total_w(self) -> float:
        return math.log(self.total_w)


def exchange(group, device: torch.device, record: dict) -> list[dict]:
    """Every rank's `record` (a small dict of Python values), in rank order."""
    out: list = [None] * dist.get_world_size(group)
    if "nccl" in str(dist.get_backend(group)).lower() and device.type == "cuda":
        torch.cuda.set_device(device)
    dist.all_gather_object(out, record, group=group)
    return out


def check_together(group, device: torch.device, checks):
    """Runs `checks()` (this rank's argument checks) and returns its result; a TypeError or
    ValueError on any rank is raised on every rank, so that no rank is left waiting in the
    next collective for one that has stopped."""
    try:
        out, err = checks(), None
    except (TypeError, ValueError) as e:
        out, err = None, e
    recs = exchange(
        group, device, {"error": None if err is None else f"{type(err).__name__}: {err}"}
    )
    if err is not None:
        raise err
    bad = [(k, r["error"]) for k, r in enumerate(recs) if r["error"]]
    if bad:
        k, msg = bad[0]
        raise ValueError(f"rank {k} of the process group got invalid arguments ({msg})")
    return out


def make_layout(group, n: list[int], b: list[int], wsum: list[float]) -> Layout:
    world = dist.get_world_size(group)
    peers = tuple(
        dist.get_global_rank(group, k) if group is not dist.group.WORLD else k for k in range(world)
    )
    return Layout(
        rank=dist.get_rank(group),
        world=world,
        n=tuple(n),
        b=tuple(b),
        wsum=tuple(float(w) for w in wsum),
        peers=peers,
    )


def gather_rows(t: torch.Tensor, rows: tuple[int, ...], group) -> torch.Tensor:
    """The rank-major concatenation of every rank's `t` (rows[r] rows each, same trailing
    shape) on every rank: one all_gather of shards padded to the largest."""
    world = len(rows)
    if world == 1:
        return t
    most = max(rows)
    pad = t.new_zeros((most,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad.contiguous(), group=group)
    return torch.cat([p[:k] for p, k in zip(parts, rows)])


def _p2p(ops):
    ops = [op for op in ops if op is not None]
    return dist.batch_isend_irecv(ops) if ops else []


def _send(t, peer, group, tag):
    return dist.P2POp(dist.isend, t, peer, group, tag) if t.numel() else None


def _recv(t, peer, group, tag):
    return dist.P2POp(dist.irecv, t, peer, group, tag) if t.numel() else None


def ring(own: torch.Tensor, layout: Layout, group) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (s, shard s) for s = r, r - 1, ..., r + 1 (mod R): every rank's `own` (b[s] rows
    of equal width) travels once around the ring. While the caller computes on shard s, it is
    already being sent to rank r + 1 and shard s - 1 received from rank r - 1, so at most two
    shards are held and the transfer overlaps the compute. The caller must not modify a
    yielded shard (it may still be in flight)."""
    R, r = layout.world, layout.rank
    nxt, prv = layout.peers[(r + 1) % R], layout.peers[(r - 1) % R]
    cur, s = own, r
    for k in range(R):
        reqs, incoming, sn = [], None, (s - 1) % R
        if k < R - 1:
            incoming = own.new_empty((layout.b[sn],) + tuple(own.shape[1:]))
            reqs = _p2p([_send(cur, nxt, group, 0), _recv(incoming, prv, group, 0)])
        yield s, cur
        for q in reqs:
            q.wait()
        if k < R - 1:
            cur, s = incoming, sn


def ring_with_accumulators(
    own: torch.Tensor, acc_width: int, layout: Layout, group, compute
) -> torch.Tensor:
    """Ring-attention style backward: shard s travels as in `ring`, and with it an accumulator
    (b[s] x acc_width, float64) to which every rank adds compute(s, shard) ((b[s], acc_width)
    or None for no contribution). After R - 1 hops and one final hop of the accumulator alone,
    every rank holds its own shard's accumulator, summed in the fixed order s, s + 1, ..., s - 1
    of the ranks that added to it (so the result is bit-identical run to run). Returns it."""
    R, r = layout.world, layout.rank
    nxt, prv = layout.peers[(r + 1) % R], layout.peers[(r - 1) % R]
    cur, s = own, r
    acc_out = None  # the accumulator finished in the previous step, to send on
    for k in range(R):
        sn = (s - 1) % R
        ops = []
        incoming = None
        if k < R - 1:
            incoming = own.new_empty((layout.b[sn],) + tuple(own.shape[1:]))
            ops += [_send(cur, nxt, group, 0), _recv(incoming, prv, group, 0)]
        acc_in = None
        if k > 0:
            # the accumulator of shard s, finished by rank r - 1 in its previous step
            acc_in = torch.empty((layout.b[s], acc_width), dtype=torch.float64, device=own.device)
            ops += [_send(acc_out, nxt, group, 1), _recv(acc_in, prv, group, 1)]
        reqs = _p2p(ops)
        part = compute(s, cur)
        for q in reqs:
            q.wait()
        if part is None:
            part = torch.zeros((layout.b[s], acc_width), dtype=torch.float64, device=own.device)
        acc_out = part if acc_in is None else acc_in + part
        if k < R - 1:
            cur, s = incoming, sn
    if R == 1:
        return acc_out
    # the last accumulator belongs to rank r + 1; ours arrives from rank r - 1
    mine = torch.empty((layout.b[r], acc_width), dtype=torch.float64, device=own.device)
    for q in _p2p([_send(acc_out, nxt, group, 1), _recv(mine, prv, group, 1)]):
        q.wait()
    return mine


def end_process_group(group: dist.ProcessGroup | None = None) -> None:
    """End a distributed script: a barrier of every rank, then the group torn down.

    gloo's worker threads outlive `torch.distributed.destroy_process_group`, and a worker that
    releases the last finished collective after the interpreter has begun to exit aborts the
    process ("terminate called without an active exception", SIGABRT) once the script's work is
    done: in 2-3 runs in 40 of a two-process script under gdb. So the barrier's work is held here
    until its worker has moved on (it releases it microseconds after the barrier ends) and is
    released on this thread, with Python still running: 0 aborts in 45 runs.

    Args:
        group: the process group to end (`None`: the default group, and with it every group).
    """
    done = dist.barrier(group=group, async_op=True)
    done.wait()
    dist.destroy_process_group(group)
    time.sleep(0.05)
    del done
