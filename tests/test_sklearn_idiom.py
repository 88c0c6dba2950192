"""LearnedField and PoissonFlow as scikit-learn expects them: the estimator contract
(check_estimator), parameter validation in fit, nested parameters, GridSearchCV, clone, pickle.

The fields here are tiny (1-2 epochs, small batches) so that the whole module runs in about a
minute on 2 shared cores (measured: 56 s); what is tested is the estimator machinery, not the
field's accuracy (tests/test_learned.py).
"""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import check_param_validation, parametrize_with_checks

import poissonflow
from poissonflow.estimator import PoissonFlow
from poissonflow.learned import LearnedField

# check_estimator's data sets have 10-40 rows: a large batch above that is the whole set
TINY = dict(epochs=1, large_batch=64, small_batch=16, device="cpu")


@parametrize_with_checks(
    [
        LearnedField(**TINY),
        LearnedField(preset="blog", **TINY),  # the radial Euler flow from z = 0, raw output
        PoissonFlow(field=LearnedField(**TINY), steps=4),
        PoissonFlow(field=LearnedField(preset="blog", **TINY)),  # z_min = 0 on the plane
        PoissonFlow(field="learned", field_params=dict(TINY, hidden=4), steps=4),
    ]
)
def test_sklearn_contract(estimator, check):
    """Every check of scikit-learn's estimator contract, run for real. The one that does not
    run is check_array_api_input, which scikit-learn itself skips unless SCIPY_ARRAY_API=1 (the
    estimators compute with torch internally, they are not array-API compatible)."""
    check(estimator)


@pytest.mark.parametrize(
    "estimator",
    [LearnedField(**TINY), PoissonFlow(), PoissonFlow(field=LearnedField(**TINY))],
    ids=["LearnedField", "PoissonFlow", "PoissonFlow(LearnedField)"],
)
def test_every_parameter_is_validated_in_fit(estimator):
    """scikit-learn's own check (not in check_estimator's default list): every constructor
    parameter has a constraint, and a value of the wrong type or out of range makes fit (and
    fit_transform) raise InvalidParameterError naming the parameter."""
    check_param_validation(type(estimator).__name__, estimator)


def blobs(n=160, d=4, seed=0):
    X, y = make_classification(
        n_samples=n, n_features=d, n_informative=d, n_redundant=0, n_classes=2, random_state=seed
    )
    return X, y


# ---------------------------------------------------------------- bad parameters
@pytest.mark.parametrize(
    "params, exc, name",
    [
        (dict(steps=0), ValueError, "steps"),  # was accepted by fit, failed at transform
        (dict(batch_size=-5), ValueError, "batch_size"),  # returned the start points
        (dict(batch_size=0), ValueError, "batch_size"),  # "range() arg 3 must not be zero"
        (dict(batch_size=2.5), TypeError, "batch_size"),  # "'float' object cannot be ..."
        (dict(z_min=0.0), ValueError, "z_min"),  # log-z time needs z_min > 0
        (dict(z_min=2.0, z_max=1.0), ValueError, "z_min"),
        (dict(z_max=float("inf")), ValueError, "z_max"),
        (dict(field=LearnedField(**TINY), start="flux"), ValueError, "start"),
        (dict(field=LearnedField(**TINY), field_params={"epochs": 2}), ValueError, "field_params"),
        (
            dict(field="learned", field_params={**TINY, "small_batch": 65}),
            ValueError,
            "small_batch",
        ),
        (dict(field=LearnedField(epochs=0)), ValueError, "epochs"),  # nested: validated too
    ],
)
def test_poissonflow_bad_parameters_raise_in_fit(params, exc, name):
    X, _ = blobs(40)
    pf = PoissonFlow(**params)
    with pytest.raises(exc, match=name):
        pf.fit(X)


def test_horizon_is_checked_before_a_field_is_trained():
    pf = PoissonFlow(field=LearnedField(**TINY), z_min=2.0, z_max=1.0)
    with pytest.raises(ValueError, match="z_min must be < z_max"):
        pf.fit(blobs(40)[0])
    assert not hasattr(pf, "field_")
    # z_min = 0 is the blog's start on the plane (radial flow), not a log-z one
    X = blobs(40)[0]
    assert PoissonFlow(field=LearnedField(preset="blog", **TINY), z_min=0.0).fit(X).z_min_ == 0
    with pytest.raises(ValueError, match="z_min must be > 0"):
        PoissonFlow(field=LearnedField(**TINY), z_min=0.0).fit(X)


@pytest.mark.parametrize(
    "params, exc, name",
    [
        (dict(small_batch=128, large_batch=64), ValueError, "small_batch"),
        (dict(preset="pfgm", small_batch=8192), ValueError, "small_batch"),  # preset's 4096
        (dict(progress="yes"), TypeError, "progress"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(hidden=0), ValueError, "hidden"),
    ],
)
def test_learned_field_bad_parameters_raise_before_training(params, exc, name):
    f = LearnedField(**{**TINY, **params})
    with pytest.raises(exc, match=name):
        f.fit(blobs(100)[0])
    assert not hasattr(f, "net_")


def test_complex_tensors_are_refused_naming_the_argument():
    """torch's float conversion would keep the real part silently; numpy complex arrays get
    scikit-learn's "Complex data not supported"."""
    X = torch.randn(50, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="X is a complex tensor"):
        LearnedField(**TINY).fit(X)
    with pytest.raises(ValueError, match="Complex data not supported"):
        LearnedField(**TINY).fit(X.numpy())
    f = LearnedField(**TINY).fit(X.real)
    with pytest.raises(TypeError, match="X is a complex tensor"):
        f.transform(X)
    with pytest.raises(TypeError, match="x is a complex tensor"):
        f.field_fn(X, torch.ones(50))


# ---------------------------------------------------------------- LearnedField as an estimator
def test_learned_field_is_a_transformer():
    X, _ = blobs(200)
    f = LearnedField(**TINY, hidden=8)
    Z = f.fit_transform(X)
    assert f.n_features_in_ == 4 and Z.shape == (200, 5) and Z.dtype == np.float64
    assert np.array_equal(Z, f.transform(X))
    # the same flow as the function, with the preset's ODE
    assert np.array_equal(Z, poissonflow.transform(X, field=f))
    assert np.allclose(np.linalg.norm(Z, axis=1), 1.0)  # the default preset's sphere output
    assert list(f.get_feature_names_out()) == [f"learnedfield{i}" for i in range(5)]
    # torch in, torch out: float64 tensors are flowed exactly like the float64 array
    Zt = f.transform(torch.from_numpy(X))
    assert isinstance(Zt, torch.Tensor) and torch.equal(Zt, torch.from_numpy(Z))
    with pytest.raises(ValueError, match="X has 3 features, but LearnedField is expecting 4"):
        f.transform(X[:, :3])
    with pytest.raises(ValueError, match="X has 3 features"):
        f.transform(torch.from_numpy(X[:, :3]))
    with pytest.raises(NotFittedError):
        LearnedField().transform(X)


def test_constructor_keeps_the_preset_signature():
    assert LearnedField("blog").get_params()["preset"] == "blog"
    assert LearnedField(preset="blog").get_params() == LearnedField("blog").get_params()
    assert repr(LearnedField(preset="blog", epochs=3)) == "LearnedField(epochs=3, preset='blog')"
    with pytest.raises(TypeError):
        LearnedField("blog", 64)  # everything after the preset is keyword-only


def test_clone_and_pickle_round_trips_give_identical_transforms(tmp_path):
    X, _ = blobs(200)
    Q = blobs(50, seed=1)[0]
    f = LearnedField(**TINY, hidden=8, seed=3).fit(X)
    g = pickle.loads(pickle.dumps(f))
    assert np.array_equal(f.transform(Q), g.transform(Q))
    c = clone(f)
    assert not hasattr(c, "net_") and c.get_params() == f.get_params()
    assert np.array_equal(f.transform(Q), c.fit(X).transform(Q))  # a fixed seed retrains alike
    # save/load still round-trips, including the new parameter
    f.set_params(progress=False).save(tmp_path / "f.pt")
    loaded = LearnedField.load(tmp_path / "f.pt")
    assert loaded.get_params() == f.get_params()
    assert np.array_equal(f.transform(Q), loaded.transform(Q))

    pf = PoissonFlow(field=LearnedField(**TINY, hidden=8), steps=8).fit(X)
    pg = pickle.loads(pickle.dumps(pf))
    assert np.array_equal(pf.transform(Q), pg.transform(Q))
    pc = clone(pf)
    assert not hasattr(pc, "field_") and not hasattr(pc.field, "net_")
    assert np.array_equal(pf.transform(Q), pc.fit(X).transform(Q))


def test_progress_bar_only_when_stderr_is_a_terminal(capsys, monkeypatch):
    X, _ = blobs(100)
    LearnedField(**TINY).fit(X)  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""
    LearnedField(**TINY, progress=True).fit(X)
    assert "LearnedField" in capsys.readouterr().err
    LearnedField(**TINY, progress=True).fit(X, progress=False)  # the call's keyword wins
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    LearnedField(**TINY).fit(X)
    assert "LearnedField" in capsys.readouterr().err


# ---------------------------------------------------------------- PoissonFlow as a meta-estimator
def test_nested_field_parameters():
    pf = PoissonFlow(field=LearnedField(preset="blog", epochs=5))
    params = pf.get_params(deep=True)
    assert params["field__epochs"] == 5 and params["field__preset"] == "blog"
    pf.set_params(field__epochs=2, steps=16)
    assert pf.field.epochs == 2 and pf.steps == 16
    assert "field__epochs" not in PoissonFlow(field="learned").get_params(deep=True)


def test_field_estimator_is_cloned_and_fitted_in_fit():
    X, _ = blobs(200)
    given = LearnedField(**TINY, hidden=8)
    pf = PoissonFlow(field=given).fit(X)
    assert not hasattr(given, "net_")  # the parameter is left as given
    assert pf.field_ is not given and pf.field_.n_features_in_ == 4
    assert pf.z_min_ == pf.field_.settings_["z_min"] and pf.z_max_ == pf.field_.settings_["z_max"]
    # the field's preset flow: equal to flowing through the fitted field directly
    Q = blobs(30, seed=2)[0]
    assert np.array_equal(pf.transform(Q), pf.field_.transform(Q))


def test_trained_field_reused_through_frozen_estimator():
    X, _ = blobs(200)
    Q = blobs(30, seed=2)[0]
    trained = LearnedField(**TINY, hidden=8, seed=5).fit(X)
    frozen = PoissonFlow(field=FrozenEstimator(trained)).fit(X[:20])  # no retraining
    assert frozen.field_.estimator is trained
    assert np.array_equal(frozen.transform(Q), trained.transform(Q))
    with pytest.warns(UserWarning, match="FrozenEstimator"):  # a fitted field is retrained
        PoissonFlow(field=trained).fit(X)
    with pytest.raises(ValueError, match="trained on 4-dimensional features"):
        PoissonFlow(field=FrozenEstimator(trained)).fit(X[:, :3])


def test_grid_search_over_the_field_epochs():
    X, y = blobs(160)
    pipe = make_pipeline(
        PoissonFlow(field=LearnedField(**TINY, hidden=8), steps=8),
        LogisticRegression(max_iter=500),
    )
    search = GridSearchCV(pipe, {"poissonflow__field__epochs": [1, 2]}, cv=2).fit(X, y)
    assert list(search.cv_results_["param_poissonflow__field__epochs"]) == [1, 2]
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    best = search.best_estimator_.named_steps["poissonflow"]
    epochs = search.best_params_["poissonflow__field__epochs"]
    assert best.field_.settings_["epochs"] == epochs
    assert len(best.field_.loss_history_) == epochs
    assert pipe.named_steps["poissonflow"].field.epochs == 1  # the template is untouched


def test_grid_search_over_z_min():
    X, y = blobs(160)
    pipe = make_pipeline(PoissonFlow(steps=8), LogisticRegression(max_iter=500))
    search = GridSearchCV(pipe, {"poissonflow__z_min": [0.2, 0.8]}, cv=2).fit(X, y)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    best = search.best_estimator_.named_steps["poissonflow"]
    assert best.z_min_ == search.best_params_["poissonflow__z_min"]
    assert search.score(X, y) > 0.5
