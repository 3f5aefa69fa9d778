"""``sharpscope landscape``: the loss on a line and a grid around a checkpoint's weights, as a PNG
and as JSON (torch and matplotlib are imported when it runs, not for its help)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sharpscope.analysis.landscape_config import KINDS, LandscapeConfig
from sharpscope.choices import DTYPE_NAMES
from sharpscope.cli import options as opt
from sharpscope.cli.common import DistTimeout, ProgressBars, command_scope, info, set_threads
from sharpscope.errors import InputError, check_choice
from sharpscope.io.atomic import check_can_create
from sharpscope.io.file_sets import replace_files
from sharpscope.launch import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from sharpscope.analysis.landscape import Landscape
    from sharpscope.cli.loading import Loaded

DEFAULTS = LandscapeConfig()
LANDSCAPE = "Landscape"
OUTPUTS = ("landscape.json", "landscape.png")


def landscape_config(
    *,
    directions: str,
    span: float,
    points: int,
    grid: int,
    seed: int,
    tol: float,
    max_iter: int,
    params: Sequence[str] | None,
    exclude: Sequence[str] | None,
    batch_stats: bool,
    reduction: str,
) -> LandscapeConfig:
    """The :class:`LandscapeConfig` that the options of ``landscape`` describe."""
    return LandscapeConfig(
        directions=directions,  # type: ignore[arg-type]
        span=span,
        points=points,
        grid=grid,
        seed=seed,
        tol=tol,
        max_iter=max_iter,
        params=params,
        exclude=exclude,
        batch_stats=batch_stats,
        reduction=reduction,
    )


def check_outputs(folder: Path, force: bool) -> None:
    """Refuse a folder path that cannot be written, or one that already holds this command's
    outputs unless ``force``; other files in it are never touched."""
    check_can_create(folder, "`out`", folder=True)
    present = [name for name in OUTPUTS if (folder / name).exists()]
    if present and not force:
        raise InputError(
            f"`out` {folder} already holds {' and '.join(present)}; choose another folder or "
            "pass `force` to overwrite them"
        )


def run_landscape(loaded: Loaded, config: LandscapeConfig, quiet: bool) -> Landscape:
    """Evaluate the landscape with progress bars (rank 0's only)."""
    from sharpscope import distributed
    from sharpscope.analysis.landscape import landscape

    with ProgressBars(not quiet and distributed.is_main()) as bars:
        result = landscape(loaded.model, loaded.loss_fn, loaded.batches, config, progress=bars)
        bars.finish()
    return result


def write_outputs(folder: Path, result: Landscape, loaded: Loaded) -> list[Path]:
    """Write landscape.json and landscape.png as one set (:func:`replace_files`: an interrupted
    write leaves the previous pair); return their paths."""
    from sharpscope.report.landscape_document import landscape_document, landscape_json
    from sharpscope.report.plots import plot_landscape

    inputs = replace(loaded.description, config=dict(result.config.__dict__))
    document = landscape_document(result, inputs)
    json_name, png_name = OUTPUTS

    def write(stage: Path) -> list[str]:
        plot_landscape(document, stage / png_name)
        (stage / json_name).write_text(landscape_json(document), encoding="utf-8")
        return [png_name, json_name]

    return replace_files(folder, write)


def landscape_command(
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
    directions: Annotated[
        str,
        typer.Option(
            help=f"{' or '.join(KINDS)}: filter-normalised random directions (Li et al. 2018) "
            "or the top two Hessian eigenvectors v₁, v₂ (Lanczos, unit vectors).",
            rich_help_panel=LANDSCAPE,
        ),
    ] = DEFAULTS.directions,
    span: Annotated[
        float,
        typer.Option(
            help="Half-width of the line and the grid: steps t in [−span, span] along each "
            "direction (random: in units of each filter's norm; eigen: a distance in weights).",
            rich_help_panel=LANDSCAPE,
        ),
    ] = DEFAULTS.span,
    points: Annotated[
        int,
        typer.Option(help="Points on the 1-D line (odd).", rich_help_panel=LANDSCAPE),
    ] = DEFAULTS.points,
    grid: Annotated[
        int,
        typer.Option(
            help="Points along each axis of the 2-D grid (odd; grid² evaluations).",
            rich_help_panel=LANDSCAPE,
        ),
    ] = DEFAULTS.grid,
    tol: opt.Tol = DEFAULTS.tol,
    max_iter: opt.MaxIter = DEFAULTS.max_iter,
    params: opt.Params = None,
    exclude: opt.Exclude = None,
    batch_stats: opt.BatchStats = DEFAULTS.batch_stats,
    seed: opt.Seed = DEFAULTS.seed,
    dtype: opt.Dtype = opt.DTYPE,
    device: opt.Device = opt.DEVICE,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for landscape.png and landscape.json.", rich_help_panel=opt.RUN
        ),
    ] = Path("landscape"),
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite landscape.png and landscape.json in --out.",
            rich_help_panel=opt.RUN,
        ),
    ] = False,
    dist_timeout: DistTimeout = DEFAULT_TIMEOUT_S,
    threads: opt.Threads = None,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
) -> None:
    """The loss around a checkpoint's weights on a line and a 2-D grid, as a PNG (line, contours,
    surface) and as JSON.

    Every point is the mean loss over all of --samples (the total with --reduction sum).

    Under torchrun every rank evaluates its share of the points on all data; rank 0 writes files.

    Exit code 0 when done, 2 on bad input (one line on stderr), 130 on Ctrl-C.

    Examples:

        sharpscope landscape sharpscope-demo/digits-mlp.safetensors \\
            --data digits --out landscape/

        sharpscope landscape net.pt --model resnet18 --data cifar-10-python/ \\
            --directions eigen --span 0.5 --grid 31 --out landscape-eigen/
    """
    with command_scope(debug, dist_timeout):
        config = landscape_config(
            directions=directions,
            span=span,
            points=points,
            grid=grid,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            params=params,
            exclude=exclude,
            batch_stats=batch_stats,
            reduction=reduction,
        )
        check_outputs(out, force)
        check_choice("dtype", dtype, DTYPE_NAMES)
        from sharpscope import distributed  # torch, from here on
        from sharpscope.cli.loading import check_world, load_inputs

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
        )
        if distributed.is_distributed():
            check_world(loaded)
        result = run_landscape(loaded, config, quiet)
        if distributed.is_main():
            for path in write_outputs(out, result, loaded):
                info(f"wrote {path}")
            info(_summary(result))


def _summary(result: Landscape) -> str:
    """One line: the centre loss, the range seen on the grid and what it cost."""
    finite = [v for row in result.surface for v in row if math.isfinite(v)]
    seen = f"grid loss {min(finite):.6g} .. {max(finite):.6g}" if finite else "no finite grid loss"
    return (
        f"centre loss {result.centre_loss:.6g}; {seen}; {result.evaluations} evaluations in "
        f"{result.seconds:.2g} s"
    )
