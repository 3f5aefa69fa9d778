"""What every command shares: error handling, torch's threads, progress bars.

Torch-free at import, so that help, option errors and gating a saved report never load torch:
:mod:`sharpscope.distributed` is consulted only once it is loaded (a process group, or a
:class:`~sharpscope.distributed.RankError`, exists only then)."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType, ModuleType

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from sharpscope.cli.flags import as_flags
from sharpscope.errors import InputError
from sharpscope.launch import launched_by_torchrun
from sharpscope.signal_handlers import SignalHandlers

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def info(message: str) -> None:
    """A plain line on stderr (no markup, no highlighting: paths are shown verbatim)."""
    stderr.print(message, markup=False, highlight=False)


def print_json(text: str) -> None:
    """Machine-readable text on stdout, untouched by rich (no colour even when forced)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def fail(message: str, everywhere: bool = True) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; return the exit to raise (code 2).

    Under torch.distributed the line names the rank; with ``everywhere=False`` (an error every
    rank raised together) only rank 0 prints it, and every rank waits until it has.
    """
    line = " ".join(str(message).split())
    group = _group()
    if group is not None:
        line = f"rank {group.rank()}: {line}"
    if everywhere or group is None or group.is_main():
        stderr.print(f"[bold red]error:[/bold red] {escape(line)}", markup=True, highlight=False)
    if not everywhere and group is not None:
        group.barrier()  # the others wait for rank 0's line: torchrun stops all at one exit
    return typer.Exit(2)


def _group() -> ModuleType | None:
    """:mod:`sharpscope.distributed` when this process is in a process group, else None."""
    distributed = sys.modules.get("sharpscope.distributed")
    return distributed if distributed is not None and distributed.is_distributed() else None


@contextlib.contextmanager
def errors_as_exit(debug: bool) -> Iterator[None]:
    """Turn failures into one line on stderr and exit code 2; ``debug`` re-raises them instead."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None
    except InputError as exc:
        if debug:
            raise
        group = _group()
        together = group is not None and isinstance(exc, group.RankError)
        raise fail(as_flags(str(exc)), not together) from None
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise fail(
            f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)"
        ) from None


@contextlib.contextmanager
def command_scope(debug: bool, dist_timeout: float) -> Iterator[None]:
    """:func:`errors_as_exit` for a command that joins torchrun's process group when launched so
    (destroyed at the end); errors are printed while the rank is still known. Outside torchrun
    it is :func:`errors_as_exit` alone (and imports no torch)."""
    if not launched_by_torchrun():
        with errors_as_exit(debug):
            yield
        return
    from sharpscope import distributed  # torch: only where torchrun started the process

    with errors_as_exit(debug), distributed.launched(dist_timeout), errors_as_exit(debug):
        try:
            yield
        except RuntimeError as exc:
            if not (distributed.is_distributed() and "timed out" in str(exc).lower()):
                raise
            raise InputError(
                f"waited more than {dist_timeout:g} s for the other ranks ({str(exc).strip()}): "
                "another rank stalled or failed (see its error), or one step takes longer than "
                "--dist-timeout; raise it"
            ) from exc


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads to ``threads`` (``--threads``); None leaves torch's default."""
    if threads is None:
        return
    import torch  # only where a command computes: it loads torch next anyway

    torch.set_num_threads(threads)


class Interrupts(SignalHandlers):
    """Within the block, SIGTERM interrupts as Ctrl-C does (a :class:`KeyboardInterrupt`, so a
    command can save what it finished); :attr:`exit_code` is then 143, else 130 (128 + the
    signal, as ``finetune`` exits). The previous handler is back after the first signal."""

    signals = (signal.SIGTERM,)

    def __init__(self) -> None:
        super().__init__()
        self.signum = signal.SIGINT

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signal.Signals(signum)
        self.restore()
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """128 + the signal that interrupted: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(self.signum)


class ProgressBars:
    """Progress on stderr, one task per estimator stage, fed by the estimators' callbacks.

    On a terminal, rich bars: the task, a fixed-width bar, products done/budget, time elapsed
    and time left; a line fits in 80 columns for task names up to 15 characters and budgets up to
    7 digits. Elsewhere (a log file, CI), one plain line per task as it ends: what it did and
    its time, so a redirected stderr shows each stage when it finishes rather than at the end.
    """

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        """Bars on ``console`` (stderr by default); ``enabled=False`` shows nothing."""
        self.enabled = enabled and sys.stderr is not None
        self._console = console or stderr
        self._bars = self.enabled and self._console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}", table_column=Column(width=15, no_wrap=True)),
            BarColumn(bar_width=25),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
            disable=not self._bars,
        )
        self._tasks: dict[str, int] = {}
        self._open: tuple[str, float] | None = None
        """The task whose line is still to be printed (no bars), and when it started."""

    def __enter__(self) -> ProgressBars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int) -> None:
        """The estimators' ``progress(task, done, total)``; a new task closes the earlier ones."""
        if task not in self._tasks:
            self.finish()
            self._tasks[task] = self._progress.add_task(task, total=total)
            self._open = (task, time.perf_counter())
        self._progress.update(self._tasks[task], completed=done, total=total)

    def finish(self) -> None:
        """Mark every bar complete (estimators that converge early stop short of their budget);
        without bars, print the line of the task that was still open."""
        if self._open is not None and self.enabled and not self._bars:
            name, start = self._open
            bar = self._progress.tasks[self._tasks[name]]
            seconds = time.perf_counter() - start
            line = f"{name}: {int(bar.completed):,}/{int(bar.total or 0):,} in {seconds:.1f} s"
            self._console.print(line, markup=False, highlight=False)
        for task_id in self._tasks.values():
            task = self._progress.tasks[task_id]
            self._progress.update(task_id, total=task.completed, completed=task.completed)
        self._open = None
