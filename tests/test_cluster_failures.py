"""What a fit does when the machinery under it fails (issue 13, items 6, 8 and 12).

Workers that die, clusters that never come, memory limits too small, and
concurrent fits sharing the process's BLAS thread pools. Every case must end
(a result or a one-line error) within a bounded time: fits that could hang run
in a thread joined with a timeout.
"""

from __future__ import annotations

import threading

import dask
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import streamem
from _common import make_inits


def _blas_threads() -> dict[str, int]:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def _run_in_threads(target, n: int, timeout: float = 120) -> list:
    """Run ``target(i)`` in ``n`` threads at once; return what each raised (None if nothing)."""
    errors: list = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"a thread did not finish within {timeout} s"
    return errors


# ------------------------------------------------------------ item 12: BLAS
def test_concurrent_fits_leave_the_blas_thread_count_as_it_was(X):
    """Passes on local threads limit BLAS to one thread; the last one out restores the original count.

    (Before the fix, a pass that started while another held the limit took 1
    for the original and restored it last: OpenBLAS stayed at 1 thread.)
    """
    original = _blas_threads()
    if not original or set(original.values()) == {1}:
        pytest.skip("BLAS runs one thread here already: nothing to restore")
    models = [
        streamem.GaussianMixture(n_components=3, tol=0, max_iter=15, random_state=i, **make_inits("full"))
        for i in range(4)
    ]
    try:
        with dask.config.set(scheduler="threads"):
            for _ in range(3):  # overlapping entries and exits in many orders
                errors = _run_in_threads(lambda i: models[i].fit(X), len(models))
                assert errors == [None] * len(models)
                assert _blas_threads() == original
    finally:
        threadpool_limits(original)  # leave the process as we found it, whatever happened
    # Each model is the one a fit on its own gives.
    alone = streamem.GaussianMixture(n_components=3, tol=0, max_iter=15, **make_inits("full")).fit(X)
    np.testing.assert_allclose(models[0].means_, alone.means_, rtol=1e-12)
