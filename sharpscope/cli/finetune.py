"""``sharpscope finetune``: fine-tune a checkpoint with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max
and the SAM alignment, with checkpoints that resume exactly (docs/finetune.md). torch is imported
when it runs, not for its help."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sharpscope.choices import CURVATURE_NAMES
from sharpscope.cli import options as opt
from sharpscope.cli.common import (
    DistTimeout,
    command_scope,
    fail,
    info,
    print_json,
    set_threads,
    stderr,
    stdout,
)
from sharpscope.launch import DEFAULT_TIMEOUT_S
from sharpscope.training.options import (
    DEFAULT_EPOCHS,
    DEFAULT_RHO,
    DEFAULTS,
    MARKER,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    RunOptions,
)

if TYPE_CHECKING:
    from sharpscope.training.run import Outcome
    from sharpscope.training.run_config import RunConfig
    from sharpscope.training.run_dir import RunDir
    from sharpscope.training.signals import StopRequest

OPTIMIZE = "Optimizer"
TRACK = "Tracking"
SAVE = "Checkpoints"


def _setting(kind: type, help_text: str, panel: str, default: object) -> Any:
    """An option for a run setting: None when not given (a resumed run keeps its own), with a
    new run's ``default`` in its help."""
    option = typer.Option(
        help=f"{help_text} (default {default}).", rich_help_panel=panel, show_default=False
    )
    return Annotated[kind | None, option]


def _shared(option: Any, default: object) -> Any:
    """A loading option of :mod:`sharpscope.cli.options` as a run setting (see :func:`_setting`)."""
    info = copy.copy(option.__metadata__[0])
    info.help = f"{info.help.removesuffix('.')} (default {default})."
    info.show_default = False
    return Annotated[option.__origin__ | None, info]


def finetune_command(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="The checkpoint to start from (any format `analyze` reads; a save_pretrained "
            "folder needs no --model, and the run writes such folders); not needed with --resume.",
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
    split: _shared(opt.Split, DEFAULTS.split) = None,
    text_field: _shared(opt.TextField, DEFAULTS.text_field) = None,
    label_field: _shared(opt.LabelField, DEFAULTS.label_field) = None,
    max_length: opt.MaxLength = None,
    model: opt.Model = None,
    model_arg: opt.ModelArg = None,
    trust_pickle: opt.TrustPickle = False,
    trust_code: opt.TrustCode = False,
    state_prefix: opt.StatePrefix = None,
    loss: _shared(opt.Loss, DEFAULTS.loss) = None,
    optimizer: _setting(str, ", ".join(OPTIMIZERS), OPTIMIZE, DEFAULTS.optimizer) = None,
    lr: _setting(float, "Base learning rate", OPTIMIZE, DEFAULTS.lr) = None,
    momentum: _setting(
        float, "SGD momentum, also under SAM, ASAM and Eigen-SAM", OPTIMIZE, DEFAULTS.momentum
    ) = None,
    weight_decay: _setting(float, "SGD weight decay", OPTIMIZE, DEFAULTS.weight_decay) = None,
    rho: Annotated[
        float | None,
        typer.Option(
            help=f"Perturbation radius ρ; default {DEFAULT_RHO['sam']} (sam, eigen-sam), "
            f"{DEFAULT_RHO['asam']} (asam).",
            rich_help_panel=OPTIMIZE,
            show_default=False,
        ),
    ] = None,
    alpha: _setting(
        float, "Eigen-SAM's α, the weight of the eigenvector part", OPTIMIZE, DEFAULTS.alpha
    ) = None,
    per_rank_sam: Annotated[
        bool | None,
        typer.Option(
            "--per-rank-sam",
            help="Under torchrun: each rank perturbs with its own gradient (m-sharpness) instead "
            "of the averaged one.",
            rich_help_panel=OPTIMIZE,
            show_default=False,
        ),
    ] = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--params",
            help="Train only the parameters whose name matches this glob (repeatable or "
            "comma-separated, as for analyze), e.g. 'classifier.*'; default: all.",
            rich_help_panel=OPTIMIZE,
            show_default=False,
        ),
    ] = None,
    freeze: Annotated[
        list[str] | None,
        typer.Option(
            "--freeze",
            help="Do not train the parameters whose name matches this glob (repeatable or "
            "comma-separated), e.g. 'bert.embeddings.*'.",
            rich_help_panel=OPTIMIZE,
            show_default=False,
        ),
    ] = None,
    eig_every: _setting(
        int, "Eigen-SAM: refresh the eigenvector every k steps", OPTIMIZE, DEFAULTS.eig_every
    ) = None,
    eig_steps: _setting(
        int, "Eigen-SAM: Hessian-vector products per refresh", OPTIMIZE, DEFAULTS.eig_steps
    ) = None,
    schedule: _setting(
        str, f"Learning-rate schedule: {', '.join(SCHEDULES)}", OPTIMIZE, DEFAULTS.schedule
    ) = None,
    precision: _setting(
        str,
        f"Training passes: {', '.join(PRECISIONS)} (bf16: bfloat16 autocast of float32 weights, "
        "whose gradients and λ_max products stay float32)",
        OPTIMIZE,
        DEFAULTS.precision,
    ) = None,
    batch_size: _shared(opt.BatchSize, DEFAULTS.batch_size) = None,
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
    track_every: _setting(
        int, "Record λ_max, alignment, loss and accuracy every N steps", TRACK, DEFAULTS.track_every
    ) = None,
    probe_size: _setting(
        int, "Samples in the fixed probe batch λ_max is measured on", TRACK, DEFAULTS.probe_size
    ) = None,
    track_iters: _setting(
        int,
        "Most Lanczos products per λ_max measurement (1: one product, the cheapest)",
        TRACK,
        DEFAULTS.track_iters,
    ) = None,
    curvature: _setting(
        str,
        f"The matrix whose λ_max is tracked: {', '.join(CURVATURE_NAMES)} (see analyze)",
        TRACK,
        DEFAULTS.curvature,
    ) = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder: checkpoints, metrics, training.png; default runs/finetune-<time>.",
            rich_help_panel=SAVE,
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help=f"Write a new run into a folder that holds other files (never over them: refused "
            f"if a name the run writes is there); the run marks its folder with {MARKER}.",
            rich_help_panel=SAVE,
        ),
    ] = False,
    save_every: _setting(
        int,
        "Write a checkpoint every N steps (and at the end or on a stop)",
        SAVE,
        DEFAULTS.save_every,
    ) = None,
    keep: _setting(int, "Keep the last N checkpoints", SAVE, DEFAULTS.keep) = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder from its last checkpoint, exactly; options not "
            "given are the run's own.",
            rich_help_panel=SAVE,
            show_default=False,
        ),
    ] = None,
    seed: _shared(opt.Seed, DEFAULTS.seed) = None,
    device: _shared(opt.Device, DEFAULTS.device) = None,
    dtype: _shared(opt.Dtype, DEFAULTS.dtype) = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the summary as JSON on stdout.", rich_help_panel=opt.RUN
        ),
    ] = False,
    dist_timeout: DistTimeout = DEFAULT_TIMEOUT_S,
    threads: opt.Threads = None,
    quiet: opt.Quiet = False,
    debug: opt.Debug = False,
) -> None:
    """Fine-tune a checkpoint with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max and |cos(ĝ, v₁)|.
    Checkpoints, metrics and training.png go to the --out folder; --resume continues a run from
    its last checkpoint, bit-identically on the CPU. Under torchrun the ranks train with
    DistributedDataParallel on shares of each batch and rank 0 writes the run.

    \b
    Examples (the checkpoint is the one `sharpscope demo` writes):
      sharpscope finetune sharpscope-demo/digits-mlp.safetensors --data digits \\
          --optimizer eigen-sam --lr 0.05 --epochs 5 --out runs/esam
      sharpscope finetune --resume runs/esam --epochs 10
      torchrun --nproc-per-node 2 -m sharpscope finetune \\
          sharpscope-demo/digits-mlp.safetensors --data digits --optimizer sam

    \b
    Exit codes:
      0    the run finished
      2    bad options or inputs, or a diverged loss (the last good checkpoint
           is kept)
      130  stopped by SIGINT (Ctrl-C): a checkpoint is saved first; continue
           with --resume DIR
      143  stopped by SIGTERM, the same way
    """
    with command_scope(debug, dist_timeout):
        from sharpscope import distributed  # torch, from here on
        from sharpscope.cli.loading import data_fingerprint, load_inputs
        from sharpscope.io.models import ModelSpec, parse_model_args
        from sharpscope.io.pretrained import tokenizer_files
        from sharpscope.report.training_plot import plot_training
        from sharpscope.report.training_progress import TrainingProgress
        from sharpscope.training.plan import default_out, new_run, resume_run, validation_data
        from sharpscope.training.run import Inputs, Watch, finetune
        from sharpscope.training.run_dir import PLOT
        from sharpscope.training.selection import split_globs
        from sharpscope.training.signals import StopRequest

        options = RunOptions(
            data=data,
            split=split,
            text_field=text_field,
            label_field=label_field,
            max_length=max_length,
            val_data=val_data,
            loss=loss,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            rho=rho,
            alpha=alpha,
            per_rank_sam=per_rank_sam,
            params=split_globs(params),
            freeze=split_globs(freeze),
            eig_every=eig_every,
            eig_steps=eig_steps,
            schedule=schedule,
            batch_size=batch_size,
            epochs=epochs,
            steps=steps,
            track_every=track_every,
            probe_size=probe_size,
            track_iters=track_iters,
            curvature=curvature,
            precision=precision,
            save_every=save_every,
            keep=keep,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        fresh = default_out()  # a collective: on every rank, before anything can fail
        with distributed.together("preparing the run"):
            if resume is None:
                plan = new_run(checkpoint, options, out or fresh, force)
            else:
                given = ModelSpec(model, parse_model_args(model_arg or [])) if model else None
                plan = resume_run(
                    resume,
                    options,
                    out=out,
                    checkpoint=checkpoint,
                    model=given,
                    trust_code=trust_code,
                )
        new = plan.resume_from is None
        set_threads(threads)
        loaded = load_inputs(
            plan.weights,
            plan.config.data,
            model=model,  # on a resume, checked to be the run's own
            model_args=model_arg,
            trust_pickle=trust_pickle,
            trust_code=trust_code,
            state_prefix=state_prefix if new else None,
            split=plan.config.split,
            batch_size=plan.config.batch_size,
            seed=plan.config.seed,
            text_field=plan.config.text_field,
            label_field=plan.config.label_field,
            max_length=plan.config.max_length,
            # a folder run's step folders carry the tokenizer; else the folder it started from
            tokenizer=None if plan.config.layout == "pretrained" else Path(plan.config.checkpoint),
            loss=plan.config.loss,
            input_style="kwargs",  # the training loop passes a mapping's fields as keywords
            device=plan.config.device,
            dtype=plan.config.dtype,
            shard=True,
        )
        pretrained = loaded.checkpoint.format == "pretrained"
        config, spec = plan.loaded(loaded.checkpoint.sha256, loaded.spec, pretrained)
        tokenizer_from = plan.weights if spec is None else None
        if tokenizer_from is not None:
            tokenizer_files(tokenizer_from)  # refuses links out of the folder before training
        with distributed.together("loading the validation data"):
            val = validation_data(config, loaded.data, loaded.text)
        if val is None and distributed.is_main():
            info(
                f"note: {loaded.data.source} has no held-out split, so nothing is validated; pass "
                "--val-data to validate"
            )
        if val is not None:
            distributed.check_same("validation data (--val-data)", data_fingerprint(val))
        inputs = Inputs(
            loaded.model,
            spec,
            loaded.loss_fn,
            loaded.data,
            val,
            loaded.device,
            loaded.dtype,
            tokenizer_from=tokenizer_from,
        )
        main = distributed.is_main()
        shown = not quiet and main and sys.stderr is not None
        with StopRequest() as stop, TrainingProgress(stderr, shown) as progress:
            watch = (
                Watch(progress.started, progress.step, progress.record, stop)
                if main
                else Watch(should_stop=stop)
            )
            outcome = finetune(plan.folder, config, inputs, plan.resume_from, watch)
        if main:
            plot = plan.folder.path / PLOT
            title = f"{config.optimizer} ({config.precision}) on {config.data}"
            plot_training(outcome.rows, plot, f"{title}, λ_max of the {config.curvature}")
            info(f"wrote {plot}")
        _report(outcome, plan.folder, config, stop, json_out)


def _report(
    outcome: Outcome, folder: RunDir, config: RunConfig, stop: StopRequest, json_out: bool
) -> None:
    """Print the summary (rank 0) or the reason the run ended early, and exit with its code."""
    from sharpscope import distributed
    from sharpscope.training.run_dir import model_path

    if outcome.status == "diverged":
        raise fail(
            f"{outcome.problem}: training stopped; the last good checkpoint is "
            f"{outcome.checkpoint} (fine-tune again from "
            f"{model_path(outcome.checkpoint, config.layout)} with a lower --lr)",
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
    from sharpscope.report.finetune_summary import summary, summary_table

    doc = summary(outcome, folder, config)
    if json_out:
        print_json(json.dumps(doc, indent=2) + "\n")
    if outcome.status == "stopped":
        info(
            f"stopped by {stop.name or 'another rank'} at step {outcome.step}: checkpoint "
            f"{outcome.checkpoint}; continue with: sharpscope finetune --resume {folder.path}"
        )
    elif not json_out:
        stdout.print(summary_table(doc))
        per_step = doc["seconds_per_step"]
        timing = f", {1000 * per_step:.2f} ms per step" if per_step is not None else ""
        stdout.print(f"weights: {doc['checkpoint']}{timing}", markup=False, highlight=False)
