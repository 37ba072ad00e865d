"""Shared test data, initial parameters and comparison helpers.

Everything here is independent of streamem: data come from a fixed-seed
numpy generator, the reference fits from scikit-learn.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

N_SAMPLES = 4500
N_FEATURES = 3
N_COMPONENTS = 3
SEED = 20240601

#: Rows per Zarr chunk in the on-disk store: 6 chunks of 700 and one of 300.
ZARR_CHUNK_ROWS = 700
#: Explicitly irregular row chunks (sum 4,500).
IRREGULAR_CHUNKS = (500, 900, 300, 1200, 650, 400, 550)
assert sum(IRREGULAR_CHUNKS) == N_SAMPLES

TRUE_WEIGHTS = np.array([0.3, 0.5, 0.2])
TRUE_MEANS = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 0.5], [-4.0, 6.0, 4.0]])

#: The parameters compared with scikit-learn after a fit.
FITTED_ATTRS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")

PARITY_MAX_ITER = 20


def make_data(n: int = N_SAMPLES, seed: int = SEED, offset: float = 0.0, unit_variance: bool = False) -> np.ndarray:
    """A 3-component, 3-feature Gaussian mixture sample with distinct (correlated) covariances."""
    rng = np.random.RandomState(seed)
    labels = rng.choice(len(TRUE_WEIGHTS), size=n, p=TRUE_WEIGHTS)
    X = rng.standard_normal((n, TRUE_MEANS.shape[1]))
    if not unit_variance:
        transforms = [
            np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, -0.3, 0.7]]),
            np.array([[1.5, 0.0, 0.0], [-0.4, 0.6, 0.0], [0.0, 0.3, 1.1]]),
            np.array([[0.7, 0.0, 0.0], [0.1, 1.3, 0.0], [0.5, 0.0, 0.9]]),
        ]
        for k, A in enumerate(transforms):
            rows = labels == k
            X[rows] = X[rows] @ A.T
    return X + TRUE_MEANS[labels] + offset


def make_inits(covariance_type: str, offset: float = 0.0) -> dict:
    """weights_init, means_init and precisions_init of the right shapes (deliberately off the truth)."""
    K, d = N_COMPONENTS, N_FEATURES
    weights = np.array([0.25, 0.4, 0.35])
    means = TRUE_MEANS + np.array([[0.5, -0.3, 0.2], [-0.4, 0.6, -0.5], [0.3, 0.3, -0.6]]) + offset
    if covariance_type == "full":
        precisions = np.empty((K, d, d))
        for k in range(K):
            A = np.eye(d) * (0.8 + 0.2 * k)
            A[1, 0] = A[0, 1] = 0.1 * (k + 1)
            A[2, 1] = A[1, 2] = -0.05
            precisions[k] = A
    elif covariance_type == "tied":
        precisions = np.array([[0.9, 0.1, 0.0], [0.1, 1.1, -0.05], [0.0, -0.05, 0.8]])
    elif covariance_type == "diag":
        precisions = np.array([[0.8, 1.0, 1.2], [1.1, 0.7, 0.9], [1.0, 1.3, 0.6]])
    elif covariance_type == "spherical":
        precisions = np.array([0.7, 1.0, 1.3])
    else:  # pragma: no cover
        raise AssertionError(covariance_type)
    return {"weights_init": weights, "means_init": means, "precisions_init": precisions}


def sklearn_fit(X: np.ndarray, **params) -> SkGaussianMixture:
    """scikit-learn's fit with ConvergenceWarning silenced (tol=0 always warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return SkGaussianMixture(**params).fit(X)


def fit_quietly(model, X, **fit_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, **fit_kwargs)


def assert_same_fit(ours, ref, rtol: float, *, check_n_iter: bool = True) -> None:
    """Fitted parameters and lower bounds agree to ``rtol`` (relative, elementwise).

    Entries below 1% of the array's largest entry (e.g. a mean near 0) are
    compared with an absolute tolerance of ``rtol`` times 1% of that largest
    entry: their relative rounding error is naturally larger.
    """
    for name in FITTED_ATTRS:
        a = np.asarray(getattr(ours, name))
        b = np.asarray(getattr(ref, name))
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        atol = rtol * 1e-2 * float(np.max(np.abs(b)))
        assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
    assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=rtol, atol=0, err_msg="lower_bound_")
    assert len(ours.lower_bounds_) == len(ref.lower_bounds_)
    assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=rtol, atol=0, err_msg="lower_bounds_")
    if check_n_iter:
        assert ours.n_iter_ == ref.n_iter_
        assert ours.converged_ == ref.converged_


def sorted_by_means(model) -> dict:
    """Fitted parameters with components ordered by their first mean coordinate (label-order free)."""
    order = np.lexsort(model.means_.T[::-1])
    out = {"weights_": model.weights_[order], "means_": model.means_[order]}
    if model.covariance_type == "tied":
        out["covariances_"] = model.covariances_
        out["precisions_cholesky_"] = model.precisions_cholesky_
    else:
        out["covariances_"] = model.covariances_[order]
        out["precisions_cholesky_"] = model.precisions_cholesky_[order]
    return out


def new_bucket(endpoint: str, key: str, secret: str, prefix: str) -> tuple[str, dict, object]:
    """A fresh bucket on ``endpoint``: its s3:// URL, the storage options, an s3fs file system."""
    import uuid

    import s3fs

    options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}
    fs = s3fs.S3FileSystem(**options, use_listings_cache=False)
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return f"s3://{bucket}", options, fs
