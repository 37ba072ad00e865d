"""Synthetic Gaussian-mixture data written to a Zarr store chunk by chunk."""

from __future__ import annotations

import os
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
    many chunks are written at once). The store appears complete or not at
    all (:func:`streamem.io.atomic_write`); ``path`` may be a URL. The true parameters are stored in the
    array's attributes (``weights``, ``means``, ``covariances``, ``seed``).

    Parameters
    ----------
    path : str or os.PathLike
        Where to write the store: a local path (a symbolic link's target
        is written; missing directories are made) or a URL.
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
    from streamem import storage
    from streamem.io import GENERATED_FORMAT, atomic_write

    for name, value in (("n_samples", n_samples), ("n_features", n_features), ("n_components", n_components), ("chunk_rows", chunk_rows)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(seed) != seed or seed < 0:  # numpy's SeedSequence takes non-negative ints only
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if storage.is_remote(path):
        where: Any = path
    else:  # one spelling: 'g.zarr/.' is g.zarr, and a symbolic link's data are replaced where they are
        given = os.path.expanduser(os.fspath(path))
        where = os.path.realpath(given)
        if (os.path.lexists(given) or os.path.lexists(where)) and not overwrite:
            raise FileExistsError(f"{os.fspath(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    truth = mixture_parameters(n_components, n_features, seed)
    chol = np.linalg.cholesky(truth["covariances"])

    def write(target: Any) -> None:
        arr = zarr.create_array(
            target, shape=(n_samples, n_features), chunks=(chunk_rows, n_features), dtype=dtype, compressors=None, zarr_format=3
        )
        arr.attrs.update({k: v.tolist() for k, v in truth.items()} | {"seed": seed, "generator": "streamem.generate", "format": GENERATED_FORMAT})
        for i, start in enumerate(range(0, n_samples, chunk_rows)):
            rows = min(chunk_rows, n_samples - start)
            arr[start : start + rows] = _draw(truth, chol, rows, np.random.default_rng([seed, 1, i])).astype(dtype)

    if not storage.is_remote(where):  # as zarr did before the atomic write: `make demo` writes data/demo.zarr in a fresh checkout
        os.makedirs(os.path.dirname(where), exist_ok=True)
    # Complete or absent, locally and at a URL: the writers' own protocol (a temporary name and a swap, or root metadata
    # last). With overwrite, it refuses anything but data generate wrote before write() runs: the user's directory (the
    # current one, even) is never deleted.
    atomic_write(where, write, overwrite=overwrite, formats=(GENERATED_FORMAT,))
    return zarr.open_array(storage.open_store(where, None, read_only=True) if storage.is_remote(where) else where, mode="r")


def _draw(truth: dict[str, Any], chol: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.choice(len(truth["weights"]), size=rows, p=truth["weights"])
    z = rng.standard_normal(size=(rows, truth["means"].shape[1]))
    return truth["means"][labels] + np.einsum("nij,nj->ni", chol[labels], z)
