"""``sharpscope finetune`` from a Hugging Face save_pretrained folder: partial fine-tuning with
--params/--freeze, checkpoints that are save_pretrained folders again (from_pretrained and
analyze read them), and exact resume after SIGKILL, on the tiny BERT of tests/tiny_hf.py."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_hf
import torch
from finetune_processes import assert_same, latest_step, ok, sharpscope, started, wait_for
from tiny_cli import one_error_line as one_error
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos
from sharpscope.io.checkpoints import load_model
from sharpscope.io.losses import resolve_loss
from sharpscope.training import run as training_run
from sharpscope.training.selection import split_globs

transformers = pytest.importorskip("transformers")

N = 8
"""Steps before the kill; 2N = 16 crosses an epoch (4 steps of 16 of the 64 samples)."""
CLASSIFIER = ("classifier.weight", "classifier.bias")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A belt: nothing may need the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny BERT written by save_pretrained with a tokenizer, and 64 token sequences with
    3-class labels as a .pt dict."""
    return tiny_hf.bert_run_inputs(tmp_path_factory.mktemp("hf-inputs"))


def command(files: dict[str, Path], out: Path, *extra: object) -> list[str]:
    """A finetune command line on the tiny BERT: small batches, frequent tracking and saves."""
    return [
        *("finetune", str(files["checkpoint"]), "--data", str(files["data"]), "--out", str(out)),
        *("--batch-size", "16", "--lr", "0.2", "--probe-size", "32", "--track-iters", "10"),
        *("--track-every", "1", "--save-every", "4", "--device", "cpu", "--quiet"),
        *map(str, extra),
    ]


def in_process(args: list[str]) -> Any:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def last_dir(run: Path) -> Path:
    return run / json.loads((run / "latest").read_text())["dir"]


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of the model transformers itself loads from ``folder``."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, local_files_only=True
    )
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_split_globs_takes_repeated_and_comma_separated_values():
    assert split_globs(["classifier.*, bert.pooler.*", "bert.encoder.*"]) == (
        "classifier.*",
        "bert.pooler.*",
        "bert.encoder.*",
    )
    assert split_globs(None) is None and split_globs([" , "]) is None


@pytest.mark.parametrize(
    ("optimizer", "choice"),
    [
        (["--optimizer", "sam"], ["--params", "classifier.*"]),
        (["--optimizer", "eigen-sam", "--eig-every", "2"], ["--freeze", "bert.embeddings.*"]),
    ],
    ids=["sam-params", "eigen-sam-freeze"],
)
def test_partial_finetuning_changes_only_the_chosen_parameters(
    optimizer: list[str], choice: list[str], hf_files: dict[str, Path], tmp_path: Path
):
    run = tmp_path / "run"
    in_process(command(hf_files, run, "--steps", 4, *optimizer, *choice))
    before = load_model(hf_files["checkpoint"])[0].state_dict()
    after = hf_weights(last_dir(run))
    assert before.keys() == after.keys()
    if choice[0] == "--params":
        chosen = set(CLASSIFIER)
    else:
        chosen = {k for k in before if not k.startswith("bert.embeddings.")}
    for name in before:
        if name in chosen:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed"
    state = torch.load(last_dir(run) / "trainer.pt", weights_only=True)["optimizer"]
    assert len(state["state"]) == len(chosen)  # momentum buffers of the trained ones only
    if "eigen-sam" in optimizer:  # its Hessian is over the trained parameters
        assert set(state["sam"]["eigenvector"]) == chosen


def test_the_run_s_folders_load_with_from_pretrained_and_analyze_as_the_model_in_memory(
    hf_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    trained: list[torch.nn.Module] = []
    finetune = training_run.finetune

    def keep_model(folder, config, inputs, resume_from, watch):
        trained.append(inputs.model)
        return finetune(folder, config, inputs, resume_from, watch)

    monkeypatch.setattr(training_run, "finetune", keep_model)  # the command imports it when run
    run = tmp_path / "run"
    args = command(hf_files, run, "--steps", 6, "--optimizer", "sam", "--dtype", "float64")
    summary = json.loads(in_process([*args, "--json"]).stdout)
    out = run / "step-000006"
    assert Path(summary["checkpoint"]) == out
    for name in TOKENIZER:
        assert (out / name).read_bytes() == (hf_files["checkpoint"] / name).read_bytes(), name
    transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = trained[0]
    assert_same(hf_weights(out), {k: v.detach() for k, v in model.state_dict().items()})

    report = tmp_path / "report"
    analyze = ["analyze", str(out), "--data", str(hf_files["data"]), "--dtype", "float64"]
    exact = ["--samples", "0", "-k", "1", "--tol", "1e-10", "--no-trace", "--quiet"]
    in_process([*analyze, *exact, "--out", str(report)])
    analyzed = json.loads((report / "report.json").read_text())["results"]["eigenvalues"]
    data = torch.load(hf_files["data"], weights_only=True)
    batch = ({k: data[k] for k in ("input_ids", "attention_mask")}, data["labels"])
    op = HessianOperator(Objective(model.eval(), resolve_loss("cross-entropy"), [batch]))
    in_memory = lanczos(
        op, 1, which="largest", settings=SolveSettings(tol=1e-10, max_iter=200, seed=0)
    )
    assert analyzed["values"][0] == pytest.approx(float(in_memory.eigenvalues[0]), rel=1e-8)


@pytest.fixture(scope="module")
def straight(
    hf_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[], Path]:
    """One uninterrupted partial Eigen-SAM run of 2N steps (made once). It runs in this process,
    saving a start-up: the run compared with it is killed and resumed in subprocesses."""
    done: list[Path] = []

    def get() -> Path:
        if not done:
            run = tmp_path_factory.mktemp("straight-hf") / "run"
            in_process(command(hf_files, run, *RESUMED, "--steps", 2 * N))
            done.append(run)
        return done[0]

    return get


RESUMED = ("--optimizer", "eigen-sam", "--eig-every", "3", "--params", "classifier.*,bert.pooler.*")


@pytest.mark.integration
def test_after_a_kill_a_partial_run_resumes_bit_identically(
    hf_files: dict[str, Path], straight: Callable[[], Path], tmp_path: Path
):
    run = tmp_path / "run"
    process = started(command(hf_files, run, *RESUMED, "--steps", 2 * N, "--track-iters", 40))
    wait_for(lambda: (latest_step(run) or 0) >= 4, process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = latest_step(run)
    assert killed_at is not None and 4 <= killed_at < 2 * N
    uninterrupted = last_dir(straight())
    start = hf_files["checkpoint"]
    start.rename(start.with_name("away"))  # the resume needs only the run's own folder
    try:
        ok(sharpscope(["finetune", "--resume", str(run), "--quiet"]))
    finally:
        start.with_name("away").rename(start)
    assert_same(hf_weights(last_dir(run)), hf_weights(uninterrupted))
    assert (last_dir(run) / "vocab.txt").is_file()


def test_a_resume_refuses_other_params_and_accepts_the_run_s_own(
    hf_files: dict[str, Path], straight: Callable[[], Path], tmp_path: Path
):
    copy = tmp_path / "copy"
    shutil.copytree(straight(), copy)
    resume = ["finetune", "--resume", str(copy)]
    result = CliRunner().invoke(app, [*resume, "--params", "classifier.*"])
    one_error(result, "--params classifier.* differs from the run's classifier.*,bert.pooler.*")
    one_error(CliRunner().invoke(app, [*resume, "--freeze", "bert.*"]), "--freeze bert.*")
    again = [*command(hf_files, copy, *RESUMED, "--steps", 2 * N), "--resume", str(copy)]
    in_process(again)  # its own command line, CHECKPOINT folder included: nothing to do
    assert_same(hf_weights(last_dir(copy)), hf_weights(last_dir(straight())))


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (["--params", "classifier.*,head.*"], "--params 'head.*' matches no trainable parameter"),
        (["--freeze", "*"], "--params and --freeze leave no parameter to train"),
    ],
)
def test_a_choice_of_no_parameters_is_a_one_line_error(
    choice: list[str], message: str, hf_files: dict[str, Path], tmp_path: Path
):
    args = command(hf_files, tmp_path / "run", "--steps", 2, *choice)
    result = CliRunner().invoke(app, [*args, "--val-data", str(hf_files["data"])])  # no note
    one_error(result, message)
