"""Outputs and option clashes are refused before any work, with one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_check import check
from tiny_cli import FAST, make_checkpoint, one_error_line
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.errors import InputError
from sharpscope.io.architectures import mlp
from sharpscope.io.atomic import check_can_create

UNWRITABLE = Path("/proc/x")
"""A folder that cannot be made even by root (the permission checks pass, the write fails)."""


@pytest.fixture
def no_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any analysis fail the test: the refusal must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the analysis ran before the bad output was refused")

    monkeypatch.setattr("sharpscope.analysis.analyze.analyze", refuse)


def analyze(*args: object) -> object:
    return CliRunner().invoke(app, ["analyze", *map(str, args)])


def test_out_under_a_regular_file(tmp_path, no_analysis):
    (tmp_path / "file").write_text("mine")
    result = analyze(make_checkpoint(tmp_path), *FAST, "--out", tmp_path / "file" / "report")
    one_error_line(result, "--out", "is a file, so nothing can be written under it")
    assert (tmp_path / "file").read_text() == "mine"


def test_out_that_is_a_file(tmp_path, no_analysis):
    (tmp_path / "file").write_text("mine")
    result = analyze(make_checkpoint(tmp_path), *FAST, "--out", tmp_path / "file")
    one_error_line(result, "--out", "is a file, not a folder")


def test_junit_that_is_a_folder_is_refused_before_the_analysis(tmp_path, no_analysis):
    result = check(make_checkpoint(tmp_path), *FAST, "--max-eigenvalue", 9, "--junit", tmp_path)
    one_error_line(result, "--junit", "is a folder; give a file path")
    assert result.stdout == ""  # no table was printed before the refusal


def test_junit_under_a_regular_file(tmp_path, no_analysis):
    (tmp_path / "file").touch()
    target = tmp_path / "file" / "checks.xml"
    result = check(make_checkpoint(tmp_path), *FAST, "--max-eigenvalue", 9, "--junit", target)
    one_error_line(result, "--junit", "is a file, so nothing can be written under it")


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the inputs fail the test: the refusal must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the inputs were loaded before the bad output was refused")

    monkeypatch.setattr("sharpscope.cli.loading.load_inputs", refuse)  # imported as they run


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("analyze", "{ckpt}", *FAST, "--out", UNWRITABLE), "--out"),
        (("landscape", "{ckpt}", "--data", "digits", "--out", UNWRITABLE), "--out"),
        (("finetune", "{ckpt}", "--data", "digits", "--out", UNWRITABLE), "--out"),
        (("demo", "--out", UNWRITABLE), "--out"),
        (
            ("check", "{ckpt}", *FAST, "--max-eigenvalue", 9, "--junit", UNWRITABLE / "j.xml"),
            "--junit",
        ),
        (
            ("check", "{ckpt}", *FAST, "--baseline", UNWRITABLE / "b.json", "--update-baseline"),
            "--baseline",
        ),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(
    tmp_path, no_loading, monkeypatch, args, flag
):
    """Each output is probed (a file created and deleted there) before any work: no raw
    FileNotFoundError after the analysis."""
    monkeypatch.setattr("sharpscope.training.fit.fit", lambda *a, **k: pytest.fail("demo trained"))
    ckpt = make_checkpoint(tmp_path)
    line = [str(ckpt) if a == "{ckpt}" else str(a) for a in args]
    result = CliRunner().invoke(app, line)
    one_error_line(result, f"{flag} {UNWRITABLE}", "cannot write there")


def test_the_probe_removes_the_folders_it_made(tmp_path):
    check_can_create(tmp_path / "a" / "b" / "out", "`out`", folder=True)
    check_can_create(tmp_path / "c" / "checks.xml", "`junit`")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="cannot write there"):
        check_can_create(UNWRITABLE / "a", "`out`", folder=True)


def test_torchscript_with_forward_over_reverse(tmp_path):
    model = mlp(hidden=(16,)).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    result = analyze(path, *FAST, "--trust-code", "--backend", "forward-over-reverse")
    one_error_line(result, "--backend forward-over-reverse", "TorchScript", "double-backward")


def test_a_wrong_flag_is_one_usage_error():
    result = analyze("x.pt", "--data", "digits", "--top-kk", "3")
    assert result.exit_code == 2 and "--top-kk" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_option_per_message(tmp_path):
    for option, value, words in [
        ("--top-k", "0", ["--top-k must be at least 1, got 0"]),
        ("--rho", "-0.05", ["--rho must be positive, got -0.05"]),
        ("--alpha", "-1", ["--alpha must not be negative, got -1"]),
        ("--max-iter", "0", ["--max-iter must be at least 1, got 0"]),
    ]:
        result = analyze(Path("absent.pt"), "--data", "digits", option, value)
        one_error_line(result, *words)
        others = {"--top-k", "--rho", "--alpha", "--max-iter"} - {option}
        assert not any(other in result.stderr for other in others), result.stderr


def test_the_output_probe_survives_another_rank_probing_the_same_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Every rank of a torchrun launch probes ``--out`` at once: a folder another rank made
    (mkdir finds it) or removed under the probe (mkstemp finds it gone) is no error."""
    import tempfile

    real_mkdir, real_mkstemp = Path.mkdir, tempfile.mkstemp
    raced: list[str] = []

    def mkdir_after_another(self: Path, *args: object, **kwargs: object) -> None:
        if not raced:  # another rank made it between our exists() and mkdir()
            raced.append("mkdir")
            real_mkdir(self)
            raise FileExistsError(17, "File exists", str(self))
        real_mkdir(self, *args, **kwargs)

    def mkstemp_once_gone(*args: object, **kwargs: object) -> tuple[int, str]:
        if len(raced) == 1:  # another rank removed the folder it made
            raced.append("mkstemp")
            raise FileNotFoundError(2, "No such file or directory")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_after_another)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_once_gone)
    check_can_create(tmp_path / "out", "`out`", folder=True)
    assert raced == ["mkdir", "mkstemp"]
