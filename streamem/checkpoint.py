"""Checkpoints of a running fit, safe against a kill at any moment.

A checkpoint is a directory::

    PATH/streamem-checkpoint.json    the marker that makes PATH a checkpoint directory
    PATH/LATEST                      the name of the current state, replaced atomically
    PATH/state-<iteration>-<owner>-<id>.zarr
                                     an xarray Dataset: every run's parameters, lower
                                     bounds, iteration, settings, data fingerprint

A new state is written completely (and fsync'ed) before ``LATEST`` is
switched to it by ``os.replace``; older states are deleted afterwards. A kill
at any moment therefore leaves ``LATEST`` naming a complete state: the
previous one or the new one.

What a fit may touch. A checkpoint is written only into a directory that is
new, empty, or already a checkpoint directory (the marker, or the ``LATEST``
+ ``state-*.zarr`` layout of streamem before the marker); anything else is
refused with a ValueError before anything is written. A fit removes only
entries the checkpoint code wrote (``state-*.zarr``, ``LATEST.tmp-*`` and
their temporaries), never other files, even in a checkpoint directory.

Fits sharing a directory each work: ``<owner>`` names the host, process and
thread that wrote a state. A fit removes its own older entries and those of
owners that are gone (a process of this host that no longer runs, a thread
of this process that has ended), never those of a live fit and never the
state ``LATEST`` names. ``LATEST`` names the state of whichever fit saved
last, so resuming from a shared directory continues that fit (another fit's
settings are refused as usual). A state of a fit on another host, or of a
finished fit in a thread that still runs, stays until its owner saves again.

On object storage (a URL such as ``s3://bucket/run-1/checkpoint``, with
``storage_options=``) the layout is the same, with prefixes for directories.
Rename does not exist there, but neither step needs it: a state is a new
store written with its root metadata last (:func:`streamem.storage.write_store`:
a state whose write was interrupted has none and counts as absent), and
``LATEST`` is one small object replaced in a single request, which readers
see whole, old or new. So ``LATEST`` always names a complete state, and the
leftovers of an interrupted write are removed by a later save like any old
state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from typing import Any

import dask
import numpy as np
import xarray as xr

from streamem import storage
from streamem.backend import to_numpy
from streamem.data import InputData, normalise_location
from streamem.em import EMRun
from streamem.io import FORMAT_VERSION, _jsonable, json_value, open_dataset, params_dataset, stats_dims, write_dataset

FORMAT_NAME = "streamem-checkpoint"
#: The file that marks a directory as a streamem checkpoint directory.
MARKER = "streamem-checkpoint.json"
_POINTER = "LATEST"
_OWNER = r"h(?P<host>[0-9a-f]{8})-p(?P<pid>\d+)-t(?P<tid>\d+)"
#: States, and the temporaries of their atomic writes (``io.atomic_write``).
_STATE_RE = re.compile(rf"state-\d+-(?:{_OWNER}-)?[0-9a-f]{{8}}\.zarr(?:\.(?:tmp|old)-[0-9a-f]{{8}})?")
_POINTER_TMP_RE = re.compile(rf"{_POINTER}\.tmp-(?:{_OWNER}-)?[0-9a-f]{{8}}")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

#: Rows at each end of the data whose values go into the fingerprint.
FINGERPRINT_ROWS = 16
#: Estimator settings compared as they are (after conversion to JSON).
_PLAIN_SETTINGS = ("n_components", "covariance_type", "tol", "reg_covar", "n_init", "init_params", "init_sample_size", "dtype")
#: Online EM settings, part of the settings of online fits only.
_ONLINE_SETTINGS = ("algorithm", "batch_size", "step_decay", "step_offset", "step_size", "shuffle")


# ---------------------------------------------------------------- what must match on resume
def data_fingerprint(data: InputData, scheduler: Any = "threads") -> dict[str, Any]:
    """What identifies the data: shape, dtype, row chunks, location, store metadata,
    and a hash of the first and last :data:`FINGERPRINT_ROWS` rows.

    The location is normalised (``data.zarr``, ``./data.zarr/``, the
    absolute path, ``~/...`` and a symbolic link to it are the same data).
    The values of rows in between are not read (that would cost a pass):
    data rewritten in place with the same shape and the same first and last
    rows are not told apart.
    """
    a = data.array
    head, tail = dask.compute(a[:FINGERPRINT_ROWS], a[-FINGERPRINT_ROWS:], scheduler=scheduler)
    values = hashlib.sha256(to_numpy(head).tobytes() + to_numpy(tail).tobytes()).hexdigest()[:16]
    return {
        "shape": [int(n) for n in a.shape],
        "dtype": str(a.dtype),
        "row_chunks": hashlib.sha256(np.asarray(a.chunks[0]).tobytes()).hexdigest()[:16],
        "source": _location(data.source),
        "store": _store_meta_json(data.store_meta),
        "values": values,
    }


def _location(source: Any) -> Any:
    """A store location in one spelling (:func:`streamem.data.normalise_location`); other values as they are.

    Idempotent, so states of older streamem (which spelled local paths
    absolute but with symbolic links) compare equal after it too.
    """
    return normalise_location(source) if isinstance(source, str) else source


def _store_meta_json(meta: dict[str, Any]) -> str:
    meta = {k: _location(v) if k in ("path", "store") else v for k, v in meta.items()}
    return json.dumps(meta, sort_keys=True, default=str)


def fit_settings(model: Any) -> dict[str, Any]:
    """The estimator settings a resumed fit must share with the checkpointed one, as JSON values.

    numpy scalars become Python numbers and dtypes their names, so that
    ``n_components=np.int64(3)`` and ``3`` are the same setting. Settings
    added after checkpoints existed (the family's own, ``learn_weights``,
    ``prior``, stepwise ``average``) are recorded only when they differ from what older fits
    did, so a Gaussian checkpoint written before them still resumes.

    Raises
    ------
    TypeError
        A setting has no JSON form; raised here, before any work is done.
    """
    params = model.get_params(deep=False)
    settings = {name: _setting(name, params[name]) for name in _PLAIN_SETTINGS if name in params}
    if getattr(model, "algorithm", "batch") != "batch":  # batch checkpoints keep their older settings
        settings.update({name: _setting(name, params[name]) for name in _ONLINE_SETTINGS})
    family = model._family(fitted=False)
    if family.name != "gaussian":
        settings["family"] = family.name
        settings.update({name: _jsonable(name, value) for name, value in model._family_settings().items()})
    if not model.learn_weights:
        settings["learn_weights"] = False
    if getattr(model, "algorithm", "batch") == "stepwise" and model.average:  # older stepwise fits did not average
        settings["average"] = True
    if model.prior is not None:
        settings["prior"] = _jsonable("prior", model.prior)
    random_state = model.random_state
    is_instance = isinstance(random_state, (np.random.RandomState, np.random.Generator))
    settings["random_state"] = "instance" if is_instance else _setting("random_state", random_state)
    for name in sorted(n for n in params if n.endswith("_init") and n != "n_init"):
        value = params[name]
        settings[name] = None if value is None else hashlib.sha256(np.asarray(value, dtype=np.float64).tobytes()).hexdigest()[:16]
    json.dumps(settings)  # cannot fail after the conversions above: checked anyway, before any work
    return settings


def _setting(name: str, value: Any) -> Any:
    try:
        return json_value(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} cannot be stored in a checkpoint: allowed are numbers, strings, None and dtypes") from None


# ---------------------------------------------------------------- the directory
def _expand(path: str | os.PathLike) -> str:
    """A checkpoint directory as the file system names it: ``~`` expanded (every entry point calls this); a URL as it is."""
    if storage.is_store(path):
        raise TypeError("checkpoint= must be a local path or a URL (a checkpoint is a directory of several stores), "
                        f"got a {type(path).__name__} store object")  # fmt: skip
    return path if storage.is_url(path) else os.path.expanduser(os.fspath(path))


class _RemoteDirectory:
    """A checkpoint directory at a URL: a prefix of objects (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None):
        self.url, self.storage_options = url, storage_options
        #: The URL as messages show it (no credentials).
        self.name = storage.describe(url)
        self.store = storage.open_store(url, storage_options)

    def entries(self) -> list[str]:
        return storage.entries(self.store, f"checkpoint {self.name}")

    def read(self, name: str) -> str | None:
        data = storage.read_bytes(self.store, name, f"checkpoint {self.name}")
        return None if data is None else data.decode()

    def write(self, name: str, text: str) -> None:
        storage.write_bytes(self.store, name, text.encode(), f"checkpoint {self.name}")

    def remove(self, name: str) -> None:
        storage.remove(self.store, name, f"checkpoint {self.name}")

    def child(self, name: str) -> str:
        return storage.join(self.url, name)


def checkpoint_exists(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` (a directory or a URL) holds a checkpoint state.

    Raises
    ------
    ValueError
        ``path`` exists but is not a directory a checkpoint may use.
    """
    path = _expand(path)
    if storage.is_url(path):
        remote = _RemoteDirectory(path, storage_options)
        entries = remote.entries()
        _check_entries(remote.name, entries)
        return _POINTER in entries
    if os.path.exists(path):
        _check_directory(path)
    return os.path.isfile(os.path.join(path, _POINTER))


def prepare_checkpoint(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Make ``path`` a checkpoint directory: create it (and its marker) or check it may be used.

    Parameters
    ----------
    path : str or os.PathLike
        A local directory or a URL (``s3://bucket/prefix``, ...).
    storage_options : dict, optional
        Options of a URL's fsspec backend.

    Raises
    ------
    ValueError
        ``path`` is a file, or a directory that holds other things and is not
        a streamem checkpoint directory.
    OSError
        A URL whose endpoint or bucket cannot be reached.
    """
    path = _expand(path)
    if storage.is_url(path):
        remote = _RemoteDirectory(path, storage_options)
        storage.check_bucket(path, storage_options, f"checkpoint {remote.name}")
        if not _check_entries(remote.name, remote.entries()):
            remote.write(MARKER, json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}))
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        _check_directory(path)  # refuses it by name; os.makedirs would raise a bare FileExistsError
    os.makedirs(path, exist_ok=True)
    if _check_directory(path):
        return
    try:
        with open(os.path.join(path, MARKER), "x") as fh:
            json.dump({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}, fh)
    except FileExistsError:  # another fit made it first
        pass


def _check_directory(path: str) -> bool:
    """Refuse what a checkpoint may not use; return whether ``path`` already has the marker."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint={path!r} is not a directory; give a new, empty or checkpoint directory")
    return _check_entries(path, os.listdir(path))


def _check_entries(path: str, entries: list[str]) -> bool:
    """Refuse a directory holding ``entries`` that a checkpoint may not use; return whether it has the marker."""
    if MARKER in entries:
        return True
    foreign = sorted(e for e in entries if e != _POINTER and not _STATE_RE.fullmatch(e) and not _POINTER_TMP_RE.fullmatch(e))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"checkpoint={path!r} is neither empty nor a streamem checkpoint directory: it holds {shown}; "
            "a checkpoint removes its own old states, so give it a new or empty directory"
        )
    return False


def _owner() -> str:
    return f"h{_HOST}-p{os.getpid()}-t{threading.get_native_id()}"


def _removable(match: re.Match[str]) -> bool:
    """Whether a state or pointer temporary can go: it is ours, or its owner is gone.

    Entries without an owner were written by streamem before owners were
    recorded (only one fit then used a directory).
    """
    if match.group("host") is None:
        return True
    if match.group("host") != _HOST:
        return False  # another machine's: we cannot tell whether its fit still runs
    pid, tid = int(match.group("pid")), int(match.group("tid"))
    if pid != os.getpid():
        return not _process_alive(pid)
    # One thread runs one fit at a time, so this thread's older entries are done with.
    if tid == threading.get_native_id():
        return True
    # Another thread's: gone once the thread has ended (known on Linux only).
    return os.path.isdir("/proc/self/task") and not os.path.exists(f"/proc/self/task/{tid}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale(path: str, keep: str, remote: _RemoteDirectory | None = None) -> None:
    """Remove the checkpoint entries that are no longer needed (see the module docstring)."""
    current = _read_pointer(path, remote)
    for entry in (remote.entries() if remote else os.listdir(path)):
        if entry in (keep, current):
            continue
        match = _STATE_RE.fullmatch(entry) or _POINTER_TMP_RE.fullmatch(entry)
        if match is None or not _removable(match):
            continue
        if remote is not None:
            remote.remove(entry)
            continue
        stale = os.path.join(path, entry)
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)  # another fit may be removing it too
        else:
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass


def _read_pointer(path: str, remote: _RemoteDirectory | None = None) -> str | None:
    if remote is not None:
        text = remote.read(_POINTER)
        return None if text is None else text.strip()
    try:
        with open(os.path.join(path, _POINTER)) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- save and load
def save_checkpoint(
    path: str | os.PathLike,
    runs: list[EMRun],
    iteration: int,
    family: Any,
    settings: dict[str, Any],
    fingerprint: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write a new state of every run and make it the current one.

    ``path`` may be a URL (with ``storage_options``): see the module docstring.

    Raises
    ------
    ValueError
        ``path`` may not be used (see :func:`prepare_checkpoint`).
    """
    path = _expand(path)
    prepare_checkpoint(path, storage_options)
    max_len = max(len(r.lower_bounds) for r in runs)
    ds = xr.concat([params_dataset(r.params, family) for r in runs], dim="run")
    bounds = np.full((len(runs), max_len), np.nan)
    for i, r in enumerate(runs):
        bounds[i, : len(r.lower_bounds)] = r.lower_bounds
    ds["lower_bounds"] = (("run", "iteration"), bounds)
    ds["lower_bound"] = (("run",), np.array([r.lower_bound for r in runs]))
    ds["n_iter"] = (("run",), np.array([r.n_iter for r in runs]))
    ds["converged"] = (("run",), np.array([r.converged for r in runs]))
    if all(r.stats is not None and r.stats.n > 0 for r in runs):
        ds = ds.merge(_online_state(runs, family))
    ds.attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "prior": json.dumps(_jsonable("prior", family.prior)),
        "settings": json.dumps(settings, sort_keys=True),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    owner = _owner()
    name = f"state-{iteration:06d}-{owner}-{uuid.uuid4().hex[:8]}.zarr"
    if storage.is_url(path):
        remote = _RemoteDirectory(path, storage_options)
        write_dataset(ds, remote.child(name), overwrite=False, storage_options=storage_options)
        remote.write(_POINTER, name)  # one object, replaced in one request: the switch
        _remove_stale(path, keep=name, remote=remote)
        return
    write_dataset(ds, os.path.join(path, name), overwrite=False)
    pointer_tmp = os.path.join(path, f"{_POINTER}.tmp-{owner}-{uuid.uuid4().hex[:8]}")
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
    _remove_stale(path, keep=name)


def _online_state(runs: list[EMRun], family: Any) -> xr.Dataset:
    """What online EM continues from, per run: statistics per row, their centre, the step counter."""
    per_row = [r.stats * (1.0 / r.stats.n) for r in runs]
    names = [k for k in per_row[0].arrays if k not in ("n", "loglik")]
    variables = {f"online_{k}": (("run", *stats_dims(k, family)), np.stack([s[k] for s in per_row])) for k in names}
    if runs[0].center is not None:
        variables["online_center"] = (("run", "component", "feature"), np.stack([np.asarray(r.center) for r in runs]))
    variables["n_steps"] = (("run",), np.array([r.n_steps for r in runs], dtype=np.float64))
    return xr.Dataset(variables)


#: How often a load follows ``LATEST`` when a concurrent fit replaced the state it named.
_LOAD_ATTEMPTS = 5


def _open_current(path: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    remote = _RemoteDirectory(path, storage_options) if storage.is_url(path) else None
    shown = remote.name if remote else path
    for attempt in range(_LOAD_ATTEMPTS):
        name = _read_pointer(path, remote)
        if name is None:
            raise FileNotFoundError(f"checkpoint {shown!r} holds no state ({_POINTER} is missing)")
        try:
            if remote is not None:
                return open_dataset(remote.child(name), FORMAT_NAME, storage_options)
            return open_dataset(os.path.join(path, name), FORMAT_NAME)
        except (FileNotFoundError, ValueError):
            # A fit sharing the directory may have moved on and removed that state.
            if attempt == _LOAD_ATTEMPTS - 1 or _read_pointer(path, remote) == name:
                raise
    raise AssertionError("unreachable")


def load_checkpoint(
    path: str | os.PathLike,
    settings: dict[str, Any],
    fingerprint: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[tuple[dict[str, np.ndarray], float, list[float], int, bool]], int]:
    """Read the current state; refuse it if it was made with other data or settings.

    Returns the runs as (arrays, lower_bound, lower_bounds, n_iter,
    converged), with arrays the parameters and any online state by
    variable name, and the iteration the state was saved after.
    """
    path = _expand(path)
    ds = _open_current(path, storage_options)
    path = storage.describe(path)  # as messages show it
    saved_fp = json.loads(ds.attrs["fingerprint"])
    # States of older streamem spelled the location as given: compare normalised.
    saved_fp["source"] = _location(saved_fp.get("source"))
    if isinstance(saved_fp.get("store"), str):
        saved_fp["store"] = _store_meta_json(json.loads(saved_fp["store"]))
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
        arrays = {v: r[v].values for v in r.data_vars if v not in ("lower_bounds", "lower_bound", "n_iter", "converged")}
        bounds = r["lower_bounds"].values
        runs.append(
            (arrays, float(r["lower_bound"]), [float(b) for b in bounds[~np.isnan(bounds)]], int(r["n_iter"]), bool(r["converged"]))
        )
    return runs, int(ds.attrs["iteration"])


def checkpoint_prior(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Any:
    """The prior hyperparameters the checkpointed fit used (None: none, or a state written before priors)."""
    from streamem.io import _from_json

    return _from_json(json.loads(_open_current(_expand(path), storage_options).attrs.get("prior", "null")))
