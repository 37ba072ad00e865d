"""Numerics of the Gaussian family that the parity tests do not reach.

* diag and spherical models centre every component at its own mean (issue
  13.5) where expanding around one shift would cancel: components far apart
  with small variances keep their variances; elsewhere the faster expansion
  gives the same results to rounding;
* chunks without rows contribute zero statistics (issue 13.7), as they appear
  after boolean filtering of a dask array.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import logsumexp

import streamem
from _common import N_COMPONENTS, fit_quietly, make_data, make_inits, sklearn_fit
from streamem.families import gaussian
from streamem.families.gaussian import GaussianFamily, GaussianParams

# ------------------------------------------------- far components, small sd
SD = 0.01 * np.array([1.0, 1.6, 0.7])  # per feature: diag models see different variances
N_FAR = 2000


def _far_data(offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two components at -offset and +offset (all features), sd ~0.01: data, labels, true centres."""
    rng = np.random.RandomState(7)
    centres = np.array([[-offset] * 3, [offset] * 3]) + np.array([[0.3, -0.2, 0.1], [-0.1, 0.4, 0.2]])
    labels = rng.randint(2, size=N_FAR)
    return centres[labels] + SD * rng.standard_normal((N_FAR, 3)), labels, centres


def _far_inits(covariance_type: str, centres: np.ndarray) -> dict:
    """Initial parameters off the truth by a few sd: the components stay millions of sd apart."""
    precisions = np.array([[1.0, 0.8, 1.2], [0.9, 1.1, 1.0]]) / 0.012**2
    if covariance_type == "spherical":
        precisions = precisions.mean(axis=1)
    return {"weights_init": [0.45, 0.55], "means_init": centres + 0.02, "precisions_init": precisions}


@pytest.mark.parametrize("offset", [1e5, 1e6])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_far_components_match_sklearn_on_translated_data(covariance_type, offset):
    """Components at +-offset, sd 0.01: the fit equals scikit-learn's on the same data moved near the origin.

    The components are ~1e7 sd apart, so every responsibility is exactly 0
    or 1 and moving each component's rows (and initial mean) by the same
    vector changes nothing but the means. Near the origin scikit-learn is
    exact; at +-offset it cancels itself (its diag/spherical E-step and
    M-step expand |x - m|^2 around 0), as streamem did before.
    """
    X, labels, centres = _far_data(offset)
    move = np.sign(centres[:, :1]) * (offset - 1.0)  # component k moved by -move[k]: now near +-1
    near = X - move[labels]  # exact: x and move[k] are within a factor 2 (Sterbenz)
    inits = _far_inits(covariance_type, centres)
    params = dict(n_components=2, covariance_type=covariance_type, tol=0, max_iter=4)
    ref = sklearn_fit(near, **params, **{**inits, "means_init": inits["means_init"] - move})
    ours = fit_quietly(streamem.GaussianMixture(**params, **inits), da.from_array(X, chunks=(700, -1)))
    assert_allclose(ours.covariances_, ref.covariances_, rtol=1e-6)
    assert_allclose(ours.means_ - move, ref.means_, rtol=0, atol=1e-9)
    assert_allclose(ours.weights_, ref.weights_, rtol=1e-12)
    assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=1e-7)
    # And the closed form: per-component sample moments (the fit has converged after one step).
    var = np.array([X[labels == k].var(axis=0) for k in range(2)]) + ours.reg_covar
    assert_allclose(ours.covariances_, var if covariance_type == "diag" else var.mean(axis=1), rtol=1e-6)


def _far_params(fam: GaussianFamily, centres: np.ndarray) -> GaussianParams:
    var = np.array([[1.0, 1.5, 0.8], [1.2, 0.9, 1.1]]) * 0.01**2
    if fam.covariance_type == "spherical":
        var = var.mean(axis=1)
    return GaussianParams(np.array([0.4, 0.6]), centres + 0.005, var, fam.precision_cholesky(var))


def _closed_form_log_joint(X: np.ndarray, params: GaussianParams) -> np.ndarray:
    """log w_k + log N(x | m_k, diag(var_k)) with the residuals formed directly, (n, K)."""
    var = params.covariances if params.covariances.ndim == 2 else np.repeat(params.covariances[:, None], X.shape[1], axis=1)
    resid = X[:, None, :] - params.means[None]  # (n, K, d)
    return np.log(params.weights) - 0.5 * ((resid**2 / var).sum(axis=2) + np.log(2 * np.pi * var).sum(axis=1))


@pytest.mark.parametrize("offset", [1e5, 1e6])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_far_components_chunk_stats_and_log_prob_closed_form(monkeypatch, covariance_type, offset):
    """chunk_stats over several slices and log_prob against moments formed per component with numpy."""
    monkeypatch.setattr(gaussian, "SLICE_ROWS", 300)  # 2000 rows: 7 slices, the last one short
    X, _, centres = _far_data(offset)
    fam = GaussianFamily(covariance_type, reg_covar=0.0)
    params = _far_params(fam, centres)
    log_joint = _closed_form_log_joint(X, params)
    assert_allclose(fam.log_prob(X, params), log_joint, rtol=1e-9)
    resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    resid = X[None] - params.means[:, None]  # (K, n, d)
    stats = fam.chunk_stats(X, params)
    assert_allclose(stats["nk"], resp.sum(axis=0), rtol=1e-12)
    assert_allclose(stats["s1"], np.einsum("nk,knd->kd", resp, resid), rtol=1e-8, atol=1e-10)
    assert_allclose(stats["s2"], np.einsum("nk,knd->kd", resp, resid**2), rtol=1e-8)
    assert_allclose(stats.loglik, logsumexp(log_joint, axis=1).sum(), rtol=1e-10)


@pytest.mark.parametrize("offset", [1e5, 1e6])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_far_components_stats_from_resp_closed_form(covariance_type, offset):
    """The initialisation's statistics (hard labels, as k-means gives) give the per-component sample variances."""
    X, labels, centres = _far_data(offset)
    fam = GaussianFamily(covariance_type, reg_covar=0.0)
    resp = np.eye(2)[labels]
    params = fam.m_step(fam.stats_from_resp(X, resp, centres + 0.005), centres + 0.005)
    var = np.array([X[labels == k].var(axis=0) for k in range(2)])
    assert_allclose(params.covariances, var if covariance_type == "diag" else var.mean(axis=1), rtol=1e-7)
    assert_allclose(params.means, [X[labels == k].mean(axis=0) for k in range(2)], rtol=0, atol=1e-9)


# ---------------------------------- expanded vs per-component (diag, spherical)
EXPANDED, PER_COMPONENT = np.inf, 0.0  # values of gaussian.EXPANSION_MAX_RATIO that force one path


def _params_from_inits(fam: GaussianFamily, offset: float = 0.0) -> GaussianParams:
    inits = make_inits(fam.covariance_type, offset)
    prec_chol = fam.precision_cholesky_from_precisions(inits["precisions_init"])
    return GaussianParams(inits["weights_init"], inits["means_init"], fam.covariances_from_precision_cholesky(prec_chol), prec_chol)


def _outputs(monkeypatch, fam: GaussianFamily, X: np.ndarray, params: GaussianParams, limit: float | None) -> dict:
    """log_prob, chunk_stats and stats_from_resp with the expansion forced on/off (``limit``) or left to decide (None)."""
    with monkeypatch.context() as patch:
        if limit is not None:
            patch.setattr(gaussian, "EXPANSION_MAX_RATIO", limit)
        log_prob = fam.log_prob(X, params)
        stats = fam.chunk_stats(X, params)
        resp = np.exp(log_prob - logsumexp(log_prob, axis=1, keepdims=True))
        init = fam.stats_from_resp(X, resp, params.means - 0.1)
    return {"log_prob": log_prob, **{f"e-step {k}": v for k, v in stats.arrays.items()}, **{f"init {k}": v for k, v in init.arrays.items()}}


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_expanded_and_per_component_paths_agree(monkeypatch, covariance_type, offset):
    """Ordinary data (here 1e4 from the origin too): both kernels give the same results to rounding,
    and the expansion (around the mean of the means, not the origin) is the one chosen."""
    monkeypatch.setattr(gaussian, "SLICE_ROWS", 700)  # 4500 rows: 7 slices
    fam = GaussianFamily(covariance_type)
    X = make_data(offset=offset)
    params = _params_from_inits(fam, offset)
    expanded = _outputs(monkeypatch, fam, X, params, EXPANDED)
    centred = _outputs(monkeypatch, fam, X, params, PER_COMPONENT)
    chosen = _outputs(monkeypatch, fam, X, params, None)
    for name, value in centred.items():
        # s1 sums residuals of both signs: compared with a tolerance relative to its terms.
        atol = 1e-11 * np.abs(centred[name.replace("s1", "s2")]).max() ** 0.5 * len(X) ** 0.5 if name.endswith("s1") else 0
        assert_allclose(expanded[name], value, rtol=1e-11, atol=atol, err_msg=name)
        assert_array_equal(chosen[name], expanded[name], err_msg=name)
    # The two kernels are different computations (else this test could not fail).
    assert not np.array_equal(expanded["e-step s2"], centred["e-step s2"])


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_far_components_take_the_per_component_path(monkeypatch, covariance_type):
    """At +-1e5 with sd 0.01 the expansion cancels (forced, it is visibly wrong); the default is per component."""
    X, _, centres = _far_data(1e5)
    fam = GaussianFamily(covariance_type, reg_covar=0.0)
    params = _far_params(fam, centres)
    expanded = _outputs(monkeypatch, fam, X, params, EXPANDED)
    centred = _outputs(monkeypatch, fam, X, params, PER_COMPONENT)
    chosen = _outputs(monkeypatch, fam, X, params, None)
    for name, value in centred.items():
        assert_array_equal(chosen[name], value, err_msg=name)
    error = np.abs(expanded["e-step s2"] / centred["e-step s2"] - 1).max()
    assert error > 1e-3, error


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_statistics_recentre_when_data_are_tighter_than_the_model(monkeypatch, covariance_type):
    """Broad model variances (the E-step may expand) but data sd 0.01 at +-1e4: the statistics,
    which cancel with the data's spread, not the model's, still come out per component."""
    monkeypatch.setattr(gaussian, "SLICE_ROWS", 300)
    X, _, centres = _far_data(1e4)
    fam = GaussianFamily(covariance_type, reg_covar=0.0)
    var = np.array([[1.0, 1.5, 0.8], [1.2, 0.9, 1.1]]) * 300.0**2  # sd ~300: centres ~30 model sd from their mean
    var = var if covariance_type == "diag" else var.mean(axis=1)
    params = GaussianParams(np.array([0.4, 0.6]), centres + 0.005, var, fam.precision_cholesky(var))
    log_joint = _closed_form_log_joint(X, params)
    log_prob = fam.log_prob(X, params)
    assert_allclose(log_prob, log_joint, rtol=1e-9)
    with monkeypatch.context() as patch:  # the E-step does expand
        patch.setattr(gaussian, "EXPANSION_MAX_RATIO", EXPANDED)
        assert_array_equal(fam.log_prob(X, params), log_prob)
    resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    expected = np.einsum("nk,knd->kd", resp, (X[None] - params.means[:, None]) ** 2)
    assert_allclose(fam.chunk_stats(X, params)["s2"], expected, rtol=1e-8)
    monkeypatch.setattr(gaussian, "EXPANSION_MAX_RATIO", EXPANDED)  # without the check on the data: wrong
    assert np.abs(fam.chunk_stats(X, params)["s2"] / expected - 1).max() > 1e-4


# ------------------------------------------------------------ empty chunks
def _filtered_with_empty_chunks(X: np.ndarray) -> da.Array:
    """``X`` as a boolean-filtered dask array whose 1st, 3rd and last chunks lost all their rows."""
    junk = np.full((200, X.shape[1]), np.nan)
    parts = [junk, X[:1500], junk, X[1500:3000], X[3000:], junk]
    full = da.from_array(np.vstack(parts), chunks=(tuple(len(p) for p in parts), -1))
    keep = ~da.isnan(full).any(axis=1)
    out = full[keep]
    out.compute_chunk_sizes()
    assert out.chunks[0] == (0, 1500, 0, 1500, 1500, 0)
    return out


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_empty_chunks_change_nothing(X, covariance_type, init_params):
    """Every init and covariance type: the fit with zero-row chunks is the fit without them."""
    filtered = _filtered_with_empty_chunks(np.asarray(X))
    plain = da.from_array(np.asarray(X), chunks=(1500, -1))
    params = dict(n_components=N_COMPONENTS, covariance_type=covariance_type, tol=0, max_iter=3, init_params=init_params, random_state=0)
    ours = fit_quietly(streamem.GaussianMixture(**params), filtered)
    ref = fit_quietly(streamem.GaussianMixture(**params), plain)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-10, atol=1e-12, err_msg=name)
    assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=1e-12)


def test_empty_chunks_fit_predict_and_score_like_sklearn(X, covariance_type):
    """User-given inits: parity with scikit-learn, and every per-row output on the filtered array."""
    filtered = _filtered_with_empty_chunks(np.asarray(X))
    params = dict(n_components=N_COMPONENTS, covariance_type=covariance_type, tol=0, max_iter=5, **make_inits(covariance_type))
    ref = sklearn_fit(np.asarray(X), **params)
    ours = fit_quietly(streamem.GaussianMixture(**params), filtered)
    assert_allclose(ours.means_, ref.means_, rtol=1e-8)
    assert_allclose(ours.covariances_, ref.covariances_, rtol=1e-8)
    labels = ours.predict(filtered)
    proba = ours.predict_proba(filtered)
    logp = ours.score_samples(filtered)
    for out in (labels, proba, logp):
        assert isinstance(out, da.Array) and out.chunks[0] == filtered.chunks[0]
    assert_array_equal(labels.compute(), ref.predict(X))
    assert_allclose(proba.compute(), ref.predict_proba(X), rtol=1e-8, atol=1e-200)
    assert_allclose(logp.compute(), ref.score_samples(X), rtol=1e-8)
    assert_allclose(ours.score(filtered), ref.score(X), rtol=1e-8)
    assert_allclose(ours.bic(filtered), ref.bic(X), rtol=1e-8)


def test_empty_chunk_stats_are_zero(covariance_type):
    """No rows: zero statistics of the shapes a non-empty chunk gives, so they add."""
    fam = GaussianFamily(covariance_type)
    inits = make_inits(covariance_type)
    data = make_data(n=50)
    prec_chol = fam.precision_cholesky_from_precisions(inits["precisions_init"])
    params = GaussianParams(inits["weights_init"], inits["means_init"], fam.covariances_from_precision_cholesky(prec_chol), prec_chol)
    empty = fam.chunk_stats(data[:0], params)
    full = fam.chunk_stats(data, params)
    assert empty.arrays.keys() == full.arrays.keys()
    for name, value in empty.arrays.items():
        assert np.shape(value) == np.shape(full[name]), name
        assert not np.any(value), name
    total = empty + full
    for name in full.arrays:
        assert_array_equal(total[name], full[name])


def test_row_outputs_refuses_unknown_names():
    fam = GaussianFamily("diag")
    params = _far_params(fam, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"names must be among .*'log_prob'.*got \['proba'\]"):
        fam.row_outputs(np.zeros((4, 3)), params, "loglik", "proba")
