"""The gate's checks as a rich table, and the cells that the Markdown summary shares with it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sharpscope.analysis.gate import Check, plus_minus

RESULT = {"pass": "pass", "noise": "pass (within noise)", "fail": "FAIL"}
STYLE = {"pass": "green", "noise": "yellow", "fail": "bold red"}


CAPTION = (
    "A check fails only when the value, measured on the data given, is past its limit by more "
    "than its uncertainty: the residual ‖Hv − λv‖ for eigenvalues, 2 standard errors for the "
    "trace's estimate and for the alignment's mean over minibatches; with --sigmas N, plus N "
    "standard errors of the spread over other samples of this size (of the paired difference "
    "against a baseline)."
)


def metric_cell(check: Check) -> str:
    """The figure's name, ``vs baseline`` for a relative check."""
    return f"{check.label} vs baseline" if check.kind == "max-increase" else check.label


def value_cell(check: Check) -> str:
    """``value ± uncertainty``."""
    return plus_minus(check.value, check.uncertainty)


def limit_cell(check: Check) -> str:
    """The limit, with the baseline it comes from for a relative check."""
    if check.kind == "max-increase":
        base = plus_minus(check.baseline, check.baseline_uncertainty)
        return f"≤ {check.limit:.6g} = {base} + {100 * (check.increase or 0.0):g}%"
    return f"{'≥' if check.kind == 'min' else '≤'} {check.limit:g}"


def verdict_line(checks: list[Check]) -> str:
    """One line: PASS or FAIL, how many checks, and which flagged the model."""
    failed = [c.name for c in checks if not c.passed]
    if failed:
        return f"FAIL: {len(failed)} of {len(checks)} checks flagged the model: {', '.join(failed)}"
    if not checks:
        return "PASS: no checks"
    noisy = sum(c.status == "noise" for c in checks)
    within = f" ({noisy} only within noise)" if noisy else ""
    return f"PASS: {len(checks)} of {len(checks)} checks passed{within}"


def checks_table(checks: list[Check], title: str) -> Table:
    """Metric, value ± uncertainty, limit and result of each check."""
    table = Table(title=title, title_justify="left", caption=CAPTION, caption_justify="left")
    table.add_column("metric")
    table.add_column("value ± uncertainty", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("result")
    for check in checks:
        result = f"[{STYLE[check.status]}]{RESULT[check.status]}[/]"
        table.add_row(metric_cell(check), value_cell(check), limit_cell(check), result)
    return table


def print_checks(checks: list[Check], title: str, console: Console) -> None:
    """The table, then the verdict line."""
    if checks:
        console.print(checks_table(checks, title))
    failed = any(not c.passed for c in checks)
    console.print(verdict_line(checks), style="bold red" if failed else "bold green")
