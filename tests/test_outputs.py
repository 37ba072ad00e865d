"""Outputs: numpy in -> numpy out, lazy in -> lazy out, xarray in -> xarray out; values as scikit-learn's."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import streamem
from _common import IRREGULAR_CHUNKS, N_FEATURES, fit_quietly, make_data, make_inits, sklearn_fit

RTOL = 1e-8
#: Probabilities that underflow differently (~1e-300) are equal for this test.
PROBA_ATOL = 1e-200


@pytest.fixture(scope="module", params=["full", "tied", "diag", "spherical"])
def fitted(request):
    """(streamem model, scikit-learn model) fitted on the same data from the same inits."""
    ct = request.param
    X = make_data()
    params = dict(n_components=3, covariance_type=ct, tol=0, max_iter=15, random_state=42, **make_inits(ct))
    return fit_quietly(streamem.GaussianMixture(**params), X), sklearn_fit(X, **params)


@pytest.fixture(scope="module")
def X_new():
    """Data the models were not fitted on, including points far from every component."""
    X = make_data(n=600, seed=99)
    X[:5] += 40.0
    return X


def test_numpy_in_numpy_out(fitted, X_new):
    ours, ref = fitted
    labels = ours.predict(X_new)
    proba = ours.predict_proba(X_new)
    logp = ours.score_samples(X_new)
    for out in (labels, proba, logp):
        assert type(out) is np.ndarray
    assert labels.shape == (600,) and proba.shape == (600, 3) and logp.shape == (600,)
    assert np.issubdtype(labels.dtype, np.integer)
    assert_array_equal(labels, ref.predict(X_new))
    assert_allclose(proba, ref.predict_proba(X_new), rtol=RTOL, atol=PROBA_ATOL)
    assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert_allclose(logp, ref.score_samples(X_new), rtol=RTOL)


def test_score_bic_aic_match_sklearn(fitted, X_new):
    ours, ref = fitted
    for X in (X_new, make_data()):
        assert isinstance(ours.score(X), float)
        assert_allclose(ours.score(X), ref.score(X), rtol=RTOL)
        assert_allclose(ours.bic(X), ref.bic(X), rtol=RTOL)
        assert_allclose(ours.aic(X), ref.aic(X), rtol=RTOL)


def test_fit_predict_matches_sklearn(fitted):
    ours, ref = fitted
    X = make_data()
    model = streamem.GaussianMixture(**ours.get_params())
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = model.fit_predict(X)
    assert_array_equal(labels, ref.predict(X))
    assert_array_equal(labels, model.predict(X))


def test_dask_in_dask_out(fitted, X_new):
    ours, ref = fitted
    chunks = (100, 250, 50, 200)
    Xd = da.from_array(X_new, chunks=(chunks, -1))
    labels, proba, logp = ours.predict(Xd), ours.predict_proba(Xd), ours.score_samples(Xd)
    for out in (labels, proba, logp):
        assert isinstance(out, da.Array)  # lazy
        assert out.chunks[0] == chunks
    assert proba.chunks[1] == (3,)
    assert_array_equal(labels.compute(), ref.predict(X_new))
    assert_allclose(proba.compute(), ref.predict_proba(X_new), rtol=RTOL, atol=PROBA_ATOL)
    assert_allclose(logp.compute(), ref.score_samples(X_new), rtol=RTOL)
    assert_allclose(ours.score(Xd), ref.score(X_new), rtol=RTOL)
    assert_allclose(ours.bic(Xd), ref.bic(X_new), rtol=RTOL)


def test_zarr_in_dask_out(fitted, X, zarr_path):
    ours, ref = fitted
    for source in (zarr_path, zarr.open_array(zarr_path, mode="r")):
        labels, proba, logp = ours.predict(source), ours.predict_proba(source), ours.score_samples(source)
        for out in (labels, proba, logp):
            assert isinstance(out, da.Array)
            assert out.chunks[0] == (700,) * 6 + (300,)
        assert_array_equal(labels.compute(), ref.predict(X))
        assert_allclose(proba.compute(), ref.predict_proba(X), rtol=RTOL, atol=PROBA_ATOL)
        assert_allclose(logp.compute(), ref.score_samples(X), rtol=RTOL)
    assert_allclose(ours.score(zarr_path), ref.score(X), rtol=RTOL)
    assert_allclose(ours.aic(zarr_path), ref.aic(X), rtol=RTOL)
    assert_allclose(ours.bic(zarr_path), ref.bic(X), rtol=RTOL)


def test_irregular_dask_chunks_are_kept(fitted, X_irregular):
    ours, _ = fitted
    assert ours.predict(X_irregular).chunks[0] == IRREGULAR_CHUNKS
    assert ours.predict_proba(X_irregular).chunks == (IRREGULAR_CHUNKS, (3,))


def _timed(X):
    time = pd.date_range("2021-06-01", periods=len(X), freq="min")
    return xr.DataArray(X, dims=("time", "feature"), coords={"time": time, "feature": ["u", "v", "w"]})


@pytest.mark.parametrize("layout", ["time, feature", "feature, time", "dataset"])
def test_xarray_in_xarray_out(fitted, X_new, layout):
    ours, ref = fitted
    arr = _timed(X_new)
    kwargs = {"sample_dim": "time"}
    source = arr
    if layout == "feature, time":
        source = arr.transpose("feature", "time")
    elif layout == "dataset":
        source = xr.Dataset({"obs": arr, "flag": ("time", np.zeros(len(X_new)))})
        kwargs = {"variable": "obs"}
    labels = ours.predict(source, **kwargs)
    proba = ours.predict_proba(source, **kwargs)
    logp = ours.score_samples(source, **kwargs)
    for out in (labels, proba, logp):
        assert isinstance(out, xr.DataArray)
        assert out.dims[0] == "time"
        assert_array_equal(out["time"].values, arr["time"].values)
    assert labels.dims == ("time",) and logp.dims == ("time",)
    assert proba.dims == ("time", "component")
    assert proba.shape == (len(X_new), 3)
    assert_array_equal(labels.values, ref.predict(X_new))
    assert_allclose(proba.values, ref.predict_proba(X_new), rtol=RTOL, atol=PROBA_ATOL)
    assert_allclose(logp.values, ref.score_samples(X_new), rtol=RTOL)
    assert_allclose(ours.score(source, **kwargs), ref.score(X_new), rtol=RTOL)


def test_xarray_output_is_selectable_by_time(fitted, X_new):
    """The time coordinate is usable: selecting a time gives that row's prediction."""
    ours, ref = fitted
    arr = _timed(X_new)
    proba = ours.predict_proba(arr, sample_dim="time")
    t = arr["time"].values[123]
    assert_allclose(proba.sel(time=t).values, ref.predict_proba(X_new[123:124])[0], rtol=RTOL, atol=PROBA_ATOL)


# ------------------------------------------------------------------ sample
def _sklearn_with_params(model) -> SkGaussianMixture:
    """A scikit-learn model holding exactly ``model``'s parameters."""
    sk = SkGaussianMixture(n_components=model.n_components, covariance_type=model.covariance_type, random_state=model.random_state)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        setattr(sk, name, getattr(model, name))
    sk.converged_, sk.n_iter_, sk.lower_bound_, sk.n_features_in_ = True, 1, 0.0, N_FEATURES
    return sk


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_sample_matches_sklearn(fitted, n):
    ours, ref = fitted
    X, y = ours.sample(n)
    assert X.shape == (n, N_FEATURES) and y.shape == (n,)
    assert np.issubdtype(y.dtype, np.integer)
    X_ref, y_ref = _sklearn_with_params(ours).sample(n)
    assert_array_equal(y, y_ref)
    assert_allclose(X, X_ref, rtol=1e-12, atol=1e-12)
    # And close to the scikit-learn model fitted from the same inits.
    X_fit, y_fit = ref.sample(n)
    assert_array_equal(y, y_fit)
    assert_allclose(X, X_fit, rtol=1e-6, atol=1e-6)


def test_sample_statistics(fitted):
    """Sample moments agree with the model parameters (a check that does not use scikit-learn)."""
    ours, _ = fitted
    X, y = ours.sample(20000)
    counts = np.bincount(y, minlength=3) / len(y)
    assert_allclose(counts, ours.weights_, atol=0.015)
    for k in range(3):
        assert_allclose(X[y == k].mean(axis=0), ours.means_[k], atol=0.1)


def test_sample_rejects_bad_n(fitted):
    ours, _ = fitted
    with pytest.raises(ValueError, match="n_samples"):
        ours.sample(0)


def test_unfitted_model_raises():
    from sklearn.exceptions import NotFittedError

    model = streamem.GaussianMixture(n_components=2)
    for method in (model.predict, model.predict_proba, model.score_samples, model.score):
        with pytest.raises(NotFittedError):
            method(np.zeros((3, 2)))
    with pytest.raises(NotFittedError):
        model.sample(3)


def test_output_types_through_fit_on_lazy_data(X, zarr_path):
    """A model fitted on a Zarr store answers numpy for numpy input and dask for the store."""
    model = fit_quietly(streamem.GaussianMixture(n_components=3, tol=0, max_iter=5, **make_inits("diag"), covariance_type="diag"), zarr_path)
    assert type(model.predict(np.asarray(X))) is np.ndarray
    assert isinstance(model.predict(zarr_path), da.Array)


# ------------------------------------------- per-row outputs in slices (13.13)
def _models_with_params(covariance_type: str, K: int, d: int, seed: int = 0):
    """(streamem, scikit-learn) models holding the same random parameters, without a fit."""
    rng = np.random.RandomState(seed)
    weights = rng.dirichlet(np.full(K, 5.0))
    means = rng.normal(size=(K, d)) * 3
    if covariance_type in ("full", "tied"):
        A = rng.normal(size=(K, d, d)) * 0.2 + np.eye(d)
        covs = A @ A.transpose(0, 2, 1)
        covs = covs if covariance_type == "full" else covs[0]
    else:
        covs = rng.uniform(0.5, 2.0, size=(K, d) if covariance_type == "diag" else K)
    ours = streamem.GaussianMixture(n_components=K, covariance_type=covariance_type)
    family = ours._family()
    prec_chol = family.precision_cholesky(covs)
    ref = SkGaussianMixture(n_components=K, covariance_type=covariance_type)
    for model in (ours, ref):
        model.weights_, model.means_, model.covariances_ = weights, means, covs
        model.precisions_cholesky_, model.precisions_ = prec_chol, family.precisions(prec_chol)
        model.converged_, model.n_iter_, model.lower_bound_, model.n_features_in_ = True, 1, 0.0, d
    return ours, ref


def _peak_bytes(fn, *args):
    """Peak bytes allocated while ``fn(*args)`` runs (numpy reports its buffers to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


PREDICTIONS = ("predict", "predict_proba", "score_samples", "score", "bic")


@pytest.mark.parametrize("method", PREDICTIONS)
@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_predictions_of_a_large_model_stay_within_slice_buffers(covariance_type, method):
    """One 16,384-row chunk, K=64, d=32: the E-step's K x d x n work arrays alone would take 256 MiB.

    Evaluated in slices like fit's E-step, the peak stays below 3 x
    SLICE_BYTES (96 MiB) including the outputs (8 MiB for predict_proba);
    the results are scikit-learn's.
    """
    from streamem.families.gaussian import SLICE_BYTES

    K, d, n = 64, 32, 16384
    ours, ref = _models_with_params(covariance_type, K, d)
    X = ref.sample(n)[0]
    out, peak = _peak_bytes(getattr(ours, method), X)
    assert peak < 3 * SLICE_BYTES, f"{method}: peak {peak / 2**20:.0f} MiB"
    expected = getattr(ref, method)(X)
    if method == "predict":
        assert_array_equal(out, expected)
    else:
        assert_allclose(out, expected, rtol=1e-8, atol=PROBA_ATOL)


def test_outputs_over_many_slices_match_sklearn(monkeypatch, fitted, X_new):
    """Slices of 256 rows (600 rows: three slices, the last one short) change nothing."""
    from streamem.families import gaussian

    monkeypatch.setattr(gaussian, "SLICE_ROWS", 256)
    ours, ref = fitted
    Xd = da.from_array(X_new, chunks=(550, -1))  # one chunk of three slices, one of a part slice
    for source in (X_new, Xd):
        assert_array_equal(np.asarray(ours.predict(source)), ref.predict(X_new))
        assert_allclose(np.asarray(ours.predict_proba(source)), ref.predict_proba(X_new), rtol=RTOL, atol=PROBA_ATOL)
        assert_allclose(np.asarray(ours.score_samples(source)), ref.score_samples(X_new), rtol=RTOL)
        assert_allclose(ours.score(source), ref.score(X_new), rtol=RTOL)
        assert_allclose(ours.bic(source), ref.bic(X_new), rtol=RTOL)


@pytest.mark.parametrize("method", PREDICTIONS)
def test_predictions_count_nonfinite_values(fitted, X_new, method):
    """NaN, +inf and -inf (which cancel to NaN in a sum) are counted; huge finite values are not refused."""
    ours, _ = fitted
    bad = np.array(X_new)
    bad[3, 0], bad[10, 1], bad[11, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=r"X contains 3 non-finite values"):
        np.asarray(getattr(ours, method)(bad))
    huge = np.array(X_new)
    huge[:4] = 1e308  # their sum overflows; the data are finite
    with np.errstate(all="ignore"):
        getattr(ours, method)(huge)
