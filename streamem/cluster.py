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
