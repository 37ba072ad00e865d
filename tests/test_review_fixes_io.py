"""Review fixes in model files, checkpoints and data paths (issue 13, items 1, 2, 3, 5, 7, 10, 11).

- A feature coordinate 0..d-1 survives a save (item 1); labels of every kind,
  datetimes included, are matched as labels after a save (item 11).
- One spelling of a local store: symbolic links and ``~`` resolve the same
  way for fingerprints, checkpoints, model files and data (items 5, 10).
- ``overwrite`` replaces only what streamem wrote (item 2), and a failed
  write on a cluster leaves no temporary behind (item 7).
- Zarr-backed dask input opened by the user is checked for missing chunks
  where its store can be found (item 3).

Every store is real, on disk; references are scikit-learn's formulas on the
same parameters, or an uninterrupted fit.
"""

from __future__ import annotations

import os
import re
import time

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose, assert_array_equal

import streamem
from streamem.data import align_features, load_data, normalise_location
from streamem.io import write_dataset
from workflow_helpers import assert_same_params, check_usage_error, cli_main, mixture_sample, quiet_fit, sklearn_from, write_zarr

RTOL = 1e-12


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return mixture_sample(600, seed=7)


def _model(**params) -> streamem.GaussianMixture:
    settings = dict(n_components=3, tol=0, max_iter=4, random_state=0)
    settings.update(params)
    return streamem.GaussianMixture(**settings)


def _labelled(X: np.ndarray, labels, order=(0, 1, 2)) -> xr.DataArray:
    order = list(order)
    return xr.DataArray(X[:, order], dims=("time", "band"), coords={"band": np.asarray(labels)[order]})


# ------------------------------------------------------------ items 1 and 11: feature coordinates in model files
LABELS = {
    "int 0..d-1": np.array([0, 1, 2]),
    "float 0..d-1": np.array([0.0, 1.0, 2.0]),
    "int": np.array([10, 20, 30]),
    "str": np.array(["r", "g", "b"]),
    "datetime64[us]": np.array(["2020-01-01", "2020-01-02", "2020-01-03"], dtype="datetime64[us]"),
    "datetime64[ns]": pd.date_range("2020", periods=3).values,
    "float with nan": np.array([np.nan, 1.0, 2.0]),
}


@pytest.mark.parametrize("kind", list(LABELS))
def test_saved_feature_coordinate_aligns_by_label(X, tmp_path, kind):
    labels = LABELS[kind]
    model = quiet_fit(_model(), _labelled(X, labels))
    reference = sklearn_from(model).score(X)
    model.save(tmp_path / "m.zarr")
    loaded = streamem.load(tmp_path / "m.zarr")

    assert loaded.feature_coord_ is not None
    assert pd.Index(loaded.feature_coord_).equals(pd.Index(labels))
    # The data it was fitted on, and the same columns in another order, score as scikit-learn does.
    assert_allclose(loaded.score(_labelled(X, labels)), reference, rtol=RTOL)
    assert_allclose(loaded.score(_labelled(X, labels, order=(2, 0, 1))), reference, rtol=RTOL)
    other = xr.DataArray(X, dims=("time", "band"), coords={"band": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="missing"):
        loaded.score(other)


def test_model_fitted_without_a_coordinate_still_matches_by_position(X, tmp_path):
    model = quiet_fit(_model(), X)
    model.save(tmp_path / "m.zarr")
    loaded = streamem.load(tmp_path / "m.zarr")
    assert loaded.feature_coord_ is None
    # Without a coordinate at fit, any labels are taken in column order.
    assert_allclose(loaded.score(_labelled(X, ["c", "a", "b"])), sklearn_from(model).score(X), rtol=RTOL)


@pytest.mark.parametrize("labels, expected", [([0, 1, 2], None), (["r", "g", "b"], ["r", "g", "b"])])
def test_files_without_the_coordinate_flag_load_as_before(X, tmp_path, labels, expected):
    """Files written before the flag: a stored 0..d-1 means "no coordinate", other labels are kept."""
    quiet_fit(_model(), _labelled(X, np.array(labels))).save(tmp_path / "m.zarr")
    group = zarr.open_group(tmp_path / "m.zarr", mode="r+")
    attrs = group.attrs.asdict()
    assert "has_feature_coord" in attrs
    del attrs["has_feature_coord"]
    group.attrs.put(attrs)
    loaded = streamem.load(tmp_path / "m.zarr")
    assert (loaded.feature_coord_ is None) if expected is None else loaded.feature_coord_.tolist() == expected


def test_labels_of_different_datetime_units_align():
    fitted = np.array(["2020-01-01", "2020-01-02", "2020-01-03"], dtype="datetime64[ns]")
    given = fitted.astype("datetime64[us]")[[2, 0, 1]]
    X = np.arange(12.0).reshape(4, 3)
    data = load_data(xr.DataArray(X, dims=("t", "f"), coords={"f": given}))
    assert_array_equal(align_features(data, fitted).array.compute(), X[:, [1, 2, 0]])


def test_repeated_labels_are_refused():
    data = load_data(xr.DataArray(np.zeros((4, 3)), dims=("t", "f"), coords={"f": ["a", "a", "b"]}))
    with pytest.raises(ValueError, match="missing"):
        align_features(data, np.array(["a", "b", "c"]))
    data = load_data(xr.DataArray(np.zeros((4, 3)), dims=("t", "f"), coords={"f": ["b", "a", "a"]}))
    with pytest.raises(ValueError, match="labels repeat"):
        align_features(data, np.array(["a", "a", "b"]))


# ------------------------------------------------------------ items 5 and 10: one spelling of a local path
def test_normalise_location_resolves_links_home_and_spellings(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.zarr").mkdir()
    os.symlink(tmp_path / "data.zarr", tmp_path / "link.zarr")
    real = os.path.realpath(tmp_path / "data.zarr")
    for spelling in ("data.zarr", "./data.zarr/", "link.zarr", "~/data.zarr", "~/link.zarr/", f"file://{tmp_path}/link.zarr"):
        assert normalise_location(spelling) == real, spelling
    assert normalise_location(normalise_location("link.zarr")) == real
    assert normalise_location("array") == "array"
    assert normalise_location("s3://bucket/data.zarr/") == "s3://bucket/data.zarr"


def test_resume_through_a_symbolic_link_to_the_data(X, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_zarr("data.zarr", X, 200)
    os.symlink(tmp_path / "data.zarr", tmp_path / "link.zarr")
    reference = quiet_fit(_model(max_iter=3), "data.zarr")
    quiet_fit(_model(max_iter=2), "data.zarr", checkpoint="ckpt")
    resumed = quiet_fit(_model(max_iter=3), "link.zarr", checkpoint="ckpt", resume=True)
    assert resumed.n_data_passes_ == 1
    assert_same_params(resumed, reference, RTOL)
    # A zarr.Array opened through the link is the same data too.
    quiet_fit(_model(max_iter=2), zarr.open_array("link.zarr", mode="r"), checkpoint="ckpt2")
    resumed = quiet_fit(_model(max_iter=3), "data.zarr", checkpoint="ckpt2", resume=True)
    assert resumed.n_data_passes_ == 1


@pytest.fixture
def home(tmp_path, monkeypatch):
    """``~`` is ``tmp_path/home``; the working directory is ``tmp_path/work``."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "home"


def test_tilde_paths_mean_the_home_directory(X, home):
    write_zarr(home / "data.zarr", X, 200)
    reference = quiet_fit(_model(max_iter=3), str(home / "data.zarr"))
    quiet_fit(_model(max_iter=2), "~/data.zarr", checkpoint="~/ckpt")
    assert os.path.isfile(home / "ckpt" / "LATEST")
    resumed = quiet_fit(_model(max_iter=3), "~/data.zarr", checkpoint="~/ckpt", resume=True)
    assert resumed.n_data_passes_ == 1
    assert_same_params(resumed, reference, RTOL)

    resumed.save("~/m.zarr")
    assert os.path.isdir(home / "m.zarr")
    resumed.save("~/m.zarr", overwrite=True)
    assert_array_equal(streamem.load("~/m.zarr").means_, reference.means_)
    assert load_data("~/data.zarr").source == os.path.realpath(home / "data.zarr")
    assert os.listdir(".") == []  # nothing written to a literal ./~


def test_a_file_as_checkpoint_is_refused_by_name(X, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(ValueError, match=r"checkpoint=.*afile.*is not a directory"):
        quiet_fit(_model(max_iter=2), X, checkpoint=tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep me"


# ------------------------------------------------------------ item 2: overwrite replaces only streamem's stores
def _tree(path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its content."""
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return {"": fh.read()}
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, name), path)] = fh.read()
    return out


def _foreign(tmp_path, X, kind: str) -> str:
    target = tmp_path / kind
    if kind == "zarr array":
        write_zarr(target, X, 200)
    elif kind == "xarray store":
        xr.Dataset({"v": (("t", "f"), X)}, attrs={"title": "user data"}).to_zarr(target, zarr_format=3, consolidated=False)
    elif kind == "foreign format":
        xr.Dataset({"v": (("t", "f"), X)}, attrs={"format": "netcdf-like"}).to_zarr(target, zarr_format=3, consolidated=False)
    elif kind == "directory":
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    else:
        target.write_text("keep me")
    return os.fspath(target)


@pytest.mark.parametrize("kind", ["zarr array", "xarray store", "foreign format", "directory", "file"])
def test_overwrite_refuses_what_streamem_did_not_write(X, tmp_path, kind):
    target = _foreign(tmp_path, X, kind)
    before = _tree(target)
    model = quiet_fit(_model(), X)
    with pytest.raises(ValueError, match=rf"{re.escape(target)}.*streamem") as info:
        model.save(target, overwrite=True)
    assert {"file": "a file", "directory": "not a Zarr store"}.get(kind, "format") in str(info.value)
    predictions = xr.Dataset({"labels": ("sample", model.predict(X))})
    with pytest.raises(ValueError, match=re.escape(target)):
        write_dataset(predictions, target, overwrite=True, checksum=False)
    assert _tree(target) == before
    assert sorted(os.listdir(tmp_path)) == [kind]


def test_overwrite_replaces_streamem_stores(X, tmp_path):
    model = quiet_fit(_model(), X)
    target = tmp_path / "out.zarr"
    # Predictions as the command line writes them: no format of their own, stamped by write_dataset.
    write_dataset(xr.Dataset({"labels": ("sample", model.predict(X))}), target, overwrite=False, checksum=False)
    assert zarr.open_group(target, mode="r").attrs["format"] == "streamem-predictions"
    write_dataset(xr.Dataset({"labels": ("sample", model.predict(X[:10]))}), target, overwrite=True, checksum=False)
    assert xr.open_zarr(target, consolidated=False)["labels"].size == 10
    model.save(target, overwrite=True)  # a model may replace predictions, and a model
    model.save(target, overwrite=True)
    assert_array_equal(streamem.load(target).means_, model.means_)
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"]


def test_cli_predict_does_not_replace_its_input(X, tmp_path):
    data = write_zarr(tmp_path / "data.zarr", X, 200)
    quiet_fit(_model(), X).save(tmp_path / "m.zarr")
    before = _tree(data)
    proc = cli_main("predict", tmp_path / "m.zarr", data, "--out", data, "--overwrite", "--quiet", "--workers", "1")
    check_usage_error(proc, data)
    assert _tree(data) == before


# ------------------------------------------------------------ item 7: a failed write leaves nothing
def _failed_writes(model, data, out, tmp_path, attempts: int = 4) -> None:
    """Write predictions of a store with a missing chunk ``attempts`` times; each fails and leaves nothing."""
    for attempt in range(attempts):
        ds = xr.Dataset({"labels": ("sample", model.predict(data)), "proba": (("sample", "component"), model.predict_proba(data))})
        with pytest.raises(ValueError, match="rows 200 to 299"):
            write_dataset(ds, out, overwrite=False, checksum=False)
        assert sorted(os.listdir(tmp_path)) == ["data.zarr"], attempt
    time.sleep(1.0)  # tasks still running after a failure would have re-created a temporary by now
    assert sorted(os.listdir(tmp_path)) == ["data.zarr"]


@pytest.mark.parametrize("scheduler", ["threads", "cluster"])
def test_failed_write_leaves_no_temporary(X, tmp_path, request, scheduler):
    """Tasks that still run when another fails (local threads, cluster workers) never re-create the temporary."""
    from distributed import Client

    data = write_zarr(tmp_path / "data.zarr", np.concatenate([X] * 10), 100)
    os.remove(os.path.join(data, "c", "2", "0"))
    model = quiet_fit(_model(), X)
    out = tmp_path / "out.zarr"
    if scheduler == "threads":
        _failed_writes(model, data, out, tmp_path)
    else:
        with Client(request.getfixturevalue("cluster")):
            _failed_writes(model, data, out, tmp_path)
            # An intact store still writes through the same path.
            write_dataset(xr.Dataset({"labels": ("sample", model.predict(X))}), out, overwrite=False, checksum=False)
        assert_array_equal(xr.open_zarr(out, consolidated=False)["labels"].values, sklearn_from(model).predict(X))


# ------------------------------------------------------------ item 3: zarr-backed dask input
def _missing_chunk_store(tmp_path, X, dims=("t", "f")) -> str:
    """An xarray-written store of ``X`` in 200-row chunks, stored with ``dims``, without its rows 200 to 399."""
    path = tmp_path / "data.zarr"
    ds = xr.Dataset({"v": (("t", "f"), X)}).transpose(*dims)
    ds.to_zarr(path, zarr_format=3, consolidated=False, encoding={"v": {"chunks": (200, 3)[:: 1 if dims[0] == "t" else -1]}})
    os.remove(path / "v" / "c" / ("1/0" if dims[0] == "t" else "0/1"))
    return os.fspath(path)


def _opened(path: str, how: str):
    """The stored array opened by the user, whole and unchanged."""
    if how == "da.from_zarr":
        return da.from_zarr(zarr.open_array(f"{path}/v", mode="r"))
    if how == "xr.open_dataset without dask":
        return xr.open_dataset(path, engine="zarr", consolidated=False)["v"]
    return xr.open_zarr(path, consolidated=False)["v"]


@pytest.mark.parametrize(
    "how, dims",
    [("da.from_zarr", ("t", "f")), ("xr.open_zarr", ("t", "f")), ("xr.open_zarr", ("f", "t")), ("xr.open_dataset without dask", ("f", "t"))],
)
def test_zarr_arrays_opened_by_the_user_are_checked(X, tmp_path, how, dims):
    path = _missing_chunk_store(tmp_path, X, dims)
    model = quiet_fit(_model(), X)
    where = {} if how == "da.from_zarr" else {"sample_dim": "t"}
    with pytest.raises(ValueError, match=r"rows 200 to 399\) is missing"):
        model.score(_opened(path, how), **where)
    # missing_chunks="fill" reads them as the fill value, as Zarr does (NaN: xarray wrote the store).
    filled = np.array(X)
    filled[200:400] = np.nan
    assert_array_equal(load_data(_opened(path, how), missing_chunks="fill", **where).array.compute(), filled)


def test_a_selection_of_a_zarr_array_is_read_as_it_is(X, tmp_path):
    """Rows selected after opening are not traced to the store (documented): they read exactly, without error."""
    path = _missing_chunk_store(tmp_path, X)
    for selected in (
        xr.open_zarr(path, consolidated=False)["v"].isel(t=slice(400, None)),
        xr.open_dataset(path, engine="zarr", consolidated=False)["v"].isel(t=slice(400, None)),
        da.from_zarr(zarr.open_array(f"{path}/v", mode="r"))[400:],
    ):
        assert_array_equal(load_data(selected).array.compute(), X[400:])
