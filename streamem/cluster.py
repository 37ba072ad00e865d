"""Which Dask scheduler runs our passes, and starting a local cluster."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Iterator

import dask

logger = logging.getLogger("streamem")


def resolve_scheduler(client: Any = None) -> Any:
    """The scheduler for ``dask.compute``.

    ``client`` if given; else the active ``distributed.Client``; else a
    scheduler named in ``dask.config`` ("scheduler"); else local threads.
    """
    if client is not None:
        return client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        pass
    return dask.config.get("scheduler", None) or "threads"


PERSIST_MODES = ("auto", "always", "never")


def is_client(scheduler: Any) -> bool:
    return hasattr(scheduler, "persist") and hasattr(scheduler, "scheduler_info")


#: Seconds between looks at the cluster while chunks are read into memory.
PERSIST_POLL_SECONDS = 0.5


def persist_spread(client: Any, blocks: list[Any]) -> tuple[list[Any], list[str | None], dict[str, int]]:
    """Read ``blocks`` (Delayed chunks, in order) into the workers' memory, shared by thread count.

    Each worker is asked to read a contiguous run of chunks, as many as its
    share of the cluster's threads. Returns once every chunk is in memory:
    one future per block, the address of the worker holding it and the
    workers' thread counts. A chunk lost later (its worker died) is read
    again by the scheduler, on any worker. With no worker connected yet, the
    scheduler places the chunks as they come (no homes, no wait).

    Only the chunks are pinned, never what they share (the store's open
    task), and only while they are read: distributed never moves a pinned
    task that could not run to a worker that joins later, and a restarted
    worker has a new address (dask/distributed#7346). A chunk whose worker
    left while reading it is submitted again without a pin.
    """
    nthreads = client.nthreads()
    if not nthreads:
        return client.compute(blocks), [None] * len(blocks), {}
    asked = _thread_shares(nthreads, len(blocks))
    # On one worker a pin places nothing and could only strand a task.
    pins = asked if len(nthreads) > 1 else [None] * len(blocks)
    futures = _compute_pinned(client, blocks, pins)
    _wait_and_unpin(client, blocks, futures, pins)
    held = client.who_has(futures)
    homes = [next(iter(held.get(f.key) or ()), None) for f in futures]
    return futures, homes, dict(nthreads)


def _thread_shares(nthreads: dict[str, int], n_blocks: int) -> list[str]:
    """The worker asked to read each block: contiguous runs, in proportion to the workers' threads."""
    total = sum(nthreads.values())
    homes: list[str] = []
    taken = 0
    for worker in sorted(nthreads):
        taken += nthreads[worker]
        homes += [worker] * (round(taken * n_blocks / total) - len(homes))
    return homes


def _compute_pinned(client: Any, blocks: list[Any], pins: list[str | None]) -> list[Any]:
    """``client.compute(blocks)``, each chunk asked (loosely) to run on its pin and nothing else pinned."""
    # A callable annotation is asked per task (on the scheduler): the chunk
    # keys get their worker, every other task an empty list (no restriction).
    where = collections.defaultdict(list, {block.key: [pin] for block, pin in zip(blocks, pins) if pin})
    with dask.annotate(workers=where.__getitem__, allow_other_workers=True):
        return client.compute(blocks)


def _wait_and_unpin(client: Any, blocks: list[Any], futures: list[Any], pins: list[str | None]) -> None:
    """Wait until every chunk is in memory, lifting each pin as its chunk arrives.

    Raises the error of a chunk that failed (KilledWorker when workers keep
    dying while they read it), and ``ClusterError`` when workers leave more
    than ``allowed-failures`` times each: a nanny restarts a worker that
    goes over its memory limit, for ever, without a KilledWorker. ``futures``
    is updated in place where a chunk is submitted again.
    """
    from distributed import wait

    pinned = {i for i, pin in enumerate(pins) if pin}
    present = set(client.nthreads())
    allowed = int(dask.config.get("distributed.scheduler.allowed-failures", 3)) * max(1, len(present))
    departures = 0
    while True:
        try:
            with client.as_current():  # ``wait`` asks for the current client
                wait(futures, timeout=PERSIST_POLL_SECONDS)
        except TimeoutError:
            pass
        status = [future.status for future in futures]
        for i, state in enumerate(status):
            if state in ("error", "cancelled"):
                futures[i].result()  # raises the chunk's error
        arrived = {i for i in pinned if status[i] == "finished"}
        if arrived:
            _unpin(client, [futures[i].key for i in arrived])
            pinned -= arrived
        if all(state == "finished" for state in status):
            return
        alive = set(client.nthreads())
        departures += len(present - alive)
        present = alive
        if departures > allowed:
            raise ClusterError(
                f"workers left the cluster {departures} times while reading the data into memory: "
                "if their memory limit is too small for it, give them more or use persist='never'"
            )
        for i in sorted(i for i in pinned if pins[i] not in alive):
            # Cancel first (a synchronous round trip), so that the new
            # submission of the same key is a new task, free to run anywhere.
            client.cancel([futures[i]])
            futures[i] = client.compute(blocks[i])
            pinned.discard(i)


def _unpin(client: Any, keys: list[Any]) -> None:
    """Lift the worker restrictions of ``keys`` on the scheduler (its ``set_restrictions`` handler)."""
    try:
        client.sync(client.scheduler.set_restrictions, worker={key: None for key in keys})
    except Exception:  # noqa: BLE001 - a key forgotten meanwhile: do the others one by one
        for key in keys:
            try:
                client.sync(client.scheduler.set_restrictions, worker={key: None})
            except Exception as exc:  # noqa: BLE001
                logger.debug("could not unpin chunk %s: %s", key, exc)


def should_persist(mode: str, nbytes: int, in_memory: bool, scheduler: Any) -> bool:
    """Whether to keep the data in the workers' memory across passes.

    ``"auto"``: on a distributed cluster when each worker's share of the
    data (by threads, as :func:`persist_spread` shares them) fits in half
    its memory limit on top of what its process holds already (the
    ``metrics.memory`` the scheduler reports: Python, libraries, other
    data), which keeps it well below Dask's spill and pause thresholds; on
    the local scheduler when the data are not in memory already and take at
    most a quarter of the available memory.
    """
    if mode not in PERSIST_MODES:
        raise ValueError(f"persist must be one of {PERSIST_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    import psutil

    if is_client(scheduler):
        workers = list(scheduler.scheduler_info(n_workers=-1)["workers"].values())
        total_threads = sum(w.get("nthreads", 1) for w in workers)
        for w in workers:
            limit = w.get("memory_limit") or psutil.virtual_memory().total
            used = (w.get("metrics") or {}).get("memory", 0)
            if nbytes * w.get("nthreads", 1) / total_threads > limit / 2 - used:
                return False
        return bool(workers)
    return not in_memory and nbytes <= psutil.virtual_memory().available / 4


# ----------------------------------------------------------- failing clusters
#: Seconds to wait for workers by default: a LocalCluster or an existing
#: cluster has them within seconds; batch jobs may sit in a queue.
WORKER_TIMEOUT = 60.0
JOB_WORKER_TIMEOUT = 600.0
#: Seconds between looks at a cluster that is starting.
POLL_SECONDS = 0.25


class ClusterError(RuntimeError):
    """The cluster cannot do the work: no worker came, a job was not submitted, workers keep dying."""


def reporting_job_class(base: type) -> type:
    """A dask-jobqueue ``Job`` class that records why a job could not be submitted.

    The submission error (the command missing, or its exit status and
    stderr) lands in the class's ``failures`` list instead of a traceback in
    the cluster's event loop, retried for ever, while the run waits for
    workers that will not come.
    """
    from distributed.core import Status

    class Reporting(base):  # type: ignore[misc, valid-type]
        failures: list[BaseException] = []

        async def start(self) -> None:
            try:
                await super().start()
            except Exception as exc:  # noqa: BLE001 - reported by wait_for_workers
                type(self).failures.append(exc)
                # The cluster takes a job that returns for a started one (and
                # submits no other); with no job id there is nothing to cancel.
                self.status = Status.running

        async def close(self) -> None:
            await super().close()
            if self.job_id is None:  # never submitted: closed as far as the cluster is concerned
                self.status = Status.closed

    Reporting.__name__ = Reporting.__qualname__ = base.__name__
    return Reporting


def submit_error_message(exc: BaseException) -> str:
    """One line for a failed job submission, with the command's own error where it gave one."""
    if isinstance(exc, FileNotFoundError):
        return f"cannot submit a job: command {exc.filename!r} not found on this machine"
    lines = [line.strip() for line in str(exc).splitlines()]
    if lines and lines[0].startswith("Command exited with non-zero exit code"):
        # dask-jobqueue: "...\nExit code: N\nCommand:\nCMD\nstdout:\n...\nstderr:\nERR"
        fields = dict.fromkeys(("Exit code", "Command", "stderr"), "")
        for i, line in enumerate(lines):
            head = line.split(":", 1)[0]
            if head in fields:
                rest = line.split(":", 1)[1].strip() if ":" in line else ""
                after = [text for text in lines[i + 1 :] if text]
                fields[head] = rest or (after[0] if after else "")
        command = fields["Command"].split()[0] if fields["Command"] else "the submit command"
        return f"job submission failed: {command} exited with status {fields['Exit code']}: {fields['stderr'] or '(no message)'}"
    return f"job submission failed: {lines[0] if lines else type(exc).__name__}"


class MemoryRestarts:
    """Ends a run whose workers keep being restarted for going over their memory limit.

    A nanny restarts such a worker (SIGTERM, which the scheduler takes for
    an orderly exit: no ``KilledWorker``), so a limit too small for the work
    restarts workers for ever. After ``allowed`` restarts this closes the
    client, which ends whatever waits on it, and ``reason`` says why.
    """

    def __init__(self, client: Any, allowed: int):
        self.client = client
        self.allowed = allowed
        self.restarts = 0
        self.reason: str | None = None
        self.limits: set[int] = set()  # the workers' limits, as seen while they were there
        self.see_limits()
        client.subscribe_topic("worker-restart-memory", self._on_restart)

    def see_limits(self) -> None:
        with contextlib.suppress(Exception):
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
            self.limits |= {w["memory_limit"] for w in workers if w.get("memory_limit")}

    def _on_restart(self, event: tuple[float, dict[str, Any]]) -> None:
        self.restarts += 1
        self.see_limits()
        if self.restarts <= self.allowed or self.reason:
            return
        from dask.utils import format_bytes

        rss = event[1].get("rss") if isinstance(event[1], dict) else None
        limit = f" of {format_bytes(min(self.limits))} each" if self.limits else ""
        at = f"; the last one held {format_bytes(rss)}" if rss else ""
        self.reason = (
            f"workers were restarted {self.restarts} times for going over their memory limit{limit}{at}: "
            "give them more memory (--memory-limit), or keep less in it (--persist never, fewer threads per worker)"
        )
        # This runs in the client's event loop: close from another thread.
        threading.Thread(target=self.client.close, daemon=True).start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic("worker-restart-memory")


def wait_for_workers(client: Any, n: int, timeout: float, failures: list[BaseException] | None = None,
                     watch: MemoryRestarts | None = None) -> None:
    """Wait until ``n`` workers have joined; ``ClusterError`` after ``timeout`` seconds or at the first failed job submission."""
    deadline = time.monotonic() + timeout
    while True:
        if failures:
            raise ClusterError(submit_error_message(failures[0]))
        if watch is not None:
            if watch.reason:
                raise ClusterError(watch.reason)
            watch.see_limits()
        left = deadline - time.monotonic()
        try:
            client.wait_for_workers(n, timeout=max(0.01, min(POLL_SECONDS, left)))
            return
        except TimeoutError:
            if left <= 0:
                have = len(client.scheduler_info(n_workers=-1)["workers"])
                raise ClusterError(f"{have} of {n} workers joined within {timeout:g} s") from None


def failure_message(exc: BaseException) -> str | None:
    """One line for the ways a distributed run ends because of its cluster; None for other errors."""
    from distributed.scheduler import KilledWorker, NoValidWorkerError, NoWorkerError

    if isinstance(exc, KilledWorker):
        return (
            f"workers died {exc.allowed_failures + 1} times while running task {exc.task!r} "
            f"(the last one {exc.last_worker.address}); the worker logs say why"
        )
    if isinstance(exc, (NoWorkerError, NoValidWorkerError)):
        return f"no worker could run task {exc.task!r} for {exc.timeout:g} s: the workers left and none came back"
    return None


@contextlib.contextmanager
def guarded_run(client: Any, n_workers: int, timeout: float, failures: list[BaseException] | None = None) -> Iterator[None]:
    """Wait for ``n_workers`` workers, then run the body; cluster failures become one ``ClusterError``.

    The body ends (instead of waiting for ever) when workers keep being
    restarted for memory (:class:`MemoryRestarts`, after ``allowed-failures``
    restarts per worker: Dask's tolerance for a task whose workers die), and
    ``KilledWorker`` and no-worker timeouts are described in one line.
    """
    per_worker = int(dask.config.get("distributed.scheduler.allowed-failures", 3))
    watch = MemoryRestarts(client, per_worker * max(1, n_workers))
    try:
        wait_for_workers(client, n_workers, timeout, failures, watch)
        watch.allowed = per_worker * max(n_workers, len(client.nthreads()))
        yield
    except ClusterError:
        raise
    except BaseException as exc:  # the client closed under a run ends it in CancelledError
        message = watch.reason or failure_message(exc)
        if message is None:
            raise
        raise ClusterError(message) from None
    finally:
        watch.stop()


def quiet_dask_logs(this_process: bool = True) -> None:
    """Silence Dask's own log lines in worker processes started from now on and, with ``this_process``, in this one.

    A worker logs a failed task with its traceback ("Compute Failed") while
    the client receives the same error, which the command line reports in
    one line: the workers' copy is noise.
    """
    import os

    import warnings

    os.environ["DASK_LOGGING__DISTRIBUTED"] = "critical"
    if not this_process:
        return
    for name in ("distributed", "dask_jobqueue"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # The dashboard moves to a free port by itself: not worth a warning on a quiet run.
    warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)


def local_cluster(
    n_workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = "auto",
    host: str = "127.0.0.1",
    **kwargs: Any,
) -> Any:
    """Start a ``distributed.LocalCluster`` bound to ``host`` (loopback by default)."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        host=host,
        dashboard_address=f"{host}:0",
        **kwargs,
    )
