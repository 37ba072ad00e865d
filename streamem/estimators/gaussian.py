"""``GaussianMixture``: scikit-learn's estimator, fitted out of core."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamem.backend import check_device
from streamem.estimators.base import COMMON_ATTRIBUTES_DOC, COMMON_PARAMS_DOC, MixtureEstimator, _as_shape, _check_real
from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily, GaussianParams


class GaussianMixture(MixtureEstimator):
    __doc__ = f"""Gaussian mixture fitted by batch or online EM over the chunks of (possibly huge) data.

    Same parameters, defaults and learned attributes as
    :class:`sklearn.mixture.GaussianMixture`; the data may be a numpy array,
    a dask array, a ``zarr.Array``, a path to a Zarr store, or an xarray
    object. Each batch EM iteration is one pass over the chunks: every
    chunk's E-step yields additive statistics and its log-likelihood, a
    fixed-order tree sums them, and the M-step runs on the client. Online EM
    (``algorithm="stepwise"`` or ``"incremental"``) makes an M-step after
    every mini-batch of ``batch_size`` rows instead, and gets close to the
    batch optimum in one to three passes over large data
    (:mod:`streamem.online`); :meth:`partial_fit` folds in new rows.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components.
    covariance_type : {{"full", "tied", "diag", "spherical"}}, default="full"
    reg_covar : float, default=1e-6
        Added to the diagonal of covariances.
    means_init, precisions_init : array-like, optional
        User-given initial parameters (scikit-learn's shapes).
    dtype : {{"float64", "float32"}}, default="float64"
        Precision of the E-step arithmetic of full and tied models (diag
        and spherical models always compute in float64, which measured
        faster there). Statistics are accumulated in float64 either way,
        centred at the component means.
    device : {{"cpu", "cuda"}}, default="cpu"
        ``"cuda"`` moves every chunk to the GPU (CuPy, extra ``gpu``) as it
        is read and runs the E-step there; dask arrays of CuPy chunks run
        on the GPU whatever this says. Statistics and the M-step stay on the
        host (they are tiny).
    {COMMON_PARAMS_DOC.strip()}
        Gaussian hyperparameters (Normal-inverse-Wishart, Fraley & Raftery
        2007): ``mean_prior``, ``mean_precision_prior``,
        ``degrees_of_freedom_prior``, ``covariance_prior``.

    Attributes
    ----------
    weights_, means_, covariances_, precisions_, precisions_cholesky_ : ndarray
    {COMMON_ATTRIBUTES_DOC.strip()}
    """

    family_class = GaussianFamily
    _init_arrays = {"means": "means_init"}

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        reg_covar: float = 1e-6,
        means_init: Any = None,
        precisions_init: Any = None,
        dtype: str = "float64",
        device: str = "cpu",
        **common: Any,
    ):
        super().__init__(n_components, **common)
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.dtype = dtype
        self.device = device

    def _family_settings(self) -> dict[str, Any]:
        return {"covariance_type": self.covariance_type, "reg_covar": float(self.reg_covar), "dtype": self.dtype, "device": self.device}

    def _set_derived(self, family: GaussianFamily) -> None:
        self.precisions_ = family.precisions(self.precisions_cholesky_)

    def _user_params(self, family: GaussianFamily, params: GaussianParams | None) -> GaussianParams | None:
        prec_chol = None
        if self.precisions_init is not None:
            prec_chol = family.precision_cholesky_from_precisions(np.asarray(self.precisions_init, dtype=np.float64))
        if params is None:
            if any(v is None for v in (self.weights_init, self.means_init, self.precisions_init)):
                return None
            covariances = family.covariances_from_precision_cholesky(prec_chol)
            return GaussianParams(np.asarray(self.weights_init, float), np.asarray(self.means_init, float), covariances, prec_chol)
        params = super()._user_params(family, params)
        if prec_chol is not None:  # as scikit-learn: the covariances stay those of the initial M-step
            params.precisions_cholesky = prec_chol
        return params

    def _check_family_parameters(self) -> None:
        _check_real("reg_covar", self.reg_covar, 0.0)
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {self.covariance_type!r}")
        check_device(self.device)
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")

    def _check_family_init(self, n_features: int) -> None:
        K, d = self.n_components, n_features
        if self.means_init is not None:
            _as_shape("means_init", self.means_init, (K, d))
        if self.precisions_init is not None:
            ct = self.covariance_type
            shape = {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[ct]
            p = _as_shape("precisions_init", self.precisions_init, shape)
            if ct in ("full", "tied"):
                for m in p.reshape(-1, d, d):
                    if not np.allclose(m, m.T) or np.any(np.linalg.eigvalsh(m) <= 0.0):
                        raise ValueError(f"precisions_init must be symmetric positive-definite for covariance_type={ct!r}")
            elif np.any(p <= 0):
                raise ValueError(f"precisions_init must be positive for covariance_type={ct!r}")

    # ------------------------------------------------------- scikit-learn
    def to_sklearn(self) -> Any:
        """This fitted model as a fitted :class:`sklearn.mixture.GaussianMixture`.

        Every tool built on scikit-learn can then use a model fitted out of
        core: its ``predict``, ``predict_proba``, ``score_samples``,
        ``sample``, ``bic`` and ``aic`` give what this model's give (except
        for a model fitted with ``learn_weights=False``: scikit-learn counts
        its K - 1 free weights, so its BIC is (K - 1) ln n and its AIC
        2 (K - 1) larger). The
        parameters both classes have are copied (``n_components``,
        ``covariance_type``, ``tol``, ``reg_covar``, ``max_iter``,
        ``n_init``, ``init_params``, ``weights_init``, ``means_init``,
        ``precisions_init``, ``random_state``, ``warm_start``, ``verbose``,
        ``verbose_interval``), as are the learned attributes
        (``weights_``, ``means_``, ``covariances_``, ``precisions_``,
        ``precisions_cholesky_``, ``converged_``, ``n_iter_``,
        ``lower_bound_``, ``lower_bounds_`` where scikit-learn has it (1.7
        and later), ``n_features_in_`` and ``feature_names_in_`` when
        present). Settings scikit-learn lacks (``algorithm``, ``prior``,
        ``learn_weights``, ``client``, ``dtype``, ``device``, ...) are not
        carried: a re-fit of the returned estimator is scikit-learn's
        maximum-likelihood batch EM in memory.

        Returns
        -------
        sklearn.mixture.GaussianMixture
            A new, fitted estimator; its arrays are copies.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            This model is not fitted.
        """
        import copy

        import sklearn
        from sklearn.mixture import GaussianMixture as SkGaussianMixture
        from sklearn.utils.fixes import parse_version
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        shared = SkGaussianMixture().get_params(deep=False).keys() & self.get_params(deep=False).keys()
        # Copies: the two estimators must not share arrays or a RandomState whose draws would interleave.
        est = SkGaussianMixture(**copy.deepcopy({name: getattr(self, name) for name in shared}))
        for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
            setattr(est, name, np.array(getattr(self, name), dtype=np.float64))
        est.converged_ = bool(self.converged_)
        est.n_iter_ = int(self.n_iter_)
        est.lower_bound_ = float(self.lower_bound_)
        if parse_version(sklearn.__version__).release >= (1, 7):  # lower_bounds_ came with scikit-learn 1.7
            est.lower_bounds_ = [float(v) for v in self.lower_bounds_]
        est.n_features_in_ = int(self.n_features_in_)
        if hasattr(self, "feature_names_in_"):
            est.feature_names_in_ = np.array(self.feature_names_in_, dtype=object)
        return est

    @classmethod
    def from_sklearn(cls, est: Any, *, n_samples: int | None = None) -> "GaussianMixture":
        """A fitted streamem model from a fitted :class:`sklearn.mixture.GaussianMixture`.

        The reverse of :meth:`to_sklearn`: the parameters both classes have
        and the learned parameters are copied (the precision Cholesky
        factors as they are, so predictions and scores equal
        scikit-learn's). The result predicts, scores, saves and loads like
        a model fitted here, and :meth:`update` and :meth:`partial_fit`
        continue from it by stepwise EM. It has no online statistics of
        its own: online EM starts from the statistics its parameters imply
        (as for a model saved before online EM existed).

        Parameters
        ----------
        est : sklearn.mixture.GaussianMixture
            A fitted estimator (not a ``BayesianGaussianMixture``).
        n_samples : int, optional
            Rows ``est`` was fitted on, which scikit-learn does not record;
            it becomes ``n_rows_seen_``, so that :meth:`update` weighs the
            model as that many rows in its running average. Without it
            the model counts as having seen no rows, and the first
            mini-batch of an update gets step ``1 / step_offset`` (one
            half by default).

        Returns
        -------
        GaussianMixture
            Settings scikit-learn lacks take their defaults.

        Raises
        ------
        TypeError
            ``est`` is not a scikit-learn ``GaussianMixture``.
        ValueError
            ``est`` is not fitted, or ``n_samples`` is not a non-negative integer.
        """
        import copy
        from numbers import Integral

        from sklearn.exceptions import NotFittedError
        from sklearn.mixture import GaussianMixture as SkGaussianMixture
        from sklearn.utils.validation import check_is_fitted

        if not isinstance(est, SkGaussianMixture):
            raise TypeError(f"est must be a fitted sklearn.mixture.GaussianMixture, got {type(est).__name__}")
        try:
            check_is_fitted(est)
        except NotFittedError:
            raise ValueError("est is an unfitted sklearn.mixture.GaussianMixture; fit it before converting it") from None
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 0):
            raise ValueError(f"n_samples must be None or an integer >= 0, got {n_samples!r}")
        shared = est.get_params(deep=False).keys() & cls().get_params(deep=False).keys()
        model = cls(**copy.deepcopy({name: getattr(est, name) for name in shared}))
        family = model._family(fitted=False)
        arrays = {name: np.array(getattr(est, f"{name}_"), dtype=np.float64) for name in ("weights", *family.param_names)}
        model._set_params(family, family.make_params(**arrays))
        model.converged_ = bool(est.converged_)
        model.n_iter_ = int(est.n_iter_)
        model.lower_bound_ = float(est.lower_bound_)
        model.lower_bounds_ = [float(v) for v in getattr(est, "lower_bounds_", [est.lower_bound_])]
        model.n_features_in_ = int(est.n_features_in_)
        if hasattr(est, "feature_names_in_"):
            model.feature_names_in_ = np.array(est.feature_names_in_, dtype=object)
        model.feature_coord_ = None
        model.fit_data_ = {"source": "sklearn.mixture.GaussianMixture"}
        model.n_data_passes_ = 0
        model.tasks_per_pass_ = 0
        model.n_rows_seen_ = 0 if n_samples is None else int(n_samples)
        return model
