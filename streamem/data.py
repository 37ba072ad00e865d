"""Turn any supported input into a row-chunked dask array, with validation.

Supported inputs: numpy arrays (and other in-memory array-likes), dask arrays,
``zarr.Array``, a path to a Zarr array or group (v2 or v3), an
``xarray.DataArray`` with dims (sample, feature) and an ``xarray.Dataset``
with ``variable=``. Nothing here reads the data: checks that need the values
(non-finite entries) happen in the first data pass of the EM driver.

Zarr-backed input (paths, ``zarr.Array``, xarray opened from a path here) is
read through :class:`CheckedZarrReader`: Zarr itself reads a chunk file that
is not in the store as the fill value and lets a codec's error name neither
array nor chunk, so every chunk read checks that its chunk files exist and
names the array and the rows of a chunk that is missing or cannot be decoded.
A dask array or DataArray the user opened from Zarr is checked the same way
while it is the whole stored array as opened (see :func:`load_data`, Notes).

Local paths are spelled one way everywhere (:func:`normalise_location`):
``~`` expanded, absolute, symbolic links resolved.

A URL (``s3://``, ``gs://``, ``https://``, ...; with ``storage_options=``) or
a ``zarr`` store object is read the same way, chunk by chunk, through
:mod:`streamem.storage`; the URL is recorded without credentials.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

from streamem import storage

#: Rows per chunk when we chunk in-memory data.
DEFAULT_CHUNK_ROWS = 65_536
#: What a chunk file missing from a Zarr store means: an error, or the fill value.
MISSING_CHUNKS = ("raise", "fill")


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
        Where the data came from (for provenance and checkpoint
        fingerprints): the path of a local store as
        :func:`normalise_location` spells it, the store's URL otherwise, else
        ``"array"``.
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
        """Number of rows."""
        return int(self.array.shape[0])

    @property
    def n_features(self) -> int:
        """Number of columns."""
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
    missing_chunks: str = "raise",
    storage_options: dict[str, Any] | None = None,
) -> InputData:
    """Validate ``X`` and return it as a row-chunked dask array.

    Parameters
    ----------
    X : array-like, dask array, zarr.Array, str, os.PathLike, zarr store, xarray object
        The data, shape (n_samples, n_features). A path may start with
        ``~``; a URL (``s3://bucket/data.zarr``, ``gs://``, ``az://``,
        ``https://``, ...) is opened through fsspec, and a zarr store object
        (e.g. ``zarr.storage.ObjectStore``) as it is.
    variable : str, optional
        Which variable of a Zarr group or ``xarray.Dataset`` holds the data.
    sample_dim : str, optional
        Name of the sample dimension of an xarray input. By default the first
        dimension.
    chunk_rows : int, optional
        Rows per chunk for in-memory input (default 65,536); for stored input
        the storage chunking is kept unless this is given.
    missing_chunks : {"raise", "fill"}, default="raise"
        What a chunk file missing from a Zarr store means. ``"raise"``: an
        error naming the array and the chunk's rows when that chunk is read
        (a deleted chunk, or one an interrupted writer never wrote).
        ``"fill"``: read it as the array's fill value, as Zarr does - for
        stores that are sparse by design (Zarr does not write a chunk that
        holds only the fill value unless ``write_empty_chunks`` is on). A chunk
        that cannot be decoded is an error either way. See Notes for which
        inputs are checked.
    storage_options : dict, optional
        Options of a URL's fsspec backend (endpoint, region, credentials;
        see :mod:`streamem.storage` for the timeouts set by default).
        Ignored for other input.

    Returns
    -------
    InputData

    Notes
    -----
    Which inputs are checked for missing chunk files (``missing_chunks``):

    - checked: a path to a Zarr array or group; a ``zarr.Array``; a dask
      array made by ``dask.array.from_zarr`` (or ``from_array`` of a
      ``zarr.Array``); a DataArray (or Dataset) opened with
      ``xarray.open_zarr`` or ``xarray.open_dataset(engine="zarr")``, with
      or without dask - each only as opened: the whole stored array, in its
      stored dimension order;
    - not checked: any of these after an operation (slicing, ``isel`` /
      ``sel``, ``transpose``, arithmetic, ``rechunk``, concatenation, ...),
      and every other dask graph: streamem cannot see which store such an
      array reads, and Zarr reads a missing chunk as the fill value (zeros,
      or NaN for floats xarray wrote) without an error. To have such data
      checked, pass the store's path (with ``variable=``), or select rows
      after loading.
    """
    if chunk_rows is not None and (not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if missing_chunks not in MISSING_CHUNKS:
        raise ValueError(f"missing_chunks must be one of {MISSING_CHUNKS}, got {missing_chunks!r}")
    source = "array"
    store_meta: dict[str, Any] = {}
    if storage.is_remote(X):
        source = normalise_location(storage.describe(X))
        X, store_meta = _open_path(X, variable, sample_dim, missing_chunks, storage_options, source)
    elif isinstance(X, (str, os.PathLike)):
        # One spelling per store, so that provenance and checkpoint fingerprints agree.
        source = normalise_location(os.fspath(X))
        X, store_meta = _open_path(source, variable, sample_dim, missing_chunks)
    if isinstance(X, xr.Dataset):
        X = _select_variable(X, variable, list(X.data_vars))
    if isinstance(X, xr.DataArray):
        info = _from_dataarray(X, sample_dim, chunk_rows, missing_chunks)
    elif isinstance(X, zarr.Array):
        _check_shape_dtype(X.shape, X.dtype)
        store_meta = store_meta or {"path": zarr_location(X), "zarr_format": X.metadata.zarr_format}
        if source == "array":
            source = zarr_location(X)
        info = InputData(_row_chunked(_from_reader(CheckedZarrReader(X, missing_chunks)), chunk_rows), kind="dask")
    elif isinstance(X, zarr.Group):
        raise TypeError("X is a zarr.Group: pass the array itself, or the group's path with variable=")
    elif isinstance(X, da.Array):
        _check_known_chunks(X)
        _check_shape_dtype(X.shape, X.dtype)
        info = InputData(_row_chunked(_checked_dask(X, missing_chunks), chunk_rows), kind="dask")
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


def align_features(data: InputData, fitted: Any) -> InputData:
    """Put the columns of labelled input in the order of the feature coordinate seen at fit.

    Parameters
    ----------
    data : InputData
        Input to predict on; only xarray input with a feature coordinate is
        aligned (other input is used in position order).
    fitted : array-like or None
        The feature coordinate recorded at fit time (``feature_coord_``).

    Returns
    -------
    InputData
        ``data`` itself, its columns reordered lazily where the same labels
        came in another order.

    Raises
    ------
    ValueError
        When the labels are not those seen at fit, naming the missing and the
        unexpected ones (as scikit-learn refuses DataFrame columns that differ).
    """
    if fitted is None or data.feature_coord is None:
        return data
    # Labels compared as labels (pandas), not as Python values: datetime64[ns]
    # and [us] of the same instant are one label, NaN is NaN, 0 is 0.0.
    expected, given = _labels(fitted), _labels(data.feature_coord)
    missing = expected[~expected.isin(given)].tolist()
    unexpected = given[~given.isin(expected)].tolist()
    if missing or unexpected or not given.is_unique or not expected.is_unique:
        raise ValueError(
            f"X's feature coordinate {data.feature_dim!r} has labels {given.tolist()}, but the model was fitted on "
            f"{expected.tolist()}: missing {missing}, unexpected {unexpected}"
            + ("" if missing or unexpected else " (labels repeat, so columns cannot be matched by label)")
        )
    order = given.get_indexer(expected)
    if (order == np.arange(len(order))).all():
        return data
    data.array = data.array[:, order.tolist()]
    data.feature_coord = np.asarray(fitted)
    return data


def _labels(values: Any) -> pd.Index:
    """Feature labels as a pandas Index, compared by value whatever the dtype's unit or width."""
    return pd.Index(np.asarray(values), tupleize_cols=False)


def normalise_location(source: str) -> str:
    """One spelling of a data location, so that every way to name a store compares equal.

    A local path has ``~`` expanded and becomes absolute with ``.``, ``..``,
    symbolic links and trailing separators resolved (``os.path.realpath``);
    a ``file://`` URL counts as a local path. Other URLs lose a trailing
    ``/`` and any user name or password (credentials are never recorded;
    an Azure URL keeps its ``container@``), and ``http(s)://`` URLs their
    query and fragment (object keys keep ``?`` and ``#``: see
    :func:`streamem.storage.public_url`). ``"array"`` (in-memory data,
    which has no location) stays as it is. Idempotent.

    Parameters
    ----------
    source : str
        A path, a URL or ``"array"``.

    Returns
    -------
    str
    """
    if source == "array":
        return source
    if source.startswith("file://"):
        source = source[len("file://") :]
    elif "://" in source:
        return storage.public_url(source)
    return os.path.realpath(os.path.expanduser(source))


def zarr_location(array: zarr.Array) -> str:
    """Where a Zarr array lives: its path in a local store (see :func:`normalise_location`), else the store's URL."""
    store = array.store_path.store
    if isinstance(store, LocalStore):
        return normalise_location(os.path.join(os.fspath(store.root), array.store_path.path))
    return storage.store_name(store, array.store_path.path)


def _from_reader(reader: "CheckedZarrReader") -> da.Array:
    """A dask array with one task per Zarr chunk, each a checked read."""
    return da.from_array(
        reader,
        chunks=reader.array.chunks,
        # Each load its own keys: a store rewritten in place is never mistaken for data a cluster holds.
        name=f"zarr-read-{uuid.uuid4().hex}",
        meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
        lock=False,
        fancy=False,
    )


def _checked_dask(arr: da.Array, missing_chunks: str, row_axis: int = 0) -> da.Array:
    """``arr`` read through :class:`CheckedZarrReader` when it is a whole Zarr array as opened.

    Recognised: ``dask.array.from_zarr(z)`` and the dask array of a variable
    of ``xarray.open_zarr`` (with xarray's decoding), before any operation on
    them - a graph of exactly the source and the block reads, of the stored
    array's full shape. Anything else is returned as it is: its store, or
    which of its rows a chunk holds, cannot be known. With
    ``missing_chunks="fill"`` (Zarr's own behaviour) ``arr`` is returned too.
    """
    if missing_chunks == "fill":
        return arr
    traced = _zarr_source(arr)
    if traced is None:
        return arr
    zarray, values = traced
    checked = _from_reader(CheckedZarrReader(zarray, missing_chunks, values, row_axis))
    return checked if checked.chunks == arr.chunks else checked.rechunk(arr.chunks)


#: xarray's lazy wrappers that keep shape and element positions (decoding, copy-on-write, caching).
_POSITION_KEEPING_WRAPPERS = (
    "ImplicitToExplicitIndexingAdapter", "CopyOnWriteArray", "MemoryCachedArray", "_ElementwiseFunctionArray",
    "NativeEndiannessArray", "BoolTypeArray",
)  # fmt: skip


def _zarr_source(arr: da.Array) -> tuple[zarr.Array, Any] | None:
    """The Zarr array ``arr`` reads whole, and what to index for its values; None when not traceable."""
    graph = arr.__dask_graph__()
    source_layer = f"original-{arr.name}"
    layers = getattr(graph, "layers", {})
    if set(layers) != {source_layer, arr.name} or len(layers[source_layer]) != 1:
        return None
    (source,) = dict(layers[source_layer]).values()
    return _traced_zarr(source, arr.shape)


def _traced_zarr(source: Any, shape: tuple[int, ...]) -> tuple[zarr.Array, Any] | None:
    """The Zarr array under ``source`` (a zarr.Array or xarray's lazy wrappers of one) and ``source``;
    None when ``source`` is something else, or selects part of the stored array."""
    inner = source
    # Down xarray's wrappers (names, not imports: these classes are internal to xarray).
    for _ in range(16):
        name = type(inner).__name__
        if name == "LazilyIndexedArray" and not all(k == slice(None) for k in getattr(inner.key, "tuple", (None,))):
            return None  # a lazy selection: other rows than the store's
        if name in _POSITION_KEEPING_WRAPPERS or name == "LazilyIndexedArray":
            inner = inner.array
        elif name == "ZarrArrayWrapper":
            inner = getattr(inner, "_array", None)
        else:
            break
    shape = tuple(shape)
    if not isinstance(inner, zarr.Array) or tuple(inner.shape) != shape or tuple(getattr(source, "shape", ())) != shape:
        return None
    return inner, source


class StoreGoneError(FileNotFoundError):
    """The store being read was deleted (the array's metadata is gone): raised whatever ``missing_chunks`` says."""


class CheckedZarrReader:
    """Reads blocks of a Zarr array, refusing missing chunk files and naming undecodable ones.

    Zarr reads a chunk file that is not in the store as the fill value; here
    a read first asks the store whether the files of the chunks it covers
    exist (one request per chunk file, batched) unless ``missing_chunks`` is
    ``"fill"``. An error while decoding is re-raised as a ValueError naming
    the array and the chunk's rows (errors of the store itself, OSError,
    pass through). With sharding, the files are shards: a chunk missing
    inside a shard that exists reads as the fill value. For a store that is
    not local, a missing chunk (with ``"fill"``: every read) also checks that
    the array's metadata is still there: a store or bucket deleted while
    it is read is a :class:`StoreGoneError` (a FileNotFoundError naming the
    store), never missing chunks or the fill value. (The array's own
    metadata object is asked for: one request per read with ``"fill"``.)

    Parameters
    ----------
    array : zarr.Array
    missing_chunks : {"raise", "fill"}
        See :func:`load_data`.
    values : xarray.Variable, optional
        What to read instead of the raw array: xarray's lazily decoded view of
        it (masking, scaling), of the same shape.
    row_axis : int, default=0
        The axis of ``array`` that holds the samples (named in messages).
    """

    def __init__(self, array: zarr.Array, missing_chunks: str, values: Any = None, row_axis: int = 0):
        self.array = array
        self.values = array if values is None else values
        self.missing_chunks = missing_chunks
        self.row_axis = row_axis
        self.location = zarr_location(array)
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(self.values.dtype)
        self.ndim = len(self.shape)
        #: The grid of chunk files (shards when sharded).
        self.file_chunks = tuple(array.shards or array.chunks)
        #: Errors of a store that is not local are worded here (one line, the array named, no secrets).
        self.remote = not isinstance(array.store_path.store, LocalStore)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        files = list(self._files(key))
        try:
            if self.missing_chunks == "raise":
                self._check_present(files)
            block = self._read(key, files)
            if self.remote and self.missing_chunks == "fill":
                # A deleted store (or bucket) reads as missing chunks, i.e. as the fill value: not here.
                self._check_store()
            return block
        except StoreGoneError:
            raise
        except Exception as exc:
            if self.remote and storage.is_storage_error(exc):
                where = f"X: reading Zarr array {self.location} ({self._rows(files[0]) if files else 'no rows'})"
                raise storage.storage_error(exc, where, self.array.store_path.store) from None
            raise

    def _read(self, key: tuple[slice, ...], files: list[tuple[int, ...]]) -> np.ndarray:
        try:
            return np.asarray(self.values[key])
        except (OSError, MemoryError):
            raise
        except Exception as exc:
            if self.remote and storage.is_storage_error(exc):
                raise  # the store's error, not the data's: worded by __getitem__
            raise self._decode_error(files, exc) from exc

    def _files(self, key: tuple[slice, ...]) -> Iterator[tuple[int, ...]]:
        """Grid indices of the chunk files a block read touches."""
        ranges = []
        for sl, size, step in zip(key, self.shape, self.file_chunks):
            start, stop, _ = sl.indices(size)
            ranges.append(range(start // step, -(-stop // step)) if stop > start else range(0))
        return itertools.product(*ranges)

    def _key(self, index: tuple[int, ...]) -> str:
        key = self.array.metadata.encode_chunk_key(index)
        prefix = self.array.store_path.path
        return f"{prefix}/{key}" if prefix else key

    def _rows(self, index: tuple[int, ...]) -> str:
        step = self.file_chunks[self.row_axis]
        first = index[self.row_axis] * step
        return f"rows {first} to {min(first + step, self.shape[self.row_axis]) - 1}"

    def _check_present(self, files: list[tuple[int, ...]]) -> None:
        store = self.array.store_path.store
        keys = [self._key(index) for index in files]

        async def exist() -> list[bool]:
            return list(await asyncio.gather(*(store.exists(k) for k in keys)))

        for index, present in zip(files, zarr_sync(exist())):
            if not present:
                if self.remote:
                    self._check_store()  # the whole store gone, not one chunk
                raise ValueError(
                    f"X: chunk {self.array.metadata.encode_chunk_key(index)!r} of Zarr array {self.location} "
                    f"({self._rows(index)}) is missing from the store: it was deleted, or a writer was interrupted "
                    "before writing it. If the store is sparse by design (Zarr skips chunks that hold only the "
                    f"fill value, {_plain(self.array.fill_value)!r}, unless write_empty_chunks is on), pass "
                    "missing_chunks='fill' to read missing chunks as the fill value"
                )

    def _check_store(self) -> None:
        """Refuse to go on when the array's metadata is gone (the store, or its bucket, was deleted).

        Raises
        ------
        StoreGoneError
            A FileNotFoundError naming the store's URL.
        """
        store = self.array.store_path.store
        where = f"X: Zarr store {storage.store_name(store)}"
        # The array's own metadata: always there while the array is (a store's root may be an implicit group).
        prefix = self.array.store_path.path
        name = storage.ROOT if self.array.metadata.zarr_format == 3 else ".zarray"
        key = f"{prefix}/{name}" if prefix else name
        if not storage.run(store.exists(key), where, store):
            raise StoreGoneError(
                f"{where} does not exist any more: the metadata of Zarr array {self.location} is gone (the store or "
                "its bucket was deleted while it was read)"
            )

    def _decode_error(self, files: list[tuple[int, ...]], exc: Exception) -> ValueError:
        """Name the first chunk that fails on its own (the read may have spanned several)."""
        culprit = files[0] if files else None
        for index in files:
            region = tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in zip(index, self.file_chunks, self.shape))
            try:
                np.asarray(self.values[region])
            except Exception:
                culprit = index
                break
        where = "" if culprit is None else f"chunk {self.array.metadata.encode_chunk_key(culprit)!r} of "
        rows = "" if culprit is None else f" ({self._rows(culprit)})"
        return ValueError(
            f"X: {where}Zarr array {self.location}{rows} cannot be decoded ({type(exc).__name__}: {exc}); "
            "the chunk file is damaged: write it again from the source data"
        )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _open_path(
    path: Any,
    variable: str | None,
    sample_dim: str | None,
    missing_chunks: str,
    storage_options: dict[str, Any] | None = None,
    name: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Open a local path, a URL or a zarr store object (named ``name`` in messages) as an array or a variable."""
    target, node = _open_node(path, storage_options, name)
    path = name or path
    meta = {"path": path, "zarr_format": node.metadata.zarr_format}
    if isinstance(node, zarr.Array):
        if variable is not None:
            raise ValueError(f"variable={variable!r} was given, but {path!r} is a Zarr array, not a group")
        return node, meta
    # Asked for by name first: listing a group is one more request, and https:// stores cannot list.
    if variable is None or not isinstance(node.get(variable), zarr.Array):
        names = sorted(name for name, _ in node.arrays())
        _select_variable(None, variable, names, where=f"Zarr group {path!r}")
    meta["variable"] = variable
    try:
        # An xarray-written group carries coordinates we want to keep.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no consolidated metadata": fine here
            # Not chunked, not cached: indexing reads just that block, decoded.
            ds = xr.open_dataset(
                target, engine="zarr", chunks=None, cache=False, consolidated=None, zarr_format=node.metadata.zarr_format
            )
    except Exception:
        ds = None
    if ds is None or variable not in ds.data_vars:
        return node[variable], meta
    # xarray's lazily decoded values (masking, scaling), read through the checked reader.
    lazy = ds[variable]
    row_axis = lazy.dims.index(sample_dim) if sample_dim in lazy.dims else 0
    reader = CheckedZarrReader(node[variable], missing_chunks, lazy.variable, row_axis)
    return lazy.copy(data=_from_reader(reader)), meta


def _open_node(path: Any, storage_options: dict[str, Any] | None, name: str | None) -> tuple[Any, Any]:
    """What to open (a path or a store) and the Zarr array or group there."""
    if not storage.is_remote(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"X: path {path!r} does not exist")
        target = path
    else:
        target = storage.open_store(path, storage_options, read_only=True)
        where = f"X: {name}"
        present = storage.run(_has_root(target), where, target)
        if not present:
            raise FileNotFoundError(f"X: {name!r} does not exist (no Zarr metadata there)")
    try:
        node = zarr.open(target, mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        if storage.is_remote(path) and storage.is_storage_error(exc) and not isinstance(exc, FileNotFoundError):
            raise storage.storage_error(exc, f"X: {name}", target) from None
        raise ValueError(f"X: path {name or path!r} is not a Zarr array or group ({exc})") from None
    return target, node


async def _has_root(store: Any) -> bool:
    """Whether a store has Zarr root metadata (v3, or a v2 array or group)."""
    for key in (storage.ROOT, ".zarray", ".zgroup"):
        if await store.exists(key):
            return True
    return False


def _select_variable(ds: Any, variable: str | None, names: list[str], where: str = "the Dataset") -> Any:
    if variable is None:
        raise ValueError(f"X is {where}: pass variable= naming one of {names}")
    if variable not in names:
        raise ValueError(f"variable={variable!r} is not in {where}; it holds {names}")
    return None if ds is None else ds[variable]


def _from_dataarray(X: xr.DataArray, sample_dim: str | None, chunk_rows: int | None, missing_chunks: str) -> InputData:
    # ``X.data`` of an array xarray opened without dask reads it all: asked only of chunked ones.
    is_dask = X.chunks is not None and isinstance(X.data, da.Array)
    if is_dask:
        _check_known_chunks(X.data)
    if X.ndim != 2:
        _check_shape_dtype(X.shape, X.dtype)
    if sample_dim is None:
        sample_dim = str(X.dims[0])
    elif sample_dim not in X.dims:
        raise ValueError(f"sample_dim={sample_dim!r} is not a dimension of X; its dims are {list(X.dims)}")
    feature_dim = next(str(d) for d in X.dims if d != sample_dim)
    # Before transposing: only the array as opened can be traced to its store.
    row_axis = X.dims.index(sample_dim)
    if is_dask:
        X = X.copy(data=_checked_dask(X.data, missing_chunks, row_axis=row_axis))
    else:
        # Opened without dask (xarray.open_dataset(engine="zarr")): read lazily, chunk by checked chunk.
        traced = _traced_zarr(getattr(X.variable, "_data", None), X.shape)
        if traced is not None:
            X = X.copy(data=_from_reader(CheckedZarrReader(traced[0], missing_chunks, X.variable, row_axis)))
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


def _check_known_chunks(arr: da.Array) -> None:
    """Refuse dask arrays whose chunk sizes are unknown (NaN), e.g. after boolean indexing."""
    if any(np.isnan(c) for sizes in arr.chunks for c in sizes):
        raise ValueError(
            f"X is a dask array with unknown chunk sizes (NaN; shape {arr.shape}), e.g. after boolean indexing; "
            "call X = X.compute_chunk_sizes() first (one pass over the data)"
        )


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
