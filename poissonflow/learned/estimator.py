"""`LearnedField`: a small network trained to predict PFGM's normalised Poisson field.

    field = poissonflow.LearnedField(preset="blog").fit(features)     # (N, d) numpy or torch
    z = poissonflow.transform(features, field=field)                  # flows through the network
    z = field.transform(features)                                     # the same (scikit-learn)
    PoissonFlow(field=LearnedField(preset="blog"))                    # a tunable sub-estimator

The blog's method (docs/DESIGN.md, "The learned field") does not flow through the exact empirical
field: it trains an MLP n(x, z) on PFGM's objective and integrates the flow of n. The transform
is then a fixed function of a feature, whatever points are charges.

The package's other modules hold the rest: poissonflow.learned.targets (PFGM's perturbation,
targets and M / z_max rule), poissonflow.learned.network (the MLP, the presets with their table
and reasons, and the settings of a fit) and poissonflow.learned.training (the epoch loop, the
plateau rule, the weights' average). This module is the scikit-learn estimator around them:
parameters and their validation, fit, the flow's interface (field_fn, default_flow), transform,
and persistence (save / load, FILE_FORMAT).
"""

from __future__ import annotations

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

from .._checks import check_int, resolve_device
from .network import FLOWS, LOSSES, PRESETS, SETTINGS, mlp, resolve_settings
from .targets import data_norm
from .training import SingleProcess, Training, epoch_bar, validation_set

__all__ = ["LearnedField", "PRESETS", "FILE_FORMAT"]

FILE_FORMAT = 1  # bumped when the saved layout changes
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

    Args (None takes the preset's value; the table in poissonflow.learned.network):
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
        return resolve_settings(self.preset, {k: getattr(self, k) for k in SETTINGS}, X)

    # ------------------------------------------------------------------ training
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(
        self, X, y=None, *, progress: bool | None = None, profile: bool = False, train: bool = True
    ) -> LearnedField:
        """Trains the network on the features X (N, d) (numpy, array-like or torch); returns
        self. y is ignored (scikit-learn's signature).

        train=False: everything but the training (settings, centre, the network at its seeded
        initialisation, no Adam step): the blog's published code never reaches its
        optimiser step, so its field is an untrained one (docs/DESIGN.md, "The learned field").

        progress: this call's progress bar, overriding the `progress` parameter (None keeps it).
        profile=True synchronises CUDA after each phase so that timing_ splits a GPU epoch
        exactly (on the CPU it always does; synchronising slows a GPU run slightly).
        """
        device = resolve_device(self.device)
        X = self._features(X, reset=True).to(device=device, dtype=torch.float32)
        n, d = X.shape
        s = self._resolve(X)
        from ..field import resolve_backend

        backend = resolve_backend(self.backend, device)
        seed = check_int(self.seed, "seed", 0)

        self.n_features_in_ = d
        self._n_features_out = d + 1  # get_feature_names_out: learnedfield0 ... learnedfield{d}
        self.settings_ = s
        self.data_norm_ = data_norm(X)
        self.center_ = X.double().mean(0).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = mlp(d, s["hidden"], s["depth"])
        self.net_ = net.to(device)
        run = Training(self.net_, s, seed, device)
        sync = (
            (lambda: torch.cuda.synchronize(device))
            if (profile and device.type == "cuda")
            else (lambda: None)
        )
        validation = None if s["patience"] is None else validation_set(X, s, seed, backend)
        bar = epoch_bar(s["epochs"], self._show_progress(progress))
        t_fit = time.perf_counter()
        run.run(
            X,
            SingleProcess(self.net_, backend),
            s["epochs"] if train else 0,
            validation=validation,
            sync=sync,
            bar=bar,
        )
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t_fit
        run.finish()
        self._record_training(run, seconds)
        return self

    def _record_training(self, run: Training, seconds: float) -> None:
        """The training history of `run` as the fitted attributes (poissonflow.distributed's
        fit_learned_field records its run with this too)."""
        self.loss_history_ = run.loss_history
        self.wrong_sign_history_ = run.wrong_sign_history
        self.timing_ = run.timing
        self.n_iterations_ = run.n_iterations
        self.val_loss_history_ = run.val_loss_history  # (epochs done, loss)
        self.plateau_epoch_ = run.plateau_epoch  # the epoch the plateau rule stopped at
        self.fit_seconds_ = seconds

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
        from ..transform import transform

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
        flow = dict(FLOWS[self.preset])
        flow["z_min"] = self.settings_["z_min"]
        flow["z_max"] = self.settings_["z_max"]
        return flow

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Writes the weights (state_dict), the settings, the history and the package version
        to `path` (torch.save; reload with LearnedField.load, no retraining)."""
        self._check_fitted()
        from .. import __version__

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
    def load(cls, path, *, n_features: int | None = None, device=None) -> LearnedField:
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
        net = mlp(d, s["hidden"], s["depth"])
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in blob["state_dict"].items()}
        if shapes != saved:
            raise ValueError(
                f"{path}: the saved weights do not fit a {d}-dimensional field of width "
                f"{s['hidden']} and depth {s['depth']} (saved shapes {saved})"
            )
        net.load_state_dict(blob["state_dict"])
        obj.net_ = net.to(resolve_device(params["device"])).eval()
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
            raise _NotFittedError("this LearnedField is not fitted yet: call fit(features) first")

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
                    "(pass X.real or X.abs() if that is what is meant)"
                )
            # training data are detached; a query is handed on as given, so that
            # poissonflow.transform applies its own rule to a tensor that requires grad
            t = X.detach() if reset else X
            if t.ndim != 2:
                raise ValueError(
                    f"X must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}"
                )
            least = 2 if reset else 1  # training needs 2 points for a field; a flow needs 1
            if t.shape[0] < least or t.shape[1] < 1:
                raise ValueError(
                    f"X needs at least {least} sample(s) and 1 feature, got shape {tuple(t.shape)}"
                )
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
                    f"{self.n_features_in_}-dimensional features)"
                )
            return t
        shape = getattr(X, "shape", None)
        if shape is not None and len(shape) != 2:
            raise ValueError(  # "Reshape your data": the hint scikit-learn's checks look for
                f"X must be 2-D (n_samples, n_features), got shape {tuple(shape)}. Reshape "
                "your data: X.reshape(-1, 1) for a single feature, X.reshape(1, -1) for a "
                "single sample"
            )
        a = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=2 if reset else 1,
        )
        if not a.flags.writeable:  # torch.from_numpy warns on read-only memory
            a = a.copy()
        return torch.from_numpy(np.ascontiguousarray(a))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # computations follow the input: float32 stays float32 (the network is float32 anyway)
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


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
