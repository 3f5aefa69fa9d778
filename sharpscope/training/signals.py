"""Turning SIGINT and SIGTERM into a request to stop after the current step."""

from __future__ import annotations

import signal
from types import FrameType

from sharpscope.signal_handlers import SignalHandlers


class StopRequest(SignalHandlers):
    """Within the block, the first SIGINT or SIGTERM is only noted (``signum``; calling the
    object says whether one came) so that a loop can save and stop cleanly; the previous
    handlers are put back at once, so a second signal interrupts or terminates as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.restore()

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``SIGTERM``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""
