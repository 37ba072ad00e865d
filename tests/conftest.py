"""Shared fixtures: the test data (fixed seed), Zarr stores on disk, a LocalCluster and its address for the CLI."""

from __future__ import annotations

import os
import sys

import dask.array as da
import numpy as np
import pytest
import zarr

sys.path.insert(0, os.path.dirname(__file__))

from _common import IRREGULAR_CHUNKS, ZARR_CHUNK_ROWS, make_data, make_inits  # noqa: E402


def write_zarr(path, X: np.ndarray, chunks, zarr_format: int = 3) -> str:
    """Write ``X`` as a Zarr array at ``path`` (a real store on disk)."""
    path = os.fspath(path)
    arr = zarr.open_array(path, mode="w", shape=X.shape, chunks=chunks, dtype=X.dtype, zarr_format=zarr_format)
    arr[...] = X
    return path


@pytest.fixture(scope="session")
def X() -> np.ndarray:
    """4,500 rows, 3 features, 3 components; read-only so no test changes it."""
    data = make_data()
    data.flags.writeable = False
    return data


@pytest.fixture(scope="session")
def zarr_path(tmp_path_factory, X) -> str:
    """A Zarr v3 array on disk in 700-row chunks: 7 chunks, the last one 300 rows."""
    path = tmp_path_factory.mktemp("stores") / "data.zarr"
    return write_zarr(path, np.array(X), (ZARR_CHUNK_ROWS, X.shape[1]))


@pytest.fixture
def X_irregular(X) -> da.Array:
    """The same data as a dask array with explicitly irregular row chunks."""
    return da.from_array(np.array(X), chunks=(IRREGULAR_CHUNKS, (X.shape[1],)))


@pytest.fixture(params=["full", "tied", "diag", "spherical"])
def covariance_type(request) -> str:
    return request.param


@pytest.fixture
def inits(covariance_type) -> dict:
    return make_inits(covariance_type)


@pytest.fixture(scope="session")
def cluster():
    """A 2-process LocalCluster on loopback, started once for the whole run (a start costs seconds).

    Shared by every module that asks for it: a test must leave it as it found
    it (no worker killed or restarted; those tests start clusters of their own).
    """
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    ) as lc:
        yield lc


@pytest.fixture(scope="session")
def scheduler_flags(cluster) -> tuple[str, str]:
    """Command-line flags that run a command on the shared cluster (no cluster start of its own)."""
    return ("--scheduler", cluster.scheduler_address)


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on 127.0.0.1, a free port, for one module (the object-storage tests import moto to skip without it)."""
    import logging

    from moto import server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()

