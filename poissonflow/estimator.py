"""`PoissonFlow`: the Poisson-flow transform as a scikit-learn transformer.

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    clf = make_pipeline(PoissonFlow(), LogisticRegression()).fit(X_train, y_train)

`fit(X)` keeps X as the charges (or trains a learned field on it, field="learned") and fixes
the horizon (z_min, z_max) from it, so that every later `transform` maps a given feature the same
way whatever else is in the batch. `transform(X)` flows X against the fitted charges; a row equal
to a fitted charge ignores that charge (leave-one-out), so `fit_transform(X)` equals
`fit(X).transform(X)` and training rows are treated like held-out ones.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from . import horizon
from .transform import transform as _transform

__all__ = ["PoissonFlow"]


class PoissonFlow(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Poisson-flow uniformisation of features (see poissonflow.transform for each parameter).

    Parameters:
        field: "empirical" (exact field of the training features) or "learned" (a network
            trained on them with PFGM's recipe, poissonflow.LearnedField; `field_params` go to
            its constructor, e.g. {"preset": "blog"}).
        start, solver, steps, z_min, z_max, parameterization, output, exclude_self, seed,
        backend, progress, batch_size: as in poissonflow.transform.
        dtype: "auto" computes in float32 for float32 input, float64 otherwise.

    Fitted attributes: charges_ (B, d), z_min_, z_max_, field_ (learned only), n_features_in_.
    (poissonflow.transform(..., return_info=True) reports steps, exclusions and timing.)
    """

    def __init__(
        self,
        field="empirical",
        start="plane",
        solver=None,
        steps=None,
        z_min="auto",
        z_max="auto",
        parameterization=None,
        output=None,
        exclude_self=True,
        seed=None,
        backend="auto",
        progress=False,
        batch_size=16384,
        field_params=None,
    ):
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

    def fit(self, X, y=None):
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], ensure_min_samples=2, copy=True
        )
        if self.field not in ("empirical", "learned"):
            raise ValueError(f"field must be 'empirical' or 'learned', got {self.field!r}")
        import torch

        charges = torch.from_numpy(X)
        self.charges_ = X
        if self.field == "learned":
            from .learned import LearnedField

            self.field_ = LearnedField(**(self.field_params or {})).fit(X, progress=self.progress)
            defaults = self.field_.default_flow()
        else:
            defaults = {}
        self.z_min_ = (
            defaults.get("z_min", horizon.auto_z_min(charges))
            if self.z_min == "auto" else float(self.z_min)
        )
        self.z_max_ = (
            defaults.get("z_max") or horizon.auto_z_max(charges)
            if self.z_max == "auto" else float(self.z_max)
        )
        self._n_features_out = X.shape[1] + 1
        return self

    def transform(self, X):
        check_is_fitted(self, "charges_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False, copy=True)
        field = self.field_ if self.field == "learned" else "empirical"
        return _transform(
            X, charges=self.charges_.astype(X.dtype, copy=False), field=field, start=self.start,
            solver=self.solver, steps=self.steps, z_min=self.z_min_, z_max=self.z_max_,
            parameterization=self.parameterization, output=self.output,
            exclude_self=self.exclude_self, seed=self.seed, backend=self.backend,
            progress=self.progress, batch_size=self.batch_size,
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
