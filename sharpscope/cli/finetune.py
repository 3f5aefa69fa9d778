"""``sharpscope finetune``: fine-tune a checkpoint with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max
and the SAM alignment, with checkpoints that resume exactly (docs/finetune.md)."""

from __future__ import annotations

import datetime
import itertools
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sharpscope import distributed
from sharpscope.cli import options as opt
from sharpscope.cli.common import (
    DistTimeout,
    command_scope,
    fail,
    info,
    print_json,
    stderr,
    stdout,
)
from sharpscope.cli.loading import load_inputs
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import file_sha256
from sharpscope.io.data import HELD_OUT, DataBundle, held_out_split, load_data, open_source
from sharpscope.io.models import ModelSpec, parse_model_args
from sharpscope.report.training_plot import plot_training
from sharpscope.training.optimizers import DEFAULT_RHO, OPTIMIZERS, SCHEDULES
from sharpscope.training.run import Inputs, Outcome, Watch, finetune
from sharpscope.training.run_config import DEFAULT_EPOCHS, RunConfig, resumed
from sharpscope.training.run_dir import CONFIG, MODEL, RunDir
from sharpscope.training.signals import StopRequest

OPTIMIZE = "Optimizer"
TRACK = "Tracking"
SAVE = "Checkpoints"
PLOT = "training.png"
_CONFIG_FIELDS = frozenset(f.name for f in fields(RunConfig))
_DEFAULTED = ("DEFAULT", "DEFAULT_MAP")


def _int(help_text: str, panel: str) -> Any:
    return Annotated[int, typer.Option(help=help_text, rich_help_panel=panel)]


def _float(help_text: str, panel: str) -> Any:
    return Annotated[float, typer.Option(help=help_text, rich_help_panel=panel)]


def finetune_command(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="The checkpoint to start from (any format `analyze` reads); not needed with "
            "--resume.",
            show_default=False,
            metavar="CHECKPOINT",
        ),
    ] = None,
    data: Annotated[str | None, opt.Data.__metadata__[0]] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            help="Validation data spec (its held-out split if it has one, else all of it); "
            "default: the held-out split of --data.",
            rich_help_panel=opt.LOAD,
            show_default=False,
        ),
    ] = None,
    split: opt.Split = "train",
    model: opt.Model = None,
    model_arg: opt.ModelArg = None,
    trust_pickle: opt.TrustPickle = False,
    loss: opt.Loss = "cross-entropy",
    optimizer: Annotated[
        str, typer.Option(help=f"{', '.join(OPTIMIZERS)}.", rich_help_panel=OPTIMIZE)
    ] = "sgd",
    lr: _float("Base learning rate.", OPTIMIZE) = 0.01,
    momentum: _float("SGD momentum (also the base of SAM, ASAM, Eigen-SAM).", OPTIMIZE) = 0.9,
    weight_decay: _float("SGD weight decay.", OPTIMIZE) = 0.0,
    rho: Annotated[
        float | None,
        typer.Option(
            help="Perturbation radius ρ; default 0.05 (sam, eigen-sam), 0.5 (asam).",
            rich_help_panel=OPTIMIZE,
            show_default=False,
        ),
    ] = None,
    alpha: _float("Eigen-SAM's α (weight of the eigenvector part).", OPTIMIZE) = 0.2,
    per_rank_sam: Annotated[
        bool,
        typer.Option(
            "--per-rank-sam",
            help="Under torchrun: each rank perturbs with its own gradient (m-sharpness) instead "
            "of the averaged one.",
            rich_help_panel=OPTIMIZE,
        ),
    ] = False,
    eig_every: _int("Eigen-SAM: refresh the eigenvector every k steps.", OPTIMIZE) = 100,
    eig_steps: _int("Eigen-SAM: Hessian-vector products per refresh.", OPTIMIZE) = 5,
    schedule: Annotated[
        str,
        typer.Option(
            help=f"Learning-rate schedule: {', '.join(SCHEDULES)}.", rich_help_panel=OPTIMIZE
        ),
    ] = "constant",
    batch_size: opt.BatchSize = 128,
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"Passes over the data (default {DEFAULT_EPOCHS}); or --steps.",
            rich_help_panel=OPTIMIZE,
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Total optimizer steps.", rich_help_panel=OPTIMIZE, show_default=False),
    ] = None,
    track_every: _int("Record λ_max, alignment, loss and accuracy every N steps.", TRACK) = 50,
    probe_size: _int("Samples in the fixed probe batch λ_max is measured on.", TRACK) = 256,
    track_iters: _int("Most Lanczos products per λ_max measurement.", TRACK) = 20,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder: checkpoints, metrics, training.png; default runs/finetune-<time>.",
            rich_help_panel=SAVE,
            show_default=False,
        ),
    ] = None,
    save_every: _int("Write a checkpoint every N steps (and at the end or on a stop).", SAVE) = 100,
    keep: _int("Keep the last N checkpoints.", SAVE) = 3,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder from its last checkpoint, exactly; options not "
            "given are the run's own.",
            rich_help_panel=SAVE,
            show_default=False,
        ),
    ] = None,
    seed: opt.Seed = 0,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "float32",
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the summary as JSON on stdout.", rich_help_panel=opt.RUN
        ),
    ] = False,
    dist_timeout: DistTimeout = distributed.DEFAULT_TIMEOUT_S,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
) -> None:
    """Fine-tune a checkpoint with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max and |cos(ĝ, v₁)|.
    Exit 0 when done, 2 on an error or a diverged loss, 130/143 when SIGINT/SIGTERM stopped it
    (a checkpoint is saved first: continue with --resume DIR). Under torchrun the ranks train
    with DistributedDataParallel on shares of each batch and rank 0 writes the run."""
    with command_scope(debug, dist_timeout):
        default_out = _default_out()
        with distributed.together("preparing the run"):
            if resume is not None:
                folder, config, start = _resume_plan(resume, out, _given(ctx))
                source, model_spec, model_args = start / MODEL, None, None
            else:
                folder, config = _new_plan(ctx.params, default_out)
                if distributed.is_main():
                    folder.prepare_new()
                source, model_spec, model_args, start = checkpoint, model, model_arg, None
        assert source is not None
        loaded = load_inputs(
            source,
            config.data,
            model=model_spec,
            model_args=model_args,
            trust_pickle=trust_pickle,
            split=config.split,
            batch_size=config.batch_size,
            seed=config.seed,
            loss=config.loss,
            device=config.device,
            dtype=config.dtype,
            shard=True,
        )
        spec = _model_spec(loaded.spec, source)
        if start is None:
            config = replace(
                config, checkpoint_sha256=loaded.checkpoint.sha256, model=spec.to_json()
            )
        with distributed.together("loading the validation data"):
            val = _validation(config, loaded.data)
        if val is not None:
            values = distributed.fingerprint([("inputs", val.inputs), ("targets", val.targets)])
            distributed.check_same("validation data (--val-data)", values)
        inputs = Inputs(
            loaded.model, spec, loaded.loss_fn, loaded.data, val, loaded.device, loaded.dtype
        )
        main = distributed.is_main()
        with StopRequest() as stop, TrainingProgress(not quiet and main) as progress:
            watch = (
                Watch(progress.started, progress.step, progress.record, stop)
                if main
                else Watch(should_stop=stop)
            )
            outcome = finetune(folder, config, inputs, start, watch)
        if main:
            plot = folder.path / PLOT
            plot_training(outcome.rows, plot, f"{config.optimizer} on {config.data}")
            info(f"wrote {plot}")
        _report(outcome, folder, config, stop, json_out)


def _default_out() -> Path:
    """``runs/finetune-<date>-<time>``, at rank 0's clock on every rank."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return distributed.main_value(Path("runs") / f"finetune-{stamp}")


def _given(ctx: typer.Context) -> dict[str, Any]:
    """The run settings given on the command line (not defaulted), by RunConfig field; a given
    checkpoint counts by its hash, a given model by its spec."""
    given = {
        name: value
        for name, value in ctx.params.items()
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in _DEFAULTED
    }
    settings = {k: v for k, v in given.items() if k in _CONFIG_FIELDS - {"checkpoint", "model"}}
    if "checkpoint" in given:
        settings["checkpoint_sha256"] = file_sha256(_existing(given["checkpoint"]))
    if "model" in given:
        args = parse_model_args(ctx.params.get("model_arg") or [])
        settings["model"] = ModelSpec(given["model"], args).to_json()
    return settings


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found; check the path")
    return path


def _resume_plan(
    resume: Path, out: Path | None, given: dict[str, Any]
) -> tuple[RunDir, RunConfig, Path]:
    """The run folder, its settings with the given changes, and its last checkpoint folder."""
    if out is not None and out.resolve() != resume.resolve():
        raise InputError(f"--out {out} is not --resume {resume}: a resumed run stays in its folder")
    folder = RunDir(resume)
    config = resumed(folder.read_config(), given, str(resume / CONFIG))
    found = folder.latest()
    if found is None:
        raise InputError(
            f"--resume {resume}: the run wrote no checkpoint yet; start it again without --resume"
        )
    return folder, config, found[1]


def _new_plan(params: dict[str, Any], default_out: Path) -> tuple[RunDir, RunConfig]:
    """The folder (--out, else ``default_out``) and settings of a new run (the checkpoint's hash
    and model spec are filled in once it is loaded)."""
    if params["checkpoint"] is None or params["data"] is None:
        raise InputError("give a CHECKPOINT and --data, or --resume DIR to continue a run")
    settings = {k: v for k, v in params.items() if k in _CONFIG_FIELDS}
    if params["steps"] is None and params["epochs"] is None:
        settings["epochs"] = DEFAULT_EPOCHS
    if params["rho"] is None:
        settings["rho"] = DEFAULT_RHO.get(params["optimizer"], 0.0)
    settings.update(checkpoint=str(params["checkpoint"]), checkpoint_sha256="", model="")
    config = RunConfig(**settings)
    return RunDir(params["out"] or default_out), config


def _model_spec(spec: ModelSpec | None, source: Path) -> ModelSpec:
    """The spec the run's checkpoints carry: --model's, else the starting checkpoint's."""
    if spec is None:
        raise InputError(
            f"{source} holds a whole model without a model spec, and finetune writes "
            "safetensors checkpoints that carry one: pass --model (the factory that builds "
            "this architecture)"
        )
    return spec


def _validation(config: RunConfig, train: DataBundle) -> DataBundle | None:
    """The validation data: --val-data (its held-out split, else all of it), else the held-out
    split of --data, else none (with a note)."""
    if config.val_data is not None:
        splits = open_source(config.val_data).splits
        split = next((s for s in HELD_OUT if s in splits), "train")
        return load_data(config.val_data, split=split)
    split = held_out_split(train)
    if split is None:
        if distributed.is_main():
            info(
                f"note: {train.source} has no held-out split, so nothing is validated; pass "
                "--val-data to validate"
            )
        return None
    return load_data(config.data, split=split)


class TrainingProgress:
    """A progress bar on stderr with the latest minibatch loss and tracked figures."""

    def __init__(self, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("finetune"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=stderr,
            disable=not enabled or sys.stderr is None,
        )
        self._task: TaskID | None = None
        self._loss = self._tracked = ""

    def __enter__(self) -> TrainingProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def started(self, step: int, total: int) -> None:
        if step:
            info(f"resuming from step {step} of {total}")
        self._task = self._progress.add_task("finetune", total=total, completed=step, figures="")

    def step(self, step: int, loss: float) -> None:
        self._loss = f"loss {loss:.4g}"
        self._show(step)

    def record(self, row: dict[str, Any]) -> None:
        shown = [("λ", row["lambda_max"], "{:.4g}"), ("cos", row["alignment"], "{:.2f}")]
        shown.append(("val", row["val_accuracy"], "{:.1%}"))
        self._tracked = "".join(f" {k} {f.format(v)}" for k, v, f in shown if v is not None)
        self._show(row["step"])

    def _show(self, step: int) -> None:
        assert self._task is not None
        figures = f"{self._loss}{self._tracked}".strip()
        self._progress.update(self._task, completed=step, figures=figures)


FIGURES: tuple[tuple[str, str, str], ...] = (
    ("λ_max (probe batch)", "lambda_max", "{:.5g}"),
    ("|cos(ĝ, v₁)| (probe batch)", "alignment", "{:.4f}"),
    ("probe loss", "probe_loss", "{:.4f}"),
    ("validation loss", "val_loss", "{:.4f}"),
    ("validation accuracy", "val_accuracy", "{:.2%}"),
)
"""The summary table's rows: label, metric field, format."""


def seconds_per_step(rows: list[dict[str, Any]]) -> float | None:
    """Mean wall time of a training step (tracking excluded) over the recorded rows."""
    total = steps = 0.0
    for before, row in itertools.pairwise(rows):
        if row["step_seconds"] is not None:
            total += row["step_seconds"] * (row["step"] - before["step"])
            steps += row["step"] - before["step"]
    return total / steps if steps else None


def summary(outcome: Outcome, folder: RunDir, config: RunConfig) -> dict[str, Any]:
    """The run's outcome as a JSON-ready document: status, where, and the first and last rows."""
    return {
        "status": outcome.status,
        "run": str(folder.path),
        "checkpoint": str(outcome.checkpoint / MODEL),
        "step": outcome.step,
        "total_steps": outcome.total_steps,
        "optimizer": config.optimizer,
        "seconds_per_step": seconds_per_step(outcome.rows),
        "before": outcome.rows[0] if outcome.rows else None,
        "after": outcome.rows[-1] if outcome.rows else None,
    }


def _table(doc: dict[str, Any]) -> Table:
    before, after = doc["before"], doc["after"]
    table = Table(
        title=f"sharpscope finetune: {doc['optimizer']}, {doc['step']} steps",
        title_justify="left",
    )
    table.add_column("figure", style="bold")
    table.add_column(f"before (step {before['step']})", justify="right")
    table.add_column(f"after (step {after['step']})", justify="right")
    for label, key, form in FIGURES:
        if before[key] is not None or after[key] is not None:
            cells = ["—" if r[key] is None else form.format(r[key]) for r in (before, after)]
            table.add_row(label, *cells)
    return table


def _report(
    outcome: Outcome, folder: RunDir, config: RunConfig, stop: StopRequest, json_out: bool
) -> None:
    """Print the summary (rank 0) or the reason the run ended early, and exit with its code."""
    if outcome.status == "diverged":
        raise fail(
            f"{outcome.problem}: training stopped; the last good checkpoint is "
            f"{outcome.checkpoint} (fine-tune again from its {MODEL} with a lower --lr)",
            everywhere=False,
        )
    if distributed.is_main():
        _summarise(outcome, folder, config, stop, json_out)
    if outcome.status == "stopped":
        raise typer.Exit(128 + (stop.signum or 0))


def _summarise(
    outcome: Outcome, folder: RunDir, config: RunConfig, stop: StopRequest, json_out: bool
) -> None:
    """The summary table (or JSON), or where a stopped run can continue."""
    doc = summary(outcome, folder, config)
    if json_out:
        print_json(json.dumps(doc, indent=2) + "\n")
    if outcome.status == "stopped":
        info(
            f"stopped by {stop.name or 'another rank'} at step {outcome.step}: checkpoint "
            f"{outcome.checkpoint}; continue with: sharpscope finetune --resume {folder.path}"
        )
    elif not json_out:
        stdout.print(_table(doc))
        per_step = doc["seconds_per_step"]
        timing = f", {1000 * per_step:.2f} ms per step" if per_step is not None else ""
        stdout.print(f"weights: {doc['checkpoint']}{timing}", markup=False, highlight=False)
