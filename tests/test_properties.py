"""Property tests (DESIGN.md §6): chunking does not matter, EM is monotone, stats add up.

The worker-count property (threads vs sync vs a 2-process cluster) is in
test_distributed.py, next to the cluster fixture.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import streamem
from _common import COVARIANCE_TYPES, N_SAMPLES, PARITY_MAX_ITER, assert_same_fit, fit_quietly, make_data, make_inits
from streamem.families.gaussian import GaussianFamily, GaussianParams

#: Chunking only changes the order of floating-point sums.
CHUNKING_RTOL = 1e-12

_X = make_data()

# Fit every covariance type once on a single chunk: the reference for all chunkings.
_SINGLE_CHUNK = {}


def _fit(X, covariance_type):
    with dask.config.set(scheduler="threads"):
        return fit_quietly(
            streamem.GaussianMixture(
                n_components=3, covariance_type=covariance_type, tol=0, max_iter=PARITY_MAX_ITER, **make_inits(covariance_type)
            ),
            X,
        )


def _single_chunk(covariance_type):
    if covariance_type not in _SINGLE_CHUNK:
        _SINGLE_CHUNK[covariance_type] = _fit(da.from_array(_X, chunks=(N_SAMPLES, -1)), covariance_type)
    return _SINGLE_CHUNK[covariance_type]


@st.composite
def row_chunkings(draw, n=N_SAMPLES, max_chunks=12):
    """Random row chunk sizes summing to n (chunks of a single row allowed)."""
    cuts = draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=max_chunks - 1, unique=True))
    edges = [0, *sorted(cuts), n]
    return tuple(int(b - a) for a, b in zip(edges[:-1], edges[1:]))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=row_chunkings(), covariance_type=st.sampled_from(COVARIANCE_TYPES))
def test_result_does_not_depend_on_chunking(chunks, covariance_type):
    X = da.from_array(_X, chunks=(chunks, -1))
    assert X.chunks[0] == chunks
    ours = _fit(X, covariance_type)
    assert_same_fit(ours, _single_chunk(covariance_type), CHUNKING_RTOL)


def test_result_does_not_depend_on_zarr_chunking(tmp_path):
    """The same data stored with three different chunkings on disk fit the same model."""
    from conftest import write_zarr

    fits = []
    for rows in (4500, 1000, 333):
        path = write_zarr(tmp_path / f"x{rows}.zarr", _X, (rows, 2))  # column chunks get merged too
        assert streamem.load_data(path).array.chunks[0][0] == rows
        fits.append(_fit(path, "full"))
    assert_same_fit(fits[1], fits[0], CHUNKING_RTOL)
    assert_same_fit(fits[2], fits[0], CHUNKING_RTOL)


def test_chunk_rows_argument_does_not_change_the_fit():
    """load_data(chunk_rows=...) re-chunks; the fit is the same."""
    a = _fit(streamem.load_data(_X, chunk_rows=257).array, "diag")
    assert_same_fit(a, _single_chunk("diag"), CHUNKING_RTOL)


# ------------------------------------------------------------------ monotone
@st.composite
def mixture_data(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    n_features = draw(st.integers(2, 5))
    n_components = draw(st.integers(2, 4))
    n = draw(st.integers(200, 800))
    rng = np.random.RandomState(seed)
    means = rng.normal(scale=draw(st.sampled_from([0.5, 2.0, 5.0])), size=(n_components, n_features))
    labels = rng.randint(n_components, size=n)
    scales = rng.uniform(0.3, 2.0, size=(n_components, n_features))
    mixing = rng.normal(size=(n_features, n_features)) * 0.3 + np.eye(n_features)
    X = (rng.standard_normal((n, n_features)) * scales[labels]) @ mixing + means[labels]
    return X, n_components, seed


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=mixture_data(),
    covariance_type=st.sampled_from(COVARIANCE_TYPES),
    init_params=st.sampled_from(["kmeans", "random_from_data", "k-means++", "random"]),
    n_chunks=st.integers(1, 5),
)
def test_lower_bounds_never_decrease(data, covariance_type, init_params, n_chunks):
    """The EM log-likelihood is monotone (up to rounding).

    With ``reg_covar=0`` the M-step is the exact maximiser and the bound cannot
    decrease. (With ``reg_covar > 0`` it can: a component that collapses onto a
    handful of points gets an eigenvalue of order ``reg_covar``, and the
    regularised M-step then lowers the likelihood -- scikit-learn shows the
    same 1.8e-6 decrease from the same start on such data, so that is not
    tested here.) A fit that stops because a component collapsed onto fewer
    than n_features + 1 points (singular covariance, "ill-defined" error) is
    not an example of EM and is rejected.
    """
    X, n_components, seed = data
    rows = -(-len(X) // n_chunks)
    model = streamem.GaussianMixture(
        n_components=n_components,
        covariance_type=covariance_type,
        init_params=init_params,
        random_state=seed,
        reg_covar=0.0,
        tol=0,
        max_iter=25,
    )
    try:
        fit_quietly(model, da.from_array(X, chunks=(rows, -1)))
    except ValueError as exc:
        if "ill-defined empirical covariance" not in str(exc):
            raise
        reject()
    lb = np.asarray(model.lower_bounds_)
    assert len(lb) == 25 and np.all(np.isfinite(lb))
    slack = 1e-10 * np.abs(lb[1:])
    assert np.all(np.diff(lb) >= -slack), np.diff(lb)
    assert model.lower_bound_ == lb[-1]


def test_lower_bounds_never_decrease_default_settings(X):
    """Default reg_covar on well-behaved data (no collapsing component): monotone too, on a Zarr-like chunking."""
    for covariance_type in COVARIANCE_TYPES:
        model = fit_quietly(
            streamem.GaussianMixture(n_components=3, covariance_type=covariance_type, init_params="k-means++", random_state=1, tol=0, max_iter=30),
            da.from_array(np.asarray(X), chunks=(700, -1)),
        )
        lb = np.asarray(model.lower_bounds_)
        assert np.all(np.diff(lb) >= -1e-10 * np.abs(lb[1:])), (covariance_type, np.diff(lb))


# ------------------------------------------------------------- additivity
@settings(max_examples=10, deadline=None)
@given(
    covariance_type=st.sampled_from(COVARIANCE_TYPES),
    split=st.integers(1, 499),
    seed=st.integers(0, 2**31 - 1),
)
def test_stats_of_a_union_are_the_sum(covariance_type, split, seed):
    """stats(A ∪ B) = stats(A) + stats(B), and they give the textbook weighted moments."""
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(500, 3)) * 2 + 1e3  # far from the origin on purpose
    resp = rng.dirichlet(np.ones(3), size=500)
    center = rng.normal(size=(3, 3)) + 1e3
    fam = GaussianFamily(covariance_type, reg_covar=0.0)
    whole = fam.stats_from_resp(X, resp, center)
    parts = fam.stats_from_resp(X[:split], resp[:split], center) + fam.stats_from_resp(X[split:], resp[split:], center)
    for name in whole.arrays:
        assert_allclose(parts[name], whole[name], rtol=1e-10, atol=1e-8, err_msg=name)
    # The M-step of the summed stats gives the weighted means/covariances computed directly.
    params = fam.m_step(parts, center)
    nk = resp.sum(axis=0)
    means = (resp.T @ X) / nk[:, None]
    assert_allclose(params.means, means, rtol=1e-12)
    assert_allclose(params.weights, nk / nk.sum(), rtol=1e-12)
    covs = np.array([((X - means[k]) * resp[:, k : k + 1]).T @ (X - means[k]) / nk[k] for k in range(3)])
    expected = {
        "full": covs,
        "tied": (covs * nk[:, None, None]).sum(axis=0) / nk.sum(),
        "diag": np.array([np.diag(c) for c in covs]),
        "spherical": np.array([np.diag(c).mean() for c in covs]),
    }[covariance_type]
    assert_allclose(params.covariances, expected, rtol=1e-8)


def test_chunk_stats_loglik_is_the_mixture_loglik():
    """chunk_stats' loglik is sum_i log sum_k w_k N(x_i | mu_k, Sigma_k), computed here with scipy."""
    from scipy.stats import multivariate_normal

    rng = np.random.RandomState(3)
    X = rng.normal(size=(50, 3))
    inits = make_inits("full")
    fam = GaussianFamily("full")
    covs = np.linalg.inv(inits["precisions_init"])
    params = GaussianParams(inits["weights_init"], inits["means_init"], covs, fam.precision_cholesky(covs))
    stats = fam.chunk_stats(X, params)
    dens = sum(w * multivariate_normal(m, c).pdf(X) for w, m, c in zip(inits["weights_init"], inits["means_init"], covs))
    assert_allclose(stats.loglik, np.log(dens).sum(), rtol=1e-12)
    assert stats.n == 50


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 2e-5)])
def test_chunk_stats_over_many_slices_are_the_textbook_moments(monkeypatch, covariance_type, dtype, rtol):
    """Statistics from the E-step's whitened residuals, summed over slices, against scipy + numpy directly.

    The data sit at 1e6 from the origin: float32 must lose nothing to the offset.
    """
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    from streamem.families import gaussian

    monkeypatch.setattr(gaussian, "SLICE_ROWS", 300)  # 1000 rows: 4 slices, the last one short
    rng = np.random.RandomState(5)
    K, d = 3, 4
    means = rng.normal(size=(K, d)) * 3 + 1e6
    X = means[rng.randint(K, size=1000)] + rng.normal(size=(1000, d))
    factors = rng.normal(size=(K, d, d)) * 0.3 + np.eye(d)
    covs = factors @ factors.transpose(0, 2, 1)
    if covariance_type == "tied":
        covs = covs[0]
    weights = np.array([0.5, 0.3, 0.2])
    fam = GaussianFamily(covariance_type, dtype=dtype)
    params = GaussianParams(weights, means, covs, fam.precision_cholesky(covs))
    stats = fam.chunk_stats(X, params)

    cov_k = np.broadcast_to(covs, (K, d, d))
    log_joint = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(X) for w, m, c in zip(weights, means, cov_k)], axis=1)
    resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    centred = X[None] - means[:, None]  # (K, n, d)
    s2 = np.einsum("nk,kni,knj->kij", resp, centred, centred)
    scale = np.abs(centred).max()
    assert_allclose(stats["nk"], resp.sum(axis=0), rtol=rtol)
    assert_allclose(stats["s1"], np.einsum("nk,kni->ki", resp, centred), rtol=rtol, atol=rtol * scale * 1000)
    assert_allclose(stats["s2"], s2.sum(axis=0) if covariance_type == "tied" else s2, rtol=rtol, atol=rtol * scale**2)
    assert_allclose(stats.loglik, logsumexp(log_joint, axis=1).sum(), rtol=rtol)


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_float32_means_carry_no_bias_from_rounded_centres(covariance_type):
    """Components 1000 sd from the mean of the means: float32 rounds their centres by ~6e-5 sd.

    The statistics are moved back to the exact centres, so the new means
    agree with the weighted means computed in float64 to rounding noise.
    """
    from scipy.special import softmax
    from scipy.stats import multivariate_normal

    rng = np.random.RandomState(1)
    K, d, n = 4, 8, 60000
    means = rng.normal(size=(K, d)) * 1e3
    X = means[rng.randint(K, size=n)] + rng.normal(size=(n, d))
    cov = np.eye(d) if covariance_type == "tied" else np.repeat(np.eye(d)[None], K, axis=0)
    fam = GaussianFamily(covariance_type, dtype="float32")
    params = GaussianParams(np.full(K, 1 / K), means + 0.1, cov, fam.precision_cholesky(cov))
    stats = fam.chunk_stats(X, params)
    log_joint = np.stack([multivariate_normal(m, np.eye(d)).logpdf(X) for m in params.means], axis=1)
    resp = softmax(log_joint, axis=1)
    expected = resp.T @ X / resp.sum(axis=0)[:, None]
    assert_allclose(params.means + stats["s1"] / stats["nk"][:, None], expected, rtol=0, atol=5e-6)
