"""Gaussian components with full, tied, diagonal or spherical covariances.

Numerics follow scikit-learn's ``GaussianMixture`` (same regularisation, same
``10 * eps`` guard on component counts, same Cholesky parametrisation) so the
two agree to rounding, with two changes for out-of-core data:

* the second moments are accumulated *centred* at the component means used in
  the E-step, so data far from the origin loses no precision;
* full and tied models subtract one global shift from each chunk before the
  matrix products, and evaluate all components of a full model with one
  product ``X @ [U_1 | ... | U_K]``; diag and spherical models expand
  ``|x - m_k|^2`` around the mean of the means with products over all
  components, unless that would cancel (components far apart relative to
  their spread, see :data:`EXPANSION_MAX_RATIO`): then they subtract each
  component's own mean;
* chunks are processed in slices of rows, so the work arrays stay bounded
  (:data:`SLICE_BYTES`) whatever the chunk size, in fit and in predictions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import linalg

from streamem.backend import array_module, to_device, to_numpy
from streamem.families.base import EPS10, ROW_OUTPUTS, MixtureFamily, register_family
from streamem.stats import SuffStats

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_EPS10 = EPS10
_LOG_2PI = np.log(2 * np.pi)
#: Rows per slice inside a chunk's E-step (keeps temporaries in cache) ...
SLICE_ROWS = 8192
#: ... fewer for large models, so that the per-row work arrays of a slice
#: (K x d values each) stay within this many bytes.
SLICE_BYTES = 32 * 2**20
#: Diag/spherical: the most that the terms of the expansion of
#: ``sum_i r_ik (x_ij - m_kj)^2`` around one shift may exceed the result, for
#: the expansion to be used (matrix products over all components, 2x faster
#: than subtracting each component's mean). Each term is rounded to
#: eps = 2.2e-16 relative and the sums over up to SLICE_ROWS rows add their
#: rounding like a random walk (~sqrt(8192) = 90x), so the result keeps
#: 1e5 x 2.2e-16 x 90 = 2e-9 relative, inside the 1e-8 the fit is accurate to.
#: How the E-step predicts this ratio from the parameters: :func:`_expansion_pivot`.
EXPANSION_MAX_RATIO = 1e5

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


@register_family
@dataclass(frozen=True, eq=False)
class GaussianFamily(MixtureFamily):
    """Gaussian components of one covariance type.

    Parameters
    ----------
    covariance_type : {"full", "tied", "diag", "spherical"}
    reg_covar : float
        Added to the diagonal of every covariance.
    dtype : {"float64", "float32"}
        Precision of the E-step arithmetic of full and tied models
        (diag and spherical always run in float64: faster there). The data
        are shifted in float64 before rounding; the products of one slice
        of rows run in this precision and are summed in float64 over slices
        and chunks. In float32, the rounding of the data leaves noise of
        order ``eps32 * |x - mean of the means| / sqrt(n_k)`` in the means
        (about 6e-7 for components 1000 standard deviations apart).
    device : {"cpu", "cuda"}
        Where chunks are processed: "cuda" moves each chunk to the GPU
        (CuPy) as it is read. CuPy chunks are processed on the GPU either way.
    prior : dict, optional
        MAP estimation (see :meth:`default_prior`): ``weight_concentration``
        (symmetric Dirichlet on the weights), and the Normal-inverse-Wishart's
        ``mean_prior`` (d,), ``mean_precision_prior`` (kappa),
        ``degrees_of_freedom_prior`` (nu) and ``covariance_prior`` (the
        scale: (d, d) for full and tied, (d,) for diag, a number for
        spherical).
    fixed_weights : ndarray, optional
        Keep the mixing weights at these values.
    """

    name = "gaussian"
    param_names = ("means", "covariances", "precisions_cholesky")
    covariance_type: str = "full"
    reg_covar: float = 1e-6
    dtype: str = "float64"
    device: str = "cpu"

    # ----------------------------------------------------------------- E-step
    # Internally the per-row arrays are component-major, shape (K, n): the
    # reductions over components (max, sum) then run along contiguous rows,
    # 10-20x faster than along a short last axis (measured for K=8).
    def log_prob(self, X: Any, params: GaussianParams) -> Any:
        """Weighted log joint ``log w_k + log N(x | k)``, shape (n, K), in :attr:`dtype`.

        ``X`` may be a numpy or a CuPy array; the result lives on the same device.
        """
        return self.row_outputs(X, params, "log_prob")[0]

    def e_step(self, X: Any, params: GaussianParams) -> tuple[Any, Any]:
        """Per-row log-likelihood (n,) and responsibilities (n, K), in float64."""
        return self.row_outputs(X, params, "loglik", "resp")

    def row_outputs(self, X: Any, params: GaussianParams, *names: str) -> tuple[Any, ...]:
        """Per-row outputs of ``X``, evaluated in slices of rows as :meth:`chunk_stats` does.

        Only the outputs themselves take memory in proportion to ``len(X)``:
        the E-step's work arrays are those of one slice.

        Parameters
        ----------
        X : array of shape (n, d)
            Numpy or CuPy; moved to :attr:`device` first.
        params : GaussianParams
        *names : {"log_prob", "labels", "resp", "loglik"}
            ``log_prob``: weighted log joint (n, K) in :attr:`dtype`;
            ``labels``: most likely component (n,); ``resp``:
            responsibilities (n, K) and ``loglik``: log-likelihood (n,),
            both in float64.

        Returns
        -------
        tuple
            The outputs in the order of ``names``, on the device of the computation.
        """
        unknown = [name for name in names if name not in ROW_OUTPUTS]
        if unknown:
            raise ValueError(f"names must be among {ROW_OUTPUTS}, got {unknown}")
        X = to_device(X, self.device)
        xp = array_module(X)
        scratch = _Scratch.for_module(xp)
        shift = self._shift(params.means)
        n, K = len(X), len(params.weights)
        shapes = {
            "log_prob": ((n, K), self._estep_dtype),
            "labels": ((n,), np.int64),
            "resp": ((n, K), np.float64),
            "loglik": ((n,), np.float64),
        }
        outs = {name: xp.empty(*shapes[name]) for name in names}
        for start, stop in self._slices(n, params, xp):
            xs = self._shifted(X[start:stop], shift, scratch)
            log_joint = self._log_prob_shifted(xs, params, shift, scratch)  # (K, rows)
            if "log_prob" in outs:
                outs["log_prob"][start:stop] = log_joint.T
            if "labels" in outs:
                outs["labels"][start:stop] = log_joint.argmax(axis=0)
            if "resp" in outs or "loglik" in outs:
                loglik, resp_t = _normalise(log_joint)
                if "loglik" in outs:
                    outs["loglik"][start:stop] = loglik
                if "resp" in outs:
                    outs["resp"][start:stop] = resp_t.T
        return tuple(outs[name] for name in names)

    def chunk_stats(self, X: Any, params: GaussianParams) -> SuffStats:
        """E-step of one chunk: its statistics and its log-likelihood sum.

        The chunk is processed in slices of at most :data:`SLICE_ROWS` rows
        (fewer when K x d is large, see :data:`SLICE_BYTES`) whose
        temporaries live in buffers allocated once: they stay in cache (1.6x
        faster than whole 65k-row chunks for d=16, K=8). On the CPU the
        buffers are kept per thread from one chunk to the next (about 11 MB
        for a full model with d=16, K=8, 18 MB for diag; about 2 x
        SLICE_BYTES while K x d <= SLICE_BYTES / (256 x 8)), for as long as
        the thread lives (predictions use them too): Dask workers set
        ``MALLOC_TRIM_THRESHOLD_``, under which fresh buffers cost 10 ms of
        a 25-60 ms chunk in page faults (measured). On a GPU the whole chunk
        is one slice. A chunk without rows gives zero statistics.
        """
        X = to_device(X, self.device)
        xp = array_module(X)
        scratch = _Scratch.for_module(xp)
        shift = self._shift(params.means)
        loglik_sum, moments = 0.0, None
        for start, stop in self._slices(len(X), params, xp):
            xs = self._shifted(X[start:stop], shift, scratch)
            loglik, resp_t = _normalise(self._log_prob_shifted(xs, params, shift, scratch))
            loglik_sum += float(loglik.sum(dtype=np.float64))
            part = self._moments(resp_t, xs.shape[1], scratch)
            moments = part if moments is None else tuple(a + b for a, b in zip(moments, part))
        if self.covariance_type in ("full", "tied"):
            return self._stats_whitened(moments, params, shift, loglik_sum, len(X))
        nk, s1, s2 = (to_numpy(m) for m in moments)
        return SuffStats({"n": np.float64(len(X)), "loglik": np.float64(loglik_sum), "nk": nk, "s1": s1, "s2": s2})

    def stats_from_resp(self, X: Any, resp: Any, center: np.ndarray, *, loglik: float = 0.0) -> SuffStats:
        """Statistics of rows ``X`` with responsibilities ``resp`` (n, K), centred at ``center`` (K, d).

        Returned in float64 on the host. With ``dtype="float32"`` only the
        scatter products of full/tied models run in single precision, on
        data already centred at each component's mean.
        """
        xp = array_module(X)
        shift = self._shift(center)
        xs64 = xp.asarray(X, dtype=np.float64) - xp.asarray(shift)
        xs = xs64.astype(self._estep_dtype, copy=False)
        resp_t = xp.ascontiguousarray(xp.asarray(resp).T)
        return self._stats_direct(xs64, xs, resp_t, center - shift, loglik, _Scratch(xp))

    # ------------------------------------------------------------- kernels
    @property
    def _estep_dtype(self) -> np.dtype:
        # diag/spherical: the single-precision form that does not cancel was
        # measured slower (1.3-1.5x) than the double-precision one.
        return np.dtype(np.float64 if self.covariance_type in ("diag", "spherical") else self.dtype)

    def _shift(self, means: np.ndarray) -> np.ndarray:
        """A point subtracted from the data before the products.

        Full/tied: the mean of the means, near the data (their products may
        run in float32). Diag/spherical: the origin, as they subtract each
        component's own mean in float64 (a common shift would only add the
        rounding of ``x - shift`` to every residual).
        """
        if self.covariance_type in ("full", "tied"):
            return means.mean(axis=0)
        return np.zeros(means.shape[1])

    def _slices(self, n: int, params: GaussianParams, xp: Any) -> list[tuple[int, int]]:
        """``(start, stop)`` of the slices of ``n`` rows; one empty slice when ``n == 0``.

        On the CPU at most :data:`SLICE_ROWS` rows, and fewer when the
        K x d work arrays of a slice would pass :data:`SLICE_BYTES` (but at
        least 256); on a GPU one slice.
        """
        K, d = params.means.shape
        # diag/spherical keep two (K, d, rows) arrays: the residuals and their squares.
        per_row = K * d * self._estep_dtype.itemsize * (2 if self.covariance_type in ("diag", "spherical") else 1)
        step = max(256, min(SLICE_ROWS, SLICE_BYTES // per_row)) if xp is np else max(n, 1)
        # An empty chunk still runs one (empty) slice: statistics of the right shapes.
        return [(start, min(start + step, n)) for start in range(0, max(n, 1), step)]

    def _shifted(self, X: Any, shift: np.ndarray, scratch: "_Scratch") -> Any:
        """``X - shift`` in the E-step's precision, shape (n, d).

        Diag/spherical: a transposed view of a (d, n) buffer, which their
        E-step reads rows-last (see :meth:`_log_prob_shifted`).
        """
        xp = scratch.xp
        X = xp.asarray(X)
        shift = xp.asarray(shift, dtype=np.float64)
        # The subtraction runs in float64 and only its result is rounded, so
        # data far from the origin lose nothing to the single precision.
        if self.covariance_type in ("diag", "spherical"):
            xt = scratch.get("xt", X.shape[::-1], self._estep_dtype)
            xp.subtract(X.T, shift[:, None], out=xt)
            return xt.T
        xs = scratch.get("xs", X.shape, self._estep_dtype)
        xp.subtract(X, shift, out=xs)
        return xs

    def _log_prob_shifted(self, xs: Any, params: GaussianParams, shift: np.ndarray, scratch: "_Scratch") -> Any:
        """Weighted log joint of rows already shifted, shape (K, n), in a scratch buffer."""
        xp = scratch.xp
        dt = xs.dtype
        means = xp.asarray((params.means - shift).astype(dt))
        prec_chol64 = params.precisions_cholesky
        prec_chol = xp.asarray(prec_chol64.astype(dt))
        n, d = xs.shape
        K = means.shape[0]
        sq = scratch.get("sq", (K, n), dt)
        ct = self.covariance_type
        if ct == "full":
            # One BLAS-3 product for all components: [U_1 | ... | U_K]^T @ xs^T.
            u_cat = prec_chol.transpose(1, 0, 2).reshape(d, K * d)
            offsets = xp.einsum("kd,kde->ke", means, prec_chol).reshape(K * d, 1)
            y = scratch.get("y", (K * d, n), dt)
            xp.matmul(u_cat.T, xs.T, out=y)
            y -= offsets
            _sq_norms(y.reshape(K, d, n), sq, xp)
            log_det = np.log(np.diagonal(prec_chol64, axis1=1, axis2=2)).sum(axis=1)
        elif ct == "tied":
            # Laid out (d, K, n): all components share one factor, so the
            # scatter is later one long SYRK over (d, K*n) (_whitened_moments).
            z = scratch.get("z", (d, n), dt)
            xp.matmul(prec_chol.T, xs.T, out=z)
            y = scratch.get("y", (d, K, n), dt)
            xp.subtract(z[:, None, :], (means @ prec_chol).T[:, :, None], out=y)
            _sq_norms(y.transpose(1, 0, 2), sq, xp)
            log_det = np.full(K, np.log(np.diag(prec_chol64)).sum())
        else:
            # In float64 (see _estep_dtype), rows last (xs is a view of a (d, n) buffer).
            prec = prec_chol**2 if ct == "diag" else xp.repeat(prec_chol[:, None] ** 2, d, axis=1)
            means64 = params.means - shift
            pivot = _expansion_pivot(means64, prec_chol64**2)
            if pivot is None:
                y, y2 = self._residuals(xs, means, scratch)
                xp.matmul(prec[:, None, :], y2, out=sq.reshape(K, 1, n))  # one BLAS matrix-vector product per component
                scratch.expansion = None
            else:
                # |x - m_k|^2 p_k = [-2 c_k p_k | p_k] . [x - s | (x - s)^2] + |c_k|^2 p_k
                # with c_k = m_k - s: one product for all components. The
                # stacked (2d, n) rows are kept for _centred_moments.
                centre = xp.asarray(means64 - pivot)
                xx = scratch.get("xx", (2 * d, n), dt)
                xp.subtract(xs.T, xp.asarray(pivot)[:, None], out=xx[:d])
                xp.square(xx[:d], out=xx[d:])
                xp.matmul(xp.concatenate([-2.0 * centre * prec, prec], axis=1), xx, out=sq)
                sq += (centre**2 * prec).sum(axis=1)[:, None]
                scratch.expansion = (means, centre)
            log_det = np.log(prec_chol64).sum(axis=1) if ct == "diag" else d * np.log(prec_chol64)
        const = xp.asarray((log_det + np.log(params.weights) - 0.5 * d * _LOG_2PI).astype(dt))
        sq *= -0.5
        sq += const[:, None]
        return sq

    def _moments(self, resp_t: Any, d: int, scratch: "_Scratch") -> tuple[Any, Any, Any]:
        """Moments of one slice from the residuals the E-step left in the scratch buffers."""
        if self.covariance_type in ("full", "tied"):
            return self._whitened_moments(resp_t, d, scratch)
        return self._centred_moments(resp_t, d, scratch)

    def _centred_moments(self, resp_t: Any, d: int, scratch: "_Scratch") -> tuple[Any, Any, Any]:
        """``sum_i r_ik``, ``sum_i r_ik (x_i - m_k)`` and ``sum_i r_ik (x_i - m_k)^2`` of one slice (diag/spherical).

        From what the E-step left in the scratch buffers, in float64: the
        rows minus the shift and their squares, (2d, n), when it expanded
        (one product for all components), else the residuals of each
        component and their squares, (K, d, n) (one matrix-vector product
        per component and moment). An expansion that cancels here (data
        much tighter around their means than the model's spread says) is
        redone per component.
        """
        xp = scratch.xp
        K, n = resp_t.shape
        nk = resp_t.sum(axis=1)
        if scratch.expansion is not None:
            means, centre = scratch.expansion
            sums = resp_t @ scratch.get("xx", (2 * d, n), np.float64).T  # (K, 2d)
            moments = _expanded_moments(nk, sums[:, :d], sums[:, d:], centre, xp)
            if moments is not None:
                return (nk, *moments)
            self._residuals(scratch.get("xt", (d, n), np.float64).T, means, scratch)
        y = scratch.get("y", (K, d, n), np.float64)
        y2 = scratch.get("y2", (K, d, n), np.float64)
        r = resp_t[:, :, None]
        return nk, xp.matmul(y, r)[:, :, 0], xp.matmul(y2, r)[:, :, 0]

    def _residuals(self, xs: Any, means: Any, scratch: "_Scratch") -> tuple[Any, Any]:
        """Diag/spherical: ``x_i - m_k`` and their squares, (K, d, n), in scratch buffers.

        One subtraction per component: no cancellation whatever the
        distances (at +-1e5 with sd 0.01 the expansion around one point
        left the variances 9% off). Rows last (``xs`` is a view of a (d, n)
        buffer): the subtraction runs along long rows, 3x faster than
        (K, n, d) for d=16.
        """
        xp = scratch.xp
        n, d = xs.shape
        K = means.shape[0]
        y = scratch.get("y", (K, d, n), xs.dtype)
        xp.subtract(xs.T[None], means[:, :, None], out=y)
        y2 = scratch.get("y2", (K, d, n), xs.dtype)
        xp.square(y, out=y2)
        return y, y2

    def _whitened_moments(self, resp_t: Any, d: int, scratch: "_Scratch") -> tuple[Any, Any, Any]:
        """``sum_i r_ik``, ``sum_i r_ik y_ik`` and ``sum_i r_ik y_ik y_ik^T`` of one slice, in float64.

        ``y_ik = U_k^T (x_i - mean_k)`` is what the full/tied E-step left in
        the scratch buffer, (K, d, n) for full and (d, K, n) for tied:
        residuals already centred and whitened. The products run in the
        E-step's precision: a symmetric BLAS SYRK per component (full), or
        one over all components, summed (tied: they share ``U``).
        """
        xp = scratch.xp
        K, n = resp_t.shape
        dt = resp_t.dtype
        root = scratch.get("root", (K, n), dt)
        xp.sqrt(resp_t, out=root)
        nk = resp_t.sum(axis=1, dtype=np.float64)
        if self.covariance_type == "tied":
            y = scratch.get("y", (d, K, n), dt)
            moment1 = xp.stack([y[:, k, :] @ resp_t[k] for k in range(K)])
            y *= root  # the residuals are not needed after this
            flat = y.reshape(d, K * n)
            return nk, moment1.astype(np.float64), (flat @ flat.T).astype(np.float64)
        y = scratch.get("y", (K, d, n), dt)
        moment1 = xp.matmul(y, resp_t[:, :, None])[:, :, 0]
        weighted = scratch.get("weighted", (d, n), dt)
        moment2 = xp.empty((K, d, d), dtype=dt)
        for k in range(K):
            xp.multiply(y[k], root[k], out=weighted)
            moment2[k] = weighted @ weighted.T  # symmetric product: BLAS SYRK
        return nk, moment1.astype(np.float64), moment2.astype(np.float64)

    def _stats_whitened(
        self, moments: tuple[Any, Any, Any], params: GaussianParams, shift: np.ndarray, loglik: float, n: int
    ) -> SuffStats:
        """Statistics from summed whitened moments (see :meth:`_whitened_moments`).

        With ``L_k = U_k^{-T}``, the Cholesky factor of the covariance,
        ``sum_i r_ik (x_i - c_k) = L_k sum_i r_ik y_ik`` and the scatter is
        ``L_k (sum_i r_ik y_ik y_ik^T) L_k^T``: mapped back once per chunk,
        in float64. ``U_k`` and ``c_k`` are the factor and centre the E-step
        used, i.e. rounded to its precision; the sums are then moved from
        ``c_k`` to the exact mean (a shift by ``c_k - mean_k``), so that
        float32 rounding of the means leaves no bias in the new means.
        """
        nk, moment1, moment2 = (to_numpy(m) for m in moments)
        dt = self._estep_dtype
        used = params.precisions_cholesky.astype(dt).astype(np.float64)
        chol = np.linalg.inv(used).swapaxes(-1, -2)  # one per component, or one (tied)
        s1 = moment1 @ chol.T if chol.ndim == 2 else np.einsum("kij,kj->ki", chol, moment1)
        s2 = chol @ moment2 @ chol.swapaxes(-1, -2)
        exact = params.means - shift
        delta = exact.astype(dt).astype(np.float64) - exact  # the E-step's centre minus the mean
        if delta.any():
            cross = np.einsum("ki,kj->kij", s1, delta)
            correction = cross + cross.swapaxes(1, 2) + nk[:, None, None] * np.einsum("ki,kj->kij", delta, delta)
            s2 = s2 + (correction.sum(axis=0) if s2.ndim == 2 else correction)
            s1 = s1 + nk[:, None] * delta
        return SuffStats({"n": np.float64(n), "loglik": np.float64(loglik), "nk": nk, "s1": s1, "s2": s2})

    def _stats_direct(
        self, xs64: Any, xs: Any, resp_t: Any, center: np.ndarray, loglik: float, scratch: "_Scratch"
    ) -> SuffStats:
        """Statistics of shifted rows with responsibilities ``resp_t`` (K, n), centred at ``center``
        (given relative to the same shift): ``xs64`` in float64, ``xs`` in the E-step's precision."""
        xp = scratch.xp
        n, d = xs64.shape
        K = center.shape[0]
        c = xp.asarray(center)
        resp64 = resp_t.astype(np.float64, copy=False)
        nk = resp64.sum(axis=1)
        if self.covariance_type in ("full", "tied"):
            s1 = resp64 @ xs64 - nk[:, None] * c
            dt = xs.dtype
            c_dt, resp_dt = c.astype(dt), resp_t.astype(dt, copy=False)
            xk, wk = scratch.get("xk", (n, d), dt), scratch.get("wk", (n, d), dt)
            s2 = xp.empty((K, d, d))
            for k in range(K):
                xp.subtract(xs, c_dt[k], out=xk)
                xp.multiply(xk, resp_dt[k][:, None], out=wk)
                s2[k] = wk.T @ xk
            if self.covariance_type == "tied":
                s2 = s2.sum(axis=0)
        else:
            # Expanded around the mean of the centres, unless that cancels
            # (see EXPANSION_MAX_RATIO): then centred at each c_k.
            pivot = c.mean(axis=0)
            xc = xs64 - pivot
            sums = resp64 @ xp.concatenate([xc, xc * xc], axis=1)  # (K, 2d)
            moments = _expanded_moments(nk, sums[:, :d], sums[:, d:], c - pivot, xp)
            if moments is not None:
                s1, s2 = moments
            else:
                xk = scratch.get("xk", (n, d), np.float64)
                s1, s2 = xp.empty((K, d)), xp.empty((K, d))
                for k in range(K):
                    xp.subtract(xs64, c[k], out=xk)
                    s1[k] = resp64[k] @ xk
                    xk *= xk
                    s2[k] = resp64[k] @ xk
        arrays = {"nk": nk, "s1": s1, "s2": s2}
        return SuffStats({"n": np.float64(n), "loglik": np.float64(loglik), **{k: to_numpy(v) for k, v in arrays.items()}})

    # ---------------------------------------------------------------- M-step
    def m_step(self, stats: SuffStats, center: np.ndarray) -> GaussianParams:
        """New parameters from summed statistics centred at ``center``.

        With a prior, the mode of the posterior (Fraley & Raftery 2007):
        means shrunk toward ``mean_prior`` with weight ``kappa``, and the
        scatter plus ``covariance_prior`` plus the shrinkage term divided
        by ``nu + n_k + d + 2`` (full), ``nu + n + K + d + 1`` (tied),
        ``nu + n_k + 3`` (diag) or ``nu + (n_k + 1) d + 2`` (spherical).
        """
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
        elif ct == "tied":
            scatter = stats["s2"] - np.einsum("k,ki,kj->ij", corr, s1, s1)
        else:
            scatter = stats["s2"] - corr[:, None] * s1**2
        if self.prior is None:
            if ct == "full":
                cov = scatter / nk[:, None, None]
            elif ct == "tied":
                cov = scatter / nk.sum()
            else:
                cov = scatter / nk[:, None]
        else:
            means, cov = self._map_means_covariances(nk, means, scatter)
        if ct == "full":
            cov[:, np.arange(d), np.arange(d)] += self.reg_covar
        elif ct == "tied":
            cov.flat[:: d + 1] += self.reg_covar
        else:
            cov = cov + self.reg_covar
            if ct == "spherical":
                cov = cov.mean(axis=1)
        weights = self.m_step_weights(counts)
        return GaussianParams(weights, means, cov, self.precision_cholesky(cov))

    def _map_means_covariances(self, nk: np.ndarray, xbar: np.ndarray, scatter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The posterior mode of means and covariances under the Normal-inverse-Wishart prior.

        For spherical models the (K, d) result repeats each component's
        variance, so that the caller's mean over features returns it.
        """
        p = self.prior
        mu0, kappa, nu, scale = np.asarray(p["mean_prior"], float), float(p["mean_precision_prior"]), float(p["degrees_of_freedom_prior"]), p["covariance_prior"]
        K, d = xbar.shape
        means = (nk[:, None] * xbar + kappa * mu0) / (nk + kappa)[:, None]
        diff = xbar - mu0
        shrink = kappa * nk / (kappa + nk)
        ct = self.covariance_type
        if ct == "full":
            cov = (np.asarray(scale) + scatter + shrink[:, None, None] * np.einsum("ki,kj->kij", diff, diff)) / (nu + nk + d + 2)[:, None, None]
        elif ct == "tied":
            cov = (np.asarray(scale) + scatter + np.einsum("k,ki,kj->ij", shrink, diff, diff)) / (nu + nk.sum() + K + d + 1)
        elif ct == "diag":
            cov = (np.asarray(scale) + scatter + shrink[:, None] * diff**2) / (nu + nk + 3)[:, None]
        else:
            total = float(scale) + scatter.sum(axis=1) + shrink * (diff**2).sum(axis=1)
            cov = np.repeat((total / (nu + (nk + 1) * d + 2))[:, None], d, axis=1)
        return means, cov

    def log_prior(self, params: GaussianParams) -> float:
        """Log-density of the prior at ``params``, up to a constant (0 without a prior)."""
        out = self._weights_log_prior(params.weights)
        if self.prior is None:
            return out
        p = self.prior
        mu0, kappa, nu, scale = np.asarray(p["mean_prior"], float), float(p["mean_precision_prior"]), float(p["degrees_of_freedom_prior"]), p["covariance_prior"]
        K, d = params.means.shape
        diff = params.means - mu0
        cov = params.covariances
        ct = self.covariance_type
        if ct in ("full", "tied"):
            prec = self.precisions(params.precisions_cholesky)
            precs = prec if ct == "full" else np.broadcast_to(prec, (K, d, d))
            logdet_cov = -2.0 * np.log(np.abs(np.diagonal(params.precisions_cholesky, axis1=-2, axis2=-1))).sum(axis=-1)
            quad = np.einsum("ki,kij,kj->k", diff, precs, diff)
            if ct == "full":
                return out + float(np.sum(-0.5 * (nu + d + 2) * logdet_cov - 0.5 * kappa * quad - 0.5 * np.einsum("ij,kji->k", np.asarray(scale), prec)))
            return out + float(-0.5 * (nu + d + 1 + K) * logdet_cov - 0.5 * kappa * quad.sum() - 0.5 * np.trace(np.asarray(scale) @ prec))
        if ct == "diag":
            return out + float(np.sum(-0.5 * (nu + 3) * np.log(cov) - 0.5 * (kappa * diff**2 + np.asarray(scale)) / cov))
        return out + float(np.sum(-0.5 * (nu + d + 2) * np.log(cov) - 0.5 * (kappa * (diff**2).sum(axis=1) + float(scale)) / cov))

    def default_prior(self, n_components: int, sample: np.ndarray) -> dict:
        """Fraley & Raftery's (2007) data-driven defaults, from a sample of rows.

        Mean prior the sample mean, ``mean_precision_prior`` 0.01,
        ``degrees_of_freedom_prior`` d + 2, and the scale the sample
        covariance divided by K^(2/d) (its diagonal for diag, the mean
        variance for spherical); weights get a symmetric Dirichlet with
        concentration 2 (one pseudo-row per component).
        """
        d = sample.shape[1]
        cov = np.atleast_2d(np.cov(sample, rowvar=False)) if len(sample) > 1 else np.eye(d)
        cov = cov / n_components ** (2.0 / d)
        scale = {"full": cov, "tied": cov, "diag": np.diag(cov).copy(), "spherical": float(np.trace(cov) / d)}[self.covariance_type]
        return {
            "weight_concentration": 2.0,
            "mean_prior": sample.mean(axis=0),
            "mean_precision_prior": 0.01,
            "degrees_of_freedom_prior": float(d + 2),
            "covariance_prior": scale,
        }

    def prior_spec(self, n_features: int) -> dict[str, tuple[tuple[int, ...], float]]:
        d = n_features
        scale_shape = {"full": (d, d), "tied": (d, d), "diag": (d,), "spherical": ()}[self.covariance_type]
        # nu may be improper (below d - 1): only the M-step's denominators need to stay positive, which
        # the data's counts see to; the scale must be positive definite.
        return {**super().prior_spec(d), "mean_prior": ((d,), -np.inf), "mean_precision_prior": ((), 0.0),
                "degrees_of_freedom_prior": ((), -np.inf), "covariance_prior": (scale_shape, -np.inf)}  # fmt: skip

    def check_prior(self, prior: dict, n_features: int) -> None:
        super().check_prior(prior, n_features)
        scale = np.asarray(prior["covariance_prior"], dtype=np.float64)
        positive = np.all(np.linalg.eigvalsh(scale) > 0) if scale.ndim == 2 else np.all(scale > 0)
        if not positive:
            raise ValueError(f"prior['covariance_prior'] must be positive definite (positive for {self.covariance_type!r}), got {scale.tolist()}")

    def init_params(self, stats: SuffStats, center: np.ndarray, n_samples: int) -> GaussianParams:
        """Initial parameters from initial responsibilities (scikit-learn's ``_initialize``).

        Weights are ``nk / n_samples``, not renormalised, as scikit-learn does.
        """
        params = self.m_step(stats, center)
        return replace(params, weights=self.m_step_weights(stats["nk"], initial=n_samples))

    # ------------------------------------------------------ the protocol's rest
    def make_params(self, **arrays: np.ndarray) -> GaussianParams:
        return GaussianParams(**arrays)

    def center(self, params: GaussianParams) -> np.ndarray:
        return params.means

    def param_dims(self, name: str) -> tuple[str, ...]:
        if name in ("covariances", "precisions_cholesky"):
            return {"full": ("component", "feature", "feature_"), "tied": ("feature", "feature_"),
                    "diag": ("component", "feature"), "spherical": ("component",)}[self.covariance_type]  # fmt: skip
        return ("component",) if name == "weights" else ("component", "feature")

    def stat_dims(self, name: str) -> tuple[str, ...]:
        if name == "s2":
            return {"full": ("component", "feature", "feature_"), "tied": ("feature", "feature_")}.get(self.covariance_type, ("component", "feature"))
        return super().stat_dims(name)

    def divergence(self, a: GaussianParams, b: GaussianParams) -> np.ndarray:
        """Symmetrised Kullback-Leibler divergence between every pair of components, shape (K_a, K_b)."""
        K, d = a.means.shape
        cov_a, cov_b = (self.full_covariances(p.covariances, len(p.means), d) for p in (a, b))
        inv_a, inv_b = np.linalg.inv(cov_a), np.linalg.inv(cov_b)
        diff = a.means[:, None] - b.means[None]
        trace = np.einsum("jmn,inm->ij", inv_b, cov_a) + np.einsum("imn,jnm->ij", inv_a, cov_b)
        maha = np.einsum("ijm,imn,ijn->ij", diff, inv_a, diff) + np.einsum("ijm,jmn,ijn->ij", diff, inv_b, diff)
        return 0.5 * (trace + maha) - d

    def full_covariances(self, covariances: np.ndarray, K: int, d: int) -> np.ndarray:
        """Covariances of any type as (K, d, d) matrices."""
        ct = self.covariance_type
        if ct == "full":
            return covariances
        if ct == "tied":
            return np.repeat(covariances[None], K, axis=0)
        if ct == "diag":
            return np.einsum("kd,de->kde", covariances, np.eye(d))
        return covariances[:, None, None] * np.eye(d)

    def sample_component(self, params: GaussianParams, k: int, n: int, rng: np.random.RandomState) -> np.ndarray:
        ct, mean = self.covariance_type, params.means[k]
        if ct in ("full", "tied"):
            return rng.multivariate_normal(mean, params.covariances[k] if ct == "full" else params.covariances, n)
        return mean + rng.standard_normal(size=(n, len(mean))) * np.sqrt(params.covariances[k])

    # ------------------------------------------------------------ online EM
    def recentre(self, stats: SuffStats, old: np.ndarray, new: np.ndarray) -> SuffStats:
        """The same statistics centred at ``new`` instead of ``old`` (both (K, d)), exactly.

        With ``delta = old - new``: ``s1' = s1 + nk delta`` and
        ``S2' = S2 + delta s1^T + s1 delta^T + nk delta delta^T`` (summed
        over components for tied; the diagonal only for diag and spherical).
        Online EM moves statistics of different E-steps to one centre before
        it combines them.
        """
        delta = old - new
        if not delta.any():
            return stats
        nk, s1, s2 = stats["nk"], stats["s1"], stats["s2"]
        if self.covariance_type in ("full", "tied"):
            cross = np.einsum("ki,kj->kij", s1, delta)
            shift = cross + cross.swapaxes(1, 2) + nk[:, None, None] * np.einsum("ki,kj->kij", delta, delta)
            s2 = s2 + (shift.sum(axis=0) if self.covariance_type == "tied" else shift)
        else:
            s2 = s2 + 2.0 * delta * s1 + nk[:, None] * delta**2
        return SuffStats({**stats.arrays, "s1": s1 + nk[:, None] * delta, "s2": s2})

    def stats_of_params(self, params: GaussianParams) -> SuffStats:
        """Statistics of one row's worth of data, centred at the means, whose M-step gives ``params``.

        Stepwise EM starts from them: the starting parameters weigh as much
        as one mini-batch, and their weight decays with the steps.
        """
        w, cov = params.weights / params.weights.sum(), params.covariances
        K, d = params.means.shape
        ct = self.covariance_type
        if ct == "full":
            s2 = w[:, None, None] * (cov - self.reg_covar * np.eye(d))
        elif ct == "tied":
            s2 = cov - self.reg_covar * np.eye(d)
        elif ct == "diag":
            s2 = w[:, None] * (cov - self.reg_covar)
        else:
            s2 = w[:, None] * np.repeat((cov - self.reg_covar)[:, None], d, axis=1)
        return SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), "nk": w, "s1": np.zeros((K, d)), "s2": s2})

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

    def stats_floats(self, n_components: int, n_features: int) -> int:
        K, d = n_components, n_features
        s2 = {"full": K * d * d, "tied": d * d}.get(self.covariance_type, K * d)
        return 2 + K + 2 * K * d + s2

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Number of free parameters (for BIC/AIC)."""
        K, d = n_components, n_features
        cov = {"full": K * d * (d + 1) / 2, "tied": d * (d + 1) / 2, "diag": K * d, "spherical": K}[self.covariance_type]
        return int(cov + K * d + (0 if self.fixed_weights is not None else K - 1))


class _Scratch:
    """Work buffers reused across the slices of a chunk, one per name and dtype."""

    _local = threading.local()

    def __init__(self, xp: Any):
        self.xp = xp
        self._buffers: dict[tuple[str, np.dtype], Any] = {}
        #: What the last diag/spherical E-step expanded around, for its
        #: moments: (means, means minus the pivot), or None if it did not.
        self.expansion: tuple[Any, Any] | None = None

    @classmethod
    def of_thread(cls) -> "_Scratch":
        """The calling thread's NumPy buffers, kept from one call to the next."""
        scratch = getattr(cls._local, "scratch", None)
        if scratch is None:
            scratch = cls._local.scratch = cls(np)
        return scratch

    @classmethod
    def for_module(cls, xp: Any) -> "_Scratch":
        """The thread's kept buffers for NumPy (see ``chunk_stats``), fresh ones on a GPU."""
        return cls.of_thread() if xp is np else cls(xp)

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        size = int(np.prod(shape))
        key = (name, np.dtype(dtype))
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = self._buffers[key] = self.xp.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def _sq_norms(y: Any, out: Any, xp: Any) -> None:
    """``out[k, n] = sum_d y[k, d, n]**2``."""
    if xp is np:
        np.einsum("kdn,kdn->kn", y, y, out=out)
    else:
        out[...] = xp.einsum("kdn,kdn->kn", y, y)


def _expansion_pivot(means: np.ndarray, prec: np.ndarray) -> np.ndarray | None:
    """The point a diag/spherical E-step expands around (the mean of ``means``), or None where that cancels.

    ``means`` (K, d) and the precisions ``prec``, (K, d) or (K,), on the
    host. With ``t_kj = (m_kj - s_j)^2 p_kj`` (pivot ``s``, in the squared
    sd of component k), the terms of the statistics of feature j exceed
    the result ``~ n_k / p_kj`` about ``1 + 4 t_kj`` times (data spread as
    the model says): expand while ``16 max t_kj <= EXPANSION_MAX_RATIO``,
    a factor 4 to spare for data tighter than the model (early
    iterations; :func:`_expanded_moments` checks the actual ratio). The
    log joint then loses about ``2 eps sum_j t_kj`` absolute, the
    probabilities that much relative: also bounded (``sum_j t_kj <=
    EXPANSION_MAX_RATIO``, for large d).
    """
    pivot = means.mean(axis=0)
    t = (means - pivot) ** 2 * (prec if prec.ndim == 2 else prec[:, None])
    # NaN parameters fail both comparisons: the per-component path, which propagates them.
    if 16 * t.max() <= EXPANSION_MAX_RATIO and t.sum(axis=1).max() <= EXPANSION_MAX_RATIO:
        return pivot
    return None


def _expanded_moments(nk: Any, m1: Any, m2: Any, centre: Any, xp: Any) -> tuple[Any, Any] | None:
    """``sum_i r_ik (x_i - m_k)`` and ``sum_i r_ik (x_i - m_k)^2`` (K, d) from sums around a pivot ``s``, or None.

    ``m1 = sum_i r_ik (x_i - s)``, ``m2 = sum_i r_ik (x_i - s)^2`` and
    ``centre = m - s``. None when the terms exceed the result more than
    :data:`EXPANSION_MAX_RATIO` times (the result would have lost
    precision to cancellation): the caller then centres per component.
    """
    s1 = m1 - nk[:, None] * centre
    s2 = m2 - 2.0 * centre * m1 + nk[:, None] * centre**2
    terms = m2 + 2.0 * abs(centre * m1) + nk[:, None] * centre**2
    # Exact zeros (a component without rows) pass; NaN fails, and propagates per component.
    if bool(xp.all(terms <= EXPANSION_MAX_RATIO * abs(s2))):
        return s1, s2
    return None


def _normalise(log_joint_t: Any) -> tuple[Any, Any]:
    """Per-row log-likelihood (float64) and responsibilities from a (K, n) log joint.

    The responsibilities overwrite ``log_joint_t`` and keep its (K, n) layout.
    """
    xp = array_module(log_joint_t)
    resp = log_joint_t
    top = resp.max(axis=0)
    top[~xp.isfinite(top)] = 0.0
    resp -= top
    xp.exp(resp, out=resp)
    total = resp.sum(axis=0)
    resp /= total
    with np.errstate(divide="ignore"):
        loglik = xp.log(total.astype(np.float64)) + top
    return loglik, resp
