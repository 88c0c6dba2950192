"""Coincident rows of the Riesz loss: rows of the batch equal to each other or to a bank row.

The Riesz energy is an energy between distinct points: r^(-s) is infinite at r = 0 (the field
kernel floors it at the dtype's smallest normal number, where it swamps every other pair and its
gradient vanishes). Rows that coincide exactly (equal after the L2 normalisation, e.g. a sample
drawn twice, or a batch already pushed into the bank) are one point: their pairs are left out
like a row's own pair, and the pair count shrinks accordingly (docs/DESIGN.md, "Coincident rows
in the Riesz loss").

Found without any N x N or N x K buffer: the batch's distinct rows by `torch.unique` over its
N rows; bank rows equal to one of them by an exact 31-bit modular hash of the bits of every row
(computed in chunks), confirmed row by row on the few candidates. Expressed to the field op as
weights and `exclude`: a group of c equal batch rows is one charge of weight c (its first row;
the other copies weigh 0) that each copy excludes; m bank rows equal to a batch group are one
bank charge of weight m that the group's rows exclude.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_PRIME = 2147483647  # 2^31 - 1
_CHUNK = 1024  # bank rows hashed at once (a few MB of int64 temporaries)


def _multipliers(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20261206)
    a = torch.randint(1, _PRIME, (d,), generator=g, dtype=torch.int64)
    b = torch.randint(1, _PRIME, (d,), generator=g, dtype=torch.int64)
    return a.to(device), b.to(device)


def row_keys(u: torch.Tensor) -> torch.Tensor:
    """An int64 key per row of u (M, D): equal rows (as values; -0.0 counts as 0.0) get equal
    keys. Exact integer arithmetic on the rows' bits (no rounding, so the key does not depend on
    the row's position), in chunks of 8192 rows."""
    m, d = u.shape
    a, b = _multipliers(d, u.device)
    width = u.element_size()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    out = torch.empty(m, dtype=torch.int64, device=u.device)
    for i0 in range(0, m, _CHUNK):
        bits = (u[i0 : i0 + _CHUNK] + 0.0).contiguous().view(ints).to(torch.int64)
        if width < 8:
            lo = bits & ((1 << (8 * width)) - 1)
            out[i0 : i0 + _CHUNK] = ((lo * a) % _PRIME).sum(1)
        else:
            lo = bits & 0xFFFFFFFF
            hi = (bits >> 32) & 0xFFFFFFFF
            out[i0 : i0 + _CHUNK] = ((lo * a) % _PRIME + (hi * b) % _PRIME).sum(1)
    return out


@dataclass
class Coincidences:
    """The coincident rows of a global batch (N rows, rank-major) and bank (K rows).

    group: (N,) the distinct-row group of every batch row; count: (G,) rows per group; rep:
    (G,) global index of each group's first row; bank_count: (G,) bank rows equal to the group
    (over all ranks); bank_rep: (G,) global bank index of the first of them, or -1;
    bank_group: (K_r,) the group of each local bank row, or -1.
    """

    group: torch.Tensor
    count: torch.Tensor
    rep: torch.Tensor
    bank_count: torch.Tensor
    bank_rep: torch.Tensor
    bank_group: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.count.shape[0])

    @property
    def in_batch(self) -> bool:
        return bool((self.count > 1).any())

    @property
    def with_bank(self) -> bool:
        return bool((self.bank_count > 0).any())

    def pairs(self, n: int, k: int) -> int:
        """Ordered pairs of distinct points: N (N + K) less sum_g c_g (c_g + m_g)."""
        c, m = self.count, self.bank_count
        return n * (n + k) - int((c * (c + m)).sum())

    def batch_weights(self, lo: int, hi: int, dtype) -> torch.Tensor | None:
        """Charge weights of global batch rows lo:hi (None when no batch rows coincide)."""
        if not self.in_batch:
            return None
        g = self.group[lo:hi]
        first = self.rep[g] == torch.arange(lo, hi, device=g.device)
        return torch.where(first, self.count[g], 0).to(dtype)

    def batch_exclude(self, lo: int, hi: int) -> torch.Tensor:
        """Excluded charge (global index) of global batch rows lo:hi: its group's first row."""
        return self.rep[self.group[lo:hi]].clone()

    def bank_weights(self, offset: int, dtype) -> torch.Tensor | None:
        """Charge weights of the local bank rows (global indices from `offset`), or None."""
        if not self.with_bank:
            return None
        k = self.bank_group.shape[0]
        g = self.bank_group
        gi = g.clamp_min(0)
        idx = torch.arange(offset, offset + k, device=g.device)
        w = torch.where(self.bank_rep[gi] == idx, self.bank_count[gi], 0)
        return torch.where(g < 0, 1, w).to(dtype)

    def bank_exclude(self, lo: int, hi: int) -> torch.Tensor | None:
        """Excluded bank charge (global index, or -1) of global batch rows lo:hi, or None."""
        if not self.with_bank:
            return None
        return self.bank_rep[self.group[lo:hi]].clone()

    def describe(
        self,
        owner: Callable[[int], str] = str,
        bank_owner: Callable[[int], str] = str,
        limit: int = 3,
    ) -> str:
        """A message naming up to `limit` coincident pairs (indices through `owner`)."""
        out = []
        for g in torch.nonzero(self.count > 1).flatten()[:limit].tolist():
            rows = torch.nonzero(self.group == g).flatten()[:2].tolist()
            out.append(f"x rows {owner(rows[0])} and {owner(rows[1])}")
        for g in torch.nonzero(self.bank_count > 0).flatten()[:limit].tolist():
            out.append(
                f"x row {owner(int(self.rep[g]))} and bank row {bank_owner(int(self.bank_rep[g]))}"
            )
        more = int((self.count > 1).sum() + (self.bank_count > 0).sum())
        tail = f" (and {more - len(out)} more)" if more > len(out) else ""
        return ", ".join(out[:limit]) + tail


def find(
    u_all: torch.Tensor,
    bank: torch.Tensor | None,
    bank_offset: int = 0,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Coincidences:
    """Coincidences of the (detached) global batch u_all (N, D) and this rank's bank rows
    (K_r, D, global indices from bank_offset; None for none). reduce_sum / reduce_min combine
    the per-rank bank counts and first indices over the ranks (None: one process); every rank
    must call it with the same u_all."""
    n = u_all.shape[0]
    dev = u_all.device
    uniq, group, count = torch.unique(u_all + 0.0, dim=0, return_inverse=True, return_counts=True)
    g_n = uniq.shape[0]
    rep = torch.full((g_n,), n, dtype=torch.int64, device=dev)
    rep.scatter_reduce_(0, group, torch.arange(n, device=dev), "amin")
    bank_count = torch.zeros(g_n, dtype=torch.int64, device=dev)
    big = torch.iinfo(torch.int64).max
    bank_rep = torch.full((g_n,), big, dtype=torch.int64, device=dev)
    k = 0 if bank is None else bank.shape[0]
    bank_group = torch.full((k,), -1, dtype=torch.int64, device=dev)
    if k and g_n:
        cand = torch.nonzero(torch.isin(row_keys(bank), row_keys(uniq))).flatten()
        if cand.numel():
            both = torch.cat([uniq, bank[cand] + 0.0])
            _, inv = torch.unique(both, dim=0, return_inverse=True)
            table = torch.full((both.shape[0],), -1, dtype=torch.int64, device=dev)
            table[inv[:g_n]] = torch.arange(g_n, device=dev)
            bank_group[cand] = table[inv[g_n:]]
        hit = bank_group >= 0
        if bool(hit.any()):
            gh = bank_group[hit]
            bank_count.index_add_(0, gh, torch.ones_like(gh))
            idx = torch.nonzero(hit).flatten() + bank_offset
            bank_rep.scatter_reduce_(0, gh, idx, "amin")
    if reduce_sum is not None:
        bank_count = reduce_sum(bank_count)
        bank_rep = reduce_min(bank_rep)
    bank_rep = torch.where(bank_count > 0, bank_rep, -1)
    return Coincidences(group, count, rep, bank_count, bank_rep, bank_group)
