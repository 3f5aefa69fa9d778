"""Replacing a set of output files as one (a report with its companion files): a reader, or a
process stopped by SIGINT or SIGTERM at any moment, finds the old set or the new one, never a mix.

The new files are written into a temporary folder: for a new output folder, a sibling that is
renamed to it at the end; in an existing folder, a hidden folder inside it, whose files are then
moved in one by one (the last name last) with SIGINT and SIGTERM held back until all are in.
Files of the folder that are not in the set are never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType

from sharpscope.io.atomic import atomic_folder
from sharpscope.signal_handlers import SignalHandlers


def replace_files(
    folder: Path, write: Callable[[Path], list[str]], stale: Iterable[str] = ()
) -> list[Path]:
    """Call ``write(stage)`` to write a set of files into an empty temporary folder (returning
    their names, the one readers look at first last), then put them into ``folder`` at once;
    delete the names of ``stale`` (files of the previous set) that the new set does not have.
    Returns the paths of the new set. Interrupted, it leaves ``folder`` as it was."""
    with _Signals() as signals:
        if not folder.exists():
            with atomic_folder(folder) as stage:
                names = write(stage)
                signals.hold()  # the rename in atomic_folder is the commit
            return [folder / name for name in names]
        stage = Path(tempfile.mkdtemp(prefix=".sharpscope-new.", suffix=".tmp", dir=folder))
        try:
            names = write(stage)
            signals.hold()
            for name in names:
                os.replace(stage / name, folder / name)
            for name in set(stale) - set(names):
                (folder / name).unlink(missing_ok=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return [folder / name for name in names]


class _Signals(SignalHandlers):
    """Within the block, the first SIGINT or SIGTERM raises :class:`KeyboardInterrupt` (so the
    temporary files are removed), and after :meth:`hold` signals wait; at the end the previous
    handlers are back and a held signal, or a SIGTERM that interrupted, is sent again to them."""

    def __init__(self) -> None:
        super().__init__()
        self._holding = False
        self._again: list[int] = []

    def hold(self) -> None:
        """From now on a signal waits until the end of the block."""
        self._holding = True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        interrupt = not self._holding
        self._holding = True  # a second signal waits for the clean-up
        if signum != signal.SIGINT or not interrupt:
            self._again.append(signum)
        if interrupt:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        self.restore()
        for signum in self._again[:1]:
            signal.raise_signal(signum)
