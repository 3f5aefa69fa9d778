"""``sharpscope finetune`` under torchrun: 2 Gloo processes against one process, in float64.

Every multi-process run is a real ``python -m torch.distributed.run --standalone`` subprocess
with a timeout (helpers from test_distributed.py), so a hang fails the test instead of stalling
it. The model is a tiny MLP: a run of 6 steps takes seconds, mostly imports.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_distributed
import torch
from safetensors.torch import load_file
from test_distributed import TIMEOUT_S, finished, launch, sharpscope
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.training.metrics import read_rows

pytestmark = pytest.mark.integration  # every test runs torchrun
world_data = test_distributed.world_data  # a fixture: data that rank 1 can be told to spoil
REL = 1e-8
STEPS = 6
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd"],
    "sam": ["--optimizer", "sam"],
    "asam": ["--optimizer", "asam"],
    "eigen-sam": ["--optimizer", "eigen-sam", "--eig-every", "3"],  # refreshes at step 3
}
FIGURES = ("loss", "accuracy", "val_loss", "val_accuracy", "probe_loss", "lambda_max")


def command(finetune_files: dict[str, Path], optimizer: str, *extra: object) -> list[str]:
    """A float64 finetune command line with tracking and checkpoints every 3 steps."""
    return [
        *("finetune", str(finetune_files["checkpoint"]), "--data", str(finetune_files["data"])),
        *OPTIMIZERS[optimizer],
        *("--dtype", "float64", "--batch-size", "32", "--lr", "0.05", "--probe-size", "64"),
        *("--track-iters", "10", "--track-every", "3", "--save-every", "3", "--device", "cpu"),
        "--quiet",
        *map(str, extra),
    ]


def ok(args: list[str], nproc: int) -> None:
    done = sharpscope(args, nproc)
    assert done.returncode == 0, done.stderr


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of the run's last checkpoint."""
    name = json.loads((run / "latest").read_text())["dir"]
    return load_file(str(run / name / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    """Every tensor of ``a`` within ``rel`` of ``b``'s, relative to its norm."""
    assert a.keys() == b.keys()
    for key in a:
        error = float(torch.linalg.vector_norm(a[key] - b[key]))
        assert error <= rel * float(torch.linalg.vector_norm(b[key])), (key, error)


def assert_rows_close(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> None:
    """The same steps, with the same figures to ``REL`` relative."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in FIGURES:
            assert (a[key] is None) == (b[key] is None), (a["step"], key)
            if a[key] is not None:
                assert abs(a[key] - b[key]) <= REL * max(abs(a[key]), 1e-12), (a["step"], key)


@pytest.fixture(scope="module")
def straight(
    finetune_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str, int], Path]]:
    """The run of ``STEPS`` steps in one go, per (optimizer, processes), made once: the
    one-process reference in this process (saving a start-up), the torchrun ones two at a time
    (a launch leaves the CPUs idle part of the time)."""
    folder = tmp_path_factory.mktemp("straight")
    running: dict[str, subprocess.Popen[str]] = {}
    done: dict[tuple[str, int], Path] = {}

    def get(optimizer: str, nproc: int) -> Path:
        run = folder / f"{optimizer}-{nproc}"
        if (optimizer, nproc) in done:
            return run
        if nproc == 1:
            args = command(finetune_files, optimizer, "--steps", STEPS, "--out", run)
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
        else:
            if optimizer not in running:  # it, and the next one not yet started
                waiting = [n for n in OPTIMIZERS if n != optimizer and n not in running]
                for name in [optimizer, *waiting[:1]]:
                    out = folder / f"{name}-{nproc}"
                    args = command(finetune_files, name, "--steps", STEPS, "--out", out)
                    running[name] = launch(["-m", "sharpscope", *args], nproc)
            result = finished(running[optimizer])
            assert result.returncode == 0, result.stderr
        done[optimizer, nproc] = run
        return run

    yield get
    for process in running.values():  # a failed test may leave one unwaited for
        process.kill()
        process.communicate()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_two_ranks_equal_one_process(optimizer: str, straight: Any):
    one, two = straight(optimizer, 1), straight(optimizer, 2)
    assert_close(weights(two), weights(one), REL)
    assert_rows_close(read_rows(one / "metrics.jsonl"), read_rows(two / "metrics.jsonl"))
    written = sorted(p.name for p in two.glob("step-*"))
    assert written == ["step-000000", "step-000003", "step-000006"]


def test_two_ranks_stop_and_resume_exactly(
    finetune_files: dict[str, Path], straight: Any, tmp_path: Path
):
    run = tmp_path / "run"
    ok(command(finetune_files, "eigen-sam", "--steps", STEPS // 2, "--out", run), 2)
    ok(["finetune", "--resume", str(run), "--steps", str(STEPS), "--quiet"], 2)
    assert_close(weights(run), weights(straight("eigen-sam", 2)), 0.0)  # bit for bit
    assert_close(weights(run), weights(straight("eigen-sam", 1)), REL)
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert_rows_close(rows, read_rows(straight("eigen-sam", 1) / "metrics.jsonl"))
    state = torch.load(run / "step-000006" / "trainer.pt", weights_only=True)
    assert state["optimizer"]["sam"]["estimate"]["step"] == 3  # refreshed after the resume
    assert len(state["rank_rng"]) == 2


def test_per_rank_perturbations_differ_from_the_averaged_one(
    finetune_files: dict[str, Path], straight: Any, tmp_path: Path
):
    run = tmp_path / "run"
    ok(command(finetune_files, "sam", "--steps", STEPS, "--out", run, "--per-rank-sam"), 2)
    local, averaged = weights(run), weights(straight("sam", 2))
    assert all(torch.isfinite(t).all() for t in local.values())
    assert any(not torch.allclose(local[k], averaged[k], rtol=1e-6) for k in local)


def test_a_batch_the_ranks_cannot_share_is_one_clear_error(
    finetune_files: dict[str, Path], tmp_path: Path
):
    args = command(
        finetune_files, "sgd", "--steps", 2, "--batch-size", 33, "--out", tmp_path / "run"
    )
    done = sharpscope(args, 2)
    assert done.returncode != 0 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: rank 0: --batch-size 33 is not a multiple of the 2 processes: each rank takes an "
        "equal share of every batch; use a multiple of 2"
    ], done.stderr
    assert "exitcode  : 2" in done.stderr


@pytest.mark.parametrize(
    ("odd", "expected"),
    [
        ("differ", "the ranks disagree on data"),
        ("fail", "failed on rank 1 of 2: InputError: --data"),
    ],
)
def test_a_misconfigured_world_fails_on_every_rank(
    finetune_files: dict[str, Path], world_data: str, odd: str, expected: str, tmp_path: Path
):
    args = [
        "finetune",
        str(finetune_files["checkpoint"]),
        "--data",
        world_data,
        "--batch-size",
        "8",
    ]
    done = sharpscope(
        [*args, "--out", str(tmp_path / "run"), "--quiet"], 2, SHARPSCOPE_TEST_ODD=odd
    )
    assert done.returncode != 0 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: "), done.stderr
    assert expected in errors[0], done.stderr


def test_a_stalled_rank_times_out_instead_of_hanging(
    finetune_files: dict[str, Path], world_data: str, tmp_path: Path
):
    args = [
        "finetune",
        str(finetune_files["checkpoint"]),
        "--data",
        world_data,
        "--dist-timeout",
        "3",
    ]
    start = time.perf_counter()
    done = sharpscope([*args, "--out", str(tmp_path / "run")], 2, SHARPSCOPE_TEST_ODD="slow")
    assert time.perf_counter() - start < 40
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: rank 0: ")]
    assert len(errors) == 1 and "waited more than 3 s for the other ranks" in errors[0], done.stderr


def test_sigterm_stops_every_rank_at_one_step_and_the_run_resumes(
    finetune_files: dict[str, Path], tmp_path: Path
):
    """torchrun passes SIGTERM to every rank; they stop together, rank 0 saves, and the resumed
    run equals one that was never stopped."""
    long = ["--steps", 300, "--track-every", 50, "--save-every", 1000]
    run, straight = tmp_path / "run", tmp_path / "straight"
    process = launch(["-m", "sharpscope", *command(finetune_files, "sam", *long, "--out", run)], 2)
    uninterrupted = launch(  # meanwhile: a torchrun launch leaves the CPUs idle part of the time
        ["-m", "sharpscope", *command(finetune_files, "sam", *long, "--out", straight)], 2
    )
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_rows(run / "metrics.jsonl")) < 2:  # step 50 is recorded
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    assert "stopped by SIGTERM at step" in stderr, stderr
    step = json.loads((run / "latest").read_text())["step"]
    assert 50 <= step < 300
    ok(["finetune", "--resume", str(run), "--quiet"], 2)
    done = finished(uninterrupted)
    assert done.returncode == 0, done.stderr
    assert_close(weights(run), weights(straight), 0.0)  # bit for bit
