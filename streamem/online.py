"""Online EM over chunks: stepwise (Cappé & Moulines 2009) and incremental (Neal & Hinton 1998).

One *online pass* reads every chunk once, in a shuffled order. Inside the
task that holds a chunk, its mini-batches are processed one after another:
an E-step of the mini-batch under the current parameters, an update of the
running statistics, an M-step. The small state (running statistics, their
centre, the parameters and the step counter) travels from one chunk's task
to the next, so the tasks form a chain; the chunk reads are separate tasks
that run ahead of it (at most :data:`READ_AHEAD` chunks ahead).

Stepwise EM keeps averaged statistics ``s``, per row::

    s <- (1 - eta_t) s + eta_t * s_batch / n_batch,   eta_t = (t + step_offset) ** -step_decay

(or a constant ``eta``), and with ``average`` (Polyak-Ruppert) a pass of a
fit ends at the M-step of ``s`` averaged over the mini-batches of the
pass's second half; a mini-batch of ``n`` rows counts as ``n /
batch_size`` steps, with weight ``1 - (1 - eta_t) ** (n / batch_size)``, so
the weight of a row does not depend on the chunking. Incremental EM keeps
the last statistics of every mini-batch and their sum ``S``; revisiting a
mini-batch replaces its share, ``S <- S - s_old + s_new``, which never
decreases the free energy; a mini-batch not visited yet holds a share of
base statistics (those the run continues from, or those its parameters
imply).

Gaussian statistics are centred at the component means of their E-step
(DESIGN.md section 2); the means change after every mini-batch, so statistics
are moved exactly to a common centre (the family's ``recentre``) before
they are combined.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from streamem.backend import check_finite, to_numpy
from streamem.em import EMRun
from streamem.stats import SuffStats

logger = logging.getLogger("streamem")

ALGORITHMS = ("batch", "stepwise", "incremental")
#: What an online pass reports as its mean log-likelihood (see :func:`online_em`).
MONITORS = ("online", "exact")


@dataclass(frozen=True)
class OnlineSettings:
    """How an online pass updates the model.

    Parameters
    ----------
    algorithm : {"stepwise", "incremental"}
    batch_size : int
        Rows per mini-batch at most; each chunk is cut into
        ``ceil(rows / batch_size)`` mini-batches of (nearly) equal size.
    step_decay, step_offset : float
        Stepwise step sizes ``eta_t = (t + step_offset) ** -step_decay``.
    step_size : float or None
        A constant step instead (for drifting data).
    shuffle : bool
        Visit chunks in an order shuffled per pass and, for stepwise, the
        rows of a chunk in a shuffled order; otherwise storage order.
    rows : float
        How many rows stepwise EM's running averages stand for: with a
        prior, the M-step weighs the averages by it against the prior's
        pseudo-counts, as batch EM weighs its sums.
    average : bool
        Stepwise: end each pass at the M-step of the running statistics
        averaged over the mini-batches of the pass's second half
        (Polyak-Ruppert averaging), and continue from there.
    """

    algorithm: str = "stepwise"
    batch_size: int = 1000
    step_decay: float = 0.51
    step_offset: float = 2.0
    step_size: float | None = None
    shuffle: bool = True
    rows: float = 1.0
    average: bool = True

    def weight(self, t: float, n_rows: float) -> float:
        """Stepwise weight of a mini-batch of ``n_rows`` rows at step ``t``.

        A mini-batch counts as ``n_rows / batch_size`` steps (chunks smaller
        than ``batch_size`` give smaller mini-batches, with smaller steps):
        ``1 - (1 - eta_t) ** (n_rows / batch_size)``, exactly ``eta_t`` for a
        full mini-batch.
        """
        eta = self.step_size if self.step_size is not None else (t + self.step_offset) ** -self.step_decay
        return float(1.0 - (1.0 - eta) ** (n_rows / self.batch_size))


@dataclass(eq=False)
class OnlineRun:
    """The state one run carries from mini-batch to mini-batch, and across passes.

    ``stats`` are centred at ``center`` (the means of their last E-step):
    stepwise, averaged per row; incremental, the sum of every mini-batch's
    last statistics. ``n_steps`` counts rows processed, in units of
    ``batch_size``. ``base`` (incremental only, per row, centred at
    ``base_center``) stands in for the statistics of mini-batches not
    visited yet: the statistics the run was continued from, or those its
    parameters imply; ``total_rows`` is the size of the data.
    ``blocks`` (incremental only) maps a chunk to the last
    statistics of each of its mini-batches and their centres; it stays on
    the client between passes and each chunk's task receives only its own
    entries, so the state that travels along the chain stays small.
    """

    params: Any
    stats: SuffStats | None = None
    center: np.ndarray | None = None
    n_steps: float = 0.0
    pass_loglik: float = 0.0
    pass_rows: float = 0.0
    base: SuffStats | None = None
    base_center: np.ndarray | None = None
    total_rows: int = 0
    blocks: dict[int, "BlockStats"] = field(default_factory=dict)
    average: SuffStats | None = None
    average_center: np.ndarray | None = None
    average_rows: float = 0.0

    def travelling(self) -> "OnlineRun":
        """A copy without the per-block statistics and with the pass sums reset."""
        return replace(self, blocks={}, pass_loglik=0.0, pass_rows=0.0, average=None, average_rows=0.0)


def batches_of_chunk(n_rows: int, settings: OnlineSettings, chunk: int, pass_seed: int) -> list[tuple[int, np.ndarray]]:
    """``(index, row positions)`` of each mini-batch of one chunk, in the order they are visited.

    The chunk is cut into ``ceil(n_rows / batch_size)`` mini-batches of
    nearly equal size. Stepwise with ``shuffle``: the rows are first
    permuted by a generator seeded from ``(pass_seed, chunk)``. Incremental:
    contiguous mini-batches (a mini-batch must hold the same rows in every
    pass), visited in an order shuffled the same way. Without ``shuffle``:
    storage order.
    """
    if n_rows == 0:
        return []
    n_batches = math.ceil(n_rows / settings.batch_size)
    rng = np.random.default_rng([pass_seed, chunk])
    if settings.shuffle and settings.algorithm == "stepwise":
        return list(enumerate(np.array_split(rng.permutation(n_rows), n_batches)))
    batches = list(enumerate(np.array_split(np.arange(n_rows), n_batches)))
    if settings.shuffle:
        batches = [batches[i] for i in rng.permutation(n_batches)]
    return batches


#: The last statistics of a chunk's mini-batches (by index) and the centre of each.
BlockStats = dict[int, tuple[SuffStats, np.ndarray]]


def online_link(
    runs: list[OnlineRun], block: Any, offset: int, payload: tuple
) -> tuple[list[OnlineRun], list[BlockStats]]:
    """Every mini-batch of one chunk, for every run: the chain's per-chunk task.

    ``payload`` is ``(family, settings, chunk, pass_seed, old_blocks)`` with
    ``old_blocks`` the incremental statistics of this chunk's mini-batches,
    one dict per run. Returns the runs after the chunk and the chunk's new
    mini-batch statistics (incremental; empty dicts for stepwise).
    """
    family, settings, chunk, pass_seed, old_blocks = payload
    X = to_numpy(block)
    check_finite(X, offset)
    family.check_data(X, offset)
    runs = [replace(run) for run in runs]  # the previous link's result may be shared
    new_blocks: list[BlockStats] = [{} for _ in runs]
    for index, rows in batches_of_chunk(len(X), settings, chunk, pass_seed):
        contiguous = settings.algorithm == "incremental" or not settings.shuffle
        Xb = X[rows[0] : rows[-1] + 1] if contiguous else X[rows]
        for run, old, new in zip(runs, old_blocks, new_blocks):
            new[index] = _update(run, family, settings, Xb, old.get(index))
    if settings.algorithm == "stepwise":
        new_blocks = [{} for _ in runs]
    return runs, new_blocks


def _update(
    run: OnlineRun, family: Any, settings: OnlineSettings, Xb: np.ndarray, old: tuple[SuffStats, np.ndarray] | None
) -> tuple[SuffStats, np.ndarray]:
    """One mini-batch: E-step, update of the running statistics, M-step.

    Returns the mini-batch's statistics and their centre (kept by incremental EM).
    """
    params = run.params
    centre = family.center(params)
    batch = family.chunk_stats(Xb, params)  # centred at centre
    run.pass_loglik += batch.loglik
    run.pass_rows += batch.n
    if settings.algorithm == "stepwise":
        if run.stats is None:
            run.stats, run.center = family.stats_of_params(params), centre
        eta = settings.weight(run.n_steps, batch.n)
        run.stats = family.recentre(run.stats, run.center, centre) * (1.0 - eta) + batch * (eta / batch.n)
        run.stats.arrays["n"] = np.float64(1.0)  # averages per row, exactly (it rounds otherwise)
        if settings.average and run.pass_rows > run.total_rows / 2:
            _add_to_average(run, family, centre, batch.n)
    else:
        if run.base is None:
            run.base, run.base_center = family.stats_of_params(params), centre
        if run.stats is None:  # every mini-batch starts with its share of the base statistics
            run.stats, run.center = run.base * float(run.total_rows), run.base_center
        if old is None:
            old = (run.base * batch.n, run.base_center)
        total = family.recentre(run.stats, run.center, centre) + batch - family.recentre(old[0], old[1], centre)
        run.stats = total
    run.center = centre
    # Stepwise statistics are averages per row: a prior's pseudo-counts weigh against all the rows they stand for.
    scaled = settings.algorithm == "stepwise" and getattr(family, "prior", None) is not None
    run.params = family.m_step(run.stats * settings.rows if scaled else run.stats, centre)
    run.n_steps += batch.n / settings.batch_size
    return batch, centre


def _add_to_average(run: OnlineRun, family: Any, centre: np.ndarray, weight: float) -> None:
    """Fold the running statistics (centred at ``centre``) into their average over the pass, weighing by rows."""
    if run.average is None:
        run.average, run.average_rows = run.stats, 0.0
    else:
        old = run.average_rows / (run.average_rows + weight)
        run.average = family.recentre(run.average, run.average_center, centre) * old + run.stats * (1.0 - old)
        run.average.arrays["n"] = np.float64(1.0)
    run.average_center = centre
    run.average_rows += weight


def _end_pass(run: OnlineRun, family: Any, settings: OnlineSettings) -> OnlineRun:
    """The state a pass ends in: with averaging, the M-step of the averaged statistics."""
    if run.average is None:
        return run
    scaled = getattr(family, "prior", None) is not None
    params = family.m_step(run.average * settings.rows if scaled else run.average, run.average_center)
    return replace(run, stats=run.average, center=run.average_center, params=params, average=None, average_rows=0.0)


# -------------------------------------------------------------------- driver
def online_em(
    passes: Any,
    family: Any,
    runs: list[EMRun],
    settings: OnlineSettings,
    *,
    tol: float,
    max_iter: int,
    seed: int,
    monitor: str = "online",
    callback: Callable[[int, list[EMRun]], None] | None = None,
    start_iter: int = 0,
    log_every: int = 1,
) -> list[EMRun]:
    """Online EM for several runs at once, sharing one chain of chunk tasks per pass.

    ``max_iter`` counts passes (``run.n_iter``). The shuffles of a pass
    come from ``(seed, steps made so far)``, so a resumed fit repeats the
    passes of the fit it continues exactly. A run's ``stats``,
    ``center`` and ``n_steps`` are its online state: a run that has them
    continues from them (warm start, ``partial_fit``, ``update``).

    After each pass a run's mean log-likelihood (``run.lower_bounds``) is,
    with ``monitor="online"``, the average over the pass's rows of every
    mini-batch's log-likelihood under the parameters of its E-step: free,
    but not the batch objective, since the parameters change during the
    pass; with ``monitor="exact"``, the log-likelihood of all rows under
    the parameters at the end of the pass (one more data pass). A run stops
    when that changes by less than ``tol``. ``callback(pass, runs)`` is
    called after every pass. Incremental EM's per-mini-batch statistics
    live only as long as this call: a continued incremental fit rebuilds
    them in its first pass, from the statistics it was continued from
    (standing in for every mini-batch's old share).
    """
    n = passes.data.n_samples
    online = [_as_online(run, settings, n) for run in runs]
    for pass_index in range(start_iter + 1, max_iter + 1):
        active = [i for i, run in enumerate(runs) if not run.converged]
        if not active:
            break
        tic = time.perf_counter()
        rows_done = int(round(online[active[0]].n_steps * settings.batch_size))
        pass_seed = int(np.random.SeedSequence([seed, rows_done]).generate_state(1)[0])
        chained = passes.chain(online_link, [online[i] for i in active], family, settings, pass_seed)
        after = [_end_pass(state, family, settings) for state in chained]
        if monitor == "exact":
            exact = passes.run(_loglik_of_models, (family, [r.params for r in after]), _add_lists)
        seconds = time.perf_counter() - tic
        for j, (i, state) in enumerate(zip(active, after)):
            online[i] = state
            run = runs[i]
            value = exact[j] / n if monitor == "exact" else state.pass_loglik / max(state.pass_rows, 1.0)
            value += family.log_prior(state.params) / n  # MAP: the objective has the log-prior too
            change = value - run.lower_bound
            run.params, run.stats, run.center, run.n_steps = state.params, state.stats, state.center, state.n_steps
            run.lower_bound = value
            run.lower_bounds.append(value)
            run.n_iter = pass_index
            run.converged = abs(change) < tol
            if pass_index % log_every == 0 or run.converged or pass_index == max_iter:
                logger.info(
                    "pass %d%s: mean log-likelihood %.10g (%s), change %.3g, %.6g steps, %.2f s, %.3g rows/s",
                    pass_index, f" (run {i})" if len(runs) > 1 else "", value,
                    "exact" if monitor == "exact" else "online average over the pass", change,
                    state.n_steps, seconds, n / seconds,
                )  # fmt: skip
        if callback is not None:
            callback(pass_index, runs)
    return runs


def _as_online(run: EMRun, settings: OnlineSettings, total_rows: int) -> OnlineRun:
    """The online state of ``run`` (its statistics, as averages per row, where it has some).

    Incremental EM cannot reuse a running sum whose per-mini-batch parts are
    gone: its statistics become the base that stands in for them.
    """
    online = OnlineRun(run.params, n_steps=run.n_steps, total_rows=total_rows)
    if run.stats is None or run.stats.n <= 0:
        return online
    per_row = run.stats * (1.0 / run.stats.n)
    if settings.algorithm == "incremental":
        online.base, online.base_center = per_row, run.center
    else:
        online.stats, online.center = per_row, run.center
    return online


def _loglik_of_models(block: Any, offset: int, payload: tuple) -> list[float]:
    family, params_list = payload
    X = to_numpy(block)
    return [float(family.e_step(X, params)[0].sum()) if len(X) else 0.0 for params in params_list]


def _add_lists(a: list[float], b: list[float]) -> list[float]:
    return [x + y for x, y in zip(a, b)]


def steps_for_rows(n_rows: int, settings: OnlineSettings) -> float:
    """The step count at which the next mini-batch weighs ``batch_size / n_rows``.

    After a batch fit on ``n_rows`` rows, stepwise EM continues from this
    count: one more mini-batch of the same data then weighs its share, as
    in a running average.
    """
    if n_rows <= 0 or settings.step_size is not None:
        return 0.0
    t = (n_rows / settings.batch_size) ** (1.0 / settings.step_decay) - settings.step_offset
    return float(max(0.0, min(t, 1e300)))


def incremental_bytes(row_chunks: Any, batch_size: int, stats_floats: int) -> int:
    """Memory incremental EM holds for one run: one set of ``stats_floats`` statistics (and its centre) per mini-batch."""
    n_batches = sum(math.ceil(int(rows) / batch_size) for rows in row_chunks)
    return n_batches * 8 * stats_floats
