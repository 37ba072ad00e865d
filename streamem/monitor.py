"""Peak resident memory of this process and all its children (workers included)."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


def tree_rss() -> int:
    """Resident bytes of this process plus all its descendants."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass  # it exited while we looked
    return total


class PeakMemory:
    """Sample :func:`tree_rss` in a background thread; ``peak`` holds the maximum.

    Examples
    --------
    >>> with PeakMemory() as mem:
    ...     work()
    >>> mem.peak  # bytes
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak = tree_rss()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())
