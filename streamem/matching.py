"""Keep component labels stable across re-fits by matching components."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def full_covariances(covariances: np.ndarray, covariance_type: str, K: int, d: int) -> np.ndarray:
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.repeat(covariances[None], K, axis=0)
    if covariance_type == "diag":
        return np.einsum("kd,de->kde", covariances, np.eye(d))
    return covariances[:, None, None] * np.eye(d)


def symmetric_kl(means_a, covs_a, means_b, covs_b) -> np.ndarray:
    """Symmetrised Kullback-Leibler divergence between every pair of Gaussians, shape (K_a, K_b)."""
    d = means_a.shape[1]
    inv_a, inv_b = np.linalg.inv(covs_a), np.linalg.inv(covs_b)
    cost = np.empty((len(means_a), len(means_b)))
    for i in range(len(means_a)):
        for j in range(len(means_b)):
            diff = means_a[i] - means_b[j]
            trace = np.trace(inv_b[j] @ covs_a[i]) + np.trace(inv_a[i] @ covs_b[j])
            maha = diff @ (inv_a[i] + inv_b[j]) @ diff
            cost[i, j] = 0.5 * (trace + maha) - d
    return cost


def match_components(reference, model) -> np.ndarray:
    """The permutation ``perm`` such that ``model``'s component ``perm[k]`` matches ``reference``'s ``k``.

    Components are paired by minimum total symmetric KL divergence (Hungarian
    algorithm). Both models must have the same number of components,
    features and covariance type.
    """
    K, d = reference.means_.shape
    if model.means_.shape != (K, d):
        raise ValueError(f"cannot match a model of shape {model.means_.shape} to one of shape {(K, d)}")
    cov_a = full_covariances(reference.covariances_, reference.covariance_type, K, d)
    cov_b = full_covariances(model.covariances_, model.covariance_type, K, d)
    rows, cols = linear_sum_assignment(symmetric_kl(reference.means_, cov_a, model.means_, cov_b))
    return cols[np.argsort(rows)]
