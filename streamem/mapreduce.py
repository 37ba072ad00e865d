"""One EM iteration as separate jobs: accumulate statistics per shard, reduce them.

For array jobs on a batch system without a live Dask cluster: each job runs
:func:`accumulate` on a range of rows and writes that shard's statistics (a
few KB) to a Zarr store; one final job runs :func:`reduce_stats` on all of
them, which sums the statistics and does the M-step. Because statistics are
additive, the result is one EM iteration of the whole data.

The data and the statistics stores may be URLs (``s3://...``, with
``storage_options=``) or zarr store objects, as everywhere in streamem.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import xarray as xr

from streamem.cluster import resolve_scheduler
from streamem.data import load_data, normalise_location
from streamem.em import DataPasses, EMRun, _stats_of_models, add_elementwise
from streamem import storage
from streamem.io import FORMAT_VERSION, open_dataset, stats_dims, write_dataset
from streamem.stats import SuffStats, sum_in_order

FORMAT_NAME = "streamem-stats"


def model_digest(model: Any) -> str:
    """A hash of the parameters the statistics were computed with."""
    h = hashlib.sha256()
    for a in model._family().param_arrays(model._params()).values():
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def parse_rows(rows: str | None, n_samples: int) -> tuple[int, int]:
    """``"START:STOP"`` (either may be empty) to a checked half-open range."""
    if rows is None:
        return 0, n_samples
    try:
        start_s, stop_s = rows.split(":")
        start = int(start_s) if start_s else 0
        stop = int(stop_s) if stop_s else n_samples
    except ValueError:
        raise ValueError(f"rows must look like START:STOP, got {rows!r}") from None
    if not 0 <= start < stop <= n_samples:
        raise ValueError(f"rows={rows!r} is not a non-empty range within 0:{n_samples}")
    return start, stop


def accumulate(
    model: Any,
    X: Any,
    *,
    rows: str | None = None,
    variable: str | None = None,
    sample_dim: str | None = None,
    missing_chunks: str = "raise",
    client: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Statistics and log-likelihood of rows ``START:STOP`` of ``X`` under ``model``.

    Parameters
    ----------
    model : MixtureEstimator
        The fitted model whose E-step the statistics come from.
    X : array-like, dask array, zarr.Array, path or xarray object
        The whole data set (see :func:`streamem.data.load_data`).
    rows : str, optional
        ``"START:STOP"``, rows of ``X`` this shard covers (default: all).
    variable : str, optional
        The variable of a Zarr group or xarray Dataset holding the data.
    sample_dim : str, optional
        The sample dimension of an xarray input (default: the first).
    missing_chunks : {"raise", "fill"}, default="raise"
        What a chunk file missing from a Zarr store means (see
        :func:`streamem.data.load_data`).
    client : distributed.Client, optional
    storage_options : dict, optional
        Options of the fsspec backend when ``X`` is a URL.

    Returns
    -------
    xarray.Dataset
        Ready for :func:`write_stats`; its attributes record the model, the
        rows and the data (normalised source, variable, sample dimension,
        shape, dtype).
    """
    data = model._load_fitted(
        X, variable=variable, sample_dim=sample_dim, missing_chunks=missing_chunks, storage_options=storage_options
    )
    start, stop = parse_rows(rows, data.n_samples)
    shard = load_data(data.array[start:stop])
    passes = DataPasses(shard, resolve_scheduler(client))
    family = model._family()
    (stats,) = passes.run(_stats_of_models, (family, [model._params()]), add_elementwise)
    ds = xr.Dataset({name: (stats_dims(name, family), value) for name, value in stats.arrays.items()})
    ds.attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_digest": model_digest(model),
        "family": family.name,
        "rows": json.dumps([start, stop]),
        "n_samples_total": data.n_samples,
        # Normalised here, where a relative path means what the user meant.
        "data_source": normalise_location(data.source),
        # Variables of one group share the source (and often the shape); a square variable read
        # along either dimension has the same shape too. The sample dimension is the one used
        # (the default resolved), so leaving out the default does not count as other data.
        "data_variable": variable or "",
        "data_sample_dim": data.sample_dim or "",
        "data_shape": json.dumps(list(data.array.shape)),
        "data_dtype": str(data.array.dtype),
    }
    return ds


#: What identifies the data of a shard: source (normalised by accumulate), variable, sample dimension, shape, dtype.
DataIdentity = tuple[str, str, str, str, str]


def _data_of(attrs: dict[str, Any]) -> DataIdentity:
    """The data a shard was computed on (shards of older streamem lack variable and sample dimension: "")."""
    return (
        attrs.get("data_source", "?"),
        attrs.get("data_variable", ""),
        attrs.get("data_sample_dim", ""),
        attrs.get("data_shape", "?"),
        attrs.get("data_dtype", "?"),
    )


def _describe(data: DataIdentity) -> str:
    source, variable, sample_dim, shape, dtype = data
    where = (f", variable {variable!r}" if variable else "") + (f", sample dim {sample_dim!r}" if sample_dim else "")
    return f"{source}{where} (shape {shape}, {dtype})"


def _check_same_data(
    first: tuple[str, DataIdentity] | None, path: str, attrs: dict[str, Any]
) -> tuple[str, DataIdentity]:
    """Refuse a shard of other data than the first shard's; returns the first shard's (path, data)."""
    data = _data_of(attrs)
    if first is None:
        return path, data
    first_path, first_data = first
    if data != first_data:
        raise ValueError(
            f"the shards come from different data: {first_path!r} from {_describe(first_data)}, "
            f"{path!r} from {_describe(data)}; accumulate every shard on the same data"
        )
    return first


def write_stats(
    ds: xr.Dataset, path: Any, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None
) -> None:
    """Write a shard's statistics (from :func:`accumulate`) to a path, a URL or a zarr store object."""
    write_dataset(ds, path, overwrite=overwrite, storage_options=storage_options)


def reduce_stats(model: Any, paths: Sequence[Any], storage_options: dict[str, Any] | None = None) -> Any:
    """Sum the shards' statistics and do one M-step from ``model``.

    ``paths`` are the statistics stores: paths, URLs (opened with
    ``storage_options``) or zarr store objects.

    Refuses shards computed from another model, shards of different data
    (another source, variable, sample dimension, shape or dtype: a
    ValueError naming both), overlapping
    row ranges, and (with a ValueError naming the missing rows) shards that
    do not cover the data. Returns a new fitted model: ``n_iter_`` one more,
    the shards' mean log-likelihood appended to ``lower_bounds_``.
    """
    if not paths:
        raise ValueError("reduce needs at least one statistics store")
    digest = model_digest(model)
    parts, ranges, totals = [], [], set()
    first_data: tuple[str, DataIdentity] | None = None
    for path in paths:
        ds = open_dataset(path, FORMAT_NAME, storage_options)
        shown = storage.describe(path)
        if ds.attrs.get("model_digest") != digest:
            raise ValueError(f"{shown!r} holds statistics of another model; accumulate them with this one")
        first_data = _check_same_data(first_data, shown, ds.attrs)
        parts.append(SuffStats({name: np.asarray(ds[name].values, dtype=np.float64) for name in ds.data_vars}))
        ranges.append((tuple(json.loads(ds.attrs["rows"])), shown))
        totals.add(int(ds.attrs["n_samples_total"]))
    ranges.sort()
    for (a, pa), (b, pb) in zip(ranges, ranges[1:]):
        if b[0] < a[1]:
            raise ValueError(f"row ranges overlap: {pa!r} has rows {a[0]}:{a[1]}, {pb!r} has {b[0]}:{b[1]}")
    if len(totals) != 1:
        raise ValueError(f"the shards come from data of different sizes: {sorted(totals)} rows")
    total_rows = totals.pop()
    ends = [0] + [r[1] for r, _ in ranges]
    starts = [r[0] for r, _ in ranges] + [total_rows]
    gaps = [f"{a}:{b}" for a, b in zip(ends, starts) if b > a]
    if gaps:
        raise ValueError(f"rows {', '.join(gaps)} of {total_rows} are missing: no shard holds them")
    total = sum_in_order(parts)
    new = model.__class__(**model.get_params())
    for name, value in vars(model).items():
        if name.endswith("_"):
            setattr(new, name, value)
    family = model._family()
    center = family.center(model._params())
    new._set_params(family, family.m_step(total, center))
    new._set_online_state(EMRun(new._params(), stats=total, center=center), int(total.n), batch=True)
    previous = model.lower_bound_
    new.lower_bound_ = (total.loglik + family.log_prior(model._params())) / total.n
    new.lower_bounds_ = list(model.lower_bounds_) + [new.lower_bound_]
    new.n_iter_ = model.n_iter_ + 1
    new.converged_ = abs(new.lower_bound_ - previous) < model.tol
    return new
