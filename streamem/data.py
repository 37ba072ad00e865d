"""Turn any supported input into a row-chunked dask array, with validation.

Supported inputs: numpy arrays (and other in-memory array-likes), dask arrays,
``zarr.Array``, a path to a Zarr array or group (v2 or v3), an
``xarray.DataArray`` with dims (sample, feature) and an ``xarray.Dataset``
with ``variable=``. Nothing here reads the data: checks that need the values
(non-finite entries) happen in the first data pass of the EM driver.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

#: Rows per chunk when we chunk in-memory data.
DEFAULT_CHUNK_ROWS = 65_536


@dataclass
class InputData:
    """A validated data set: a dask array plus what we need to label outputs.

    Attributes
    ----------
    array : dask.array.Array
        Shape (n_samples, n_features), chunked along rows only.
    kind : {"numpy", "dask", "xarray"}
        What predictions on this input should return.
    sample_dim, feature_dim : str or None
        Dimension names of an xarray input.
    coords : dict
        Coordinates of the sample dimension (xarray input only).
    feature_coord : numpy.ndarray or None
        Values of the feature coordinate, when the input had one.
    source : str
        A short description of where the data came from (for provenance).
    store_meta : dict
        Store metadata used to fingerprint the data (path, format).
    """

    array: da.Array
    kind: str
    sample_dim: str | None = None
    feature_dim: str | None = None
    coords: dict[str, Any] = field(default_factory=dict)
    feature_coord: np.ndarray | None = None
    source: str = "array"
    store_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.array.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.array.shape[1])

    def row_offsets(self) -> np.ndarray:
        """First global row index of every row chunk."""
        return np.concatenate([[0], np.cumsum(self.array.chunks[0])[:-1]]).astype(np.int64)

    def wrap_rows(self, result: da.Array, extra_dim: str | None = None) -> Any:
        """Give a per-row result the same type and row labels as the input."""
        if self.kind == "numpy":
            return result.compute()
        if self.kind == "dask":
            return result
        dims = (self.sample_dim,) if result.ndim == 1 else (self.sample_dim, extra_dim)
        return xr.DataArray(result, dims=dims, coords=self.coords)


def load_data(
    X: Any,
    *,
    variable: str | None = None,
    sample_dim: str | None = None,
    chunk_rows: int | None = None,
) -> InputData:
    """Validate ``X`` and return it as a row-chunked dask array.

    Parameters
    ----------
    X : array-like, dask array, zarr.Array, str, os.PathLike, xarray object
        The data, shape (n_samples, n_features).
    variable : str, optional
        Which variable of a Zarr group or ``xarray.Dataset`` holds the data.
    sample_dim : str, optional
        Name of the sample dimension of an xarray input. By default the first
        dimension.
    chunk_rows : int, optional
        Rows per chunk for in-memory input (default 65,536); for stored input
        the storage chunking is kept unless this is given.

    Returns
    -------
    InputData
    """
    if chunk_rows is not None and (not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    source = "array"
    store_meta: dict[str, Any] = {}
    if isinstance(X, (str, os.PathLike)):
        source = os.fspath(X)
        X, store_meta = _open_path(source, variable)
    if isinstance(X, xr.Dataset):
        X = _select_variable(X, variable, list(X.data_vars))
    if isinstance(X, xr.DataArray):
        info = _from_dataarray(X, sample_dim, chunk_rows)
    elif isinstance(X, zarr.Array):
        _check_shape_dtype(X.shape, X.dtype)
        store_meta = store_meta or {"zarr_format": X.metadata.zarr_format, "store": str(X.store_path)}
        if source == "array":
            source = str(X.store_path)
        info = InputData(_row_chunked(da.from_zarr(X), chunk_rows), kind="dask")
    elif isinstance(X, zarr.Group):
        raise TypeError("X is a zarr.Group: pass the array itself, or the group's path with variable=")
    elif isinstance(X, da.Array):
        _check_shape_dtype(X.shape, X.dtype)
        info = InputData(_row_chunked(X, chunk_rows), kind="dask")
    else:
        info = _from_memory(X, chunk_rows)
    info.source = source
    info.store_meta = store_meta
    return info


def check_n_samples(data: InputData, n_components: int) -> None:
    """Refuse data with fewer rows than components."""
    if data.n_samples < n_components:
        raise ValueError(
            f"X has n_samples={data.n_samples} rows, but n_components={n_components} "
            "needs at least n_components rows (Expected n_samples >= n_components)"
        )


def _open_path(path: str, variable: str | None) -> tuple[Any, dict[str, Any]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"X: path {path!r} does not exist")
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise ValueError(f"X: path {path!r} is not a Zarr array or group ({exc})") from None
    meta = {"path": os.path.abspath(path), "zarr_format": node.metadata.zarr_format}
    if isinstance(node, zarr.Array):
        if variable is not None:
            raise ValueError(f"variable={variable!r} was given, but {path!r} is a Zarr array, not a group")
        return node, meta
    names = sorted(name for name, _ in node.arrays())
    _select_variable(None, variable, names, where=f"Zarr group {path!r}")
    meta["variable"] = variable
    try:
        # An xarray-written group carries coordinates we want to keep.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no consolidated metadata": fine here
            ds = xr.open_zarr(path, chunks={}, consolidated=None, zarr_format=node.metadata.zarr_format)
        if variable in ds.data_vars:
            return ds, meta
    except Exception:
        pass
    return node[variable], meta


def _select_variable(ds: Any, variable: str | None, names: list[str], where: str = "the Dataset") -> Any:
    if variable is None:
        raise ValueError(f"X is {where}: pass variable= naming one of {names}")
    if variable not in names:
        raise ValueError(f"variable={variable!r} is not in {where}; it holds {names}")
    return None if ds is None else ds[variable]


def _from_dataarray(X: xr.DataArray, sample_dim: str | None, chunk_rows: int | None) -> InputData:
    if X.ndim != 2:
        _check_shape_dtype(X.shape, X.dtype)
    if sample_dim is None:
        sample_dim = str(X.dims[0])
    elif sample_dim not in X.dims:
        raise ValueError(f"sample_dim={sample_dim!r} is not a dimension of X; its dims are {list(X.dims)}")
    feature_dim = next(str(d) for d in X.dims if d != sample_dim)
    X = X.transpose(sample_dim, feature_dim)
    _check_shape_dtype(X.shape, X.dtype)
    arr = X.data if isinstance(X.data, da.Array) else da.from_array(np.asarray(X.data), chunks=(chunk_rows or DEFAULT_CHUNK_ROWS, -1))
    coords = {name: c.variable for name, c in X.coords.items() if c.dims == (sample_dim,)}
    feature_coord = np.asarray(X[feature_dim].values) if feature_dim in X.coords else None
    return InputData(
        _row_chunked(arr, chunk_rows),
        kind="xarray",
        sample_dim=sample_dim,
        feature_dim=feature_dim,
        coords=coords,
        feature_coord=feature_coord,
    )


def _from_memory(X: Any, chunk_rows: int | None) -> InputData:
    if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("X is a sparse matrix; streamem needs dense data (call X.toarray() if it fits in memory)")
    arr = np.asarray(X)
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"X has dtype object with values that are not numbers: {exc}") from None
    _check_shape_dtype(arr.shape, arr.dtype)
    rows = chunk_rows or DEFAULT_CHUNK_ROWS
    return InputData(da.from_array(arr, chunks=(rows, -1)), kind="numpy")


def _check_shape_dtype(shape: tuple[int, ...], dtype: Any) -> None:
    if len(shape) == 1:
        raise ValueError(
            f"X must be 2-D (n_samples, n_features), got a 1-D array of shape {tuple(shape)}; "
            "Reshape your data with X.reshape(-1, 1) if it holds a single feature"
        )
    if len(shape) != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got {len(shape)}-D shape {tuple(shape)}")
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise ValueError(f"Complex data not supported: X has dtype {dtype}; allowed: real numbers (bool, int, uint, float)")
    if dtype.kind not in "biuf":
        raise TypeError(f"X has non-numeric dtype {dtype}; allowed: real numbers (bool, int, uint, float)")
    if shape[0] == 0:
        raise ValueError(f"X has 0 rows (shape {tuple(shape)}); at least one sample is required")
    if shape[1] == 0:
        raise ValueError(f"X has 0 feature(s) (shape={tuple(shape)}) while a minimum of 1 is required.")


def _row_chunked(arr: da.Array, chunk_rows: int | None) -> da.Array:
    """Chunk along rows only (merging column chunks); optionally re-chunk rows."""
    if len(arr.chunks[1]) > 1:
        arr = arr.rechunk({1: -1})
    if chunk_rows is not None:
        arr = arr.rechunk({0: chunk_rows})
    return arr
