"""The command line for every family (issue 15, item 6).

``streamem fit --family bernoulli|binomial|poisson|categorical`` with the
family's options as flags and YAML keys, ``--init-from``, ``update``,
``info``, ``predict``, ``score``, ``plot`` and ``accumulate``/``reduce``.
Commands run through :func:`streamem.cli.main` in process (one test runs
the ``python -m streamem.cli`` entry point in a subprocess) with
``--workers 0``: no cluster, so the tests stay fast. Results are compared
with the library run in process on the same store, and predictions and
scores with log-likelihoods written here with scipy.stats.
"""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import xarray as xr
import yaml
from numpy.testing import assert_allclose, assert_array_equal
from scipy import stats
from scipy.special import logsumexp

import streamem
from streamem.cli import main
from workflow_helpers import assert_same_params, check_ok, cli, quiet_fit, write_zarr

N_ROWS, CHUNK_ROWS, K = 600, 150, 2
COMMON = ("--n-components", K, "--max-iter", 8, "--tol", 0, "--random-state", 0)
COMMON_KWARGS = dict(n_components=K, max_iter=8, tol=0.0, random_state=0)
NO_CLUSTER = ("--workers", 0)
N_TRIALS = [4, 6, 5, 4]
N_CATEGORIES = [3, 4, 3]
ESTIMATORS = {
    "bernoulli": streamem.BernoulliMixture,
    "binomial": streamem.BinomialMixture,
    "poisson": streamem.PoissonMixture,
    "categorical": streamem.CategoricalMixture,
}
PARAM = {"bernoulli": "probs_", "binomial": "probs_", "poisson": "rates_", "categorical": "probs_"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- helpers
def run(capsys, *args) -> tuple[int, str, str]:
    """``streamem ARGS`` in process: exit status, stdout, stderr."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def ok(result: tuple[int, str, str]) -> str:
    rc, out, err = result
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def usage_error(result: tuple[int, str, str], *needles: str) -> str:
    """Exit status 2 with one line on stderr naming every needle."""
    rc, out, err = result
    assert rc == 2, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def simulate(family: str, n: int = N_ROWS, seed: int = 0) -> np.ndarray:
    """``n`` rows of a well separated two-component mixture of ``family``, as float64."""
    rng = np.random.RandomState(seed)
    z = rng.choice(K, size=n, p=[0.4, 0.6])
    if family == "bernoulli":
        p = np.array([[0.9, 0.8, 0.2, 0.1, 0.5], [0.1, 0.3, 0.7, 0.9, 0.5]])
        X = rng.binomial(1, p[z])
    elif family == "binomial":
        p = np.array([[0.2, 0.7, 0.5, 0.1], [0.8, 0.3, 0.5, 0.6]])
        X = rng.binomial(N_TRIALS, p[z])
    elif family == "poisson":
        X = rng.poisson(np.array([[1.0, 5.0, 2.0], [6.0, 1.0, 3.0]])[z])
    else:
        probs = [[rng.dirichlet(np.full(c, 0.7)) for c in N_CATEGORIES] for _ in range(K)]
        X = np.array([[rng.choice(c, p=probs[k][j]) for j, c in enumerate(N_CATEGORIES)] for k in z])
    return X.astype(np.float64)


def store(tmp_path, X: np.ndarray, name: str = "data.zarr") -> str:
    return write_zarr(tmp_path / name, X, CHUNK_ROWS)


def npy(tmp_path, name: str, value) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, np.asarray(value, dtype=np.float64))
    return str(path)


def reference_log_joint(model, X: np.ndarray) -> np.ndarray:
    """``log w_k + log p(x_i | k)`` by scipy.stats, shape (n, K)."""
    x = X[:, None, :]
    with np.errstate(divide="ignore"):
        if isinstance(model, streamem.PoissonMixture):
            comp = stats.poisson.logpmf(x, model.rates_[None]).sum(axis=2)
        elif isinstance(model, streamem.BinomialMixture):
            comp = stats.binom.logpmf(x, np.asarray(model.n_trials), model.probs_[None]).sum(axis=2)
        elif isinstance(model, streamem.BernoulliMixture):
            comp = stats.bernoulli.logpmf(x, model.probs_[None]).sum(axis=2)
        else:
            codes = X.astype(int)
            comp = sum(np.log(model.probs_[:, j, codes[:, j]]).T for j in range(X.shape[1]))
        return comp + np.log(model.weights_)


def n_free_parameters(model, d: int) -> int:
    """Free parameters counted by hand: weights (unless fixed), then per component d, or sum(C_j - 1) for categorical."""
    per_component = sum(c - 1 for c in N_CATEGORIES) if isinstance(model, streamem.CategoricalMixture) else d
    return (K - 1 if model.learn_weights else 0) + K * per_component


# --------------------------------------------------------------------- cases
def fit_case(family: str, tmp_path) -> tuple[np.ndarray, str, list, dict]:
    """Data, its store, the family's ``fit`` flags and the same settings as library keywords.

    Each family exercises other options: fixed weights and full initial
    arrays (Bernoulli), per-feature trials with the default prior
    (Binomial), initial rates and a prior read from JSON (Poisson),
    per-feature categories with n_init (Categorical).
    """
    X = simulate(family)
    data = store(tmp_path, X)
    if family == "bernoulli":
        w, p = [0.3, 0.7], [[0.7, 0.6, 0.4, 0.3, 0.5], [0.3, 0.4, 0.6, 0.7, 0.4]]
        flags = ["--no-learn-weights", "--weights-init", npy(tmp_path, "w", w), "--probs-init", npy(tmp_path, "p", p)]
        kwargs = dict(learn_weights=False, weights_init=np.array(w), probs_init=np.array(p))
    elif family == "binomial":
        flags = ["--n-trials", ",".join(map(str, N_TRIALS)), "--prior", "default", "--init-params", "k-means++"]
        kwargs = dict(n_trials=N_TRIALS, prior="default", init_params="k-means++")
    elif family == "poisson":
        w, r = [0.5, 0.5], [[2.0, 3.0, 2.0], [4.0, 2.0, 2.5]]
        prior = {"weight_concentration": 1.5, "shape": [2.0, 1.5, 2.0], "rate": [0.5, 0.5, 1.0]}
        (tmp_path / "prior.json").write_text(json.dumps(prior))
        flags = ["--weights-init", npy(tmp_path, "w", w), "--rates-init", npy(tmp_path, "r", r), "--prior", tmp_path / "prior.json"]
        kwargs = dict(weights_init=np.array(w), rates_init=np.array(r), prior={k: np.asarray(v) for k, v in prior.items()})
    else:
        flags = ["--n-categories", ",".join(map(str, N_CATEGORIES)), "--n-init", 2]
        kwargs = dict(n_categories=N_CATEGORIES, n_init=2)
    return X, data, flags, kwargs


# ----------------------------------------------------------------------- fit
@pytest.mark.parametrize("family", sorted(ESTIMATORS))
def test_fit_info_predict_score_plot(family, tmp_path, capsys):
    X, data, flags, kwargs = fit_case(family, tmp_path)
    out = tmp_path / "model.zarr"
    ok(run(capsys, "fit", data, "--family", family, "--out", out, *COMMON, *flags, *NO_CLUSTER, "--quiet"))

    model = streamem.load(out)
    reference = quiet_fit(ESTIMATORS[family](**COMMON_KWARGS, **kwargs), data)
    assert type(model) is ESTIMATORS[family]
    assert_same_params(model, reference, 1e-10, attrs=("weights_", PARAM[family]))
    assert model.n_iter_ == 8 and model.fit_data_["source"] == data
    for name in ("n_trials", "n_categories", "learn_weights", "n_init", "init_params"):
        if name in kwargs:
            assert model.get_params()[name] == kwargs[name], name
    if family == "bernoulli":  # --no-learn-weights kept --weights-init
        assert_array_equal(model.weights_, [0.3, 0.7])
    if family in ("binomial", "poisson"):  # a MAP fit: the prior the fit used is kept
        assert sorted(model.prior_) == sorted(reference.prior_)
        for key in reference.prior_:
            assert_allclose(model.prior_[key], reference.prior_[key], rtol=1e-12)

    info = ok(run(capsys, "info", out))
    assert f"{type(model).__name__}: family {family}, {K} components" in info
    assert "covariance" not in info and "means" not in info
    assert f"{PARAM[family][:-1]} (component, feature" in info
    assert ("weights (fixed):" if family == "bernoulli" else "weights:") in info
    assert "prior: MAP" in info if model.prior_ is not None else "prior: none" in info
    (weights_line,) = [line for line in info.splitlines() if line.startswith("weights")]
    assert_allclose(np.array(weights_line.split(":")[1].strip(" []").split(), dtype=float), model.weights_, atol=5e-5)

    # predict / score: against log-likelihoods written with scipy.stats
    log_joint = reference_log_joint(model, X)
    pred = tmp_path / "pred.zarr"
    ok(run(capsys, "predict", out, data, "--out", pred, "--proba", "--score", *NO_CLUSTER, "--quiet"))
    ds = xr.open_zarr(pred, consolidated=False)
    assert_array_equal(ds["labels"].values, reference.predict(X))
    assert_array_equal(ds["labels"].values, log_joint.argmax(axis=1))
    loglik = logsumexp(log_joint, axis=1)
    assert_allclose(ds["log_likelihood"].values, loglik, rtol=1e-10)
    assert_allclose(ds["proba"].values, np.exp(log_joint - loglik[:, None]), rtol=1e-9, atol=1e-14)

    printed = ok(run(capsys, "score", out, data, *NO_CLUSTER, "--quiet"))
    values = dict(line.split(": ", 1) for line in printed.strip().splitlines())
    total, p = loglik.sum(), n_free_parameters(model, X.shape[1])
    assert int(values["rows"]) == N_ROWS
    assert_allclose(float(values["mean log-likelihood"]), total / N_ROWS, rtol=1e-9)
    assert_allclose(float(values["BIC"]), -2 * total + p * np.log(N_ROWS), rtol=1e-9)
    assert_allclose(float(values["AIC"]), -2 * total + 2 * p, rtol=1e-9)

    # plot: the convergence curve and the profiles; --data adds a third panel (rows per component)
    alone, with_data = tmp_path / "alone.png", tmp_path / "data.png"
    ok(run(capsys, "plot", out, "--out", alone, "--quiet"))
    ok(run(capsys, "plot", out, "--out", with_data, "--data", data, "--n-points", 300, "--quiet"))
    widths = []
    for path in (alone, with_data):
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(path)
        assert image.std() > 0  # not a blank canvas
        widths.append(image.shape[1])
    # 6 inches a panel at 110 dpi: two panels, then three (the Gaussian plot without data has one).
    assert widths == [2 * 660, 3 * 660], widths
    usage_error(run(capsys, "plot", out, "--out", alone, "--features", 0, 1), "features", family)


def test_fit_through_the_entry_point(tmp_path):
    """``python -m streamem.cli fit --family poisson`` in a subprocess gives the library's model."""
    X = simulate("poisson")
    data = store(tmp_path, X)
    out = tmp_path / "model.zarr"
    check_ok(cli("fit", data, "--family", "poisson", "--out", out, *COMMON, *NO_CLUSTER, "--quiet"))
    reference = quiet_fit(streamem.PoissonMixture(**COMMON_KWARGS), data)
    assert_same_params(streamem.load(out), reference, 1e-10, attrs=("weights_", "rates_"))


def test_yaml_config_with_family_keys(tmp_path, capsys):
    """family, n_categories (a list), learn_weights and prior (a mapping) as YAML keys; a flag overrides one."""
    X = simulate("categorical")
    data = store(tmp_path, X)
    concentration = [[1.5, 1.5, 1.5, 1.0], [1.2, 1.2, 1.2, 1.2], [2.0, 1.5, 1.5, 1.0]]
    config = {
        "family": "categorical", "n_components": K, "n_categories": N_CATEGORIES, "learn_weights": False,
        "prior": {"weight_concentration": 1.0, "concentration": concentration},
        "max_iter": 3, "tol": 0, "random_state": 1, "workers": 0,
    }  # fmt: skip
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "model.zarr"
    ok(run(capsys, "fit", data, "--config", cfg, "--out", out, "--max-iter", 6, "--quiet"))

    model = streamem.load(out)
    reference = quiet_fit(
        streamem.CategoricalMixture(
            n_components=K, n_categories=N_CATEGORIES, learn_weights=False, max_iter=6, tol=0.0, random_state=1,
            prior={"weight_concentration": 1.0, "concentration": np.array(concentration)},
        ),  # fmt: skip
        data,
    )
    assert type(model) is streamem.CategoricalMixture
    assert model.max_iter == 6 and model.n_iter_ == 6 and model.n_categories == N_CATEGORIES
    assert_array_equal(model.weights_, [0.5, 0.5])  # learn_weights: false, no weights_init: equal weights
    assert_same_params(model, reference, 1e-10, attrs=("weights_", "probs_"))
    assert_allclose(model.prior_["concentration"], concentration)
    # The padded category of features 0 and 2 keeps probability 0 (the prior adds nothing there).
    assert_array_equal(model.probs_[:, [0, 2], 3], 0.0)

    # n_trials as a YAML int, and prior: default
    Xb = simulate("binomial")
    cfg.write_text(yaml.safe_dump({"family": "binomial", "n_trials": 6, "prior": "default", "n_components": K,
                                   "max_iter": 4, "tol": 0, "random_state": 0, "workers": 0}))  # fmt: skip
    ok(run(capsys, "fit", store(tmp_path, Xb, "b.zarr"), "--config", cfg, "--out", tmp_path / "b", "--quiet"))
    reference = quiet_fit(streamem.BinomialMixture(n_components=K, n_trials=6, prior="default", max_iter=4, tol=0.0, random_state=0), Xb)
    binomial = streamem.load(tmp_path / "b")
    assert binomial.n_trials == 6 and sorted(binomial.prior_) == ["alpha", "beta", "weight_concentration"]
    assert_same_params(binomial, reference, 1e-10, attrs=("weights_", "probs_"), bounds=False)


# ------------------------------------------------------------- wrong options
@pytest.mark.parametrize(
    "flags, config, needles",
    [
        (["--family", "poisson", "--covariance-type", "diag"], None, ["--covariance-type", "poisson", "gaussian"]),
        (["--family", "bernoulli", "--reg-covar", "1e-3"], None, ["--reg-covar", "bernoulli"]),
        (["--family", "categorical", "--dtype", "float32"], None, ["--dtype", "categorical"]),
        (["--family", "binomial", "--device", "cpu"], None, ["--device", "binomial"]),
        (["--family", "bernoulli", "--means-init", "m.npy"], None, ["--means-init", "bernoulli"]),
        (["--family", "poisson", "--precisions-init", "p.npy"], None, ["--precisions-init", "poisson"]),
        (["--n-trials", "3"], None, ["--n-trials", "gaussian", "binomial"]),
        (["--family", "binomial", "--n-categories", "3"], None, ["--n-categories", "binomial", "categorical"]),
        (["--family", "categorical", "--rates-init", "r.npy"], None, ["--rates-init", "categorical", "poisson"]),
        (["--family", "poisson", "--probs-init", "p.npy"], None, ["--probs-init", "poisson", "bernoulli"]),
        ([], {"family": "poisson", "covariance_type": "full"}, ["covariance_type", "poisson", "--config"]),
        ([], {"n_categories": [2, 3]}, ["n_categories", "gaussian"]),
        (["--family", "binomial"], {"rates_init": "r.npy"}, ["rates_init", "binomial"]),
        (["--family", "binomial", "--n-trials", "3,x"], None, ["--n-trials", "'3,x'"]),
        (["--family", "poisson", "--prior", "missing.json"], None, ["--prior", "missing.json"]),
        ([], {"family": "poisson", "prior": [1, 2]}, ["prior", "str or dict"]),
        ([], {"family": "exponential"}, ["family", "exponential", "poisson"]),
        ([], {"family": "binomial", "n_trials": "many"}, ["n_trials", "int or list"]),
        ([], {"family": "poisson", "learn_weights": "no"}, ["learn_weights", "bool"]),
        (["--family", "poisson", "--prior", "default"], {"prior": "default", "workers": 0}, []),  # fine: the control
    ],
)
def test_options_that_do_not_fit_the_family_exit_2(flags, config, needles, tmp_path, capsys):
    data = store(tmp_path, simulate("poisson"))
    if config is not None:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        flags = [*flags, "--config", tmp_path / "run.yaml"]
    out = tmp_path / "model.zarr"
    result = run(capsys, "fit", data, "--out", out, "--max-iter", 2, *flags, *NO_CLUSTER, "--quiet")
    if not needles:
        ok(result)
        assert streamem.load(out).prior_ is not None
        return
    usage_error(result, *needles)
    assert not out.exists()


def test_unknown_family_flag_is_refused_by_the_parser(tmp_path, capsys):
    rc, _, err = run(capsys, "fit", store(tmp_path, simulate("poisson")), "--out", tmp_path / "m", "--family", "exponential")
    assert rc == 2 and "invalid choice: 'exponential'" in err and "poisson" in err


def test_prior_with_unknown_keys_names_them(tmp_path, capsys):
    (tmp_path / "prior.yaml").write_text("shape: [1, 1, 1]\nrates: [1, 1, 1]\n")
    flags = ["--family", "poisson", "--prior", tmp_path / "prior.yaml", *NO_CLUSTER]
    usage_error(run(capsys, "fit", store(tmp_path, simulate("poisson")), "--out", tmp_path / "m", *flags), "rates", "rate")


# ------------------------------------------------------ init-from and update
def test_init_from_takes_family_settings_and_parameters_of_the_old_model(tmp_path, capsys):
    """No --family and no --n-trials: both come from the --init-from model, which also gives the start."""
    old = quiet_fit(streamem.BinomialMixture(n_components=K, n_trials=N_TRIALS, random_state=0, max_iter=20), simulate("binomial", seed=1))
    old.save(tmp_path / "old.zarr")
    new = simulate("binomial", seed=2)
    data = store(tmp_path, new)
    out = tmp_path / "refit.zarr"
    ok(run(capsys, "fit", data, "--init-from", tmp_path / "old.zarr", "--out", out, "--max-iter", 5, "--tol", 0, *NO_CLUSTER, "--quiet"))

    refit = streamem.load(out)
    reference = quiet_fit(
        streamem.BinomialMixture(n_components=K, n_trials=N_TRIALS, max_iter=5, tol=0.0,
                                 weights_init=old.weights_, probs_init=old.probs_),  # fmt: skip
        data,
    )
    assert type(refit) is streamem.BinomialMixture and refit.n_trials == N_TRIALS
    assert_same_params(refit, reference, 1e-10, attrs=("weights_", "probs_"))
    assert_allclose(refit.probs_, old.probs_, atol=0.1)  # component k is still component k

    wrong = run(capsys, "fit", data, "--init-from", tmp_path / "old.zarr", "--family", "poisson", "--out", tmp_path / "x", *NO_CLUSTER)
    usage_error(wrong, "--init-from", "binomial", "poisson")
    wrong = run(capsys, "fit", data, "--init-from", tmp_path / "old.zarr", "--n-components", 3, "--out", tmp_path / "x", *NO_CLUSTER)
    usage_error(wrong, "--init-from", "--n-components")


def test_update_of_a_poisson_model(tmp_path, capsys):
    model = quiet_fit(streamem.PoissonMixture(n_components=K, random_state=0, prior="default"), simulate("poisson", seed=3))
    model.save(tmp_path / "model.zarr")
    new = store(tmp_path, simulate("poisson", n=300, seed=4), "new.zarr")
    out = tmp_path / "updated.zarr"
    ok(run(capsys, "update", tmp_path / "model.zarr", new, "--out", out, "--batch-size", 100, *NO_CLUSTER, "--quiet"))

    reference = streamem.load(tmp_path / "model.zarr").set_params(batch_size=100).update(new)
    updated = streamem.load(out)
    assert type(updated) is streamem.PoissonMixture
    assert_same_params(updated, reference, 1e-10, attrs=("weights_", "rates_"), bounds=False, n_iter=False)
    assert updated.n_rows_seen_ == N_ROWS + 300
    assert np.abs(updated.rates_ - model.rates_).max() > 1e-6  # the new rows did move it


# ---------------------------------------------------------------- map-reduce
def test_accumulate_and_reduce_a_poisson_model_is_one_em_iteration(tmp_path, capsys):
    X = simulate("poisson", seed=5)
    data = store(tmp_path, X)
    prior = {"weight_concentration": 2.0, "shape": np.array([1.5, 2.0, 1.5]), "rate": np.array([1.0, 0.5, 1.0])}
    model = quiet_fit(streamem.PoissonMixture(n_components=K, random_state=0, max_iter=3, tol=0.0, prior=prior), X)
    model.save(tmp_path / "model.zarr")
    shards = [tmp_path / "s0.zarr", tmp_path / "s1.zarr"]
    for path, rows in zip(shards, ("0:250", "250:")):
        ok(run(capsys, "accumulate", tmp_path / "model.zarr", data, "--rows", rows, "--out", path, *NO_CLUSTER, "--quiet"))
    out = tmp_path / "next.zarr"
    ok(run(capsys, "reduce", *shards, "--model", tmp_path / "model.zarr", "--out", out, "--quiet"))

    one_step = quiet_fit(
        streamem.PoissonMixture(n_components=K, max_iter=1, tol=0.0, prior=prior, weights_init=model.weights_, rates_init=model.rates_),
        data,
    )
    reduced = streamem.load(out)
    assert type(reduced) is streamem.PoissonMixture
    assert_same_params(reduced, one_step, 1e-10, attrs=("weights_", "rates_"), bounds=False, n_iter=False)
    assert_allclose(reduced.lower_bound_, one_step.lower_bound_, rtol=1e-10)
    assert reduced.n_iter_ == model.n_iter_ + 1
