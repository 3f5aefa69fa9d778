"""Catching SIGINT and SIGTERM within a block: the install-and-restore part that the run loop's
stop request, the atomic file sets and the commands' interrupts share."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class SignalHandlers:
    """Within the block, the :attr:`signals` go to :meth:`handle`; :meth:`restore` (at the end of
    the block at the latest) puts the previous handlers back. Only the main thread can catch
    signals: elsewhere nothing is installed."""

    signals: tuple[signal.Signals, ...] = STOP_SIGNALS

    def __init__(self) -> None:
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> Any:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.handle) for sig in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """What a caught signal does."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put the previous handlers back (the default for one installed outside Python)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}
