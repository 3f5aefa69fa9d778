"""``sharpscope check``: a CI gate that flags sharp models (exit 1), from a checkpoint or a report.

Options default to the ``[tool.sharpscope]`` settings (see :mod:`sharpscope.config`); the command
line overrides them. Threshold semantics: :mod:`sharpscope.analysis.gate` and docs/ci.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.analysis.gate import Thresholds, data_differences, gate
from sharpscope.choices import DTYPE_NAMES
from sharpscope.cli import options as opt
from sharpscope.cli.analyze import DEFAULTS, analysis_config, run_analysis
from sharpscope.cli.common import (
    errors_as_exit,
    fail,
    info,
    print_json,
    set_threads,
    stderr,
    stdout,
)
from sharpscope.cli.config_file import (
    CODE_PARAMS,
    Config,
    load_config,
    refuse_searched_code,
    settings_of,
)
from sharpscope.cli.flags import as_flags
from sharpscope.errors import InputError, check_choice
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

THRESHOLDS = "Thresholds"
BASELINE = "Baseline"

Data = Annotated[str | None, opt.Data.__metadata__[0]]
"""``--data``, optional here: a saved report needs none."""


def _limit(text: str) -> Any:
    return Annotated[
        float | None, typer.Option(help=text, rich_help_panel=THRESHOLDS, show_default=False)
    ]


MaxEigenvalue = _limit("Flag the model when λ_max exceeds this by more than its residual.")
MinEigenvalue = _limit(
    "Flag strong negative curvature: λ_min below this by more than its residual."
)
MaxTrace = _limit("Flag the model when the trace exceeds this by more than 2 SE of its estimate.")
MaxSamSharpness = _limit("Flag the model when the SAM sharpness L(w+ρĝ) − L(w) exceeds this.")
MaxAdaptiveSharpness = _limit(
    "Flag the model when the adaptive sharpness (--adaptive-sharpness) exceeds this (by more "
    "than 2 Monte-Carlo SE for the average case)."
)
MinAlignment = _limit(
    "Flag the model when SAM's alignment, the mean |cos(ĝ_B, v₁)| over minibatches, is below "
    "this by more than 2 SE."
)


def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager ``--config`` callback: the config file's settings become the options' defaults."""
    try:
        config = load_config(settings_of(ctx.command, check_command), value)
    except InputError as exc:
        raise fail(str(exc)) from None
    ctx.default_map = {**(ctx.default_map or {}), **config.options}
    ctx.meta[_CONFIG] = config
    return config.path


_CONFIG = "sharpscope.config"
"""``ctx.meta`` key of the :class:`Config` the ``--config`` callback read."""


def _refuse_searched_code(ctx: typer.Context, trust_code: bool) -> None:
    """Code specs from a config file found by search run only with ``trust_code``."""
    if not trust_code:
        sources = {p: ctx.get_parameter_source(p) for p in CODE_PARAMS}
        taken = [p for p, source in sources.items() if getattr(source, "name", "") == "DEFAULT_MAP"]
        refuse_searched_code(ctx.meta.get(_CONFIG, Config()), taken)


def check_command(
    ctx: typer.Context,
    source: Annotated[
        Path,
        typer.Argument(
            help="A report.json from `sharpscope analyze` (gated as it is), or a model "
            "checkpoint (analyzed first; needs --data).",
            metavar="REPORT_OR_CHECKPOINT",
            show_default=False,
        ),
    ],
    max_eigenvalue: MaxEigenvalue = None,
    min_eigenvalue: MinEigenvalue = None,
    max_trace: MaxTrace = None,
    max_sam_sharpness: MaxSamSharpness = None,
    min_alignment: MinAlignment = None,
    max_adaptive_sharpness: MaxAdaptiveSharpness = None,
    sigmas: Annotated[
        float,
        typer.Option(
            help="Also allow this many standard errors of each figure's spread over other "
            "samples of this size (paired with --baseline); 0 gates the model on the data "
            "given, with the solver's bounds only.",
            rich_help_panel=THRESHOLDS,
        ),
    ] = 0.0,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="A report of the same architecture to compare with (--max-increase); the "
            "recommended gate, since absolute sharpness is not comparable across architectures.",
            rich_help_panel=BASELINE,
            show_default=False,
        ),
    ] = None,
    max_increase: Annotated[
        str | None,
        typer.Option(
            help="Flag λ_max, trace, SAM or adaptive sharpness rising more than this over the "
            "baseline: 10% or 0.1.",
            rich_help_panel=BASELINE,
            show_default=False,
        ),
    ] = None,
    update_baseline: Annotated[
        bool,
        typer.Option(
            "--update-baseline",
            help="Write this report to the --baseline file (atomically) instead of comparing "
            "with it; never overwrites a file that is not a sharpscope report.",
            rich_help_panel=BASELINE,
        ),
    ] = False,
    allow_different_data: Annotated[
        bool,
        typer.Option(
            "--allow-different-data",
            help="Compare with a baseline measured on other data (its fingerprint, --samples, "
            "--seed, --rho, --dtype or --loss differ) instead of refusing it.",
            rich_help_panel=BASELINE,
        ),
    ] = False,
    data: Data = None,
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
    batch_stats: opt.BatchStats = DEFAULTS.batch_stats,
    params: opt.Params = None,
    exclude: opt.Exclude = None,
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
    threads: opt.Threads = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the verdict, the checks and the report's figures as JSON on stdout.",
            rich_help_panel=opt.RUN,
        ),
    ] = False,
    junit: Annotated[
        Path | None,
        typer.Option(
            help="Also write the checks as JUnit XML (one testcase per check) to this file.",
            rich_help_panel=opt.RUN,
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Settings file (default: the nearest sharpscope.toml, or pyproject.toml with "
            "\\[tool.sharpscope], from here up to the repository root or your home; code specs "
            "in a file found so need --config or --trust-code).",
            callback=_load_config,
            is_eager=True,
            rich_help_panel=opt.RUN,
            show_default=False,
        ),
    ] = None,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
) -> None:
    """Gate a model on its sharpness for CI: exit 0 when every check passes, 1 when one flags it.

    A check only fails when the figure, measured on the data given, is past its limit by more
    than the solver's uncertainty (--sigmas N adds N SE of its spread over other samples).

    Exit code 2 on bad input (one line on stderr), 130 on Ctrl-C.

    Settings may come from \\[tool.sharpscope] in pyproject.toml or from sharpscope.toml.

    Examples:

        sharpscope check report.json --max-eigenvalue 40 --min-alignment 0.05

        sharpscope check model.pt --data val.npz --baseline base.json \\
            --update-baseline

        sharpscope check model.pt --data val.npz --baseline base.json \\
            --max-increase 10%
    """
    start = time.perf_counter()
    with errors_as_exit(debug):
        _refuse_searched_code(ctx, trust_code)
        thresholds = Thresholds(
            max_eigenvalue=max_eigenvalue,
            min_eigenvalue=min_eigenvalue,
            max_trace=max_trace,
            max_sam_sharpness=max_sam_sharpness,
            min_alignment=min_alignment,
            max_adaptive_sharpness=max_adaptive_sharpness,
            max_increase=None if max_increase is None else parse_fraction(max_increase),
            sigmas=sigmas,
        )
        thresholds = _plan(thresholds, baseline, update_baseline)
        analysis = analysis_config(
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
        )
        loading = dict(
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
        )
        relative = baseline is not None and thresholds.max_increase is not None
        base = gateable(read_baseline(baseline), baseline).gate_input() if relative else None
        if update_baseline and baseline is not None:  # outputs: before a long analysis
            check_baseline_target(baseline)
        if junit is not None:
            check_junit_target(junit)
        report = _report(source, data, loading, analysis, quiet, thresholds, threads)
        gated = report.gate_input()
        checks = gate(gated, thresholds, base, allow_different_data)
        differences = ", ".join(data_differences(gated, base)) if base is not None else ""
        if differences:  # allowed, or the gate would have refused the baseline
            info(as_flags(f"note: comparing with a baseline of other data: {differences}"))
        if json_out:
            result = check_result(checks, report, thresholds.sigmas, source, baseline, config)
            print_json(dumps(result))
        else:
            print_checks(checks, f"sharpscope check: {source}", stdout)
        if junit is not None:
            properties = {"source": str(source), "sigmas": f"{thresholds.sigmas:g}"}
            write_junit(junit, checks, properties, time.perf_counter() - start)
        console = stderr if json_out else stdout  # annotations keep stdout one JSON document
        publish(checks, str(source), os.environ, lambda line: console.out(line, highlight=False))
        if update_baseline and baseline is not None:
            write_baseline(baseline, report)
            info(f"wrote the baseline {baseline}")
    if any(not c.passed for c in checks):
        raise typer.Exit(1)


def parse_fraction(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1. A bare number above 1 is refused: ``10`` would mean +1000 %, and
    is almost always a percentage without its sign (write ``1000%`` to mean it)."""
    stripped = text.strip()
    percent = stripped.endswith("%")
    try:
        value = float(stripped.removesuffix("%"))
    except ValueError:
        raise InputError(
            f"--max-increase takes a fraction (0.1) or a percentage (10%), got {text!r}"
        ) from None
    if not percent and value > 1:
        raise InputError(
            f"--max-increase {text} would allow +{100 * value:g}% over the baseline: write "
            f"{value:g}% for {value:g} percent (or {100 * value:g}% if you mean it)"
        )
    return value / 100 if percent else value


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
    source: Path,
    data: str | None,
    loading: dict[str, Any],
    config: AnalyzeConfig,
    quiet: bool,
    thresholds: Thresholds,
    threads: int | None,
) -> Report:
    """``source`` read as a report (without torch), or the report of analyzing it as a checkpoint
    on ``data`` with :func:`~sharpscope.cli.loading.load_inputs`'s ``loading`` options on
    ``threads`` (refused before the analysis when it would not measure a figure ``thresholds``
    gate)."""
    if not source.exists():
        raise InputError(f"{source} does not exist: give a report.json or a checkpoint")
    if is_report_file(source):
        return gateable(read_report(source), source)
    if data is None:
        raise InputError(
            f"{source} is not a JSON report, so it is analyzed as a checkpoint, which needs "
            "--data (or data in the config file)"
        )
    if thresholds.max_adaptive_sharpness is not None and config.adaptive_sharpness is None:
        raise InputError(
            "--max-adaptive-sharpness needs the adaptive sharpness measured: add "
            "--adaptive-sharpness worst (or average)"
        )
    check_choice("dtype", loading["dtype"], DTYPE_NAMES)
    from sharpscope.cli.loading import load_inputs  # torch: only to analyze a checkpoint

    set_threads(threads)
    _, report = run_analysis(load_inputs(source, data, **loading), config, quiet)
    return report
