"""Model files: ``model.save(path)`` / ``streamem.load(path)`` (issue 4, item 1).

A model store is an xarray Dataset in a Zarr v3 store, without pickle; it
round-trips every fitted attribute exactly, carries provenance, and loading
anything else (or a damaged store) is a ValueError.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose, assert_array_equal

import streamem
from streamem.io import open_dataset, write_dataset
from workflow_helpers import COVARIANCE_TYPES, PARAM_ATTRS, inits, mixture_sample, pickle_traces, quiet_fit, sklearn_from

N_ROWS = 3000
#: Estimator settings that a loaded model must carry (arrays and clients are not stored).
STORED_SETTINGS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params", "random_state", "init_sample_size")


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(N_ROWS, seed=11)


@pytest.fixture(scope="module")
def X_new() -> np.ndarray:
    return mixture_sample(700, seed=12)


def _fit(X, covariance_type: str, **extra) -> streamem.GaussianMixture:
    params = dict(n_components=3, covariance_type=covariance_type, tol=0, max_iter=6, reg_covar=1e-5, random_state=4)
    params.update(inits(covariance_type))
    params.update(extra)
    return quiet_fit(streamem.GaussianMixture(**params), X)


@pytest.fixture(scope="module", params=COVARIANCE_TYPES)
def fitted(request, X) -> streamem.GaussianMixture:
    return _fit(X, request.param)


@pytest.fixture(scope="module")
def xr_model(X) -> tuple[streamem.GaussianMixture, xr.DataArray]:
    """A model fitted on an xarray DataArray (time, band) with band = r, g, b."""
    arr = xr.DataArray(
        X,
        dims=("time", "band"),
        coords={"time": pd.date_range("2024-01-01", periods=len(X), freq="min"), "band": ["r", "g", "b"]},
    ).chunk({"time": 1000})
    return _fit(arr, "full"), arr


# ------------------------------------------------------------------ round trip
def test_round_trip_is_exact(fitted, X, X_new, tmp_path):
    path = tmp_path / "model.zarr"
    fitted.save(path)
    loaded = streamem.load(path)

    assert type(loaded) is type(fitted)
    for name in PARAM_ATTRS:
        assert_array_equal(getattr(loaded, name), getattr(fitted, name), err_msg=name)
        assert np.asarray(getattr(loaded, name)).dtype == np.float64, name
    assert loaded.n_iter_ == fitted.n_iter_ == 6
    assert loaded.converged_ is fitted.converged_ is False
    assert loaded.lower_bound_ == fitted.lower_bound_
    assert list(loaded.lower_bounds_) == list(fitted.lower_bounds_)
    assert loaded.n_features_in_ == fitted.n_features_in_ == 3
    for name in STORED_SETTINGS:
        assert loaded.get_params()[name] == fitted.get_params()[name], name

    for data in (X, X_new):
        assert_array_equal(loaded.predict(data), fitted.predict(data))
        assert_array_equal(loaded.predict_proba(data), fitted.predict_proba(data))
        assert_array_equal(loaded.score_samples(data), fitted.score_samples(data))
        assert loaded.score(data) == fitted.score(data)
    # And scikit-learn, given the loaded parameters, computes the same densities.
    assert_allclose(loaded.score_samples(X_new), sklearn_from(fitted).score_samples(X_new), rtol=1e-10)
    assert_allclose(loaded.predict_proba(X_new), sklearn_from(fitted).predict_proba(X_new), rtol=1e-8, atol=1e-12)


def test_store_is_an_xarray_dataset_with_provenance(xr_model, tmp_path):
    model, arr = xr_model
    path = tmp_path / "model.zarr"
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    model.save(path)
    after = datetime.now(timezone.utc) + timedelta(seconds=2)

    ds = xr.open_zarr(path, consolidated=False)
    assert {"component", "feature"} <= set(ds.sizes)
    assert ds.sizes["component"] == 3 and ds.sizes["feature"] == 3
    assert ds["means"].dims == ("component", "feature")
    assert ds["weights"].dims == ("component",)
    assert ds["feature"].values.tolist() == ["r", "g", "b"]
    assert_array_equal(ds["means"].values, model.means_)
    assert_array_equal(ds["weights"].values, model.weights_)
    # The convergence curve is a variable, one value per iteration.
    assert "lower_bounds" in ds.data_vars
    assert_array_equal(ds["lower_bounds"].values, model.lower_bounds_)
    assert ds["lower_bounds"].size == model.n_iter_ == 6

    attrs = ds.attrs
    for key in ("streamem_version", "model_class", "params", "data_source", "data_shape", "fit_date", "n_iter", "converged", "format_version"):
        assert key in attrs, f"attribute {key!r} missing; have {sorted(attrs)}"
    assert attrs["streamem_version"] == streamem.__version__
    assert attrs["model_class"] == "GaussianMixture"
    params = json.loads(attrs["params"])
    assert params["n_components"] == 3 and params["covariance_type"] == "full"
    assert params["tol"] == 0 and params["max_iter"] == 6 and params["reg_covar"] == 1e-5 and params["random_state"] == 4
    assert list(attrs["data_shape"]) == [N_ROWS, 3]
    assert isinstance(attrs["data_source"], str)
    assert before <= datetime.fromisoformat(attrs["fit_date"]) <= after
    assert attrs["n_iter"] == 6
    assert attrs["converged"] is False
    assert isinstance(attrs["format_version"], int) and attrs["format_version"] >= 1

    loaded = streamem.load(path)
    assert list(loaded.feature_coord_) == ["r", "g", "b"]
    # Predictions on xarray input keep the sample coordinate.
    labels = loaded.predict(arr)
    assert isinstance(labels, xr.DataArray) and labels.dims == ("time",)
    assert_array_equal(labels["time"].values, arr["time"].values)
    assert_array_equal(labels.values, model.predict(arr.values))


def test_feature_names_round_trip(X, tmp_path):
    frame = pd.DataFrame(X, columns=["alpha", "beta", "gamma"])
    model = _fit(frame, "diag")
    model.save(tmp_path / "m.zarr")
    loaded = streamem.load(tmp_path / "m.zarr")
    assert list(loaded.feature_names_in_) == ["alpha", "beta", "gamma"]
    assert_array_equal(loaded.predict(frame), model.predict(frame))


def test_no_pickle_in_the_store(xr_model, tmp_path):
    model, _ = xr_model
    path = tmp_path / "model.zarr"
    model.save(path)
    assert pickle_traces(path) == []
    # Every array has a plain numeric or string dtype (fixed or variable width), never object.
    group = zarr.open_group(path, mode="r")
    names = []
    for name, array in group.arrays():
        names.append(name)
        assert array.dtype.kind in "biufUST", f"{name} has dtype {array.dtype}"
    assert {"weights", "means", "covariances", "lower_bounds"} <= set(names)
    # The detector itself finds a pickle (the check can fail).
    shutil.copytree(path, tmp_path / "copy.zarr")
    with open(tmp_path / "copy.zarr" / "extra", "wb") as fh:
        fh.write(pickle.dumps({"means": model.means_}, protocol=4))
    assert pickle_traces(tmp_path / "copy.zarr") == ["extra"]


# -------------------------------------------------------------------- refusals
def _plain_zarr_array(path):
    zarr.create_array(path, shape=(10, 3), chunks=(5, 3), dtype="float64", zarr_format=3)[...] = np.ones((10, 3))


def _xarray_without_attributes(path):
    xr.Dataset({"means": (("component", "feature"), np.zeros((3, 3))), "weights": (("component",), np.ones(3) / 3)}).to_zarr(
        path, zarr_format=3, consolidated=False
    )


def _empty_directory(path):
    os.makedirs(path)


def _statistics_store(path):
    from streamem.mapreduce import accumulate, write_stats

    model = _fit(mixture_sample(300, seed=3), "full", max_iter=1)
    write_stats(accumulate(model, mixture_sample(300, seed=3)), path)


@pytest.mark.parametrize("make", [_plain_zarr_array, _xarray_without_attributes, _empty_directory, _statistics_store])
def test_load_refuses_what_is_not_a_model(make, tmp_path):
    path = os.fspath(tmp_path / "thing.zarr")
    make(path)
    with pytest.raises(ValueError):
        streamem.load(path)


def test_load_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        streamem.load(tmp_path / "nothing.zarr")


@pytest.fixture(scope="module")
def full_model(X) -> streamem.GaussianMixture:
    return _fit(X, "full")


@pytest.mark.parametrize("variable", ["means", "covariances", "lower_bounds"])
def test_load_refuses_a_store_with_missing_chunks(full_model, variable, tmp_path):
    """A store whose variable lost its chunk files (an interrupted copy, say) is not silently filled in."""
    path = tmp_path / "model.zarr"
    full_model.save(path)
    chunk_dir = path / variable / "c"
    assert chunk_dir.is_dir()
    shutil.rmtree(chunk_dir)
    with pytest.raises(ValueError):
        loaded = streamem.load(path)
        # Only reached when load did not refuse: show what it made of the gap.
        print(f"loaded {variable}:", getattr(loaded, variable + "_", None))


def test_load_refuses_a_store_missing_a_variable(fitted, tmp_path):
    path = tmp_path / "model.zarr"
    fitted.save(path)
    shutil.rmtree(path / "precisions_cholesky")
    with pytest.raises(ValueError):
        streamem.load(path)


def test_load_refuses_a_corrupt_chunk(fitted, tmp_path):
    path = tmp_path / "model.zarr"
    fitted.save(path)
    chunks = [os.path.join(d, f) for d, _, files in os.walk(path / "means" / "c") for f in files]
    assert chunks
    for chunk in chunks:
        with open(chunk, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.truncate(size // 2)
    with pytest.raises(ValueError):
        streamem.load(path)


def test_load_refuses_a_newer_format(fitted, tmp_path):
    path = tmp_path / "model.zarr"
    fitted.save(path)
    group = zarr.open_group(path, mode="r+")
    assert group.attrs["format_version"] >= 1
    group.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="(?i)upgrad"):
        streamem.load(path)


# ------------------------------------------------------------- overwrite rules
def _entries(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_existing_path_refused_then_replaced_with_overwrite(X, tmp_path):
    first = _fit(X, "full")
    second = _fit(X, "diag", max_iter=3)
    path = tmp_path / "model.zarr"
    first.save(path)
    with pytest.raises(FileExistsError):
        second.save(path)
    with pytest.raises(FileExistsError):
        second.save(path, overwrite=False)
    assert_array_equal(streamem.load(path).means_, first.means_)
    assert streamem.load(path).covariance_type == "full"

    second.save(path, overwrite=True)
    loaded = streamem.load(path)
    assert loaded.covariance_type == "diag" and loaded.n_iter_ == 3
    assert_array_equal(loaded.covariances_, second.covariances_)
    # No temporary or backup stores left beside the model.
    assert _entries(tmp_path) == ["model.zarr"]


def test_failed_overwrite_keeps_the_old_store(X, tmp_path, monkeypatch):
    first = _fit(X, "spherical")
    second = _fit(X, "tied")
    path = tmp_path / "model.zarr"
    first.save(path)

    original = xr.Dataset.to_zarr

    def write_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", write_then_fail)
    with pytest.raises(OSError):
        second.save(path, overwrite=True)
    monkeypatch.undo()

    loaded = streamem.load(path)
    assert loaded.covariance_type == "spherical"
    assert_array_equal(loaded.means_, first.means_)
    assert _entries(tmp_path) == ["model.zarr"]


def test_save_into_a_missing_directory(fitted, tmp_path):
    with pytest.raises(FileNotFoundError):
        fitted.save(tmp_path / "no" / "such" / "model.zarr")
    assert _entries(tmp_path) == []


def test_numpy_scalar_and_dtype_settings_round_trip(X, tmp_path):
    """Estimator settings given as numpy scalars or a dtype are stored as what they mean, not dropped."""
    model = _fit(X, "diag", n_components=np.int64(3), tol=np.float32(1e-3), random_state=np.int64(7), dtype=np.dtype("float32"))
    model.save(tmp_path / "model.zarr")
    loaded = streamem.load(tmp_path / "model.zarr")
    assert loaded.random_state == 7 and loaded.dtype == "float32" and loaded.n_components == 3
    assert loaded.tol == float(np.float32(1e-3))
    assert_array_equal(loaded.predict(X), model.predict(X))


# ------------------------------------------------- atomic overwrite under concurrency (issue 13, item 20)
#: A format overwrite=True may replace (a store of streamem's own; issue 13, item 2).
VERSIONED = "streamem-predictions"


def _version_store(version: int) -> xr.Dataset:
    return xr.Dataset({"v": ("x", np.full(64, version, dtype=np.int64))}, attrs={"version": version})


def _read_version(path) -> int:
    """The version of the store at ``path``, checked complete (format, checksums)."""
    ds = open_dataset(path, VERSIONED)
    assert (ds["v"].values == ds.attrs["version"]).all()
    return int(ds.attrs["version"])


def _run_concurrently(path, writers: list, n_readers: int = 2, seconds: float = 6.0) -> dict:
    """Writers (callables) in threads while readers poll ``path``; returns what readers and writers met."""
    stop = threading.Event()
    seen: dict = {"checks": 0, "missing": 0, "opens": 0, "versions": set(), "errors": []}

    def read():
        while not stop.is_set():
            seen["checks"] += 1
            if not os.path.exists(path):
                seen["missing"] += 1
            elif seen["checks"] % 20 == 0:  # opening costs ~100 times a check
                seen["opens"] += 1
                try:
                    seen["versions"].add(_read_version(path))
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    seen["errors"].append(repr(exc))

    def write(job):
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            seen["errors"].append(f"writer: {exc!r}")

    readers = [threading.Thread(target=read) for _ in range(n_readers)]
    threads = [threading.Thread(target=write, args=(job,)) for job in writers]
    for t in readers + threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for t in readers:
        t.join()
    assert not any(t.is_alive() for t in threads), "writers did not finish in time"
    return seen


def test_concurrent_overwrites_always_leave_an_old_or_new_store(tmp_path):
    path = tmp_path / "store.zarr"
    write_dataset(_version_store(0).assign_attrs(format=VERSIONED, format_version=1), path, overwrite=False)

    def writer(first):
        def job():
            for version in range(first, first + 10):
                write_dataset(_version_store(version).assign_attrs(format=VERSIONED, format_version=1), path, overwrite=True)
        return job

    seen = _run_concurrently(path, [writer(100 * w) for w in (1, 2, 3)])
    assert not seen["errors"], seen["errors"][:5]
    assert seen["missing"] == 0, f"no store at the path in {seen['missing']} of {seen['checks']} checks"
    assert seen["checks"] > 200 and seen["opens"] > 10 and len(seen["versions"]) > 1
    assert _read_version(path) in {109, 209, 309}  # a writer's last version
    assert _entries(tmp_path) == ["store.zarr"]  # no .tmp-* or .old-* left


def test_concurrent_creates_one_wins_the_others_are_refused(tmp_path):
    path = tmp_path / "store.zarr"
    results: list = []
    start = threading.Barrier(4)

    def create(version):
        start.wait()
        try:
            write_dataset(_version_store(version).assign_attrs(format=VERSIONED, format_version=1), path, overwrite=False)
            results.append(version)
        except FileExistsError:
            results.append("refused")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results.append(repr(exc))

    threads = [threading.Thread(target=create, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r != "refused"]
    assert len(results) == 4 and len(winners) == 1, results
    assert _read_version(path) == winners[0]
    assert _entries(tmp_path) == ["store.zarr"]


def test_without_renameat2_concurrent_overwrites_still_finish_cleanly(tmp_path, monkeypatch):
    """The fallback (two renames) promises less - a moment without a store - but no errors and no leftovers."""
    monkeypatch.setattr(streamem.io, "_RENAMEAT2", None)
    path = tmp_path / "store.zarr"
    write_dataset(_version_store(0).assign_attrs(format=VERSIONED, format_version=1), path, overwrite=False)

    def writer(first):
        def job():
            for version in range(first, first + 10):
                write_dataset(_version_store(version).assign_attrs(format=VERSIONED, format_version=1), path, overwrite=True)
        return job

    seen = _run_concurrently(path, [writer(100 * w) for w in (1, 2, 3)], n_readers=0)
    assert not seen["errors"], seen["errors"][:5]
    assert _read_version(path) in {109, 209, 309}
    assert _entries(tmp_path) == ["store.zarr"]
    with pytest.raises(FileExistsError):
        write_dataset(_version_store(1).assign_attrs(format=VERSIONED, format_version=1), path, overwrite=False)
    assert _entries(tmp_path) == ["store.zarr"]
