"""Settings declared once (sharpscope.settings, sharpscope.cli.declarations): each reaches the
library from its flag, from ``--set`` and from its command's config-file table, and a setting
added to one declaration shows up in the command line, the config keys, the error flag names and
the report without another edit."""

from __future__ import annotations

import doctest
import importlib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from test_startup import run_fresh
from tiny_cli import FAST, make_checkpoint, one_error_line
from typer.testing import CliRunner

import sharpscope.cli.analyze as analyze_module
import sharpscope.cli.check as check_module
import sharpscope.cli.landscape as landscape_module
from sharpscope.analysis.config import HESSIAN, AnalyzeConfig
from sharpscope.analysis.landscape_config import LandscapeConfig
from sharpscope.cli import declarations
from sharpscope.cli.app import COMMANDS, app
from sharpscope.cli.declarations import Command, Part
from sharpscope.cli.flags import as_flags
from sharpscope.cli.generate import keys
from sharpscope.errors import InputError
from sharpscope.io.load_spec import LoadSpec
from sharpscope.settings import setting

NOT_OPTIONS = {"trace_tol", "trace_samples", "density_vectors", "density_iter"}
"""AnalyzeConfig fields no command sets (the trace's and density's precision)."""
NOT_CHECKED = {"density", "per_layer", "slices", "fsdp"}
"""Fields ``check`` leaves at their defaults: it gates no density, per-layer or slice figure, and
runs whole on every rank."""
ALONE = {"fsdp"}
"""Fields whose option refuses most others, so not set with them here (``--fsdp``: tested in
tests/distributed/test_fsdp_analyze.py)."""

SHARED: dict[str, tuple[str, ...]] = {
    "--top-k": ("3",),
    "--method": ("power",),
    "--tol": ("1e-05",),
    "--max-iter": ("17",),
    "--max-basis": ("9",),
    "--basis-device": ("host",),
    "--no-trace": (),
    "--shards": ("5",),
    "--bias": (),
    "--params": ("a.*",),
    "--exclude": ("a.b*",),
    "--batch-stats": (),
    "--micro-batch": ("6",),
    "--gradient-checkpointing": (),
    "--backend": ("forward-over-reverse",),
    "--curvature": ("ggn",),
    "--rho": ("0.07",),
    "--alpha": ("0.3",),
    "--seed": ("4",),
    "--adaptive-sharpness": ("average",),
    "--adaptive-norm": ("linf",),
    "--adaptive-rho": ("0.3",),
    "--adaptive-steps": ("7",),
    "--no-adaptive-scale": (),
    "--no-critical-sharpness": (),
    "--model": ("mlp",),
    "--model-arg": ("hidden=(8,)",),
    "--trust-pickle": (),
    "--trust-code": (),
    "--state-prefix": ("net.",),
    "--split": ("test",),
    "--samples": ("7",),
    "--text-field": ("sentence1,sentence2",),
    "--label-field": ("class",),
    "--max-length": ("33",),
    "--batch-size": ("5",),
    "--loss": ("mse",),
    "--reduction": ("sum",),
    "--input-style": ("single",),
    "--device": ("cpu",),
    "--dtype": ("float64",),
}
"""A non-default value for every option analyze and check share (the old flags, hidden or not)."""
CONFIG = {
    **dict(k=3, method="power", tol=1e-5, max_iter=17, max_basis=9, trace=False, shards=5),
    **dict(basis_device="host"),
    **dict(bias=True),
    **dict(params=["a.*"], exclude=["a.b*"], batch_stats=True, backend="forward-over-reverse"),
    **dict(curvature="ggn", reduction="sum", micro_batch=6, gradient_checkpointing=True),
    **dict(rho=0.07, alpha=0.3, seed=4),
    **dict(adaptive_sharpness="average", adaptive_norm="linf", adaptive_rho=0.3),
    **dict(adaptive_steps=7, adaptive_scale=False),
    **dict(critical_sharpness=False),
}
LOADING = LoadSpec(
    Path("model.pt"),
    "digits",
    **dict(model="mlp", model_args=["hidden=(8,)"], trust_pickle=True, trust_code=True),
    **dict(split="test", state_prefix="net."),
    **dict(samples=7, batch_size=5, seed=4, loss="mse", device="cpu", dtype="float64"),
    **dict(reduction="sum", input_style="single"),
    **dict(text_field="sentence1,sentence2", label_field="class", max_length=33),
)


class Stop(InputError):
    """Raised by the stand-in analysis once the options have been captured."""


def cli(*args: Any, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, [*map(str, args)], env=env)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty repository folder, the current folder (no config file from above)."""
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch, repo: Path) -> dict[str, Any]:
    """Stand-ins for loading and analysis in analyze, check and landscape that record what they
    are given."""
    seen: dict[str, Any] = {}

    def load(spec: LoadSpec, **kwargs: Any) -> str:
        seen["load"] = spec
        return "loaded"

    def run(loaded: Any, config: Any, quiet: bool) -> None:
        seen["config"] = config
        raise Stop("stop")

    monkeypatch.setattr("sharpscope.cli.loading.load_inputs", load)  # imported as they run
    for module in (analyze_module, check_module):
        monkeypatch.setattr(module, "run_analysis", run)
    monkeypatch.setattr(landscape_module, "run_landscape", run)
    (repo / "model.pt").write_bytes(b"not a report")
    return seen


def _invoke(*args: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2 and "stop" in result.stderr, result.stderr


def _flat(options: dict[str, tuple[str, ...]]) -> list[str]:
    return [part for flag, values in options.items() for part in (flag, *values)]


def _expected(**extra: Any) -> AnalyzeConfig:
    return AnalyzeConfig(**CONFIG, **extra)


# --- every setting reaches the library -----------------------------------------------------------


def test_every_config_field_is_set_by_an_option_or_listed_as_not():
    """The values the commands below must reach differ from the defaults in every field but the
    listed ones."""
    defaults = AnalyzeConfig()
    for config, left in (
        (_expected(density=True, per_layer=True, slices=True), NOT_OPTIONS | ALONE),  # analyze
        (_expected(), NOT_OPTIONS | NOT_CHECKED),  # check
    ):
        changed = {
            f.name for f in fields(config) if getattr(config, f.name) != getattr(defaults, f.name)
        }
        assert changed == {f.name for f in fields(AnalyzeConfig)} - left


def test_analyze_forwards_every_option(captured, repo):
    extra = ["--density", "--per-layer", "--out", str(repo / "out")]
    _invoke("analyze", "model.pt", "--data", "digits", *_flat(SHARED), *extra, "--quiet")
    assert captured["config"] == _expected(density=True, per_layer=True, slices=True)
    assert captured["load"] == LOADING


def test_check_forwards_every_option(captured):
    _invoke("check", "model.pt", "--data", "digits", "--max-eigenvalue", "1", *_flat(SHARED))
    assert captured["config"] == _expected()
    assert captured["load"] == LOADING


def test_the_config_file_reaches_the_same_settings(captured, repo):
    keys = [f"{flag[2:]} = {_toml(values)}" for flag, values in SHARED.items() if values]
    keys += ["trace = false", "bias = true", "batch-stats = true", 'data = "digits"']
    keys += ["gradient-checkpointing = true"]
    keys += ["max-eigenvalue = 1", "adaptive-scale = false", "critical-sharpness = false"]
    keys.remove("model-arg = 'hidden=(8,)'")
    keys.remove("params = 'a.*'")
    keys.remove("exclude = 'a.b*'")
    keys += ["model-arg = ['hidden=(8,)']", "params = ['a.*']", "exclude = ['a.b*']"]
    (repo / "sharpscope.toml").write_text("\n".join(keys) + "\n", encoding="utf-8")
    _invoke("check", "model.pt", "--trust-pickle", "--trust-code")  # opt-ins: never from a file
    assert captured["config"] == _expected()
    assert captured["load"] == LOADING


def _toml(values: tuple[str, ...]) -> str:
    """A TOML value for an option's text: numbers as they are, anything else quoted."""
    (text,) = values
    try:
        float(text)
    except ValueError:
        return repr(text)
    return text


# --- --set and the per-command tables ------------------------------------------------------------


def test_set_and_the_command_table_reach_the_library(captured, repo):
    (repo / "sharpscope.toml").write_text(
        "max-eigenvalue = 1\n[analyze]\ntop-k = 3\nmethod = 'power'\nmodel-arg = ['hidden=(8,)']\n"
        "[landscape]\ngrid = 5\n",
        encoding="utf-8",
    )
    _invoke("analyze", "model.pt", "--data", "digits", "--set", "shards=0", "--set", "tol=1e-5")
    config = captured["config"]
    assert (config.k, config.method, config.shards, config.tol) == (3, "power", 0, 1e-5)
    assert captured["load"].model_args == ["hidden=(8,)"]
    _invoke("analyze", "model.pt", "--data", "digits", "-k", "4", "--set", "method=lanczos")
    assert (captured["config"].k, captured["config"].method) == (4, "lanczos")  # the line wins
    _invoke("landscape", "model.pt", "--data", "digits", "--set", "span=0.5", "--out", "o")
    assert captured["config"] == LandscapeConfig(grid=5, span=0.5)


def test_pyproject_command_tables(captured, repo):
    (repo / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.sharpscope.analyze]\nsamples = 9\nparams = ["fc.*"]\n',
        encoding="utf-8",
    )
    _invoke("analyze", "model.pt", "--data", "digits", "--set", "exclude=fc.bias")
    assert captured["load"].samples == 9
    assert (captured["config"].params, captured["config"].exclude) == (["fc.*"], ["fc.bias"])


def test_set_and_a_table_show_in_the_report(repo):
    checkpoint = make_checkpoint(repo)
    (repo / "sharpscope.toml").write_text("[analyze]\ntop-k = 1\n", encoding="utf-8")
    args = ["analyze", checkpoint, *FAST, "--set", "shards=0", "--set", "method=power"]
    result = cli(*[a for a in args if a not in ("--top-k", "2")], "--no-trace", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["inputs"]["config"]
    assert (config["k"], config["shards"], config["method"]) == (1, 0, "power")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "top-kk=3"], ["unknown key 'top-kk' for analyze", "did you mean 'top-k'"]),
        (["--set", "shards"], ["--set takes KEY=VALUE"]),
        (["--set", "shards=x"], ["--set shards", "must be an integer"]),
        (["--set", "trust-code=true"], ["unknown key 'trust-code'"]),  # an opt-in, never a key
        (["-k", "3", "--set", "top-k=3"], ["--top-k is given twice", "--set top-k"]),
        (["--set", "shards=0", "--set", "shards=2"], ["--set shards is given twice"]),
    ],
)
def test_bad_set_is_one_line_exit_2(captured, args, words):
    result = cli("analyze", "model.pt", "--data", "digits", *args)
    one_error_line(result, *words)
    assert "config" not in captured  # refused before anything ran


def test_an_unknown_key_in_a_command_table(captured, repo):
    path = repo / "sharpscope.toml"
    path.write_text("[landscape]\ngird = 5\n", encoding="utf-8")
    result = cli("landscape", "model.pt", "--data", "digits")
    one_error_line(result, str(path), "[landscape]", "unknown key 'gird'", "did you mean 'grid'")


@pytest.mark.parametrize("command", ["analyze", "check"])
def test_an_unknown_table(captured, repo, command):
    (repo / "sharpscope.toml").write_text("[analyse]\ntop-k = 5\n", encoding="utf-8")
    gate = ["--max-eigenvalue", "1"] if command == "check" else []
    result = cli(command, "model.pt", "--data", "digits", *gate)
    one_error_line(result, "unknown table [analyse]", "did you mean [analyze]?")


def test_code_from_a_searched_command_table_needs_trust(captured, repo):
    (repo / "sharpscope.toml").write_text("[analyze]\nloss = 'evil.py:loss'\n", encoding="utf-8")
    result = cli("analyze", "model.pt", "--data", "digits")
    one_error_line(result, "names code to run", "loss = 'evil.py:loss'", "--trust-code")
    assert "config" not in captured


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_fits_60_lines_at_100_columns(command):
    args = [command] if command else []
    result = cli(*args, "--help", env={"COLUMNS": "100", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 100, (command, len(lines))
    if command in declarations.COMMANDS:
        assert f"sharpscope config {command}" in result.stdout  # where the other settings are


@pytest.mark.parametrize("command", list(declarations.COMMANDS))
def test_config_lists_every_setting_and_help_the_common_ones(command):
    listing = cli("config", command).stdout
    shown = cli(command, "--help", env={"COLUMNS": "100"}).stdout
    for item in declarations.COMMANDS[command].declarations().values():
        assert item.option.message_flag in listing, item.name
        if item.option.in_file:
            assert f"  {item.option.key}" in listing, item.name
        listed = re.search(rf"│ {re.escape(item.option.flag)}\s", shown) is not None
        assert listed == item.option.common, item.name


@pytest.mark.integration
def test_config_and_a_bad_set_import_no_torch(tmp_path):
    assert run_fresh("config", "analyze")[:2] == ("", 0)
    loaded, code, stderr = run_fresh("analyze", "x.pt", "--data", "digits", "--set", "nope=1")
    assert (loaded, code) == ("", 2) and "unknown key 'nope'" in stderr


def test_config_of_an_unknown_command():
    one_error_line(cli("config", "analyse"), "unknown `command` 'analyse'")


# --- one declaration, everywhere -----------------------------------------------------------------


@dataclass(frozen=True)
class WithDummy(AnalyzeConfig):
    """AnalyzeConfig with one more declared setting, and nothing else."""

    dummy_knob: int = setting(7, help="A dummy setting for the test.", panel=HESSIAN)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dummy_knob < 0:
            raise InputError(f"`dummy_knob` must not be negative, got {self.dummy_knob}")


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``analyze`` declaring :class:`WithDummy` where it declared AnalyzeConfig."""
    parts = declarations.COMMANDS["analyze"].parts
    changed = tuple(Part(WithDummy) if p.settings is AnalyzeConfig else p for p in parts)
    monkeypatch.setitem(declarations.COMMANDS, "analyze", Command(changed))


def test_a_declared_setting_is_everywhere(dummy, repo):
    assert "dummy-knob" in keys(declarations.COMMANDS["analyze"])  # a config-file key
    assert "--set" in as_flags("`dummy_knob` and `overrides`")
    assert as_flags("`dummy_knob` must not be negative") == "--dummy-knob must not be negative"
    listing = cli("config", "analyze").stdout
    assert "dummy-knob = 7" in listing and "A dummy setting for the test." in listing
    assert "--dummy-knob" not in cli("analyze", "--help").stdout  # an expert setting
    checkpoint = make_checkpoint(repo)
    refused = cli("analyze", checkpoint, *FAST, "--set", "dummy-knob=-1")
    one_error_line(refused, "--dummy-knob must not be negative")  # its check, its flag
    (repo / "sharpscope.toml").write_text("[analyze]\ndummy-knob = 8\n", encoding="utf-8")
    for extra, value in (([], 8), (["--set", "dummy-knob=9"], 9), (["--dummy-knob", "10"], 10)):
        result = cli(
            "analyze", checkpoint, *FAST, "--no-trace", "--set", "shards=0", *extra, "--json"
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["inputs"]["config"]["dummy_knob"] == value


@pytest.mark.parametrize(
    "module",
    [
        "sharpscope.settings",
        "sharpscope.io.load_spec",
        "sharpscope.analysis.config",
        "sharpscope.analysis.gate",
        "sharpscope.analysis.landscape_config",
        "sharpscope.training.options",
        "sharpscope.training.run_config",
        "sharpscope.cli.generate",
    ],
)
def test_the_examples_run(module):
    """Each declaring module's docstring examples run as written."""
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, module
