"""``sharpscope demo``: train a small model on the bundled digits data, then analyze it (torch is
imported when it runs, not for its help)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.cli.analyze import run_analysis
from sharpscope.cli.common import errors_as_exit, info, set_threads, stdout
from sharpscope.cli.declarations import Session
from sharpscope.cli.generate import option_of
from sharpscope.errors import InputError
from sharpscope.io.load_spec import LoadSpec
from sharpscope.report.table import print_report
from sharpscope.stopwatch import Stopwatch

CHECKPOINT = "digits-mlp.safetensors"
Seed = option_of(LoadSpec, "seed")
Threads = option_of(Session, "threads")
Quiet = option_of(Session, "quiet")
Debug = option_of(Session, "debug")


def _seconds(value: float) -> str:
    return f"{value:.2g} s" if value < 10 else f"{value:.0f} s"


def _timings_line(stages: dict[str, float], analysis: dict[str, float]) -> str:
    """``timings: train 1.1 s, ..., analyze 2.3 s (gradient 0.01 s, ...), write 0.4 s``: the demo's
    stages in order, the analysis's own stages (named as in report.json) after its total."""
    parts = []
    for name, seconds in stages.items():
        part = f"{name} {_seconds(seconds)}"
        if name == "analyze":
            part += f" ({', '.join(f'{k} {_seconds(v)}' for k, v in analysis.items())})"
        parts.append(part)
    return "timings: " + ", ".join(parts)


def demo_command(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the checkpoint, report and plots.")
    ] = Path("sharpscope-demo"),
    steps: Annotated[int, typer.Option(help="Training steps (Adam, batch 128).")] = 300,
    seed: Seed = 0,
    threads: Threads = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train an MLP on scikit-learn's digits (offline, seconds), save it, and analyze it.

    Writes the checkpoint, report.json, eigenvectors and plots to the --out folder.

    Examples:

        sharpscope demo

        sharpscope demo --out /tmp/demo --steps 600 --seed 1
    """
    with errors_as_exit(debug):
        if steps < 1:
            raise InputError(f"--steps must be at least 1, got {steps}")
        import torch

        from sharpscope.cli.loading import load_inputs
        from sharpscope.io.checkpoints import save_checkpoint
        from sharpscope.io.data import load_data
        from sharpscope.io.models import ModelSpec, build_model
        from sharpscope.report.outdir import check_out_dir, write_out_dir
        from sharpscope.training.fit import fit

        check_out_dir(out)
        set_threads(threads)
        torch.manual_seed(seed)
        spec = ModelSpec("mlp", {})
        model = build_model(spec)
        train = load_data("digits", split="train")
        watch = Stopwatch()
        with watch.stage("train"):
            losses = fit(model, train.inputs, train.targets, steps=steps, seed=seed)
        info(
            f"trained {spec.target} on digits: {steps} steps in "
            f"{watch.timings['train']:.1f} s, final minibatch loss {losses[-1]:.4f}"
        )
        checkpoint = out / CHECKPOINT
        with watch.stage("save"):
            save_checkpoint(checkpoint, model, spec)
        with watch.stage("load"):
            loaded = load_inputs(LoadSpec(checkpoint, "digits", seed=seed, samples=0, device="cpu"))
        config = AnalyzeConfig(seed=seed, density=True, slices=True)
        with watch.stage("analyze"):
            analysis, report = run_analysis(loaded, config, quiet)
        print_report(report, stdout)
        with watch.stage("write"):
            for path in write_out_dir(out, report, analysis, loaded.model):
                info(f"wrote {path}")
        info(_timings_line(watch.timings, analysis.timings))
        again = ["sharpscope", "analyze", str(checkpoint), "--data", "digits", "--samples", "0"]
        again += ["--density", "--out", str(out)] + (["--seed", str(seed)] if seed else [])
        stdout.print(
            f"\nThe same analysis again:\n  {shlex.join(again)}\n"
            "With your own files:\n"
            "  sharpscope analyze my_model.pt --model mypkg.models:make_net --data my_data.npz\n"
            "See `sharpscope analyze --help`.",
            markup=False,
            highlight=False,
        )
