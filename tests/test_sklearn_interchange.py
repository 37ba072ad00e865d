"""scikit-learn interchange (issue 16, item 3): ``GaussianMixture.to_sklearn`` and ``from_sklearn``.

References are scikit-learn itself (its formulas score the converted
models, its EM fits the same data in a Pipeline) and, for an update after
a conversion, one stepwise EM step written out in numpy below.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.mixture import BayesianGaussianMixture
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

import streamem
from workflow_helpers import COVARIANCE_TYPES, inits, mixture_sample, quiet_fit, sklearn_fit, write_zarr

N_ROWS = 3000
CHUNK_ROWS = 700  # 4 chunks of 700 and one of 200
TIGHT = dict(rtol=1e-12, atol=1e-12)
LEARNED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")
#: The constructor parameters both classes have, and a non-default value for each (checked to travel).
SHARED_PARAMS = dict(n_components=3, tol=1e-4, reg_covar=1e-5, max_iter=40, n_init=1, init_params="k-means++",
                     random_state=7, warm_start=False, verbose=0, verbose_interval=5)  # fmt: skip


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=161, spread=0.5)  # overlapping: probabilities are not all 0 or 1


@pytest.fixture(scope="module")
def zarr_path(X, tmp_path_factory) -> str:
    return write_zarr(tmp_path_factory.mktemp("interchange") / "data.zarr", X, CHUNK_ROWS)


def assert_same_predictions(a, b, X) -> None:
    """predict equal, predict_proba and score_samples equal to 1e-12, for two models on numpy ``X``."""
    assert_array_equal(np.asarray(a.predict(X)), np.asarray(b.predict(X)))
    assert_allclose(np.asarray(a.predict_proba(X)), np.asarray(b.predict_proba(X)), **TIGHT)
    assert_allclose(np.asarray(a.score_samples(X)), np.asarray(b.score_samples(X)), **TIGHT)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_to_sklearn_from_a_zarr_fit(covariance_type, X, zarr_path):
    params = {**SHARED_PARAMS, "covariance_type": covariance_type, **inits(covariance_type)}
    model = quiet_fit(streamem.GaussianMixture(**params, batch_size=500), zarr_path)
    sk = model.to_sklearn()

    assert type(sk) is SkGaussianMixture
    sk_params = sk.get_params()
    for name, value in params.items():
        assert_array_equal(sk_params[name], value, err_msg=name)
    for name in LEARNED:
        assert_array_equal(getattr(sk, name), getattr(model, name), err_msg=name)
        assert not np.shares_memory(getattr(sk, name), getattr(model, name)), name
    assert (sk.converged_, sk.n_iter_, sk.lower_bound_) == (model.converged_, model.n_iter_, model.lower_bound_)
    assert sk.lower_bounds_ == model.lower_bounds_  # scikit-learn >= 1.7 (this environment) has it
    assert sk.n_features_in_ == 3 and not hasattr(sk, "feature_names_in_")

    # scikit-learn's own formulas score it as streamem does, on the rows of the store.
    assert_same_predictions(model, sk, X)
    assert_array_equal(np.asarray(model.predict(zarr_path)), sk.predict(X))
    assert_allclose(sk.score(X), model.score(zarr_path), rtol=1e-12)
    assert_allclose(sk.bic(X), model.bic(zarr_path), rtol=1e-12)

    # Back again: the same model, bit for bit.
    back = streamem.GaussianMixture.from_sklearn(sk)
    for name in LEARNED:
        assert_array_equal(getattr(back, name), getattr(model, name), err_msg=name)
    assert back.lower_bounds_ == model.lower_bounds_
    assert_same_predictions(back, model, X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_from_sklearn_predicts_saves_and_loads(covariance_type, X, zarr_path, tmp_path):
    sk = sklearn_fit(X, **SHARED_PARAMS, covariance_type=covariance_type)
    model = streamem.GaussianMixture.from_sklearn(sk, n_samples=N_ROWS)

    assert type(model) is streamem.GaussianMixture
    for name, value in {**SHARED_PARAMS, "covariance_type": covariance_type}.items():
        assert getattr(model, name) == value, name
    for name in LEARNED:
        assert_allclose(getattr(model, name), getattr(sk, name), rtol=1e-14, atol=0, err_msg=name)
    assert_array_equal(model.precisions_cholesky_, sk.precisions_cholesky_)  # taken as they are, not recomputed
    assert (model.converged_, model.n_iter_, model.lower_bound_) == (sk.converged_, sk.n_iter_, sk.lower_bound_)
    assert model.lower_bounds_ == list(sk.lower_bounds_)
    assert model.n_rows_seen_ == N_ROWS and model.prior_ is None
    assert_same_predictions(model, sk, X)
    assert_allclose(np.asarray(model.score_samples(zarr_path)), sk.score_samples(X), **TIGHT)

    path = tmp_path / "model.zarr"
    model.save(path)
    loaded = streamem.load(path)
    assert loaded.n_rows_seen_ == N_ROWS and loaded.fit_data_["source"] == "sklearn.mixture.GaussianMixture"
    assert_same_predictions(loaded, sk, X)
    assert_same_predictions(loaded.to_sklearn(), sk, X)


def test_feature_names_travel_both_ways(X, tmp_path):
    frame = pd.DataFrame(X, columns=["depth", "speed", "heat"])
    sk = sklearn_fit(frame, n_components=3, covariance_type="diag", random_state=0)
    model = streamem.GaussianMixture.from_sklearn(sk)
    assert_array_equal(model.feature_names_in_, ["depth", "speed", "heat"])
    model.save(tmp_path / "named.zarr")
    loaded = streamem.load(tmp_path / "named.zarr")
    assert_array_equal(loaded.predict(frame), sk.predict(frame))
    back = loaded.to_sklearn()
    assert_array_equal(back.feature_names_in_, ["depth", "speed", "heat"])
    with pytest.raises(ValueError, match="feature names"):  # scikit-learn's own check, on the converted model
        back.predict(frame.rename(columns={"heat": "cold"}))


def test_from_sklearn_refuses_what_it_cannot_convert(X):
    with pytest.raises(ValueError, match="unfitted sklearn.mixture.GaussianMixture"):
        streamem.GaussianMixture.from_sklearn(SkGaussianMixture(n_components=2))
    bayes = BayesianGaussianMixture(n_components=2, max_iter=5, random_state=0)
    with pytest.warns(Warning):
        bayes.fit(X)
    with pytest.raises(TypeError, match="BayesianGaussianMixture"):
        streamem.GaussianMixture.from_sklearn(bayes)
    fitted = sklearn_fit(X, n_components=2, random_state=0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=f"n_samples must be None or an integer >= 0, got {bad!r}"):
            streamem.GaussianMixture.from_sklearn(fitted, n_samples=bad)
    with pytest.raises(NotFittedError, match="not fitted"):
        streamem.GaussianMixture().to_sklearn()


def test_converted_estimator_is_scikit_learns_to_refit(X):
    """The converted estimator's parameters are scikit-learn's: a clone refits as scikit-learn would."""
    model = quiet_fit(streamem.GaussianMixture(**SHARED_PARAMS, covariance_type="tied"), X)
    refit = clone(model.to_sklearn()).fit(X)
    reference = SkGaussianMixture(**SHARED_PARAMS, covariance_type="tied").fit(X)
    assert_allclose(refit.means_, reference.means_, rtol=0, atol=0)


# ------------------------------------------------------------------ Pipeline
def scaled_features(X: np.ndarray) -> np.ndarray:
    """Features on very different scales and offsets, so that the scaler matters."""
    return X * np.array([1.0, 250.0, 0.01]) + np.array([0.0, -4000.0, 3.0])


def test_pipeline_with_a_scaler_fits_as_scaler_then_fit(X):
    raw = scaled_features(X)
    params = dict(n_components=3, covariance_type="full", random_state=3, tol=1e-6, max_iter=200)
    pipe = Pipeline([("scale", StandardScaler()), ("gm", streamem.GaussianMixture(**params))]).fit(raw)

    scaled = StandardScaler().fit_transform(raw)
    manual = streamem.GaussianMixture(**params).fit(scaled)
    assert_array_equal(pipe.predict(raw), manual.predict(scaled))
    assert_allclose(pipe.score_samples(raw), manual.score_samples(scaled), **TIGHT)
    # Independent: scikit-learn's own Pipeline, from the same start in the scaled space, takes the same EM steps.
    start = dict(means_init=manual.means_ + 0.2, weights_init=np.full(3, 1 / 3), precisions_init=np.repeat(2 * np.eye(3)[None], 3, 0))
    steps = dict(params, tol=0.0, max_iter=25)
    with pytest.warns(ConvergenceWarning):
        ours = make_pipeline(StandardScaler(), streamem.GaussianMixture(**steps, **start)).fit(raw)
    with pytest.warns(ConvergenceWarning):
        theirs = make_pipeline(StandardScaler(), SkGaussianMixture(**steps, **start)).fit(raw)
    assert_array_equal(ours.predict(raw), theirs.predict(raw))
    for name in ("weights_", "means_", "covariances_"):
        assert_allclose(getattr(ours[-1], name), getattr(theirs[-1], name), rtol=1e-8, atol=1e-10, err_msg=name)


def test_zarr_fit_used_in_a_pipeline_on_numpy_input(X, tmp_path):
    raw = scaled_features(X)
    scaler = StandardScaler().fit(raw)
    store = write_zarr(tmp_path / "scaled.zarr", scaler.transform(raw), CHUNK_ROWS)
    model = quiet_fit(streamem.GaussianMixture(n_components=3, covariance_type="diag", random_state=0, max_iter=30), store)
    on_store = np.asarray(model.predict(store))

    for last in (model, model.to_sklearn()):  # streamem's estimator itself, and its scikit-learn twin
        pipe = Pipeline([("scale", scaler), ("gm", last)])  # fitted steps: no fit needed
        assert_array_equal(pipe.predict(raw), on_store)
        assert_allclose(pipe.score_samples(raw), np.asarray(model.score_samples(store)), **TIGHT)


# -------------------------------------------------------------------- update
def one_stepwise_step(sk: SkGaussianMixture, X_new: np.ndarray, eta: float) -> dict[str, np.ndarray]:
    """Stepwise EM's first step from ``sk``'s parameters on one mini-batch ``X_new``, in numpy.

    The running statistics per row start as those of the model's own
    parameters (weights, first moments, second moments without the
    regularisation), the mini-batch's per-row statistics are averaged in
    with weight ``eta``, and the M-step of scikit-learn's covariance types
    follows.
    """
    K, d = sk.means_.shape
    reg, ct = sk.reg_covar, sk.covariance_type
    cov = {"full": lambda c: c, "tied": lambda c: np.repeat(c[None], K, 0), "diag": lambda c: c[:, :, None] * np.eye(d),
           "spherical": lambda c: c[:, None, None] * np.eye(d)}[ct](sk.covariances_)  # fmt: skip
    w, mu = sk.weights_ / sk.weights_.sum(), sk.means_
    resp = sk.predict_proba(X_new)
    n = len(X_new)
    nk = (1 - eta) * w + eta * resp.sum(0) / n
    first = (1 - eta) * w[:, None] * mu + eta * resp.T @ X_new / n
    second = (1 - eta) * w[:, None, None] * (cov - reg * np.eye(d) + np.einsum("ki,kj->kij", mu, mu)) + eta * np.einsum(
        "nk,ni,nj->kij", resp, X_new, X_new) / n  # fmt: skip
    means = first / nk[:, None]
    scatter = second - nk[:, None, None] * np.einsum("ki,kj->kij", means, means)
    full = scatter / nk[:, None, None]
    covariances = {"full": full + reg * np.eye(d), "tied": scatter.sum(0) / nk.sum() + reg * np.eye(d),
                   "diag": np.diagonal(full, axis1=1, axis2=2) + reg,
                   "spherical": np.diagonal(full, axis1=1, axis2=2).mean(1) + reg}[ct]  # fmt: skip
    return {"weights_": nk / nk.sum(), "means_": means, "covariances_": covariances}


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("n_samples, eta", [(20_000, 0.1), (None, 0.5)])
def test_update_of_a_converted_model(covariance_type, n_samples, eta, X, tmp_path):
    """update() weighs 2,000 new rows (one mini-batch) by batch_size / n_samples; without n_samples by 1 / step_offset."""
    sk = sklearn_fit(X, n_components=3, covariance_type=covariance_type, random_state=1, max_iter=30)
    X_new = mixture_sample(2000, seed=162, spread=0.5) + np.array([0.3, -0.2, 0.1])  # a little drift
    store = write_zarr(tmp_path / "new.zarr", X_new, 2000)
    expected = one_stepwise_step(sk, X_new, eta)

    model = streamem.GaussianMixture.from_sklearn(sk, n_samples=n_samples).set_params(batch_size=2000)  # one mini-batch
    model.save(tmp_path / "converted.zarr")
    loaded = streamem.load(tmp_path / "converted.zarr")
    for updated in (model.update(store), loaded.update(store)):  # in memory, and after a save and load
        for name, value in expected.items():
            assert_allclose(getattr(updated, name), value, rtol=1e-10, atol=1e-12, err_msg=name)
        assert updated.n_rows_seen_ == (n_samples or 0) + 2000
    assert_same_predictions(model, loaded, X)
