"""``sharpscope analyze``: sharpness and SAM-alignment report for a checkpoint on some data.

The modules that need torch are imported where the command runs, after its options are checked:
``--help`` and a bad option never load torch (tests/test_startup.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.choices import DTYPE_NAMES
from sharpscope.cli import options as opt
from sharpscope.cli.common import (
    DistTimeout,
    Interrupts,
    ProgressBars,
    command_scope,
    info,
    print_json,
    set_threads,
    stdout,
)
from sharpscope.cli.flags import as_flags
from sharpscope.errors import check_choice
from sharpscope.launch import DEFAULT_TIMEOUT_S
from sharpscope.report.document import Report
from sharpscope.report.table import print_report

if TYPE_CHECKING:
    from sharpscope.analysis.analyze import Analysis
    from sharpscope.analysis.plan import Plan
    from sharpscope.cli.loading import Loaded

DEFAULTS = AnalyzeConfig()


def analysis_config(
    *,
    top_k: int,
    method: str,
    tol: float,
    max_iter: int,
    max_basis: int | None,
    trace: bool,
    shards: int,
    bias: bool,
    params: list[str] | None,
    exclude: list[str] | None,
    batch_stats: bool,
    reduction: str,
    backend: str,
    curvature: str,
    rho: float,
    alpha: float,
    seed: int,
    adaptive_sharpness: str | None,
    adaptive_norm: str,
    adaptive_rho: float,
    adaptive_steps: int,
    adaptive_scale: bool,
    density: bool = False,
    per_layer: bool = False,
    slices: bool = False,
) -> AnalyzeConfig:
    """The :class:`AnalyzeConfig` that the options of ``analyze`` and ``check`` describe (the
    trace's and density's precision are not options: see docs/report.md)."""
    return AnalyzeConfig(
        k=top_k,
        method=method,  # type: ignore[arg-type]
        tol=tol,
        max_iter=max_iter,
        max_basis=max_basis,
        seed=seed,
        trace=trace,
        density=density,
        per_layer=per_layer,
        rho=rho,
        alpha=alpha,
        backend=backend,  # type: ignore[arg-type]
        curvature=curvature,
        batch_stats=batch_stats,
        reduction=reduction,
        params=params,
        exclude=exclude,
        slices=slices,
        shards=shards,
        adaptive_sharpness=adaptive_sharpness,
        adaptive_norm=adaptive_norm,
        adaptive_rho=adaptive_rho,
        adaptive_steps=adaptive_steps,
        adaptive_scale=adaptive_scale,
        bias=bias,
    )


def run_analysis(loaded: Loaded, config: AnalyzeConfig, quiet: bool) -> tuple[Analysis, Report]:
    """Run the pipeline with progress bars (rank 0's only); return the analysis and its report.
    Interrupted, it raises :class:`Interrupted` with the finished stages' analysis."""
    from sharpscope import distributed
    from sharpscope.analysis.analyze import analyze
    from sharpscope.report.plan_line import plan_line

    shown = not quiet and distributed.is_main()
    with ProgressBars(shown) as bars:

        def show_plan(plan: Plan) -> None:
            if shown:
                info(as_flags(plan_line(plan)))

        analysis = analyze(
            loaded.model, loaded.loss_fn, loaded.batches, config, progress=bars, on_plan=show_plan
        )
        bars.finish()
    return analysis, report_of(analysis, loaded, config)


def report_of(analysis: Analysis, loaded: Loaded, config: AnalyzeConfig) -> Report:
    """The report of ``analysis`` of the loaded inputs with ``config``."""
    inputs = replace(loaded.description, config=dict(config.__dict__))
    return Report.from_analysis(analysis, inputs)


def analyze_command(
    checkpoint: opt.Checkpoint,
    data: opt.Data,
    model: opt.Model = None,
    model_arg: opt.ModelArg = None,
    trust_pickle: opt.TrustPickle = False,
    trust_code: opt.TrustCode = False,
    state_prefix: opt.StatePrefix = None,
    split: opt.Split = opt.SPLIT,
    batch_size: opt.BatchSize = opt.BATCH_SIZE,
    samples: opt.Samples = opt.SAMPLES,
    text_field: opt.TextField = opt.TEXT_FIELD,
    label_field: opt.LabelField = opt.LABEL_FIELD,
    max_length: opt.MaxLength = None,
    loss: opt.Loss = opt.LOSS,
    reduction: opt.Reduction = opt.REDUCTION,
    input_style: opt.InputStyle = opt.INPUT_STYLE,
    top_k: opt.TopK = DEFAULTS.k,
    method: opt.Method = DEFAULTS.method,
    tol: opt.Tol = DEFAULTS.tol,
    max_iter: opt.MaxIter = DEFAULTS.max_iter,
    max_basis: opt.MaxBasis = DEFAULTS.max_basis,
    trace: opt.Trace = DEFAULTS.trace,
    shards: opt.Shards = DEFAULTS.shards,
    bias: opt.Bias = DEFAULTS.bias,
    density: Annotated[
        bool,
        typer.Option(
            "--density", help="Estimate the spectral density (SLQ).", rich_help_panel=opt.HESSIAN
        ),
    ] = False,
    per_layer: Annotated[
        bool,
        typer.Option(
            "--per-layer",
            help="Top eigenvalue of each module's block.",
            rich_help_panel=opt.HESSIAN,
        ),
    ] = False,
    params: opt.Params = None,
    exclude: opt.Exclude = None,
    batch_stats: opt.BatchStats = DEFAULTS.batch_stats,
    backend: opt.Backend = DEFAULTS.backend,
    curvature: opt.Curvature = DEFAULTS.curvature,
    rho: opt.Rho = DEFAULTS.rho,
    alpha: opt.Alpha = DEFAULTS.alpha,
    adaptive_sharpness: opt.AdaptiveSharpness = DEFAULTS.adaptive_sharpness,
    adaptive_norm: opt.AdaptiveNorm = DEFAULTS.adaptive_norm,
    adaptive_rho: opt.AdaptiveRho = DEFAULTS.adaptive_rho,
    adaptive_steps: opt.AdaptiveSteps = DEFAULTS.adaptive_steps,
    adaptive_scale: opt.AdaptiveScale = DEFAULTS.adaptive_scale,
    seed: opt.Seed = DEFAULTS.seed,
    dtype: opt.Dtype = opt.DTYPE,
    device: opt.Device = opt.DEVICE,
    json_out: opt.Json = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Also write report.json, eigenvectors.safetensors and PNG plots to this folder.",
            rich_help_panel=opt.RUN,
        ),
    ] = None,
    dist_timeout: DistTimeout = DEFAULT_TIMEOUT_S,
    threads: opt.Threads = None,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
) -> None:
    """Top Hessian eigenvalues, trace, density and SAM alignment of a checkpoint on some data.

    Under torchrun every rank takes its share of the batches and rank 0 reports.

    Exit code 0 when done, 2 on bad input (one line on stderr), 130 on Ctrl-C and 143 on
    SIGTERM, after printing (and writing to --out) a partial report of the finished stages.

    Examples:

        sharpscope analyze sharpscope-demo/digits-mlp.safetensors \\
            --data digits --out report/

        sharpscope analyze net.pt --model resnet18 \\
            --model-arg num_classes=100 --data cifar-100-python/

        sharpscope analyze net.pt --model mypkg.models:make_net \\
            --data val.npz --json
    """
    with command_scope(debug, dist_timeout):
        config = analysis_config(
            top_k=top_k,
            method=method,
            tol=tol,
            max_iter=max_iter,
            max_basis=max_basis,
            trace=trace,
            shards=shards,
            bias=bias,
            params=params,
            exclude=exclude,
            batch_stats=batch_stats,
            reduction=reduction,
            backend=backend,
            curvature=curvature,
            rho=rho,
            alpha=alpha,
            seed=seed,
            adaptive_sharpness=adaptive_sharpness,
            adaptive_norm=adaptive_norm,
            adaptive_rho=adaptive_rho,
            adaptive_steps=adaptive_steps,
            adaptive_scale=adaptive_scale,
            density=density,
            per_layer=per_layer,
            slices=out is not None,
        )
        check_choice("dtype", dtype, DTYPE_NAMES)
        from sharpscope import distributed  # torch, from here on
        from sharpscope.cli.loading import load_inputs
        from sharpscope.report.outdir import check_out_dir

        if out is not None:
            check_out_dir(out)
        set_threads(threads)
        loaded = load_inputs(
            checkpoint,
            data,
            model=model,
            model_args=model_arg,
            trust_pickle=trust_pickle,
            trust_code=trust_code,
            state_prefix=state_prefix,
            split=split,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            text_field=text_field,
            label_field=label_field,
            max_length=max_length,
            loss=loss,
            reduction=reduction,
            input_style=input_style,
            device=device,
            dtype=dtype,
            shard=True,
        )
        with Interrupts() as interrupts:
            try:
                analysis, report = run_analysis(loaded, config, quiet)
            except KeyboardInterrupt as stop:
                _save_partial(stop, loaded, config, json_out, out)
                raise typer.Exit(interrupts.exit_code) from None
        if distributed.is_main():
            _render(report, analysis, loaded, json_out, out)


def _save_partial(
    stop: KeyboardInterrupt, loaded: Loaded, config: AnalyzeConfig, json_out: bool, out: Path | None
) -> None:
    """After an interrupt: the report of the finished stages, printed and written to ``out``
    (marked partial), and a line on stderr saying what finished."""
    from sharpscope import distributed
    from sharpscope.analysis.analyze import Interrupted

    partial = stop.partial if isinstance(stop, Interrupted) else None
    stage = stop.stage if isinstance(stop, Interrupted) else None
    if not distributed.is_main():
        return
    during = f" during {stage}" if stage else ""
    if partial is None:
        info(f"interrupted{during}: no results yet (the eigenvalues had not finished)")
        return
    report = report_of(partial, loaded, config)
    _render(report, partial, loaded, json_out, out)
    finished = ", ".join(report.partial.finished) if report.partial else ""
    info(
        f"interrupted{during}: the report holds only the stages that finished ({finished}), "
        'marked "partial"'
    )


def _render(
    report: Report, analysis: Analysis, loaded: Loaded, json_out: bool, out: Path | None
) -> None:
    """Print the report (as JSON or tables) and write the --out folder."""
    from sharpscope.report.outdir import write_out_dir

    if json_out:
        print_json(report.dumps())
    else:
        print_report(report, stdout)
    if out is not None:
        for path in write_out_dir(out, report, analysis, loaded.model):
            info(f"wrote {path}")
