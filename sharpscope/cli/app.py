"""The ``sharpscope`` command: the Typer app and its global options."""

from __future__ import annotations

import traceback
from typing import Annotated

import typer

from sharpscope import __version__, distributed
from sharpscope.cli.analyze import analyze_command
from sharpscope.cli.check import check_command
from sharpscope.cli.demo import demo_command
from sharpscope.cli.finetune import finetune_command

app = typer.Typer(
    name="sharpscope",
    help="How sharp is your PyTorch model? Hessian spectra, SAM alignment and Eigen-SAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sharpscope {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    """How sharp is your PyTorch model? Hessian spectra, SAM alignment and Eigen-SAM."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


app.command("analyze")(analyze_command)
app.command("check")(check_command)
app.command("demo")(demo_command)
app.command("finetune")(finetune_command)


def main() -> None:
    """Console-script entry point; under torchrun the process ends by
    :func:`distributed.exit_now`."""
    if not distributed.launched_by_torchrun():
        app()
        return
    try:
        app()
    except SystemExit as done:
        distributed.exit_now(done.code)
    except BaseException:  # --debug lets errors through: show them, then end the same way
        traceback.print_exc()
        distributed.exit_now(1)
    distributed.exit_now(0)
