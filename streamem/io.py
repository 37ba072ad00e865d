"""Models and checkpoints as xarray Datasets in Zarr stores (no pickle).

A model store holds the parameters as variables with named dimensions
(``component``, ``feature``, ``feature_``), the input's feature coordinate
when it had one (attribute ``has_feature_coord``), and provenance in the
attributes. Writes go to a temporary name next to the target and are swapped
into place (:func:`atomic_write`), and :func:`open_dataset` reads again a
store swapped while it read, so a reader sees the old store or the new one,
never half of one. A write replaces only a store streamem wrote (its
``format`` attribute is one of :data:`STREAMEM_FORMATS`). Paths may start
with ``~``.

Every function that takes a path also takes a URL (``s3://``, ``gs://``,
``https://``, ...; with ``storage_options=``) or a ``zarr`` store object. There
rename does not exist: a store is written with its root metadata last and
counts as absent without it (see :mod:`streamem.storage`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import numbers
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable

import dask
import dask.base
import dask.system
import dask.threaded
import numpy as np
import xarray as xr
import zarr

from streamem import storage

#: Increase when the layout changes; readers refuse newer versions.
FORMAT_VERSION = 1
FORMAT_NAME = "streamem-model"
#: The format of a store of per-row results (``streamem predict``), stamped by :func:`write_dataset`.
PREDICTIONS_FORMAT = "streamem-predictions"
#: The ``format`` attributes of the stores streamem writes: the only stores ``overwrite=True`` replaces.
STREAMEM_FORMATS = (FORMAT_NAME, "streamem-stats", "streamem-checkpoint", PREDICTIONS_FORMAT)
#: The format of the data ``streamem generate`` writes: data, an input, so only ``generate`` replaces it.
GENERATED_FORMAT = "streamem-generated"

#: Model-file variables of the online state besides its statistics (absent from older files, which still load).
_ONLINE_CENTER = "online_center"


def stats_dims(name: str, family: Any) -> tuple[str, ...]:
    """Dimensions of statistic ``name`` of ``family`` (``n`` and ``loglik`` are scalars)."""
    return family.stat_dims(name)


def params_dataset(params: Any, family: Any, feature_coord: np.ndarray | None = None) -> xr.Dataset:
    """Mixture parameters (``weights`` and the family's arrays) as a Dataset."""
    arrays = family.param_arrays(params)
    K = len(arrays["weights"])
    d = next(v.shape[1] for name, v in arrays.items() if family.param_dims(name)[:2] == ("component", "feature"))
    features = np.arange(d) if feature_coord is None else np.asarray(feature_coord)
    if features.dtype.kind == "U":
        # Zarr v3 specifies variable-length strings, not fixed-width ones.
        features = features.astype(object)
    variables = {name: (("component",) if name == "weights" else family.param_dims(name), value) for name, value in arrays.items()}
    coords = {"component": np.arange(K), "feature": features}
    if any("feature_" in dims for dims, _ in variables.values()):
        coords["feature_"] = features
    return xr.Dataset(variables, coords=coords)


def atomic_write(
    path: Any,
    write: Callable[[Any], None],
    *,
    overwrite: bool,
    storage_options: dict[str, Any] | None = None,
    formats: tuple[str, ...] = STREAMEM_FORMATS,
) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then move it into place.

    For a URL or a zarr store object ``path``, ``write`` gets a store to
    write into instead, and the store appears complete or not at all by
    the protocol of :func:`streamem.storage.write_store` (root metadata
    last; an overwrite deletes the old store first, so an interrupted one
    leaves no store). ``storage_options`` are the backend's options for a
    URL; local paths ignore them.

    An existing ``path`` is refused (FileExistsError) unless ``overwrite``;
    it is replaced only after the new store is complete and on disk, and
    only when it is a store of ``formats`` (:func:`check_replaceable`,
    checked before ``write`` is called). ``~`` in ``path`` is expanded and
    the path normalised (``g.zarr/.`` is ``g.zarr``, never a name inside it).

    On Linux the new store is swapped in with ``renameat2(RENAME_EXCHANGE)``
    (and created with ``RENAME_NOREPLACE``): at every moment ``path`` holds
    the old store or the new one, concurrent writers each either win (the
    last swap stays) or are refused (``overwrite=False``), and nothing is
    left beside ``path``. A reader that is inside the old store when it is
    swapped out may see it removed under it: :func:`open_dataset` notices
    and reads again. Where ``renameat2`` is missing (other systems, some
    file systems) two renames are used instead: for a moment there is no
    store at ``path``, and two concurrent creators may both succeed (the
    later one wins).
    """
    if storage.is_remote(path):
        storage.write_store(path, write, overwrite=overwrite, storage_options=storage_options,
                            replaceable=lambda attrs: _foreign_attrs(attrs, formats))  # fmt: skip
        return
    # normpath: 'g.zarr/.' would put the temporary store inside g.zarr and rename onto '.'.
    path = os.path.normpath(os.path.expanduser(os.fspath(path)))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    if overwrite:
        check_replaceable(path, formats=formats)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path!r}: directory {parent!r} does not exist")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        _fsync_tree(tmp)
        stale = _install(tmp, path) if overwrite else _create(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(parent)
    for old in stale:
        _remove(old)


def check_replaceable(
    path: Any, storage_options: dict[str, Any] | None = None, *, formats: tuple[str, ...] = STREAMEM_FORMATS
) -> None:
    """Refuse to replace ``path`` unless nothing is there or it is a store streamem wrote.

    A store streamem wrote has a ``format`` attribute in ``formats``
    (default :data:`STREAMEM_FORMATS`; :func:`streamem.generate.generate`
    replaces only its own data, :data:`GENERATED_FORMAT`); anything else
    (the user's data, a directory, a file; at a URL: objects that are not a
    Zarr store) is refused, so ``--overwrite`` cannot destroy an input given
    as the output by mistake.

    Raises
    ------
    ValueError
        Naming ``path`` and what it holds.
    """
    if storage.is_remote(path):
        where = storage.describe(path)
        state, attrs = storage.store_state(storage.open_store(path, storage_options, read_only=True), where)
        held = _foreign_attrs(attrs, formats) if state == "store" else "objects that are not a Zarr store" if state == "foreign" else None
        if held is not None:
            raise ValueError(storage.replaceable_message(where, held) if formats == STREAMEM_FORMATS
                             else _refusal(where, held, formats))  # fmt: skip
        return
    path = os.path.expanduser(os.fspath(path))
    for _ in range(_OPEN_ATTEMPTS):
        before = _identity(path)
        held = _foreign_content(path, formats)
        if held is None:
            return
        if _identity(path) == before:  # not a store swapped in or out while we looked
            break
    raise ValueError(_refusal(path, held, formats))


def _refusal(where: str, held: str, formats: tuple[str, ...]) -> str:
    """The refusal to replace ``where``, which holds ``held`` (a description) and is not one of ``formats``."""
    if formats == STREAMEM_FORMATS:
        what, own = "a store written by streamem", "streamem's own stores"
    else:
        what, own = "data written by streamem generate", "such data"
    return (f"{where!r} holds {held}, not {what}; overwrite=True (--overwrite) replaces only "
            f"{own} (format attribute one of {list(formats)}): remove it yourself or write elsewhere")


def _foreign_attrs(attrs: dict[str, Any], formats: tuple[str, ...] = STREAMEM_FORMATS) -> str | None:
    """What a Zarr store with root attributes ``attrs`` is, when it is not one of ``formats`` (None: it is)."""
    fmt = attrs.get("format")
    if fmt in formats or (fmt is None and GENERATED_FORMAT in formats and _generated_before_format(attrs)):
        return None
    return f"a Zarr store whose 'format' attribute is {fmt!r}"


def _generated_before_format(attrs: dict[str, Any]) -> bool:
    """Data ``streamem generate`` wrote before it stamped a ``format``: its ``generator`` attribute
    and the true parameters (a user's array with a stray ``generator`` key alone is not)."""
    return attrs.get("generator") == "streamem.generate" and {"weights", "means", "covariances", "seed"} <= attrs.keys()


def _foreign_content(path: str, formats: tuple[str, ...] = STREAMEM_FORMATS) -> str | None:
    """What is at ``path`` when it is not a store of ``formats`` (None: nothing there, or such a store)."""
    if not os.path.lexists(path):
        return None
    if not os.path.exists(path):
        return "a symbolic link to a missing target"
    if not os.path.isdir(path):
        return "a file"
    for meta, key in (("zarr.json", "attributes"), (".zattrs", None)):
        meta_path = os.path.join(path, meta)
        if not os.path.isfile(meta_path):
            continue
        try:
            with open(meta_path) as fh:
                doc = json.load(fh)
            attrs = doc.get(key, {}) if key else doc
        except (OSError, ValueError, AttributeError):
            return f"a directory with an unreadable {meta}"
        return _foreign_attrs(attrs if isinstance(attrs, dict) else {}, formats)
    if os.path.isfile(os.path.join(path, ".zarray")) or os.path.isfile(os.path.join(path, ".zgroup")):
        return "a Zarr store whose 'format' attribute is None"
    return "a directory that is not a Zarr store"


#: renameat2 flags (linux/fs.h) and the "current directory" descriptor.
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
#: How often an overwrite retries when concurrent writers keep taking the path.
_INSTALL_ATTEMPTS = 100


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def _rename2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it.

    Raises OSError (FileNotFoundError, FileExistsError, ...) for other failures.
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _create(tmp: str, path: str) -> list[str]:
    """Move ``tmp`` to ``path``, refusing an existing ``path``; returns nothing to remove."""
    refused = FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    try:
        if _rename2(tmp, path, _RENAME_NOREPLACE):
            return []
    except FileExistsError:
        raise refused from None
    # Fallback: a writer that creates ``path`` between this check and the rename may be replaced.
    if os.path.lexists(path):
        raise refused
    try:
        os.rename(tmp, path)
    except OSError:
        if os.path.lexists(path):
            raise refused from None
        raise
    return []


def _install(tmp: str, path: str) -> list[str]:
    """Put ``tmp`` at ``path`` whatever is there; returns where the replaced store now is."""
    for _ in range(_INSTALL_ATTEMPTS):
        try:
            if _rename2(tmp, path, _RENAME_EXCHANGE):
                return [tmp]  # the old store now lives at the temporary name
            return _install_by_two_renames(tmp, path)
        except FileNotFoundError:  # nothing at ``path`` to exchange with
            pass
        try:
            if _rename2(tmp, path, _RENAME_NOREPLACE):
                return []
            return _install_by_two_renames(tmp, path)
        except FileExistsError:  # another writer got there first: exchange with its store
            continue
    raise OSError(f"cannot replace {path!r}: other writers kept replacing it ({_INSTALL_ATTEMPTS} attempts)")


def _install_by_two_renames(tmp: str, path: str) -> list[str]:
    """Move the old store aside, then ``tmp`` into place (a moment without a store)."""
    moved: list[str] = []
    try:
        for _ in range(_INSTALL_ATTEMPTS):
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, old)
                moved.append(old)
            except FileNotFoundError:
                pass
            try:
                os.rename(tmp, path)
                return moved
            except OSError:
                if not os.path.lexists(path):
                    raise
                # Another writer put its store there in between: move that aside too.
        raise OSError(f"cannot replace {path!r}: other writers kept replacing it ({_INSTALL_ATTEMPTS} attempts)")
    except BaseException:
        if moved and not os.path.lexists(path):
            os.rename(moved.pop(), path)  # put the newest old store back
        for old in moved:
            _remove(old)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _fsync_tree(root: str) -> None:
    # Data must be on disk before the rename makes it visible.
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    # The rename itself must be on disk too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksums(ds: xr.Dataset) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(ds[name].values).tobytes()).hexdigest()[:32] for name in sorted(ds.data_vars)}


def write_dataset(
    ds: xr.Dataset,
    path: Any,
    *,
    overwrite: bool,
    checksum: bool = True,
    format_name: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``ds`` to a Zarr v3 store at ``path`` (a path, a URL or a zarr store object), atomically.

    With ``checksum`` (for small, in-memory datasets: models, checkpoints,
    statistics) a hash of every variable goes into the attributes so that
    :func:`open_dataset` notices missing or altered chunks, which Zarr would
    otherwise read back as fill values.

    The store's ``format`` attribute is ``format_name``, else the one ``ds``
    has, else :data:`PREDICTIONS_FORMAT` (per-row results carry no format
    of their own); with it a later ``overwrite=True`` may replace the store.

    Dask-backed variables are computed on the current scheduler; when that
    fails, the error is raised only after every write task has stopped, so
    that no task re-creates the temporary store after it is removed.
    """
    fmt = format_name or ds.attrs.get("format") or PREDICTIONS_FORMAT
    ds = ds.assign_attrs(format=fmt, format_version=ds.attrs.get("format_version", FORMAT_VERSION))
    if checksum:
        ds = ds.assign_attrs(checksums=json.dumps(_checksums(ds)))
    atomic_write(path, lambda tmp: _to_zarr(ds, tmp), overwrite=overwrite, storage_options=storage_options)


def _to_zarr(ds: xr.Dataset, path: Any) -> None:
    if not dask.is_dask_collection(ds) and storage.is_store(path):
        # xarray writes a store's objects one request after another: in memory first, then all at once.
        memory = zarr.storage.MemoryStore()
        ds.to_zarr(memory, mode="w-", zarr_format=3, consolidated=False)
        storage.upload(memory, path, storage.store_name(path))
        return
    if not dask.is_dask_collection(ds):
        ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=False)
        return
    _compute_writes(ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=False, compute=False))


def _compute_writes(writes: Any) -> None:
    """Compute a dask graph that writes chunks; if it fails, raise once no write task runs any more.

    A failed task ends ``dask.compute`` at once while the other tasks keep
    running (threads of the local scheduler, workers of a cluster), and they
    would write into a store its caller is about to remove. On a
    ``distributed`` client every chunk write is its own future and all are
    waited for; on the threaded scheduler the pool is shut down with
    ``wait=True``. Other schedulers run as they are (the synchronous one has
    nothing else running; the multiprocessing one is not covered).
    """
    from distributed import Client

    scheduler = dask.base.get_scheduler(collections=[writes])
    client = getattr(scheduler, "__self__", None)  # the scheduler of a client is its bound ``get``
    if isinstance(client, Client):
        _compute_on_client(client, writes)
    elif scheduler is dask.threaded.get:
        workers = dask.config.get("num_workers", None) or dask.system.CPU_COUNT
        with ThreadPoolExecutor(workers) as pool:  # leaving it waits for every running task
            dask.compute(writes, scheduler="threads", pool=pool)
    else:
        dask.compute(writes)


def _compute_on_client(client: Any, writes: Any) -> None:
    from distributed import wait

    graph = dict(writes.__dask_graph__())
    # The chunk writes of ``dask.array.store`` (which xarray's to_zarr uses), each its own future.
    # Should dask name them otherwise, only the final key is waited for: the behaviour of dask.compute.
    keys = [k for k in graph if str(k[0] if isinstance(k, tuple) else k).startswith("store-map-")]
    futures = client.get(graph, [*keys, writes.key], sync=False)
    wait(futures)  # finished or failed, every one: then none of them is still writing
    for future in futures:
        if future.status == "error":
            future.result()  # raises the task's error


#: How often :func:`open_dataset` reads again a store that was replaced while it read it.
_OPEN_ATTEMPTS = 20


def open_dataset(path: Any, what: str = FORMAT_NAME, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a store written by streamem, checking format name, version and checksums.

    A store replaced while it is read (:func:`atomic_write` by another
    process) is read again, so the result is the old store or the new one.
    ``~`` in ``path`` is expanded. ``path`` may be a URL (opened with
    ``storage_options``) or a zarr store object; there a store without its
    root metadata does not exist (an interrupted write, see
    :mod:`streamem.storage`).
    """
    if storage.is_remote(path):
        where = storage.describe(path)
        store = storage.open_store(path, storage_options, read_only=True)
        identity: Callable[[], Any] = lambda: storage.identity(store, where)  # noqa: E731
        target: Any = store
    else:
        where = target = os.path.expanduser(os.fspath(path))
        identity = lambda: _identity(where)  # noqa: E731
    for attempt in range(_OPEN_ATTEMPTS):
        before = identity()
        try:
            ds = _open_once(target, what, where, exists=before is not None)
        except (FileNotFoundError, ValueError):
            if attempt == _OPEN_ATTEMPTS - 1 or before is None or identity() == before:
                raise
            continue
        if attempt == _OPEN_ATTEMPTS - 1 or identity() == before:
            return ds
    raise AssertionError("unreachable")


def _identity(path: str) -> tuple[int, ...] | None:
    """What changes when a store is swapped for another (None: nothing there)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _open_once(target: Any, what: str, path: str, exists: bool) -> xr.Dataset:
    """Open ``target`` (a local path or a store), named ``path`` in messages."""
    remote = storage.is_store(target)
    if not (exists if remote else os.path.exists(path)):
        raise FileNotFoundError(f"{path!r} does not exist" + (" (no Zarr root metadata there)" if remote else ""))
    if remote:
        fmt = (storage.root_attributes(target, path) or {}).get("format")
        if fmt != what:  # refused before anything else is read (a data set given as a model, say)
            raise ValueError(f"{path!r} is not a {what} store (its 'format' attribute is {fmt!r})")
    try:
        if remote:
            # Every object at once (one listing, concurrent reads), not xarray's one request after another.
            target = storage.download(target, path) or target
        ds = xr.open_zarr(target, consolidated=False, chunks=None)
    except Exception as exc:
        if remote and storage.is_storage_error(exc):
            raise storage.storage_error(exc, path, target) from None
        raise ValueError(f"{path!r} is not a {what} store (cannot open it as an xarray Zarr store: {exc})") from None
    fmt = ds.attrs.get("format")
    if fmt != what:
        raise ValueError(f"{path!r} is not a {what} store (its 'format' attribute is {fmt!r})")
    version = ds.attrs.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format_version {version!r}; this streamem (format {FORMAT_VERSION}) "
            "cannot read it: upgrade streamem"
        )
    try:
        ds = ds.load()
    except Exception as exc:
        if remote and storage.is_storage_error(exc) and not isinstance(exc, FileNotFoundError):
            raise storage.storage_error(exc, path, target) from None
        raise ValueError(f"{path!r} is truncated or corrupt: {exc}") from None
    if "checksums" in ds.attrs:
        expected = json.loads(ds.attrs["checksums"])
        actual = _checksums(ds)
        bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        if bad:
            raise ValueError(f"{path!r} is truncated or corrupt: variables {bad} do not match their checksums")
    return ds


def stored_params(model: Any) -> dict[str, Any]:
    """The estimator parameters a model file keeps, as JSON values (arrays and clients are not kept)."""
    names = [n for n in model.get_params(deep=False) if n != "client" and not (n.endswith("_init") and n != "n_init")]
    return {name: _jsonable(name, getattr(model, name)) for name in names}


def save_model(model: Any, path: Any, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> None:
    """Save a fitted estimator to a Zarr store: a path, a URL or a zarr store object (see :meth:`MixtureEstimator.save`)."""
    from sklearn.utils.validation import check_is_fitted

    import streamem

    check_is_fitted(model)
    family = model._family()
    ds = params_dataset(model._params(), family, getattr(model, "feature_coord_", None))
    ds["lower_bounds"] = (("iteration",), np.asarray(model.lower_bounds_, dtype=np.float64))
    ds = ds.assign_coords(iteration=np.arange(1, len(model.lower_bounds_) + 1))
    online = getattr(model, "online_stats_", None)
    if online is not None:
        for k, value in online.items():
            ds[f"online_{k}"] = (stats_dims(k, family), value)
        if model.online_center_ is not None:
            ds[_ONLINE_CENTER] = (("component", "feature"), model.online_center_)
    names = getattr(model, "feature_names_in_", None)
    ds.attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "streamem_version": streamem.__version__,
        "model_class": type(model).__name__,
        "family": family.name,
        "params": json.dumps(stored_params(model)),
        "prior": json.dumps(_jsonable("prior_", getattr(model, "prior_", None))),
        "init_weights": None if model.weights_init is None else [float(w) for w in np.asarray(model.weights_init)],
        "n_features_in": int(model.n_features_in_),
        "feature_names_in": None if names is None else [str(n) for n in names],
        # Explicit: a coordinate 0..d-1 and no coordinate are both stored as 0..d-1.
        "has_feature_coord": getattr(model, "feature_coord_", None) is not None,
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "lower_bound": float(model.lower_bound_),
        "n_steps": float(getattr(model, "n_steps_", 0.0)),
        "n_rows_seen": int(model._rows_seen()),
        "fit_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{f"data_{k}": v for k, v in getattr(model, "fit_data_", {}).items()},
    }
    write_dataset(ds, path, overwrite=overwrite, storage_options=storage_options)


def load_model(path: Any, storage_options: dict[str, Any] | None = None) -> Any:
    """Load a model saved by :meth:`MixtureEstimator.save`: the class is found by the name the file records.

    Parameters
    ----------
    path : str, os.PathLike or zarr store
        A local path, a URL (``s3://``, ``gs://``, ``https://``, ...) or a
        zarr store object.
    storage_options : dict, optional
        Options of the URL's fsspec backend (see :mod:`streamem.storage`).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist (at a URL: has no root metadata).
    OSError
        A URL's endpoint cannot be reached, or refuses access.
    ValueError
        ``path`` is not a streamem model, is truncated, or was written by a
        newer streamem.
    """
    from streamem.estimators import estimator_class  # the package: every built-in class registered

    ds = open_dataset(path, storage_options=storage_options)
    name = storage.describe(path)
    try:
        cls = estimator_class(ds.attrs.get("model_class"))
    except ValueError as exc:
        raise ValueError(f"{name!r}: {exc}") from None
    family_name = ds.attrs.get("family", "gaussian")  # files before other families were Gaussian
    if family_name != cls.family_class.name:
        raise ValueError(f"{name!r} names family {family_name!r} but model class {cls.__name__} "
                         f"(family {cls.family_class.name!r}): the file is not consistent")  # fmt: skip
    try:
        params = json.loads(ds.attrs["params"])
        if params.get("algorithm") == "stepwise":
            params.setdefault("average", False)  # a stepwise fit saved before averaging existed did not average
        model = cls(**params)
        if ds.attrs.get("init_weights") is not None:  # learn_weights=False keeps them
            model.weights_init = np.asarray(ds.attrs["init_weights"], dtype=np.float64)
        model.prior_ = _from_json(json.loads(ds.attrs.get("prior", "null")))
        model.weights_ = ds["weights"].values  # _family() below reads the fitted prior
        family = model._family()
        params = family.make_params(**{name: ds[name].values for name in ("weights", *family.param_names)})
        model._set_params(family, params)
        model.n_features_in_ = int(ds.attrs["n_features_in"])
        model.lower_bounds_ = [float(v) for v in ds["lower_bounds"].values]
        model.n_iter_ = int(ds.attrs["n_iter"])
        model.converged_ = bool(ds.attrs["converged"])
        model.lower_bound_ = float(ds.attrs["lower_bound"])
        model.feature_coord_ = _feature_coord(ds)
        if ds.attrs.get("feature_names_in"):
            model.feature_names_in_ = np.asarray(ds.attrs["feature_names_in"], dtype=object)
        model.fit_data_ = {k[5:]: v for k, v in ds.attrs.items() if k.startswith("data_")}
        online = {name[len("online_"):]: ds[name].values for name in ds.data_vars if name.startswith("online_") and name != _ONLINE_CENTER}
        if online and (family.center(params) is None or _ONLINE_CENTER in ds):
            model.online_stats_ = online
            model.online_center_ = ds[_ONLINE_CENTER].values if _ONLINE_CENTER in ds else None
            model.n_steps_ = float(ds.attrs["n_steps"])
        if "n_rows_seen" in ds.attrs:
            model.n_rows_seen_ = int(ds.attrs["n_rows_seen"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name!r} is not a complete streamem model: {exc}") from None
    weights = model.weights_
    if weights.shape != (model.n_components,):
        raise ValueError(f"{name!r} is not a complete streamem model: weights have shape {weights.shape}")
    return model


def _from_json(value: Any) -> Any:
    """A prior read back from JSON: lists become arrays."""
    if isinstance(value, dict):
        return {k: np.asarray(v, dtype=np.float64) if isinstance(v, list) else v for k, v in value.items()}
    return value


def _feature_coord(ds: xr.Dataset) -> np.ndarray | None:
    """The model's feature coordinate, or None when it was fitted without one."""
    coord = ds["feature"].values
    has = ds.attrs.get("has_feature_coord")
    if has is None:  # files of streamem before the flag: 0..d-1 stood for "no coordinate"
        return None if np.array_equal(coord, np.arange(len(coord))) else coord
    return coord if has else None


def json_value(value: Any) -> Any:
    """``value`` as a JSON-native value: numpy scalars as Python numbers, dtypes by name.

    Raises
    ------
    TypeError
        ``value`` is not None, a bool, a string, a real number or a dtype.
    """
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return np.dtype(value).name
    raise TypeError(f"{value!r} of type {type(value).__name__} has no JSON form")


def _jsonable(name: str, value: Any) -> Any:
    """An estimator parameter for the model file (a RandomState instance is stored as None)."""
    if isinstance(value, (np.random.RandomState, np.random.Generator)):
        return None  # not reproducible from a file
    if isinstance(value, dict):
        return {str(k): _jsonable(f"{name}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value).tolist() if np.asarray(value).dtype.kind in "fiub" else [_jsonable(name, v) for v in value]
    try:
        return json_value(value)
    except TypeError:
        raise TypeError(f"cannot save parameter {name}={value!r}: allowed are numbers, strings, None and dtypes") from None
