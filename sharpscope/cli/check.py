"""``sharpscope check``: a CI gate that flags sharp models (exit 1), from a checkpoint or a report.

Options default to the ``[tool.sharpscope]`` settings (see :mod:`sharpscope.cli.config_file`);
the command line overrides them. Threshold semantics: :mod:`sharpscope.analysis.gate` and
docs/ci.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.analysis.gate import BaselineSettings, Thresholds, data_differences, gate
from sharpscope.cli.analyze import run_analysis
from sharpscope.cli.common import (
    command_scope,
    errors_as_exit,
    info,
    print_json,
    set_threads,
    stderr,
    stdout,
)
from sharpscope.cli.flags import as_flags
from sharpscope.cli.generate import Values, declared_command
from sharpscope.errors import InputError
from sharpscope.io.load_spec import LoadSpec
from sharpscope.report.baseline import (
    check_baseline_target,
    is_report_file,
    read_baseline,
    write_baseline,
)
from sharpscope.report.check_result import check_result
from sharpscope.report.checks_table import print_checks
from sharpscope.report.document import Report, gateable, read_report
from sharpscope.report.github import publish
from sharpscope.report.json_report import dumps
from sharpscope.report.junit import check_junit_target, write_junit


@declared_command("check")
def check_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A report.json from `sharpscope analyze` (gated as it is), or a model "
            "checkpoint (analyzed first; needs --data).",
            metavar="REPORT_OR_CHECKPOINT",
            show_default=False,
        ),
    ],
    settings: Values,
) -> None:
    """Gate a model on its sharpness for CI: exit 0 when every check passes, 1 when one flags it.

    A check only fails when the figure, measured on the data given, is past its limit by more
    than the solver's uncertainty (--sigmas N adds N SE of its spread over other samples). Exit
    code 2 on bad input (one line on stderr), 130 on Ctrl-C. With --fsdp under torchrun the
    checkpoint is analyzed with its parameters sharded over the ranks, and rank 0 reports.

    Examples:

        sharpscope check report.json --max-eigenvalue 40 --min-alignment 0.05

        sharpscope check model.pt --data val.npz --baseline base.json \\
            --max-increase 10%   # or --update-baseline
    """
    start = time.perf_counter()
    json_out, junit = settings["json_out"], settings["junit"]
    with _scope(settings):
        gate_on = settings.build(BaselineSettings)
        baseline = gate_on.baseline
        thresholds = _plan(settings.build(Thresholds), baseline, gate_on.update_baseline)
        analysis = settings.build(AnalyzeConfig)
        relative = baseline is not None and thresholds.max_increase is not None
        base = gateable(read_baseline(baseline), baseline).gate_input() if relative else None
        if gate_on.update_baseline and baseline is not None:  # outputs: before a long analysis
            check_baseline_target(baseline)
        if junit is not None:
            check_junit_target(junit)
        report = _report(source, settings, analysis, thresholds)
        gated = report.gate_input()
        checks = gate(gated, thresholds, base, gate_on.allow_different_data)
        if _reports(analysis):  # every rank gates the same report: one prints and writes
            differences = ", ".join(data_differences(gated, base)) if base is not None else ""
            if differences:  # allowed, or the gate would have refused the baseline
                info(as_flags(f"note: comparing with a baseline of other data: {differences}"))
            if json_out:
                config = settings.config.path
                result = check_result(checks, report, thresholds.sigmas, source, baseline, config)
                print_json(dumps(result))
            else:
                print_checks(checks, f"sharpscope check: {source}", stdout)
            if junit is not None:
                properties = {"source": str(source), "sigmas": f"{thresholds.sigmas:g}"}
                write_junit(junit, checks, properties, time.perf_counter() - start)
            console = stderr if json_out else stdout  # annotations keep stdout one JSON document
            publish(
                checks, str(source), os.environ, lambda line: console.out(line, highlight=False)
            )
            if gate_on.update_baseline and baseline is not None:
                write_baseline(baseline, report)
                info(f"wrote the baseline {baseline}")
    if any(not c.passed for c in checks):
        raise typer.Exit(1)


def _scope(settings: Values) -> contextlib.AbstractContextManager[None]:
    """Failures as one line and exit 2; under ``fsdp`` inside torchrun's process group
    (:func:`command_scope`), else every rank of a torchrun launch gates alone."""
    if settings["fsdp"]:
        return command_scope(settings["debug"], settings["dist_timeout"])
    return errors_as_exit(settings["debug"])


def _reports(config: AnalyzeConfig) -> bool:
    """Whether this process prints and writes the results: rank 0 of a sharded analysis, or any
    process that gates alone."""
    if not config.fsdp:
        return True
    from sharpscope import distributed  # torch: the analysis imported it already

    return distributed.is_main()


def _plan(thresholds: Thresholds, baseline: Path | None, update: bool) -> Thresholds:
    """Check that the options make a gate; with --update-baseline, leave the relative checks out
    (this report becomes the baseline)."""
    if update:
        if baseline is None:
            raise InputError("--update-baseline needs --baseline FILE (the file to write)")
        if thresholds.max_increase is not None:
            info("note: --update-baseline replaces the baseline: no relative checks")
        return replace(thresholds, max_increase=None)
    if thresholds.max_increase is not None and baseline is None:
        raise InputError("--max-increase needs --baseline FILE (a report to compare with)")
    if baseline is not None and thresholds.max_increase is None:
        raise InputError("--baseline needs --max-increase (e.g. 10%), or --update-baseline")
    if thresholds == Thresholds(sigmas=thresholds.sigmas):
        raise InputError(
            "nothing to check: give a threshold (--max-eigenvalue, --max-trace, ...) or "
            "--baseline with --max-increase, on the command line or in the config file"
        )
    return thresholds


def _report(
    source: Path, settings: Values, config: AnalyzeConfig, thresholds: Thresholds
) -> Report:
    """``source`` read as a report (without torch), or the report of analyzing it as a checkpoint
    with ``config`` on the data ``settings`` give (refused before the analysis when it would not
    measure a figure ``thresholds`` gate)."""
    if not source.exists():
        raise InputError(f"{source} does not exist: give a report.json or a checkpoint")
    if is_report_file(source):
        return gateable(read_report(source), source)
    if settings["data"] is None:
        raise InputError(
            f"{source} is not a JSON report, so it is analyzed as a checkpoint, which needs "
            "--data (or data in the config file)"
        )
    if thresholds.max_adaptive_sharpness is not None and config.adaptive_sharpness is None:
        raise InputError(
            "--max-adaptive-sharpness needs the adaptive sharpness measured: add "
            "--adaptive-sharpness worst (or average)"
        )
    spec = settings.build(LoadSpec, checkpoint=source)
    from sharpscope.cli.loading import load_inputs  # torch: only to analyze a checkpoint

    if config.fsdp:
        from sharpscope.analysis.fsdp import require_ranks

        require_ranks("check")  # before loading
    set_threads(settings["threads"])
    loaded = load_inputs(spec, shard=config.fsdp, fsdp=config.fsdp)  # each rank: its batches
    _, report = run_analysis(loaded, config, settings["quiet"])
    return report
