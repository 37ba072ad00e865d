"""The initialisation passes (streamem.init): sampling, k-means labels, random responsibilities.

References are independent of streamem: scikit-learn's KMeans and
GaussianMixture on the same data and random_state, the sampling algorithm
re-implemented here from its documentation, and numpy's Philox stream.
"""

from __future__ import annotations

import tracemalloc

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.cluster import KMeans

import streamem
from _common import fit_quietly, sklearn_fit
from conftest import write_zarr
from streamem.data import load_data
from streamem.em import DataPasses
from streamem.families.gaussian import SLICE_BYTES, GaussianFamily
from streamem.init import (
    INIT_METHODS,
    _hard_assign_stats,
    _random_resp_stats,
    draw_sample,
    initial_params,
    sample_index,
)

#: The documented block size of the sampling draw (streamem.init.sample_index).
BLOCK = 2**16


def _passes(X) -> DataPasses:
    return DataPasses(load_data(X), "sync")


def _expected_index(n: int, size: int, seed: int) -> tuple[np.ndarray, np.random.RandomState]:
    """The documented draw, written out: blocks of 65,536 rows in order, a hypergeometric
    count per block (the last takes the rest), then choice(rows, count) inside it."""
    rng = np.random.RandomState(seed)
    starts = list(range(0, n, BLOCK))
    out, left = [], size
    for i, first in enumerate(starts):
        rows = min(BLOCK, n - first)
        if left == 0:
            break
        if i == len(starts) - 1:
            k = left
        else:
            k = rng.hypergeometric(rows, n - first - rows, left)
        if k > 0:
            out.append(first + rng.choice(rows, k, replace=False))
        left -= k
    return np.concatenate(out), rng


# ------------------------------------------------------------ sampling (item 15)
def test_sample_reaches_every_chunk_and_is_the_documented_draw(tmp_path):
    """draw_sample on a Zarr store of 8 chunks returns exactly the rows of the documented draw."""
    n, size, seed, chunk = 150_000, 3000, 11, 20_000
    X = np.column_stack([np.arange(n, dtype=np.float64), np.random.RandomState(0).standard_normal(n)])
    store = write_zarr(tmp_path / "rows.zarr", X, (chunk, 2))
    data = load_data(store)
    assert len(data.array.chunks[0]) == 8

    rng = np.random.RandomState(seed)
    sample = draw_sample(DataPasses(data, "sync"), size, rng)
    expected, ref_rng = _expected_index(n, size, seed)
    expected = np.sort(expected)
    assert len(np.unique(expected)) == size
    assert_array_equal(sample, X[expected])
    # Every chunk (and every sampling block) contributes, roughly in proportion.
    per_chunk = np.bincount(sample[:, 0].astype(int) // chunk, minlength=8)
    assert per_chunk.min() > 0 and per_chunk.sum() == size
    assert_allclose(per_chunk[:7] / size, chunk / n, rtol=0.25)
    # The generator was consumed exactly as documented (the n_init runs that follow depend on it).
    assert rng.randint(2**31) == ref_rng.randint(2**31)


def test_sample_index_small_data_is_sklearns_draw():
    """With n <= 65,536 rows the draw is rng.choice(n, size, replace=False), in that order."""
    for n, size in [(10, 3), (4500, 500), (BLOCK, 7)]:
        assert_array_equal(sample_index(n, size, np.random.RandomState(4)), np.random.RandomState(4).choice(n, size, replace=False))


def test_sample_index_does_not_permute_all_rows():
    """A sample of a billion rows: memory of one block, not a permutation of 1e9 rows (8 GB)."""
    n, size = 10**9, 50
    tracemalloc.start()
    try:
        index = sample_index(n, size, np.random.RandomState(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    assert len(np.unique(index)) == size and index.min() >= 0 and index.max() < n
    expected, _ = _expected_index(n, size, 0)
    assert_array_equal(index, expected)


# ------------------------------------------- the same start whatever the chunking
N_CHUNKING = 70_000  # > one sampling block, and > the sample size below
CHUNKINGS = {"regular": 10_000, "irregular": (3000, 17_000, 9000, 25_000, 11_000, 5000)}


@pytest.fixture(scope="module")
def X70k() -> np.ndarray:
    rng = np.random.RandomState(8)
    labels = rng.randint(3, size=N_CHUNKING)
    centres = np.array([[0.0, 0.0], [6.0, 1.0], [-3.0, 7.0]])
    return rng.standard_normal((N_CHUNKING, 2)) + centres[labels]


@pytest.mark.parametrize("method", INIT_METHODS)
def test_initial_params_do_not_depend_on_chunking(X70k, method):
    """Regular and irregular chunks of the same rows give the same starts (n > sample size)."""
    family = GaussianFamily("full")
    starts = {}
    for name, chunks in CHUNKINGS.items():
        arr = da.from_array(X70k, chunks=(chunks, -1))
        passes = _passes(arr)
        starts[name] = initial_params(passes, family, 3, method, np.random.RandomState(2), n_runs=2, sample_size=2000)
    assert len(CHUNKINGS["irregular"]) == len(set(CHUNKINGS["irregular"]))
    for a, b in zip(starts["regular"], starts["irregular"]):
        for attr in ("weights", "means", "covariances"):
            assert_allclose(getattr(a, attr), getattr(b, attr), rtol=1e-10, atol=1e-12, err_msg=f"{method} {attr}")
    if method != "kmeans":  # (k-means runs may well converge to the same centres)
        # The two runs differ: each draws its own start.
        assert not np.allclose(starts["regular"][0].means, starts["regular"][1].means)


def test_kmeans_start_on_a_sample_is_the_reference(X70k):
    """KMeans on the documented sample, labels of all rows by the nearest centre, one M-step."""
    arr = da.from_array(X70k, chunks=(CHUNKINGS["irregular"], -1))
    ours = initial_params(_passes(arr), GaussianFamily("diag"), 3, "kmeans", np.random.RandomState(5), sample_size=2000)[0]

    index, rng = _expected_index(N_CHUNKING, 2000, 5)
    km = KMeans(n_clusters=3, n_init=1, random_state=rng).fit(X70k[np.sort(index)])
    labels = km.predict(X70k)
    counts = np.bincount(labels, minlength=3)
    assert_allclose(ours.weights * N_CHUNKING, counts, rtol=1e-12)
    for k in range(3):
        rows = X70k[labels == k]
        assert_allclose(ours.means[k], rows.mean(axis=0), rtol=1e-10)
        assert_allclose(ours.covariances[k], rows.var(axis=0) + 1e-6, rtol=1e-9)


def test_sample_size_below_n_components_is_refused(X70k):
    passes = _passes(da.from_array(X70k[:1000], chunks=(300, -1)))
    for method in ("kmeans", "k-means++"):
        with pytest.raises(ValueError, match=r"sample_size=3 must be >= n_components=5"):
            initial_params(passes, GaussianFamily("full"), 5, method, np.random.RandomState(0), sample_size=3)


# ------------------------------------------------ data far from the origin (item 2)
def _far_data(offset: float) -> np.ndarray:
    """4 clusters of unit spread, 8 apart, shifted by ``offset`` (timestamps ~1e9)."""
    rng = np.random.RandomState(1)
    labels = rng.randint(4, size=2000)
    X = rng.standard_normal((2000, 2))
    X[:, 0] += 8.0 * labels
    return X + offset


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e9])
def test_kmeans_labels_far_from_the_origin_match_sklearn(offset):
    """n <= init_sample_size: the centres are KMeans' own, so the labels must be too, and the fit sklearn's."""
    X = _far_data(offset)
    K, seed = 4, 3
    # As scikit-learn's GaussianMixture(init_params="kmeans"): KMeans on all rows, n_init=1.
    km = KMeans(n_clusters=K, n_init=1, random_state=np.random.RandomState(seed)).fit(X)
    start = initial_params(_passes(da.from_array(X, chunks=(700, -1))), GaussianFamily("full"), K, "kmeans", np.random.RandomState(seed))[0]
    counts = np.bincount(km.labels_, minlength=K)
    assert_allclose(start.weights * len(X), counts, rtol=1e-12)  # the same labels, hence the same counts ...
    for k in range(K):  # ... and the same rows per label
        assert_allclose(start.means[k] - offset, X[km.labels_ == k].mean(axis=0) - offset, rtol=0, atol=1e-6)

    params = dict(n_components=K, random_state=seed, tol=0, max_iter=10)
    ref = sklearn_fit(X, **params)
    ours = fit_quietly(streamem.GaussianMixture(**params), X)
    assert abs(ours.lower_bound_ - ref.lower_bound_) < 1e-6, (ours.lower_bound_, ref.lower_bound_)


def test_kmeans_plus_plus_far_from_the_origin_finds_the_clusters():
    """k-means++ seeds on data at 1e9 are those on the same data at 0 (centred first)."""
    starts = []
    for offset in (0.0, 1e9):
        X = _far_data(offset)
        start = initial_params(_passes(X), GaussianFamily("full"), 4, "k-means++", np.random.RandomState(6))[0]
        starts.append(start.means - offset)
    assert_allclose(starts[1], starts[0], rtol=0, atol=1e-6)


# ------------------------------------------------------------ memory (item 14)
#: One chunk with many components: the old passes held several dense
#: (rows x K) float64 arrays of 64 MiB here (peaks 194 and 130 MiB).
MEM_ROWS, MEM_K = 16384, 512


def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def big_k_chunk():
    rng = np.random.RandomState(2)
    return rng.standard_normal((MEM_ROWS, 4)), rng.standard_normal((MEM_K, 4)) * 2


def test_kmeans_label_pass_memory_is_bounded(big_k_chunk):
    from scipy.spatial.distance import cdist

    X, centers = big_k_chunk
    family = GaussianFamily("diag")
    (stats,), peak = _peak(lambda: _hard_assign_stats(X, 0, (family, [centers])))
    assert peak < 3 * SLICE_BYTES, peak / 2**20
    # The same statistics as brute-force nearest centres over the whole chunk.
    resp = np.zeros((MEM_ROWS, MEM_K))
    resp[np.arange(MEM_ROWS), cdist(X, centers, "sqeuclidean").argmin(axis=1)] = 1.0
    ref = family.stats_from_resp(X, resp, centers)
    for name in ("nk", "s1", "s2"):
        assert_allclose(stats[name], ref[name], rtol=1e-9, atol=1e-9, err_msg=name)


def test_random_resp_pass_memory_is_bounded_and_exact(big_k_chunk):
    """Sliced, and each slice's numbers are those of the rows' own place in the Philox stream."""
    X, centers = big_k_chunk
    family = GaussianFamily("full")
    center = np.repeat(X.mean(axis=0, keepdims=True), MEM_K, axis=0)
    offset, key = 1000, 123
    (stats,), peak = _peak(lambda: _random_resp_stats(X, offset, (family, [key], center)))
    assert peak < 3 * SLICE_BYTES, peak / 2**20
    # Reference: the first offset + n rows of K uniforms from one stream, normalised per row.
    u = np.random.Generator(np.random.Philox(key=key)).random((offset + MEM_ROWS, MEM_K))[offset:]
    ref = family.stats_from_resp(X, u / u.sum(axis=1, keepdims=True), center)
    for name in ("nk", "s1", "s2"):
        assert_allclose(stats[name], ref[name], rtol=1e-10, atol=1e-9, err_msg=name)


def test_random_resp_numbers_do_not_depend_on_slicing():
    from streamem.init import random_resp

    key, K = 77, 5
    whole = random_resp(key, 0, 100, K)
    assert_allclose(whole.sum(axis=1), 1.0, rtol=1e-14)
    for cuts in [(0, 1, 100), (0, 3, 37, 38, 100), (0, 99, 100)]:
        parts = [random_resp(key, a, b - a, K) for a, b in zip(cuts[:-1], cuts[1:])]
        assert_array_equal(np.concatenate(parts), whole)


# ------------------------------------- random responsibilities as scikit-learn's (issue 17 item 8)
N_RANDOM = 20_000


@pytest.fixture(scope="module")
def X20k() -> np.ndarray:
    rng = np.random.RandomState(17)
    labels = rng.randint(3, size=N_RANDOM)
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 5.0, 1.0]])
    return rng.standard_normal((N_RANDOM, 3)) + centres[labels]


@pytest.mark.parametrize("n_init", [1, 2])
@pytest.mark.parametrize("method", INIT_METHODS)
def test_init_on_data_within_the_sample_is_sklearns(X20k, tmp_path, method, n_init):
    """20k rows (<= init_sample_size) in a Zarr store of unequal chunks: after one iteration the fit
    is scikit-learn's, restarts included (init_params="random" differed by 0.015 before issue 17)."""
    path = write_zarr(tmp_path / "x20k.zarr", X20k, (6000, 3))  # 4 chunks, the last 2,000 rows
    params = dict(n_components=3, init_params=method, max_iter=1, random_state=5, n_init=n_init)
    ref = sklearn_fit(X20k, **params)
    ours = fit_quietly(streamem.GaussianMixture(**params), path)
    assert_allclose(ours.means_, ref.means_, rtol=0, atol=1e-10)
    assert_allclose(ours.weights_, ref.weights_, rtol=0, atol=1e-12)
    assert_allclose(ours.covariances_, ref.covariances_, rtol=0, atol=1e-10)
    assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=1e-12)


def test_random_start_within_the_sample_is_one_draw_of_all_rows(X20k):
    """The start (before any EM step) is the M-step of rng.uniform(size=(n, K)) per run, whatever the chunking,
    and the generator is consumed by the runs' matrices in run order."""
    K, seed = 4, 9
    rng = np.random.RandomState(seed)
    expected = []
    for _ in range(2):
        resp = rng.uniform(size=(N_RANDOM, K))
        resp /= resp.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0)
        expected.append((nk / N_RANDOM, resp.T @ X20k / nk[:, None]))
    for chunks in (7000, (1, 4999, 9000, 6000)):
        starts = initial_params(_passes(da.from_array(X20k, chunks=(chunks, -1))), GaussianFamily("diag"), K, "random",
                                np.random.RandomState(seed), n_runs=2)  # fmt: skip
        for start, (weights, means) in zip(starts, expected):
            assert_allclose(start.weights, weights, rtol=1e-12)
            assert_allclose(start.means, means, rtol=1e-11, atol=1e-12)


def test_random_start_beyond_the_sample_uses_per_row_streams(X20k):
    """n > init_sample_size: no (n, K) matrix on the client; each row's numbers come from the run's Philox key."""
    K, seed, size = 3, 4, 5000
    start = initial_params(_passes(da.from_array(X20k, chunks=(3000, -1))), GaussianFamily("diag"), K, "random",
                           np.random.RandomState(seed), sample_size=size)[0]  # fmt: skip
    key = int(np.random.RandomState(seed).randint(np.iinfo(np.int64).max, dtype=np.int64))
    u = np.random.Generator(np.random.Philox(key=key)).random((N_RANDOM, K))
    resp = u / u.sum(axis=1, keepdims=True)
    nk = resp.sum(axis=0)
    assert_allclose(start.means, resp.T @ X20k / nk[:, None], rtol=1e-11, atol=1e-12)
