"""The data layer: every supported input fits the same model; every bad input gets a message that names the problem."""

from __future__ import annotations

import json
import pathlib

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from numpy.testing import assert_allclose

import streamem
from streamem.checkpoint import data_fingerprint
from _common import IRREGULAR_CHUNKS, N_FEATURES, ZARR_CHUNK_ROWS, fit_quietly, make_data, make_inits, sklearn_fit
from conftest import write_zarr

RTOL = 1e-8
MAX_ITER = 10


def _model(covariance_type="full", **kwargs):
    return streamem.GaussianMixture(n_components=3, covariance_type=covariance_type, tol=0, max_iter=MAX_ITER, **make_inits(covariance_type), **kwargs)


@pytest.fixture(scope="module")
def reference(X):
    return sklearn_fit(X, n_components=3, covariance_type="full", tol=0, max_iter=MAX_ITER, **make_inits("full"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, X):
    """Every on-disk form of the data: Zarr v3 and v2 arrays, a group, an xarray-written store."""
    root = tmp_path_factory.mktemp("inputs")
    Xw = np.array(X)
    out = {
        "v3": write_zarr(root / "v3.zarr", Xw, (ZARR_CHUNK_ROWS, N_FEATURES)),
        "v2": write_zarr(root / "v2.zarr", Xw, (ZARR_CHUNK_ROWS, N_FEATURES), zarr_format=2),
    }
    group = zarr.open_group(root / "group.zarr", mode="w")
    group.create_array("data", shape=Xw.shape, chunks=(1000, N_FEATURES), dtype="f8")[...] = Xw
    group.create_array("labels", shape=(len(Xw),), chunks=(1000,), dtype="i4")[...] = 0
    out["group"] = str(root / "group.zarr")
    _dataset(Xw).chunk({"time": 800}).to_zarr(root / "xr.zarr", mode="w", consolidated=False)
    out["xr"] = str(root / "xr.zarr")
    return out


def _dataset(X):
    n = len(X)
    time = pd.date_range("2020-01-01", periods=n, freq="h")
    return xr.Dataset(
        {"obs": (("time", "feature"), X), "quality": (("time",), np.ones(n))},
        coords={"time": time, "feature": ["u", "v", "w"]},
    )


# ------------------------------------------------------------------ inputs
INPUT_KINDS = [
    "numpy",
    "dask",
    "zarr.Array",
    "path str",
    "pathlib.Path",
    "zarr v2 path",
    "group path + variable",
    "DataArray (time, feature)",
    "DataArray (feature, time)",
    "Dataset + variable",
    "xarray-written Zarr path + variable",
]


def _make_input(kind, X, stores):
    """(X, fit kwargs) for every kind of input."""
    Xw = np.array(X)
    if kind == "numpy":
        return Xw, {}
    if kind == "dask":
        return da.from_array(Xw, chunks=(1100, -1)), {}
    if kind == "zarr.Array":
        return zarr.open_array(stores["v3"], mode="r"), {}
    if kind == "path str":
        return stores["v3"], {}
    if kind == "pathlib.Path":
        return pathlib.Path(stores["v3"]), {}
    if kind == "zarr v2 path":
        return stores["v2"], {}
    if kind == "group path + variable":
        return stores["group"], {"variable": "data"}
    if kind == "DataArray (time, feature)":
        return _dataset(Xw)["obs"], {"sample_dim": "time"}
    if kind == "DataArray (feature, time)":
        return _dataset(Xw)["obs"].transpose("feature", "time"), {"sample_dim": "time"}
    if kind == "Dataset + variable":
        return _dataset(Xw), {"variable": "obs"}
    if kind == "xarray-written Zarr path + variable":
        return stores["xr"], {"variable": "obs"}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_every_input_fits_the_same_model(kind, X, stores, reference):
    data, kwargs = _make_input(kind, X, stores)
    model = fit_quietly(_model(), data, **kwargs)
    assert model.n_features_in_ == N_FEATURES
    assert_allclose(model.means_, reference.means_, rtol=RTOL)
    assert_allclose(model.covariances_, reference.covariances_, rtol=RTOL)
    assert_allclose(model.lower_bounds_, reference.lower_bounds_, rtol=RTOL)


def test_zarr_v2_store_is_really_v2(stores):
    assert zarr.open_array(stores["v2"], mode="r").metadata.zarr_format == 2
    assert zarr.open_array(stores["v3"], mode="r").metadata.zarr_format == 3


def test_stored_row_chunks_are_kept(stores):
    assert streamem.load_data(stores["v3"]).array.chunks[0] == (700,) * 6 + (300,)
    assert streamem.load_data(stores["group"], variable="data").array.chunks[0] == (1000,) * 4 + (500,)
    assert streamem.load_data(stores["xr"], variable="obs").array.chunks[0] == (800,) * 5 + (500,)


def test_column_chunks_are_merged_rows_kept(tmp_path):
    rng = np.random.RandomState(0)
    X5 = rng.normal(size=(2300, 5))
    path = write_zarr(tmp_path / "cols.zarr", X5, (500, 2))
    assert len(zarr.open_array(path, mode="r").chunks) == 2  # really column-chunked on disk
    data = streamem.load_data(path)
    assert data.array.chunks[1] == (5,)
    assert data.array.chunks[0] == (500, 500, 500, 500, 300)
    assert_allclose(data.array.compute(), X5, rtol=0)


def test_xarray_feature_coordinate_is_recorded(X):
    model = fit_quietly(_model(), _dataset(np.array(X)), variable="obs")
    assert list(model.feature_coord_) == ["u", "v", "w"]


def test_integer_and_float32_input():
    """Non-float64 numeric input is accepted (and accumulated in float64)."""
    X_int = np.round(make_data() * 100).astype(np.int64)
    ref = sklearn_fit(X_int.astype(np.float64), n_components=3, tol=0, max_iter=5, random_state=0, init_params="random_from_data")
    ours = fit_quietly(streamem.GaussianMixture(n_components=3, tol=0, max_iter=5, random_state=0, init_params="random_from_data"), X_int)
    assert_allclose(ours.means_, ref.means_, rtol=RTOL)
    X32 = make_data().astype(np.float32)
    ref32 = sklearn_fit(X32.astype(np.float64), n_components=3, tol=0, max_iter=5, **make_inits("full"))
    ours32 = fit_quietly(streamem.GaussianMixture(n_components=3, tol=0, max_iter=5, **make_inits("full")), X32)
    assert ours32.means_.dtype == np.float64
    assert_allclose(ours32.means_, ref32.means_, rtol=1e-6)


# -------------------------------------------------------- validation: shapes
def test_1d_input_says_reshape(X):
    with pytest.raises(ValueError, match=r"reshape\(-1, 1\)"):
        _model().fit(np.asarray(X)[:, 0])
    with pytest.raises(ValueError, match=r"1-D"):
        streamem.load_data(da.zeros(10))


def test_3d_input(X):
    with pytest.raises(ValueError, match=r"2-D.*3-D"):
        _model().fit(np.zeros((10, 3, 2)))
    with pytest.raises(ValueError, match=r"3-D"):
        streamem.load_data(da.zeros((10, 3, 2)))


def test_string_dtype_is_refused():
    with pytest.raises((TypeError, ValueError), match=r"non-numeric dtype <U"):
        streamem.load_data(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises((TypeError, ValueError), match=r"not numbers"):
        streamem.load_data(np.array([["a", 1.0], [2.0, 3.0]], dtype=object))


def test_complex_dtype_is_refused():
    with pytest.raises(ValueError, match=r"[Cc]omplex.*complex128"):
        streamem.load_data(np.ones((5, 2), dtype=complex))
    with pytest.raises(ValueError, match=r"[Cc]omplex"):
        streamem.load_data(da.ones((5, 2), dtype=np.complex64))


def test_zero_rows():
    with pytest.raises(ValueError, match=r"0 rows"):
        _model().fit(np.empty((0, 3)))


def test_fewer_samples_than_components(X):
    with pytest.raises(ValueError, match=r"n_samples=2.*n_components=3"):
        streamem.GaussianMixture(n_components=3).fit(np.asarray(X)[:2])


def test_wrong_number_of_features_at_predict(X):
    model = fit_quietly(_model(), X)
    with pytest.raises(ValueError, match=r"2 features.*expecting 3"):
        model.predict(np.asarray(X)[:, :2])


# --------------------------------------------------------- validation: paths
def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(FileNotFoundError, match=r"does not exist") as info:
        _model().fit(str(missing))
    assert "nowhere.zarr" in str(info.value)


def test_plain_file_is_not_a_zarr_store(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a zarr store\n")
    with pytest.raises(ValueError, match=r"not a Zarr array or group") as info:
        _model().fit(path)
    assert "notes.txt" in str(info.value)


def test_empty_directory_is_not_a_zarr_store(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a Zarr array or group"):
        _model().fit(str(tmp_path / "empty"))


def test_group_needs_a_variable(stores):
    with pytest.raises(ValueError, match=r"variable=") as info:
        _model().fit(stores["group"])
    assert "'data'" in str(info.value) and "'labels'" in str(info.value)


def test_group_with_unknown_variable_lists_the_variables(stores):
    with pytest.raises(ValueError, match=r"variable='temperature' is not in") as info:
        _model().fit(stores["group"], variable="temperature")
    assert "'data'" in str(info.value) and "'labels'" in str(info.value)


def test_variable_given_for_an_array_store(stores):
    with pytest.raises(ValueError, match=r"variable='data'.*Zarr array"):
        _model().fit(stores["v3"], variable="data")


def test_zarr_group_object_is_refused(stores):
    with pytest.raises(TypeError, match=r"zarr.Group"):
        _model().fit(zarr.open_group(stores["group"], mode="r"))


# -------------------------------------------------------- validation: xarray
def test_dataset_with_missing_variable(X):
    ds = _dataset(np.array(X))
    with pytest.raises(ValueError, match=r"variable='temp' is not in the Dataset") as info:
        _model().fit(ds, variable="temp")
    assert "'obs'" in str(info.value) and "'quality'" in str(info.value)
    with pytest.raises(ValueError, match=r"variable="):
        _model().fit(ds)


def test_dataarray_with_unknown_sample_dim(X):
    arr = _dataset(np.array(X))["obs"]
    with pytest.raises(ValueError, match=r"sample_dim='sample' is not a dimension") as info:
        _model().fit(arr, sample_dim="sample")
    assert "'time'" in str(info.value) and "'feature'" in str(info.value)


# ------------------------------------------------------ validation: non-finite
BAD_ROWS = {1234: np.nan, 2000: np.inf, 3001: np.nan}


@pytest.fixture(scope="module")
def nonfinite_store(tmp_path_factory, X):
    Xb = np.array(X)
    for row, value in BAD_ROWS.items():
        Xb[row, row % N_FEATURES] = value
    return write_zarr(tmp_path_factory.mktemp("bad") / "bad.zarr", Xb, (ZARR_CHUNK_ROWS, N_FEATURES))


NONFINITE_CASES = {
    "all three inits": dict(**make_inits("full")),
    "default kmeans init": dict(random_state=0),
    "kmeans on a small sample": dict(random_state=0, init_sample_size=100),
    "k-means++": dict(init_params="k-means++", random_state=0),
    "random": dict(init_params="random", random_state=0),
    "random_from_data": dict(init_params="random_from_data", random_state=0),
}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_values_are_counted_and_located(nonfinite_store, case):
    model = streamem.GaussianMixture(n_components=3, max_iter=5, **NONFINITE_CASES[case])
    with pytest.raises(ValueError, match=r"3 non-finite values") as info:
        model.fit(nonfinite_store)
    assert "1234 to 3001" in str(info.value)


def test_nonfinite_values_in_numpy_input(X):
    Xb = np.array(X)
    Xb[17, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite values.*rows 17 to 17"):
        _model().fit(Xb)
    model = fit_quietly(_model(), X)
    with pytest.raises(ValueError, match=r"non-finite"):
        model.predict(Xb)


# ------------------------------------------------------ validation: parameters
@pytest.mark.parametrize(
    "params, name",
    [
        (dict(covariance_type="bogus"), "covariance_type"),
        (dict(n_components=0), "n_components"),
        (dict(n_components=2.5), "n_components"),
        (dict(init_params="bogus"), "init_params"),
        (dict(tol=-1.0), "tol"),
        (dict(reg_covar=-1e-6), "reg_covar"),
        (dict(max_iter=-1), "max_iter"),
        (dict(n_init=0), "n_init"),
        (dict(init_sample_size=0), "init_sample_size"),
        (dict(weights_init=[0.5, 0.5]), "weights_init"),
        (dict(weights_init=[0.5, 0.3, 0.3]), "weights_init"),
        (dict(weights_init=[1.2, -0.1, -0.1]), "weights_init"),
        (dict(means_init=np.zeros((3, 2))), "means_init"),
        (dict(means_init=np.zeros((2, 3))), "means_init"),
        (dict(precisions_init=np.ones((3, 3))), "precisions_init"),  # wrong shape for "full"
        (dict(precisions_init=np.tile(-np.eye(3), (3, 1, 1))), "precisions_init"),  # not positive definite
        (dict(precisions_init=np.tile([[1.0, 2.0, 0], [2.0, 1.0, 0], [0, 0, 1.0]], (3, 1, 1))), "precisions_init"),  # indefinite
        (dict(covariance_type="tied", precisions_init=np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])), "precisions_init"),
        (dict(covariance_type="diag", precisions_init=np.array([[1.0, 1, 1], [1, 0, 1], [1, 1, 1]])), "precisions_init"),
        (dict(covariance_type="spherical", precisions_init=np.array([1.0, -1.0, 1.0])), "precisions_init"),
        (dict(covariance_type="spherical", precisions_init=np.ones((3, 3))), "precisions_init"),
    ],
)
def test_parameter_errors_name_the_parameter(X, params, name):
    model = streamem.GaussianMixture(**{"n_components": 3, **params})
    with pytest.raises(ValueError, match=name):
        model.fit(X)


def test_precisions_init_not_positive_definite_message(X):
    bad = np.tile(np.diag([1.0, 1.0, -1.0]), (3, 1, 1))
    with pytest.raises(ValueError, match=r"precisions_init must be symmetric positive-definite"):
        streamem.GaussianMixture(n_components=3, precisions_init=bad).fit(X)


# ------------------------------------------- feature coordinate at predict
PREDICTIONS = ("predict", "predict_proba", "score_samples", "score", "bic")


@pytest.fixture(scope="module")
def labelled(X):
    """A model fitted on a DataArray whose feature coordinate is (u, v, w), and that DataArray."""
    arr = _dataset(np.array(X))["obs"].chunk({"time": 1000})
    return fit_quietly(_model(), arr), arr


def _outputs(model, X):
    out = {}
    for name in PREDICTIONS:
        value = getattr(model, name)(X)
        out[name] = np.asarray(value.values if isinstance(value, xr.DataArray) else value)
    return out


@pytest.mark.parametrize("order", [[2, 0, 1], [1, 0, 2]])
def test_reordered_feature_coordinate_is_aligned(labelled, order, X):
    """Columns are matched by label, not by position (position order gave another score)."""
    model, arr = labelled
    reordered = arr.isel(feature=order)
    assert list(reordered["feature"].values) != ["u", "v", "w"]
    assert isinstance(model.predict(reordered).data, da.Array)  # still lazy
    expected = _outputs(model, arr)
    got = _outputs(model, reordered)
    for name in PREDICTIONS:
        assert_allclose(got[name], expected[name], rtol=1e-12, err_msg=name)
    # The reference is independent of the alignment: scikit-learn on the numpy columns in fit order.
    sk = sklearn_fit(np.array(X), n_components=3, covariance_type="full", tol=0, max_iter=MAX_ITER, **make_inits("full"))
    assert_allclose(got["score"], sk.score(np.array(X)), rtol=1e-8)


def test_reordered_feature_coordinate_after_save_and_load(labelled, tmp_path):
    model, arr = labelled
    model.save(tmp_path / "model.zarr")
    loaded = streamem.load(tmp_path / "model.zarr")
    assert_allclose(loaded.score(arr.isel(feature=[2, 0, 1])), model.score(arr), rtol=1e-12)


@pytest.mark.parametrize(
    "labels, missing, unexpected",
    [(["u", "v", "x"], "'w'", "'x'"), (["a", "b", "c"], "'u'", "'c'")],
)
def test_other_feature_labels_are_refused(labelled, labels, missing, unexpected):
    model, arr = labelled
    other = arr.assign_coords(feature=labels)
    for name in PREDICTIONS:
        with pytest.raises(ValueError, match=r"feature") as info:
            getattr(model, name)(other)
        message = str(info.value)
        assert "missing" in message and missing in message and "unexpected" in message and unexpected in message


def test_fewer_feature_labels_are_refused_by_name(labelled):
    model, arr = labelled
    with pytest.raises(ValueError, match=r"missing.*'w'"):
        model.predict(arr.isel(feature=[0, 1]))


def test_input_without_coordinate_keeps_position_order(labelled, X):
    model, arr = labelled
    assert_allclose(model.score(np.array(X)), model.score(arr), rtol=1e-12)
    assert_allclose(model.score(da.from_array(np.array(X), chunks=(1000, 3))), model.score(arr), rtol=1e-12)
    # Position order for numpy: the same columns permuted are a different data set.
    assert model.score(np.array(X)[:, [2, 0, 1]]) < model.score(arr) - 1.0


def test_dataframe_columns_are_checked_by_scikit_learn(X):
    frame = pd.DataFrame(np.array(X), columns=["a", "b", "c"])
    model = fit_quietly(_model(), frame)
    assert list(model.feature_names_in_) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"same order"):
        model.predict(frame[["c", "a", "b"]])
    with pytest.raises(ValueError, match=r"unseen at fit time"):
        model.score(frame.rename(columns={"c": "d"}))
    # Refitting on input without column names forgets the old names (as scikit-learn does).
    fit_quietly(model, _dataset(np.array(X))["obs"])
    assert not hasattr(model, "feature_names_in_")


# ----------------------------------------------------- unknown chunk sizes
def test_unknown_chunk_sizes_say_compute_chunk_sizes(X):
    arr = da.from_array(np.array(X), chunks=(1000, 3))
    positive = arr[arr[:, 0] > 0]
    assert np.isnan(positive.chunks[0][0])
    with pytest.raises(ValueError, match=r"compute_chunk_sizes\(\)"):
        streamem.load_data(positive)
    with pytest.raises(ValueError, match=r"compute_chunk_sizes\(\)"):
        _model().fit(positive)
    model = fit_quietly(_model(), positive.compute_chunk_sizes())
    assert model.n_features_in_ == 3


# ----------------------------------------------------------- source paths
def test_source_does_not_depend_on_how_the_path_is_spelled(stores, monkeypatch):
    path = pathlib.Path(stores["v3"])
    monkeypatch.chdir(path.parent.parent)
    spellings = [str(path), str(path) + "/", f"{path.parent.name}/./{path.name}/", pathlib.Path(path.parent.name) / path.name]
    loaded = [streamem.load_data(s) for s in spellings]
    assert {d.source for d in loaded} == {str(path)}
    assert streamem.load_data(zarr.open_array(str(path) + "/", mode="r")).source == str(path)
    assert len({json.dumps(data_fingerprint(d), sort_keys=True) for d in loaded}) == 1
    group = streamem.load_data(stores["group"] + "/", variable="data")
    assert group.source == stores["group"]


# ------------------------------------------- irregular chunks on a Zarr store
@pytest.fixture(scope="module")
def irregular_store(tmp_path_factory, X):
    """The data with one NaN at row 2000, stored in 100-row Zarr chunks, read in irregular dask chunks."""
    Xb = np.array(X)
    Xb[2000, 1] = np.nan
    path = write_zarr(tmp_path_factory.mktemp("irregular") / "nan.zarr", Xb, (100, N_FEATURES))
    return path


def _irregular(path):
    return da.from_zarr(zarr.open_array(path, mode="r"), chunks=(IRREGULAR_CHUNKS, (N_FEATURES,)))


def test_irregular_chunks_row_offsets(irregular_store):
    data = streamem.load_data(_irregular(irregular_store))
    assert data.array.chunks[0] == IRREGULAR_CHUNKS
    assert_allclose(data.row_offsets(), np.concatenate([[0], np.cumsum(IRREGULAR_CHUNKS)[:-1]]), rtol=0)
    assert list(data.row_offsets()[:4]) == [0, 500, 1400, 1700]


@pytest.mark.parametrize("init", ["given", "kmeans"])
def test_irregular_chunks_nan_reported_at_its_row(irregular_store, init):
    # Row 2000 is row 300 of chunk 3 (which starts at 1700); chunk index x first chunk size would say 1800.
    params = make_inits("full") if init == "given" else {"random_state": 0}
    model = streamem.GaussianMixture(n_components=3, max_iter=3, **params)
    with pytest.raises(ValueError, match=r"1 non-finite values .* rows 2000 to 2000"):
        model.fit(_irregular(irregular_store))
    xr_arr = xr.DataArray(_irregular(irregular_store), dims=("time", "feature"))
    with pytest.raises(ValueError, match=r"rows 2000 to 2000"):
        streamem.GaussianMixture(n_components=3, max_iter=3, **params).fit(xr_arr)
