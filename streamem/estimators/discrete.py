"""Mixtures of discrete data: thin layers over the estimator core and the families of :mod:`streamem.families.discrete`."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamem.estimators.base import COMMON_ATTRIBUTES_DOC, COMMON_PARAMS_DOC, MixtureEstimator, _as_shape
from streamem.families.discrete import BernoulliFamily, BinomialFamily, CategoricalFamily, PoissonFamily

_DATA_DOC = """Data: a numpy array, a dask array, a ``zarr.Array``, a path to a Zarr
    store or an xarray object of shape (n_samples, n_features), as for
    :class:`streamem.GaussianMixture`; every algorithm (batch, stepwise,
    incremental, ``partial_fit``, ``update``), checkpoints, model files and
    the command line work the same way. Values the family cannot model are
    a ValueError naming the rule, the value and its row."""


def _check_counts(name: str, value: Any, low: int) -> None:
    arr = np.asarray(value)
    if arr.ndim > 1 or arr.size == 0 or arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError(f"{name} must be an int or one int per feature, got {value!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr < low):
        raise ValueError(f"{name} must be finite and >= {low}, got {value!r}")


class _ProbsMixture(MixtureEstimator):
    """Shared by the estimators whose parameters are ``probs_`` given by ``probs_init``."""

    _init_arrays = {"probs": "probs_init"}

    def _check_family_init(self, n_features: int) -> None:
        if self.probs_init is not None:
            probs = _as_shape("probs_init", self.probs_init, self._probs_shape(n_features))
            if np.any(probs < 0) or np.any(probs > 1):
                raise ValueError(f"probs_init must lie in [0, 1], got min {probs.min()}, max {probs.max()}")

    def _probs_shape(self, n_features: int) -> tuple[int, ...]:
        return (self.n_components, n_features)


class BernoulliMixture(_ProbsMixture):
    __doc__ = f"""Mixture of independent Bernoulli features (0/1 data), fitted by EM out of core.

    {_DATA_DOC}

    Parameters
    ----------
    n_components : int, default=1
    probs_init : array-like of shape (n_components, n_features), optional
        Initial probabilities of a 1.
    {COMMON_PARAMS_DOC.strip()}
        Bernoulli hyperparameters: ``alpha``, ``beta`` (one per feature), a
        Beta prior on every probability.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    probs_ : ndarray of shape (n_components, n_features)
        Probability of a 1, per component and feature.
    {COMMON_ATTRIBUTES_DOC.strip()}
    """

    family_class = BernoulliFamily

    def __init__(self, n_components: int = 1, *, probs_init: Any = None, **common: Any):
        super().__init__(n_components, **common)
        self.probs_init = probs_init


class BinomialMixture(_ProbsMixture):
    __doc__ = f"""Mixture of independent Binomial features (successes out of ``n_trials``), fitted by EM out of core.

    {_DATA_DOC}

    Parameters
    ----------
    n_components : int, default=1
    n_trials : int or array-like of int, default=1
        Trials per feature: one number for all features, or one per feature.
    probs_init : array-like of shape (n_components, n_features), optional
        Initial success probabilities.
    {COMMON_PARAMS_DOC.strip()}
        Binomial hyperparameters: ``alpha``, ``beta`` (one per feature), a
        Beta prior on every probability.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    probs_ : ndarray of shape (n_components, n_features)
        Success probability per component and feature.
    {COMMON_ATTRIBUTES_DOC.strip()}
    """

    family_class = BinomialFamily

    def __init__(self, n_components: int = 1, *, n_trials: Any = 1, probs_init: Any = None, **common: Any):
        super().__init__(n_components, **common)
        self.n_trials = n_trials
        self.probs_init = probs_init

    def _family_settings(self) -> dict[str, Any]:
        return {"n_trials": self.n_trials}

    def _check_family_parameters(self) -> None:
        _check_counts("n_trials", self.n_trials, 1)


class PoissonMixture(MixtureEstimator):
    __doc__ = f"""Mixture of independent Poisson features (non-negative counts), fitted by EM out of core.

    {_DATA_DOC}

    Parameters
    ----------
    n_components : int, default=1
    rates_init : array-like of shape (n_components, n_features), optional
        Initial rates.
    {COMMON_PARAMS_DOC.strip()}
        Poisson hyperparameters: ``shape``, ``rate`` (one per feature), a
        Gamma prior on every rate.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    rates_ : ndarray of shape (n_components, n_features)
        Mean count per component and feature.
    {COMMON_ATTRIBUTES_DOC.strip()}
    """

    family_class = PoissonFamily
    _init_arrays = {"rates": "rates_init"}

    def __init__(self, n_components: int = 1, *, rates_init: Any = None, **common: Any):
        super().__init__(n_components, **common)
        self.rates_init = rates_init

    def _check_family_init(self, n_features: int) -> None:
        if self.rates_init is not None:
            rates = _as_shape("rates_init", self.rates_init, (self.n_components, n_features))
            if np.any(rates < 0):
                raise ValueError(f"rates_init must be >= 0, got min {rates.min()}")


class CategoricalMixture(_ProbsMixture):
    __doc__ = f"""Mixture of independent categorical features (integer codes), fitted by EM out of core.

    {_DATA_DOC}

    Parameters
    ----------
    n_components : int, default=1
    n_categories : int or array-like of int, default=2
        Categories per feature (codes ``0 .. n_categories - 1``): one
        number for all features, or one per feature.
    probs_init : array-like of shape (n_components, n_features, max(n_categories)), optional
        Initial probabilities of every category (0 past a feature's own).
    {COMMON_PARAMS_DOC.strip()}
        Categorical hyperparameters: ``concentration`` of shape
        (n_features, max(n_categories)), a Dirichlet prior on every
        feature's probabilities.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    probs_ : ndarray of shape (n_components, n_features, max(n_categories))
        Probability of every category, per component and feature.
    {COMMON_ATTRIBUTES_DOC.strip()}
    """

    family_class = CategoricalFamily

    def __init__(self, n_components: int = 1, *, n_categories: Any = 2, probs_init: Any = None, **common: Any):
        super().__init__(n_components, **common)
        self.n_categories = n_categories
        self.probs_init = probs_init

    def _family_settings(self) -> dict[str, Any]:
        return {"n_categories": self.n_categories}

    def _check_family_parameters(self) -> None:
        _check_counts("n_categories", self.n_categories, 1)

    def _probs_shape(self, n_features: int) -> tuple[int, ...]:
        return (self.n_components, n_features, int(np.max(self.n_categories)))

    def _check_family_init(self, n_features: int) -> None:
        """Besides shape and range: every feature's probabilities sum to 1 and are 0 past its own categories."""
        super()._check_family_init(n_features)
        if self.probs_init is None:
            return
        probs = np.asarray(self.probs_init, dtype=np.float64)
        valid = self._family(fitted=False)._valid(n_features)
        if np.any(probs[:, ~valid] != 0):
            raise ValueError(f"probs_init must be 0 past a feature's own categories (n_categories={self.n_categories!r})")
        sums = probs.sum(axis=-1)
        if not np.allclose(sums, 1.0, rtol=0, atol=1e-8):
            k, j = (int(i) for i in np.argwhere(~np.isclose(sums, 1.0, rtol=0, atol=1e-8))[0])
            raise ValueError(f"probs_init[{k}, {j}] must sum to 1 over the categories, got {sums[k, j]:.10g}")
