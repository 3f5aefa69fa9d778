"""A fine-tuning run's settings are declared once (RunConfig, with the optimizer's settings it
extends): RunOptions, finetune's options and config keys, the flag names of its errors and the
stored config.json all come from those declarations, and the config.json of earlier versions
still loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_cli import one_error_line
from typer.testing import CliRunner

from sharpscope.cli import declarations
from sharpscope.cli.app import app
from sharpscope.cli.declarations import Command, Part
from sharpscope.cli.flags import as_flags
from sharpscope.cli.generate import keys
from sharpscope.errors import InputError
from sharpscope.settings import declared, fallbacks, optional_settings, setting
from sharpscope.training.options import TRACK, OptimizerSettings
from sharpscope.training.run_config import RunConfig, RunOptions
from sharpscope.training.run_dir import CONFIG, RunDir

FIRST = (
    *("checkpoint", "checkpoint_sha256", "model", "data", "split", "val_data", "loss"),
    *("optimizer", "lr", "momentum", "weight_decay", "rho", "alpha", "eig_every", "eig_steps"),
    *("schedule", "batch_size", "seed", "dtype", "probe_size", "track_iters", "steps", "epochs"),
    *("track_every", "save_every", "keep", "device"),
)
"""The keys of the first config.json, in the order it wrote them: each one is required."""
ADDED = (
    *("per_rank_sam", "text_field", "label_field", "max_length", "params", "freeze", "layout"),
    *("curvature", "precision"),
)
"""The keys added since, in the order the config.json of sharpscope 0.x before issue 22 wrote
them (after :data:`FIRST`), and what a run did before each existed."""
BEFORE = dict(
    **dict(per_rank_sam=False, text_field="text", label_field="label", max_length=None),
    **dict(params=None, freeze=None, layout="safetensors", curvature="hessian"),
    precision="float32",
)
"""What a run did before each key of :data:`ADDED` existed."""
SINCE_22 = ("track_measure", "backend", "auto_backend", "fsdp")
"""Keys added after issue 22: configs without them load as runs that tracked λ_max alone, by
double backward, unsharded."""


def earlier_format(config: RunConfig, keys: tuple[str, ...]) -> str:
    """``config`` as the config.json of an earlier version with ``keys`` wrote it."""
    stored = json.loads(config.to_json())
    return json.dumps({key: stored[key] for key in keys}, indent=2) + "\n"


def run_config(**changes: Any) -> RunConfig:
    settings = {**fallbacks(RunOptions), "data": "digits", "rho": 0.05, "epochs": 2, **changes}
    return RunConfig(checkpoint="start.safetensors", checkpoint_sha256="ab", model="{}", **settings)


def test_run_options_are_the_run_config_s_settings_each_optional():
    stored = {f.name for f in fields(RunConfig)}
    assert stored == set(FIRST) | set(ADDED) | set(SINCE_22)  # no key renamed: earlier ones load
    assert [d.name for d in declared(RunOptions)] == [d.name for d in declared(RunConfig)]
    derived = {"checkpoint", "checkpoint_sha256", "model", "layout", "auto_backend"}  # no option
    assert {d.name for d in declared(RunConfig)} == stored - derived
    assert RunOptions.full is RunConfig and RunOptions().given() == {}
    assert {d.name for d in declared(OptimizerSettings)} < {d.name for d in declared(RunConfig)}
    assert isinstance(run_config(), OptimizerSettings)  # what build_optimizer takes


@pytest.mark.parametrize("keys", [FIRST + ADDED, FIRST], ids=["before-22", "first"])
def test_earlier_config_files_load(keys: tuple[str, ...]):
    config = run_config(optimizer="eigen-sam", lr=0.05, **BEFORE)
    text = earlier_format(config, keys)
    assert list(json.loads(text)) == list(keys)
    assert RunConfig.from_json(text, "c.json") == config


@pytest.mark.parametrize("missing", ["lr", "optimizer", "seed", "data", "steps"])
def test_a_config_without_a_first_key_is_refused(missing: str):
    stored = json.loads(run_config().to_json())
    del stored[missing]
    with pytest.raises(InputError, match=r"c\.json is not a sharpscope fine-tuning config"):
        RunConfig.from_json(json.dumps(stored), "c.json")


def test_the_optimizer_s_settings_are_checked_where_they_are_declared():
    values = dict(lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.05, alpha=0.2, seed=0)
    with pytest.raises(InputError, match=r"^`eig_every` must be positive, got 0"):
        OptimizerSettings(optimizer="eigen-sam", eig_every=0, eig_steps=5, **values)
    with pytest.raises(InputError, match="unknown `optimizer` 'adam'"):
        OptimizerSettings(optimizer="adam", eig_every=1, eig_steps=5, **values)


def finetune(finetune_files: dict[str, Path], *extra: object) -> None:
    """An Eigen-SAM run of the tiny MLP in process: small batches, frequent checkpoints."""
    args = [
        *("finetune", str(finetune_files["checkpoint"]), "--data", str(finetune_files["data"])),
        *("--optimizer", "eigen-sam", "--eig-every", "5", "--batch-size", "32", "--lr", "0.05"),
        *("--probe-size", "64", "--track-iters", "10", "--save-every", "5", "--device", "cpu"),
        *("--quiet", *map(str, extra)),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    _, folder = RunDir(run).latest()  # type: ignore[misc]
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("keys", [FIRST + ADDED, FIRST], ids=["before-22", "first"])
def test_a_run_folder_of_an_earlier_version_resumes_exactly(
    keys: tuple[str, ...], finetune_files: dict[str, Path], tmp_path: Path
):
    """A run whose config.json an earlier version wrote (flat keys in its order; the first format
    without the keys added since) resumes to the weights of the same run made in one go."""
    finetune(finetune_files, "--steps", 16, "--out", tmp_path / "straight")
    run = tmp_path / "run"
    finetune(finetune_files, "--steps", 8, "--out", run)
    config = RunDir(run).read_config()
    (run / CONFIG).write_text(earlier_format(config, keys), encoding="utf-8")
    finetune(finetune_files, "--resume", run, "--steps", 16)
    assert RunDir(run).read_config() == replace(config, steps=16)
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(run)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


# --- one declaration, everywhere -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WithDummy(RunConfig):
    """RunConfig with one more declared setting, and nothing else."""

    dummy_knob: int = setting(7, help="A dummy setting for the test.", panel=TRACK)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dummy_knob < 0:
            raise InputError(f"`dummy_knob` must not be negative, got {self.dummy_knob}")


@optional_settings(WithDummy)
class DummyOptions(RunOptions):
    """The settings of :class:`WithDummy` as a caller gives them (RunOptions' own derivation)."""


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """``finetune`` declaring :class:`DummyOptions` where it declared RunOptions, and a run that
    stores its settings and stops where training would start; the run folders it wrote."""
    parts = declarations.COMMANDS["finetune"].parts
    changed = tuple(Part(DummyOptions) if p.settings is RunOptions else p for p in parts)
    monkeypatch.setitem(declarations.COMMANDS, "finetune", Command(changed))
    (tmp_path / ".git").mkdir()  # no config file from above
    monkeypatch.chdir(tmp_path)
    folders: list[Path] = []

    def run_instead(folder: RunDir, config: RunConfig, inputs, resume_from, watch):
        folder.write_config(config)  # as the run does first
        folders.append(folder.path)
        raise InputError("not trained")

    monkeypatch.setattr("sharpscope.training.run.finetune", run_instead)  # imported as it runs
    return folders


def test_a_declared_run_setting_is_everywhere(
    dummy: list[Path], finetune_files: dict[str, Path], tmp_path: Path
):
    assert "dummy-knob" in keys(declarations.COMMANDS["finetune"])  # a config-file key
    assert as_flags("`dummy_knob` must not be negative") == "--dummy-knob must not be negative"
    runner = CliRunner()
    listing = runner.invoke(app, ["config", "finetune"]).stdout
    assert "dummy-knob = 7" in listing and "A dummy setting for the test." in listing
    assert "--dummy-knob" not in runner.invoke(app, ["finetune", "--help"]).stdout  # expert
    start = [str(finetune_files["checkpoint"]), "--data", str(finetune_files["data"]), "-q"]
    refused = runner.invoke(app, ["finetune", *start, "--set", "dummy-knob=-1"])
    one_error_line(refused, "--dummy-knob must not be negative")  # its check, its flag
    (tmp_path / "sharpscope.toml").write_text("[finetune]\ndummy-knob = 8\n", encoding="utf-8")
    given = ([], ["--set", "dummy-knob=9"], ["--dummy-knob", "10"])
    for number, extra in enumerate(given):
        out = ["--out", str(tmp_path / f"run{number}")]
        one_error_line(runner.invoke(app, ["finetune", *start, *out, *extra]), "not trained")
    stored = [json.loads((folder / CONFIG).read_text()) for folder in dummy]
    assert [s["dummy_knob"] for s in stored] == [8, 9, 10]  # the file, --set, the flag
    assert WithDummy.from_json((dummy[0] / CONFIG).read_text(), "c.json").dummy_knob == 8
