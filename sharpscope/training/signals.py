"""Turning SIGINT and SIGTERM into a request to stop after the current step."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Within the block, the first SIGINT or SIGTERM is only noted (``signum``; calling the
    object says whether one came) so that a loop can save and stop cleanly; the previous
    handlers are put back at once, so a second signal interrupts or terminates as usual."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``SIGTERM``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""
