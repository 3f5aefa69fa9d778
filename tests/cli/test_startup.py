"""Start-up: every ``--help``, a bad option value and gating a saved report answer without
importing torch or matplotlib; ``--threads`` reaches torch and the plan line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_cli import FAST, make_checkpoint
from typer.testing import CliRunner

from sharpscope import choices
from sharpscope.analysis.adaptive_sharpness import KINDS, NORMS
from sharpscope.cli.app import COMMANDS, app
from sharpscope.curvature import BACKENDS, CURVATURES, SOLVERS

RUN_IN_PROCESS = """
import sys
from sharpscope.cli.app import app
try:
    app(sys.argv[1:], prog_name="sharpscope")
except SystemExit as done:
    code = done.code
heavy = sorted(m for m in ("torch", "matplotlib") if m in sys.modules)
print("LOADED:" + ",".join(heavy), "EXIT:" + str(code), file=sys.stderr)
"""
"""Runs the command line in a fresh interpreter, then says which heavy modules it imported."""


def run_fresh(*args: object, cwd: Path | None = None) -> tuple[str, int, str]:
    """The heavy modules a fresh ``sharpscope ARGS`` imported, its exit code and its stderr."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", RUN_IN_PROCESS, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    last = done.stderr.strip().splitlines()[-1]
    loaded, code = last.removeprefix("LOADED:").split(" EXIT:")
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert bool(loaded) == bool({"torch", "matplotlib"} & imported), last  # two witnesses agree
    return loaded, int(code), done.stderr


@pytest.fixture(scope="module")
def saved_report(
    tiny_analysis: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    folder = tmp_path_factory.mktemp("startup")
    (folder / ".git").mkdir()  # no config file from above
    path = folder / "report.json"
    path.write_text(json.dumps(tiny_analysis[1]), encoding="utf-8")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("args", [(), *((name,) for name in COMMANDS)])
def test_help_imports_neither_torch_nor_matplotlib(args):
    loaded, code, _ = run_fresh(*args, "--help")
    assert (loaded, code) == ("", 0)


@pytest.mark.integration
def test_gating_a_saved_report_imports_neither_torch_nor_matplotlib(saved_report):
    junit = saved_report.parent / "checks.xml"
    for args in (["--max-eigenvalue", 1e6], ["--max-eigenvalue", 1e-9, "--json", "--junit", junit]):
        loaded, code, _ = run_fresh("check", saved_report, *args, cwd=saved_report.parent)
        assert loaded == "" and code in (0, 1), (args, loaded, code)
    assert junit.exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("option", "value"),
    [("--method", "foo"), ("--backend", "x"), ("--dtype", "float16"), ("--threads", "0")],
)
def test_a_bad_option_value_fails_before_torch_loads(tmp_path, option, value):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"never read")
    loaded, code, stderr = run_fresh("analyze", checkpoint, "--data", "digits", option, value)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert (loaded, code, len(errors)) == ("", 2, 1), stderr
    assert option in errors[0]


def test_the_torch_free_names_are_the_implemented_ones():
    assert tuple(SOLVERS) == choices.SOLVER_NAMES
    assert tuple(CURVATURES) == choices.CURVATURE_NAMES
    assert (choices.BACKENDS, choices.ADAPTIVE_KINDS, choices.ADAPTIVE_NORMS) == (
        BACKENDS,
        KINDS,
        NORMS,
    )
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in choices.DTYPE_NAMES)


SHOWN = [a for a in FAST if a != "--quiet"]
"""A fast analysis that prints its plan line."""


@pytest.fixture
def torch_threads():
    """Restore torch's thread count after a command changed it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_sets_torchs_threads_and_the_plan_line_says_so(tmp_path, torch_threads, threads):
    checkpoint = make_checkpoint(tmp_path)
    args = ["analyze", str(checkpoint), *SHOWN, "--no-trace", "--threads", str(threads)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads
    plan = [line for line in result.stderr.splitlines() if line.startswith("plan:")]
    unit = "thread" if threads == 1 else "threads"
    assert len(plan) == 1 and f"each on {threads} CPU {unit}:" in plan[0], result.stderr


def test_without_threads_torchs_default_is_left(tmp_path, torch_threads):
    torch.set_num_threads(2)
    result = CliRunner().invoke(app, ["analyze", str(make_checkpoint(tmp_path)), *SHOWN])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2 and "each on 2 CPU threads:" in result.stderr
