"""A family written outside streamem gets every algorithm, model files and checkpoints (issue 15, item 5).

The example family below (independent exponential features) is the one
docs/families.md shows; ``test_the_documented_code_is_this_code`` keeps the
two identical. It is fitted from a Zarr store against a small numpy EM
written here, saved and loaded through the registries, fitted by the online
algorithms, checkpointed and resumed, and on a LocalCluster (the workers
import this module to unpickle the family).
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import zarr
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln, logsumexp
from sklearn.exceptions import ConvergenceWarning

import streamem
from streamem.families import family_names

# --- begin example family (docs/families.md) ---
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamem.estimators.base import MixtureEstimator
from streamem.families.base import EPS10, MixtureFamily, MixtureParams, register_family
from streamem.stats import SuffStats


@register_family
@dataclass(frozen=True, eq=False)
class ExponentialFamily(MixtureFamily):
    """Independent exponential features: ``log p(x | k) = sum_j log r_kj - r_kj x_j``."""

    name = "exponential"  # in model files and checkpoints
    param_names = ("rates",)  # the estimator's learned attribute is rates_, shape (K, d)

    def component_log_prob(self, X: np.ndarray, params: MixtureParams) -> np.ndarray:
        return np.log(params.rates).sum(axis=1) - X @ params.rates.T  # (n, K): one matrix product

    def component_stats(self, X: np.ndarray, resp: np.ndarray) -> dict[str, np.ndarray]:
        return {"sx": resp.T @ X}  # (K, d); the core adds nk = resp.sum(axis=0)

    def m_step_components(self, stats: SuffStats) -> dict[str, np.ndarray]:
        # EPS10: an empty component gets a finite rate, as scikit-learn guards its counts
        return {"rates": (stats["nk"][:, None] + EPS10) / (stats["sx"] + EPS10)}

    def stats_of_params(self, params: MixtureParams) -> SuffStats:
        w = params.weights / params.weights.sum()  # one row's worth of statistics whose M-step gives params
        return SuffStats({"n": np.float64(1.0), "loglik": np.float64(0.0), "nk": w, "sx": w[:, None] / params.rates})

    def n_component_parameters(self, n_features: int) -> int:
        return n_features

    def sample_component(self, params: MixtureParams, k: int, n: int, rng: np.random.RandomState) -> np.ndarray:
        return rng.exponential(1.0 / params.rates[k], size=(n, params.rates.shape[1]))

    def check_data(self, X: np.ndarray, offset: int = 0) -> None:
        bad = ~(np.isfinite(X) & (X >= 0))
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            value = X[row, col].item()
            raise ValueError(f"ExponentialMixture: values must be finite and >= 0; got {value!r} in row {offset + row}, "
                             f"feature {col}")


class ExponentialMixture(MixtureEstimator):
    """Mixture of independent exponential features, fitted by EM out of core; learned ``rates_`` (K, d)."""

    family_class = ExponentialFamily
    _init_arrays = {"rates": "rates_init"}  # rates_init gives the initial rates

    def __init__(self, n_components: int = 1, *, rates_init: Any = None, **common: Any):
        super().__init__(n_components, **common)
        self.rates_init = rates_init

    def _check_family_init(self, n_features: int) -> None:
        shape, rates = (self.n_components, n_features), self.rates_init
        if rates is not None and not (np.shape(rates) == shape and np.all(np.isfinite(rates) & (np.asarray(rates) > 0))):
            raise ValueError(f"rates_init must be finite, > 0 and of shape {shape}, got {rates!r}")
# --- end example family ---

from conftest import write_zarr  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "families.md")
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
TRUE_RATES = np.array([[0.5, 4.0, 1.0, 8.0], [5.0, 0.3, 4.0, 0.5], [1.5, 1.5, 0.2, 2.0]])
WEIGHTS_INIT = np.array([0.4, 0.35, 0.25])
RATES_INIT = np.array([[0.8, 3.0, 1.2, 6.0], [4.0, 0.5, 3.0, 0.8], [1.0, 2.0, 0.4, 1.5]])
N = 6000
CHUNK_ROWS = 777  # 7 chunks of 777 and one of 561
RTOL = 1e-10


def simulate(n: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    labels = rng.choice(len(TRUE_WEIGHTS), size=n, p=TRUE_WEIGHTS)
    return rng.exponential(1.0 / TRUE_RATES[labels])


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return simulate(N, seed=15)


@pytest.fixture(scope="module")
def store(tmp_path_factory, X) -> str:
    return write_zarr(tmp_path_factory.mktemp("exp") / "data.zarr", X, (CHUNK_ROWS, X.shape[1]))


def quiet_fit(model: ExponentialMixture, X: Any, **kwargs: Any) -> ExponentialMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0 never converges
        return model.fit(X, **kwargs)


def model(**params: Any) -> ExponentialMixture:
    """Three components from the fixed initial parameters (no initialisation pass), tol=0."""
    return ExponentialMixture(3, **{"weights_init": WEIGHTS_INIT, "rates_init": RATES_INIT, "tol": 0.0, **params})


def numpy_em(X: np.ndarray, weights: np.ndarray, rates: np.ndarray, n_iter: int, *, alpha: float = 1.0,
             learn_weights: bool = True) -> tuple[np.ndarray, np.ndarray, list[float]]:  # fmt: skip
    """EM for the exponential mixture, in memory; ``alpha``: a symmetric Dirichlet prior on the weights (MAP).

    The bounds are (log-likelihood + log-prior) / n at the parameters of each E-step.
    """
    bounds = []
    K = len(weights)
    for _ in range(n_iter):
        log_joint = np.log(weights) + np.log(rates).sum(axis=1) - X @ rates.T
        loglik = logsumexp(log_joint, axis=1)
        log_prior = (alpha - 1) * np.log(weights).sum() + gammaln(alpha * K) - K * gammaln(alpha) if alpha != 1 else 0.0
        bounds.append((loglik.sum() + log_prior) / len(X))
        resp = np.exp(log_joint - loglik[:, None])
        nk = resp.sum(axis=0)
        if learn_weights:
            weights = (nk + alpha - 1) / (len(X) + K * (alpha - 1))
        rates = nk[:, None] / (resp.T @ X)
    return weights, rates, bounds


def matched(rates: np.ndarray) -> np.ndarray:
    """Component order of ``rates`` closest to TRUE_RATES (log scale)."""
    cost = np.abs(np.log(rates)[:, None, :] - np.log(TRUE_RATES)[None, :, :]).sum(axis=2)
    rows, cols = linear_sum_assignment(cost)
    return rows[np.argsort(cols)]


# ------------------------------------------------------------ the documentation
def test_the_documented_code_is_this_code():
    """docs/families.md shows the example family; it must be the code these tests run."""
    with open(__file__) as f:
        here = re.search(r"# --- begin example family \(docs/families.md\) ---\n(.*?)# --- end example family ---", f.read(), re.S)
    with open(DOC) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert here is not None
    assert here.group(1) in blocks, "docs/families.md must show the example family of tests/test_custom_family.py verbatim"


def test_example_family_is_about_fifty_lines():
    """The issue promises a new distribution in about 50 lines (blank lines and docstrings included)."""
    with open(__file__) as f:
        code = re.search(r"# --- begin example family.*?\n(.*?)# --- end example family", f.read(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 65


# ------------------------------------------------------------ batch EM
@pytest.mark.parametrize(
    "params, reference",
    [
        ({}, {}),
        ({"learn_weights": False}, {"learn_weights": False}),
        ({"prior": {"weight_concentration": 3.0}}, {"alpha": 3.0}),
        ({"prior": "default"}, {"alpha": 2.0}),  # the protocol's default: Dirichlet(2) on the weights
    ],
    ids=["ml", "fixed-weights", "dirichlet-weights", "default-prior"],
)
def test_fit_from_zarr_equals_numpy_em(store, X, params, reference):
    """Batch EM on a Zarr store with odd chunks is the numpy EM above, from the same start, to 1e-10."""
    ours = quiet_fit(model(max_iter=12, **params), store)
    weights, rates, bounds = numpy_em(X, WEIGHTS_INIT, RATES_INIT, 12, **reference)
    assert_allclose(ours.weights_, weights, rtol=RTOL)
    assert_allclose(ours.rates_, rates, rtol=RTOL)
    assert_allclose(ours.lower_bounds_, bounds, rtol=RTOL)
    assert ours.n_iter_ == 12


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_every_initialisation_recovers_simulated_rates(tmp_path, init_params):
    """Every initialisation (from the family's statistics of initial responsibilities) and batch EM find the rates."""
    X = simulate(20_000, seed=16)
    path = write_zarr(tmp_path / "big.zarr", X, (3001, 4))
    fitted = ExponentialMixture(3, init_params=init_params, random_state=0, tol=1e-8, max_iter=500).fit(path)
    order = matched(fitted.rates_)
    assert fitted.converged_
    assert_allclose(fitted.rates_[order], TRUE_RATES, rtol=0.1)
    assert_allclose(fitted.weights_[order], TRUE_WEIGHTS, atol=0.02)


def test_stats_of_params_give_back_the_params():
    """What online EM starts from: one row's worth of statistics whose M-step is the parameters."""
    family = ExponentialFamily()
    params = MixtureParams(weights=WEIGHTS_INIT, rates=RATES_INIT)
    stats = family.stats_of_params(params)
    again = family.m_step(stats)
    assert stats.n == 1.0
    assert_allclose(again.rates, RATES_INIT, rtol=1e-13)
    assert_allclose(again.weights, WEIGHTS_INIT, rtol=1e-13)


def test_bic_counts_the_family_parameters(store, X):
    fitted = quiet_fit(model(max_iter=3), store)
    log_joint = np.log(fitted.weights_) + np.log(fitted.rates_).sum(axis=1) - X @ fitted.rates_.T
    loglik = logsumexp(log_joint, axis=1).sum()
    n_params = 3 * 4 + 2  # rates and free weights
    assert_allclose(fitted.bic(store), -2 * loglik + n_params * np.log(N), rtol=RTOL)
    assert_allclose(fitted.score(store), loglik / N, rtol=RTOL)


def test_data_the_family_refuses_are_named(tmp_path, X):
    bad = X.copy()
    bad[1500, 2] = -0.25
    path = write_zarr(tmp_path / "negative.zarr", bad, (CHUNK_ROWS, 4))
    with pytest.raises(ValueError, match=r"ExponentialMixture: values must be finite and >= 0; got -0.25 in row 1500, feature 2"):
        quiet_fit(model(max_iter=2), path)
    for rates in (-RATES_INIT, RATES_INIT[:, :3], np.where(RATES_INIT > 3, np.inf, RATES_INIT)):
        with pytest.raises(ValueError, match=r"rates_init must be finite, > 0 and of shape \(3, 4\)"):
            quiet_fit(model(rates_init=rates), X)


# ------------------------------------------------------------ model files
def test_save_load_predict(store, tmp_path):
    fitted = quiet_fit(model(max_iter=5, prior="default"), store)
    fitted.save(tmp_path / "model.zarr")
    loaded = streamem.load(tmp_path / "model.zarr")
    assert type(loaded) is ExponentialMixture
    assert zarr.open_group(tmp_path / "model.zarr", mode="r").attrs["family"] == "exponential"
    assert "exponential" in family_names()
    assert_array_equal(loaded.rates_, fitted.rates_)
    assert_array_equal(loaded.weights_, fitted.weights_)
    assert loaded.prior_ == {"weight_concentration": 2.0}
    assert_array_equal(loaded.predict(store).compute(), fitted.predict(store).compute())
    assert_allclose(loaded.predict_proba(store).compute(), fitted.predict_proba(store).compute(), rtol=0, atol=0)
    assert loaded.score(store) == fitted.score(store)
    rows, labels = loaded.sample(500)
    assert rows.shape == (500, 4) and rows.min() >= 0 and set(labels) <= {0, 1, 2}


def test_map_reduce_shards_make_one_more_iteration(store, X, tmp_path):
    """accumulate on two row ranges, then reduce: the next batch EM iteration (numpy EM's 4th after 3)."""
    from streamem.mapreduce import accumulate, reduce_stats, write_stats

    fitted = quiet_fit(model(max_iter=3), store)
    shards = []
    for i, rows in enumerate(["0:2500", f"2500:{N}"]):
        shards.append(tmp_path / f"shard{i}.zarr")
        write_stats(accumulate(fitted, store, rows=rows), shards[-1])
    reduced = reduce_stats(fitted, shards)
    weights, rates, bounds = numpy_em(X, WEIGHTS_INIT, RATES_INIT, 4)
    assert type(reduced) is ExponentialMixture
    assert_allclose(reduced.rates_, rates, rtol=RTOL)
    assert_allclose(reduced.weights_, weights, rtol=RTOL)
    assert_allclose(reduced.lower_bounds_, bounds, rtol=RTOL)


# ------------------------------------------------------------ online EM
def test_online_algorithms_approach_the_rates(store, X):
    """Stepwise and incremental EM from the fixed start end near the batch optimum."""
    batch = quiet_fit(model(max_iter=300, tol=1e-10), store)
    for algorithm in ("stepwise", "incremental"):
        online = quiet_fit(model(algorithm=algorithm, max_iter=3, batch_size=300, random_state=0), store)
        assert_allclose(online.rates_, batch.rates_, rtol=0.1)
        assert_allclose(online.weights_, batch.weights_, atol=0.03)
        assert online.online_stats_["sx"].shape == (3, 4)


def test_partial_fit_over_chunks_equals_one_stepwise_pass(store, X):
    """partial_fit on the chunks in order is one stepwise pass in storage order (the online state carries over)."""
    # partial_fit follows its rows and does not average over the pass
    one_pass = quiet_fit(model(algorithm="stepwise", max_iter=1, batch_size=250, shuffle=False, average=False), store)
    chunked = model(batch_size=250)
    for start in range(0, N, CHUNK_ROWS):
        chunked.partial_fit(X[start : start + CHUNK_ROWS])
    assert_allclose(chunked.rates_, one_pass.rates_, rtol=RTOL)
    assert_allclose(chunked.weights_, one_pass.weights_, rtol=RTOL)
    assert chunked.n_rows_seen_ == N


def test_update_of_a_loaded_model_folds_in_new_rows(store, tmp_path):
    """update reads only the new rows, continuing from the online state saved in the model file."""
    fitted = quiet_fit(model(max_iter=50), store)
    fitted.save(tmp_path / "model.zarr")
    new = write_zarr(tmp_path / "new.zarr", simulate(3000, seed=17), (1000, 4))
    loaded = streamem.load(tmp_path / "model.zarr")
    updated = loaded.update(new)
    assert updated.n_rows_seen_ == N + 3000
    order = matched(updated.rates_)
    assert_array_equal(order, matched(fitted.rates_))  # component k stays component k
    assert_allclose(updated.rates_[order], TRUE_RATES, rtol=0.15)
    assert not np.array_equal(updated.rates_, fitted.rates_)


# ------------------------------------------------------------ checkpoints
def test_checkpoint_resume_equals_uninterrupted_fit(store, tmp_path):
    reference = quiet_fit(model(max_iter=9), store)
    quiet_fit(model(max_iter=4), store, checkpoint=tmp_path / "ckpt")
    resumed = quiet_fit(model(max_iter=9), store, checkpoint=tmp_path / "ckpt", resume=True)
    assert_array_equal(resumed.rates_, reference.rates_)
    assert_array_equal(resumed.weights_, reference.weights_)
    assert resumed.lower_bounds_ == reference.lower_bounds_
    assert resumed.n_data_passes_ == 5  # iterations 5 to 9 only: it did resume


# ------------------------------------------------------------ a cluster
def test_fit_on_a_local_cluster_equals_numpy_em(cluster, store, X):
    """Workers in other processes unpickle the family (they import this module) and give the same fit."""
    from distributed import Client

    with Client(cluster) as client:
        remote = quiet_fit(model(max_iter=8, client=client), store)
    weights, rates, bounds = numpy_em(X, WEIGHTS_INIT, RATES_INIT, 8)
    assert_allclose(remote.rates_, rates, rtol=RTOL)
    assert_allclose(remote.weights_, weights, rtol=RTOL)
    assert_allclose(remote.lower_bounds_, bounds, rtol=RTOL)
