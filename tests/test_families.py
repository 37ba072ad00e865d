"""Bernoulli, Binomial, Poisson and Categorical mixtures against independent references (issue 15, items 2, 3, 7).

The references are written here, without streamem: a numpy EM per family
whose log-likelihoods come from ``scipy.stats`` (or an explicit table look-up
for categorical codes) and whose M-steps are the textbook weighted means; a
numpy Gaussian EM with fixed weights; the published estimates of Do &
Batzoglou (2008); parameters a simulation was drawn from; hand counts of
free parameters. Data are read from Zarr stores on disk with chunkings that
do not divide the rows.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose, assert_array_equal
from scipy import stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning

import streamem
from _common import make_data, make_inits

# ------------------------------------------------------------- the families


@dataclass(frozen=True)
class Spec:
    """One family: its estimator, true and initial parameters, and the reference EM's two halves."""

    name: str
    cls: type
    settings: dict
    attr: str  # learned attribute: "probs" or "rates"
    weights: np.ndarray  # true
    params: np.ndarray  # true
    init_weights: np.ndarray  # deliberately off the truth
    init_params: np.ndarray
    draw: Callable[[np.ndarray, np.ndarray, np.random.RandomState], np.ndarray]  # (params, labels, rng) -> X
    log_prob: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (X, params) -> (n, K)
    m_step: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (X, resp, nk) -> params
    free_per_component: int  # counted by hand: d, or sum(C_j - 1)

    def estimator(self, **kwargs: Any) -> Any:
        return self.cls(n_components=len(self.weights), **self.settings, **kwargs)

    def inits(self) -> dict:
        return {"weights_init": self.init_weights, f"{self.attr}_init": self.init_params}

    def simulate(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.RandomState(seed)
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.draw(self.params, labels, rng).astype(np.float64), labels


TRIALS = np.array([5, 10, 3])
CATEGORIES = np.array([2, 3, 4, 4, 3])


def _bernoulli_draw(p, z, rng):
    return (rng.random_sample((len(z), p.shape[1])) < p[z]).astype(float)


def _binomial_draw(p, z, rng):
    return rng.binomial(TRIALS, p[z])


def _poisson_draw(r, z, rng):
    return rng.poisson(r[z])


def _categorical_draw(P, z, rng):
    """Codes by inverse CDF, feature by feature; capped at the feature's last category."""
    K, d, C = P.shape
    cdf = P.cumsum(axis=-1)
    u = rng.random_sample((len(z), d))
    codes = (u[:, :, None] > cdf[z]).sum(axis=-1)
    return np.minimum(codes, CATEGORIES - 1)


def _categorical_log_prob(X, P):
    """log P[k, j, x_ij] summed over features, by table look-up."""
    codes = X.astype(int)
    return np.log(P[:, np.arange(X.shape[1]), codes]).sum(axis=-1).T  # (K, n, d) -> (n, K)


def _categorical_m_step(X, resp, nk):
    C = int(CATEGORIES.max())
    counts = np.stack([resp.T @ (X == c) for c in range(C)], axis=-1)
    return counts / nk[:, None, None]


def _padded(rows: list[list[list[float]]]) -> np.ndarray:
    """(K, d, C) probabilities, 0 past a feature's own categories."""
    C = int(CATEGORIES.max())
    return np.array([[feature + [0.0] * (C - len(feature)) for feature in comp] for comp in rows])


SPECS = {
    "bernoulli": Spec(
        "bernoulli", streamem.BernoulliMixture, {}, "probs",
        np.array([0.4, 0.6]), np.array([[0.9, 0.8, 0.2, 0.1, 0.85, 0.15], [0.2, 0.3, 0.7, 0.9, 0.1, 0.8]]),
        np.array([0.5, 0.5]), np.array([[0.6, 0.55, 0.45, 0.4, 0.6, 0.4], [0.45, 0.5, 0.55, 0.6, 0.4, 0.55]]),
        _bernoulli_draw,
        lambda X, p: stats.bernoulli.logpmf(X[:, None, :], p[None]).sum(axis=-1),
        lambda X, resp, nk: resp.T @ X / nk[:, None],
        6,
    ),
    "binomial": Spec(
        "binomial", streamem.BinomialMixture, {"n_trials": TRIALS}, "probs",
        np.array([0.55, 0.45]), np.array([[0.2, 0.7, 0.5], [0.6, 0.3, 0.9]]),
        np.array([0.5, 0.5]), np.array([[0.4, 0.55, 0.6], [0.5, 0.45, 0.7]]),
        _binomial_draw,
        lambda X, p: stats.binom.logpmf(X[:, None, :], TRIALS, p[None]).sum(axis=-1),
        lambda X, resp, nk: resp.T @ X / (nk[:, None] * TRIALS),
        3,
    ),
    "poisson": Spec(
        "poisson", streamem.PoissonMixture, {}, "rates",
        np.array([0.3, 0.3, 0.4]), np.array([[1.0, 10.0], [10.0, 1.0], [20.0, 20.0]]),
        np.array([0.3, 0.3, 0.4]), np.array([[3.0, 6.0], [6.0, 3.0], [12.0, 12.0]]),
        _poisson_draw,
        lambda X, r: stats.poisson.logpmf(X[:, None, :], r[None]).sum(axis=-1),
        lambda X, resp, nk: resp.T @ X / nk[:, None],
        2,
    ),
    "categorical": Spec(
        "categorical", streamem.CategoricalMixture, {"n_categories": CATEGORIES}, "probs",
        np.array([0.5, 0.3, 0.2]),
        _padded([[[0.9, 0.1], [0.8, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.8, 0.1, 0.1]],
                 [[0.2, 0.8], [0.1, 0.8, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.8, 0.1]],
                 [[0.5, 0.5], [0.1, 0.1, 0.8], [0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.8]]]),
        np.array([0.4, 0.3, 0.3]),
        _padded([[[0.6, 0.4], [0.5, 0.3, 0.2], [0.4, 0.2, 0.2, 0.2], [0.2, 0.4, 0.2, 0.2], [0.5, 0.3, 0.2]],
                 [[0.4, 0.6], [0.3, 0.5, 0.2], [0.2, 0.2, 0.4, 0.2], [0.2, 0.2, 0.2, 0.4], [0.3, 0.5, 0.2]],
                 [[0.5, 0.5], [0.2, 0.3, 0.5], [0.2, 0.2, 0.2, 0.4], [0.4, 0.2, 0.2, 0.2], [0.2, 0.3, 0.5]]]),
        _categorical_draw, _categorical_log_prob, _categorical_m_step,
        int((CATEGORIES - 1).sum()),
    ),
}  # fmt: skip
FAMILIES = list(SPECS)


def reference_em(spec: Spec, X: np.ndarray, n_iter: int, learn_weights: bool = True) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Textbook EM from ``spec``'s initial parameters: weights, component parameters, mean log-likelihood per E-step."""
    weights, params = np.array(spec.init_weights, float), np.array(spec.init_params, float)
    bounds = []
    for _ in range(n_iter):
        log_joint = spec.log_prob(X, params) + np.log(weights)
        loglik = logsumexp(log_joint, axis=1)
        resp = np.exp(log_joint - loglik[:, None])
        bounds.append(loglik.mean())
        nk = resp.sum(axis=0)
        if learn_weights:
            weights = nk / len(X)
        params = spec.m_step(X, resp, nk)
    return weights, params, bounds


# ---------------------------------------------------------------- helpers


def write_zarr(path: Any, X: np.ndarray, chunk_rows: int) -> str:
    """``X`` as a Zarr (v3) array on disk in chunks of ``chunk_rows`` rows."""
    arr = zarr.open_array(str(path), mode="w", shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype, zarr_format=3)
    arr[...] = X
    return str(path)


def fit(model: Any, X: Any, **kwargs: Any) -> Any:
    """``model.fit`` with ConvergenceWarning silenced (tol=0 always warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, **kwargs)


def learned(model: Any, spec: Spec) -> np.ndarray:
    return getattr(model, f"{spec.attr}_")


@pytest.fixture(scope="module")
def small_sets() -> dict[str, np.ndarray]:
    """2,000 rows per family (fixed seed)."""
    return {name: spec.simulate(2000, seed=11 + i)[0] for i, (name, spec) in enumerate(SPECS.items())}


# ---------------------------------------------- 1. against the numpy EM


@pytest.mark.parametrize("name", FAMILIES)
def test_matches_numpy_em_on_zarr_store(name, small_sets, tmp_path):
    """20 iterations (tol=0) from the same initial parameters equal the reference EM to 1e-10; data in 333-row chunks."""
    spec, X = SPECS[name], small_sets[name]
    path = write_zarr(tmp_path / "data.zarr", X, 333)
    model = fit(spec.estimator(max_iter=20, tol=0, **spec.inits()), path)
    weights, params, bounds = reference_em(spec, X, 20)
    assert model.n_iter_ == 20
    assert_allclose(model.weights_, weights, rtol=0, atol=1e-10)
    assert_allclose(learned(model, spec), params, rtol=0, atol=1e-10)
    assert_allclose(model.lower_bounds_, bounds, rtol=0, atol=1e-10)
    # The fit moved far from the start: the comparison is not of two unchanged inits.
    assert np.abs(params - spec.init_params).max() > 0.1


# ------------------------------------------ 2. Do & Batzoglou's two coins


def test_two_coins_do_and_batzoglou_2008():
    """Five sets of ten tosses (heads 5, 9, 8, 4, 7), theta_A=0.6, theta_B=0.5, equal fixed weights, 10 iterations.

    Do & Batzoglou (2008, Nat Biotech 26:897, Figure 1b) publish
    theta_A ~ 0.80 and theta_B ~ 0.52 after 10 iterations.
    """
    heads = np.array([[5], [9], [8], [4], [7]], dtype=float)
    model = fit(streamem.BinomialMixture(n_components=2, n_trials=10, learn_weights=False, weights_init=[0.5, 0.5],
                                         probs_init=[[0.6], [0.5]], max_iter=10, tol=0), heads)  # fmt: skip
    assert np.round(model.probs_[:, 0], 2).tolist() == [0.80, 0.52]
    assert_array_equal(model.weights_, [0.5, 0.5])
    # Their first iteration by hand (Figure 1b): theta_A = 21.3 / (21.3 + 8.6), theta_B = 11.7 / (11.7 + 8.4).
    one = fit(streamem.BinomialMixture(n_components=2, n_trials=10, learn_weights=False, weights_init=[0.5, 0.5],
                                       probs_init=[[0.6], [0.5]], max_iter=1, tol=0), heads)  # fmt: skip
    assert_allclose(one.probs_[:, 0], [21.3 / 29.9, 11.7 / 20.1], atol=2e-3)


# ----------------------------------------- 3. recovery of simulated parameters


def _match(fitted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """The component order of ``fitted`` closest to ``true`` (all permutations)."""
    K = len(true)
    return np.array(min(itertools.permutations(range(K)), key=lambda p: np.abs(fitted[list(p)] - true).sum()))


@pytest.mark.parametrize("name", FAMILIES)
def test_recovers_simulated_parameters(name):
    """20,000 rows from well-separated components: the fit (default init, k-means) is within 5 standard errors of the truth.

    A standard error is that of a proportion (or a mean count) over the
    component's expected rows (or trials); the components are separated
    enough that misassigned rows do not matter at that scale. Categorical
    codes use 5 random rows as starts: k-means' hard assignments leave
    category probabilities exactly 0, which maximum-likelihood EM can never
    leave (here: mean log-likelihood -4.696 against -4.502 at the optimum).
    """
    spec = SPECS[name]
    X, _ = spec.simulate(20000, seed=5)
    extra = {"n_init": 5, "init_params": "random_from_data"} if name == "categorical" else {}
    model = fit(spec.estimator(random_state=0, tol=1e-6, max_iter=300, **extra), X)
    order = _match(learned(model, spec), spec.params)
    weights, params = model.weights_[order], learned(model, spec)[order]
    n_k = len(X) * spec.weights
    weights_se = np.sqrt(spec.weights * (1 - spec.weights) / len(X))
    assert np.all(np.abs(weights - spec.weights) <= 5 * weights_se), (weights - spec.weights) / weights_se
    if name == "poisson":
        se = np.sqrt(spec.params / n_k[:, None])
    else:
        trials = n_k[:, None] * (TRIALS if name == "binomial" else 1)
        if name == "categorical":
            trials = trials[:, :, None]
        se = np.sqrt(spec.params * (1 - spec.params) / trials)
    assert np.all(np.abs(params - spec.params) <= 5 * se + 1e-12), np.abs(params - spec.params) / np.maximum(se, 1e-12)


# --------------------------------------------------- 4. learn_weights=False


@pytest.mark.parametrize("name", FAMILIES)
def test_fixed_weights_match_reference_and_stay_put(name, small_sets):
    """learn_weights=False: weights_ is weights_init exactly; the rest is the reference EM with fixed weights."""
    spec, X = SPECS[name], small_sets[name]
    model = fit(spec.estimator(max_iter=10, tol=0, learn_weights=False, **spec.inits()), X)
    weights, params, bounds = reference_em(spec, X, 10, learn_weights=False)
    assert_array_equal(model.weights_, spec.init_weights)
    assert_allclose(learned(model, spec), params, rtol=0, atol=1e-10)
    assert_allclose(model.lower_bounds_, bounds, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", FAMILIES)
def test_fixed_weights_without_weights_init_are_equal(name, small_sets):
    spec = SPECS[name]
    model = fit(spec.estimator(max_iter=3, tol=0, learn_weights=False, random_state=0), small_sets[name])
    K = len(spec.weights)
    assert_array_equal(model.weights_, np.full(K, 1.0 / K))


def _gaussian_em_fixed_weights(X, weights, means, precisions, n_iter, reg_covar=1e-6):
    """Full-covariance Gaussian EM whose weights stay at ``weights``: means, covariances, mean log-likelihoods."""
    covs = np.linalg.inv(precisions)
    bounds = []
    for _ in range(n_iter):
        log_joint = np.stack([stats.multivariate_normal.logpdf(X, m, c) for m, c in zip(means, covs)], axis=1) + np.log(weights)
        loglik = logsumexp(log_joint, axis=1)
        resp = np.exp(log_joint - loglik[:, None])
        bounds.append(loglik.mean())
        nk = resp.sum(axis=0)
        means = resp.T @ X / nk[:, None]
        covs = np.stack([(resp[:, k, None] * (X - means[k])).T @ (X - means[k]) / nk[k] for k in range(len(nk))])
        covs += reg_covar * np.eye(X.shape[1])
    return means, covs, bounds


def test_gaussian_fixed_weights_match_numpy_em():
    X = make_data(n=1500)
    inits = make_inits("full")
    model = fit(streamem.GaussianMixture(n_components=3, learn_weights=False, max_iter=10, tol=0, **inits), X)
    means, covs, bounds = _gaussian_em_fixed_weights(X, inits["weights_init"], inits["means_init"], inits["precisions_init"], 10)
    assert_array_equal(model.weights_, inits["weights_init"])
    assert_allclose(model.means_, means, rtol=1e-8, atol=1e-8)
    assert_allclose(model.covariances_, covs, rtol=1e-8, atol=1e-8)
    assert_allclose(model.lower_bounds_, bounds, rtol=1e-8)


# ------------------------------------------- 5. chunking and workers


@pytest.mark.parametrize("name", FAMILIES)
def test_chunking_does_not_change_the_fit(name, small_sets, tmp_path):
    spec, X = SPECS[name], small_sets[name]
    fits = [fit(spec.estimator(max_iter=8, tol=0, **spec.inits()), data)
            for data in (X, write_zarr(tmp_path / "c250.zarr", X, 250), write_zarr(tmp_path / "c1000.zarr", X, 1000))]  # fmt: skip
    for other in fits[1:]:
        assert_allclose(other.weights_, fits[0].weights_, rtol=0, atol=1e-10)
        assert_allclose(learned(other, spec), learned(fits[0], spec), rtol=0, atol=1e-10)
        assert_allclose(other.lower_bounds_, fits[0].lower_bounds_, rtol=0, atol=1e-10)


def test_two_workers_give_the_local_fit(small_sets, tmp_path, cluster):
    """Every family on a 2-worker LocalCluster (processes, loopback: conftest's) equals the local fit of the same store."""
    from distributed import Client

    with Client(cluster) as client:
        for name, spec in SPECS.items():
            X = small_sets[name]
            path = write_zarr(tmp_path / f"{name}.zarr", X, 250)
            local = fit(spec.estimator(max_iter=8, tol=0, **spec.inits()), X)
            remote = fit(spec.estimator(max_iter=8, tol=0, client=client, **spec.inits()), path)
            assert_allclose(remote.weights_, local.weights_, rtol=0, atol=1e-10, err_msg=name)
            assert_allclose(learned(remote, spec), learned(local, spec), rtol=0, atol=1e-10, err_msg=name)
            assert_allclose(remote.lower_bounds_, local.lower_bounds_, rtol=0, atol=1e-10, err_msg=name)


# ------------------------------------------------------ 6. bad data and parameters

BAD_ROW = 777  # in the fourth 250-row chunk
LATER_ROW = 900  # the same chunk, but an earlier feature: the first bad value is the first in row order
BAD_VALUES = [
    ("bernoulli", 0.5, "BernoulliMixture", "values must be 0 or 1"),
    ("poisson", -1.0, "PoissonMixture", "values must be non-negative integer counts"),
    ("poisson", 2.5, "PoissonMixture", "values must be non-negative integer counts"),
    ("binomial", 11.0, "BinomialMixture", "values must be integer counts between 0 and n_trials=10"),
    ("categorical", 3.0, "CategoricalMixture", "values must be integer category codes from 0 to n_categories - 1 (n_categories=3)"),
]


def _bad_store(tmp_path, name: str, rows: dict[int, tuple[int, float]], small_sets) -> str:
    """Two features valid for every setting below, with ``rows[i] = (feature, value)`` planted; 250-row chunks."""
    X = np.minimum(small_sets[name][:, :2], 1.0 if name == "bernoulli" else 2.0)
    for row, (col, value) in rows.items():
        X[row, col] = value
    return write_zarr(tmp_path / "bad.zarr", X, 250)


def _bad_model(name: str, **kwargs: Any) -> Any:
    settings = {"n_trials": 10} if name == "binomial" else {"n_categories": 3} if name == "categorical" else {}
    return SPECS[name].cls(n_components=len(SPECS[name].weights), max_iter=2, random_state=0, **settings, **kwargs)


@pytest.mark.parametrize("name, value, family, rule", BAD_VALUES)
def test_bad_data_names_family_rule_value_and_row(name, value, family, rule, small_sets, tmp_path):
    """The first bad value (another follows in the same chunk) is named with its global row, in the fourth chunk."""
    path = _bad_store(tmp_path, name, {BAD_ROW: (1, value), LATER_ROW: (0, value)}, small_sets)
    with pytest.raises(ValueError) as info:
        fit(_bad_model(name), path)
    assert str(info.value) == f"{family}: {rule}; got {value!r} in row {BAD_ROW}, feature 1"


@pytest.mark.parametrize("name", FAMILIES)
def test_nan_is_a_value_error_naming_its_row(name, small_sets, tmp_path):
    """NaN is data the family cannot model: its check names the first one, in the k-means sample pass or in EM."""
    path = _bad_store(tmp_path, name, {BAD_ROW: (1, np.nan), 1500: (0, np.nan)}, small_sets)
    with pytest.raises(ValueError, match=rf"{SPECS[name].cls.__name__}: .*got nan in row {BAD_ROW}, feature 1"):
        fit(_bad_model(name), path)
    spec = SPECS[name]
    first_two = spec.init_params[:, :2, :3] if name == "categorical" else spec.init_params[:, :2]
    inits = {"weights_init": spec.init_weights, f"{spec.attr}_init": first_two}
    with pytest.raises(ValueError, match=rf"{spec.cls.__name__}: .*got nan in row {BAD_ROW}, feature 1"):
        fit(_bad_model(name, **inits), write_zarr(tmp_path / "one.zarr", _one_bad_row(path), 250))


def _one_bad_row(path: str) -> np.ndarray:
    """The store's data with only its first NaN left (a family check then has one chunk to report)."""
    X = zarr.open_array(path)[...]
    X[1500] = 0.0
    return X


def test_first_bad_value_across_chunks_is_reported(small_sets, tmp_path):
    """Bad values in several chunks: the error names the first in row order, every time.

    FAILS at the time of writing (a bug in streamem/em.py, not in the
    families): the chunks of a pass run in parallel and whichever chunk's
    ``check_data`` raises first in time is reported (row 1500 or 1750 in
    about half of the runs).
    """
    path = _bad_store(tmp_path, "bernoulli", {BAD_ROW: (1, 0.5), 1500: (0, 0.5), 1750: (0, 0.5), 1999: (0, 0.5)}, small_sets)
    messages = set()
    for seed in range(6):
        with pytest.raises(ValueError) as info:
            fit(_bad_model("bernoulli").set_params(random_state=seed), path)
        messages.add(str(info.value))
    assert messages == {f"BernoulliMixture: values must be 0 or 1; got 0.5 in row {BAD_ROW}, feature 1"}


def test_bad_data_in_predict_is_named_too(small_sets, tmp_path):
    spec, X = SPECS["poisson"], small_sets["poisson"]
    model = fit(spec.estimator(max_iter=2, tol=0, **spec.inits()), X)
    bad = X.copy()
    bad[BAD_ROW, 0] = 2.5
    with pytest.raises(ValueError, match=rf"PoissonMixture: .*2\.5 in row {BAD_ROW}"):
        model.predict(write_zarr(tmp_path / "bad.zarr", bad, 250)).compute()


@pytest.mark.parametrize("make, argument", [
    (lambda: streamem.BinomialMixture(2, n_trials=0), "n_trials must be finite and >= 1, got 0"),
    (lambda: streamem.BinomialMixture(2, n_trials=[10, 0, 10]), r"n_trials must be finite and >= 1, got \[10, 0, 10\]"),
    (lambda: streamem.BinomialMixture(2, n_trials=[10, 10]), r"n_trials must be an int or one per feature \(3\), got 2 values"),
    (lambda: streamem.CategoricalMixture(2, n_categories=[2, 3]), r"n_categories must be an int or one per feature \(3\), got 2"),
    (lambda: streamem.CategoricalMixture(2, n_categories=2.5), "n_categories must be an int or one int per feature, got 2.5"),
    (lambda: streamem.BernoulliMixture(2, probs_init=[[0.5, 0.5, 1.2], [0.5, 0.5, 0.5]]),
     r"probs_init must lie in \[0, 1\], got min 0.5, max 1.2"),
    (lambda: streamem.BinomialMixture(2, n_trials=3, probs_init=[[0.5, -0.1, 0.5], [0.5, 0.5, 0.5]]), r"probs_init must lie in \[0, 1\]"),
    (lambda: streamem.BernoulliMixture(2, probs_init=[[0.5, 0.5], [0.5, 0.5]]), r"probs_init must have shape \(2, 3\), got \(2, 2\)"),
    (lambda: streamem.CategoricalMixture(2, n_categories=3, probs_init=np.full((2, 3, 2), 0.5)), r"probs_init must have shape \(2, 3, 3\)"),
    (lambda: streamem.PoissonMixture(2, rates_init=[[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]), "rates_init must be >= 0, got min -1.0"),
    (lambda: streamem.CategoricalMixture(2, n_categories=3, probs_init=np.full((2, 3, 3), 0.5)),
     r"probs_init\[0, 0\] must sum to 1 over the categories, got 1.5"),
    (lambda: streamem.CategoricalMixture(2, n_categories=[2, 3, 3], probs_init=np.full((2, 3, 3), 1 / 3)),
     r"probs_init must be 0 past a feature's own categories \(n_categories=\[2, 3, 3\]\)"),
])  # fmt: skip
def test_bad_parameters_name_the_argument(make, argument):
    X = np.array([[0, 1, 2], [1, 0, 2], [1, 1, 0], [0, 0, 1]] * 5, dtype=float)
    with pytest.raises(ValueError, match=argument):
        make().fit(X)


# --------------------------------- 7. persistence, online EM, zero probabilities


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_predict_score_sample(name, small_sets, tmp_path):
    spec, X = SPECS[name], small_sets[name]
    model = fit(spec.estimator(max_iter=5, tol=0, random_state=3, **spec.inits()), X)
    path = tmp_path / f"{name}.model.zarr"
    model.save(path)
    attrs = xr.open_zarr(path, consolidated=False).attrs
    assert attrs["family"] == name and attrs["model_class"] == spec.cls.__name__
    loaded = streamem.load(path)
    assert type(loaded) is spec.cls
    assert_array_equal(loaded.weights_, model.weights_)
    assert_array_equal(learned(loaded, spec), learned(model, spec))
    assert_array_equal(loaded.predict(X), model.predict(X))
    assert_allclose(loaded.predict_proba(X), model.predict_proba(X), rtol=0, atol=1e-15)
    assert loaded.score(X) == model.score(X)
    # score is the reference log-likelihood of the fitted parameters
    log_joint = spec.log_prob(X, learned(model, spec)) + np.log(model.weights_)
    assert_allclose(model.score(X), logsumexp(log_joint, axis=1).mean(), rtol=1e-12)
    sample, labels = loaded.sample(500)
    assert sample.shape == (500, X.shape[1]) and labels.shape == (500,)
    fit(spec.estimator(max_iter=1, **spec.inits()), sample)  # the family accepts its own draws (check_data)
    assert np.all(sample == np.round(sample)) and sample.min() >= 0


def _initial_score(spec: Spec, X: np.ndarray) -> float:
    """Mean log-likelihood of the data under the initial parameters (max_iter=0 keeps them)."""
    return fit(spec.estimator(max_iter=0, **spec.inits()), X).score(X)


@pytest.mark.parametrize("name", FAMILIES)
def test_stepwise_partial_fit_and_update_improve(name, small_sets):
    spec, X = SPECS[name], small_sets[name]
    start = _initial_score(spec, X)
    stepwise = fit(spec.estimator(algorithm="stepwise", batch_size=200, max_iter=2, tol=0, random_state=0, **spec.inits()), X)
    partial = spec.estimator(batch_size=200, **spec.inits())
    for rows in (slice(0, 1000), slice(1000, 2000)):
        partial.partial_fit(X[rows])
    updated = fit(spec.estimator(max_iter=1, tol=0, **spec.inits()), X[:200])
    before_update = updated.score(X)
    updated.update(X[200:])
    for label, model in (("stepwise", stepwise), ("partial_fit", partial), ("update", updated)):
        assert np.isfinite(model.weights_).all() and np.isfinite(learned(model, spec)).all(), label
        assert_allclose(model.weights_.sum(), 1.0, rtol=1e-12, err_msg=label)
        assert model.score(X) > start + 0.05, (label, model.score(X), start)
    assert updated.score(X) > before_update, (updated.score(X), before_update)


ZERO_FEATURE = {
    # estimator; the value of feature 0 in component B's rows (the largest the setting allows, 3 for Poisson)
    "bernoulli": (lambda: streamem.BernoulliMixture(2), 1.0),
    "binomial": (lambda: streamem.BinomialMixture(2, n_trials=4), 4.0),
    "poisson": (lambda: streamem.PoissonMixture(2), 3.0),
    "categorical": (lambda: streamem.CategoricalMixture(2, n_categories=3), 2.0),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_probability_without_prior_is_never_nan(name):
    """Without a prior, probabilities (rates) of values never seen come out 0 (or at the floor), and nothing is NaN.

    Feature 0 is 0 in all of component A's rows and ``top`` in all of B's,
    feature 1 is 0 in every row, feature 2 is noise. A row with feature 1
    non-zero has likelihood 0 under both components (log 0 is floored):
    finite scores and responsibilities, no NaN. Binomial's B gets p = 1
    exactly (log 1 - p floored too).
    """
    make, top = ZERO_FEATURE[name]
    rng = np.random.RandomState(0)
    X = np.column_stack([np.repeat([0.0, top], 300), np.zeros(600), rng.random_sample(600) < 0.2]).astype(float)
    model = fit(make().set_params(random_state=0, max_iter=20), X)
    if name == "categorical":  # P(feature 0 == top), and P(feature 1 == a code it never has)
        first, never = model.probs_[:, 0, int(top)], model.probs_[:, 1, 1:]
    elif name == "poisson":
        first, never = model.rates_[:, 0], model.rates_[:, 1]
    else:
        first, never = model.probs_[:, 0], model.probs_[:, 1]
    # Rows of the other component have responsibility ~1e-300 under A (the floor), so A's value is ~1e-300, not 0.
    # (A Poisson B also explains some of A's zeros: e^-2.8 > 0, so its ML rate is 2.82, not 3.)
    assert first.min() < 1e-290 and (first.max() > 2.5 if name == "poisson" else first.max() == 1.0), first
    assert_array_equal(never, 0.0)
    assert_array_equal(np.sort(model.predict(X[[0, 300]])), [0, 1])
    unseen = 1.0 if name == "bernoulli" else 2.0
    new = np.array([[0.0, 0.0, 1.0], [top, 0.0, 0.0], [0.0, unseen, 1.0], [top, unseen, 0.0]])
    proba, scores = model.predict_proba(new), model.score_samples(new)
    assert np.isfinite(proba).all() and np.isfinite(scores).all(), (proba, scores)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert np.all(scores[2:] < -100) and np.all(scores[:2] > -5), scores  # the floor, not a real likelihood


# ---------------------------------------------------------------- 8. BIC / AIC


@pytest.mark.parametrize("learn_weights", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_bic_aic_count_free_parameters(name, learn_weights, small_sets):
    """(K-1) + K*d for Bernoulli/Binomial/Poisson, (K-1) + K*sum(C_j - 1) for Categorical; no K-1 with fixed weights."""
    spec, X = SPECS[name], small_sets[name]
    model = fit(spec.estimator(max_iter=3, tol=0, learn_weights=learn_weights, **spec.inits()), X)
    K, n = len(spec.weights), len(X)
    n_params = K * spec.free_per_component + (K - 1 if learn_weights else 0)
    total = logsumexp(spec.log_prob(X, learned(model, spec)) + np.log(model.weights_), axis=1).sum()
    assert_allclose(model.bic(X), -2 * total + n_params * np.log(n), rtol=1e-12)
    assert_allclose(model.aic(X), -2 * total + 2 * n_params, rtol=1e-12)


@pytest.mark.parametrize("name", ["bernoulli", "binomial", "poisson", "categorical"])
def test_matching_finds_components_that_swapped_places(name):
    """streamem fit --init-from relabels a re-fit by the family's divergence: a permuted copy is matched back."""
    import copy

    from streamem.matching import match_components

    rng = np.random.default_rng(4)
    K, d = 3, 4
    if name == "categorical":
        probs = rng.dirichlet(np.ones(3), size=(K, d))
        params = {"probs_init": probs}
        estimator = streamem.CategoricalMixture(K, n_categories=3, **params)
        X = np.stack([rng.choice(3, 200, p=probs[0, j]) for j in range(d)], axis=1).astype(float)
    elif name == "poisson":
        estimator = streamem.PoissonMixture(K, rates_init=rng.uniform(0.5, 8, (K, d)))
        X = rng.poisson(3.0, (200, d)).astype(float)
    else:
        trials = 1 if name == "bernoulli" else 7
        cls = streamem.BernoulliMixture if name == "bernoulli" else streamem.BinomialMixture
        extra = {} if name == "bernoulli" else {"n_trials": trials}
        estimator = cls(K, probs_init=rng.uniform(0.1, 0.9, (K, d)), **extra)
        X = rng.binomial(trials, 0.4, (200, d)).astype(float)
    model = estimator.set_params(weights_init=np.full(K, 1 / K), max_iter=0).fit(X)
    permuted = copy.deepcopy(model).permute_components([2, 0, 1])
    order = match_components(model, permuted)
    np.testing.assert_array_equal(order, [1, 2, 0])
    restored = permuted.permute_components(order)
    np.testing.assert_array_equal(restored.weights_, model.weights_)
