"""The progress bar of a fine-tuning run: steps, the time remaining, the latest loss and tracked
figures, in one line that fits an 80-column terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column


class TrainingProgress:
    """A progress bar on ``console`` fed by a run's :class:`~sharpscope.training.run.Watch`
    callbacks; the figures are cut short (…) rather than wrapped on a narrow console."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self._console = console
        self._progress = Progress(
            BarColumn(bar_width=10),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("eta", table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            TextColumn(
                "{task.fields[figures]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=console,
            disable=not enabled,
            expand=True,
        )
        self._task: TaskID | None = None
        self._loss = self._tracked = ""

    def __enter__(self) -> TrainingProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def started(self, step: int, total: int) -> None:
        """The run starts at ``step`` of ``total`` (a resumed run says so)."""
        if step:
            self._console.print(
                f"resuming from step {step} of {total}", markup=False, highlight=False
            )
        self._task = self._progress.add_task("finetune", total=total, completed=step, figures="")

    def step(self, step: int, loss: float) -> None:
        """``step`` is done with minibatch loss ``loss``."""
        self._loss = f"loss {loss:.4g}"
        self._show(step)

    def record(self, row: dict[str, Any]) -> None:
        """A metric row was recorded: show its λ_max, λ_c, alignment and validation accuracy."""
        shown = [("λ", row["lambda_max"], "{:.4g}"), ("λ_c", row.get("lambda_c"), "{:.4g}")]
        shown.append(("cos", row["alignment"], "{:.2f}"))
        shown.append(("val", row["val_accuracy"], "{:.1%}"))
        self._tracked = "".join(f" {k} {f.format(v)}" for k, v, f in shown if v is not None)
        self._show(row["step"])

    def _show(self, step: int) -> None:
        assert self._task is not None
        figures = f"{self._loss}{self._tracked}".strip()
        self._progress.update(self._task, completed=step, figures=figures)
