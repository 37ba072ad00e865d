"""MAP estimation (issue 15, item 4): ``prior=`` on every estimator.

References are independent of streamem: the posterior modes of the
Normal-inverse-Wishart prior (Fraley & Raftery 2007, "Bayesian
regularization for normal mixture estimation") and of the Beta, Gamma and
Dirichlet priors written out here in numpy, log-densities from
``scipy.stats``, and scikit-learn's ``GaussianMixture`` for ``prior=None``.

Derivation of the Gaussian M-step used below. With ``mu | Sigma ~
N(mu0, Sigma / kappa)`` and ``Sigma ~ IW(nu, Lambda)`` (density
``|Sigma|^-(nu + d + 1)/2 exp(-tr(Sigma^-1 Lambda) / 2)``), the expected
complete-data log-posterior of component k is, up to constants,
``-(n_k + nu + d + 2)/2 log|Sigma| - tr(Sigma^-1 [Lambda + S_k(mu) +
kappa (mu - mu0)(mu - mu0)^T]) / 2`` with ``S_k(mu) = W_k + n_k (xbar_k -
mu)(xbar_k - mu)^T``. Its gradient in ``mu`` vanishes at ``mu = (n_k xbar_k
+ kappa mu0) / (n_k + kappa)``, where ``n_k (xbar - mu)(..)^T + kappa (mu -
mu0)(..)^T = kappa n_k / (kappa + n_k) (xbar - mu0)(xbar - mu0)^T``; the
mode in ``Sigma`` is the bracket over ``n_k + nu + d + 2``. A tied
covariance has one IW and K normal means (``|Sigma|^-1/2`` each) and all
rows: ``nu + n + K + d + 1``. Diagonal: per feature an inverse gamma
``IG(nu/2, Lambda_j/2)`` and one normal: ``nu + n_k + 3``; spherical: one
``IG(nu/2, s2/2)`` and a d-dimensional normal, with ``n_k d`` squared
residuals: ``nu + (n_k + 1) d + 2``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning

import streamem
from _common import make_data, make_inits, sklearn_fit
from conftest import write_zarr
from streamem import BernoulliMixture, BinomialMixture, CategoricalMixture, GaussianMixture, PoissonMixture

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
K, D = 2, 3
#: Per-feature category counts of the categorical tests (unequal, so the padding is exercised).
N_CATEGORIES = np.array([3, 2, 4])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


# ------------------------------------------------------------------ test data
def gaussian_data(n: int = 40, seed: int = 3) -> np.ndarray:
    rng = np.random.RandomState(seed)
    X = rng.standard_normal((n, D)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.8, -0.2], [0.0, 0.0, 1.2]])
    X[: n // 2] += np.array([3.0, -1.0, 2.0])
    return X


def gaussian_init(ct: str) -> dict:
    """weights_init, means_init, precisions_init (K=2, d=3), off the data's clusters."""
    precisions = {
        "full": np.array([[[1.0, 0.2, 0.0], [0.2, 0.8, 0.1], [0.0, 0.1, 1.3]], [[0.7, -0.1, 0.05], [-0.1, 1.1, 0.0], [0.05, 0.0, 0.9]]]),
        "tied": np.array([[0.9, 0.1, 0.0], [0.1, 1.1, -0.05], [0.0, -0.05, 0.8]]),
        "diag": np.array([[0.8, 1.0, 1.2], [1.1, 0.7, 0.9]]),
        "spherical": np.array([0.7, 1.3]),
    }[ct]
    return {"weights_init": np.array([0.35, 0.65]), "means_init": np.array([[2.5, -0.5, 1.0], [0.5, 0.3, -0.4]]), "precisions_init": precisions}


def niw_prior(ct: str) -> dict:
    """Hand-picked hyperparameters, strong enough to move the estimates well away from ML on 40 rows."""
    lam = np.array([[2.0, 0.3, 0.1], [0.3, 1.5, -0.2], [0.1, -0.2, 1.0]])
    scale = {"full": lam, "tied": lam, "diag": np.diag(lam).copy(), "spherical": 1.5}[ct]
    return {"weight_concentration": 3.0, "mean_prior": np.array([0.5, -1.0, 2.0]), "mean_precision_prior": 5.0,
            "degrees_of_freedom_prior": D + 1.5, "covariance_prior": scale}  # fmt: skip


def full_covariances(ct: str, covariances: np.ndarray, n_components: int = K) -> np.ndarray:
    """Any covariance type's covariances as (K, d, d) matrices."""
    if ct == "full":
        return covariances
    if ct == "tied":
        return np.repeat(covariances[None], n_components, axis=0)
    if ct == "diag":
        return np.array([np.diag(c) for c in covariances])
    return np.array([c * np.eye(D) for c in covariances])


def covariances_of_precisions(ct: str, precisions: np.ndarray) -> np.ndarray:
    return np.linalg.inv(precisions) if ct in ("full", "tied") else 1.0 / precisions


def count_data(n: int = 80, seed: int = 5) -> dict[str, np.ndarray]:
    """Bernoulli, binomial (5 trials), Poisson and categorical data from two clusters."""
    rng = np.random.RandomState(seed)
    z = rng.rand(n) < 0.4
    p = np.where(z[:, None], [0.8, 0.2, 0.6], [0.3, 0.7, 0.5])
    rates = np.where(z[:, None], [4.0, 0.5, 2.0], [1.0, 3.0, 2.5])
    cats = np.stack([rng.randint(0, c, n) for c in N_CATEGORIES], axis=1)
    cats[z, 0] = 0  # the clusters differ in the first feature
    return {
        "bernoulli": (rng.rand(n, D) < p).astype(float),
        "binomial": rng.binomial(5, p).astype(float),
        "poisson": rng.poisson(rates).astype(float),
        "categorical": cats.astype(float),
    }


def discrete_init(family: str) -> dict:
    w = np.array([0.45, 0.55])
    if family == "poisson":
        return {"weights_init": w, "rates_init": np.array([[3.0, 1.0, 1.5], [1.5, 2.0, 3.0]])}
    if family == "categorical":
        probs = np.zeros((K, D, 4))
        probs[0, 0, :3], probs[1, 0, :3] = [0.6, 0.3, 0.1], [0.2, 0.4, 0.4]
        probs[0, 1, :2], probs[1, 1, :2] = [0.5, 0.5], [0.3, 0.7]
        probs[0, 2], probs[1, 2] = [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]
        return {"weights_init": w, "probs_init": probs}
    return {"weights_init": w, "probs_init": np.array([[0.7, 0.3, 0.5], [0.4, 0.6, 0.45]])}


def discrete_prior(family: str) -> dict:
    if family == "poisson":
        return {"weight_concentration": 2.5, "shape": np.array([2.0, 1.5, 3.0]), "rate": np.array([0.5, 1.0, 2.0])}
    if family == "categorical":
        return {"weight_concentration": 2.5, "concentration": np.array([[2.0, 3.0, 1.5, 1.0], [4.0, 2.0, 1.0, 1.0], [1.5, 1.5, 2.5, 3.0]])}
    return {"weight_concentration": 2.5, "alpha": np.array([2.0, 3.0, 1.5]), "beta": np.array([4.0, 1.5, 2.0])}


def discrete_estimator(family: str, **kwargs) -> object:
    cls = {"bernoulli": BernoulliMixture, "binomial": BinomialMixture, "poisson": PoissonMixture, "categorical": CategoricalMixture}[family]
    extra = {"binomial": {"n_trials": 5}, "categorical": {"n_categories": N_CATEGORIES}}.get(family, {})
    return cls(K, **extra, **kwargs)


def param_names(family: str) -> tuple[str, ...]:
    return {"gaussian": ("weights_", "means_", "covariances_"), "poisson": ("weights_", "rates_")}.get(family, ("weights_", "probs_"))


# ------------------------------------------------- references: E-step, M-step, log-densities
def gaussian_resp(X: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-likelihood and responsibilities, with scipy's multivariate normal; ``covs`` (K, d, d)."""
    log_joint = np.stack([stats.multivariate_normal.logpdf(X, means[k], covs[k]) for k in range(len(weights))], axis=1) + np.log(weights)
    loglik = logsumexp(log_joint, axis=1)
    return loglik, np.exp(log_joint - loglik[:, None])


def gaussian_map_m_step(X: np.ndarray, resp: np.ndarray, ct: str, prior: dict, reg_covar: float) -> dict:
    """The closed-form MAP M-step of the module docstring."""
    n, d = X.shape
    Kc = resp.shape[1]
    mu0, kappa, nu, lam = prior["mean_prior"], prior["mean_precision_prior"], prior["degrees_of_freedom_prior"], prior["covariance_prior"]
    alpha = prior.get("weight_concentration", 1.0)
    nk = resp.sum(axis=0)
    xbar = resp.T @ X / nk[:, None]
    W = np.array([(resp[:, k, None] * (X - xbar[k])).T @ (X - xbar[k]) for k in range(Kc)])
    means = (nk[:, None] * xbar + kappa * mu0) / (nk + kappa)[:, None]
    diff = xbar - mu0
    c = kappa * nk / (kappa + nk)
    shrink = c[:, None, None] * np.einsum("ki,kj->kij", diff, diff)
    if ct == "full":
        cov = np.array([(lam + W[k] + shrink[k]) / (nu + nk[k] + d + 2) + reg_covar * np.eye(d) for k in range(Kc)])
    elif ct == "tied":
        cov = (lam + W.sum(axis=0) + shrink.sum(axis=0)) / (nu + n + Kc + d + 1) + reg_covar * np.eye(d)
    elif ct == "diag":
        cov = np.array([(lam + np.diag(W[k]) + c[k] * diff[k] ** 2) / (nu + nk[k] + 3) + reg_covar for k in range(Kc)])
    else:
        cov = np.array([(lam + np.trace(W[k]) + c[k] * diff[k] @ diff[k]) / (nu + (nk[k] + 1) * d + 2) + reg_covar for k in range(Kc)])
    weights = (nk + alpha - 1.0) / (n + Kc * (alpha - 1.0))
    return {"weights_": weights, "means_": means, "covariances_": cov}


def dirichlet_logpdf(weights: np.ndarray, alpha: float) -> float:
    return float(stats.dirichlet.logpdf(weights / weights.sum(), np.full(len(weights), alpha)))


def gaussian_log_prior(ct: str, prior: dict, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> float:
    """The Normal-inverse-Wishart (inverse-gamma for diag/spherical) log-density from scipy.stats, plus the Dirichlet's."""
    mu0, kappa, nu, lam = prior["mean_prior"], prior["mean_precision_prior"], prior["degrees_of_freedom_prior"], prior["covariance_prior"]
    covs = full_covariances(ct, covariances, len(weights))
    out = dirichlet_logpdf(weights, prior["weight_concentration"])
    out += sum(stats.multivariate_normal.logpdf(means[k], mu0, covs[k] / kappa) for k in range(len(weights)))
    if ct == "full":
        out += sum(stats.invwishart.logpdf(c, df=nu, scale=lam) for c in covariances)
    elif ct == "tied":
        out += stats.invwishart.logpdf(covariances, df=nu, scale=lam)
    elif ct == "diag":
        out += stats.invgamma.logpdf(covariances, a=nu / 2, scale=np.asarray(lam) / 2).sum()
    else:
        out += stats.invgamma.logpdf(covariances, a=nu / 2, scale=lam / 2).sum()
    return float(out)


def discrete_log_prior(family: str, prior: dict, weights: np.ndarray, arr: np.ndarray) -> float:
    """Beta / Gamma / Dirichlet log-densities from scipy.stats, plus the Dirichlet on the weights."""
    out = dirichlet_logpdf(weights, prior["weight_concentration"])
    if family == "poisson":
        return out + float(stats.gamma.logpdf(arr, a=prior["shape"], scale=1.0 / prior["rate"]).sum())
    if family == "categorical":
        return out + float(sum(stats.dirichlet.logpdf(arr[k, j, :c], prior["concentration"][j, :c])
                               for k in range(len(arr)) for j, c in enumerate(N_CATEGORIES)))  # fmt: skip
    return out + float(stats.beta.logpdf(arr, prior["alpha"], prior["beta"]).sum())


def discrete_loglik(family: str, X: np.ndarray, weights: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """Per-row log-likelihood from scipy's pmfs."""
    return logsumexp(discrete_log_joint(family, X, weights, arr), axis=1)


def discrete_log_joint(family: str, X: np.ndarray, weights: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """``log w_k + log p(x_i | k)`` (n, K) from scipy's pmfs."""
    comp = []
    for k in range(len(weights)):
        if family == "bernoulli":
            comp.append(stats.bernoulli.logpmf(X, arr[k]).sum(axis=1))
        elif family == "binomial":
            comp.append(stats.binom.logpmf(X, 5, arr[k]).sum(axis=1))
        elif family == "poisson":
            comp.append(stats.poisson.logpmf(X, arr[k]).sum(axis=1))
        else:
            comp.append(np.log(arr[k][np.arange(D), X.astype(int)]).sum(axis=1))
    return np.stack(comp, axis=1) + np.log(weights)


def discrete_map_m_step(family: str, X: np.ndarray, resp: np.ndarray, prior: dict) -> dict:
    """Posterior modes: Beta ``(s + a - 1) / (n_k N + a + b - 2)``, Gamma ``(s + shape - 1) / (n_k + rate)``,
    Dirichlet ``(c + a - 1) / (n_k + sum(a - 1))`` over a feature's own categories; weights as for Gaussians."""
    nk = resp.sum(axis=0)
    alpha = prior["weight_concentration"]
    out = {"weights_": (nk + alpha - 1.0) / (len(X) + len(nk) * (alpha - 1.0))}
    if family == "categorical":
        probs = np.zeros((len(nk), D, 4))
        for j, c in enumerate(N_CATEGORIES):
            counts = resp.T @ (X[:, j, None] == np.arange(c))
            a = prior["concentration"][j, :c]
            probs[:, j, :c] = (counts + a - 1.0) / (nk[:, None] + (a - 1.0).sum())
        return {**out, "probs_": probs}
    sx = resp.T @ X
    if family == "poisson":
        return {**out, "rates_": (sx + prior["shape"] - 1.0) / (nk[:, None] + prior["rate"])}
    trials = 5 if family == "binomial" else 1
    a, b = prior["alpha"], prior["beta"]
    return {**out, "probs_": (sx + a - 1.0) / (trials * nk[:, None] + a + b - 2.0)}


# ============================================ 1. the MAP M-step against the closed form
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_gaussian_map_m_step_matches_closed_form(ct):
    X, init, prior = gaussian_data(), gaussian_init(ct), niw_prior(ct)
    reg = 1e-4
    gm = GaussianMixture(K, covariance_type=ct, reg_covar=reg, max_iter=1, tol=0.0, prior=prior, **init).fit(X)
    covs0 = full_covariances(ct, covariances_of_precisions(ct, init["precisions_init"]))
    _, resp = gaussian_resp(X, init["weights_init"], init["means_init"], covs0)
    expected = gaussian_map_m_step(X, resp, ct, prior, reg)
    for name, value in expected.items():
        assert_allclose(getattr(gm, name), value, rtol=1e-10, atol=1e-12, err_msg=name)
    # The prior matters here: maximum likelihood from the same E-step is far off.
    ml = GaussianMixture(K, covariance_type=ct, reg_covar=reg, max_iter=1, tol=0.0, **init).fit(X)
    assert np.abs(ml.means_ - gm.means_).max() > 1e-2
    assert np.abs(ml.covariances_ - gm.covariances_).max() > 1e-2


@pytest.mark.parametrize("family", ["bernoulli", "binomial", "poisson", "categorical"])
def test_discrete_map_m_step_matches_closed_form(family):
    X, init, prior = count_data()[family], discrete_init(family), discrete_prior(family)
    est = discrete_estimator(family, prior=prior, max_iter=1, tol=0.0, **init).fit(X)
    arr0 = init["rates_init" if family == "poisson" else "probs_init"]
    log_joint = discrete_log_joint(family, X, init["weights_init"], arr0)
    resp = np.exp(log_joint - logsumexp(log_joint, axis=1)[:, None])
    expected = discrete_map_m_step(family, X, resp, prior)
    for name, value in expected.items():
        assert_allclose(getattr(est, name), value, rtol=1e-10, atol=1e-13, err_msg=name)
    ml = discrete_estimator(family, max_iter=1, tol=0.0, **init).fit(X)
    assert np.abs(getattr(ml, name) - value).max() > 1e-2  # the prior matters here


def test_weights_map_with_learn_weights_false_stay_fixed():
    """The Dirichlet prior does not move weights the user fixed (learn_weights=False)."""
    X, init = gaussian_data(), gaussian_init("diag")
    gm = GaussianMixture(K, covariance_type="diag", max_iter=3, tol=0.0, prior=niw_prior("diag"), learn_weights=False, **init).fit(X)
    assert_allclose(gm.weights_, init["weights_init"], rtol=0, atol=0)


# ===================================== 2. the objective: log-likelihood + log-prior, monotone
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_gaussian_log_prior_matches_scipy(ct):
    """Differences of the family's log-prior between parameter sets equal scipy's (the constants cancel)."""
    gm = GaussianMixture(K, covariance_type=ct, prior=niw_prior(ct), max_iter=2, tol=0.0, **gaussian_init(ct)).fit(gaussian_data())
    family = gm._family()
    rng = np.random.RandomState(1)
    values = []
    for _ in range(3):
        cov = gm.covariances_ * rng.uniform(0.5, 2.0) if ct in ("full", "tied") else gm.covariances_ * rng.uniform(0.5, 2.0, gm.covariances_.shape)
        params = family.make_params(weights=rng.dirichlet([2.0, 3.0]), means=gm.means_ + rng.standard_normal((K, D)),
                                    covariances=cov, precisions_cholesky=family.precision_cholesky(cov))  # fmt: skip
        values.append((family.log_prior(params), gaussian_log_prior(ct, niw_prior(ct), params.weights, params.means, cov)))
    ours, ref = np.array(values).T
    assert np.ptp(ref) > 1.0  # the parameter sets differ in prior density
    assert_allclose(ours - ours[0], ref - ref[0], rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("family", ["bernoulli", "binomial", "poisson", "categorical"])
def test_discrete_log_prior_matches_scipy(family):
    est = discrete_estimator(family, prior=discrete_prior(family), max_iter=2, tol=0.0, **discrete_init(family)).fit(count_data()[family])
    fam = est._family()
    name = param_names(family)[1]
    rng = np.random.RandomState(2)
    values = []
    for _ in range(3):
        if family == "poisson":
            arr = rng.uniform(0.2, 5.0, (K, D))
        elif family == "categorical":
            arr = np.zeros((K, D, 4))
            for j, c in enumerate(N_CATEGORIES):
                arr[:, j, :c] = rng.dirichlet(np.ones(c), size=K)
        else:
            arr = rng.uniform(0.05, 0.95, (K, D))
        w = rng.dirichlet([2.0, 3.0])
        values.append((fam.log_prior(fam.make_params(weights=w, **{name[:-1]: arr})), discrete_log_prior(family, discrete_prior(family), w, arr)))
    ours, ref = np.array(values).T
    assert np.ptp(ref) > 1.0
    assert_allclose(ours - ours[0], ref - ref[0], rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("family", ["full", "tied", "diag", "spherical", "bernoulli", "binomial", "poisson", "categorical"])
def test_objective_is_loglik_plus_log_prior(family):
    """lower_bounds_ = (log-likelihood + log-prior) / n at the E-step's parameters, checked over one EM step.

    lower_bounds_[1] - lower_bounds_[0] of a 2-iteration fit must equal the
    change of scipy's log-likelihood plus scipy's log-prior between the
    initial parameters and those after one M-step (the max_iter=1 fit).
    """
    if family in COVARIANCE_TYPES:
        X, init, prior = gaussian_data(), gaussian_init(family), niw_prior(family)
        make = lambda n_iter: GaussianMixture(K, covariance_type=family, prior=prior, max_iter=n_iter, tol=0.0, **init)  # noqa: E731
        cov0 = covariances_of_precisions(family, init["precisions_init"])

        def objective(w, means, cov):
            loglik = gaussian_resp(X, w, means, full_covariances(family, cov))[0].sum()
            return loglik + gaussian_log_prior(family, prior, w, means, cov)

        start = (init["weights_init"], init["means_init"], cov0)
        after = lambda m: (m.weights_, m.means_, m.covariances_)  # noqa: E731
    else:
        X, init, prior = count_data()[family], discrete_init(family), discrete_prior(family)
        make = lambda n_iter: discrete_estimator(family, prior=prior, max_iter=n_iter, tol=0.0, **init)  # noqa: E731
        key = "rates_init" if family == "poisson" else "probs_init"

        def objective(w, arr):
            return discrete_loglik(family, X, w, arr).sum() + discrete_log_prior(family, prior, w, arr)

        start = (init["weights_init"], init[key])
        after = lambda m: (m.weights_, getattr(m, param_names(family)[1]))  # noqa: E731
    one, two = make(1).fit(X), make(2).fit(X)
    change = objective(*after(one)) - objective(*start)
    assert abs(change) > 1e-3
    assert_allclose((two.lower_bounds_[1] - two.lower_bounds_[0]) * len(X), change, rtol=1e-9)


def _assert_monotone(bounds: list[float]) -> None:
    b = np.asarray(bounds)
    assert len(b) >= 10 and np.isfinite(b).all()
    drops = np.diff(b)
    assert (drops >= -1e-12 * np.abs(b[1:])).all(), f"objective decreased: {drops.min()} at {drops.argmin()}"
    assert b[-1] > b[0]


@pytest.mark.parametrize("prior", ["default", "explicit"])
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_gaussian_objective_never_decreases(ct, prior):
    X = make_data(n=300, seed=7)
    # reg_covar=0: with it the M-step is no longer the exact maximiser (the prior keeps covariances regular).
    p = "default" if prior == "default" else {**niw_prior(ct), "mean_prior": np.zeros(D)}
    gm = GaussianMixture(3, covariance_type=ct, reg_covar=0.0, prior=p, max_iter=25, tol=0.0, init_params="random", random_state=4).fit(X)
    _assert_monotone(gm.lower_bounds_)


@pytest.mark.parametrize("prior", ["default", "explicit"])
@pytest.mark.parametrize("family", ["bernoulli", "binomial", "poisson", "categorical"])
def test_discrete_objective_never_decreases(family, prior):
    X = count_data(n=200, seed=8)[family]
    p = "default" if prior == "default" else discrete_prior(family)
    est = discrete_estimator(family, prior=p, max_iter=25, tol=0.0, init_params="random", random_state=4).fit(X)
    _assert_monotone(est.lower_bounds_)


# ====================================================== 3. collapse and boundary values
def _collapsing_setup(ct: str) -> tuple[np.ndarray, dict]:
    """30 rows near the origin plus 2 identical rows far away; component 1 starts on those two."""
    rng = np.random.RandomState(0)
    X = np.vstack([rng.standard_normal((30, D)), np.full((2, D), 50.0)])
    prec = {"full": np.repeat(np.eye(D)[None], K, axis=0), "diag": np.ones((K, D)), "spherical": np.ones(K)}[ct]
    return X, {"weights_init": np.array([0.9, 0.1]), "means_init": np.array([np.zeros(D), np.full(D, 50.0)]), "precisions_init": prec}


@pytest.mark.parametrize("ct", ["full", "diag", "spherical"])
def test_collapsed_component_keeps_regular_covariance_with_prior(ct):
    X, init = _collapsing_setup(ct)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(K, covariance_type=ct, reg_covar=0.0, max_iter=5, **init).fit(X)
    gm = GaussianMixture(K, covariance_type=ct, reg_covar=0.0, max_iter=5, prior="default", **init).fit(X)
    assert_allclose(gm.means_[1], np.full(D, 50.0), atol=1.0)  # it did collapse onto the two rows
    assert gm.weights_[1] < 0.2
    # Posterior mode: covariance >= Lambda / (nu + n + d + 2) in the PSD order, whatever the rows.
    lam = gm.prior_["covariance_prior"]
    floor = np.linalg.eigvalsh(np.atleast_2d(np.diag(lam) if ct == "diag" else lam)).min() / (gm.prior_["degrees_of_freedom_prior"] + len(X) + D + 2)
    cov1 = full_covariances(ct, gm.covariances_)[1]
    assert np.linalg.eigvalsh(cov1).min() >= floor > 1e-3


@pytest.mark.parametrize("family", ["bernoulli", "binomial", "poisson", "categorical"])
def test_discrete_parameters_stay_inside_with_prior(family):
    """An all-zero feature (and an all-n_trials one): with the default prior the estimates stay off the boundary."""
    X = count_data()[family].copy()
    X[:, 1] = 0.0
    if family in ("bernoulli", "binomial"):
        X[:, 2] = 1.0 if family == "bernoulli" else 5.0
    init = discrete_init(family)
    name = param_names(family)[1]
    ml = discrete_estimator(family, max_iter=10, tol=0.0, **init).fit(X)
    est = discrete_estimator(family, max_iter=10, tol=0.0, prior="default", **init).fit(X)
    got, got_ml = getattr(est, name), getattr(ml, name)
    assert np.isfinite(got_ml).all() and np.isfinite(ml.lower_bounds_).all()  # no NaN without a prior either
    if family == "poisson":
        assert (got_ml[:, 1] == 0).all() and (got > 0).all()
    elif family == "categorical":
        assert (got_ml[:, 1, 1] == 0).all()
        for j, c in enumerate(N_CATEGORIES):
            assert ((got[:, j, :c] > 0) & (got[:, j, :c] < 1)).all()
    else:
        assert (got_ml[:, 1] == 0).all() and (got_ml[:, 2] > 1 - 1e-12).all()  # 1 up to the 10 eps guard on counts
        assert ((got > 0) & (got < 1)).all()
    assert (est.weights_ > 0).all()


# ======================================================== 4. vanishing prior -> ML
def _vanishing_gaussian_prior(ct: str, e: float) -> dict:
    # nu chosen so that the covariance denominators become the ML ones (n_k, or n for tied) as e -> 0.
    nu0 = {"full": -(D + 2), "tied": -(K + D + 1), "diag": -3, "spherical": -(D + 2)}[ct]
    scale = {"full": e * np.eye(D), "tied": e * np.eye(D), "diag": np.full(D, e), "spherical": e}[ct]
    return {"weight_concentration": 1.0 + e, "mean_prior": np.zeros(D), "mean_precision_prior": e,
            "degrees_of_freedom_prior": nu0 + e, "covariance_prior": scale}  # fmt: skip


def _vanishing_discrete_prior(family: str, e: float) -> dict:
    if family == "poisson":
        return {"weight_concentration": 1.0 + e, "shape": np.full(D, 1.0 + e), "rate": np.full(D, e)}
    if family == "categorical":
        return {"weight_concentration": 1.0 + e, "concentration": np.full((D, 4), 1.0 + e)}
    return {"weight_concentration": 1.0 + e, "alpha": np.full(D, 1.0 + e), "beta": np.full(D, 1.0 + e)}


@pytest.mark.parametrize("family", ["full", "tied", "diag", "spherical", "bernoulli", "binomial", "poisson", "categorical"])
def test_vanishing_prior_tends_to_maximum_likelihood(family):
    gaussian = family in COVARIANCE_TYPES
    if gaussian:
        X, init = gaussian_data(), gaussian_init(family)
        make = lambda prior: GaussianMixture(K, covariance_type=family, prior=prior, max_iter=8, tol=0.0, **init)  # noqa: E731
        names = param_names("gaussian")
    else:
        X, init = count_data()[family], discrete_init(family)
        make = lambda prior: discrete_estimator(family, prior=prior, max_iter=8, tol=0.0, **init)  # noqa: E731
        names = param_names(family)
    ml = make(None).fit(X)
    errors = []
    for e in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9):
        prior = _vanishing_gaussian_prior(family, e) if gaussian else _vanishing_discrete_prior(family, e)
        fit = make(prior).fit(X)
        errors.append(max(np.abs(getattr(fit, n) - getattr(ml, n)).max() for n in names))
    assert errors[0] > 1e-4, errors  # the strongest prior does move the fit
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


# ========================================= 5. default prior values, persistence, prior=None
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_default_prior_is_fraley_raftery(ct):
    X = make_data(n=200, seed=11)
    Kc = 3
    gm = GaussianMixture(Kc, covariance_type=ct, prior="default", init_sample_size=10**6, max_iter=2, random_state=0).fit(X)
    d = X.shape[1]
    cov = np.cov(X, rowvar=False) / Kc ** (2.0 / d)
    scale = {"full": cov, "tied": cov, "diag": np.diag(cov), "spherical": np.trace(cov) / d}[ct]
    p = gm.prior_
    assert set(p) == {"weight_concentration", "mean_prior", "mean_precision_prior", "degrees_of_freedom_prior", "covariance_prior"}
    assert_allclose(p["mean_prior"], X.mean(axis=0), rtol=1e-12, atol=1e-13)
    assert p["mean_precision_prior"] == 0.01
    assert p["degrees_of_freedom_prior"] == d + 2
    assert_allclose(p["covariance_prior"], scale, rtol=1e-12)
    assert p["weight_concentration"] >= 1.0


def test_default_prior_saved_loaded_and_resumed(tmp_path):
    X = make_data(n=600, seed=12)
    path = write_zarr(tmp_path / "data.zarr", X, (150, X.shape[1]))
    settings = dict(covariance_type="diag", prior="default", tol=0.0, random_state=3, init_sample_size=400)
    full = GaussianMixture(3, max_iter=6, **settings).fit(path)
    assert full.prior_["covariance_prior"].shape == (3,)

    full.save(tmp_path / "model.zarr")
    loaded = streamem.load(tmp_path / "model.zarr")
    assert set(loaded.prior_) == set(full.prior_)
    for key, value in full.prior_.items():
        assert_allclose(loaded.prior_[key], value, rtol=0, atol=0, err_msg=key)
    assert_allclose(loaded.score(X), full.score(X), rtol=1e-14)

    ckpt = tmp_path / "ckpt"
    first = GaussianMixture(3, max_iter=3, **settings).fit(path, checkpoint=ckpt)
    assert first.n_iter_ == 3
    resumed = GaussianMixture(3, max_iter=6, **settings).fit(path, checkpoint=ckpt, resume=True)
    assert resumed.n_iter_ == 6
    for name in ("weights_", "means_", "covariances_"):
        assert_allclose(getattr(resumed, name), getattr(full, name), rtol=1e-10, err_msg=name)
    assert_allclose(resumed.lower_bound_, full.lower_bound_, rtol=1e-10)
    assert_allclose(resumed.prior_["covariance_prior"], full.prior_["covariance_prior"], rtol=0, atol=0)


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_no_prior_equals_scikit_learn(ct):
    X, inits = make_data(n=600, seed=13), make_inits(ct)
    ours = GaussianMixture(3, covariance_type=ct, max_iter=5, tol=0.0, prior=None, **inits).fit(X)
    ref = sklearn_fit(X, n_components=3, covariance_type=ct, max_iter=5, tol=0.0, **inits)
    assert ours.prior_ is None
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-10, atol=1e-12, err_msg=name)
    assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=1e-10)


# ================================================================ 6. bad priors
def _good() -> dict:
    return niw_prior("full")


@pytest.mark.parametrize(
    ("prior", "key"),
    [
        ({**_good(), "mean_shrinkage": 0.1}, "mean_shrinkage"),
        ({k: v for k, v in _good().items() if k != "covariance_prior"}, "covariance_prior"),
        ({**_good(), "mean_prior": np.array([0.0, np.nan, 1.0])}, "mean_prior"),
        ({**_good(), "degrees_of_freedom_prior": np.inf}, "degrees_of_freedom_prior"),
        ({**_good(), "weight_concentration": 0.5}, "weight_concentration"),
        ("other", "other"),
    ],
    ids=["unknown", "missing", "nan", "inf", "concentration<1", "string"],
)
def test_bad_gaussian_prior_is_refused(prior, key):
    X, init = gaussian_data(), gaussian_init("full")
    with pytest.raises(ValueError, match=key):
        GaussianMixture(K, prior=prior, max_iter=1, **init).fit(X)


@pytest.mark.parametrize(
    ("family", "prior", "key"),
    [
        ("bernoulli", {"alpha": np.full(D, 2.0)}, "beta"),
        ("poisson", {"shape": np.full(D, np.inf), "rate": np.ones(D)}, "shape"),
        ("categorical", {"concentration": np.full((D, 4), 2.0), "alpha": 1.0}, "alpha"),
        ("binomial", {"alpha": 2.0, "beta": 2.0, "weight_concentration": 0.0}, "weight_concentration"),
        ("poisson", "gamma", "gamma"),
    ],
)
def test_bad_discrete_prior_is_refused(family, prior, key):
    with pytest.raises(ValueError, match=key):
        discrete_estimator(family, prior=prior, max_iter=1, **discrete_init(family)).fit(count_data()[family])


# Hyperparameters of the wrong shape or outside their distribution's domain must be refused like the
# other bad priors: a ValueError naming the key (today a numpy broadcasting error, or a silent fit).
@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: GaussianMixture(K, prior={**_good(), "mean_prior": np.zeros(D - 1)}, max_iter=2), "mean_prior"),
        (lambda: GaussianMixture(K, prior={**_good(), "covariance_prior": np.eye(D - 1)}, max_iter=2), "covariance_prior"),
        (lambda: BernoulliMixture(K, prior={"alpha": np.full(D - 1, 2.0), "beta": 2.0}, max_iter=2), "alpha"),
    ],
    ids=["mean_prior", "covariance_prior", "bernoulli-alpha"],
)
def test_prior_of_wrong_shape_names_the_key(make, key):
    X = count_data()["bernoulli"] if key == "alpha" else gaussian_data()
    with pytest.raises(ValueError, match=key):
        make().fit(X)


@pytest.mark.parametrize(
    ("key", "value"),
    [("mean_precision_prior", -1.0), ("covariance_prior", -np.eye(D))],
)
def test_gaussian_prior_outside_its_domain_is_refused(key, value):
    with pytest.raises(ValueError, match=key):
        GaussianMixture(K, prior={**_good(), key: value}, max_iter=2, **gaussian_init("full")).fit(gaussian_data())


def test_beta_prior_below_one_never_leaves_the_unit_interval():
    """Beta(0.5, 0.5) on a feature that is always 0: the mode formula gives probabilities < 0 (and > 1).

    Either the prior is refused (a ValueError naming ``alpha``) or the probabilities stay in [0, 1].
    """
    X = count_data()["bernoulli"].copy()
    X[:, 1] = 0.0
    try:
        est = BernoulliMixture(K, prior={"alpha": 0.5, "beta": 0.5}, max_iter=3, **discrete_init("bernoulli")).fit(X)
    except ValueError as err:
        assert "alpha" in str(err)
        return
    assert ((est.probs_ >= 0) & (est.probs_ <= 1)).all(), est.probs_
