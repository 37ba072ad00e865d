"""Synthetic Gaussian-mixture data written to a Zarr store chunk by chunk."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import numpy as np
import zarr


def mixture_parameters(n_components: int, n_features: int, seed: int) -> dict[str, np.ndarray]:
    """Random mixture parameters (weights, means, covariances); components overlap a little."""
    rng = np.random.default_rng([seed, 0])
    weights = rng.dirichlet(np.full(n_components, 5.0))
    means = rng.uniform(-2.5, 2.5, size=(n_components, n_features))
    a = rng.normal(size=(n_components, n_features, n_features)) / np.sqrt(n_features)
    covariances = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(n_features)
    return {"weights": weights, "means": means, "covariances": covariances}


def generate(
    path: str | os.PathLike,
    n_samples: int,
    n_features: int,
    n_components: int,
    *,
    chunk_rows: int = 65_536,
    seed: int = 0,
    dtype: str = "float64",
    overwrite: bool = False,
) -> zarr.Array:
    """Write ``n_samples`` rows drawn from a random Gaussian mixture to a Zarr v3 array.

    Chunks are drawn and written one at a time, so memory stays at one chunk;
    every chunk has its own random stream (the data do not depend on how
    many chunks are written at once). The store is written under a temporary
    name and renamed when complete. The true parameters are stored in the
    array's attributes (``weights``, ``means``, ``covariances``, ``seed``).

    Parameters
    ----------
    path : str or os.PathLike
        Where to write the store.
    n_samples, n_features, n_components : int
        Size of the data and number of mixture components.
    chunk_rows : int, default=65536
        Rows per chunk.
    seed : int, default=0
    dtype : {"float64", "float32"}, default="float64"
    overwrite : bool, default=False
        Replace an existing store at ``path``, only when it is data this
        function wrote (its ``format`` attribute is
        :data:`streamem.io.GENERATED_FORMAT`): never a directory of other
        things, nor a model or the user's data.

    Raises
    ------
    ValueError
        A size or seed out of range, or ``path`` holding something else with ``overwrite``.
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    from streamem.io import GENERATED_FORMAT, check_replaceable

    for name, value in (("n_samples", n_samples), ("n_features", n_features), ("n_components", n_components), ("chunk_rows", chunk_rows)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(seed) != seed or seed < 0:  # numpy's SeedSequence takes non-negative ints only
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    path = os.path.expanduser(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    if overwrite:  # before any work: the user's directory (the current one, even) is never deleted
        check_replaceable(path, formats=(GENERATED_FORMAT,))
    truth = mixture_parameters(n_components, n_features, seed)
    chol = np.linalg.cholesky(truth["covariances"])
    path = path.rstrip(os.sep) or os.sep
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        arr = zarr.create_array(
            tmp, shape=(n_samples, n_features), chunks=(chunk_rows, n_features), dtype=dtype, compressors=None, zarr_format=3
        )
        arr.attrs.update({k: v.tolist() for k, v in truth.items()} | {"seed": seed, "generator": "streamem.generate", "format": GENERATED_FORMAT})
        for i, start in enumerate(range(0, n_samples, chunk_rows)):
            rows = min(chunk_rows, n_samples - start)
            arr[start : start + rows] = _draw(truth, chol, rows, np.random.default_rng([seed, 1, i])).astype(dtype)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return zarr.open_array(path, mode="r")


def _draw(truth: dict[str, Any], chol: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.choice(len(truth["weights"]), size=rows, p=truth["weights"])
    z = rng.standard_normal(size=(rows, truth["means"].shape[1]))
    return truth["means"][labels] + np.einsum("nij,nj->ni", chol[labels], z)
