"""What each command declares: the settings classes whose fields become its options, config keys
and report settings (:mod:`sharpscope.cli.generate` builds the command line from them), and the
settings of the command line itself (outputs, threads, the config file). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.analysis.gate import BaselineSettings, Thresholds
from sharpscope.analysis.landscape_config import LandscapeConfig
from sharpscope.io.load_spec import RUN, LoadSpec
from sharpscope.launch import DEFAULT_TIMEOUT_S
from sharpscope.settings import Declaration, declared, setting
from sharpscope.training.options import MARKER, SAVE
from sharpscope.training.run_config import RunOptions


def _json(text: str) -> Any:
    """``--json``: what the command prints as JSON on stdout (a choice made each time)."""
    return setting(False, help=text, flag="--json", common=True, panel=RUN, in_file=False)


@dataclass(frozen=True)
class Session:
    """How every command runs: threads, the process group's patience, progress, errors, and where
    its settings come from."""

    config: Path | None = setting(
        None,
        help="Settings file (default: the nearest sharpscope.toml or pyproject.toml). Found from "
        "here up to the repository root or your home (a pyproject.toml with \\[tool.sharpscope]); "
        "code specs in a file found so need --config or --trust-code.",
        common=True,
        panel=RUN,
        in_file=False,
    )
    overrides: list[str] | None = setting(
        None,
        help="Set any setting (repeatable; keys: sharpscope config COMMAND). The value is read as "
        "in a config file, e.g. --set shards=0.",
        flag="--set",
        metavar="KEY=VALUE",
        common=True,
        panel=RUN,
        in_file=False,
    )
    threads: int | None = setting(
        None,
        help="torch's intra-op CPU threads (per rank under torchrun). Default: torch's own (the "
        "cores, or OMP_NUM_THREADS); on a busy machine fewer can be faster.",
        panel=RUN,
        minimum=1,
    )
    dist_timeout: float = setting(
        DEFAULT_TIMEOUT_S,
        help="Under torchrun: seconds a collective may wait for the other ranks before failing.",
        panel=RUN,
        minimum=0.001,
    )
    quiet: bool = setting(
        False, help="Hide progress bars.", short="-q", common=True, panel=RUN, in_file=False
    )
    debug: bool = setting(False, help="Show tracebacks on errors.", panel=RUN, in_file=False)


@dataclass(frozen=True)
class AnalyzeOutputs:
    """Where ``analyze`` writes."""

    out: Path | None = setting(
        None,
        help="Also write report.json, eigenvectors and plots to this folder.",
        common=True,
        panel=RUN,
    )
    json_out: bool = _json("Print the report as JSON on stdout.")


@dataclass(frozen=True)
class CheckOutputs:
    """Where ``check`` writes."""

    json_out: bool = _json("Print the verdict, the checks and the figures as JSON on stdout.")
    junit: Path | None = setting(
        None,
        help="Also write the checks as JUnit XML to this file. One testcase per check.",
        common=True,
        panel=RUN,
    )


@dataclass(frozen=True)
class LandscapeOutputs:
    """Where ``landscape`` writes."""

    out: Path = setting(
        Path("landscape"),
        help="Folder for landscape.png and landscape.json.",
        common=True,
        panel=RUN,
    )
    force: bool = setting(
        False,
        help="Overwrite landscape.png and landscape.json in --out.",
        panel=RUN,
        in_file=False,
    )


@dataclass(frozen=True)
class FinetuneOutputs:
    """Where ``finetune`` writes, or the run it continues."""

    out: Path | None = setting(
        None,
        help="Run folder: checkpoints, metrics, training.png; default runs/finetune-<time>.",
        common=True,
        panel=SAVE,
    )
    force: bool = setting(
        False,
        help="Write a new run into a folder that holds other files (never over them: refused if "
        f"a name the run writes is there); the run marks its folder with {MARKER}.",
        panel=SAVE,
        in_file=False,
    )
    resume: Path | None = setting(
        None,
        help="Continue the run in this folder from its last checkpoint, exactly; options not "
        "given are the run's own.",
        common=True,
        panel=SAVE,
        in_file=False,
    )
    json_out: bool = _json("Print the summary as JSON on stdout.")


@dataclass(frozen=True)
class Part:
    """A settings class a command takes, less the fields it leaves at their defaults; ``shown``
    (when given) names the settings of this part that the command's ``--help`` lists, instead of
    the class's common ones."""

    settings: type
    without: tuple[str, ...] = ()
    shown: tuple[str, ...] | None = None

    def declarations(self) -> list[Declaration]:
        """The part's settings that the command line sets, each common as this command shows it."""
        found = []
        for item in declared(self.settings):
            if not item.option.cli or item.name in self.without:
                continue
            if self.shown is not None:
                option = replace(item.option, common=item.name in self.shown)
                item = replace(item, option=option)
            found.append(item)
        return found


@dataclass(frozen=True)
class Command:
    """The settings a command declares, in the order its help lists them. A name declared by
    several parts is one option, described by the first part that declares it, and sets the
    field of that name in every part."""

    parts: tuple[Part, ...]

    def declarations(self) -> dict[str, Declaration]:
        """Parameter name -> its declaration, for every setting the command line sets."""
        found: dict[str, Declaration] = {}
        for part in self.parts:
            for item in part.declarations():
                found.setdefault(item.name, item)
        return found

    def part(self, base: type) -> Part:
        """The part whose settings class is ``base`` or derived from it."""
        return next(p for p in self.parts if issubclass(p.settings, base))


_LOADED = ("model", "model_args", "trust_pickle", "trust_code", "state_prefix", "base")
"""The loading settings ``finetune`` takes as they are (the rest are run settings)."""

COMMANDS: dict[str, Command] = {
    "analyze": Command((Part(LoadSpec), Part(AnalyzeConfig), Part(AnalyzeOutputs), Part(Session))),
    "check": Command(
        (
            Part(Thresholds),
            Part(BaselineSettings),
            Part(LoadSpec, shown=("data", "model")),
            Part(AnalyzeConfig, without=("density", "per_layer"), shown=()),
            Part(CheckOutputs),
            Part(Session),
        )
    ),
    "landscape": Command(
        (Part(LoadSpec), Part(LandscapeConfig), Part(LandscapeOutputs), Part(Session))
    ),
    "finetune": Command(
        (
            Part(
                LoadSpec, without=tuple(d.name for d in declared(LoadSpec) if d.name not in _LOADED)
            ),
            Part(RunOptions),
            Part(FinetuneOutputs),
            Part(Session),
        )
    ),
}
"""Command name -> the settings it declares."""
