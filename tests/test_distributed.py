"""On a real distributed.LocalCluster with 2 worker processes (DESIGN.md §6).

The cluster starts once for the whole run (the ``cluster`` fixture in
conftest.py). Tests check both that the results are scikit-learn's and that
the work really ran on the cluster (its task stream), or did not when it
should not.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, get_task_stream
from numpy.testing import assert_allclose

import streamem
from _common import N_COMPONENTS, PARITY_MAX_ITER, assert_same_fit, fit_quietly, make_inits, sklearn_fit

RTOL = 1e-8


@pytest.fixture(scope="module")
def client(cluster):
    """A client that is *not* the default one: only used when passed explicitly."""
    with Client(cluster, set_as_default=False) as c:
        yield c


def _params(covariance_type, max_iter=PARITY_MAX_ITER):
    return dict(n_components=N_COMPONENTS, covariance_type=covariance_type, tol=0, max_iter=max_iter, **make_inits(covariance_type))


def _n_tasks(stream) -> int:
    return len(stream.data)


def _n_chunk_tasks(stream) -> int:
    """Tasks that processed chunks (several chunks to a task where a worker holds them)."""
    return sum(str(t["key"]).startswith("_run_group") for t in stream.data)


# All four covariance types on irregular dask chunks; the on-disk Zarr store
# (7 unequal chunks, read by the worker processes) with two of them, to keep
# the suite fast.
CLUSTER_CASES = [("irregular_dask", ct) for ct in ("full", "tied", "diag", "spherical")] + [
    ("zarr_path", "full"),
    ("zarr_path", "spherical"),
]


@pytest.mark.parametrize("source,covariance_type", CLUSTER_CASES)
def test_parity_with_explicit_client(X, X_irregular, zarr_path, client, covariance_type, source):
    data = X_irregular if source == "irregular_dask" else zarr_path
    ref = sklearn_fit(X, **_params(covariance_type))
    with get_task_stream(client=client) as ts:
        ours = fit_quietly(streamem.GaussianMixture(client=client, **_params(covariance_type)), data)
    assert_same_fit(ours, ref, RTOL)
    # The chunks were processed on the cluster in every EM iteration.
    assert _n_chunk_tasks(ts) >= PARITY_MAX_ITER
    workers = {t["worker"] for t in ts.data}
    assert workers <= set(client.scheduler_info()["workers"])


def test_active_client_is_used_when_none_is_passed(X, X_irregular, cluster):
    ref = sklearn_fit(X, **_params("full"))
    with Client(cluster) as active:  # becomes the default client
        with get_task_stream(client=active) as ts:
            ours = fit_quietly(streamem.GaussianMixture(**_params("full")), X_irregular)
    assert_same_fit(ours, ref, RTOL)
    assert _n_chunk_tasks(ts) >= PARITY_MAX_ITER


def test_non_default_client_is_not_used_unless_passed(X_irregular, client):
    """With no active client (ours is set_as_default=False), the fit runs locally."""
    with get_task_stream(client=client) as ts:
        fit_quietly(streamem.GaussianMixture(**_params("diag")), X_irregular)
    assert _n_tasks(ts) == 0


def test_default_kmeans_init_on_cluster_matches_threads(X_irregular, client):
    """The whole fit including the k-means initialisation passes, on the cluster."""
    params = dict(n_components=3, covariance_type="full", tol=0, max_iter=10, random_state=0)
    on_cluster = fit_quietly(streamem.GaussianMixture(client=client, **params), X_irregular)
    with dask.config.set(scheduler="sync"):
        local = fit_quietly(streamem.GaussianMixture(**params), X_irregular)
    assert_same_fit(on_cluster, local, 1e-12)


def test_result_does_not_depend_on_the_workers(X, client, covariance_type):
    """Threads, the synchronous scheduler and 2 worker processes give the same fit (fixed reduction tree)."""
    data = da.from_array(np.array(X), chunks=((300,) * 15, -1))  # 15 chunks: a 2-level reduction tree
    params = _params(covariance_type, max_iter=10)
    fits = {}
    for name in ("threads", "sync"):
        with dask.config.set(scheduler=name):
            fits[name] = fit_quietly(streamem.GaussianMixture(**params), data)
    fits["cluster"] = fit_quietly(streamem.GaussianMixture(client=client, **params), data)
    assert_same_fit(fits["sync"], fits["threads"], 1e-12)
    assert_same_fit(fits["cluster"], fits["threads"], 1e-12)


def test_predictions_computed_on_the_cluster(X, zarr_path, client):
    ref = sklearn_fit(X, **_params("tied"))
    model = fit_quietly(streamem.GaussianMixture(client=client, **_params("tied")), zarr_path)
    proba = model.predict_proba(zarr_path)
    assert isinstance(proba, da.Array)
    with get_task_stream(client=client) as ts:
        values = client.compute(proba).result()
    assert _n_tasks(ts) > 0
    assert_allclose(values, ref.predict_proba(X), rtol=RTOL, atol=1e-200)
    assert_allclose(model.score(zarr_path), ref.score(X), rtol=RTOL)


def test_a_fresh_process_imports_the_module_a_task_names_first(module: str = "streamem.data"):
    """A new worker process unpickles a task and so imports the module its function lives in before any other of
    streamem (a worker started by ``streamem predict`` meets ``streamem.data`` first): that import must work alone.

    (Found while trimming the suite: after ``import streamem`` became lazy, ``import streamem.data`` in a fresh
    interpreter failed with a circular import, and the workers of a new LocalCluster never ran a task.)
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
