"""Gaussian components with full, tied, diagonal or spherical covariances.

Numerics follow scikit-learn's ``GaussianMixture`` (same regularisation, same
``10 * eps`` guard on component counts, same Cholesky parametrisation) so the
two agree to rounding, with two changes for out-of-core data:

* the second moments are accumulated *centred* at the component means used in
  the E-step, so data far from the origin loses no precision;
* the E-step subtracts one global shift from each chunk before the matrix
  products, and evaluates all components of a full model with one product
  ``X @ [U_1 | ... | U_K]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import linalg

from streamem.backend import array_module, to_device, to_numpy
from streamem.stats import SuffStats

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_EPS10 = 10 * np.finfo(np.float64).eps
_LOG_2PI = np.log(2 * np.pi)
#: Rows per slice inside a chunk's E-step (keeps temporaries in cache).
SLICE_ROWS = 8192

_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have "
    "ill-defined empirical covariance (for instance caused by singleton "
    "or collapsed samples). Try to decrease the number of components, "
    "increase reg_covar, or scale the input data."
)


@dataclass(eq=False)
class GaussianParams:
    """Parameters of a Gaussian mixture (scikit-learn's shapes)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray


@dataclass(frozen=True)
class GaussianFamily:
    """Gaussian components of one covariance type.

    Parameters
    ----------
    covariance_type : {"full", "tied", "diag", "spherical"}
    reg_covar : float
        Added to the diagonal of every covariance.
    dtype : {"float64", "float32"}
        Precision of the E-step arithmetic; statistics are always float64.
    device : {"cpu", "cuda"}
        Where chunks are processed: "cuda" moves each chunk to the GPU
        (CuPy) as it is read. CuPy chunks are processed on the GPU either way.
    """

    covariance_type: str = "full"
    reg_covar: float = 1e-6
    dtype: str = "float64"
    device: str = "cpu"

    # ----------------------------------------------------------------- E-step
    def log_prob(self, X: Any, params: GaussianParams) -> Any:
        """Weighted log joint ``log w_k + log N(x | k)``, shape (n, K), in :attr:`dtype`.

        ``X`` may be a numpy or a CuPy array; the result lives on the same device.
        """
        xp = array_module(X)
        dt = np.dtype(self.dtype)
        shift = _shift(params)
        # Subtract the shift in float64 before any rounding to ``dt``.
        xs = (xp.asarray(X, dtype=np.float64) - xp.asarray(shift)).astype(dt, copy=False)
        means = xp.asarray((params.means - shift).astype(dt))
        prec_chol64 = params.precisions_cholesky
        prec_chol = xp.asarray(prec_chol64.astype(dt))
        n, d = xs.shape
        K = means.shape[0]
        ct = self.covariance_type
        if ct == "full":
            # One BLAS-3 product for all components: xs @ [U_1 | ... | U_K].
            u_cat = prec_chol.transpose(1, 0, 2).reshape(d, K * d)
            offsets = xp.einsum("kd,kde->ke", means, prec_chol).reshape(K * d)
            y = xs @ u_cat
            y -= offsets
            y = y.reshape(n, K, d)
            sq = xp.einsum("nkd,nkd->nk", y, y)
            log_det = np.log(np.diagonal(prec_chol64, axis1=1, axis2=2)).sum(axis=1)
        elif ct == "tied":
            z = xs @ prec_chol
            y = z[:, None, :] - (means @ prec_chol)[None, :, :]
            sq = xp.einsum("nkd,nkd->nk", y, y)
            log_det = np.full(K, np.log(np.diag(prec_chol64)).sum())
        else:
            scale = prec_chol if ct == "diag" else xp.repeat(prec_chol[:, None], d, axis=1)
            if dt == np.float64:
                prec = scale**2
                sq = (xs**2) @ prec.T - 2.0 * xs @ (means * prec).T + (means**2 * prec).sum(axis=1)
            else:
                # The expanded form cancels badly in single precision.
                y = (xs[:, None, :] - means) * scale
                sq = xp.einsum("nkd,nkd->nk", y, y)
            log_det = np.log(prec_chol64).sum(axis=1) if ct == "diag" else d * np.log(prec_chol64)
        const = xp.asarray((log_det + np.log(params.weights) - 0.5 * d * _LOG_2PI).astype(dt))
        sq *= -0.5
        sq += const
        return sq

    def e_step(self, X: Any, params: GaussianParams) -> tuple[Any, Any]:
        """Per-row log-likelihood (n,) in float64 and responsibilities (n, K)."""
        xp = array_module(X)
        resp = self.log_prob(X, params)
        top = resp.max(axis=1, keepdims=True)
        top[~xp.isfinite(top)] = 0.0
        resp -= top
        xp.exp(resp, out=resp)
        total = resp.sum(axis=1, keepdims=True)
        resp /= total
        with np.errstate(divide="ignore"):
            loglik = xp.log(total[:, 0].astype(np.float64)) + top[:, 0]
        return loglik, resp

    def chunk_stats(self, X: Any, params: GaussianParams) -> SuffStats:
        """E-step of one chunk: its statistics and its log-likelihood sum.

        The chunk is processed in slices of :data:`SLICE_ROWS` rows so that
        the (rows x K x d) temporaries stay in cache (measured: 1.6x faster
        than whole 65k-row chunks for d=16, K=8). On a GPU the whole chunk
        is one slice.
        """
        X = to_device(X, self.device)
        xp = array_module(X)
        step = SLICE_ROWS if xp is np else max(len(X), 1)
        total = None
        for start in range(0, len(X), step):
            rows = xp.asarray(X[start : start + step], dtype=np.float64)
            loglik, resp = self.e_step(rows, params)
            part = self.stats_from_resp(rows, resp, params.means, loglik=float(loglik.sum(dtype=np.float64)))
            total = part if total is None else total + part
        return total

    # ------------------------------------------------------------ statistics
    def stats_from_resp(self, X: Any, resp: Any, center: np.ndarray, *, loglik: float = 0.0) -> SuffStats:
        """Statistics of rows ``X`` with responsibilities ``resp``, centred at ``center`` (K, d).

        Returned in float64 on the host. With ``dtype="float32"`` only the
        scatter products of full/tied models run in single precision, on
        data already centred at each component's mean.
        """
        xp = array_module(X)
        shift = center.mean(axis=0)
        xs = xp.asarray(X, dtype=np.float64) - xp.asarray(shift)
        c = xp.asarray(center - shift)
        resp = xp.asarray(resp)
        resp64 = resp.astype(np.float64, copy=False)
        nk = resp64.sum(axis=0)
        s1 = resp64.T @ xs - nk[:, None] * c
        if self.covariance_type in ("full", "tied"):
            dt = np.dtype(self.dtype)
            xs_dt, c_dt, resp_dt = xs.astype(dt, copy=False), c.astype(dt), resp.astype(dt, copy=False)
            K, d = c.shape
            s2 = xp.empty((K, d, d))
            for k in range(K):
                xk = xs_dt - c_dt[k]
                s2[k] = (xk * resp_dt[:, k : k + 1]).T @ xk
            if self.covariance_type == "tied":
                s2 = s2.sum(axis=0)
        else:
            # sum_i r_ik (x_i - c_k)^2, expanded around the shift.
            s2 = resp64.T @ (xs**2) - 2.0 * c * (resp64.T @ xs) + nk[:, None] * c**2
        arrays = {"nk": nk, "s1": s1, "s2": s2}
        return SuffStats(
            {"n": np.float64(len(xs)), "loglik": np.float64(loglik), **{k: to_numpy(v) for k, v in arrays.items()}}
        )

    # ---------------------------------------------------------------- M-step
    def m_step(self, stats: SuffStats, center: np.ndarray) -> GaussianParams:
        """New parameters from summed statistics centred at ``center``."""
        counts = stats["nk"]
        nk = counts + _EPS10
        s1 = stats["s1"]
        delta = s1 / nk[:, None]
        means = center + delta
        # sum_i r_ik (x_i - mean_k)(...)^T from sums centred at center_k.
        corr = 2.0 / nk - counts / nk**2
        ct = self.covariance_type
        d = means.shape[1]
        if ct == "full":
            scatter = stats["s2"] - corr[:, None, None] * np.einsum("ki,kj->kij", s1, s1)
            cov = scatter / nk[:, None, None]
            cov[:, np.arange(d), np.arange(d)] += self.reg_covar
        elif ct == "tied":
            scatter = stats["s2"] - np.einsum("k,ki,kj->ij", corr, s1, s1)
            cov = scatter / nk.sum()
            cov.flat[:: d + 1] += self.reg_covar
        else:
            var = (stats["s2"] - corr[:, None] * s1**2) / nk[:, None] + self.reg_covar
            cov = var if ct == "diag" else var.mean(axis=1)
        weights = nk / nk.sum()
        return GaussianParams(weights, means, cov, self.precision_cholesky(cov))

    def init_params(self, stats: SuffStats, center: np.ndarray, n_samples: int) -> GaussianParams:
        """Initial parameters from initial responsibilities (scikit-learn's ``_initialize``).

        Weights are ``nk / n_samples``, not renormalised, as scikit-learn does.
        """
        params = self.m_step(stats, center)
        return replace(params, weights=(stats["nk"] + _EPS10) / n_samples)

    # --------------------------------------------------------- parametrisation
    def precision_cholesky(self, covariances: np.ndarray) -> np.ndarray:
        """Cholesky factors of the precisions, from covariances."""
        ct = self.covariance_type
        if ct in ("full", "tied"):
            covs = covariances if ct == "full" else covariances[None]
            d = covs.shape[-1]
            out = np.empty_like(covs)
            for k, cov in enumerate(covs):
                try:
                    chol = linalg.cholesky(cov, lower=True)
                except linalg.LinAlgError:
                    raise ValueError(_ILL_DEFINED) from None
                out[k] = linalg.solve_triangular(chol, np.eye(d), lower=True).T
            return out if ct == "full" else out[0]
        if np.any(np.less_equal(covariances, 0.0)):
            raise ValueError(_ILL_DEFINED)
        return 1.0 / np.sqrt(covariances)

    def precision_cholesky_from_precisions(self, precisions: np.ndarray) -> np.ndarray:
        ct = self.covariance_type
        if ct == "full":
            return np.array([linalg.cholesky(p, lower=True) for p in precisions])
        if ct == "tied":
            return linalg.cholesky(precisions, lower=True)
        return np.sqrt(precisions)

    def precisions(self, prec_chol: np.ndarray) -> np.ndarray:
        ct = self.covariance_type
        if ct == "full":
            return np.einsum("kij,klj->kil", prec_chol, prec_chol)
        if ct == "tied":
            return prec_chol @ prec_chol.T
        return prec_chol**2

    def covariances_from_precision_cholesky(self, prec_chol: np.ndarray) -> np.ndarray:
        ct = self.covariance_type
        if ct == "full":
            return np.array([np.linalg.inv(u @ u.T) for u in prec_chol])
        if ct == "tied":
            return np.linalg.inv(prec_chol @ prec_chol.T)
        return 1.0 / prec_chol**2

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Number of free parameters (for BIC/AIC)."""
        K, d = n_components, n_features
        cov = {"full": K * d * (d + 1) / 2, "tied": d * (d + 1) / 2, "diag": K * d, "spherical": K}[self.covariance_type]
        return int(cov + K * d + K - 1)


def _shift(params: GaussianParams) -> np.ndarray:
    """A point near the data, subtracted before products to avoid cancellation."""
    return params.means.mean(axis=0)
