"""Damaged Zarr stores: a missing chunk file or a corrupt one is an error naming the array and the rows.

Zarr reads a chunk file that is not there as the fill value, so a deleted
chunk (or one an interrupted writer never wrote) would silently fit a wrong
model; a corrupt chunk raised the codec's message, naming neither array nor
rows. Every store here is real, on disk.
"""

from __future__ import annotations

import os
import shutil

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose

import streamem
from _common import N_FEATURES, ZARR_CHUNK_ROWS, fit_quietly, make_inits, sklearn_fit
from conftest import write_zarr

MAX_ITER = 3
#: The chunk removed from every store (rows 1400 to 2099) and the one overwritten with random bytes (2100 to 2799).
MISSING, CORRUPT = 2, 3


def _rows(index: int) -> str:
    return f"rows {index * ZARR_CHUNK_ROWS} to {(index + 1) * ZARR_CHUNK_ROWS - 1}"


def _model(**kwargs):
    return streamem.GaussianMixture(n_components=3, tol=0, max_iter=MAX_ITER, **make_inits("full"), **kwargs)


def _write_xarray(path, X, dims=("time", "feature")):
    ds = xr.Dataset({"obs": (("time", "feature"), X)}, coords={"time": pd.date_range("2020", periods=len(X), freq="h")})
    ds.transpose(*dims).chunk({"time": ZARR_CHUNK_ROWS}).to_zarr(path, mode="w", consolidated=False)
    return path


#: How each store is written, the chunk directory of its data, the key of a row chunk, and the load_data kwargs.
LAYOUTS = {
    "v3 array": (lambda p, X: write_zarr(p, X, (ZARR_CHUNK_ROWS, N_FEATURES)), "", "c/{}/0", {}),
    "v2 array": (lambda p, X: write_zarr(p, X, (ZARR_CHUNK_ROWS, N_FEATURES), zarr_format=2), "", "{}.0", {}),
    "xarray-written": (_write_xarray, "obs", "c/{}/0", {"variable": "obs"}),
    "xarray-written (feature, time)": (
        lambda p, X: _write_xarray(p, X, ("feature", "time")),
        "obs",
        "c/0/{}",
        {"variable": "obs", "sample_dim": "time"},
    ),
}


def _damaged(root, layout, X, *, missing=True, corrupt=True):
    write, array_dir, key, kwargs = LAYOUTS[layout]
    path = os.fspath(root / "data.zarr")
    write(path, np.array(X))
    chunk = os.path.join(path, array_dir, key)
    assert os.path.isfile(chunk.format(MISSING)) and os.path.isfile(chunk.format(CORRUPT))
    if missing:
        os.remove(chunk.format(MISSING))
    if corrupt:
        with open(chunk.format(CORRUPT), "wb") as fh:
            fh.write(np.random.RandomState(0).bytes(3000))
    return path, os.path.join(path, array_dir).rstrip("/"), kwargs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_missing_chunk_is_an_error_naming_store_and_rows(tmp_path, X, layout):
    path, array_path, kwargs = _damaged(tmp_path, layout, X, corrupt=False)
    with pytest.raises(ValueError, match=r"missing") as info:
        _model().fit(path, **kwargs)
    message = str(info.value)
    assert array_path in message and _rows(MISSING) in message and "missing_chunks='fill'" in message


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_corrupt_chunk_is_an_error_naming_store_and_rows(tmp_path, X, layout):
    path, array_path, kwargs = _damaged(tmp_path, layout, X, missing=False)
    with pytest.raises(ValueError, match=r"cannot be decoded") as info:
        _model().fit(path, **kwargs)
    message = str(info.value)
    assert array_path in message and _rows(CORRUPT) in message


def test_xarray_written_store_keeps_xarray_decoding_and_labels(tmp_path, X):
    """Read through the checked reader, an xarray-written store is still xarray input (coordinates, masking)."""
    path, _, _ = _damaged(tmp_path, "xarray-written (feature, time)", X, missing=False, corrupt=False)
    data = streamem.load_data(path, variable="obs", sample_dim="time")
    assert data.kind == "xarray" and data.sample_dim == "time" and "time" in data.coords
    assert_allclose(data.array.compute(), X, rtol=0)
    # A masked value (xarray's _FillValue) reads as NaN, as xarray decodes it, not as the raw number.
    masked = tmp_path / "masked.zarr"
    ds = xr.Dataset({"obs": (("time", "feature"), np.arange(12.0).reshape(4, 3))})
    ds["obs"].encoding["_FillValue"] = 5.0
    ds.to_zarr(masked, mode="w", consolidated=False)
    values = streamem.load_data(masked, variable="obs").array.compute()
    assert np.isnan(values[1, 2]) and np.isfinite(np.delete(values.ravel(), 5)).all()


def test_zarr_array_object_and_group_member(tmp_path, X):
    path, _, _ = _damaged(tmp_path, "v3 array", X, corrupt=False)
    with pytest.raises(ValueError, match=rf"data.zarr \({_rows(MISSING)}\) is missing"):
        _model().fit(zarr.open_array(path, mode="r"))
    group = zarr.open_group(tmp_path / "group.zarr", mode="w")
    group.create_array("data", shape=X.shape, chunks=(ZARR_CHUNK_ROWS, N_FEATURES), dtype="f8")[...] = np.array(X)
    shutil.rmtree(tmp_path / "group.zarr" / "data" / "c" / str(MISSING))
    with pytest.raises(ValueError, match=rf"group.zarr/data \({_rows(MISSING)}\) is missing"):
        _model().fit(str(tmp_path / "group.zarr"), variable="data")


def test_rechunked_read_names_the_zarr_chunk(tmp_path, X):
    """Dask chunks of 1000 rows span two Zarr chunks: the message names the missing one's rows."""
    path, _, _ = _damaged(tmp_path, "v3 array", X, corrupt=False)
    data = streamem.load_data(path, chunk_rows=1000)
    with pytest.raises(ValueError, match=_rows(MISSING)):
        data.array.compute()


def test_missing_chunks_fill_reads_the_fill_value(tmp_path, X):
    path, _, _ = _damaged(tmp_path, "v3 array", X, corrupt=False)
    filled = np.array(X)
    filled[MISSING * ZARR_CHUNK_ROWS : (MISSING + 1) * ZARR_CHUNK_ROWS] = 0.0  # zarr's default fill value
    assert_allclose(streamem.load_data(path, missing_chunks="fill").array.compute(), filled, rtol=0)
    ours = fit_quietly(_model(), path, missing_chunks="fill")
    ref = sklearn_fit(filled, n_components=3, covariance_type="full", tol=0, max_iter=MAX_ITER, **make_inits("full"))
    assert_allclose(ours.means_, ref.means_, rtol=1e-8)
    assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=1e-8)


def test_missing_chunks_fill_still_refuses_a_corrupt_chunk(tmp_path, X):
    path, _, _ = _damaged(tmp_path, "v3 array", X)
    with pytest.raises(ValueError, match=rf"{_rows(CORRUPT)}.*cannot be decoded"):
        streamem.load_data(path, missing_chunks="fill").array.compute()


def test_predictions_check_chunks_too(tmp_path, X):
    model = fit_quietly(_model(), np.array(X))
    path, _, _ = _damaged(tmp_path, "v3 array", X, corrupt=False)
    for name in ("predict", "predict_proba", "score_samples"):
        out = getattr(model, name)(path)
        assert isinstance(out, da.Array)  # lazy: the read happens at compute
        with pytest.raises(ValueError, match=_rows(MISSING)):
            out.compute()
    for name in ("score", "bic", "aic"):
        with pytest.raises(ValueError, match=_rows(MISSING)):
            getattr(model, name)(path)
    filled = streamem.load_data(path, missing_chunks="fill").array.compute()
    assert_allclose(model.score(path, missing_chunks="fill"), model.score(filled), rtol=1e-12)


def test_missing_chunks_argument_is_checked(zarr_path):
    with pytest.raises(ValueError, match=r"missing_chunks must be one of .*'raise'.*'fill'.*got 'ignore'"):
        streamem.load_data(zarr_path, missing_chunks="ignore")
    with pytest.raises(ValueError, match=r"missing_chunks"):
        _model().fit(zarr_path, missing_chunks="ignore")


def test_intact_store_reads_exactly(zarr_path, X):
    assert_allclose(streamem.load_data(zarr_path).array.compute(), X, rtol=0)
    assert_allclose(streamem.load_data(zarr_path, chunk_rows=1000).array.compute(), X, rtol=0)


def test_missing_and_corrupt_chunks_on_a_cluster(tmp_path, X, cluster):
    """The checks run in the worker processes; their errors reach the client intact."""
    from distributed import Client

    path, array_path, _ = _damaged(tmp_path, "v3 array", X, corrupt=False)
    with Client(cluster) as client:
        with pytest.raises(ValueError, match=rf"{array_path} \({_rows(MISSING)}\) is missing"):
            _model(client=client).fit(path)
        ours = fit_quietly(_model(client=client), path, missing_chunks="fill")
        with open(os.path.join(path, "c", str(CORRUPT), "0"), "wb") as fh:
            fh.write(b"\0" * 100)
        with pytest.raises(ValueError, match=rf"{_rows(CORRUPT)}\) cannot be decoded"):
            ours.score(path, missing_chunks="fill")
    filled = np.array(X)
    filled[MISSING * ZARR_CHUNK_ROWS : (MISSING + 1) * ZARR_CHUNK_ROWS] = 0.0
    ref = sklearn_fit(filled, n_components=3, covariance_type="full", tol=0, max_iter=MAX_ITER, **make_inits("full"))
    assert_allclose(ours.means_, ref.means_, rtol=1e-8)
