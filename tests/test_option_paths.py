"""Every analysis setting and loading argument reaches the library from each command's options and
from the config file, by explicit forwarding: a new field or option that one path forgets fails
here."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sharpscope.cli.analyze as analyze_module
import sharpscope.cli.check as check_module
from sharpscope.analysis.analyze import AnalyzeConfig
from sharpscope.cli.app import app
from sharpscope.errors import InputError

NOT_OPTIONS = {"trace_tol", "trace_samples", "density_vectors", "density_iter"}
"""AnalyzeConfig fields no command sets (the trace's and density's precision)."""
NOT_CHECKED = {"density", "per_layer", "slices"}
"""Fields ``check`` leaves at their defaults: it gates no density, per-layer or slice figure."""

SHARED: dict[str, tuple[str, ...]] = {
    "--top-k": ("3",),
    "--method": ("power",),
    "--tol": ("1e-05",),
    "--max-iter": ("17",),
    "--max-basis": ("9",),
    "--no-trace": (),
    "--shards": ("5",),
    "--bias": (),
    "--params": ("a.*",),
    "--exclude": ("a.b*",),
    "--batch-stats": (),
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
"""A non-default value for every option analyze and check share."""
CONFIG = {
    **dict(k=3, method="power", tol=1e-5, max_iter=17, max_basis=9, trace=False, shards=5),
    **dict(bias=True),
    **dict(params=["a.*"], exclude=["a.b*"], batch_stats=True, backend="forward-over-reverse"),
    **dict(curvature="ggn", reduction="sum"),
    **dict(rho=0.07, alpha=0.3, seed=4),
    **dict(adaptive_sharpness="average", adaptive_norm="linf", adaptive_rho=0.3),
    **dict(adaptive_steps=7, adaptive_scale=False),
}
LOADING = {
    **dict(model="mlp", model_args=["hidden=(8,)"], trust_pickle=True, trust_code=True),
    **dict(split="test"),
    **dict(state_prefix="net."),
    **dict(samples=7, batch_size=5, seed=4, loss="mse", device="cpu", dtype="float64"),
    **dict(reduction="sum", input_style="single"),
    **dict(text_field="sentence1,sentence2", label_field="class", max_length=33),
}


class Stop(InputError):
    """Raised by the stand-in analysis once the options have been captured."""


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Stand-ins for loading and analysis in both commands that record what they are given."""
    seen: dict[str, Any] = {}
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)

    def load(checkpoint: Path, data: str, **kwargs: Any) -> str:
        seen["load"] = {k: v for k, v in kwargs.items() if k != "shard"}
        seen["data"] = data
        return "loaded"

    def run(loaded: Any, config: AnalyzeConfig, quiet: bool) -> None:
        seen["config"] = config
        raise Stop("stop")

    monkeypatch.setattr("sharpscope.cli.loading.load_inputs", load)  # imported as they run
    for module in (analyze_module, check_module):
        monkeypatch.setattr(module, "run_analysis", run)
    (tmp_path / "model.pt").write_bytes(b"not a report")
    return seen


def _invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2 and "stop" in result.stderr, result.stderr


def _flat(options: dict[str, tuple[str, ...]]) -> list[str]:
    return [part for flag, values in options.items() for part in (flag, *values)]


def _expected(**extra: Any) -> AnalyzeConfig:
    return AnalyzeConfig(**CONFIG, **extra)


def test_every_config_field_is_set_by_an_option_or_listed_as_not():
    """The values the commands below must reach differ from the defaults in every field but the
    listed ones."""
    defaults = AnalyzeConfig()
    for config, left in (
        (_expected(density=True, per_layer=True, slices=True), NOT_OPTIONS),  # analyze
        (_expected(), NOT_OPTIONS | NOT_CHECKED),  # check
    ):
        changed = {
            f.name for f in fields(config) if getattr(config, f.name) != getattr(defaults, f.name)
        }
        assert changed == {f.name for f in fields(AnalyzeConfig)} - left


def test_analyze_forwards_every_option(captured, tmp_path):
    extra = ["--density", "--per-layer", "--out", str(tmp_path / "out")]
    _invoke("analyze", "model.pt", "--data", "digits", *_flat(SHARED), *extra, "--quiet")
    assert captured["config"] == _expected(density=True, per_layer=True, slices=True)
    assert captured["load"] == LOADING


def test_check_forwards_every_option(captured):
    _invoke("check", "model.pt", "--data", "digits", "--max-eigenvalue", "1", *_flat(SHARED))
    assert captured["config"] == _expected()
    assert captured["load"] == LOADING


def test_the_config_file_reaches_the_same_settings(captured, tmp_path):
    keys = [f"{flag[2:]} = {_toml(values)}" for flag, values in SHARED.items() if values]
    keys += [
        "trace = false",
        "bias = true",
        "batch-stats = true",
        'data = "digits"',
        "max-eigenvalue = 1",
    ]
    keys += ["adaptive-scale = false"]
    keys.remove("model-arg = 'hidden=(8,)'")
    keys.remove("params = 'a.*'")
    keys.remove("exclude = 'a.b*'")
    keys += ["model-arg = ['hidden=(8,)']", "params = ['a.*']", "exclude = ['a.b*']"]
    (tmp_path / "sharpscope.toml").write_text("\n".join(keys) + "\n", encoding="utf-8")
    _invoke("check", "model.pt", "--trust-pickle", "--trust-code")  # opt-ins: never from a file
    assert captured["config"] == _expected()
    assert captured["load"] == LOADING
    assert captured["data"] == "digits"


def _toml(values: tuple[str, ...]) -> str:
    """A TOML value for an option's text: numbers as they are, anything else quoted."""
    (text,) = values
    try:
        float(text)
    except ValueError:
        return repr(text)
    return text
