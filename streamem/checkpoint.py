"""Checkpoints of a running fit, safe against a kill at any moment.

A checkpoint is a directory::

    PATH/LATEST                      the name of the current state, replaced atomically
    PATH/state-<iteration>-<id>.zarr an xarray Dataset: every run's parameters,
                                     lower bounds, iteration, settings, data fingerprint

A new state is written completely (and fsync'ed) before ``LATEST`` is
switched to it by ``os.replace``; older states are deleted afterwards. A kill
at any moment therefore leaves ``LATEST`` naming a complete state: the
previous one or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any

import dask
import numpy as np
import xarray as xr

from streamem.backend import to_numpy
from streamem.data import InputData
from streamem.em import EMRun
from streamem.io import FORMAT_VERSION, params_dataset, write_dataset

FORMAT_NAME = "streamem-checkpoint"
_POINTER = "LATEST"


#: Rows at each end of the data whose values go into the fingerprint.
FINGERPRINT_ROWS = 16


def data_fingerprint(data: InputData, scheduler: Any = "threads") -> dict[str, Any]:
    """What identifies the data: shape, dtype, row chunks, source, store metadata,
    and a hash of the first and last :data:`FINGERPRINT_ROWS` rows.

    The values of rows in between are not read (that would cost a pass):
    data rewritten in place with the same shape and the same first and last
    rows are not told apart.
    """
    a = data.array
    head, tail = dask.compute(a[:FINGERPRINT_ROWS], a[-FINGERPRINT_ROWS:], scheduler=scheduler)
    values = hashlib.sha256(to_numpy(head).tobytes() + to_numpy(tail).tobytes()).hexdigest()[:16]
    return {
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "row_chunks": hashlib.sha256(np.asarray(a.chunks[0]).tobytes()).hexdigest()[:16],
        "source": data.source,
        "store": json.dumps(data.store_meta, sort_keys=True, default=str),
        "values": values,
    }


def fit_settings(model: Any) -> dict[str, Any]:
    """The estimator settings a resumed fit must share with the checkpointed one."""
    settings: dict[str, Any] = {}
    for name in ("n_components", "covariance_type", "tol", "reg_covar", "n_init", "init_params", "init_sample_size", "dtype"):
        settings[name] = getattr(model, name)
    settings["random_state"] = model.random_state if isinstance(model.random_state, (int, type(None))) else "instance"
    for name in ("weights_init", "means_init", "precisions_init"):
        value = getattr(model, name)
        settings[name] = None if value is None else hashlib.sha256(np.asarray(value, dtype=np.float64).tobytes()).hexdigest()[:16]
    return settings


def save_checkpoint(
    path: str | os.PathLike,
    runs: list[EMRun],
    iteration: int,
    covariance_type: str,
    settings: dict[str, Any],
    fingerprint: dict[str, Any],
) -> None:
    """Write a new state of every run and make it the current one."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    max_len = max(len(r.lower_bounds) for r in runs)
    ds = xr.concat([params_dataset(r.params, covariance_type) for r in runs], dim="run")
    bounds = np.full((len(runs), max_len), np.nan)
    for i, r in enumerate(runs):
        bounds[i, : len(r.lower_bounds)] = r.lower_bounds
    ds["lower_bounds"] = (("run", "iteration"), bounds)
    ds["lower_bound"] = (("run",), np.array([r.lower_bound for r in runs]))
    ds["n_iter"] = (("run",), np.array([r.n_iter for r in runs]))
    ds["converged"] = (("run",), np.array([r.converged for r in runs]))
    ds.attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "settings": json.dumps(settings, sort_keys=True),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    name = f"state-{iteration:06d}-{uuid.uuid4().hex[:8]}.zarr"
    write_dataset(ds, os.path.join(path, name), overwrite=False)
    pointer_tmp = os.path.join(path, f"{_POINTER}.tmp-{uuid.uuid4().hex[:8]}")
    with open(pointer_tmp, "w") as fh:
        fh.write(name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer_tmp, os.path.join(path, _POINTER))
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for entry in os.listdir(path):
        stale = os.path.join(path, entry)
        if entry in (name, _POINTER):
            continue
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.remove(stale)


def checkpoint_exists(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), _POINTER))


def load_checkpoint(
    path: str | os.PathLike, settings: dict[str, Any], fingerprint: dict[str, Any]
) -> tuple[list[tuple[dict[str, np.ndarray], float, list[float], int, bool]], int]:
    """Read the current state; refuse it if it was made with other data or settings.

    Returns the runs as (parameter arrays, lower_bound, lower_bounds, n_iter,
    converged) and the iteration the state was saved after.
    """
    from streamem.io import open_dataset

    path = os.fspath(path)
    with open(os.path.join(path, _POINTER)) as fh:
        name = fh.read().strip()
    ds = open_dataset(os.path.join(path, name), FORMAT_NAME)
    saved_fp = json.loads(ds.attrs["fingerprint"])
    if saved_fp != fingerprint:
        diff = sorted(k for k in set(saved_fp) | set(fingerprint) if saved_fp.get(k) != fingerprint.get(k))
        raise ValueError(f"checkpoint {path!r} was made for other data (differs in: {', '.join(diff)}); refusing to resume")
    saved = json.loads(ds.attrs["settings"])
    if saved != json.loads(json.dumps(settings, sort_keys=True)):
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise ValueError(f"checkpoint {path!r} was made with other settings (differs in: {', '.join(diff)}); refusing to resume")
    runs = []
    for i in range(ds.sizes["run"]):
        r = ds.isel(run=i)
        arrays = {v: r[v].values for v in ("weights", "means", "covariances", "precisions_cholesky")}
        bounds = r["lower_bounds"].values
        runs.append(
            (arrays, float(r["lower_bound"]), [float(b) for b in bounds[~np.isnan(bounds)]], int(r["n_iter"]), bool(r["converged"]))
        )
    return runs, int(ds.attrs["iteration"])
