"""`PoissonFlow`: the Poisson-flow transform as a scikit-learn transformer.

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    clf = make_pipeline(PoissonFlow(), LogisticRegression()).fit(X_train, y_train)

    # a learned field is a sub-estimator: tunable, cloned and fitted with the flow
    pf = PoissonFlow(field=LearnedField(preset="blog"))
    GridSearchCV(make_pipeline(pf, LogisticRegression()), {"poissonflow__field__epochs": [50, 200]})

`fit(X)` keeps X as the charges (or trains a learned field on it) and fixes the horizon
(z_min, z_max) from it, so that every later `transform` maps a given feature the same way
whatever else is in the batch. `transform(X)` flows X against the fitted charges; a row equal
to a fitted charge ignores that charge (leave-one-out), so `fit_transform(X)` equals
`fit(X).transform(X)` and training rows are treated like held-out ones.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
    clone,
)
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from . import horizon
from .ode import SOLVERS
from .transform import MAX_STEPS, OUTPUTS, PARAMETERIZATIONS, STARTS
from .transform import transform as _transform

__all__ = ["PoissonFlow"]

# z^2 must fit in float32: the largest horizon poissonflow.transform accepts
_Z_LIMIT = 1e18


class PoissonFlow(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Poisson-flow uniformisation of features (see poissonflow.transform for each parameter).

    Parameters:
        field: "empirical" (exact field of the training features), "learned" (a
            poissonflow.LearnedField trained on them; `field_params` go to its constructor,
            e.g. {"preset": "blog"}), or an estimator such as LearnedField(preset="blog", ...):
            a sub-estimator, cloned and fitted on X in `fit` (scikit-learn's convention for
            meta-estimators), whose parameters are reachable as field__<name> in
            get_params/set_params, so GridSearchCV can tune them. To flow through an already
            trained field without retraining it, pass FrozenEstimator(field)
            (sklearn.frozen).
        start: as in poissonflow.transform ("plane" or "flux").
        solver: as in poissonflow.transform; default "rk4", or a learned field preset's.
        steps: as in poissonflow.transform; default per solver, or a learned field preset's.
        z_min: as in poissonflow.transform; "auto" follows a learned field's preset.
        z_max: as in poissonflow.transform; "auto" follows a learned field's preset.
        parameterization: as in poissonflow.transform; default the field's.
        output: as in poissonflow.transform; default "sphere", or a learned field preset's.
        exclude_self: as in poissonflow.transform.
        seed: as in poissonflow.transform.
        backend: as in poissonflow.transform.
        progress: as in poissonflow.transform (default False here).
        batch_size: as in poissonflow.transform.
        field_params: constructor arguments for field="learned" (not allowed with an instance:
            set them on it).

    The computation follows the input's dtype: float32 features are flowed in float32,
    everything else in float64 (and returned so).

    Fitted attributes: charges_ (B, d), z_min_, z_max_, field_ (learned only), n_features_in_.
    (poissonflow.transform(..., return_info=True) reports steps, exclusions and timing.)
    """

    # Checked in fit by scikit-learn's machinery (InvalidParameterError, a ValueError and a
    # TypeError, naming the parameter), so that a bad value fails before any work rather than
    # at transform time or, for batch_size <= 0, not at all. Cross-parameter rules (z_min <
    # z_max, z_min = 0 only for a radial learned flow, no flux start for a learned field) are
    # checked in fit once the field's defaults are known.
    _parameter_constraints: dict = {
        "field": [
            StrOptions({"empirical", "learned"}),
            HasMethods(["fit", "field_fn", "default_flow"]),
        ],
        "start": [StrOptions(set(STARTS))],
        "solver": [StrOptions(set(SOLVERS)), None],
        "steps": [Interval(Integral, 1, MAX_STEPS, closed="both"), None],
        "z_min": [Interval(Real, 0, _Z_LIMIT, closed="both"), StrOptions({"auto"})],
        "z_max": [Interval(Real, 0, _Z_LIMIT, closed="right"), StrOptions({"auto"})],
        "parameterization": [StrOptions(set(PARAMETERIZATIONS)), None],
        "output": [StrOptions(set(OUTPUTS)), None],
        "exclude_self": ["boolean"],
        "seed": [Interval(Integral, 0, None, closed="left"), None],
        "backend": [StrOptions({"auto", "cpu", "cuda", "triton", "reference"})],
        "progress": ["boolean", None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "field_params": [dict, None],
    }

    def __init__(
        self,
        field: str | Any = "empirical",
        start: str = "plane",
        solver: str | None = None,
        steps: int | None = None,
        z_min: float | str = "auto",
        z_max: float | str = "auto",
        parameterization: str | None = None,
        output: str | None = None,
        exclude_self: bool = True,
        seed: int | None = None,
        backend: str = "auto",
        progress: bool | None = False,
        batch_size: int = 16384,
        field_params: dict[str, Any] | None = None,
    ) -> None:
        self.field = field
        self.start = start
        self.solver = solver
        self.steps = steps
        self.z_min = z_min
        self.z_max = z_max
        self.parameterization = parameterization
        self.output = output
        self.exclude_self = exclude_self
        self.seed = seed
        self.backend = backend
        self.progress = progress
        self.batch_size = batch_size
        self.field_params = field_params

    # not prefer_skip: a LearnedField given by the user must have its own parameters validated
    # by its fit, which runs inside this one
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2, copy=True)
        import torch

        field = self._unfitted_field()
        if field is not None and self.start == "flux":
            raise ValueError(
                "start='flux' needs field='empirical' (a flux start sits next to a charge of "
                "the exact field); use start='plane' with a learned field"
            )
        if self.z_min != "auto" and self.z_max != "auto":  # refused before training a field
            _check_horizon(self.z_min, self.z_max, zero_ok=field is not None)
        charges = torch.from_numpy(X)
        self.charges_ = X
        if field is not None:
            self.field_ = field.fit(X, y)
            trained_on = getattr(self.field_, "n_features_in_", X.shape[1])
            if trained_on != X.shape[1]:
                raise ValueError(
                    f"field was trained on {trained_on}-dimensional features, but X has "
                    f"{X.shape[1]} features"
                )
            defaults = self.field_.default_flow()
        else:
            self.__dict__.pop("field_", None)  # a refit with the empirical field
            defaults = {}
        if self.z_min != "auto":
            self.z_min_ = float(self.z_min)
        elif "z_min" in defaults:
            self.z_min_ = float(defaults["z_min"])
        else:
            self.z_min_ = horizon.auto_z_min(charges)
        if self.z_max != "auto":
            self.z_max_ = float(self.z_max)
        else:
            self.z_max_ = float(defaults.get("z_max") or horizon.auto_z_max(charges))
        radial = (self.parameterization or defaults.get("parameterization")) == "radial"
        _check_horizon(
            self.z_min_,
            self.z_max_,
            zero_ok=field is not None and radial,
            source=" (from the learned field's preset)"
            if field is not None and "auto" in (self.z_min, self.z_max)
            else "",
        )
        self._n_features_out = X.shape[1] + 1
        return self

    def _unfitted_field(self):
        """The field estimator to fit on X (None for the empirical field): a new LearnedField
        for "learned", else a clone of the given estimator."""
        if isinstance(self.field, str):
            if self.field == "empirical":
                return None
            from .learned import LearnedField

            # the flow's `progress` also governs training unless field_params says otherwise
            return LearnedField(**{"progress": self.progress, **(self.field_params or {})})
        if self.field_params is not None:
            raise ValueError(
                "field_params applies to field='learned' only; with a field estimator, set "
                "its parameters on it (or as field__<name> through set_params)"
            )
        if not isinstance(self.field, FrozenEstimator) and _is_fitted(self.field):
            warnings.warn(
                "field is an already fitted estimator: PoissonFlow.fit trains a clone of it "
                "on X. To flow through it as trained, pass "
                "field=sklearn.frozen.FrozenEstimator(field).",
                UserWarning,
                stacklevel=3,
            )
        return clone(self.field)  # a FrozenEstimator clones to itself and its fit is a no-op

    def transform(self, X):
        check_is_fitted(self, "charges_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False, copy=True)
        field = getattr(self, "field_", "empirical")
        return _transform(
            X,
            charges=self.charges_.astype(X.dtype, copy=False),
            field=field,
            start=self.start,
            solver=self.solver,
            steps=self.steps,
            z_min=self.z_min_,
            z_max=self.z_max_,
            parameterization=self.parameterization,
            output=self.output,
            exclude_self=self.exclude_self,
            seed=self.seed,
            backend=self.backend,
            progress=self.progress,
            batch_size=self.batch_size,
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def _check_horizon(z_min, z_max, *, zero_ok: bool, source: str = "") -> None:
    if not z_min < z_max:
        raise ValueError(f"z_min must be < z_max, got z_min={z_min:.4g}, z_max={z_max:.4g}{source}")
    # z = 0 (the blog's start on the plane) exists only in the radial parameterisation of a
    # learned field; log-z time starts at log z_min
    if z_min <= 0 and not zero_ok:
        raise ValueError(
            "z_min must be > 0 (log-z time starts at log z_min; z_min = 0 is for "
            "the radial flow of a learned field)"
        )


def _is_fitted(estimator) -> bool:
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True
