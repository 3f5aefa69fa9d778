"""``sharpscope finetune``: fine-tune a checkpoint with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max
and the SAM alignment, with checkpoints that resume exactly (docs/finetune.md). torch is imported
when it runs, not for its help."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sharpscope.cli.common import command_scope, fail, info, print_json, set_threads, stderr, stdout
from sharpscope.cli.flags import as_flags
from sharpscope.cli.generate import Values, declared_command
from sharpscope.io.load_spec import LoadSpec
from sharpscope.training.run_config import RunConfig, RunOptions

if TYPE_CHECKING:
    from sharpscope.analysis.plan import BackendChoice
    from sharpscope.training.run import Outcome
    from sharpscope.training.run_dir import RunDir
    from sharpscope.training.sharded_state import RankShare
    from sharpscope.training.signals import StopRequest


@declared_command("finetune")
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
    *,
    settings: Values,
) -> None:
    """Fine-tune a checkpoint with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max and |cos(ĝ, v₁)|.
    Checkpoints, metrics and training.png go to the --out folder; --resume continues a run from
    its last checkpoint, bit-identically on the CPU. Under torchrun the ranks train with
    DistributedDataParallel on shares of each batch and rank 0 writes the run (--fsdp: sharded with
    FSDP2, checkpoints written by every rank).

    \b
    Examples (the checkpoint is the one `sharpscope demo` writes):
      sharpscope finetune sharpscope-demo/digits-mlp.safetensors --data digits \\
          --optimizer eigen-sam --lr 0.05 --epochs 5 --out runs/esam
      sharpscope finetune --resume runs/esam --epochs 10
      torchrun --nproc-per-node 2 -m sharpscope finetune \\
          sharpscope-demo/digits-mlp.safetensors --data digits --optimizer sam

    Exit codes: 0 the run finished; 2 bad options or inputs, or a diverged loss (the last good
    checkpoint is kept); 130 stopped by SIGINT (Ctrl-C) and 143 by SIGTERM, a checkpoint saved
    first (continue with --resume DIR).
    """
    out, resume, model = settings["out"], settings["resume"], settings["model"]
    trust_code = settings["trust_code"]
    with command_scope(settings["debug"], settings["dist_timeout"]):
        from sharpscope import distributed  # torch, from here on
        from sharpscope.cli.loading import data_fingerprint, load_inputs
        from sharpscope.io.models import ModelSpec, parse_model_args
        from sharpscope.io.pretrained import tokenizer_files
        from sharpscope.report.plan_line import backend_clause, sharded_clause
        from sharpscope.report.training_plot import plot_training
        from sharpscope.report.training_progress import TrainingProgress
        from sharpscope.training.plan import default_out, new_run, resume_run, validation_data
        from sharpscope.training.run import Inputs, Watch, finetune
        from sharpscope.training.run_dir import PLOT
        from sharpscope.training.selection import split_globs
        from sharpscope.training.signals import StopRequest

        options = settings.build(
            RunOptions,
            params=split_globs(settings["params"]),
            freeze=split_globs(settings["freeze"]),
        )
        fresh = default_out()  # a collective: on every rank, before anything can fail
        with distributed.together("preparing the run"):
            if resume is None:
                plan = new_run(checkpoint, options, out or fresh, settings["force"])
            else:
                model_args = parse_model_args(settings["model_args"] or [])
                given = ModelSpec(model, model_args) if model else None
                plan = resume_run(
                    resume,
                    options,
                    out=out,
                    checkpoint=checkpoint,
                    model=given,
                    trust_code=trust_code,
                )
        set_threads(settings["threads"])
        run = plan.config
        load = LoadSpec(
            plan.weights,
            model=model,  # on a resume, checked to be the run's own
            model_args=settings["model_args"],
            trust_pickle=settings["trust_pickle"],
            trust_code=trust_code,
            state_prefix=settings["state_prefix"] if plan.resume_from is None else None,
            base=settings["base"],
            input_style="kwargs",  # the training loop passes a mapping's fields as keywords
            **run.loading(),  # data, split, batch_size, seed, text and loss, device, dtype
        )
        # a folder run's step folders carry the tokenizer; else the folder it started from
        tokenizer = None if run.layout == "pretrained" else Path(run.checkpoint)
        loaded = load_inputs(load, tokenizer=tokenizer, shard=True, fsdp=run.fsdp)
        pretrained = loaded.checkpoint.format in ("pretrained", "adapter")  # written as folders
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
        shown = not settings["quiet"] and main and sys.stderr is not None

        def chose(choice: BackendChoice) -> None:
            if shown:
                info(as_flags(f"plan: {backend_clause(choice)}"))

        def sharded(share: RankShare) -> None:
            if shown:
                info(as_flags(sharded_clause(share)))

        with StopRequest() as stop, TrainingProgress(stderr, shown) as progress:
            watch = (
                Watch(progress.started, progress.step, progress.record, stop, chose, sharded)
                if main
                else Watch(should_stop=stop)
            )
            outcome = finetune(plan.folder, config, inputs, plan.resume_from, watch)
        if main:
            plot = plan.folder.path / PLOT
            title = f"{config.optimizer} ({config.precision}) on {config.data}"
            plot_training(outcome.rows, plot, f"{title}, λ_max of the {config.curvature}")
            info(f"wrote {plot}")
        _report(outcome, plan.folder, config, stop, settings["json_out"])


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
