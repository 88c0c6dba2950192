"""`LearnedField`: a small network trained to predict PFGM's normalised Poisson field.

    field = poissonflow.LearnedField(preset="blog").fit(features)     # (N, d) numpy or torch
    z = poissonflow.transform(features, field=field)                  # flows through the network
    z = field.transform(features)                                     # the same (scikit-learn)
    PoissonFlow(field=LearnedField(preset="blog"))                    # a tunable sub-estimator

The blog's method (docs/DESIGN.md, "The learned field") does not flow through the exact empirical field: it
trains an MLP n(x, z) on PFGM's objective and integrates the flow of n. The transform is then a
fixed function of a feature, whatever points are charges.

Training (PFGM, `losses.py::get_loss_fn`): every iteration takes a large batch of clean points
(the charges), perturbs its first `small_batch` rows (poissonflow.pfgm.pfgm_perturb), computes
the targets -sqrt(d) v~ / (||v~|| + gamma) of the large batch at the perturbed points with the
fused field kernel (poissonflow.pfgm.field_targets) and takes one Adam step on

    loss = mean_i || n(x'_i, z_i) - target_i ||^2            (sum over the d + 1 outputs).

Batches are reshuffled every epoch (the blog's code did not shuffle); an incomplete last large
batch is dropped when the data hold more than one (its few charges would give a biased field),
so every epoch has floor(N / large_batch) iterations, or one when N <= large_batch. The preset
"blog-faithful" does what the blog's code does instead: the mean over the d + 1 outputs, fixed
batches in the data's order, the incomplete last one kept (loss, shuffle, drop_last).

Presets (every value can be overridden by the matching argument):

| setting | None (default) | "blog" | "pfgm" |
|---|---|---|---|
| network | Linear(d+1, h)-ReLU x depth, Linear(h, d+1); h = d + 1, depth = 2 | same | same |
| M | PFGM's rule | 20 | PFGM's rule |
| tau | 0.03 | 0.03 | 0.03 |
| sigma | 0.01 x data norm | 0.01 | 0.01 |
| gamma | 0.05 x data norm | 0.3 | 5 |
| restrict_M | False | False | True |
| large / small batch | 1024 / 128 | 1024 / 128 | 4096 / 128 |
| epochs | 200 | 200 | 200 (PFGM: 1.3M iterations) |
| lr (Adam) | 1e-3 | 1e-3 (torch default) | 2e-4 |
| grad_clip | None | None | 2.0 (PFGM clips at 1 the gradient of loss / 2) |
| ema (weight averaging) | 0.99 | None | 0.9999 |
| flow | log-z RK4 x 32, sigma..z_max | radial Euler 100 x 0.01 from 0 | RK4 x 32, 1e-3..z_max |
| loss / shuffle / drop_last | sum / True / True | sum / True / True | sum / True / True |
| patience / eval_every | None (fixed epochs) / 10 | same | same |

"blog-faithful" is "blog" with loss "mean", shuffle False, drop_last False (the blog's code).

"data norm" is sqrt(mean ||x||^2) (poissonflow.pfgm.data_norm). M's rule and z_max:
poissonflow.pfgm.pfgm_M / pfgm_z_max. ema is the decay of an exponential moving average of the
weights with PFGM's warm-up (models/ema.py); the fitted network holds the average (0 disables).

Why the default preset differs from the blog's (measured on the 2-D toy of tests/test_learned.py,
16384 charges, width 128, 800 iterations, seeds 0-5): sigma, gamma and the horizon are lengths,
so they are taken in units of the data norm (training on 10 x the features then learns 10 x the
field; for unit-norm features sigma is the blog's 0.01). gamma only weights the loss (the
target's direction is that of v~ for any gamma); 0.05 instead of 0.3 weights the points just
above the plane more and raised the mean cosine to the exact field on held-out perturbed points
from 0.948-0.961 to 0.975-0.976. Averaging the weights (ema 0.99) removed a seed-dependent drift
of the far field: the flow's end azimuth had KS p between 1e-4 and 0.4 without it, 0.2-0.7
with it. The blog's M = 20 trains only within (1.03)^20 sigma sqrt(d) of the data, while its
flow climbs to radius sqrt(3); PFGM's rule covers the whole climb. The width d + 1 is the
blog's; in very low dimension it is too narrow (the toy uses 128).

Not reproduced from PFGM: its NCSN++ network, the 5000-iteration learning-rate warm-up, its
adaptive RK45 solver, and its substitution of the network's z output below z_exp (Appendix
B.2.3; measured on the toy: no better than the plain field with z_exp = 0.1 x the data norm,
worse when applied at every height).

The blog's flow (preset "blog", poissonflow.flow.field_flow with parameterization "radial"):
each point starts on the plane, y~ = (x, 0), and takes 100 Euler steps y~ <- y~ + delta f /
(f . y~) with delta = 0.01, f the network's field. Along the exact ODE d(|y~|^2 / 2)/ds = 1, so
|y~|^2 / 2 rises by delta per unit step; one Euler step raises it by delta + delta^2 |f|^2 /
(2 (f . y~)^2), i.e. by at least delta. A unit feature therefore ends at radius >= sqrt(1 + 2 *
100 * 0.01) = sqrt(3). The update does not depend on the sign or the scale of f, and is undefined
where f . y~ = 0 (there flow.py skips the step and counts it). The origin, not the data's
centre, is the centre of the radial motion (the blog's features are L2-normalised).
"""

from __future__ import annotations

import math
import sys
import time
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from .pfgm import data_norm, field_targets, pfgm_M, pfgm_perturb, pfgm_z_max

__all__ = ["LearnedField", "PRESETS", "FILE_FORMAT"]

FILE_FORMAT = 1  # bumped when the saved layout changes
PRESETS = (None, "blog", "pfgm", "blog-faithful")
LOSSES = ("sum", "mean")

# "auto" values are resolved from the data in fit(); "norm:<k>" means k x the data norm.
_PRESET_SETTINGS: dict[Any, dict[str, Any]] = {
    None: {
        "hidden": "auto", "depth": 2, "M": "auto", "tau": 0.03, "sigma": "norm:0.01",
        "gamma": "norm:0.05", "restrict_M": False, "large_batch": 1024, "small_batch": 128,
        "epochs": 200, "lr": 1e-3, "grad_clip": None, "ema": 0.99, "z_min": "sigma",
        "z_max": "auto", "loss": "sum", "shuffle": True, "drop_last": True,
        "patience": None, "eval_every": 10,
    },
    "blog": {
        "hidden": "auto", "depth": 2, "M": 20.0, "tau": 0.03, "sigma": 0.01, "gamma": 0.3,
        "restrict_M": False, "large_batch": 1024, "small_batch": 128, "epochs": 200,
        "lr": 1e-3, "grad_clip": None, "ema": None, "z_min": 0.0, "z_max": "radial",
        "loss": "sum", "shuffle": True, "drop_last": True,
        "patience": None, "eval_every": 10,
    },
    "pfgm": {
        "hidden": "auto", "depth": 2, "M": "auto", "tau": 0.03, "sigma": 0.01, "gamma": 5.0,
        "restrict_M": True, "large_batch": 4096, "small_batch": 128, "epochs": 200,
        "lr": 2e-4, "grad_clip": 2.0, "ema": 0.9999, "z_min": 1e-3, "z_max": "auto",
        "loss": "sum", "shuffle": True, "drop_last": True,
        "patience": None, "eval_every": 10,
    },
}
# The blog's code where it differs from the "blog" preset (docs/BLOG_FAITHFULNESS.md): its
# loss is the mean over the d + 1 outputs (reduce_op = torch.mean), its loader is an
# unshuffled DataLoader(batch_size=1024) that keeps the incomplete last batch, so the same
# fixed large batches come every epoch and only the first 128 rows of each are ever perturbed.
# Its field network keeps PyTorch's default initialisation (its N(0, 0.02) init is the
# encoder's only), as the package's does.
_PRESET_SETTINGS["blog-faithful"] = dict(_PRESET_SETTINGS["blog"], loss="mean", shuffle=False,
                                         drop_last=False)
_FLOWS = {
    None: {"parameterization": "logz", "solver": "rk4", "steps": 32},
    "blog": {"parameterization": "radial", "solver": "euler", "steps": 100, "delta": 0.01,
             "output": "raw"},
    "pfgm": {"parameterization": "logz", "solver": "rk4", "steps": 32},
}
_FLOWS["blog-faithful"] = dict(_FLOWS["blog"])
_SETTINGS = tuple(_PRESET_SETTINGS[None])
_BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_POSITIVE = Interval(Real, 0, None, closed="neither")
_NON_NEGATIVE = Interval(Real, 0, None, closed="left")
_COUNT = Interval(Integral, 1, None, closed="left")


class _NotFittedError(NotFittedError, RuntimeError):
    """scikit-learn's NotFittedError (what check_is_fitted and the estimator checks expect)
    that is also the RuntimeError this class raised before it was an estimator."""


class LearnedField(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """The field network n(x, z) ~ -sqrt(d) v~ / (||v~|| + gamma) (PFGM's normalised field).

    A scikit-learn transformer: `fit(X)` trains the network on the features X (N, d) (numpy,
    any array-like, or a torch tensor, which keeps its device), `transform(X)` flows X through
    it with the preset's ODE (poissonflow.transform(X, field=self)) to (N, d + 1) points, so
    `fit_transform`, pipelines, GridSearchCV, clone and pickle work as for any transformer.
    Parameters are validated in fit (a bad one raises a ValueError or TypeError naming it).

    Args (None takes the preset's value; see the module table):
        preset: None, "blog" (the blog's settings), "blog-faithful" (the blog's code where it
            differs: mean loss, fixed unshuffled batches with the last one kept) or "pfgm".
        hidden: hidden width ("auto": d + 1); depth: number of hidden Linear-ReLU layers.
        M: perturbation exponent range, m ~ U[0, M) ("auto": PFGM's rule from the data).
        tau, sigma: perturbation growth (1 + tau)^m and base scale (sigma > 0).
        gamma: the target's normaliser ||v~|| + gamma.
        restrict_M: PFGM's restriction of m for points with a small height draw.
        large_batch, small_batch: charges per iteration, perturbed points per iteration.
        epochs, lr: Adam epochs and learning rate; grad_clip: max gradient norm or None.
        z_min, z_max: the flow's horizon reported by default_flow() ("auto": PFGM's z_max).
        loss: "sum" (squared error summed over the d + 1 outputs, PFGM's form) or "mean" (over
            them, the blog's code: the same minimiser, gradients (d + 1) times smaller).
        shuffle: reshuffle the batches every epoch (False: the data's own order, every epoch).
        drop_last: drop an incomplete last large batch when there are several (False: keep
            it, as torch's DataLoader does by default).
        patience, eval_every: the plateau rule. patience None trains exactly `epochs`; an
            integer k evaluates the validation loss every `eval_every` epochs and stops when
            k evaluations in a row failed to lower the best by 0.1% (`epochs` is then the
            maximum). The validation set: 512 training features (or all, if fewer) perturbed
            once with their own seeded draws, targets from a fixed large batch: fresh
            perturbations, as training sees, but the same ones at every evaluation.
        seed: initialisation, shuffling and perturbation are reproducible for a fixed seed.
        device: "auto" (CUDA when available), "cpu", "cuda" or a torch.device.
        backend: field kernel for the targets ("auto", "cpu", "cuda", "triton", "reference").
        progress: progress bars (training epochs, flow steps); None: only when stderr is a
            terminal (a log file gets no carriage-return updates).

    Fitted attributes: n_features_in_, settings_ (resolved values), data_norm_, center_ (the
    training mean, float64), net_, and the training history: loss_history_ (mean loss per
    epoch), wrong_sign_history_ (per epoch, perturbed training points where the network's field
    pointed toward the plane, n_z <= 0 away from the data: the log-z flow's guard condition),
    timing_ (seconds per epoch: "epoch", and its phases "data" (batch gather + perturbation),
    "target" (field kernel), "network" (forward, backward, Adam)), n_iterations_, fit_seconds_.
    """

    # Checked in fit (scikit-learn's machinery: a bad value raises InvalidParameterError, a
    # ValueError and TypeError, naming the parameter). None is "the preset's value" throughout.
    # What a single constraint cannot say (small_batch <= large_batch, z_min < z_max, values
    # resolved from the data) is checked in _resolve, after the preset is filled in.
    _parameter_constraints: dict = {
        "preset": [StrOptions({p for p in PRESETS if p is not None}), None],
        "hidden": [_COUNT, StrOptions({"auto"}), None],
        "depth": [Interval(Integral, 0, None, closed="left"), None],
        "M": [_POSITIVE, StrOptions({"auto"}), None],
        "tau": [_POSITIVE, None],
        "sigma": [_POSITIVE, None],
        "gamma": [_NON_NEGATIVE, None],
        "restrict_M": ["boolean", None],
        "large_batch": [_COUNT, None],
        "small_batch": [_COUNT, None],
        "epochs": [_COUNT, None],
        "lr": [_POSITIVE, None],
        "grad_clip": [_POSITIVE, None],
        "ema": [Interval(Real, 0, 1, closed="left"), None],
        "z_min": [_NON_NEGATIVE, None],
        "z_max": [_POSITIVE, StrOptions({"auto"}), None],
        "loss": [StrOptions(set(LOSSES)), None],
        "shuffle": ["boolean", None],
        "drop_last": ["boolean", None],
        "patience": [_COUNT, None],
        "eval_every": [_COUNT, None],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "device": [str, torch.device],
        "backend": [StrOptions(set(_BACKENDS))],
        "progress": ["boolean", None],
    }

    def __init__(
        self,
        preset: str | None = None,
        *,
        hidden=None,
        depth=None,
        M=None,
        tau=None,
        sigma=None,
        gamma=None,
        restrict_M=None,
        large_batch=None,
        small_batch=None,
        epochs=None,
        lr=None,
        grad_clip=None,
        ema=None,
        z_min=None,
        z_max=None,
        loss=None,
        shuffle=None,
        drop_last=None,
        patience=None,
        eval_every=None,
        seed: int = 0,
        device="auto",
        backend: str = "auto",
        progress: bool | None = None,
    ):
        self.preset = preset
        self.hidden = hidden
        self.depth = depth
        self.M = M
        self.tau = tau
        self.sigma = sigma
        self.gamma = gamma
        self.restrict_M = restrict_M
        self.large_batch = large_batch
        self.small_batch = small_batch
        self.epochs = epochs
        self.lr = lr
        self.grad_clip = grad_clip
        self.ema = ema
        self.z_min = z_min
        self.z_max = z_max
        self.loss = loss
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.patience = patience
        self.eval_every = eval_every
        self.seed = seed
        self.device = device
        self.backend = backend
        self.progress = progress

    # ------------------------------------------------------------------ settings
    def _saved_params(self) -> dict[str, Any]:
        """The constructor arguments as given, as plain values (what save() stores to rebuild
        the object; torch.load(weights_only=True) reads no torch.device)."""
        params = self.get_params(deep=False)
        if isinstance(params["device"], torch.device):
            params["device"] = str(params["device"])
        return params

    def _show_progress(self, progress=None) -> bool:
        """A call's `progress`, else the parameter's, else: is a person watching stderr?"""
        if progress is None:
            progress = self.progress
        if progress is None:
            try:
                progress = sys.stderr is not None and sys.stderr.isatty()
            except (AttributeError, ValueError):  # replaced or closed stream
                progress = False
        return bool(progress)

    def _resolve(self, X: torch.Tensor) -> dict[str, Any]:
        """Settings with the preset filled in and the data-dependent values computed."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        s = dict(_PRESET_SETTINGS[self.preset])
        for k in _SETTINGS:
            if getattr(self, k) is not None:
                s[k] = getattr(self, k)
        n, d = X.shape
        norm = data_norm(X)
        if not norm > 0:
            raise ValueError("features are all zero: the data norm that sets the scale is 0")
        for k in ("sigma", "gamma"):
            if isinstance(s[k], str) and s[k].startswith("norm:"):
                s[k] = float(s[k][5:]) * norm
        if s["hidden"] == "auto":
            s["hidden"] = d + 1
        for k, least in (("hidden", 1), ("depth", 0), ("large_batch", 1), ("small_batch", 1),
                         ("epochs", 1), ("eval_every", 1)):
            s[k] = _check_int(s[k], k, least)
        if s["small_batch"] > s["large_batch"]:
            # the perturbed points are the head of each large batch of charges
            raise ValueError(
                f"small_batch ({s['small_batch']}) must be <= large_batch "
                f"({s['large_batch']}): the perturbed points are taken from the large batch"
            )
        for k in ("tau", "sigma", "lr"):
            s[k] = _check_positive(s[k], k)
        s["gamma"] = _check_positive(s["gamma"], "gamma", allow_zero=True)
        if s["grad_clip"] is not None:
            s["grad_clip"] = _check_positive(s["grad_clip"], "grad_clip")
        if s["ema"] is not None:
            s["ema"] = _check_positive(s["ema"], "ema", allow_zero=True)
            if s["ema"] >= 1:
                raise ValueError(f"ema must be a decay rate in [0, 1) or None, got {s['ema']!r}")
        if s["patience"] is not None:
            s["patience"] = _check_int(s["patience"], "patience", 1)
        if s["loss"] not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {s['loss']!r}")
        for k in ("shuffle", "drop_last"):
            if not isinstance(s[k], (bool, np.bool_)):
                raise TypeError(f"{k} must be a bool, got {s[k]!r}")
            s[k] = bool(s[k])
        if not isinstance(s["restrict_M"], (bool, np.bool_)):
            raise TypeError(f"restrict_M must be a bool, got {s['restrict_M']!r}")
        s["restrict_M"] = bool(s["restrict_M"])
        if s["M"] == "auto":
            s["M"] = float(pfgm_M(norm, d, s["sigma"], s["tau"]))
        s["M"] = _check_positive(s["M"], "M")
        flow = _FLOWS[self.preset]
        if s["z_max"] == "auto":
            s["z_max"] = pfgm_z_max(s["M"], s["sigma"], s["tau"])
        elif s["z_max"] == "radial" and "delta" in flow:
            # nominal end height of a point starting at the origin: |y~|^2 / 2 = steps * delta
            s["z_max"] = math.sqrt(2.0 * flow["steps"] * flow["delta"])
        if s["z_min"] == "sigma":
            s["z_min"] = s["sigma"]
        s["z_max"] = _check_positive(s["z_max"], "z_max")
        s["z_min"] = _check_positive(s["z_min"], "z_min", allow_zero=True)
        if not s["z_min"] < s["z_max"]:
            raise ValueError(f"z_min ({s['z_min']:.4g}) must be < z_max ({s['z_max']:.4g})")
        return s

    # ------------------------------------------------------------------ training
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, progress: bool | None = None,
            profile: bool = False, train: bool = True) -> "LearnedField":
        """Trains the network on the features X (N, d) (numpy, array-like or torch); returns
        self. y is ignored (scikit-learn's signature).

        train=False: everything but the training (settings, centre, the network at its seeded
        initialisation, no Adam step): the blog's published code never reaches its
        optimiser step, so its field is an untrained one (docs/DESIGN.md, "The learned field").

        progress: this call's progress bar, overriding the `progress` parameter (None keeps it).
        profile=True synchronises CUDA after each phase so that timing_ splits a GPU epoch
        exactly (on the CPU it always does; synchronising slows a GPU run slightly).
        """
        device = _resolve_device(self.device)
        X = self._features(X, reset=True).to(device=device, dtype=torch.float32)
        n, d = X.shape
        s = self._resolve(X)
        from .field import resolve_backend

        backend = resolve_backend(self.backend, device)
        seed = _check_int(self.seed, "seed", 0)

        self.n_features_in_ = d
        self._n_features_out = d + 1  # get_feature_names_out: learnedfield0 ... learnedfield{d}
        self.settings_ = s
        self.data_norm_ = data_norm(X)
        self.center_ = X.double().mean(0).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _mlp(d, s["hidden"], s["depth"])
        self.net_ = net.to(device)
        opt, shadow, gen = self._training_state(s, seed, device)
        step = _SingleProcess(self.net_, backend)
        sync = (lambda: torch.cuda.synchronize(device)) if (
            profile and device.type == "cuda") else (lambda: None)

        self.loss_history_, self.wrong_sign_history_ = [], []
        self.timing_ = {k: [] for k in ("epoch", "data", "target", "network")}
        self.n_iterations_ = 0
        self.val_loss_history_: list[tuple[int, float]] = []  # (epochs done, loss)
        self.plateau_epoch_: int | None = None  # the epoch the plateau rule stopped at
        validation = None if s["patience"] is None else self._validation_set(X, s, seed,
                                                                             backend)
        best, stale = math.inf, 0
        bar = _epoch_bar(s["epochs"], self._show_progress(progress))
        t_fit = time.perf_counter()
        for epoch in range(s["epochs"] if train else 0):
            loss = self._train_epoch(X, s, opt, shadow, gen, step, sync)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4g}")
                bar.update(1)
            if validation is not None and (epoch + 1) % s["eval_every"] == 0:
                val = self._validation_loss(validation, s)
                self.val_loss_history_.append((epoch + 1, val))
                # the plateau rule: k evaluations in a row without a 0.1% improvement
                if val < best * (1.0 - 1e-3):
                    best, stale = val, 0
                else:
                    stale += 1
                if stale >= s["patience"]:
                    self.plateau_epoch_ = epoch + 1
                    break
        if bar is not None:
            bar.close()
        self.fit_seconds_ = time.perf_counter() - t_fit
        self._finish_training(shadow)
        return self

    def _training_state(self, s, seed: int, device) -> tuple:
        """(Adam, the weights' moving average or None, the seeded generator of the batches and
        perturbations) for training self.net_ from its current weights."""
        opt = torch.optim.Adam(self.net_.parameters(), lr=s["lr"])
        # the weights' moving average (ema), copied into the network at the end
        shadow = None if s["ema"] is None else [
            p.detach().clone() for p in self.net_.parameters()]
        return opt, shadow, torch.Generator(device=device).manual_seed(seed)

    def _finish_training(self, shadow) -> None:
        """The fitted network: the moving average when there is one, frozen, in eval mode."""
        if shadow is not None:  # the field is the averaged network (PFGM samples with it)
            with torch.no_grad():
                for avg, p in zip(shadow, self.net_.parameters()):
                    p.copy_(avg)
        self.net_.eval()
        for p in self.net_.parameters():
            p.requires_grad_(False)

    def _validation_set(self, X, s, seed, backend):
        """(inputs (n, d + 1), targets) of the plateau rule's fixed validation set (the
        `patience` docstring), drawn from generators of their own so that training's random
        stream is the same with and without the rule."""
        n = X.shape[0]
        gen = torch.Generator(device=X.device).manual_seed(seed + 7919)
        rows = X[torch.randperm(n, generator=gen, device=X.device)[:min(n, 512)]]
        charges = X[torch.randperm(n, generator=gen, device=X.device)[:s["large_batch"]]]
        x_pert, z = pfgm_perturb(rows, s["M"], s["sigma"], s["tau"], s["restrict_M"], gen)
        target = field_targets(x_pert, z, charges, s["gamma"], backend)
        return torch.cat([x_pert, z[:, None]], dim=1), target

    def _validation_loss(self, validation, s) -> float:
        inp, target = validation
        with torch.no_grad():
            err = (self.net_(inp) - target) ** 2
            return float((err.sum(1) if s["loss"] == "sum" else err.mean(1)).mean())

    def _train_epoch(self, X, s, opt, shadow, gen, step: "_SingleProcess", sync):
        """One pass over a fresh permutation of X; appends the epoch's mean loss, wrong-sign
        count and seconds per phase (data (gather + perturbation), target, network (forward,
        backward, optimiser)) to loss_history_, wrong_sign_history_ and timing_, and returns
        the mean loss.

        `step` says what of each iteration is this process's (_SingleProcess: all of it):
        its queries and charges, their targets, the forward pass, the loss and the epoch's
        totals. poissonflow.distributed.learned passes its data-parallel step, so that one
        loop trains both ways."""
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
        perm = (torch.randperm(n, generator=gen, device=X.device) if s["shuffle"]
                else torch.arange(n, device=X.device))
        for it in range(per_epoch):
            t0 = time.perf_counter()
            batch = X[perm[it * large:(it + 1) * large]]
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
            loss, share = step.loss(err.sum(1) if s["loss"] == "sum" else err.mean(1),
                                    x_pert.shape[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(self.net_.parameters(), s["grad_clip"])
            opt.step()
            self.n_iterations_ += 1
            if shadow is not None:
                self._update_average(shadow, s["ema"])
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
        self.loss_history_.append(loss_mean)
        self.wrong_sign_history_.append(wrong_count)
        for k, v in clock.items():
            self.timing_[k].append(v)
        return loss_mean

    def _update_average(self, shadow: list[torch.Tensor], rate: float) -> None:
        """Exponential moving average of the weights with PFGM's warm-up (models/ema.py): the
        decay after k updates is min(rate, (1 + k) / (10 + k)), so a short run averages over
        roughly its last k / 9 iterations instead of keeping the initial weights."""
        k = self.n_iterations_
        decay = min(rate, (1.0 + k) / (10.0 + k))
        with torch.no_grad():
            for avg, p in zip(shadow, self.net_.parameters()):
                avg.lerp_(p, 1.0 - decay)

    # ------------------------------------------------------------------ use in the flow
    def transform(self, X):
        """X (N, d) flowed through the learned field with the preset's ODE (default_flow():
        parameterization, solver, steps, horizon, output): poissonflow.transform(X,
        field=self). Numpy or array-like in, numpy out (float32 stays float32, otherwise
        float64); a torch tensor comes back a tensor on its device. The result is a fixed
        function of each row (no charges are involved), so rows can be transformed in any
        batches. For other flow settings call poissonflow.transform(X, field=self, ...)."""
        self._check_fitted()
        x = self._features(X, reset=False)
        from .transform import transform

        out = transform(x, field=self, progress=self._show_progress())
        return out if isinstance(X, torch.Tensor) else out.numpy()

    def predict_field(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The network's output n(x, z) (N, d + 1) in float32 on the field's device: the
        normalised field pointing toward the data (PFGM's sign convention). (Not `predict`:
        to scikit-learn, predict(X) maps features to targets.)"""
        return self._network(x, z, torch.float32)

    def field_fn(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_x (N, d), f_z (N,)) = -n(x, z): the field direction pointing away from the data
        (the convention of poissonflow.flow.field_flow), in x's dtype and device.

        Float64 queries are evaluated in float64 (the float32 weights upcast exactly): float32
        matrix products round differently with the batch's size (measured on the CPU: up to
        1e-7 in n, 1.3e-6 in the blog flow's end points), so a float64 transform of a row
        would depend on the rows it is transformed with; in float64 the spread is 1e-13 at
        most. The cost: the network's evaluation takes 1.5-2.3x its float32 time (measured, one
        CPU thread, d = 2-128); float32 features keep the float32 network."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = -self._network(x, z, dtype)
        d = self.n_features_in_
        return out[:, :d].to(x.device, x.dtype), out[:, d].to(x.device, x.dtype)

    def _network(self, x, z, dtype: torch.dtype) -> torch.Tensor:
        """n(x, z) computed in `dtype` on the field's device."""
        self._check_fitted()
        x = _check_query(x, "x", self.n_features_in_)
        if not isinstance(z, torch.Tensor) or z.shape != (x.shape[0],):
            raise ValueError(f"z must be a tensor of shape ({x.shape[0]},)")
        dev = next(self.net_.parameters()).device
        with torch.no_grad():
            inp = torch.cat([x.to(dev, dtype), z.to(dev, dtype)[:, None]], 1)
            if dtype == torch.float32:
                return self.net_(inp)
            params = {k: v.to(dtype) for k, v in self.net_.state_dict().items()}
            return torch.func.functional_call(self.net_, params, (inp,))

    def default_flow(self) -> dict[str, Any]:
        """The preset's ODE for poissonflow.transform: parameterization, solver, steps, the
        horizon z_min / z_max, and delta (radial step) for the blog's flow."""
        self._check_fitted()
        flow = dict(_FLOWS[self.preset])
        flow["z_min"] = self.settings_["z_min"]
        flow["z_max"] = self.settings_["z_max"]
        return flow

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Writes the weights (state_dict), the settings, the history and the package version
        to `path` (torch.save; reload with LearnedField.load, no retraining)."""
        self._check_fitted()
        from . import __version__

        torch.save(
            {
                "format": FILE_FORMAT,
                "poissonflow_version": __version__,
                "params": self._saved_params(),
                "settings": dict(self.settings_),
                "n_features_in": int(self.n_features_in_),
                "data_norm": float(self.data_norm_),
                "center": self.center_.clone(),
                "state_dict": {k: v.detach().cpu() for k, v in self.net_.state_dict().items()},
                "history": {
                    "loss": list(self.loss_history_),
                    "wrong_sign": list(self.wrong_sign_history_),
                    "timing": {k: list(v) for k, v in self.timing_.items()},
                    "n_iterations": int(self.n_iterations_),
                    "val_loss": [list(v) for v in self.val_loss_history_],
                    "plateau_epoch": self.plateau_epoch_,
                    "fit_seconds": float(self.fit_seconds_),
                },
            },
            Path(path),
        )

    @classmethod
    def load(cls, path, *, n_features: int | None = None, device=None) -> "LearnedField":
        """A fitted LearnedField from a file written by save(). `n_features`, when given, must
        match the dimension the field was trained on; `device` overrides the saved device."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
            raise ValueError(
                f"{path} is not a LearnedField file of format {FILE_FORMAT} "
                f"(found format {blob.get('format') if isinstance(blob, dict) else None!r})"
            )
        d = int(blob["n_features_in"])
        if n_features is not None and int(n_features) != d:
            raise ValueError(
                f"{path} holds a field trained on {d}-dimensional features, but n_features = "
                f"{n_features} was asked for"
            )
        params = dict(blob["params"])
        if device is not None:
            params["device"] = device
        obj = cls(**params)
        s = blob["settings"]
        net = _mlp(d, s["hidden"], s["depth"])
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in blob["state_dict"].items()}
        if shapes != saved:
            raise ValueError(
                f"{path}: the saved weights do not fit a {d}-dimensional field of width "
                f"{s['hidden']} and depth {s['depth']} (saved shapes {saved})"
            )
        net.load_state_dict(blob["state_dict"])
        obj.net_ = net.to(_resolve_device(params["device"])).eval()
        for p in obj.net_.parameters():
            p.requires_grad_(False)
        obj.n_features_in_ = d
        obj._n_features_out = d + 1
        obj.settings_ = dict(s)
        obj.data_norm_ = float(blob["data_norm"])
        obj.center_ = blob["center"]
        h = blob["history"]
        obj.loss_history_ = list(h["loss"])
        obj.wrong_sign_history_ = list(h["wrong_sign"])
        obj.timing_ = {k: list(v) for k, v in h["timing"].items()}
        obj.n_iterations_ = int(h["n_iterations"])
        obj.val_loss_history_ = [(int(e), float(v)) for e, v in h.get("val_loss", [])]
        obj.plateau_epoch_ = h.get("plateau_epoch")
        obj.fit_seconds_ = float(h["fit_seconds"])
        obj.saved_version_ = str(blob["poissonflow_version"])
        return obj

    # ------------------------------------------------------------------ helpers
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise _NotFittedError(
                "this LearnedField is not fitted yet: call fit(features) first")

    def _features(self, X, *, reset: bool) -> torch.Tensor:
        """X as a 2-D real float tensor, with n_features_in_ set (reset, in fit) or checked.

        A torch tensor keeps its device and floating dtype (integers become float64) and is
        checked here; anything else goes through scikit-learn's validate_data (lists,
        array-likes, DataFrames; its messages and feature names)."""
        if isinstance(X, torch.Tensor):
            if X.is_complex():
                # torch would drop the imaginary part silently in the float conversion
                raise TypeError(
                    f"X is a complex tensor ({X.dtype}); LearnedField needs real features "
                    "(pass X.real or X.abs() if that is what is meant)")
            # training data are detached; a query is handed on as given, so that
            # poissonflow.transform applies its own rule to a tensor that requires grad
            t = X.detach() if reset else X
            if t.ndim != 2:
                raise ValueError(
                    f"X must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}")
            least = 2 if reset else 1  # training needs 2 points for a field; a flow needs 1
            if t.shape[0] < least or t.shape[1] < 1:
                raise ValueError(f"X needs at least {least} sample(s) and 1 feature, got "
                                 f"shape {tuple(t.shape)}")
            if not t.is_floating_point():
                t = t.to(torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError("X contains NaN or infinite values")
            if reset:
                self.n_features_in_ = t.shape[1]
                self.__dict__.pop("feature_names_in_", None)  # as validate_data does
            elif t.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {t.shape[1]} features, but LearnedField is expecting "
                    f"{self.n_features_in_} features as input (it was trained on "
                    f"{self.n_features_in_}-dimensional features)")
            return t
        shape = getattr(X, "shape", None)
        if shape is not None and len(shape) != 2:
            raise ValueError(  # "Reshape your data": the hint scikit-learn's checks look for
                f"X must be 2-D (n_samples, n_features), got shape {tuple(shape)}. Reshape "
                "your data: X.reshape(-1, 1) for a single feature, X.reshape(1, -1) for a "
                "single sample")
        a = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32],
                          ensure_min_samples=2 if reset else 1)
        if not a.flags.writeable:  # torch.from_numpy warns on read-only memory
            a = a.copy()
        return torch.from_numpy(np.ascontiguousarray(a))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # computations follow the input: float32 stays float32 (the network is float32 anyway)
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


class _SingleProcess:
    """What of each training iteration one process does, for LearnedField._train_epoch: all of
    it. The loop itself (epochs' batches, perturbation, optimiser step, clipping, averaging)
    is shared; poissonflow.distributed.learned._DataParallel replaces these methods to work
    on its rank's slice of every batch and sum over the ranks."""

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

    def epoch_totals(self, loss_sum: torch.Tensor, wrong: torch.Tensor,
                     per_epoch: int) -> tuple[float, int]:
        """(mean loss per iteration, wrong-sign count) of the epoch."""
        return float(loss_sum) / per_epoch, int(wrong)


def _mlp(d: int, hidden: int, depth: int) -> torch.nn.Sequential:
    """Linear(d+1, h)-ReLU, (depth - 1) x Linear(h, h)-ReLU, Linear(h, d+1): the blog's network
    for h = d + 1, depth = 2."""
    layers: list[torch.nn.Module] = []
    width = d + 1
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, d + 1))
    return torch.nn.Sequential(*layers)


def _epoch_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="LearnedField", unit="epoch", leave=False)


def _resolve_device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', a device string or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got "
                         f"{device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but CUDA is not available")
    return dev


def _check_query(x, name: str, d: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} is a complex tensor ({x.dtype}); the field needs real points")
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but this LearnedField was trained on "
            f"{d}-dimensional features"
        )
    return x


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v
