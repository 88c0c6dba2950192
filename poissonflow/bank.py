"""A memory bank of detached features for training losses: a fixed-size FIFO queue (MoCo's
"queue" of keys, He et al. 2020), so that a loss can see many more features than one batch
holds. The bank stores constants: gradients never flow into it.

Which losses take a bank (`bank.features()`, a (K, D) tensor):

* `losses.RieszLoss(s, bank_size=K)` owns one (pushed after each loss, saved in its
  state_dict); `losses.riesz_uniformity_loss(x, s, bank=bank)`: the pairs batch-batch and
  batch-bank, in
  O(N (N + K) D) time and O((N + K) D) memory (the loss this bank was written for).
* `losses.wasserstein_uniformity_loss(x, bank.features())`: W2 of x stacked on the bank; the
  covariance of 128-d features is poorly estimated from one batch, and the bank adds rows at
  O(K D^2) cost.
* `losses.contrastive_l2_loss(x, x_pos, bank.features())`: the bank as negatives shared by
  every anchor; it builds an (N, K, D) tensor, so small banks only.
* `metrics.uniform_loss(torch.cat([x, bank.features()]))`: Wang & Isola's potential over the
  stacked rows; it has no bank argument, so it also sums the K^2 bank-bank pairs (constants
  that only dilute the gradient), in O((N + K)^2 D) time.

`align_uniform_loss` and `noise_injected_infonce` pair two views row by row: a bank of past
features has no partner rows and does not fit them.
"""

from __future__ import annotations

import torch

__all__ = ["FeatureBank"]


class FeatureBank:
    """Fixed-size FIFO queue of detached feature vectors.

    FeatureBank(size, dim, dtype=torch.float32, device="cpu") holds at most `size` rows of `dim`
    features. `push(batch)` copies the rows of `batch` (M, dim) in, overwriting the oldest rows
    once the bank is full (a batch longer than `size` keeps only its last `size` rows).
    `features()` returns the filled rows (len(bank), dim) in slot order: slots are filled 0, 1,
    ... in push order and then overwritten cyclically, so a row keeps its index until it is
    overwritten, and before the bank first wraps around row 0 is the oldest. (Every loss that
    takes a bank is invariant to the order of its rows, so no copy is made to sort them by age.)

    `features()` is a view of the storage, not a copy: a later `push` overwrites it in place. In
    the usual order (loss, backward, optimiser step, then push the batch) that is never visible;
    a graph that saved the view and is back-propagated after a push fails with autograd's
    "modified by an inplace operation" error rather than computing with changed values.

    Push a batch after computing its loss, not before: a batch already in the bank meets its own
    copies, which `riesz_uniformity_loss` counts as one point each (its `coincident` argument),
    so the bank then adds no new point for that batch. `losses.RieszLoss` holds a bank and
    pushes in that order itself.

    The stored rows are copies, taken under no_grad: the bank is never part of a graph. Pushing
    a batch of another dim, dtype or device, or one with NaN or infinite values (they would
    poison every loss for size / M steps) is an error. `state_dict()` / `load_state_dict()`
    checkpoint the bank exactly (storage, write position and fill level).

    Args:
        size: the most rows the bank holds, >= 1.
        dim: the features' dimension, >= 1.
        dtype: a floating torch dtype.
        device: where the rows are stored.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for value, name in ((size, "size"), (dim, "dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._storage = torch.zeros(size, dim, dtype=dtype, device=torch.device(device))
        self._ptr = 0  # the slot the next row goes to (the oldest row once the bank is full)
        self._filled = 0

    # ----------------------------------------------------------------------------- properties

    @property
    def size(self) -> int:
        """The most rows the bank holds."""
        return self._storage.shape[0]

    @property
    def dim(self) -> int:
        """The features' dimension."""
        return self._storage.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The stored rows' dtype."""
        return self._storage.dtype

    @property
    def device(self) -> torch.device:
        """Where the rows are stored."""
        return self._storage.device

    @property
    def full(self) -> bool:
        """Whether every slot holds a row."""
        return self._filled == self.size

    def __len__(self) -> int:
        return self._filled

    def __repr__(self) -> str:
        return (
            f"FeatureBank(size={self.size}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device}, filled={self._filled})"
        )

    # ----------------------------------------------------------------------------- queue

    def push(self, batch: torch.Tensor) -> None:
        """Enqueues the rows of `batch` (M, dim), M >= 0, overwriting the oldest rows.

        Args:
            batch: the rows to store (copied, detached), of this bank's dim, dtype and device.
        """
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(
                f"batch must have shape (M, {self.dim}) for this bank of dim {self.dim}, got "
                f"{tuple(batch.shape)}"
            )
        if batch.dtype != self.dtype:
            raise TypeError(f"batch has dtype {batch.dtype} but the bank stores {self.dtype}")
        if batch.device != self.device:
            raise ValueError(f"batch is on {batch.device} but the bank is on {self.device}")
        m = batch.shape[0]
        if m == 0:
            return
        with torch.no_grad():
            rows = batch.detach()
            if not bool(torch.isfinite(rows).all()):
                bad = int((~torch.isfinite(rows)).sum())
                raise ValueError(f"batch contains {bad} NaN or infinite value(s)")
            if m >= self.size:  # only the newest `size` rows survive; they fill the bank in order
                self._storage.copy_(rows[m - self.size :])
                self._ptr, self._filled = 0, self.size
                return
            head = min(m, self.size - self._ptr)
            self._storage[self._ptr : self._ptr + head].copy_(rows[:head])
            if head < m:  # wrap around to slot 0
                self._storage[: m - head].copy_(rows[head:])
            self._ptr = (self._ptr + m) % self.size
            self._filled = min(self.size, self._filled + m)

    def features(self) -> torch.Tensor:
        """The filled rows, in slot order, as a view of the storage.

        Returns:
            A (len(self), dim) tensor.
        """
        return self._storage[: self._filled]

    def reset(self) -> None:
        """Empties the bank (the storage is kept; its stale rows are no longer returned)."""
        self._ptr, self._filled = 0, 0

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """A checkpointable copy of the bank.

        Returns:
            {"features": the (size, dim) storage (a copy), "ptr": int, "filled": int}.
        """
        return {"features": self._storage.clone(), "ptr": self._ptr, "filled": self._filled}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()` of a bank of the same size and dim. The stored features are
        copied into this bank's storage, so they take its dtype and device (as
        torch.nn.Module.load_state_dict does with parameters).

        Args:
            state: a `state_dict()` of a bank of this size and dim.
        """
        if not isinstance(state, dict) or set(state) != {"features", "ptr", "filled"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with keys features, ptr, filled; got {got}")
        feats, ptr, filled = state["features"], state["ptr"], state["filled"]
        if not isinstance(feats, torch.Tensor) or not feats.is_floating_point():
            raise TypeError("state['features'] must be a floating-point tensor")
        if tuple(feats.shape) != (self.size, self.dim):
            raise ValueError(
                f"state['features'] has shape {tuple(feats.shape)}; this bank holds "
                f"({self.size}, {self.dim})"
            )
        for value, name in ((ptr, "ptr"), (filled, "filled")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"state['{name}'] must be an int, got {type(value).__name__}")
        if not 0 <= filled <= self.size or not 0 <= ptr < self.size:
            raise ValueError(
                f"state has ptr {ptr}, filled {filled}: out of range for size {self.size}"
            )
        # Until the bank wraps, the write position is the fill level; a full bank may be anywhere.
        if filled < self.size and ptr != filled:
            raise ValueError(f"state has ptr {ptr} != filled {filled} for a bank not yet full")
        with torch.no_grad():
            self._storage.copy_(feats)
        self._ptr, self._filled = ptr, filled
