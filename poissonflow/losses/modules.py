"""`torch.nn.Module` forms of the losses in `poissonflow.losses.functions`: hyperparameters in
`__init__`, the features in `forward`; each computes exactly what its function computes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _checks
from ..bank import FeatureBank
from . import functions as F

__all__ = ["RieszLoss", "AlignUniformLoss", "WassersteinUniformityLoss", "NoiseInjectedInfoNCELoss"]


class RieszLoss(nn.Module):
    """Riesz s-energy uniformity (`poissonflow.losses.riesz_uniformity_loss`) with its own
    memory bank, on one process or over a process group.

    `forward(x)` returns the loss of the batch x (N, D) against the bank, then pushes x
    (detached) into the bank: MoCo's order, so a batch never meets its own copy. On one process
    it is `riesz_uniformity_loss(x, s, bank=self.bank, ...)`. With `gather_distributed=True` (or
    a `process_group`) every rank passes its own rows and gets the loss of the global batch (all
    ranks' rows) against the union of all ranks' banks, the same value on every rank, and the
    exact gradient of that global loss in its own rows: equal, value and gradients, to the
    one-process loss on the concatenated batches and banks. It goes through
    `poissonflow.distributed.riesz_uniformity_loss` with `mode="ring"` by default: the bank
    shards travel around the ring of ranks (at most two held at a time) and the partial
    log-sum-exps merge exactly, so no rank ever holds the gathered banks (docs/DESIGN.md,
    "Sharding the field over processes"). Each rank pushes its own rows into its own bank, so
    the union of the banks is the last `bank_size` batches of every rank. Under
    DistributedDataParallel, which averages the ranks' gradients, multiply the loss by the world
    size to descend the global loss at its own scale.

    **The bank in the state_dict.** The bank is training state, as MoCo's queue is (a registered
    buffer there): resuming without it changes the next bank_size / N steps' loss. It is saved
    as the module's extra state (key "<prefix>_extra_state": the `FeatureBank.state_dict()`, or
    None before the first forward), not as a buffer: DistributedDataParallel broadcasts a
    wrapped module's buffers from rank 0, which would overwrite every rank's own bank. Over
    several processes each rank's state_dict holds its own bank: save one checkpoint per rank
    to restore the union exactly. `module.to(...)`, `.double()`, `.cuda()` move the bank too.
    Memory: bank_size x D values of x's dtype, plus, during a step, a normalised copy of the
    bank (or a copy when normalize=False), which the graph keeps until the backward.

    Args:
        s: the Riesz exponent, a finite real > 0.
        bank_size: rows of the bank (0: no bank). The bank is created at the first forward with
            x's dimension, dtype and device (or by `load_state_dict`).
        normalize: L2-normalise the rows and the bank first (see the function).
        gather_distributed: score the global batch against the union of the banks of the
            default process group's ranks (collective: every rank calls forward, and backward).
        process_group: a process group (implies gather_distributed).
        coincident: "exclude" (coincident rows are one point) or "raise" (see the function).
        mode: how the distributed field moves the charges: "ring" (default; the banks are never
            gathered), "allgather" or "auto" (`poissonflow.distributed.poisson_field`).
        backend: the field op's backend.
    """

    def __init__(
        self,
        s: float,
        bank_size: int = 0,
        normalize: bool = True,
        gather_distributed: bool = False,
        process_group: Any = None,
        *,
        coincident: str = "exclude",
        mode: str = "ring",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.s = _checks.check_scalar(s, "s", minimum=0.0, allow_equal=False)
        if isinstance(bank_size, bool) or not isinstance(bank_size, int) or bank_size < 0:
            raise ValueError(f"bank_size must be an int >= 0, got {bank_size!r}")
        self.bank_size = bank_size
        self.normalize = _checks.check_bool(normalize, "normalize")
        self.gather_distributed = _checks.check_bool(gather_distributed, "gather_distributed") or (
            process_group is not None
        )
        self.process_group = process_group
        F.check_coincident(coincident)
        self.coincident = coincident
        if mode not in ("auto", "allgather", "ring"):
            raise ValueError(f"mode must be one of ('auto', 'allgather', 'ring'), got {mode!r}")
        self.mode = mode
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend
        self._bank: FeatureBank | None = None

    @property
    def bank(self) -> FeatureBank | None:
        """The memory bank (None when bank_size is 0 or before the first forward)."""
        return self._bank

    def forward(self, x: torch.Tensor, *, update_bank: bool = True) -> torch.Tensor:
        """The loss of x (N, D) (this rank's rows when distributed) against the bank.

        Args:
            x: features (N, D), float32 or float64.
            update_bank: push x (detached) into the bank after computing the loss.

        Returns:
            A 0-dim tensor in x's dtype, differentiable in x.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        _checks.check_bool(update_bank, "update_bank")
        if (
            self.bank_size
            and self._bank is None
            and x.ndim == 2
            and x.shape[1] >= 1
            and x.is_floating_point()
        ):
            self._bank = FeatureBank(self.bank_size, x.shape[1], dtype=x.dtype, device=x.device)
        bank = None
        if self._bank is not None:
            if not (
                x.ndim == 2
                and x.shape[1] == self._bank.dim
                and x.dtype == self._bank.dtype
                and x.device == self._bank.device
            ):
                raise ValueError(
                    f"x ({tuple(x.shape)}, {x.dtype}, {x.device}) does not match this loss's "
                    f"bank (dim {self._bank.dim}, {self._bank.dtype}, {self._bank.device})"
                )
            if len(self._bank):
                # the graph must not keep the storage, which the push below writes in place:
                # normalize=True makes a normalised copy, normalize=False gets a copy
                bank = self._bank.features() if self.normalize else self._bank.features().clone()
        if self.gather_distributed:
            from ..distributed.losses import riesz_uniformity_loss as distributed_loss

            loss = distributed_loss(
                x,
                self.s,
                bank=bank,
                normalize=self.normalize,
                group=self.process_group,
                mode=self.mode,
                backend=self.backend,
                coincident=self.coincident,
            )
        else:
            loss = F.riesz_uniformity_loss(
                x,
                self.s,
                bank=bank,
                normalize=self.normalize,
                coincident=self.coincident,
                backend=self.backend,
            )
        if update_bank and self._bank is not None:
            self._bank.push(x)
        return loss

    # ------------------------------------------------------------------- state and devices

    def get_extra_state(self) -> dict:
        """The bank's state for `state_dict()`: {"bank": FeatureBank.state_dict() or None}."""
        return {"bank": None if self._bank is None else self._bank.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        """Restores `get_extra_state()` (called by `load_state_dict`); creates the bank if this
        module has none yet, on the device of its current bank or of the saved features."""
        if not isinstance(state, dict) or set(state) != {"bank"}:
            raise ValueError("the extra state of a RieszLoss must be a dict with the key 'bank'")
        saved = state["bank"]
        if saved is None:
            if self._bank is not None:
                self._bank.reset()
            return
        feats = saved.get("features") if isinstance(saved, dict) else None
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
            raise ValueError("the saved bank must be a FeatureBank.state_dict()")
        if feats.shape[0] != self.bank_size:
            raise ValueError(
                f"the saved bank holds {feats.shape[0]} rows; this RieszLoss has "
                f"bank_size={self.bank_size}"
            )
        if self._bank is None or self._bank.dim != feats.shape[1]:
            device = feats.device if self._bank is None else self._bank.device
            dtype = feats.dtype if self._bank is None else self._bank.dtype
            self._bank = FeatureBank(self.bank_size, feats.shape[1], dtype=dtype, device=device)
        self._bank.load_state_dict(saved)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self._bank is not None:
            self._bank._storage = fn(self._bank._storage)
        return out

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, bank_size={self.bank_size}, normalize={self.normalize}, "
            f"gather_distributed={self.gather_distributed}, coincident={self.coincident!r}"
        )


class AlignUniformLoss(nn.Module):
    """Wang & Isola's alignment + uniformity (`poissonflow.losses.align_uniform_loss`).

    Args:
        alpha: the alignment exponent, > 0.
        t: the uniformity temperature, > 0.
        align_weight: weight of the alignment term.
        uniform_weight: weight of the uniformity term.
        normalize: L2-normalise both views first.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        t: float = 2.0,
        align_weight: float = 1.0,
        uniform_weight: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = _checks.check_scalar(alpha, "alpha", minimum=0.0, allow_equal=False)
        self.t = _checks.check_scalar(t, "t", minimum=0.0, allow_equal=False)
        self.align_weight = _checks.check_scalar(align_weight, "align_weight")
        self.uniform_weight = _checks.check_scalar(uniform_weight, "uniform_weight")
        self.normalize = _checks.check_bool(normalize, "normalize")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the two views x, y (N, D), paired row by row.

        Args:
            x: first view's features (N, D).
            y: second view's features (N, D).

        Returns:
            A 0-dim tensor with gradients.
        """
        return F.align_uniform_loss(
            x,
            y,
            alpha=self.alpha,
            t=self.t,
            align_weight=self.align_weight,
            uniform_weight=self.uniform_weight,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, t={self.t}, align_weight={self.align_weight}, "
            f"uniform_weight={self.uniform_weight}, normalize={self.normalize}"
        )


class WassersteinUniformityLoss(nn.Module):
    """Fang et al.'s Wasserstein uniformity term (`poissonflow.losses.wasserstein_uniformity_loss`),
    added to a base self-supervised loss.

    Args:
        weight: the term's weight.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = _checks.check_scalar(weight, "weight")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """weight * W2 of x, or of x stacked on y.

        Args:
            x: features (N, D).
            y: optional second view (M, D), stacked under x.

        Returns:
            A 0-dim tensor with gradients.
        """
        return F.wasserstein_uniformity_loss(x, y, weight=self.weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class NoiseInjectedInfoNCELoss(nn.Module):
    """Noise-injected InfoNCE of Butakov et al. (`poissonflow.losses.noise_injected_infonce`).

    Args:
        target: "sphere", "gaussian" or "uniform".
        sigma: the noise scale, >= 0.
        temperature: the critic's temperature (None: matched to the noise).
        critic: "sqdist" or "dot".
        generator: a torch.Generator fixing the noise (on the features' device), or None.
    """

    def __init__(
        self,
        target: str = "sphere",
        sigma: float = 0.3,
        temperature: float | None = None,
        critic: str = "sqdist",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if target not in F.NOISE_TARGETS:
            raise ValueError(f"target must be one of {F.NOISE_TARGETS}, got {target!r}")
        if critic not in F.CRITICS:
            raise ValueError(f"critic must be one of {F.CRITICS}, got {critic!r}")
        self.sigma = _checks.check_scalar(sigma, "sigma")
        if temperature is None and self.sigma == 0.0:
            raise ValueError("temperature must be given when sigma is 0 (no noise to match)")
        if temperature is not None:
            temperature = _checks.check_scalar(
                temperature, "temperature", minimum=0.0, allow_equal=False
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.target, self.critic = target, critic
        self.temperature, self.generator = temperature, generator

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The loss of two views z1, z2 (N, D), paired row by row.

        Args:
            z1: first view's encoder outputs (N, D).
            z2: second view's encoder outputs (N, D).

        Returns:
            A 0-dim tensor with gradients through z1 and z2.
        """
        return F.noise_injected_infonce(
            z1,
            z2,
            target=self.target,
            sigma=self.sigma,
            temperature=self.temperature,
            critic=self.critic,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"target={self.target!r}, sigma={self.sigma}, temperature={self.temperature}, "
            f"critic={self.critic!r}"
        )
