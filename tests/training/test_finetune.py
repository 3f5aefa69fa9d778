"""``sharpscope finetune`` end to end: exact resume, signals and kills, divergence, in real
subprocesses (each takes a few seconds, mostly imports), and its checks in process."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from finetune_processes import assert_same, latest_step, ok, sharpscope, started, wait_for
from rich.console import Console
from safetensors.torch import load_file
from tiny_cli import one_error_line as one_error
from typer.testing import CliRunner, Result

from sharpscope.cli.app import app
from sharpscope.cli.flags import FLAGS
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import file_sha256
from sharpscope.io.models import ModelSpec
from sharpscope.report.training_progress import TrainingProgress
from sharpscope.training.divergence import DivergenceRule
from sharpscope.training.metrics import read_rows
from sharpscope.training.plan import RunOptions
from sharpscope.training.run_config import RunConfig
from sharpscope.training.trainer import Diverged

N = 12
"""Steps before the stop; 2N = 24 crosses an epoch (16 steps of 32 of the 512 samples)."""
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd"],
    "eigen-sam": ["--optimizer", "eigen-sam", "--eig-every", "5"],  # refreshes at 5, 10, 15, 20
    "sam-bf16": ["--optimizer", "sam", "--precision", "bf16", "--curvature", "ggn"],
}


def command(finetune_files: dict[str, Path], optimizer: str, *extra: object) -> list[str]:
    """A finetune command line: small batches, frequent tracking and checkpoints."""
    return [
        *("finetune", str(finetune_files["checkpoint"]), "--data", str(finetune_files["data"])),
        *OPTIMIZERS[optimizer],
        *("--batch-size", "32", "--lr", "0.05", "--probe-size", "64", "--track-iters", "10"),
        *("--track-every", "6", "--save-every", "5", "--device", "cpu", "--quiet"),
        *map(str, extra),
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of the run's last checkpoint."""
    name = json.loads((run / "latest").read_text())["dir"]
    return load_file(str(run / name / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(
    finetune_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, Result]]:
    """One uninterrupted run of 2N steps per optimizer (made once), with its CLI result. It runs
    in this process, saving a start-up: what is compared with it stops and resumes in
    subprocesses, and an uninterrupted run is one whichever process runs it."""
    done: dict[str, tuple[Path, Result]] = {}

    def get(optimizer: str) -> tuple[Path, Result]:
        if optimizer not in done:
            run = tmp_path_factory.mktemp("straight") / optimizer
            args = command(finetune_files, optimizer, "--steps", 2 * N, "--out", run, "--json")
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            done[optimizer] = (run, result)
        return done[optimizer]

    return get


@pytest.fixture(scope="module")
def stopped(
    finetune_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Path]]:
    """Per optimizer, the folder of a run of N steps in a subprocess, for its test to resume; the
    first call starts them all together (independent one-process runs: they share the CPUs)."""
    folder = tmp_path_factory.mktemp("stopped")
    processes: dict[str, subprocess.Popen[str]] = {}
    done: dict[str, Path] = {}

    def get(optimizer: str) -> Path:
        if not processes:
            for name in OPTIMIZERS:
                args = command(finetune_files, name, "--steps", N, "--out", folder / name)
                processes[name] = started(args)
        if optimizer not in done:
            process = processes[optimizer]
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
            done[optimizer] = folder / optimizer
        return done[optimizer]

    yield get
    for process in processes.values():  # a failed test may leave one unwaited for
        process.kill()
        process.communicate()


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", ["sgd", "eigen-sam", "sam-bf16"])
def test_n_steps_stop_and_n_more_equal_2n_straight(
    optimizer: str, stopped: Callable[[str], Path], straight: Callable
):
    run = stopped(optimizer)
    assert latest_step(run) == N
    resumed = ok(sharpscope(["finetune", "--resume", str(run), "--steps", str(2 * N), "--quiet"]))
    assert f"resuming from step {N} of {2 * N}" in resumed.stderr
    assert_same(weights(run), weights(straight(optimizer)[0]))
    steps = [r["step"] for r in read_rows(run / "metrics.jsonl")]
    assert steps == [0, 6, N, 18, 2 * N]  # the first part's end is recorded once
    if optimizer == "eigen-sam":
        state = torch.load(run / f"step-{2 * N:06d}" / "trainer.pt", weights_only=True)
        assert state["optimizer"]["sam"]["estimate"]["step"] == 20  # refreshed after the resume


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_exactly(
    sig: signal.Signals, finetune_files: dict[str, Path], straight: Callable, tmp_path: Path
):
    run = tmp_path / "run"
    # tracking every step slows the run down (and must not change the weights)
    process = started(
        command(finetune_files, "sgd", "--steps", 2 * N, "--out", run, "--track-every", 1)
    )
    wait_for(
        lambda: (run / "metrics.jsonl").exists() and bool(read_rows(run / "metrics.jsonl")), process
    )
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    stopped = latest_step(run)
    assert stopped is not None and 0 <= stopped < 2 * N
    assert f"stopped by {sig.name} at step {stopped}" in err
    assert f"sharpscope finetune --resume {run}" in err
    assert "Traceback" not in err
    ok(sharpscope(["finetune", "--resume", str(run), "--quiet"]))
    assert_same(weights(run), weights(straight("sgd")[0]))


@pytest.mark.integration
def test_after_a_kill_the_run_resumes_from_its_last_checkpoint(
    finetune_files: dict[str, Path], straight: Callable, tmp_path: Path
):
    run = tmp_path / "run"
    args = command(
        finetune_files, "sgd", "--steps", 2 * N, "--out", run, "--track-every", 1, "--save-every", 4
    )
    process = started(args)
    wait_for(lambda: (latest_step(run) or 0) >= 4, process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = latest_step(run)
    assert killed_at is not None and 4 <= killed_at < 2 * N
    ok(sharpscope(["finetune", "--resume", str(run), "--quiet"]))
    assert_same(weights(run), weights(straight("sgd")[0]))
    # every step recorded exactly once: nothing lost before the checkpoint, nothing duplicated
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == list(range(2 * N + 1))
    csv_steps = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()]
    assert csv_steps == ["step", *map(str, range(2 * N + 1))]


@pytest.mark.integration
def test_a_diverging_loss_stops_with_one_error_and_keeps_the_last_good_checkpoint(
    finetune_files: dict[str, Path], tmp_path: Path
):
    run = tmp_path / "run"
    args = command(
        finetune_files, "sgd", "--steps", 200, "--out", run, "--loss", "mse", "--save-every", 1
    )  # tracking only at the end: the loss turns non-finite before the exploding-loss rule looks
    result = sharpscope([*args, "--lr", "100", "--track-every", "1000"])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the loss became" in errors[0], result.stderr
    last = latest_step(run)
    assert last is not None and last < 200
    assert f"the last good checkpoint is {run / f'step-{last:06d}'}" in errors[0]
    assert all(bool(torch.isfinite(t).all()) for t in weights(run).values())
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_an_exploding_loss_stops_at_the_tracking_step_that_sees_it(
    finetune_files: dict[str, Path], tmp_path: Path
):
    """--lr 1000 keeps every loss finite but explodes it: the rule of training/divergence.py
    stops the run at the first tracking step past 100 × max(start, 1), exit 2."""
    run = tmp_path / "run"
    args = command(finetune_files, "sgd", "--steps", 60, "--out", run, "--save-every", 100)
    result = sharpscope([*args, "--lr", "1000"])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss rose to" in errors[0] and "at step 6" in errors[0]
    assert f"the last good checkpoint is {run / 'step-000000'}" in errors[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 6]  # the row that diverged is kept for the record


def test_the_divergence_rule():
    rule = DivergenceRule()
    rule.check({"step": 0, "probe_loss": 0.002, "loss": None})
    assert rule.start == 0.002
    rule.check({"step": 5, "probe_loss": 99.0, "loss": 99.0})  # below 100 × max(0.002, 1)
    with pytest.raises(Diverged, match=r"training loss rose to 101.*at step 6"):
        rule.check({"step": 6, "probe_loss": 1.0, "loss": 101.0})
    resumed = DivergenceRule(start=500.0)
    resumed.check({"step": 9, "probe_loss": 49_000.0, "loss": 10.0})
    with pytest.raises(Diverged, match=r"probe loss rose to 5\.1e\+04"):
        resumed.check({"step": 10, "probe_loss": 51_000.0, "loss": 10.0})


def test_a_run_folder_holds_metrics_plot_and_the_last_checkpoints(straight: Callable):
    run, result = straight("sgd")
    summary = json.loads(result.stdout)
    assert summary["status"] == "finished" and summary["step"] == 2 * N
    assert (summary["before"]["step"], summary["after"]["step"]) == (0, 2 * N)
    assert summary["after"]["val_accuracy"] > summary["before"]["val_accuracy"]
    assert Path(summary["checkpoint"]) == run / f"step-{2 * N:06d}" / "model.safetensors"
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 6, 12, 18, 24]
    assert len((run / "metrics.csv").read_text().splitlines()) == len(rows) + 1
    assert sorted(p.name for p in run.glob("step-*")) == [
        "step-000015",
        "step-000020",
        "step-000024",
    ]  # --keep 3
    assert (run / "training.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == ModelSpec("mlp", {"hidden": (16,)}).to_json()


def test_a_bf16_run_tracks_the_ggn_in_float32_and_says_so(straight: Callable, tmp_path: Path):
    run, result = straight("sam-bf16")
    summary = json.loads(result.stdout)
    assert (summary["precision"], summary["curvature"]) == ("bf16", "ggn")
    rows = read_rows(run / "metrics.jsonl")
    assert {(r["precision"], r["product_dtype"], r["curvature"]) for r in rows} == {
        ("bf16", "float32", "ggn")
    }
    assert rows[-1]["probe_loss"] < rows[0]["probe_loss"] and rows[-1]["loss"] < rows[1]["loss"]
    assert all(r["lambda_max"] > 0 for r in rows)  # the GGN is positive semi-definite
    shutil.copytree(run, tmp_path / "copy")  # a finished run: resuming it prints its summary
    table = CliRunner().invoke(app, ["finetune", "--resume", str(tmp_path / "copy")]).stdout
    assert "24 steps in bf16; λ_max of the ggn in float32" in table


def test_analyze_reads_a_finetune_checkpoint_without_model(straight: Callable):
    run, _ = straight("sgd")
    checkpoint = run / f"step-{2 * N:06d}" / "model.safetensors"
    args = ["analyze", str(checkpoint), "--data", "digits", "--samples", "64", "-k", "1"]
    result = CliRunner().invoke(app, [*args, "--no-trace", "--quiet", "--json"])
    assert result.exit_code == 0, result.output


def test_a_resume_refuses_changed_settings(straight: Callable, tmp_path: Path):
    run, _ = straight("sgd")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    finetune = ["finetune", "--resume", str(copy)]
    one_error(CliRunner().invoke(app, [*finetune, "--lr", "0.5"]), "--lr 0.5", "0.05", "--steps")
    one_error(CliRunner().invoke(app, [*finetune, "--optimizer", "sam"]), "--optimizer sam")
    changed = CliRunner().invoke(app, [*finetune, "--curvature", "ggn"])
    one_error(changed, "--curvature ggn differs from the run's hessian")
    one_error(CliRunner().invoke(app, [*finetune, "--precision", "bf16"]), "--precision bf16")
    one_error(CliRunner().invoke(app, [*finetune, "--out", str(run)]), "stays in its folder")
    one_error(CliRunner().invoke(app, [*finetune, "--steps", "3"]), "beyond the 3 steps")
    assert sorted(os.listdir(copy)) == sorted(os.listdir(run))


def test_a_resume_accepts_the_run_s_own_command_line(
    finetune_files: dict[str, Path], straight: Callable, tmp_path: Path
):
    """A job script may append --resume DIR to its usual command; a finished run does nothing."""
    run, _ = straight("sgd")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    again = [
        *command(finetune_files, "sgd", "--steps", 2 * N, "--out", copy),
        "--resume",
        str(copy),
    ]
    result = CliRunner().invoke(app, [*again, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 2 * N
    assert read_rows(copy / "metrics.jsonl") == read_rows(run / "metrics.jsonl")
    assert_same(weights(copy), weights(run))
    other = [*again[:1], str(finetune_files["data"]), *again[2:]]  # another file as CHECKPOINT
    one_error(CliRunner().invoke(app, other), "CHECKPOINT is not the file the run started from")


def test_a_new_run_never_overwrites(
    finetune_files: dict[str, Path], straight: Callable, tmp_path: Path
):
    run, _ = straight("sgd")
    one_error(
        CliRunner().invoke(app, [*command(finetune_files, "sgd", "--out", run)]), f"--resume {run}"
    )
    (tmp_path / "mine.txt").write_text("keep me")
    one_error(
        CliRunner().invoke(app, [*command(finetune_files, "sgd", "--out", tmp_path)]),
        "not a sharpscope",
    )
    empty = tmp_path / "nothing"
    empty.mkdir()
    one_error(
        CliRunner().invoke(app, ["finetune", "--resume", str(empty)]),
        "not the folder of a sharpscope finetune run",
    )


def test_resuming_a_missing_folder_says_it_does_not_exist(tmp_path: Path):
    missing = tmp_path / "runs" / "x"
    result = CliRunner().invoke(app, ["finetune", "--resume", str(missing)])
    one_error(result, f"--resume {missing} does not exist")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "adam"], "unknown --optimizer 'adam'"),
        (["--steps", "5", "--epochs", "1"], "either --steps or --epochs"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--curvature", "hess"], "unknown --curvature 'hess'; choose one of hessian, ggn"),
        (["--precision", "fp16"], "unknown --precision 'fp16'; choose one of float32, bf16"),
        (["--track-measure", "lambda_c"], "unknown --track-measure 'lambda_c'; choose one of"),
        (["--precision", "bf16", "--dtype", "float64"], "use --dtype float32 with it"),
    ],
)
def test_bad_options_are_one_line_errors(
    finetune_files: dict[str, Path], tmp_path: Path, args, message
):
    one_error(
        CliRunner().invoke(app, [*command(finetune_files, "sgd", "--out", tmp_path / "r"), *args]),
        message,
    )
    assert not (tmp_path / "r").exists()


def test_no_checkpoint_or_data_is_a_usage_error():
    one_error(CliRunner().invoke(app, ["finetune", "--data", "digits"]), "CHECKPOINT", "--resume")


DERIVED = {"checkpoint", "checkpoint_sha256", "model", "layout", "auto_backend"}
"""The settings no option sets directly: CHECKPOINT's path and hash, the model spec (--model
and --model-arg, else the one the checkpoint stores), the checkpoints' layout (from both) and
the backend `auto` chooses as the run starts."""


@pytest.mark.parametrize(
    "variant",
    [
        {"steps": 9, "epochs": None, "dtype": "float64", "precision": "float32"},
        {"steps": None, "epochs": 2, "dtype": "float32", "precision": "bf16"},  # bf16: float32
    ],
)
def test_every_run_setting_comes_from_its_own_option(
    variant: dict[str, int | str | None],
    finetune_files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    assert {f.name for f in fields(RunOptions)} == {f.name for f in fields(RunConfig)} - DERIVED
    data = str(finetune_files["data"])
    values = {
        **dict(data=data, split="train", val_data=data, loss="mse", optimizer="eigen-sam"),
        **dict(lr=0.02, momentum=0.5, weight_decay=0.001, rho=0.07, alpha=0.3, per_rank_sam=True),
        **dict(eig_every=7, eig_steps=3, schedule="cosine", batch_size=16, track_every=4),
        **dict(probe_size=32, track_iters=5, save_every=6, keep=2, seed=3, device="cpu"),
        **dict(text_field="sentence", label_field="class", max_length=20, curvature="ggn"),
        **dict(track_measure="both", backend="finite-difference"),
        **dict(params=("1.*", "3.weight"), freeze=("1.bias",)),
        **dict(fsdp=False),  # its own option: tests/training/test_finetune_fsdp_input.py
        **variant,
    }
    assert set(values) == {f.name for f in fields(RunOptions)}
    args: list[str] = ["--params", "1.*", "--params", "3.weight", "--freeze", "1.bias"]
    for name, value in values.items():
        if value is not None and value is not False and name not in {"params", "freeze"}:
            args += [FLAGS[name]] if value is True else [FLAGS[name], str(value)]
    ran: list[RunConfig] = []

    def run_instead(folder, config, inputs, resume_from, watch):
        ran.append(config)
        raise InputError("not trained")

    monkeypatch.setattr("sharpscope.training.run.finetune", run_instead)  # imported as it runs
    checkpoint = finetune_files["checkpoint"]
    command_line = ["finetune", str(checkpoint), *args, "--out", str(tmp_path / "run"), "-q"]
    one_error(CliRunner().invoke(app, command_line), "not trained")
    assert asdict(ran[0]) == {
        **values,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "model": ModelSpec("mlp", {"hidden": (16,)}).to_json(),
        "layout": "safetensors",
        "auto_backend": None,
    }


def test_the_progress_bar_fits_80_columns_and_shows_the_time_remaining():
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    with TrainingProgress(console, enabled=True) as progress:
        progress.started(12_000, 100_000)
        progress.step(12_100, 0.2)
        time.sleep(0.2)  # two steps apart in time: the remaining time can be estimated
        progress.step(12_345, 0.123456)
        row = {"step": 12_345, "lambda_max": 12345.678, "alignment": 0.1234, "val_accuracy": 0.9876}
        progress.record(row)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())  # cursor movements
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0] == "resuming from step 12000 of 100000"
    assert all(len(line) <= 80 for line in lines), lines
    assert re.search(r"12345/100000 eta \d+:\d\d:\d\d loss 0.1235 λ 1.235e\+04", lines[-1]), lines
