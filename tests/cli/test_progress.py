"""The CLI's progress bars: one line per task, time left shown, within an 80-column terminal."""

from __future__ import annotations

import io
import re

import pytest
from rich.cells import cell_len
from rich.console import Console

from sharpscope.cli.common import ProgressBars

CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CLOCK = r"(?:\d+:\d\d:\d\d|-:--:--)"
TASKS = [("trace", 100), ("gradient", 3), ("density", 320), ("top-k and λ_min", 1_000_000)]
"""(task, budget): each is driven to half its budget; the last, longest one is the widest line."""


def rendered_lines(finish: bool) -> list[str]:
    """Every line the bars drew on an 80-column terminal, control sequences removed; ``finish``
    closes the last bar too (a new task closes the ones before it)."""
    file = io.StringIO()
    console = Console(width=80, file=file, force_terminal=True, color_system="standard")
    with ProgressBars(True, console=console) as bars:
        for task, total in TASKS:
            for done in (0, total // 3, total // 2):
                bars(task, done, total)
        if finish:
            bars.finish()
    return [line for line in re.split(r"[\r\n]", CONTROL.sub("", file.getvalue())) if line]


@pytest.mark.parametrize("finish", [False, True])
def test_bars_fit_in_80_columns_one_line_per_task(finish):
    lines = rendered_lines(finish)
    assert max(cell_len(line) for line in lines) <= 80
    final = lines[-len(TASKS) :]
    for (task, total), line in zip(TASKS, final, strict=True):
        assert line.startswith(f"{task} "), line
        # a closed bar's budget becomes what it did; the open one still shows its budget
        budget = total if task == TASKS[-1][0] and not finish else total // 2
        assert f" {total // 2}/{budget} " in line, line


def test_bars_show_time_elapsed_and_time_left():
    lines = rendered_lines(finish=True)
    clocks = re.compile(rf"{CLOCK} eta {CLOCK}$")
    bars = [line for line in lines if line.startswith(tuple(task for task, _ in TASKS))]
    assert bars and all(clocks.search(line.rstrip()) for line in bars), bars
    # a task just started has no speed yet: its time left is unknown, not zero
    assert any(line.rstrip().endswith("eta -:--:--") for line in bars)


def test_disabled_bars_draw_nothing():
    file = io.StringIO()
    console = Console(width=80, file=file, force_terminal=True)
    with ProgressBars(False, console=console) as bars:
        bars("trace", 5, 10)
        bars.finish()
    assert file.getvalue() == ""
