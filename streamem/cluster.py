"""Which Dask scheduler runs our passes, and starting a local cluster."""

from __future__ import annotations

from typing import Any

import dask


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


def persist_spread(client: Any, blocks: list[Any]) -> tuple[list[Any], list[str | None], dict[str, int]]:
    """Read ``blocks`` (Delayed chunks, in order) into the workers' memory, shared by thread count.

    Each worker gets a contiguous run of chunks, as many as its share of
    the cluster's threads. Returns one future per block, the address of the
    worker asked to hold it (a preference: another worker may read a lost
    chunk again) and the workers' thread counts. With no worker connected
    yet, the scheduler places the chunks as they come (no homes).
    """
    nthreads = client.nthreads()
    if not nthreads:
        return client.compute(blocks), [None] * len(blocks), {}
    total = sum(nthreads.values())
    futures: list[Any] = []
    homes: list[str | None] = []
    start = taken = 0
    for worker in sorted(nthreads):
        taken += nthreads[worker]
        end = round(taken * len(blocks) / total)
        if end > start:
            futures += client.compute(blocks[start:end], workers=[worker], allow_other_workers=True)
            homes += [worker] * (end - start)
        start = end
    return futures, homes, dict(nthreads)


def should_persist(mode: str, nbytes: int, in_memory: bool, scheduler: Any) -> bool:
    """Whether to keep the data in the workers' memory across passes.

    ``"auto"``: on a distributed cluster when the data take at most half of
    the workers' total memory limit; on the local scheduler when the data
    are not in memory already and take at most a quarter of the available
    memory.
    """
    if mode not in PERSIST_MODES:
        raise ValueError(f"persist must be one of {PERSIST_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    import psutil

    if is_client(scheduler):
        workers = scheduler.scheduler_info(n_workers=-1)["workers"].values()
        limit = sum(w.get("memory_limit") or psutil.virtual_memory().total for w in workers)
        return nbytes <= limit / 2
    return not in_memory and nbytes <= psutil.virtual_memory().available / 4


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
