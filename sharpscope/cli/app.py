"""The ``sharpscope`` command: the Typer app, its global options, and its subcommands, each
imported only when it runs or shows its own help (so ``sharpscope --help`` and ``--version`` start
without importing torch)."""

from __future__ import annotations

import importlib
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from sharpscope.cli.help_format import PlainCommand, PlainGroup
from sharpscope.launch import launched_by_torchrun
from sharpscope.version import __version__


@dataclass(frozen=True)
class Subcommand:
    """Where a subcommand's function lives, and its one-line summary for the command list."""

    module: str
    function: str
    summary: str

    def load(self, name: str) -> Any:
        """The Click command Typer builds from the function."""
        app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        function = getattr(importlib.import_module(self.module), self.function)
        epilog = getattr(function, "epilog", None)
        app.command(name, cls=PlainCommand, epilog=epilog)(function)
        command = typer.main.get_command(app)
        command.name = name
        return command


COMMANDS: dict[str, Subcommand] = {
    "analyze": Subcommand(
        "sharpscope.cli.analyze",
        "analyze_command",
        "Hessian eigenvalues, trace, density and SAM alignment of a model.",
    ),
    "check": Subcommand(
        "sharpscope.cli.check",
        "check_command",
        "Gate a model on its sharpness in CI (exit 1 when flagged).",
    ),
    "finetune": Subcommand(
        "sharpscope.cli.finetune",
        "finetune_command",
        "Fine-tune with SGD, SAM, ASAM or Eigen-SAM, tracking λ_max.",
    ),
    "landscape": Subcommand(
        "sharpscope.cli.landscape",
        "landscape_command",
        "Loss on a line and a 2-D grid around the weights (PNG and JSON).",
    ),
    "config": Subcommand(
        "sharpscope.cli.config_command",
        "config_command",
        "Every setting of a command: config key, default, meaning.",
    ),
    "demo": Subcommand(
        "sharpscope.cli.demo",
        "demo_command",
        "Train an MLP on the bundled digits and analyze it (seconds).",
    ),
}
"""Name -> subcommand, in the order ``--help`` lists them."""


_CLICK_ERROR: type[Exception] = next(
    k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException"
)
"""Click's base exception, as the Click that Typer runs on defines it (its own copy since 0.29)."""


def warning_line(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """``warnings.showwarning`` for the command line: ``warning: message`` as one line on stderr,
    without the file, line number and source line that Python adds."""
    typer.echo("warning: " + " ".join(str(message).split()), err=True)


def usage_error_line(exc: Any) -> str:
    """A usage error (unknown option or command, missing argument, bad value) as one line."""
    ctx = getattr(exc, "ctx", None)
    hint = f"; see {ctx.command_path} --help" if ctx is not None else ""
    return "error: " + " ".join(exc.format_message().split()).rstrip(".") + hint


class LazyCommands(PlainGroup):
    """A group whose subcommands are imported when resolved; its command list uses summaries.
    A usage error anywhere below it is one ``error:`` line on stderr (exit 2), as every other
    refusal is, not Click's usage box; a warning is one ``warning:`` line."""

    _listing = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands.update({name: self._summary(name) for name in COMMANDS})

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:
            return self._summary(cmd_name)
        return COMMANDS[cmd_name].load(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = warning_line
                code = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help, as Click shows it
                exc.show()  # type: ignore[attr-defined]
            else:
                typer.echo(usage_error_line(exc), err=True)
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    @staticmethod
    def _summary(name: str) -> TyperCommand:
        """A stand-in that only names the command and says what it does."""
        return TyperCommand(name, help=COMMANDS[name].summary)


app = typer.Typer(
    name="sharpscope",
    help="How sharp is your PyTorch model? Hessian spectra, SAM alignment and Eigen-SAM.",
    cls=LazyCommands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog="Exit codes: 0 done; 1 check flagged the model; 2 bad input or an error (one line on "
    "stderr, --debug for the traceback); 130 interrupted (Ctrl-C); 143 finetune stopped by "
    "SIGTERM. Start with: sharpscope demo",
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


def main() -> None:
    """Console-script entry point; under torchrun the process ends by
    :func:`sharpscope.distributed.exit_now`."""
    if not launched_by_torchrun():
        app()
        return
    from sharpscope import distributed  # torch: only where torchrun started the process

    try:
        app()
    except SystemExit as done:
        distributed.exit_now(done.code)
    except BaseException:  # --debug lets errors through: show them, then end the same way
        traceback.print_exc()
        distributed.exit_now(1)
    distributed.exit_now(0)
