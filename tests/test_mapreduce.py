"""Map-reduce EM iterations: ``streamem accumulate`` per shard, ``streamem reduce`` (issue 4, item 6).

Summing the shards' statistics and doing the M-step is one EM iteration over
all rows: the reference is scikit-learn's GaussianMixture started from the
old model's parameters with ``max_iter=1``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

import streamem
from streamem.mapreduce import accumulate, reduce_stats, write_stats
from workflow_helpers import COVARIANCE_TYPES, check_ok, check_usage_error, cli_main, inits, mixture_sample, quiet_fit, sklearn_fit, sklearn_from, write_zarr

N_ROWS = 6000
CHUNK_ROWS = 700
#: Shard boundaries deliberately not on chunk boundaries; together they cover all rows.
SHARDS = ("0:2000", "2000:4100", "4100:6000")
#: The shards the command line writes: the first on the shared cluster, the second with Dask's threads.
CLI_SHARDS = ("0:3300", "3300:6000")
NO_CLUSTER = ("--workers", 0)
RTOL = 1e-10


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=41, spread=0.5)


@pytest.fixture(scope="module")
def data_path(X, tmp_path_factory) -> str:
    return write_zarr(tmp_path_factory.mktemp("mr") / "data.zarr", X, CHUNK_ROWS)


def _old_model(X, covariance_type: str) -> streamem.GaussianMixture:
    """A model a few iterations into a fit (so one more iteration still changes it)."""
    return quiet_fit(
        streamem.GaussianMixture(n_components=3, covariance_type=covariance_type, tol=0, max_iter=3, reg_covar=1e-4, **inits(covariance_type)),
        X,
    )


def _one_sklearn_iteration(old, X):
    return sklearn_fit(
        X,
        n_components=old.n_components,
        covariance_type=old.covariance_type,
        reg_covar=old.reg_covar,
        weights_init=old.weights_,
        means_init=old.means_,
        precisions_init=old.precisions_,
        max_iter=1,
        tol=0,
    )


def _assert_one_iteration(new, old, X):
    ref = _one_sklearn_iteration(old, X)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        a, b = getattr(new, name), getattr(ref, name)
        assert_allclose(a, b, rtol=RTOL, atol=RTOL * 1e-6 * np.abs(b).max(), err_msg=name)
    # sklearn's lower bound after one iteration is the mean log-likelihood under the starting parameters.
    assert_allclose(new.lower_bound_, ref.lower_bound_, rtol=RTOL, atol=0)
    assert_allclose(new.lower_bound_, old.score(X), rtol=RTOL, atol=0)
    assert new.n_iter_ == old.n_iter_ + 1
    assert list(new.lower_bounds_[:-1]) == list(old.lower_bounds_) and len(new.lower_bounds_) == old.n_iter_ + 1
    assert new.converged_ == (abs(new.lower_bound_ - old.lower_bound_) < old.tol)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_accumulate_and_reduce_in_process(X, data_path, covariance_type, tmp_path):
    old = _old_model(X, covariance_type)
    paths = []
    for i, rows in enumerate(reversed(SHARDS)):  # the order of the shards does not matter
        path = tmp_path / f"s{i}.zarr"
        write_stats(accumulate(old, data_path, rows=rows), path)
        paths.append(path)
    new = reduce_stats(old, paths)
    _assert_one_iteration(new, old, X)
    # The old model is not changed by the reduction.
    assert old.n_iter_ == 3


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def cli_shards(X, data_path, tmp_path_factory, scheduler_flags):
    """The old model saved, and its two shards written by ``streamem accumulate`` (in process: cli_main)."""
    root = tmp_path_factory.mktemp("cli-mr")
    old = _old_model(X, "full")
    model_path = root / "old.zarr"
    old.save(model_path)
    shards = []
    for i, (rows, where) in enumerate(zip(CLI_SHARDS, (scheduler_flags, NO_CLUSTER))):
        out = root / f"s{i}.zarr"
        check_ok(cli_main("accumulate", model_path, data_path, "--rows", rows, "--out", out, *where, "--quiet"))
        shards.append(out)
    return root, model_path, shards


def test_cli_accumulate_writes_each_shards_rows(cli_shards, data_path):
    import xarray as xr

    _, model_path, shards = cli_shards
    assert len(shards) == len(CLI_SHARDS)
    for path, rows in zip(shards, CLI_SHARDS):
        ds = xr.open_zarr(path, consolidated=False)
        start, stop = map(int, rows.split(":"))
        assert json.loads(ds.attrs["rows"]) == [start, stop]
        assert float(ds["n"]) == stop - start
    # The statistics sum to the whole data's: rows and log-likelihood under the old model.
    old = streamem.load(model_path)
    X = streamem.load_data(data_path).array.compute()
    total = sum(float(xr.open_zarr(p, consolidated=False)["loglik"]) for p in shards)
    assert_allclose(total, sklearn_from(old).score_samples(X).sum(), rtol=1e-10)


def test_cli_reduce_equals_one_em_iteration(cli_shards, X, tmp_path):
    _, model_path, shards = cli_shards
    out = tmp_path / "new.zarr"
    check_ok(cli_main("reduce", *shards, "--model", model_path, "--out", out, "--quiet"))
    new = streamem.load(out)
    old = streamem.load(model_path)
    _assert_one_iteration(new, old, X)


def test_cli_reduce_refuses_shards_of_another_model(cli_shards, X, data_path, tmp_path):
    root, model_path, shards = cli_shards
    other = streamem.load(model_path)
    other.means_ = other.means_ + 1e-9  # a different model, however slightly
    foreign = tmp_path / "foreign.zarr"
    write_stats(accumulate(other, data_path, rows=CLI_SHARDS[1]), foreign)
    proc = cli_main("reduce", shards[0], foreign, "--model", model_path, "--out", tmp_path / "new.zarr")
    check_usage_error(proc, "another model")
    assert not (tmp_path / "new.zarr").exists()


def test_reduce_refuses_overlapping_and_missing_rows(cli_shards, data_path, tmp_path):
    _, model_path, shards = cli_shards
    old = streamem.load(model_path)
    overlapping = tmp_path / "overlap.zarr"
    write_stats(accumulate(old, data_path, rows="3000:6000"), overlapping)
    with pytest.raises(ValueError, match="overlap"):
        reduce_stats(old, [shards[0], overlapping])
    with pytest.raises(ValueError, match="overlap"):
        reduce_stats(old, [shards[0], shards[0], shards[1]])
    with pytest.raises(ValueError, match="missing"):
        reduce_stats(old, [shards[1]])
    # A gap in the middle (rows 3000:3300).
    first, gap_filler = tmp_path / "first.zarr", tmp_path / "late.zarr"
    write_stats(accumulate(old, data_path, rows="0:3000"), first)
    write_stats(accumulate(old, data_path, rows="3300:6000"), gap_filler)
    with pytest.raises(ValueError, match="missing"):
        reduce_stats(old, [first, gap_filler])
    # A shard that does not exist at all.
    with pytest.raises(FileNotFoundError):
        reduce_stats(old, [shards[0], tmp_path / "nope.zarr"])


def test_cli_reduce_refuses_missing_rows(cli_shards, tmp_path):
    _, model_path, shards = cli_shards
    proc = cli_main("reduce", shards[1], "--model", model_path, "--out", tmp_path / "new.zarr")
    # reduce_stats promises "a ValueError naming the missing rows": rows 0 to 3300.
    check_usage_error(proc, "3300")
    assert not (tmp_path / "new.zarr").exists()


# ---------------------------------------------- issue 13: (feature, time) stores
def _write_feature_time_store(path, X: np.ndarray, chunk_rows: int) -> str:
    """``X`` as variable ``obs`` of an xarray Dataset in Zarr, stored with dims (feature, time)."""
    import pandas as pd
    import xarray as xr

    times = pd.date_range("2024-05-01", periods=len(X), freq="10s")
    ds = xr.Dataset({"obs": (("feature", "time"), X.T.copy())}, coords={"time": times}).chunk({"time": chunk_rows})
    ds.to_zarr(path, zarr_format=3, consolidated=False)
    return str(path)


def _stats_values(path) -> dict:
    import xarray as xr

    ds = xr.open_zarr(path, consolidated=False)
    return {name: ds[name].values for name in ds.data_vars}


def test_accumulate_feature_time_store_with_sample_dim(cli_shards, X, data_path, tmp_path):
    _, model_path, shards = cli_shards
    store = _write_feature_time_store(tmp_path / "obs.zarr", X, 900)
    old = streamem.load(model_path)
    # In process: the same statistics as from the (sample, feature) array.
    reference = accumulate(old, data_path, rows=CLI_SHARDS[1])
    ds = accumulate(old, store, rows=CLI_SHARDS[1], variable="obs", sample_dim="time")
    for name in reference.data_vars:
        assert_allclose(ds[name].values, reference[name].values, rtol=1e-12, err_msg=name)
    # The command line: --variable and --sample-dim.
    out = tmp_path / "s1.zarr"
    check_ok(cli_main("accumulate", model_path, store, "--variable", "obs", "--sample-dim", "time", "--rows", CLI_SHARDS[1],
                      "--out", out, *NO_CLUSTER, "--quiet"))  # fmt: skip
    expected = _stats_values(shards[1])
    for name, value in _stats_values(out).items():
        assert_allclose(value, expected[name], rtol=1e-12, err_msg=name)
    # Without --sample-dim the first dimension (feature) would be the samples: 3 rows of 6000 features.
    proc = cli_main("accumulate", model_path, store, "--variable", "obs", "--out", tmp_path / "bad.zarr", *NO_CLUSTER, "--quiet")
    check_usage_error(proc, "6000 features", "3")


# ------------------------------------------- issue 13: shards of one data set only
def test_reduce_refuses_shards_of_different_data_of_the_same_shape(cli_shards, X, tmp_path):
    _, model_path, _ = cli_shards
    old = streamem.load(model_path)
    other_path = write_zarr(tmp_path / "other.zarr", mixture_sample(N_ROWS, seed=42, spread=0.5), CHUNK_ROWS)
    ours_path = write_zarr(tmp_path / "ours.zarr", X, CHUNK_ROWS)
    first, second = tmp_path / "first.zarr", tmp_path / "second.zarr"
    write_stats(accumulate(old, ours_path, rows="0:3000"), first)
    write_stats(accumulate(old, other_path, rows="3000:6000"), second)
    with pytest.raises(ValueError, match="different data") as info:
        reduce_stats(old, [first, second])
    assert "ours.zarr" in str(info.value) and "other.zarr" in str(info.value)
    # The command line: one line, exit 2, nothing written.
    proc = cli_main("reduce", first, second, "--model", model_path, "--out", tmp_path / "new.zarr")
    check_usage_error(proc, "ours.zarr", "other.zarr")
    assert not (tmp_path / "new.zarr").exists()


def test_reduce_refuses_shards_of_a_store_rewritten_with_another_dtype(cli_shards, X, tmp_path):
    _, model_path, _ = cli_shards
    old = streamem.load(model_path)
    path = tmp_path / "data.zarr"
    first, second = tmp_path / "first.zarr", tmp_path / "second.zarr"
    write_stats(accumulate(old, write_zarr(path, X, CHUNK_ROWS), rows="0:3000"), first)
    import shutil

    shutil.rmtree(path)
    write_stats(accumulate(old, write_zarr(path, X.astype(np.float32), CHUNK_ROWS), rows="3000:6000"), second)
    with pytest.raises(ValueError, match="float32"):
        reduce_stats(old, [first, second])


def test_reduce_accepts_one_store_spelt_differently(cli_shards, X, data_path, tmp_path, monkeypatch):
    import os

    _, model_path, _ = cli_shards
    old = streamem.load(model_path)
    store = write_zarr(tmp_path / "data.zarr", X, CHUNK_ROWS)
    os.symlink(store, tmp_path / "link.zarr")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    spellings = {
        "0:1500": store,  # absolute
        "1500:3000": os.path.join("..", "data.zarr"),  # relative to the working directory
        "3000:4500": str(tmp_path / "sub" / ".." / "data.zarr") + os.sep,  # "..", and a trailing slash
        "4500:6000": str(tmp_path / "link.zarr"),  # a symbolic link to it
    }
    paths = []
    for i, (rows, spelling) in enumerate(spellings.items()):
        paths.append(tmp_path / f"s{i}.zarr")
        write_stats(accumulate(old, spelling, rows=rows), paths[-1])
    new = reduce_stats(old, paths)
    _assert_one_iteration(new, old, X)
