"""``sharpscope analyze``: sharpness and SAM-alignment report for a checkpoint on some data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sharpscope.analysis.analyze import METHODS, Analysis, AnalyzeConfig, analyze
from sharpscope.cli import options as opt
from sharpscope.cli.common import ProgressBars, errors_as_exit, stderr, stdout
from sharpscope.cli.loading import Loaded, load_inputs
from sharpscope.curvature import BACKENDS
from sharpscope.errors import InputError
from sharpscope.report.json_report import build_report, dumps
from sharpscope.report.outdir import check_out_dir, write_out_dir
from sharpscope.report.table import print_report

HESSIAN = "Hessian"
SAM = "SAM alignment"


def run_analysis(
    loaded: Loaded, config: AnalyzeConfig, quiet: bool
) -> tuple[Analysis, dict[str, Any]]:
    """Run the pipeline with progress bars; return the analysis and its report document."""
    with ProgressBars(not quiet) as bars:
        analysis = analyze(loaded.model, loaded.loss_fn, loaded.batches, config, progress=bars)
        bars.finish()
    inputs = {**loaded.description, "config": dict(config.__dict__)}
    return analysis, build_report(analysis, inputs)


def analyze_command(
    checkpoint: opt.Checkpoint,
    data: opt.Data,
    model: opt.Model = None,
    model_arg: opt.ModelArg = None,
    trust_pickle: opt.TrustPickle = False,
    split: opt.Split = "train",
    batch_size: opt.BatchSize = 128,
    samples: Annotated[
        int,
        typer.Option(
            help="How many samples the Hessian averages over (a fixed random subset for --seed); "
            "0 = all of the split.",
            rich_help_panel=opt.LOAD,
        ),
    ] = 1024,
    loss: opt.Loss = "cross-entropy",
    k: Annotated[
        int, typer.Option("--top-k", "-k", help="How many top eigenpairs.", rich_help_panel=HESSIAN)
    ] = 5,
    method: Annotated[
        str,
        typer.Option(help=f"Eigen-solver: {', '.join(METHODS)}.", rich_help_panel=HESSIAN),
    ] = "lanczos",
    tol: Annotated[
        float,
        typer.Option(
            help="Stop when every residual ‖Hv − λv‖ ≤ tol·|λ_max|.", rich_help_panel=HESSIAN
        ),
    ] = 1e-4,
    max_iter: Annotated[
        int, typer.Option(help="Most Hessian-vector products per solve.", rich_help_panel=HESSIAN)
    ] = 200,
    trace: Annotated[
        bool, typer.Option(help="Estimate the trace (Hutch++).", rich_help_panel=HESSIAN)
    ] = True,
    density: Annotated[
        bool,
        typer.Option(
            "--density", help="Estimate the spectral density (SLQ).", rich_help_panel=HESSIAN
        ),
    ] = False,
    per_layer: Annotated[
        bool,
        typer.Option(
            "--per-layer", help="Top eigenvalue of each module's block.", rich_help_panel=HESSIAN
        ),
    ] = False,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--params",
            help="Only parameters whose name matches this glob (repeatable), e.g. 'fc.*'.",
            rich_help_panel=HESSIAN,
        ),
    ] = None,
    batch_stats: Annotated[
        bool,
        typer.Option(
            "--batch-stats",
            help="BatchNorm on batch statistics (train mode) instead of running statistics.",
            rich_help_panel=HESSIAN,
        ),
    ] = False,
    backend: Annotated[
        str, typer.Option(help=f"HVP backend: {', '.join(BACKENDS)}.", rich_help_panel=HESSIAN)
    ] = "double-backward",
    rho: Annotated[float, typer.Option(help="SAM radius ρ.", rich_help_panel=SAM)] = 0.05,
    alpha: Annotated[float, typer.Option(help="Eigen-SAM's α.", rich_help_panel=SAM)] = 0.2,
    seed: opt.Seed = 0,
    dtype: opt.Dtype = "float32",
    device: opt.Device = "auto",
    json_out: opt.Json = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Also write report.json, eigenvectors.safetensors and PNG plots to this folder.",
            rich_help_panel=opt.RUN,
        ),
    ] = None,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
) -> None:
    """Top Hessian eigenvalues, trace, density and SAM alignment of a checkpoint on some data."""
    with errors_as_exit(debug):
        if backend not in BACKENDS:
            raise InputError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if method not in METHODS:
            raise InputError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
        if k < 1 or max_iter < 1 or tol <= 0:
            raise InputError("--top-k and --max-iter must be at least 1 and --tol positive")
        if out is not None:
            check_out_dir(out)
        loaded = load_inputs(
            checkpoint,
            data,
            model=model,
            model_args=model_arg,
            trust_pickle=trust_pickle,
            split=split,
            samples=samples or None,
            batch_size=batch_size,
            seed=seed,
            loss=loss,
            device=device,
            dtype=dtype,
        )
        config = AnalyzeConfig(
            k=k,
            method=method,  # type: ignore[arg-type]
            tol=tol,
            max_iter=max_iter,
            seed=seed,
            trace=trace,
            density=density,
            per_layer=per_layer,
            rho=rho,
            alpha=alpha,
            backend=backend,  # type: ignore[arg-type]
            batch_stats=batch_stats,
            params=params,
            slices=out is not None,
        )
        analysis, report = run_analysis(loaded, config, quiet)
        if json_out:
            stdout.out(dumps(report), end="")
        else:
            print_report(report, stdout)
        if out is not None:
            for path in write_out_dir(out, report, analysis, loaded.model):
                stderr.print(f"wrote {path}", highlight=False)
