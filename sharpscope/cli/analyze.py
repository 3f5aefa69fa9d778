"""``sharpscope analyze``: sharpness and SAM-alignment report for a checkpoint on some data.

The modules that need torch are imported where the command runs, after its options are checked:
``--help`` and a bad option never load torch (tests/cli/test_startup.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.cli.common import (
    Interrupts,
    ProgressBars,
    command_scope,
    info,
    print_json,
    set_threads,
    stdout,
)
from sharpscope.cli.flags import as_flags
from sharpscope.cli.generate import Checkpoint, Values, declared_command
from sharpscope.io.load_spec import LoadSpec
from sharpscope.report.document import Report
from sharpscope.report.table import print_report
from sharpscope.settings import as_dict

if TYPE_CHECKING:
    from sharpscope.analysis.analyze import Analysis
    from sharpscope.analysis.plan import Plan
    from sharpscope.cli.loading import Loaded


def run_analysis(loaded: Loaded, config: AnalyzeConfig, quiet: bool) -> tuple[Analysis, Report]:
    """Run the pipeline with progress bars (rank 0's only); return the analysis and its report.
    Of a LoRA adapter, the Hessian is over its trainable (LoRA) parameters unless ``params``
    names others. Interrupted, it raises :class:`Interrupted` with the finished stages' analysis."""
    from sharpscope import distributed
    from sharpscope.analysis.analyze import analyze
    from sharpscope.report.plan_line import plan_line

    shown = not quiet and distributed.is_main()
    if config.params is not None and loaded.checkpoint.adapter is not None:
        loaded.model.requires_grad_(True)  # an adapter's `params` choose among its base too
    with ProgressBars(shown) as bars:

        def show_plan(plan: Plan) -> None:
            if shown:
                info(as_flags(plan_line(plan)))

        analysis = analyze(
            loaded.model,
            loaded.loss_fn,
            loaded.batches,
            config,
            progress=bars,
            on_plan=show_plan,
            checked=True,  # load_inputs ran the first batch
        )
        bars.finish()
    return analysis, report_of(analysis, loaded, config)


def report_of(analysis: Analysis, loaded: Loaded, config: AnalyzeConfig) -> Report:
    """The report of ``analysis`` of the loaded inputs with ``config``."""
    inputs = replace(loaded.description, config=as_dict(config))
    return Report.from_analysis(analysis, inputs)


@declared_command("analyze")
def analyze_command(checkpoint: Checkpoint, settings: Values) -> None:
    """Top Hessian eigenvalues, trace, density and SAM alignment of a checkpoint on some data.

    Under torchrun every rank takes its share of the batches and rank 0 reports. Exit code 0
    when done, 2 on bad input (one line on stderr), 130 on Ctrl-C and 143 on SIGTERM, after
    printing (and writing to --out) a partial report of the finished stages.

    Examples:

        sharpscope analyze sharpscope-demo/digits-mlp.safetensors \\
            --data digits --out report/

        sharpscope analyze net.pt --model resnet18 \\
            --model-arg num_classes=100 --data cifar-100-python/ --json
    """
    out, json_out, quiet = settings["out"], settings["json_out"], settings["quiet"]
    with command_scope(settings["debug"], settings["dist_timeout"]):
        config = settings.build(AnalyzeConfig, slices=out is not None)
        spec = settings.build(LoadSpec, checkpoint=checkpoint)
        from sharpscope.cli.loading import load_inputs  # torch, from here on
        from sharpscope.report.outdir import check_out_dir

        if out is not None:
            check_out_dir(out)
        if config.fsdp:
            from sharpscope.analysis.fsdp import require_ranks

            require_ranks()  # before loading
        set_threads(settings["threads"])
        loaded = load_inputs(spec, shard=True, fsdp=config.fsdp)
        with Interrupts() as interrupts:
            try:
                analysis, report = run_analysis(loaded, config, quiet)
            except KeyboardInterrupt as stop:
                _save_partial(stop, loaded, config, json_out, out)
                raise typer.Exit(interrupts.exit_code) from None
        _render(report, analysis, loaded, config, json_out, out)


def _save_partial(
    stop: KeyboardInterrupt, loaded: Loaded, config: AnalyzeConfig, json_out: bool, out: Path | None
) -> None:
    """After an interrupt: the report of the finished stages, printed and written to ``out``
    (marked partial), and a line on stderr saying what finished."""
    from sharpscope import distributed
    from sharpscope.analysis.analyze import Interrupted

    partial = stop.partial if isinstance(stop, Interrupted) else None
    stage = stop.stage if isinstance(stop, Interrupted) else None
    report = None if partial is None else report_of(partial, loaded, config)
    if report is not None:
        _render(report, partial, loaded, config, json_out, out)
    if not distributed.is_main():
        return
    during = f" during {stage}" if stage else ""
    if report is None:
        info(f"interrupted{during}: no results yet (the eigenvalues had not finished)")
        return
    finished = ", ".join(report.partial.finished) if report.partial else ""
    info(
        f"interrupted{during}: the report holds only the stages that finished ({finished}), "
        'marked "partial"'
    )


def _render(
    report: Report,
    analysis: Analysis,
    loaded: Loaded,
    config: AnalyzeConfig,
    json_out: bool,
    out: Path | None,
) -> None:
    """Print the report (as JSON or tables) and write the --out folder, on rank 0; under ``fsdp``
    the other ranks take part in gathering the eigenvectors it writes."""
    from sharpscope import distributed
    from sharpscope.report.outdir import share_eigenvectors, write_out_dir

    if not distributed.is_main():
        if out is not None and config.fsdp:
            share_eigenvectors(analysis, loaded.model)
        return
    if json_out:
        print_json(report.dumps())
    else:
        print_report(report, stdout)
    if out is not None:
        for path in write_out_dir(out, report, analysis, loaded.model):
            info(f"wrote {path}")
