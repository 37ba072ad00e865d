"""Initial parameters, computed out of core.

The methods are scikit-learn's (``init_params``): initial responsibilities
from k-means labels, k-means++ seeds, random rows, or random numbers, followed
by one M-step. K-means runs on a uniform random sample of rows drawn from
every chunk; when the data have no more rows than the sample size the sample
is the whole data set, and the result is then scikit-learn's own.
"""

from __future__ import annotations

import numpy as np

from streamem.backend import to_numpy
from streamem.em import DataPasses, add_elementwise
from streamem.stats import SuffStats

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")
#: Rows k-means sees at most.
DEFAULT_SAMPLE_SIZE = 100_000


def _concat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([a, b])


def _rows_at(block: np.ndarray, offset: int, index: np.ndarray | None) -> np.ndarray:
    """The rows of ``block`` whose global indices are in ``index`` (all if None), on the host."""
    if index is None:
        return to_numpy(block).astype(np.float64, copy=False)
    lo, hi = np.searchsorted(index, [offset, offset + len(block)])
    return to_numpy(block[index[lo:hi] - offset]).astype(np.float64, copy=False)


def draw_sample(passes: DataPasses, size: int, rng: np.random.RandomState) -> np.ndarray:
    """A uniform random sample of ``size`` rows (all rows if there are fewer).

    Every chunk is read, and its non-finite values are reported.
    """
    n = passes.data.n_samples
    index = None if n <= size else np.sort(rng.choice(n, size, replace=False))
    return passes.run(_rows_at, index, _concat, check_block=True)


def _gather_rows(passes: DataPasses, index: np.ndarray) -> np.ndarray:
    order = np.argsort(index)
    rows = passes.run(_rows_at, index[order], _concat)
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _hard_assign_stats(block: np.ndarray, offset: int, payload) -> list[SuffStats]:
    """Statistics of nearest-centre (k-means) labels, for every set of centres."""
    family, centers_list = payload
    X = to_numpy(block).astype(np.float64, copy=False)
    out = []
    for centers in centers_list:
        d2 = (X**2).sum(axis=1)[:, None] - 2.0 * X @ centers.T + (centers**2).sum(axis=1)
        resp = np.zeros((len(X), len(centers)))
        resp[np.arange(len(X)), d2.argmin(axis=1)] = 1.0
        out.append(family.stats_from_resp(X, resp, centers))
    return out


def _random_resp_stats(block: np.ndarray, offset: int, payload) -> list[SuffStats]:
    """Statistics of uniform random responsibilities, for every key."""
    family, keys, center = payload
    K = len(center)
    out = []
    for key in keys:
        # A counter-based generator positioned at this chunk's first row makes
        # the numbers a function of the row, whatever the chunking.
        start = offset * K
        bitgen = np.random.Philox(key=key)
        bitgen.advance(start // 4)  # Philox makes 4 64-bit words per counter step
        gen = np.random.Generator(bitgen)
        gen.random(start % 4)
        resp = gen.random((len(block), K))
        resp /= resp.sum(axis=1, keepdims=True)
        out.append(family.stats_from_resp(block, resp, center))
    return out


def initial_params(
    passes: DataPasses,
    family,
    n_components: int,
    method: str,
    rng: np.random.RandomState,
    n_runs: int = 1,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> list:
    """Initial parameters of ``n_runs`` runs by ``method`` (one of :data:`INIT_METHODS`).

    The runs share the data passes: at most one to draw the sample and one
    for the initial statistics, whatever ``n_runs``. ``rng`` is consumed run
    after run as scikit-learn does, so that with the whole data as the sample
    the runs are scikit-learn's.
    """
    n = passes.data.n_samples
    if method == "kmeans":
        from sklearn.cluster import KMeans

        sample = draw_sample(passes, sample_size, rng)
        centers = [KMeans(n_clusters=n_components, n_init=1, random_state=rng).fit(sample).cluster_centers_ for _ in range(n_runs)]
        stats = passes.run(_hard_assign_stats, (family, centers), add_elementwise)
        return [family.init_params(st, c, n) for st, c in zip(stats, centers)]
    if method == "random":
        keys = [int(rng.randint(np.iinfo(np.int64).max, dtype=np.int64)) for _ in range(n_runs)]
        sample = draw_sample(passes, min(sample_size, 1000), rng)
        center = np.repeat(sample.mean(axis=0, keepdims=True), n_components, axis=0)
        stats = passes.run(_random_resp_stats, (family, keys, center), add_elementwise)
        return [family.init_params(st, center, n) for st in stats]
    if method == "k-means++":
        from sklearn.cluster import kmeans_plusplus

        sample = draw_sample(passes, sample_size, rng)
        points = [sample[kmeans_plusplus(sample, n_components, random_state=rng)[1]] for _ in range(n_runs)]
    else:  # random_from_data
        index = np.concatenate([rng.choice(n, size=n_components, replace=False) for _ in range(n_runs)])
        points = np.split(_gather_rows(passes, index), n_runs)
    # One row per component, centred at itself: counts 1, zero scatter.
    eye = np.eye(n_components)
    return [family.init_params(family.stats_from_resp(p, eye, p), p, n) for p in points]
