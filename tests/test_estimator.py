"""PoissonFlow, the scikit-learn transformer: the estimator contract and pipelines."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from poissonflow.estimator import PoissonFlow


@parametrize_with_checks([PoissonFlow(), PoissonFlow(output="raw", steps=8)])
def test_sklearn_contract(estimator, check):
    """Every check of scikit-learn's estimator contract. The only one that does not run is
    check_array_api_input, which scikit-learn itself skips unless SCIPY_ARRAY_API=1 (the
    transformer is not array-API compatible: it runs on torch tensors internally)."""
    check(estimator)


def digits(n=600):
    X, y = load_digits(return_X_y=True)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return X[:n], y[:n], X[n : n + 300], y[n : n + 300]


def test_pipeline_with_logistic_regression():
    Xtr, ytr, Xte, yte = digits()
    clf = make_pipeline(PoissonFlow(z_min=0.5), LogisticRegression(max_iter=2000))
    clf.fit(Xtr, ytr)
    acc = clf.score(Xte, yte)
    assert 0.5 < acc <= 1.0  # far above chance (0.1): the flowed features keep class structure


def test_fit_transform_equals_fit_then_transform_and_fixes_horizon():
    Xtr, _, Xte, _ = digits()
    pf = PoissonFlow()
    a = pf.fit_transform(Xtr)
    b = pf.fit(Xtr).transform(Xtr)
    assert np.array_equal(a, b)
    zmin, zmax = pf.z_min_, pf.z_max_
    pf.transform(Xte)  # transforming other data does not move the fitted horizon
    assert (pf.z_min_, pf.z_max_) == (zmin, zmax)
    assert a.shape == (600, 65) and pf.get_feature_names_out()[0] == "poissonflow0"


def test_dimension_mismatch_between_fit_and_transform():
    Xtr, _, _, _ = digits()
    pf = PoissonFlow().fit(Xtr)
    with pytest.raises(ValueError, match="features"):
        pf.transform(Xtr[:, :10])


def test_unknown_field_is_rejected():
    # scikit-learn's wording (InvalidParameterError, a ValueError): the parameter and its choices
    with pytest.raises(ValueError, match="'field' parameter of PoissonFlow must be") as err:
        PoissonFlow(field="exact").fit(digits()[0])
    assert "'empirical'" in str(err.value) and "'learned'" in str(err.value)
