"""The driver: data passes over chunks and the batch EM loop.

This is the only module that builds and computes Dask graphs. A *data pass*
maps a function over the row chunks of the data, combines the per-chunk
results in a fixed tree ordered by chunk index (:mod:`streamem.tree`: the
rounding does not depend on the number of workers or on scheduling) and
computes the whole thing with exactly one ``dask.compute``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import cloudpickle
import dask
import numpy as np

from streamem import tree
from streamem.cluster import is_client, persist_spread
from streamem.data import InputData
from streamem.families.base import DataError
from streamem.stats import SuffStats

logger = logging.getLogger("streamem")


#: A per-chunk function: (chunk, first global row of the chunk, payload) -> value.
BlockFn = Callable[[np.ndarray, int, Any], Any]


@dataclass
class BlockResult:
    """What one chunk returns: a value plus a record of non-finite entries."""

    value: Any
    n_bad: int = 0
    bad_rows: tuple[int, int] | None = None
    error: DataError | None = None


def _run_block(fn: BlockFn, block: np.ndarray, payload: Any, offset: int, check_block: bool) -> BlockResult:
    # Non-finite data make the arithmetic warn; they are reported below instead.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        try:
            value = fn(block, offset, payload)
        except DataError as exc:  # kept, so that the pass reports the lowest row's, not the first to finish
            return BlockResult(None, error=exc)
    if not check_block and _all_finite(value):
        return BlockResult(value)
    bad = ~np.isfinite(block)
    if not bad.any():
        return BlockResult(value)  # e.g. an overflow: not the data's fault
    rows = np.flatnonzero(bad.any(axis=1))
    return BlockResult(value, int(bad.sum()), (offset + int(rows[0]), offset + int(rows[-1])))


def _all_finite(value: Any) -> bool:
    if isinstance(value, SuffStats):
        return all(np.isfinite(v).all() for v in value.arrays.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return bool(np.isfinite(value).all())


def _combine(combine: Callable[[Any, Any], Any], *parts: BlockResult) -> BlockResult:
    errors = [p.error for p in parts if p.error is not None]
    if errors:
        return BlockResult(None, error=min(errors, key=lambda e: e.row))
    value = parts[0].value
    for part in parts[1:]:
        value = combine(value, part.value)
    spans = [p.bad_rows for p in parts if p.bad_rows is not None]
    bad_rows = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None
    return BlockResult(value, sum(p.n_bad for p in parts), bad_rows)


def _run_link(link: Callable[..., Any], runs: Any, block: Any, offset: int, payload: _Literal) -> Any:
    return link(runs.value if isinstance(runs, _Literal) else runs, block, offset, payload.value)


def _at_home(home: str | None) -> Any:
    """Ask the tasks built inside to run on ``home``, the worker holding their chunk (loosely)."""
    return dask.annotate(workers=[home], allow_other_workers=True) if home else contextlib.nullcontext()


def _read_block(block: Any, gate: Any) -> Any:
    """The chunk of a one-chunk dask array, read in this task (``gate`` only orders it)."""
    return block.value.compute(scheduler="sync")


class _Literal:
    """A payload Dask passes to tasks as it is: not searched for Dask objects."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


#: On a cluster, a payload is shipped inside every chunk task while its
#: copies take at most this many bytes (a pass saves a task and a transfer:
#: an empty pass 30 -> 20 ms on 2 workers); a larger one is one task whose
#: result the workers fetch. Local threads share it as it is.
EMBED_PAYLOAD_BYTES = 4 * 2**20

#: How many chunks an online pass reads ahead of the chunk being processed.
READ_AHEAD = 2


def _run_group(
    fn: BlockFn,
    blocks: list[np.ndarray],
    payload: _Literal,
    offsets: list[int],
    first: int,
    check_block: bool,
    node_combine: tree.NodeCombine,
    n_chunks: int,
) -> tree.Partial:
    """Consecutive chunks ``first, first + 1, ...`` in one task, combined as far as the tree allows."""
    results = [_run_block(fn, block, payload.value, offset, check_block) for block, offset in zip(blocks, offsets)]
    return tree.leaves(first, results, node_combine, n_chunks)


def _chunk_groups(homes: list[str | None], threads: dict[str, int]) -> list[tuple[int, int]]:
    """Chunk ranges ``[start, stop)`` run by one task each.

    Consecutive chunks held by the same worker go together, up to
    ``tree.FAN_IN`` of them and in at least as many tasks as the worker has
    threads; a chunk no worker holds is a task of its own (its read is a
    task anyway, and may run anywhere).
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for stop in range(1, len(homes) + 1):
        if stop < len(homes) and homes[stop] is not None and homes[stop] == homes[start]:
            continue
        home = homes[start]
        size = 1 if home is None else max(1, min(tree.FAN_IN, -(-(stop - start) // threads.get(home, 1))))
        groups += [(i, min(i + size, stop)) for i in range(start, stop, size)]
        start = stop
    return groups


def add_elementwise(a: Sequence[SuffStats], b: Sequence[SuffStats]) -> list[SuffStats]:
    """Combine the statistics of several models, model by model."""
    return [x + y for x, y in zip(a, b)]


class _SharedBlasLimit:
    """``threadpool_limits(1)`` for as long as any pass in this process needs it.

    BLAS thread counts are process-wide, so passes of fits running at once in
    several threads share one limit: the first pass in sets it and the last
    one out restores the counts the first one found. (Each pass entering
    ``threadpool_limits`` on its own took a count another pass had lowered
    for the original, and could leave OpenBLAS at 1 thread for good.)

    The limit is held by a thread of our own, which sets and restores it:
    threadpoolctl 3.8+ lets only the thread that set OpenBLAS's count change
    it until that thread's ``with threadpool_limits`` ends, and silently
    ignores the others, so a restore from another fit's thread did nothing.
    The thread lives only while the limit does (nothing left to a fork).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._release = threading.Event()
        self._holder: threading.Thread | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._hold()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._holder is not None:
                    self._release.set()
                    self._holder.join()
                    self._holder = None

    def _hold(self) -> None:
        """Start the thread that sets the limit, and wait until it has."""
        limited, release = threading.Event(), threading.Event()

        def hold() -> None:
            from threadpoolctl import threadpool_limits

            try:
                with threadpool_limits(1):
                    limited.set()
                    release.wait()
            finally:
                limited.set()  # also when limiting failed: the passes run unlimited

        self._release = release
        self._holder = threading.Thread(target=hold, name="streamem-blas-limit", daemon=True)
        self._holder.start()
        limited.wait()


_ONE_BLAS_THREAD = _SharedBlasLimit()


@dataclass(frozen=True)
class Progress:
    """Progress bars over the chunks of data passes, and what each bar says.

    ``DataPasses(progress=True)`` is ``Progress()``. A bar names its pass:
    ``iteration 3`` (batch EM), ``pass 2 (stepwise)`` (online EM; its
    exact log-likelihood pass ``pass 2 (stepwise): log-likelihood``),
    ``initialisation pass 1/2`` (the passes of :mod:`streamem.init`), and
    any other pass ``label``.

    Parameters
    ----------
    label : str, optional
        What a pass that is none of the above says (e.g. ``"score"``).
    init_passes : int, optional
        How many initialisation passes the fit makes, when the caller knows
        (the ``/2``); without it the bars just count them.
    first_pass : int, default=1
        The number of the first online pass (a resumed fit continues its count).
    """

    label: str | None = None
    init_passes: int | None = None
    first_pass: int = 1


_PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("streamem_progress", default=None)


@contextlib.contextmanager
def progress_bars(progress: bool | Progress = True) -> Iterator[None]:
    """Progress bars for the passes of every :class:`DataPasses` made in the block without a ``progress`` of its own.

    For code that makes its passes without a ``progress`` argument (e.g.
    :func:`streamem.mapreduce.accumulate`); ``progress=False`` turns them off.
    """
    token = _PROGRESS.set(_as_progress(progress))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _as_progress(progress: bool | Progress | None) -> Progress | None:
    if progress is None:
        return _PROGRESS.get()
    if isinstance(progress, Progress):
        return progress
    return Progress() if progress else None


class DataPasses:
    """Runs passes over the chunks of one data set.

    Parameters
    ----------
    data : InputData
    scheduler : str or distributed.Client
        Passed to ``dask.compute``.
    progress : bool or Progress, optional
        Show a progress bar over the chunks of every pass (a ``Progress``:
        also what the bars say). Default: as :func:`progress_bars` set it
        around the caller, else none.
    persist : bool
        Keep the chunks in (the workers') memory after the first read.
    """

    def __init__(self, data: InputData, scheduler: Any, *, progress: bool | Progress | None = None, persist: bool = False):
        self.data = data
        self.scheduler = scheduler
        self.progress = _as_progress(progress)
        self._init_passes = 0  # passes of streamem.init so far, and online passes: what the bars count
        self._online_passes, self._algorithm = 0, ""
        self.offsets = data.row_offsets()
        self.persisted = persist
        # With ``persist`` the data are read once; later passes find the
        # chunks in (the workers') memory, held by ``self.blocks``.
        array = data.array
        if persist and not is_client(scheduler):
            array = array.persist(scheduler=scheduler)
        self.blocks = list(array.to_delayed().ravel())
        #: The worker holding each chunk, where one does.
        self.homes: list[str | None] = [None] * len(self.blocks)
        threads: dict[str, int] = {}
        if persist and is_client(scheduler):
            self.blocks, self.homes, threads = persist_spread(scheduler, self.blocks)
        self.groups = _chunk_groups(self.homes, threads)
        self.n_passes = 0
        self.tasks_per_pass = 0

    def close(self) -> None:
        """Let go of persisted chunks (the workers free them).

        Futures are released explicitly: one held by a reference cycle
        somewhere would otherwise keep its chunk on a worker until Python's
        cycle collector happens to run (seen as a flaky test).
        """
        if is_client(self.scheduler):
            from distributed import Future

            for block in self.blocks:
                if isinstance(block, Future):
                    block.release()
        self.blocks = []

    def run(
        self, fn: BlockFn, payload: Any, combine: Callable[[Any, Any], Any], *, check_block: bool = False, label: str | None = None
    ) -> Any:
        """``combine``-reduce ``fn(chunk, offset, payload)`` over all chunks, in chunk order.

        Raises ValueError naming the count and row range of non-finite values
        if the data hold any. The chunk itself is scanned when
        ``check_block`` or when ``fn``'s result is not finite. ``label`` is
        what the pass's progress bar says (default: see :class:`Progress`).
        """
        label = label or self._label(fn)
        payload = _Literal(payload)
        if is_client(self.scheduler) and len(cloudpickle.dumps(payload)) * len(self.groups) > EMBED_PAYLOAD_BYTES:
            payload = dask.delayed(payload, pure=False)  # one task; its result travels to the others
        node_combine = partial(_combine, combine)
        n_chunks = len(self.blocks)
        level = group_tasks = [self._group_task(fn, payload, node_combine, start, stop, check_block) for start, stop in self.groups]
        # Merge tasks until at most FAN_IN partials are left; the client
        # merges those (saving a task and a transfer per pass).
        while len(level) > tree.FAN_IN:
            level = [
                dask.delayed(tree.merge, pure=False)(node_combine, n_chunks, *level[i : i + tree.FAN_IN])
                for i in range(0, len(level), tree.FAN_IN)
            ]
        self.tasks_per_pass = len(set().union(*(task.__dask_graph__().keys() for task in level)))
        sizes = {task.key: stop - start for task, (start, stop) in zip(group_tasks, self.groups)}
        result = tree.root(tree.merge(node_combine, n_chunks, *self._compute(level, group_tasks, sizes, label)))
        self.n_passes += 1
        if result.error is not None:
            raise result.error
        if result.n_bad:
            lo, hi = result.bad_rows
            raise ValueError(
                f"X contains {result.n_bad} non-finite values (NaN or inf) in rows {lo} to {hi}; "
                "remove or impute them before fitting"
            )
        return result.value

    def _label(self, fn: Callable[..., Any]) -> str | None:
        """What the progress bar of a pass of ``fn`` says, when its caller gave no label (see :class:`Progress`)."""
        if self.progress is None:
            return None
        module = getattr(fn, "__module__", "")
        if module == "streamem.init":  # the initialisation's sample and statistics passes
            self._init_passes += 1
            total = self.progress.init_passes
            return f"initialisation pass {self._init_passes}" + (f"/{total}" if total else "")
        if module == "streamem.online" and self._online_passes:  # online EM's exact log-likelihood after a pass
            return f"{self._online_label()}: log-likelihood"
        return self.progress.label

    def _online_label(self) -> str:
        return f"pass {self.progress.first_pass + self._online_passes - 1} ({self._algorithm})" if self.progress else ""

    def _group_task(
        self, fn: BlockFn, payload: Any, node_combine: tree.NodeCombine, start: int, stop: int, check_block: bool
    ) -> Any:
        """The task of chunks ``start`` to ``stop - 1``, asked to run on the worker holding them.

        Measured at 1M x 16 on this project's 2-core machine: left to
        itself, a scheduler on a busy machine moved chunk tasks (and their
        8 MB chunks) between workers by timing, 0.34-0.52 s per pass with
        10/6 splits of 16 chunks instead of 0.27-0.32 s with 8/8; and every
        task costs ~3 ms of scheduling there (a pass of 16 empty chunk tasks
        took 90 ms), hence several chunks per task. The restriction is
        loose: a free worker may still take the task.
        """
        with _at_home(self.homes[start]):
            return dask.delayed(_run_group, pure=False)(
                fn,
                self.blocks[start:stop],
                payload,
                [int(off) for off in self.offsets[start:stop]],
                start,
                check_block,
                node_combine,
                len(self.blocks),
            )

    def chain(self, link: Callable[..., Any], runs: list[Any], family: Any, settings: Any, pass_seed: int) -> list[Any]:
        """One online pass: ``link(runs, chunk, offset, payload)`` over the chunks, one after another.

        The chunks are visited in an order shuffled by ``pass_seed`` (with
        ``settings.shuffle``, else in storage order); each link's task gets
        the runs the previous one returned, so the tasks form a chain, run
        where the chunk lives when it is persisted (persisted chunks are not
        read again). Chunk reads are tasks of their own, ready ahead of the chain but at most
        :data:`READ_AHEAD` chunks ahead of it (each read waits for the link
        that many places before its own), so a pass holds at most
        ``READ_AHEAD + 1`` chunks in memory. ``payload`` is ``(family,
        settings, chunk, pass_seed, the chunk's block statistics of each
        run)``. Returns the runs after the last chunk, their block
        statistics (``run.blocks``) replaced by what the links returned.
        """
        n_chunks = len(self.blocks)
        self._online_passes, self._algorithm = self._online_passes + 1, settings.algorithm
        order = np.random.RandomState(pass_seed).permutation(n_chunks) if settings.shuffle else np.arange(n_chunks)
        state: Any = _Literal([run.travelling() for run in runs])
        links: list[Any] = []
        for j, chunk in enumerate(int(i) for i in order):
            block, home = self.blocks[chunk], self.homes[chunk]
            if not self.persisted:  # read it in a task of its own, gated
                gate = links[j - READ_AHEAD][1] if j >= READ_AHEAD else None
                block = dask.delayed(_read_block, pure=False)(_Literal(self.data.array.blocks[chunk]), gate)
            payload = _Literal((family, settings, chunk, pass_seed, [run.blocks.get(chunk, {}) for run in runs]))
            with _at_home(home):
                links.append(dask.delayed(_run_link, pure=False, nout=2)(link, state, block, int(self.offsets[chunk]), payload))
            state = links[-1][0]
        self.tasks_per_pass = len(links[-1].__dask_graph__()) if links else 0
        results = self._compute(links, links, {task.key: 1 for task in links}, self._online_label()) if links else []
        final = results[-1][0] if results else [run.travelling() for run in runs]
        for run, previous in zip(final, runs):
            run.blocks = dict(previous.blocks)
        for chunk, (_, new_blocks) in zip(order, results):
            for run, blocks in zip(final, new_blocks):
                if blocks:
                    run.blocks[int(chunk)] = blocks
        self.n_passes += 1
        return final

    def _compute(self, level: list[Any], tick_tasks: list[Any], sizes: dict[Any, int], label: str | None = None) -> list[Any]:
        """One ``compute`` of the tasks in ``level``; with ``progress``, a bar over the chunks saying ``label``.

        ``sizes`` maps the key of each of ``tick_tasks`` to the chunks it
        covers: the bar moves as they finish.
        """
        if not self.progress:
            with self._blas_limits():
                return list(dask.compute(*level, scheduler=self.scheduler, optimize_graph=False))
        from tqdm import tqdm

        with tqdm(total=len(self.blocks), desc=label, unit="chunk", leave=False, dynamic_ncols=True) as bar:
            if is_client(self.scheduler):
                from distributed import as_completed

                # Group results are small partial sums: returning them as
                # well lets us count finished chunks as they arrive.
                futures = self.scheduler.compute([*level, *tick_tasks], optimize_graph=False)
                for future in as_completed(futures[len(level) :]):
                    bar.update(sizes[future.key])
                return self.scheduler.gather(futures[: len(level)])
            from dask.callbacks import Callback

            class _Tick(Callback):
                def _posttask(self, key, result, dsk, state, id):
                    bar.update(sizes.get(key, 0))

            with _Tick(), self._blas_limits():
                return list(dask.compute(*level, scheduler=self.scheduler, optimize_graph=False))

    def _blas_limits(self) -> Any:
        """One BLAS thread per task when local threads already run chunks in parallel.

        (Measured: 1.5 s instead of 0.8 s per iteration at 1M x 16, K=8, on 2
        cores, from BLAS threads competing with the scheduler's.) Dask's
        worker processes set this themselves. Shared by the passes of all
        fits running at once in this process (see ``_SharedBlasLimit``).
        """
        if self.scheduler in ("threads", "threading"):
            return _ONE_BLAS_THREAD()
        return contextlib.nullcontext()


@dataclass(eq=False)
class EMRun:
    """The state of one EM run (one initialisation).

    ``stats`` are the statistics of the last M-step, centred at ``center``
    (the means of their E-step): batch EM's sums over all rows, online EM's
    running statistics; ``n_steps`` counts the rows online EM has
    processed, in units of its ``batch_size``. They let a
    fit be continued by online EM (``partial_fit``, ``update``).
    """

    params: Any
    lower_bound: float = -np.inf
    lower_bounds: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    stats: SuffStats | None = None
    center: np.ndarray | None = None
    n_steps: float = 0.0


def _stats_of_models(block: np.ndarray, offset: int, payload: tuple[Any, list[Any]]) -> list[SuffStats]:
    family, params_list = payload
    family.check_data(block, offset)
    return [family.chunk_stats(block, params) for params in params_list]


def batch_em(
    passes: DataPasses,
    family: Any,
    runs: list[EMRun],
    *,
    tol: float,
    max_iter: int,
    callback: Callable[[int, list[EMRun]], None] | None = None,
    start_iter: int = 0,
    log_every: int = 1,
) -> list[EMRun]:
    """Batch EM for several runs at once, sharing one data pass per iteration.

    Each iteration computes, for every run still going, the statistics and
    the log-likelihood under its current parameters in one pass, then does
    the M-steps on the client. A run stops when its mean log-likelihood
    (plus the log-prior per row, for MAP) changes by less than ``tol`` (scikit-learn's rule) or after ``max_iter``
    iterations. ``callback(iteration, runs)`` is called after every M-step.
    One INFO line per run is logged every ``log_every`` iterations and at
    the end.
    """
    n = passes.data.n_samples
    for iteration in range(start_iter + 1, max_iter + 1):
        active = [run for run in runs if not run.converged]
        if not active:
            break
        tic = time.perf_counter()
        stats = passes.run(_stats_of_models, (family, [r.params for r in active]), add_elementwise, label=f"iteration {iteration}")
        changes = []
        for run, s in zip(active, stats):
            previous = run.lower_bound
            # MAP-EM: the objective is the log-likelihood plus the log-prior, at the E-step's parameters.
            objective = s.loglik + family.log_prior(run.params)
            run.stats, run.center = s, family.center(run.params)
            run.params = family.m_step(s, run.center)
            run.lower_bound = objective / s.n
            run.lower_bounds.append(run.lower_bound)
            run.n_iter = iteration
            run.converged = abs(run.lower_bound - previous) < tol
            changes.append(run.lower_bound - previous)
        seconds = time.perf_counter() - tic
        for run, change in zip(active, changes):
            if iteration % log_every and not run.converged and iteration < max_iter:
                continue
            logger.info(
                "iteration %d%s: mean log-likelihood %.10g, change %.3g, %.2f s, %.3g rows/s",
                iteration,
                f" (run {runs.index(run)})" if len(runs) > 1 else "",
                run.lower_bound,
                change,
                seconds,
                n / seconds,
            )
        if callback is not None:
            callback(iteration, runs)
    return runs
