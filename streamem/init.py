"""Initial parameters, computed out of core.

The methods are scikit-learn's (``init_params``): initial responsibilities
from k-means labels, k-means++ seeds, random rows, or random numbers, followed
by one M-step. K-means runs on a uniform random sample of rows drawn from
every chunk (:func:`sample_index`); when the data have no more rows than the
sample size the sample is the whole data set, and the result is then
scikit-learn's own. So are random responsibilities then: scikit-learn's
``rng.uniform(size=(n, K))`` per run, drawn on the client; larger data get
numbers of their own per row from a Philox stream (:func:`random_resp`).

The passes over all rows (k-means labels, random responsibilities) work on
slices of each chunk, so that their (rows x K) arrays stay within about
:data:`~streamem.families.gaussian.SLICE_BYTES` each whatever the chunk size
and ``n_components``; the statistics of the slices are summed in row order.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from streamem.backend import to_numpy
from streamem.em import DataPasses, add_elementwise
from streamem.families.gaussian import SLICE_BYTES
from streamem.stats import SuffStats

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")
#: Rows k-means sees at most.
DEFAULT_SAMPLE_SIZE = 100_000
#: Rows per block of the sampling draw (:func:`sample_index`). A constant, not
#: the storage chunking, so that the sample does not depend on the chunking.
SAMPLE_BLOCK_ROWS = 2**16


def sample_index(n: int, size: int, rng: np.random.RandomState) -> np.ndarray:
    """Indices of a uniform random sample of ``size`` of ``n`` rows, without replacement.

    The rows are cut into blocks of :data:`SAMPLE_BLOCK_ROWS` (the last one
    shorter), visited in order. For block ``i`` of ``b_i`` rows, with ``r_i``
    rows in it and the blocks after it and ``s_i`` sample rows not yet placed:

    1. its count is ``k_i = rng.hypergeometric(b_i, r_i - b_i, s_i)``; the
       last block takes ``k_i = s_i``, and no draw is made once ``s_i = 0``;
    2. if ``k_i > 0``, its rows are ``first_row_i + rng.choice(b_i, k_i,
       replace=False)``, in the order drawn.

    The counts have the joint law of a uniform sample, so every subset of
    ``size`` rows is equally likely; the client holds one block's positions
    at a time instead of a permutation of all ``n`` rows (1.5 GiB at 200M
    rows). With ``n <= SAMPLE_BLOCK_ROWS`` this is ``rng.choice(n, size,
    replace=False)``, scikit-learn's own draw.

    Parameters
    ----------
    n : int
        Number of rows, ``n >= size``.
    size : int
        Number of rows to draw.
    rng : numpy.random.RandomState
        Consumed as described above.

    Returns
    -------
    numpy.ndarray
        ``size`` distinct row indices (int64), block after block, in the
        order drawn inside each block.
    """
    parts = []
    left, remaining = size, n
    for first in range(0, n, SAMPLE_BLOCK_ROWS):
        if left == 0:
            break
        rows = min(SAMPLE_BLOCK_ROWS, n - first)
        k = left if rows == remaining else int(rng.hypergeometric(rows, remaining - rows, left))
        if k:
            parts.append(first + rng.choice(rows, k, replace=False).astype(np.int64))
        left -= k
        remaining -= rows
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _concat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([a, b])


def _rows_at(block: np.ndarray, offset: int, payload: tuple[np.ndarray | None, Callable | None]) -> np.ndarray:
    """The rows of ``block`` whose global indices are in ``index`` (all if None), on the host.

    ``check(block, offset)``, when given, sees the whole chunk first: a
    family's data errors name the row where they are, sampled or not.
    """
    index, check = payload
    if check is not None:
        check(to_numpy(block), offset)
    if index is None:
        return to_numpy(block).astype(np.float64, copy=False)
    lo, hi = np.searchsorted(index, [offset, offset + len(block)])
    return to_numpy(block[index[lo:hi] - offset]).astype(np.float64, copy=False)


def draw_sample(passes: DataPasses, size: int, rng: np.random.RandomState, check: Callable | None = None) -> np.ndarray:
    """A uniform random sample of ``size`` rows (all rows if there are fewer), in row order.

    The rows are those of :func:`sample_index`, sorted; ``rng`` is not used
    when all rows are taken. Every chunk is read, and its non-finite values
    are reported; ``check(chunk, first_row)`` (a family's ``check_data``)
    sees every chunk too.
    """
    n = passes.data.n_samples
    index = None if n <= size else np.sort(sample_index(n, size, rng))
    return passes.run(_rows_at, (index, check), _concat, check_block=True)


def _gather_rows(passes: DataPasses, index: np.ndarray, check: Callable | None = None) -> np.ndarray:
    order = np.argsort(index)
    rows = passes.run(_rows_at, (index[order], check), _concat)
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _slice_rows(n_components: int) -> int:
    """Rows per slice: a (rows x ``n_components``) float64 array takes at most about SLICE_BYTES."""
    return max(256, SLICE_BYTES // (8 * max(n_components, 1)))


def _sum_over_slices(X: np.ndarray, n_components: int, fn: Callable[[np.ndarray, int], SuffStats]) -> SuffStats:
    """``sum fn(X[start:stop], start)`` over row slices of ``X``, in row order (one empty slice if ``X`` is)."""
    step = _slice_rows(n_components)
    total = None
    for start in range(0, len(X) or 1, step):
        part = fn(X[start : start + step], start)
        total = part if total is None else total + part
    return total


def _nearest(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of every row, in float64.

    Both are first shifted by the mean of the centres: the expanded
    distance ``|x|^2 - 2 x.c + |c|^2`` of raw data far from the origin
    (timestamps ~1e9 with unit spread) loses every digit that tells the
    centres apart. ``|x|^2`` is the same for every centre and is left out.
    """
    shift = centers.mean(axis=0)
    c = centers - shift
    score = (X.astype(np.float64, copy=False) - shift) @ c.T
    score -= 0.5 * (c**2).sum(axis=1)
    return score.argmax(axis=1)


def _hard_assign_stats(block: Any, offset: int, payload: tuple[Any, list[np.ndarray]]) -> list[SuffStats]:
    """Statistics of nearest-centre (k-means) labels, for every set of centres."""
    family, centers_list = payload
    X = to_numpy(block)
    family.check_data(X, offset)

    def one_slice(rows: np.ndarray, centers: np.ndarray) -> SuffStats:
        rows = rows.astype(np.float64, copy=False)
        resp = np.zeros((len(rows), len(centers)))
        resp[np.arange(len(rows)), _nearest(rows, centers)] = 1.0
        return family.stats_from_resp(rows, resp, centers)

    return [_sum_over_slices(X, len(c), lambda rows, start, c=c: one_slice(rows, c)) for c in centers_list]


def random_resp(key: int, first_row: int, n_rows: int, n_components: int) -> np.ndarray:
    """Uniform random responsibilities of rows ``first_row`` to ``first_row + n_rows - 1``.

    Row ``i`` gets the ``n_components`` uniforms at positions ``i * K`` to
    ``(i + 1) * K - 1`` of the stream ``Generator(Philox(key)).random``,
    normalised to sum 1: a function of the key and the global row only,
    whatever the chunking and slicing.
    """
    start = first_row * n_components
    bitgen = np.random.Philox(key=key)
    bitgen.advance(start // 4)  # Philox makes 4 64-bit words per counter step
    gen = np.random.Generator(bitgen)
    gen.random(start % 4)
    resp = gen.random((n_rows, n_components))
    resp /= resp.sum(axis=1, keepdims=True)
    return resp


def sklearn_random_resp(n_rows: int, n_components: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's random responsibilities of all ``n_rows`` rows: ``rng.uniform(size=(n, K))``, normalised per row."""
    resp = rng.uniform(size=(n_rows, n_components))
    resp /= resp.sum(axis=1)[:, np.newaxis]
    return resp


def _resp_rows(source: int | np.ndarray, first_row: int, n_rows: int, n_components: int) -> np.ndarray:
    """Responsibilities of rows ``first_row`` to ``first_row + n_rows - 1``: from a Philox key, or a slice of all rows' matrix."""
    if isinstance(source, np.ndarray):
        return source[first_row : first_row + n_rows]
    return random_resp(source, first_row, n_rows, n_components)


def _random_resp_stats(block: Any, offset: int, payload: tuple[Any, list[int | np.ndarray], np.ndarray]) -> list[SuffStats]:
    """Statistics of uniform random responsibilities, for every run.

    A run's source is a Philox key (:func:`random_resp`) or the (n, K)
    matrix of all rows (:func:`sklearn_random_resp`).
    """
    family, sources, center = payload
    K = len(center)
    X = to_numpy(block)
    family.check_data(X, offset)

    def one_slice(rows: np.ndarray, start: int, source: int | np.ndarray) -> SuffStats:
        return family.stats_from_resp(rows, _resp_rows(source, offset + start, len(rows), K), center)

    return [_sum_over_slices(X, K, lambda rows, start, src=src: one_slice(rows, start, src)) for src in sources]


def initial_params(
    passes: DataPasses,
    family: Any,
    n_components: int,
    method: str,
    rng: np.random.RandomState,
    n_runs: int = 1,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    family_of_sample: Callable[[np.ndarray], Any] | None = None,
) -> list:
    """Initial parameters of ``n_runs`` runs by ``method`` (one of :data:`INIT_METHODS`).

    The runs share the data passes: at most one to draw the sample and one
    for the initial statistics, whatever ``n_runs``. ``rng`` is consumed run
    after run as scikit-learn does, so that with the whole data as the sample
    the runs are scikit-learn's.

    Samples are drawn by :func:`sample_index` and do not depend on the
    chunking: ``kmeans`` and ``k-means++`` run on ``sample_size`` rows (all
    rows, without using ``rng``, if there are no more), ``random`` centres its
    statistics at the mean of ``min(sample_size, 1000)`` rows (its
    responsibilities are scikit-learn's ``rng.uniform(size=(n, K))`` per run
    when ``n <= sample_size``: the (n, K) matrices are drawn on the client
    and travel to the tasks; with more rows, each run draws a Philox key and
    every row its own numbers, :func:`random_resp`), and
    ``random_from_data`` takes ``n_components`` rows per run (with at most
    :data:`SAMPLE_BLOCK_ROWS` rows that is scikit-learn's
    ``rng.choice(n, n_components, replace=False)``).

    ``family_of_sample``, when given, is called with the sample the method
    draws (``kmeans``, ``k-means++``, ``random``) and returns the family
    to initialise with (a prior computed from that sample).

    Raises
    ------
    ValueError
        If ``sample_size < n_components``.
    """
    if family_of_sample is None:
        family_of_sample = lambda sample: family  # noqa: E731
    if sample_size < n_components:
        raise ValueError(
            f"sample_size={sample_size!r} must be >= n_components={n_components!r}: "
            "k-means needs at least one sample row per component"
        )
    n = passes.data.n_samples
    if method == "kmeans":
        from sklearn.cluster import KMeans

        sample = draw_sample(passes, sample_size, rng, family.check_data)
        family = family_of_sample(sample)
        centers = [KMeans(n_clusters=n_components, n_init=1, random_state=rng).fit(sample).cluster_centers_ for _ in range(n_runs)]
        stats = passes.run(_hard_assign_stats, (family, centers), add_elementwise)
        return [family.init_params(st, c, n) for st, c in zip(stats, centers)]
    if method == "random":
        sources: list[int | np.ndarray]
        if n <= sample_size:
            # Small enough to hold (as k-means holds its sample): scikit-learn's own draws, run after run.
            sources = [sklearn_random_resp(n, n_components, rng) for _ in range(n_runs)]
        else:
            sources = [int(rng.randint(np.iinfo(np.int64).max, dtype=np.int64)) for _ in range(n_runs)]
        # The centre only conditions the sums of squares: any rows near the data do.
        sample = draw_sample(passes, min(sample_size, 1000), rng, family.check_data)
        family = family_of_sample(sample)
        center = np.repeat(sample.mean(axis=0, keepdims=True), n_components, axis=0)
        stats = passes.run(_random_resp_stats, (family, sources, center), add_elementwise)
        return [family.init_params(st, center, n) for st in stats]
    if method == "k-means++":
        from sklearn.cluster import kmeans_plusplus

        sample = draw_sample(passes, sample_size, rng, family.check_data)
        family = family_of_sample(sample)
        # Centred, as scikit-learn's KMeans does before its own k-means++:
        # the squared distances of raw data far from the origin cancel.
        centred = sample - sample.mean(axis=0)
        points = [sample[kmeans_plusplus(centred, n_components, random_state=rng)[1]] for _ in range(n_runs)]
    else:  # random_from_data
        index = np.concatenate([sample_index(n, n_components, rng) for _ in range(n_runs)])
        points = np.split(_gather_rows(passes, index, family.check_data), n_runs)
    # One row per component, centred at itself: counts 1, zero scatter.
    eye = np.eye(n_components)
    return [family.init_params(family.stats_from_resp(p, eye, p), p, n) for p in points]
