"""Seconds spent per named stage, for the timings a pipeline or a command reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds spent per named stage, in the order the stages first ran, and with a ``counter``
    (e.g. of products) what it counted during each."""

    def __init__(self, counter: Callable[[], int] | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._counter = counter
        self.running: str | None = None
        """The stage in progress, or the one an exception left (None: none)."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to ``timings[name]``."""
        start = time.perf_counter()
        counted = self._counter() if self._counter is not None else 0
        self.running = name
        try:
            yield
            self.running = None
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            if self._counter is not None:
                self.counts[name] = self.counts.get(name, 0) + self._counter() - counted
