"""Breaking review of stepwise EM's Polyak-Ruppert averaging (issue 14: ``average=True``).

Passing tests cover what tests/test_online.py and tests/test_online_core.py
do not: mini-batches of unequal sizes (chunks smaller than a mini-batch, the
pass's half crossed inside a chunk) and a MAP prior against a numpy reference
written from the definitions, the next pass continuing from the average;
valid parameters and ``monitor="exact"`` for every family; a resume with a
default prior and two runs; a checkpoint made without averaging; update and
partial_fit ignoring ``average``; the command line's flag and YAML key.
Tests marked ``# DEFECT n`` fail on purpose until the defect is fixed.
"""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pytest
from _common import make_data
from conftest import write_zarr
from scipy.special import gammaln, logsumexp
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

import streamem
from streamem.cli import main

EPS10 = 10 * np.finfo(np.float64).eps


def _quiet_fit(model, X, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, **kwargs)


# ----------------------------------------------------------- numpy reference
def _poisson_map_stepwise(X, chunks, weights, rates, prior, batch_size, decay, offset, n_passes):
    """Stepwise Poisson MAP passes in storage order with averaging, from the definitions.

    Running statistics per row (s0 = mean resp, sx = mean resp * x) start as
    one row's worth of the starting parameters; the M-step weighs them by the
    N rows of the data against the prior's pseudo-counts. Each pass ends at
    the M-step of the running statistics averaged, weighted by rows, over the
    mini-batches that end past half the pass; the next pass starts from them.
    """
    N = len(X)
    alpha, shape, rate = prior["weight_concentration"], prior["shape"], prior["rate"]
    logfact = gammaln(X + 1.0).sum(axis=1)

    def m_step(s0, sx):
        nk = s0 * N + EPS10
        w = np.maximum(nk + alpha - 1.0, EPS10)
        return w / w.sum(), np.maximum(sx * N + shape - 1.0, 0.0) / (nk[:, None] + rate)

    s0 = weights / weights.sum()
    sx = s0[:, None] * rates
    w, r, t = weights, rates, 0.0
    bounds = np.cumsum([0, *chunks])
    for _ in range(n_passes):
        avg, avg_rows, done = None, 0.0, 0
        for start, stop in zip(bounds[:-1], bounds[1:]):
            chunk = X[start:stop]
            for rows in np.array_split(np.arange(len(chunk)), -(-len(chunk) // batch_size)):
                Xb, nb = chunk[rows], len(rows)
                log_joint = Xb @ np.log(r).T - r.sum(axis=1) - logfact[start + rows][:, None] + np.log(w)
                resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
                eta = 1.0 - (1.0 - (t + offset) ** -decay) ** (nb / batch_size)
                s0 = (1 - eta) * s0 + eta * resp.mean(axis=0)
                sx = (1 - eta) * sx + eta * (resp.T @ Xb) / nb
                done += nb
                if done > N / 2:
                    avg = (s0, sx) if avg is None else tuple((a * avg_rows + b * nb) / (avg_rows + nb) for a, b in zip(avg, (s0, sx)))
                    avg_rows += nb
                w, r = m_step(s0, sx)
                t += nb / batch_size
        s0, sx = avg
        w, r = m_step(s0, sx)
    return w, r


def test_poisson_map_average_over_unequal_mini_batches_equals_a_numpy_reference():
    # Chunks smaller than a mini-batch (50, 25), mini-batches of 100, 63 and 62 rows: the average must weigh
    # them by rows; the half (450 rows) is crossed inside the 400-row chunk; pass 2 continues from pass 1's average.
    rng = np.random.RandomState(2)
    z = rng.rand(900) < 0.4
    X = rng.poisson(np.where(z[:, None], [4.0, 0.5, 2.0], [1.0, 3.0, 2.5])).astype(float)
    chunks = (50, 300, 25, 400, 125)
    weights, rates = np.array([0.45, 0.55]), np.array([[3.0, 1.0, 1.5], [1.5, 2.0, 3.0]])
    prior = {"weight_concentration": 2.5, "shape": np.array([20.0, 15.0, 30.0]), "rate": np.array([5.0, 10.0, 20.0])}
    model = streamem.PoissonMixture(2, algorithm="stepwise", batch_size=100, step_decay=0.51, shuffle=False, max_iter=2,
                                    tol=0.0, prior=prior, weights_init=weights, rates_init=rates)  # fmt: skip
    _quiet_fit(model, da.from_array(X, chunks=(chunks, 3)))
    w, r = _poisson_map_stepwise(X, chunks, weights, rates, prior, 100, 0.51, 2.0, n_passes=2)
    np.testing.assert_allclose(model.weights_, w, rtol=1e-10)
    np.testing.assert_allclose(model.rates_, r, rtol=1e-10)
    assert model.n_steps_ == pytest.approx(2 * 900 / 100)


# --------------------------------------------------------- every family
def _count_data(n: int = 600, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    z = rng.rand(n) < 0.4
    p = np.where(z[:, None], [0.8, 0.2, 0.6], [0.3, 0.7, 0.5])
    cats = np.stack([rng.randint(0, c, n) for c in (3, 2, 4)], axis=1)
    cats[z, 0] = 0
    return {"bernoulli": (rng.rand(n, 3) < p).astype(float), "binomial": rng.binomial(5, p).astype(float),
            "poisson": rng.poisson(np.where(z[:, None], [4.0, 0.5, 2.0], [1.0, 3.0, 2.5])).astype(float),
            "categorical": cats.astype(float)}  # fmt: skip


def _estimator(family: str, **kwargs):
    if family in ("full", "tied", "diag", "spherical"):
        return streamem.GaussianMixture(3, covariance_type=family, **kwargs)
    cls = {"bernoulli": streamem.BernoulliMixture, "binomial": streamem.BinomialMixture,
           "poisson": streamem.PoissonMixture, "categorical": streamem.CategoricalMixture}[family]  # fmt: skip
    extra = {"binomial": {"n_trials": 5}, "categorical": {"n_categories": [3, 2, 4]}}.get(family, {})
    return cls(2, **extra, **kwargs)


@pytest.mark.parametrize("family", ["full", "tied", "diag", "spherical", "bernoulli", "binomial", "poisson", "categorical"])
def test_averaged_passes_give_valid_parameters_and_exact_monitor_for_every_family(family):
    gaussian = family in ("full", "tied", "diag", "spherical")
    X = make_data(n=600) if gaussian else _count_data()[family]
    # Tiny noisy mini-batches (7 rows), a chunk smaller than one (5 rows), a default prior (MAP objective).
    data = da.from_array(X, chunks=((5, 295, 300), X.shape[1]))
    model = _quiet_fit(_estimator(family, algorithm="stepwise", batch_size=7, max_iter=2, tol=0.0, monitor="exact",
                                  prior="default", random_state=0), data)  # fmt: skip
    assert np.all(model.weights_ > 0) and model.weights_.sum() == pytest.approx(1.0, abs=1e-12)
    if gaussian:
        covs = {"full": model.covariances_, "tied": model.covariances_[None]}.get(family)
        if covs is not None:
            assert np.all(np.linalg.eigvalsh(covs) > 0)
            np.testing.assert_allclose(covs, np.swapaxes(covs, -1, -2), rtol=0, atol=1e-12)
        else:
            assert np.all(model.covariances_ > 0)
    elif family == "poisson":
        assert np.all(np.isfinite(model.rates_)) and np.all(model.rates_ >= 0)
    else:
        assert np.all((model.probs_ >= 0) & (model.probs_ <= 1))
    # "exact": the objective of the parameters the pass ends at (the averaged ones), log-prior per row included.
    family_obj = model._family(fitted=True)
    objective = model.score(X) + family_obj.log_prior(model._params()) / len(X)
    assert model.lower_bound_ == pytest.approx(objective, abs=1e-10)


# ------------------------------------------------------------ checkpoints
def test_resume_with_default_prior_and_two_runs_equals_the_uninterrupted_averaged_fit(tmp_path):
    X = da.from_array(make_data(n=1500), chunks=400)
    params = dict(algorithm="stepwise", batch_size=130, tol=0.0, n_init=2, prior="default", init_params="random", random_state=1)
    full = _quiet_fit(streamem.GaussianMixture(3, max_iter=3, **params), X)
    resumed = _quiet_fit(streamem.GaussianMixture(3, max_iter=1, **params), X, checkpoint=tmp_path / "ckpt")
    _quiet_fit(resumed.set_params(max_iter=3), X, checkpoint=tmp_path / "ckpt", resume=True)
    assert resumed.lower_bounds_ == full.lower_bounds_ and resumed.n_steps_ == full.n_steps_
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name))


def test_a_checkpoint_made_without_averaging_is_refused_naming_average_and_resumes_without_it(tmp_path):
    # A stepwise checkpoint of an older streamem records no 'average' (it never averaged), as average=False does now.
    X = make_data(n=1200)
    params = dict(algorithm="stepwise", batch_size=2000, step_decay=0.7, tol=0.0, random_state=3)
    _quiet_fit(streamem.GaussianMixture(3, max_iter=1, average=False, **params), X, checkpoint=tmp_path / "old")
    with pytest.raises(ValueError, match=r"differs in: average\)"):
        _quiet_fit(streamem.GaussianMixture(3, max_iter=2, **params), X, checkpoint=tmp_path / "old", resume=True)
    resumed = _quiet_fit(streamem.GaussianMixture(3, max_iter=2, average=False, **params), X, checkpoint=tmp_path / "old", resume=True)
    full = _quiet_fit(streamem.GaussianMixture(3, max_iter=2, average=False, **params), X)
    np.testing.assert_array_equal(resumed.means_, full.means_)


# DEFECT 1: a stepwise model file written before averaging existed holds no 'average' in its params; io.load_model
# builds the estimator with the new default (True), so the loaded model claims a setting it was not fitted with,
# and a re-fit from its stored settings (clone) no longer reproduces it. checkpoint.fit_settings reads the same
# absence as False.
def test_stepwise_model_file_saved_before_averaging_loads_with_average_false(tmp_path):
    import zarr

    X = make_data(n=1500)
    old = _quiet_fit(streamem.GaussianMixture(3, algorithm="stepwise", batch_size=300, step_decay=0.7, average=False,
                                              max_iter=2, tol=0.0, random_state=0), X)  # fmt: skip
    old.save(tmp_path / "old.zarr")
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    params = json.loads(group.attrs["params"])
    del params["average"]  # what a file of the previous streamem holds
    group.attrs["params"] = json.dumps(params)
    loaded = streamem.load(tmp_path / "old.zarr")
    refit = _quiet_fit(clone(loaded), X)
    np.testing.assert_allclose(refit.means_, old.means_, rtol=0, atol=1e-12)  # its stored settings reproduce it
    assert loaded.average is False


# DEFECT 2 (from issue 15's fix, not from averaging; shows with and without it): a warm-started stepwise fit with a
# prior weighs the prior against n_rows_seen_ + n rows (fit: rows = data.n_samples + n_rows_seen_) although a
# re-fit of the same rows "learns from them once" (n_rows_seen_ stays n): three warm-started one-pass fits
# differ from one three-pass fit with a prior, while without a prior they are identical.
@pytest.mark.parametrize("prior", [None, "dict"])
def test_warm_started_passes_equal_one_fit_with_a_prior(prior):
    rng = np.random.RandomState(3)
    X = rng.standard_normal((200, 3))
    X[:100] += [3.0, -1.0, 2.0]
    niw = {"weight_concentration": 3.0, "mean_prior": np.array([0.5, -1.0, 2.0]), "mean_precision_prior": 5.0,
           "degrees_of_freedom_prior": 4.5, "covariance_prior": np.diag([2.0, 1.5, 1.0])}  # fmt: skip
    params = dict(algorithm="stepwise", batch_size=20, tol=0.0, random_state=0, prior=None if prior is None else niw,
                  means_init=np.array([[2.5, -0.5, 1.0], [0.5, 0.3, -0.4]]))  # fmt: skip
    one = _quiet_fit(streamem.GaussianMixture(2, max_iter=3, **params), X)
    warm = streamem.GaussianMixture(2, max_iter=1, warm_start=True, **params)
    for _ in range(3):
        _quiet_fit(warm, X)
    assert warm.n_rows_seen_ == len(X)
    np.testing.assert_allclose(warm.means_, one.means_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(warm.covariances_, one.covariances_, rtol=0, atol=1e-12)


# ------------------------------------------------------- update, partial_fit
def test_update_and_partial_fit_ignore_average_and_keep_the_setting():
    X = make_data(n=2000)
    base = _quiet_fit(streamem.GaussianMixture(3, algorithm="stepwise", batch_size=150, max_iter=2, tol=0.0, random_state=0), X[:1200])
    assert base.average is True
    results = []
    for average in (True, False):
        for method in ("update", "partial_fit"):
            model = clone(base).set_params(average=average)
            vars(model).update({k: v for k, v in vars(base).items() if k.endswith("_")})
            getattr(model, method)(X[1200:])
            assert model.average is average  # the estimator's setting is left as it was
            results.append(model.means_)
    np.testing.assert_array_equal(results[0], results[2])  # update: the same with and without average
    np.testing.assert_array_equal(results[1], results[3])  # partial_fit: too


@pytest.mark.parametrize("bad", [None, "yes", 1, 0.0])
def test_average_must_be_a_bool(bad):
    with pytest.raises(ValueError, match=rf"average must be True or False, got {bad!r}"):
        streamem.GaussianMixture(2, algorithm="stepwise", average=bad).fit(make_data(n=300))


# --------------------------------------------------------------- command line
def test_cli_average_flag_and_yaml_key_reach_the_fit(tmp_path):
    X = make_data(n=1400)
    path = write_zarr(tmp_path / "x.zarr", X, (700, 3))
    common = ["--n-components", "3", "--algorithm", "stepwise", "--batch-size", "100", "--max-iter", "2", "--random-state", "0",
              "--quiet", "--workers", "0"]
    config = tmp_path / "c.yaml"
    config.write_text("average: false\n")
    runs = {"flag-off": ["--no-average"], "yaml-off": ["--config", str(config)], "yaml-off-flag-on": ["--config", str(config), "--average"]}
    models = {}
    for name, extra in runs.items():
        assert main(["fit", path, *common, *extra, "--out", str(tmp_path / f"{name}.zarr")]) == 0
        models[name] = streamem.load(tmp_path / f"{name}.zarr")
    api = {avg: _quiet_fit(streamem.GaussianMixture(3, algorithm="stepwise", batch_size=100, max_iter=2, random_state=0,
                                                   average=avg), path)
           for avg in (True, False)}  # fmt: skip
    assert models["flag-off"].average is False and models["yaml-off"].average is False
    assert models["yaml-off-flag-on"].average is True  # the flag overrides the config
    np.testing.assert_array_equal(models["flag-off"].means_, api[False].means_)
    np.testing.assert_array_equal(models["yaml-off"].means_, api[False].means_)
    np.testing.assert_array_equal(models["yaml-off-flag-on"].means_, api[True].means_)
    assert not np.array_equal(api[True].means_, api[False].means_)
