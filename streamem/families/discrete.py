"""Families of discrete data: Bernoulli (0/1), Binomial (counts out of n), Poisson (counts), Categorical (codes).

The Bernoulli, Binomial and Poisson log-likelihoods are linear in the data,
so a block's E-step is one matrix product; categorical features gather
each code's log-probability feature by feature (a product with a one-hot
coding would need rows x features x categories of memory). The
statistics are the responsibilities summed per component (``nk``) and the
responsibility-weighted sums of the data (``sx``, or category counts).

Without a prior a probability or rate can come out 0 (or a probability
1), e.g. for a feature that is always 0 within a component: exactly 0 when
no row of the data has that feature non-zero, else about 1e-300 (the other
components' rows have responsibilities at the floor below under it). The
log-likelihood counts log 0 as ``log(1e-300)`` (about -691): a row that
contradicts such a component gets a tiny, finite likelihood under it, never
NaN, and a row no component explains gets finite responsibilities. Such a
0 cannot become non-zero again: a k-means start that leaves a category
unseen in a cluster can trap maximum-likelihood EM (``n_init``, random
starts from the data, or a prior avoid this). With a prior (``prior="default"`` or conjugate hyperparameters)
probabilities stay strictly inside (0, 1) and rates above 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import gammaln

from streamem.families.base import EPS10, MixtureFamily, MixtureParams, check_integer_values, register_family
from streamem.stats import SuffStats

#: What log 0 counts as in the log-likelihoods (finite, so that nothing becomes NaN).
LOG_FLOOR = 1e-300


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, LOG_FLOOR))


#: Counts up to this are looked up in a table of log-factorials (11x faster than gammaln per value, measured).
_TABLE_MAX = 1 << 16


def log_factorial_rows(X: np.ndarray) -> np.ndarray:
    """``sum_j log(x_ij!)`` for every row of non-negative integer counts."""
    if X.size == 0:
        return np.zeros(len(X))
    top = float(X.max())
    if top <= _TABLE_MAX:
        return gammaln(np.arange(int(top) + 1) + 1.0)[X.astype(np.intp)].sum(axis=1)
    return gammaln(X + 1.0).sum(axis=1)


def _per_feature(value: Any, d: int, name: str) -> np.ndarray:
    """An int or one int per feature, as an array of ``d`` values."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(d, int(arr))
    if arr.shape != (d,):
        raise ValueError(f"{name} must be an int or one per feature ({d}), got {arr.shape[0]} values")
    return arr.astype(np.int64)


def _smoothed_mean(sample: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Per-feature mean of ``sample / scale``, pulled half a row toward 1/2: strictly inside (0, 1)."""
    return (sample.sum(axis=0) / scale + 0.5) / (len(sample) + 1.0)


def exp_family_divergence(mean_a: np.ndarray, nat_a: np.ndarray, mean_b: np.ndarray, nat_b: np.ndarray) -> np.ndarray:
    """Symmetrised KL divergence of products of exponential-family features: sum (mean_a - mean_b)(natural_a - natural_b)."""
    K_a, K_b = len(mean_a), len(mean_b)
    ma, na = mean_a.reshape(K_a, -1), nat_a.reshape(K_a, -1)
    mb, nb = mean_b.reshape(K_b, -1), nat_b.reshape(K_b, -1)
    return ((ma[:, None] - mb[None]) * (na[:, None] - nb[None])).sum(axis=2)


@dataclass(frozen=True, eq=False)
class _CountFamily(MixtureFamily):
    """Shared parts of the Bernoulli, Binomial and Poisson families: statistics ``nk`` and ``sx``."""

    def component_stats(self, X: np.ndarray, resp: np.ndarray) -> dict[str, np.ndarray]:
        return {"sx": resp.T @ X.astype(np.float64, copy=False)}

    def n_component_parameters(self, n_features: int) -> int:
        return n_features


@register_family
@dataclass(frozen=True, eq=False)
class BinomialFamily(_CountFamily):
    """Features that count successes out of ``n_trials`` (an int, or one per feature).

    ``log p(x | k) = sum_j x_j log p_kj + (n_j - x_j) log(1 - p_kj) + log C(n_j, x_j)``.
    Prior: ``alpha`` and ``beta`` (one per feature), a Beta(alpha, beta) on
    every probability: ``p = (sx + alpha - 1) / (n nk + alpha + beta - 2)``.
    """

    name = "binomial"
    param_names = ("probs",)
    n_trials: Any = 1

    def _trials(self, d: int) -> np.ndarray:
        return _per_feature(self.n_trials, d, "n_trials").astype(np.float64)

    def component_log_prob(self, X: np.ndarray, params: MixtureParams) -> np.ndarray:
        X = X.astype(np.float64, copy=False)
        n = self._trials(X.shape[1])
        p = params.probs
        log_p, log_q = _log(p), _log(1.0 - p)
        out = X @ (log_p - log_q).T + (n * log_q).sum(axis=1)
        if np.any(n > 1):  # the binomial coefficients: the same for every component
            out += (gammaln(n + 1).sum() - log_factorial_rows(X) - log_factorial_rows(n - X))[:, None]
        return out

    def m_step_components(self, stats: SuffStats) -> dict[str, np.ndarray]:
        nk, sx = stats["nk"] + EPS10, stats["sx"]
        trials = nk[:, None] * self._trials(sx.shape[1])
        if self.prior is None or "alpha" not in self.prior:
            return {"probs": np.clip(sx / trials, 0.0, 1.0)}
        a, b = np.asarray(self.prior["alpha"], float), np.asarray(self.prior["beta"], float)
        return {"probs": (sx + a - 1.0) / (trials + a + b - 2.0)}

    def stats_of_params(self, params: MixtureParams) -> SuffStats:
        w = params.weights / params.weights.sum()
        sx = w[:, None] * params.probs * self._trials(params.probs.shape[1])
        return SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), "nk": w, "sx": sx})

    def log_prior(self, params: MixtureParams) -> float:
        out = self._weights_log_prior(params.weights)
        if self.prior is None or "alpha" not in self.prior:
            return out
        a, b = np.asarray(self.prior["alpha"], float), np.asarray(self.prior["beta"], float)
        return out + float(((a - 1.0) * _log(params.probs) + (b - 1.0) * _log(1.0 - params.probs)).sum())

    def default_prior(self, n_components: int, sample: np.ndarray) -> dict:
        """One pseudo-row per component at the (smoothed) data mean: Beta(1 + m, 2 - m), and Dirichlet(2) on the weights."""
        m = _smoothed_mean(sample, self._trials(sample.shape[1]))
        return {"weight_concentration": 2.0, "alpha": 1.0 + m, "beta": 2.0 - m}

    def prior_spec(self, d: int) -> dict[str, tuple[tuple[int, ...], float]]:
        return {**super().prior_spec(d), "alpha": ((d,), 1.0), "beta": ((d,), 1.0)}

    def divergence(self, a: MixtureParams, b: MixtureParams) -> np.ndarray:
        n = self._trials(a.probs.shape[1])
        return exp_family_divergence(n * a.probs, _log(a.probs) - _log(1 - a.probs), n * b.probs, _log(b.probs) - _log(1 - b.probs))

    def check_data(self, X: np.ndarray, offset: int = 0) -> None:
        check_integer_values(X, offset, "BinomialMixture", 0, self._trials(X.shape[1]),
                             f"values must be integer counts between 0 and n_trials={self.n_trials!r}")  # fmt: skip

    def sample_component(self, params: MixtureParams, k: int, n: int, rng: np.random.RandomState) -> np.ndarray:
        trials = self._trials(params.probs.shape[1]).astype(np.int64)
        return rng.binomial(trials, params.probs[k], size=(n, len(trials))).astype(np.float64)


@register_family
@dataclass(frozen=True, eq=False)
class BernoulliFamily(BinomialFamily):
    """0/1 features: the Binomial family with one trial.

    Prior: ``alpha`` and ``beta``, a Beta on every probability.
    """

    name = "bernoulli"

    def check_data(self, X: np.ndarray, offset: int = 0) -> None:
        check_integer_values(X, offset, "BernoulliMixture", 0, 1, "values must be 0 or 1")


@register_family
@dataclass(frozen=True, eq=False)
class PoissonFamily(_CountFamily):
    """Non-negative integer counts: ``log p(x | k) = sum_j x_j log r_kj - r_kj - log x_j!``.

    Prior: ``shape`` and ``rate`` (one per feature), a Gamma(shape, rate)
    on every rate: ``r = (sx + shape - 1) / (nk + rate)``.
    """

    name = "poisson"
    param_names = ("rates",)

    def component_log_prob(self, X: np.ndarray, params: MixtureParams) -> np.ndarray:
        X = X.astype(np.float64, copy=False)
        r = params.rates
        return X @ _log(r).T - r.sum(axis=1) - log_factorial_rows(X)[:, None]

    def m_step_components(self, stats: SuffStats) -> dict[str, np.ndarray]:
        nk, sx = stats["nk"] + EPS10, stats["sx"]
        if self.prior is None or "shape" not in self.prior:
            return {"rates": sx / nk[:, None]}
        shape, rate = np.asarray(self.prior["shape"], float), np.asarray(self.prior["rate"], float)
        return {"rates": np.maximum(sx + shape - 1.0, 0.0) / (nk[:, None] + rate)}

    def stats_of_params(self, params: MixtureParams) -> SuffStats:
        w = params.weights / params.weights.sum()
        return SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), "nk": w, "sx": w[:, None] * params.rates})

    def log_prior(self, params: MixtureParams) -> float:
        out = self._weights_log_prior(params.weights)
        if self.prior is None or "shape" not in self.prior:
            return out
        shape, rate = np.asarray(self.prior["shape"], float), np.asarray(self.prior["rate"], float)
        return out + float(((shape - 1.0) * _log(params.rates) - rate * params.rates).sum())

    def default_prior(self, n_components: int, sample: np.ndarray) -> dict:
        """One pseudo-row per component at the data mean (plus half a count): Gamma(1 + mean, 1); Dirichlet(2) on the weights."""
        m = (sample.sum(axis=0) + 0.5) / max(len(sample), 1)
        return {"weight_concentration": 2.0, "shape": 1.0 + m, "rate": np.ones_like(m)}

    def prior_spec(self, d: int) -> dict[str, tuple[tuple[int, ...], float]]:
        return {**super().prior_spec(d), "shape": ((d,), 1.0), "rate": ((d,), 0.0)}

    def divergence(self, a: MixtureParams, b: MixtureParams) -> np.ndarray:
        return exp_family_divergence(a.rates, _log(a.rates), b.rates, _log(b.rates))

    def check_data(self, X: np.ndarray, offset: int = 0) -> None:
        check_integer_values(X, offset, "PoissonMixture", 0, np.inf, "values must be non-negative integer counts")

    def sample_component(self, params: MixtureParams, k: int, n: int, rng: np.random.RandomState) -> np.ndarray:
        return rng.poisson(params.rates[k], size=(n, params.rates.shape[1])).astype(np.float64)


@register_family
@dataclass(frozen=True, eq=False)
class CategoricalFamily(MixtureFamily):
    """Integer-coded features, feature ``j`` taking values ``0`` to ``n_categories_j - 1``.

    ``probs`` has shape (K, d, C) with C the largest number of categories;
    entries past a feature's own categories are 0. The E-step gathers each
    row's code's log-probability feature by feature (memory rows x K); the
    statistics are weighted counts per code (``bincount``).
    Prior: ``concentration`` (d, C), a Dirichlet on every feature's
    probabilities: ``p = (counts + a - 1) / (nk + sum_c (a_c - 1))``.
    """

    name = "categorical"
    param_names = ("probs",)
    n_categories: Any = 2

    def _categories(self, d: int) -> np.ndarray:
        return _per_feature(self.n_categories, d, "n_categories")

    def _valid(self, d: int) -> np.ndarray:
        """(d, C) mask of the categories each feature has."""
        cats = self._categories(d)
        return np.arange(cats.max())[None, :] < cats[:, None]

    def component_log_prob(self, X: np.ndarray, params: MixtureParams) -> np.ndarray:
        # A gather per feature, not a product with a one-hot coding: memory n x K, whatever the categories.
        log_p = _log(params.probs)  # (K, d, C)
        codes = X.astype(np.intp)
        out = np.zeros((len(X), log_p.shape[0]))
        for j in range(X.shape[1]):
            out += log_p[:, j, codes[:, j]].T
        return out

    def component_stats(self, X: np.ndarray, resp: np.ndarray) -> dict[str, np.ndarray]:
        K, d = resp.shape[1], X.shape[1]
        C = int(self._categories(d).max())
        codes = X.astype(np.intp)
        counts = np.empty((K, d, C))
        for j in range(d):
            for k in range(K):
                counts[k, j] = np.bincount(codes[:, j], weights=resp[:, k], minlength=C)
        return {"counts": counts}

    def m_step_components(self, stats: SuffStats) -> dict[str, np.ndarray]:
        counts, nk = stats["counts"], stats["nk"] + EPS10
        if self.prior is None or "concentration" not in self.prior:
            return {"probs": counts / nk[:, None, None]}
        extra = (np.asarray(self.prior["concentration"], float) - 1.0) * self._valid(counts.shape[1])
        return {"probs": (counts + extra) / (nk[:, None, None] + extra.sum(axis=1)[None, :, None])}

    def stats_of_params(self, params: MixtureParams) -> SuffStats:
        w = params.weights / params.weights.sum()
        return SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), "nk": w, "counts": w[:, None, None] * params.probs})

    def log_prior(self, params: MixtureParams) -> float:
        out = self._weights_log_prior(params.weights)
        if self.prior is None or "concentration" not in self.prior:
            return out
        extra = (np.asarray(self.prior["concentration"], float) - 1.0) * self._valid(params.probs.shape[1])
        return out + float((extra * _log(params.probs)).sum())

    def default_prior(self, n_components: int, sample: np.ndarray) -> dict:
        """One pseudo-row per component spread as the (smoothed) category frequencies; Dirichlet(2) on the weights."""
        d = sample.shape[1]
        valid = self._valid(d)
        C = valid.shape[1]
        counts = np.stack([np.bincount(sample[:, j].astype(np.intp), minlength=C) for j in range(d)])
        freq = (counts + 0.5) * valid
        return {"weight_concentration": 2.0, "concentration": 1.0 + freq / freq.sum(axis=1, keepdims=True)}

    def prior_spec(self, d: int) -> dict[str, tuple[tuple[int, ...], float]]:
        return {**super().prior_spec(d), "concentration": ((d, int(self._categories(d).max())), 1.0)}

    def prior_keys(self) -> tuple[str, ...]:
        return ("weight_concentration", "concentration")  # without the shapes, which need n_features

    def param_dims(self, name: str) -> tuple[str, ...]:
        return ("component", "feature", "category") if name == "probs" else super().param_dims(name)

    def stat_dims(self, name: str) -> tuple[str, ...]:
        return ("component", "feature", "category") if name == "counts" else super().stat_dims(name)

    def stats_floats(self, n_components: int, n_features: int) -> int:
        return 2 + n_components * (1 + n_features * int(self._categories(n_features).max()))

    def n_component_parameters(self, n_features: int) -> int:
        return int((self._categories(n_features) - 1).sum())

    def divergence(self, a: MixtureParams, b: MixtureParams) -> np.ndarray:
        return exp_family_divergence(a.probs, _log(a.probs), b.probs, _log(b.probs))

    def check_data(self, X: np.ndarray, offset: int = 0) -> None:
        check_integer_values(X, offset, "CategoricalMixture", 0, self._categories(X.shape[1]) - 1,
                             f"values must be integer category codes from 0 to n_categories - 1 (n_categories={self.n_categories!r})")  # fmt: skip

    def sample_component(self, params: MixtureParams, k: int, n: int, rng: np.random.RandomState) -> np.ndarray:
        probs = params.probs[k]
        return np.stack([rng.choice(probs.shape[1], size=n, p=p / p.sum()) for p in probs], axis=1).astype(np.float64)
