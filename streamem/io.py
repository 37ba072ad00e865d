"""Models and checkpoints as xarray Datasets in Zarr stores (no pickle).

A model store holds the parameters as variables with named dimensions
(``component``, ``feature``, ``feature_``), the input's feature coordinate
when it had one, and provenance in the attributes. Writes go to a temporary
name next to the target and are renamed into place, so a reader sees the old
store or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import xarray as xr

#: Increase when the layout changes; readers refuse newer versions.
FORMAT_VERSION = 1
FORMAT_NAME = "streamem-model"

_PARAM_DIMS = {
    "full": ("component", "feature", "feature_"),
    "tied": ("feature", "feature_"),
    "diag": ("component", "feature"),
    "spherical": ("component",),
}
#: Estimator parameters that are stored (arrays and clients are not).
_STORED_PARAMS = (
    "n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
    "random_state", "warm_start", "verbose", "verbose_interval", "init_sample_size", "dtype", "persist", "device",
)  # fmt: skip


def params_dataset(params: Any, covariance_type: str, feature_coord: np.ndarray | None = None) -> xr.Dataset:
    """Mixture parameters (weights, means, covariances, precisions_cholesky) as a Dataset."""
    K, d = params.means.shape
    features = np.arange(d) if feature_coord is None else np.asarray(feature_coord)
    if features.dtype.kind == "U":
        # Zarr v3 specifies variable-length strings, not fixed-width ones.
        features = features.astype(object)
    cov_dims = _PARAM_DIMS[covariance_type]
    return xr.Dataset(
        {
            "weights": (("component",), params.weights),
            "means": (("component", "feature"), params.means),
            "covariances": (cov_dims, params.covariances),
            "precisions_cholesky": (cov_dims, params.precisions_cholesky),
        },
        coords={"component": np.arange(K), "feature": features, "feature_": features},
    )


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it into place.

    An existing ``path`` is refused unless ``overwrite``; it is replaced only
    after the new store is complete.
    """
    path = os.fspath(path).rstrip(os.sep)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path!r}: directory {parent!r} does not exist")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    old = f"{path}.old-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        _fsync_tree(tmp)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(path):
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: str) -> None:
    # Data must be on disk before the rename makes it visible.
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _checksums(ds: xr.Dataset) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(ds[name].values).tobytes()).hexdigest()[:32] for name in sorted(ds.data_vars)}


def write_dataset(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool, checksum: bool = True) -> None:
    """Write ``ds`` to a Zarr v3 store at ``path``, atomically.

    With ``checksum`` (for small, in-memory datasets: models, checkpoints,
    statistics) a hash of every variable goes into the attributes so that
    :func:`open_dataset` notices missing or altered chunks, which Zarr would
    otherwise read back as fill values.
    """
    if checksum:
        ds = ds.assign_attrs(checksums=json.dumps(_checksums(ds)))
    atomic_write(path, lambda tmp: ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False), overwrite=overwrite)


def open_dataset(path: str | os.PathLike, what: str = FORMAT_NAME) -> xr.Dataset:
    """Open a store written by streamem, checking format name, version and checksums."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks=None)
    except Exception as exc:
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
        raise ValueError(f"{path!r} is truncated or corrupt: {exc}") from None
    if "checksums" in ds.attrs:
        expected = json.loads(ds.attrs["checksums"])
        actual = _checksums(ds)
        bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        if bad:
            raise ValueError(f"{path!r} is truncated or corrupt: variables {bad} do not match their checksums")
    return ds


def save_model(model: Any, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Save a fitted ``GaussianMixture`` to a Zarr store (see :meth:`GaussianMixture.save`)."""
    from sklearn.utils.validation import check_is_fitted

    import streamem

    check_is_fitted(model)
    ds = params_dataset(model._params(), model.covariance_type, getattr(model, "feature_coord_", None))
    ds["lower_bounds"] = (("iteration",), np.asarray(model.lower_bounds_, dtype=np.float64))
    ds = ds.assign_coords(iteration=np.arange(1, len(model.lower_bounds_) + 1))
    names = getattr(model, "feature_names_in_", None)
    ds.attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "streamem_version": streamem.__version__,
        "model_class": type(model).__name__,
        "params": json.dumps({k: _jsonable(getattr(model, k)) for k in _STORED_PARAMS}),
        "n_features_in": int(model.n_features_in_),
        "feature_names_in": None if names is None else [str(n) for n in names],
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "lower_bound": float(model.lower_bound_),
        "fit_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{f"data_{k}": v for k, v in getattr(model, "fit_data_", {}).items()},
    }
    write_dataset(ds, path, overwrite=overwrite)


def load_model(path: str | os.PathLike) -> Any:
    """Load a model saved by :meth:`GaussianMixture.save`.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a streamem model, is truncated, or was written by a
        newer streamem.
    """
    from streamem.families.gaussian import GaussianParams
    from streamem.mixture import GaussianMixture

    ds = open_dataset(path)
    if ds.attrs.get("model_class") != "GaussianMixture":
        raise ValueError(f"{os.fspath(path)!r} holds a {ds.attrs.get('model_class')!r}, not a GaussianMixture")
    try:
        model = GaussianMixture(**json.loads(ds.attrs["params"]))
        params = GaussianParams(*(ds[v].values for v in ("weights", "means", "covariances", "precisions_cholesky")))
        model._set_params(model._family(), params)
        model.n_features_in_ = int(ds.attrs["n_features_in"])
        model.lower_bounds_ = [float(v) for v in ds["lower_bounds"].values]
        model.n_iter_ = int(ds.attrs["n_iter"])
        model.converged_ = bool(ds.attrs["converged"])
        model.lower_bound_ = float(ds.attrs["lower_bound"])
        coord = ds["feature"].values
        model.feature_coord_ = None if np.array_equal(coord, np.arange(len(coord))) else coord
        if ds.attrs.get("feature_names_in"):
            model.feature_names_in_ = np.asarray(ds.attrs["feature_names_in"], dtype=object)
        model.fit_data_ = {k[5:]: v for k, v in ds.attrs.items() if k.startswith("data_")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a complete streamem model: {exc}") from None
    if model.means_.shape != (model.n_components, model.n_features_in_):
        raise ValueError(f"{os.fspath(path)!r} is not a complete streamem model: means have shape {model.means_.shape}")
    return model


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # e.g. a RandomState instance: not reproducible from a file
