"""Review of issue 15 (families, estimator core, model files, checkpoints, CLI): attempts to break it.

Tests marked ``# Found by review (fixed):`` fail on the code as reviewed, on purpose: each
reproduces a defect (the report names the function at fault and a fix).
The others pin down behaviour that was tried and works, with real
components: Zarr stores in ``tmp_path`` with odd chunkings and dtypes, one
2-worker LocalCluster on 127.0.0.1 (the ``cluster`` fixture of conftest),
the command line through ``streamem.cli.main`` with ``--workers 0``.
References are independent of streamem: numpy EMs written here, closed
forms, hand counts.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import tracemalloc
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import gammaln, logsumexp
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

import streamem
from streamem import GaussianMixture
from streamem.cli import main
from streamem.estimators import BernoulliMixture, BinomialMixture, CategoricalMixture, PoissonMixture
from streamem.families.base import DataError, MixtureParams
from streamem.families.discrete import CategoricalFamily
from streamem.families.gaussian import SLICE_BYTES

FIXTURE_MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "model_before_online.zarr")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _store(path, X: np.ndarray, chunk_rows: int) -> str:
    path = os.fspath(path)
    # Count data have all-zero chunks: write them, or Zarr leaves them out (read back as missing chunks).
    arr = zarr.open_array(path, mode="w", shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype, zarr_format=3,
                          config={"write_empty_chunks": True})
    arr[...] = X
    return path


def _two_groups(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).rand(n) < 0.4


def _poisson_data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    z = _two_groups(n, seed)
    return rng.poisson(np.where(z[:, None], 2.0, 9.0), (n, 3)).astype(np.float64)


# ======================================================================== DEFECTS
# ---- 1. online EM with a prior: the prior's pseudo-counts meet statistics of ONE row


def test_stepwise_fit_with_prior_is_not_dominated_by_the_prior():
    # Found by review (fixed): stepwise EM keeps statistics averaged per row (online.py _update), and the family's
    # M-step adds the prior's pseudo-counts to them as if they were sums over all rows: the prior
    # weighs as much as the whole data set. prior="default" is one pseudo-row per component; over
    # 4,000 rows it must barely move the ML estimates (rates 2 and 9), yet stepwise MAP gives ~5 / ~7.
    X = _poisson_data(4000)
    common = dict(n_components=2, algorithm="stepwise", batch_size=200, max_iter=3, random_state=0)
    ml = PoissonMixture(**common).fit(X)
    map_ = PoissonMixture(prior="default", **common).fit(X)
    batch_map = PoissonMixture(2, prior="default", max_iter=50, random_state=0).fit(X)
    order = lambda m: np.argsort(m.rates_[:, 0])  # noqa: E731
    assert_allclose(np.sort(batch_map.rates_[:, 0]), np.sort(ml.rates_[:, 0]), atol=0.05)  # batch MAP is right
    assert_allclose(map_.rates_[order(map_)], ml.rates_[order(ml)], atol=0.1)


def test_update_of_a_map_model_keeps_its_covariances():
    # Found by review (fixed): the same in update() (stepwise on the new rows): a Gaussian MAP model updated with
    # rows from the very distribution it was fitted on sees its variances shrink ~1 -> ~0.65 and
    # its weights pulled toward 1/2, because the Normal-inverse-Wishart pseudo-counts meet per-row
    # statistics (the fix: scale the statistics to the rows they stand for before the M-step).
    rng = np.random.RandomState(1)
    z = _two_groups(6000, 1)
    X = rng.randn(6000, 2) + 6.0 * z[:, None]
    model = GaussianMixture(2, prior="default", max_iter=50, random_state=0).fit(X[:4000])
    before_cov, before_w = model.covariances_.copy(), model.weights_.copy()
    model.update(X[4000:])
    assert_allclose(model.weights_, before_w, atol=0.03)
    assert_allclose(model.covariances_, before_cov, atol=0.1)


# ---- 2. DataError cannot cross a process boundary


def test_data_error_survives_pickling():
    # Found by review (fixed): DataError.__init__(message, row) with Exception.args == (message,): unpickling calls
    # DataError(message) -> TypeError "missing 1 required positional argument: 'row'".
    # (families/base.py DataError: define __reduce__ or keep row in args.)
    err = pickle.loads(pickle.dumps(DataError("BernoulliMixture: values must be 0 or 1; got 2.0 in row 7", 7)))
    assert isinstance(err, ValueError) and err.row == 7


@pytest.mark.parametrize("algorithm", ["batch", "stepwise"])
def test_bad_data_on_a_cluster_is_named_and_clone_shares_client(algorithm, cluster, tmp_path):
    # Found by review (fixed): on a distributed cluster (what `streamem fit` uses by default) a value a family cannot
    # model comes back as "TypeError: DataError.__init__() missing 1 required positional argument:
    # 'row'" instead of the ValueError naming family, rule, value and row (see the pickling test).
    from distributed import Client

    rng = np.random.RandomState(0)
    X = (rng.rand(600, 4) < 0.4).astype(np.float64)
    X[437, 2] = 2.0
    path = _store(tmp_path / "bad.zarr", X, 100)
    with Client(cluster) as client:
        model = BernoulliMixture(2, client=client, max_iter=3, random_state=0, algorithm=algorithm)
        assert clone(model).client is client  # works: clones share the client
        with pytest.raises(ValueError, match=r"BernoulliMixture: values must be 0 or 1; got 2\.0 in row 437"):
            model.fit(path)


# ---- 3. checkpoints of per-feature family settings


@pytest.mark.parametrize(
    "make, X",
    [
        (lambda: BinomialMixture(2, n_trials=[5, 10], max_iter=3, random_state=0),
         np.random.RandomState(0).binomial([5, 10], 0.3, (300, 2)).astype(np.float64)),
        (lambda: CategoricalMixture(2, n_categories=[2, 4], max_iter=3, random_state=0),
         np.random.RandomState(0).randint(0, [2, 4], (300, 2)).astype(np.float64)),
    ],
    ids=["n_trials", "n_categories"],
)
def test_checkpoint_with_one_setting_per_feature(make, X, tmp_path):
    # Found by review (fixed): checkpoint.fit_settings stores the family's settings with _setting -> json_value, which
    # refuses lists and arrays: "TypeError: n_trials=[5, 10] cannot be stored in a checkpoint".
    # Per-feature n_trials / n_categories are documented; use _jsonable (lists) for family settings.
    ck = tmp_path / "ck"
    make().fit(X, checkpoint=ck)
    resumed = make().set_params(max_iter=5).fit(X, checkpoint=ck, resume=True)
    full = make().set_params(max_iter=5).fit(X)
    assert_allclose(resumed.probs_, full.probs_, rtol=0, atol=1e-12)


def test_cli_fit_with_per_feature_n_trials_and_checkpoint(tmp_path, capsys):
    # Found by review (fixed): the same through the command line: exit 2, "n_trials=[5, 10] cannot be stored in a checkpoint".
    X = np.random.RandomState(0).binomial([5, 10], 0.3, (300, 2)).astype(np.float32)
    data = _store(tmp_path / "x.zarr", X, 1)  # one-row chunks
    code = main(["fit", data, "--out", str(tmp_path / "m.zarr"), "--family", "binomial", "--n-trials", "5,10",
                 "--n-components", "2", "--max-iter", "3", "--workers", "0", "-q", "--checkpoint", str(tmp_path / "ck")])
    assert code == 0, capsys.readouterr().err


# ---- 4. categorical codes reach the one-hot coding before the data check


@pytest.mark.parametrize("init, prior", [("k-means++", None), ("random_from_data", None), ("kmeans", "default"), ("random", "default")])
def test_out_of_range_category_is_a_value_error_in_every_initialisation(init, prior):
    # Found by review (fixed): k-means++ / random_from_data points (init.initial_params -> stats_from_resp) and the
    # sample of prior="default" (CategoricalFamily.default_prior) are one-hot coded without
    # family.check_data: a code >= n_categories is "IndexError: index 7 is out of bounds", not the
    # ValueError naming family, rule, value and row that kmeans/random without prior give.
    X = np.zeros((50, 2))
    X[:, 0] = 7.0
    with pytest.raises(ValueError, match=r"CategoricalMixture: values must be integer category codes.*got 7\.0 in row 0, feature 0"):
        CategoricalMixture(2, n_categories=3, init_params=init, prior=prior, random_state=0).fit(X)


# ---- 5. warm start keeps the old prior


def test_warm_start_and_update_use_the_prior_now_set():
    # Found by review (fixed): MixtureEstimator._family(fitted=True) prefers prior_ (the prior of the previous fit) to
    # the prior parameter: after set_params(prior=B, warm_start=True) the fit runs with the old
    # prior A (prior_ stays A), and prior=None still fits MAP. Only prior="default" should reuse prior_.
    rng = np.random.RandomState(0)
    X = (rng.rand(400, 4) < np.where(_two_groups(400)[:, None], 0.2, 0.8)).astype(np.float64)
    weak = {"alpha": np.full(4, 2.0), "beta": np.full(4, 2.0)}
    strong = {"alpha": np.full(4, 500.0), "beta": np.full(4, 500.0)}
    model = BernoulliMixture(2, prior=weak, max_iter=20, random_state=0).fit(X)
    model.set_params(prior=strong, warm_start=True, max_iter=30)
    model.fit(X)
    assert_array_equal(model.prior_["alpha"], strong["alpha"])
    assert np.all(np.abs(model.probs_ - 0.5) < 0.1)  # 500 pseudo-counts of 1/2 against 400 rows
    model.set_params(prior=None)
    model.fit(X)
    assert model.prior_ is None


# ---- 6. the categorical E-step's memory grows with rows x features x categories


def test_categorical_chunk_statistics_stay_within_slice_bytes():
    # Found by review (fixed): CategoricalFamily._one_hot builds a dense float64 (rows, d * C) array of the whole
    # chunk (E-step, statistics, predictions, and default_prior's sample of up to 100,000 rows):
    # 65,536 rows x 20 features x 50 categories is 500 MiB per chunk task. The Gaussian family
    # works in slices of SLICE_BYTES (32 MiB); here 20,000 x 4 x 100 peaks at ~2 x 61 MiB.
    # Fix: slice rows, or gather log-probabilities by code (n, d, K) instead of one-hot coding.
    n, d, C, K = 20_000, 4, 100, 3
    rng = np.random.RandomState(0)
    X = rng.randint(0, C, (n, d)).astype(np.float64)
    params = MixtureParams(weights=np.full(K, 1.0 / K), probs=rng.dirichlet(np.ones(C), size=(K, d)))
    family = CategoricalFamily(n_categories=C)
    tracemalloc.start()
    try:
        family.chunk_stats(X, params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 1.5 * SLICE_BYTES, f"peak {peak / 2**20:.0f} MiB for a {X.nbytes / 2**20:.1f} MiB chunk"


# ---- 7. the estimator registry


def test_a_subclass_without_its_own_init_can_be_defined():
    # Found by review (fixed): MixtureEstimator.__init_subclass__ reads cls.__init__'s signature, which for a subclass
    # without __init__ is the parent's already extended one, and appends the common parameters again:
    # "ValueError: duplicate parameter name: 'tol'" at class definition (class MyGM(GaussianMixture): ...).
    # Fix: extend only when "__init__" in cls.__dict__ (the inherited signature is already complete).
    sub = type("ReviewSubclassedGaussianMixture", (GaussianMixture,), {"extra_method": lambda self: 1})
    assert sub(2).get_params() == GaussianMixture(2).get_params()


@pytest.mark.parametrize("attr, value", [("family", "poisson"), ("family", "no-such-family"), ("model_class", "_ProbsMixture")])
def test_a_model_file_naming_another_family_or_a_base_class_is_refused(attr, value, tmp_path):
    # Found by review (fixed): load_model never reads the file's "family" (a Bernoulli model relabelled "poisson" or an
    # unknown family loads silently), and the registry holds the private base _ProbsMixture (a file
    # naming it loads an estimator of the abstract family, which cannot predict). Fix: compare
    # ds.attrs["family"] with cls.family_class.name; register only public classes with a family name.
    X = (np.random.RandomState(0).rand(100, 3) < 0.5).astype(np.float64)
    path = tmp_path / "b.zarr"
    BernoulliMixture(2, max_iter=3, random_state=0).fit(X).save(path)
    zarr.open_group(path, mode="r+").attrs[attr] = value
    with pytest.raises(ValueError, match=value):
        streamem.load(path)


# ---- 8. small ones: errors of the wrong type


@pytest.mark.parametrize("make", [lambda: BinomialMixture(2, n_trials=float("inf")), lambda: CategoricalMixture(2, n_categories=np.inf)],
                         ids=["n_trials", "n_categories"])
def test_infinite_counts_setting_is_a_value_error(make):
    # Found by review (fixed): estimators/discrete.py _check_counts accepts inf (inf == round(inf)); the fit then dies in
    # families/discrete.py _per_feature with "OverflowError: cannot convert float infinity to integer".
    X = np.random.RandomState(0).binomial(3, 0.5, (50, 2)).astype(np.float64)
    with pytest.raises(ValueError, match="n_trials|n_categories"):
        make().fit(X)


def test_cli_empty_npy_file_exits_2(tmp_path, capsys):
    # Found by review (fixed): cli._load_npy catches OSError/ValueError, but np.load of an empty (e.g. truncated) file
    # raises EOFError: a traceback and exit 1 instead of one line naming --weights-init, exit 2.
    data = _store(tmp_path / "x.zarr", _poisson_data(200), 64)
    empty = tmp_path / "w.npy"
    empty.write_bytes(b"")
    code = main(["fit", data, "--out", str(tmp_path / "m.zarr"), "--family", "poisson", "--n-components", "2",
                 "--weights-init", str(empty), "--workers", "0", "-q"])
    assert code == 2
    assert "--weights-init" in capsys.readouterr().err


# ======================================================================== what works


def _poisson_em(X, w, r, n_iter):
    """Textbook Poisson mixture EM in numpy."""
    for _ in range(n_iter):
        log_p = X @ np.log(r).T - r.sum(axis=1) - gammaln(X + 1).sum(axis=1)[:, None] + np.log(w)
        resp = np.exp(log_p - logsumexp(log_p, axis=1)[:, None])
        nk = resp.sum(axis=0) + 10 * np.finfo(float).eps
        w, r = nk / nk.sum(), (resp.T @ X) / nk[:, None]
    return w, r


def _binomial_em(X, w, p, n, n_iter):
    """Textbook Binomial mixture EM in numpy (binomial coefficients are common to all components)."""
    for _ in range(n_iter):
        log_p = X @ np.log(p).T + (n - X) @ np.log(1 - p).T + np.log(w)
        resp = np.exp(log_p - logsumexp(log_p, axis=1)[:, None])
        nk = resp.sum(axis=0) + 10 * np.finfo(float).eps
        w, p = nk / nk.sum(), (resp.T @ X) / (nk[:, None] * n)
    return w, p


def test_poisson_billion_counts_from_int64_store_in_one_row_chunks(tmp_path):
    rng = np.random.RandomState(3)
    z = _two_groups(120, 3)
    X = rng.poisson(np.where(z[:, None], 1.0e9, 1.0e9 + 2.0e5), (120, 2)).astype(np.int64)
    path = _store(tmp_path / "p.zarr", X, 1)
    w0, r0 = np.array([0.5, 0.5]), np.array([[0.99e9, 0.99e9], [1.01e9, 1.01e9]])
    model = PoissonMixture(2, weights_init=w0, rates_init=r0, max_iter=8, tol=0).fit(path)
    w, r = _poisson_em(X.astype(np.float64), w0, r0, 8)
    assert_allclose(model.weights_, w, rtol=1e-8)
    assert_allclose(model.rates_, r, rtol=1e-10)


def test_binomial_million_trials_uint32_store_unaligned_chunks(tmp_path):
    rng = np.random.RandomState(4)
    z = _two_groups(300, 4)
    X = rng.binomial(10**6, np.where(z[:, None], 0.3, 0.31), (300, 2)).astype(np.uint32)
    path = _store(tmp_path / "b.zarr", X, 77)
    w0, p0 = np.array([0.5, 0.5]), np.array([[0.29, 0.29], [0.32, 0.32]])
    model = BinomialMixture(2, n_trials=10**6, weights_init=w0, probs_init=p0, max_iter=6, tol=0).fit(path)
    w, p = _binomial_em(X.astype(np.float64), w0, p0, 1.0e6, 6)
    assert_allclose(model.weights_, w, rtol=1e-8)
    assert_allclose(model.probs_, p, rtol=1e-10)


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "float32"])
def test_bernoulli_dtypes_give_the_same_fit(dtype, tmp_path):
    rng = np.random.RandomState(5)
    X = rng.rand(400, 5) < np.where(_two_groups(400, 5)[:, None], 0.2, 0.8)
    path = _store(tmp_path / "x.zarr", X.astype(dtype), 1000)  # one chunk larger than the data
    ref = BernoulliMixture(2, max_iter=10, random_state=0).fit(X.astype(np.float64))
    model = BernoulliMixture(2, max_iter=10, random_state=0).fit(path)
    assert_allclose(model.probs_, ref.probs_, rtol=1e-12)


def test_categorical_float_codes_per_feature_xarray_roundtrip_and_update(tmp_path):
    rng = np.random.RandomState(6)
    cats = [3, 2, 5]
    X = np.stack([rng.randint(0, c, 500) for c in cats], axis=1).astype(np.float32)
    xa = xr.DataArray(X, dims=("row", "var"), coords={"var": ["a", "b", "c"]}).chunk({"row": 130})
    model = CategoricalMixture(2, n_categories=cats, prior="default", max_iter=5, random_state=0).fit(xa)
    assert model.probs_.shape == (2, 3, 5)
    assert np.all(model.probs_[:, 1, 2:] == 0) and np.all(model.probs_[:, 0, 3:] == 0)
    model.save(tmp_path / "c.zarr")
    loaded = streamem.load(tmp_path / "c.zarr")
    shuffled = xa.isel(var=[2, 0, 1])  # matched by label, not position
    assert_allclose(loaded.predict_proba(shuffled).values, model.predict_proba(xa).values, rtol=1e-12)
    loaded.update(shuffled)
    loaded.save(tmp_path / "c.zarr", overwrite=True)
    again = streamem.load(tmp_path / "c.zarr")
    assert again.n_rows_seen_ == 1000
    assert_allclose(again.probs_.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("algorithm", ["stepwise", "incremental"])
def test_nan_in_an_online_pass_is_named(algorithm):
    X = (np.random.RandomState(7).rand(300, 4) < 0.4).astype(np.float64)
    X[150, 2] = np.nan
    # The family's check sees every chunk of the initialisation's sample pass first: it names the row.
    with pytest.raises(ValueError, match="BernoulliMixture: values must be 0 or 1; got nan in row 150"):
        BernoulliMixture(2, algorithm=algorithm, max_iter=2, random_state=0).fit(da.from_array(X, chunks=(100, 4)))


def test_empty_chunk_changes_nothing():
    X = _poisson_data(300, 8)
    with_empty = da.concatenate([da.from_array(X[:100], chunks=(100, 3)), da.zeros((0, 3), chunks=(0, 3)),
                                 da.from_array(X[100:], chunks=(200, 3))])
    a = PoissonMixture(2, max_iter=5, random_state=0).fit(with_empty)
    b = PoissonMixture(2, max_iter=5, random_state=0).fit(X)
    assert_allclose(a.rates_, b.rates_, rtol=1e-12)


def test_more_components_than_distinct_rows_stay_finite():
    X = np.array([[0, 1, 1], [1, 0, 0]] * 50, dtype=np.float64)
    for init in ("kmeans", "k-means++", "random", "random_from_data"):
        model = CategoricalMixture(4, init_params=init, max_iter=10, random_state=0).fit(X)
        assert np.isfinite(model.lower_bound_) and np.isfinite(model.predict_proba(X)).all()


def test_fixed_weights_follow_permutation_through_save_load_update(tmp_path):
    X = _poisson_data(600, 9)
    model = PoissonMixture(2, learn_weights=False, weights_init=[0.3, 0.7], max_iter=20, random_state=0).fit(X)
    rates = model.rates_.copy()
    model.permute_components([1, 0])
    assert_array_equal(model.weights_, [0.7, 0.3])
    assert_array_equal(model.rates_, rates[[1, 0]])
    model.save(tmp_path / "p.zarr")
    loaded = streamem.load(tmp_path / "p.zarr").update(X[:100])
    assert_array_equal(loaded.weights_, [0.7, 0.3])
    assert loaded._family().n_parameters(2, 3) == 6  # weights are not free parameters


def test_sample_shapes_and_information_criteria_count_by_hand():
    X = np.random.RandomState(10).randint(0, [3, 2, 5], (200, 3)).astype(np.float64)
    model = CategoricalMixture(3, n_categories=[3, 2, 5], max_iter=5, random_state=0).fit(X)
    S, y = model.sample(11)
    assert S.shape == (11, 3) and y.shape == (11,) and y.dtype.kind == "i"
    assert np.all(S.max(axis=0) <= [2, 1, 4]) and np.all(S == np.round(S))
    n_params = 3 * ((3 - 1) + (2 - 1) + (5 - 1)) + 2
    total = model.score(X) * 200
    assert_allclose(model.bic(X), -2 * total + n_params * np.log(200), rtol=1e-12)
    assert_allclose(model.aic(X), -2 * total + 2 * n_params, rtol=1e-12)


def test_incremental_memory_refusal_counts_categories():
    dX = da.zeros((2_000_000, 20), chunks=(100_000, 20))
    model = CategoricalMixture(50, n_categories=1000, algorithm="incremental", batch_size=1)
    with pytest.raises(ValueError, match="algorithm='incremental' keeps one set of statistics"):
        model._check_online_memory(streamem.load_data(dX))


def test_concurrent_saves_leave_one_complete_model(tmp_path):
    model = PoissonMixture(2, max_iter=5, random_state=0).fit(_poisson_data(200, 11))
    path = tmp_path / "same.zarr"
    errors: list[BaseException] = []

    def save() -> None:
        try:
            model.save(path, overwrite=True)
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == ["same.zarr"]
    assert_array_equal(streamem.load(path).rates_, model.rates_)


def test_old_gaussian_model_file_loads_updates_and_saves(tmp_path):
    model = streamem.load(FIXTURE_MODEL)
    assert type(model) is GaussianMixture and model.prior_ is None and model.learn_weights is True
    attrs = json.loads(json.dumps(dict(zarr.open_group(FIXTURE_MODEL, mode="r").attrs)))
    assert "family" not in attrs  # written before families existed
    X = np.random.RandomState(12).randn(300, model.n_features_in_) + model.means_[0]
    model.update(X)
    model.save(tmp_path / "new.zarr")
    again = streamem.load(tmp_path / "new.zarr")
    assert_allclose(again.means_, model.means_, rtol=0, atol=0)
