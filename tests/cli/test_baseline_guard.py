"""``sharpscope check --baseline`` refuses a baseline it cannot compare with: one of other analysed
parameters, one measured on other data (unless ``--allow-different-data``), and one it cannot
read, each with one line that names the difference or says how to make a new baseline."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from test_check import check, verdict, write
from tiny_cli import FAST, make_checkpoint, one_error_line

from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.data import load_data
from sharpscope.io.models import ModelSpec, build_model

RELATIVE = ["--max-increase", "10%"]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty repository folder (no config file) and outside GitHub Actions."""
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """A checkpoint, its report and the baseline written from it by ``--update-baseline``."""
    folder = tmp_path_factory.mktemp("guard")
    checkpoint = make_checkpoint(folder)
    baseline = folder / "base.json"
    result = check(checkpoint, *FAST, "--baseline", baseline, "--update-baseline", "--json")
    assert result.exit_code == 0, result.output
    return checkpoint, baseline, json.loads(baseline.read_text(encoding="utf-8"))


@pytest.fixture
def base(made: tuple[Path, Path, dict[str, Any]]) -> dict[str, Any]:
    """A fresh copy of the baseline report, to edit."""
    return copy.deepcopy(made[2])


def test_the_report_says_what_was_analysed_and_on_which_data(base):
    data = base["inputs"]["data"]
    assert len(data["fingerprint"]) == 16 and data["num_samples"] == 64
    assert data["split_size"] == 1437  # the digits train split, of which 64 were analysed
    tensors = [(p["name"], tuple(p["shape"])) for p in base["results"]["parameters"]]
    assert tensors == [("1.weight", (16, 64)), ("1.bias", (16,)), ("3.weight", (10, 16)),
                       ("3.bias", (10,))]  # fmt: skip
    assert base["results"]["num_params"] == 16 * 64 + 16 + 10 * 16 + 10


def test_the_same_checkpoint_and_settings_pass(made):
    checkpoint, baseline, _ = made
    result = check(checkpoint, *FAST, "--baseline", baseline, *RELATIVE, "--json")
    assert result.exit_code == 0, result.output
    assert {c["status"] for c in verdict(result)["checks"]} == {"pass"}
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--samples", "32"], ["--samples 64 vs 32", "--data fingerprint"]),
        (["--seed", "1"], ["--seed 0 vs 1", "--data fingerprint"]),
        (["--rho", "0.1"], ["--rho 0.05 vs 0.1"]),
        (["--dtype", "float64"], ["--dtype float32 vs float64"]),
        (["--loss", "mse"], ["--loss cross-entropy vs mse"]),
        (["--reduction", "sum"], ["--reduction mean vs sum"]),
        (["--split", "test"], ["--data fingerprint"]),
    ],
)
def test_a_baseline_measured_on_other_data_is_refused(made, args, words):
    checkpoint, baseline, _ = made
    run = [checkpoint, *FAST, *args]  # the last of a repeated option wins
    refused = check(*run, "--baseline", baseline, *RELATIVE)
    one_error_line(refused, "measured on other data", *words, "--allow-different-data")
    allowed = check(*run, "--baseline", baseline, *RELATIVE, "--allow-different-data", "--json")
    assert verdict(allowed)["checks"], allowed.output
    (note,) = allowed.stderr.strip().splitlines()
    assert note.startswith("note: comparing with a baseline of other data: ") and words[0] in note


def test_the_same_data_from_another_file_passes(made, tmp_path):
    checkpoint, baseline, _ = made
    digits = load_data("digits", split="train")
    copied = tmp_path / "val.npz"
    numpy.savez(copied, x_train=digits.inputs.numpy(), y_train=digits.targets.numpy())
    args = [checkpoint, *FAST, "--data", copied, "--baseline", baseline, *RELATIVE, "--json"]
    result = check(*args)
    assert result.exit_code == 0, result.output
    assert verdict(result)["report"]["data"]["spec"] == str(copied)


def test_another_model_factory_with_the_same_parameters_passes(made, base, tmp_path):
    checkpoint, _, _ = made
    base["inputs"]["model"]["spec"] = {"target": "my_models:TinyMLP", "args": {}}
    result = check(checkpoint, *FAST, "--baseline", write(tmp_path / "b.json", base), *RELATIVE)
    assert result.exit_code == 0, result.output


def test_a_baseline_of_other_parameters_is_refused_naming_the_first_difference(made, tmp_path):
    _, baseline, _ = made
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (17,)})
    wider = tmp_path / "wider.safetensors"
    save_checkpoint(wider, build_model(spec), spec)
    result = check(wider, *FAST, "--baseline", baseline, *RELATIVE)
    one_error_line(
        result,
        "the baseline analysed 1,210 parameters in 4 tensors and this report 1,285 in 4",
        "first difference: 1.weight (16, 64) vs (17, 64)",
        "--update-baseline",
    )
    assert "--allow-different-data" not in result.stderr  # no opt-out: a meaningless comparison


@pytest.mark.parametrize(
    ("edit", "difference"),
    [
        (lambda ps: ps.pop(), "3.bias (10,) is not in the baseline"),
        (
            lambda ps: ps.append({"name": "4.scale", "shape": []}),
            "4.scale () is not in this report",
        ),
        (lambda ps: ps[0].update(name="0.weight"), "0.weight (16, 64) is not in this report"),
    ],
)
def test_a_tensor_only_one_side_has_is_named(made, base, tmp_path, edit, difference):
    checkpoint, _, _ = made
    edit(base["results"]["parameters"])
    result = check(checkpoint, *FAST, "--baseline", write(tmp_path / "b.json", base), *RELATIVE)
    one_error_line(result, f"first difference: {difference}")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", ["not valid JSON", "remove this one first", "--update-baseline"]),
        (
            '{"mine": true}',
            ["not a sharpscope report", "remove this one first", "--update-baseline"],
        ),
        (None, ["schema_version 1", "this sharpscope reads version 2", "--update-baseline"]),
        ("", ["not valid JSON", "--update-baseline"]),
    ],
)
def test_an_unusable_baseline_says_how_to_make_a_new_one(made, tmp_path, content, words):
    checkpoint, _, report = made
    bad = tmp_path / "base.json"
    old = {**report, "schema_version": 1}
    bad.write_text(json.dumps(old) if content is None else content, encoding="utf-8")
    result = check(checkpoint, *FAST, "--baseline", bad, *RELATIVE)
    one_error_line(result, str(bad), *words)


def test_a_missing_baseline_says_how_to_make_it(made, tmp_path):
    checkpoint, _, _ = made
    result = check(checkpoint, *FAST, "--baseline", tmp_path / "none.json", *RELATIVE)
    one_error_line(result, "none.json", "make the baseline with --update-baseline")


def test_update_baseline_replaces_a_report_of_another_version(made, tmp_path):
    checkpoint, _, report = made
    old = write(tmp_path / "base.json", {**report, "schema_version": 1})
    result = check(checkpoint, *FAST, "--baseline", old, "--update-baseline")
    assert result.exit_code == 0, result.output
    assert json.loads(old.read_text(encoding="utf-8"))["schema_version"] == 2
    assert check(checkpoint, *FAST, "--baseline", old, *RELATIVE).exit_code == 0
