"""Attacks on the outputs (issue 20, items 8, 9, 10, 12 and 13): an output path that names a
user's folder or file, a run folder whose ``latest`` points out of it, a tokenizer file that
links to a private file, and writes interrupted by SIGINT or SIGTERM. No user file may change;
a refusal is one ``error:`` line and exit 2, before any work."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_hf
import torch
from tiny_cli import FAST, make_checkpoint, refused

from security.attack import NetworkGuard, Snapshot, cli
from sharpscope.io.file_sets import replace_files
from sharpscope.report import outdir
from sharpscope.training.run_dir import MARKER

RUN = ("--data", "digits", "--batch-size", "32", "--probe-size", "16", "--track-iters", "2")
"""A finetune on the tiny MLP that takes a fraction of a second per step."""
LANDSCAPE = ("--data", "digits", "--samples", "64", "--points", "3", "--grid", "3", "--quiet")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return make_checkpoint(folder)


def finetune(checkpoint: Path, out: Path, *extra: object) -> object:
    return cli("finetune", checkpoint, *RUN, "--out", out, "--quiet", "--device", "cpu", *extra)


def run_folder(checkpoint: Path, out: Path, steps: int = 1) -> Path:
    result = finetune(checkpoint, out, "--steps", steps, "--save-every", 1)
    assert result.exit_code == 0, result.output
    return out


# --- item 8: finetune --out never takes a folder it did not create --------------------------------


def test_finetune_out_at_a_folder_with_a_config_and_a_step_folder_is_refused(checkpoint, tmp_path):
    """The folder looked like an unfinished run: its config.json was overwritten and its
    step-000001/ deleted, exit 0."""
    user = tmp_path / "experiments"
    (user / "step-000001").mkdir(parents=True)
    (user / "config.json").write_text('{"my": "settings"}')
    (user / "step-000001" / "notes.txt").write_text("precious")
    snap = Snapshot(user)
    result = finetune(checkpoint, user, "--steps", 1)
    refused(result.exit_code, result.stderr, "--out", "not a sharpscope run", "config.json")
    result = finetune(checkpoint, user, "--steps", 1, "--force")  # --force never overwrites
    refused(result.exit_code, result.stderr, "--out", "would overwrite", "config.json")
    snap.assert_unchanged()


def test_finetune_out_at_a_hugging_face_model_folder_is_refused(checkpoint, tmp_path):
    model = tmp_path / "bert"
    tiny_hf.bert().save_pretrained(model)
    snap = Snapshot(model)
    for extra in ((), ("--force",)):
        result = finetune(checkpoint, model, "--steps", 1, *extra)
        refused(result.exit_code, result.stderr, "--out", "config.json")
    snap.assert_unchanged()


def test_finetune_out_inside_the_checkpoint_folder_is_refused(tmp_path):
    model = tmp_path / "bert"
    tiny_hf.bert().save_pretrained(model)
    snap = Snapshot(model)
    for out in (model, model / "run"):
        result = cli("finetune", model, "--data", "digits", "--out", out, "--steps", 1)
        refused(result.exit_code, result.stderr, "--out", "inside the CHECKPOINT folder")
    snap.assert_unchanged()


def test_finetune_out_at_other_files_needs_force_and_writes_beside_them(checkpoint, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    snap = Snapshot(user)
    result = finetune(checkpoint, user, "--steps", 1)
    refused(result.exit_code, result.stderr, "--out", "--force")
    snap.assert_unchanged()
    snap = Snapshot(user / "notes.txt")
    result = finetune(checkpoint, user, "--steps", 3, "--save-every", 1, "--force")
    assert result.exit_code == 0, result.output  # keeping 3 of 4 checkpoints: one is removed
    assert (user / MARKER).is_file() and (user / "latest").is_file()
    snap.assert_unchanged()


def test_a_run_removes_only_the_checkpoint_folders_it_wrote(checkpoint, tmp_path):
    run = run_folder(checkpoint, tmp_path / "run")
    (run / "step-000005").mkdir()  # the user's, named like a later checkpoint
    (run / "step-000005" / "notes.txt").write_text("mine")
    snap = Snapshot(run / "step-000005")
    result = cli("finetune", "--resume", run, "--steps", 2, "--quiet")
    assert result.exit_code == 0, result.output
    snap.assert_unchanged()


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    user = tmp_path / "experiments"
    (user / "step-000001").mkdir(parents=True)
    (user / "config.json").write_text('{"my": "settings"}')
    snap = Snapshot(user)
    result = cli("finetune", "--resume", user, "--steps", 2)
    refused(result.exit_code, result.stderr, "--resume", "not the folder of a sharpscope")
    snap.assert_unchanged()


def test_a_run_of_an_older_sharpscope_without_a_marker_still_resumes(checkpoint, tmp_path):
    run = run_folder(checkpoint, tmp_path / "run", steps=2)
    for stamp in [run / MARKER, *run.glob(f"step-*/{MARKER}")]:
        stamp.unlink()  # as an older sharpscope left it
    result = cli("finetune", "--resume", run, "--steps", 3, "--quiet")
    assert result.exit_code == 0, result.output
    adopted = json.loads((run / MARKER).read_text())["adopted"]
    assert adopted == ["step-000000", "step-000001", "step-000002"]
    assert json.loads((run / "latest").read_text())["step"] == 3


# --- item 13: a run's latest must point into the run ----------------------------------------------


@pytest.mark.parametrize("pointer", ["../outside", "/tmp", "link"])
def test_latest_pointing_out_of_the_run_is_refused(checkpoint, tmp_path, pointer):
    run = run_folder(checkpoint, tmp_path / "run")
    outside = tmp_path / "outside"
    shutil.copytree(run / "step-000001", outside)
    if pointer == "link":
        shutil.rmtree(run / "step-000001")
        (run / "step-000001").symlink_to(outside)
        latest = {"step": 1, "dir": "step-000001"}
    else:
        latest = {"step": 1, "dir": pointer}
    (run / "latest").write_text(json.dumps(latest))
    snap = Snapshot(run, outside)
    result = cli("finetune", "--resume", run, "--steps", 2)
    refused(result.exit_code, result.stderr, "latest", "not the run's checkpoint folder")
    snap.assert_unchanged()


# --- item 9: analyze --out and landscape --out replace their files as one set ---------------------


def analyze_out(checkpoint: Path, out: Path, *extra: object) -> object:
    return cli("analyze", checkpoint, *FAST, "--out", out, *extra)


def interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def test_an_interrupted_analyze_out_leaves_the_previous_set(checkpoint, tmp_path, monkeypatch):
    """The eigenvectors were replaced before the plots and the report: an interrupt between them
    left the new eigenvectors beside the old report.json."""
    out = tmp_path / "out"
    assert analyze_out(checkpoint, out, "--density").exit_code == 0
    (out / "notes.txt").write_text("mine")  # a file of the user's in the folder
    snap = Snapshot(out)
    monkeypatch.setattr(outdir, "write_plots", interrupt)  # after the eigenvectors are written
    result = analyze_out(checkpoint, out, "--seed", 3)
    assert result.exit_code == 130, result.output
    snap.assert_unchanged()  # the old set, complete, and no temporary folder


def test_a_new_analyze_set_lists_its_files_and_drops_only_its_own_old_ones(checkpoint, tmp_path):
    out = tmp_path / "out"
    assert analyze_out(checkpoint, out, "--density").exit_code == 0
    (out / "density.png").write_text("mine now")  # no longer the file the report lists
    (out / "notes.png").write_text("mine")
    report = json.loads((out / "report.json").read_text())
    # a report naming another file, even with its right sha256, does not remove it
    report["files"]["notes.png"] = hashlib.sha256(b"mine").hexdigest()
    (out / "report.json").write_text(json.dumps(report))
    snap = Snapshot(out / "notes.png", out / "density.png")
    assert analyze_out(checkpoint, out).exit_code == 0  # no --density this time
    assert set(json.loads((out / "report.json").read_text())["files"]) == {
        "eigenvectors.safetensors",
        "convergence.png",
        "loss_slices.png",
    }
    snap.assert_unchanged()
    assert analyze_out(checkpoint, out, "--density").exit_code == 0
    assert analyze_out(checkpoint, out).exit_code == 0
    assert not (out / "density.png").exists()  # the previous set's, as its report listed it


def test_an_interrupted_landscape_out_leaves_the_previous_pair(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli("landscape", checkpoint, *LANDSCAPE, "--out", out).exit_code == 0
    snap = Snapshot(out)
    monkeypatch.setattr(
        "sharpscope.report.landscape_document.landscape_json", interrupt
    )  # after the PNG
    result = cli("landscape", checkpoint, *LANDSCAPE, "--out", out, "--force", "--seed", 2)
    assert result.exit_code == 130, result.output
    snap.assert_unchanged()


SIGNALLED = """\
import os, signal, sys
from pathlib import Path
from sharpscope.io.file_sets import replace_files

folder, when, signum = Path(sys.argv[1]), sys.argv[2], getattr(signal, sys.argv[3])
# Python's own SIGINT handler, as a process started from a terminal has (a background job of a
# shell without job control inherits SIGINT ignored, and an ignored signal changes nothing)
signal.signal(signal.SIGINT, signal.default_int_handler)

def write(stage):
    (stage / "eigenvectors.safetensors").write_text("new")
    if when == "writing":
        os.kill(os.getpid(), signum)
    (stage / "report.json").write_text("new")
    return ["eigenvectors.safetensors", "report.json"]

real = os.replace
def replace(*args):
    if when == "moving":
        os.kill(os.getpid(), signum)
    real(*args)
os.replace = replace
replace_files(folder, write)
print("finished")
"""


@pytest.mark.integration
@pytest.mark.parametrize("when", ["writing", "moving"])
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_leaves_the_old_set_or_the_new_one(
    tmp_path: Path, no_network: NetworkGuard, when: str, signum: str
):
    """A real signal in a fresh process: while the new files are written it removes them (the
    old set stays); while they are moved in it waits until all are (the new set)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("eigenvectors.safetensors", "report.json", "notes.txt"):
        (out / name).write_text("old" if name != "notes.txt" else "mine")
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED)
    done = subprocess.run(
        [sys.executable, str(script), str(out), when, signum],
        capture_output=True,
        text=True,
        env=no_network.env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == -getattr(signal, signum), done.stderr  # ended by the signal
    assert "finished" not in done.stdout
    contents = {p.name: p.read_text() for p in out.iterdir()}
    want = "old" if when == "writing" else "new"
    assert contents == {"eigenvectors.safetensors": want, "report.json": want, "notes.txt": "mine"}


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path):
    def write(stage: Path) -> list[str]:
        (stage / "a").write_text("a")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_files(tmp_path / "new", write)
    assert list(tmp_path.iterdir()) == []


# --- item 10: --junit and symlinked tokenizer files -----------------------------------------------


def test_junit_over_a_users_file_is_refused(checkpoint, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    other = tmp_path / "other.xml"
    other.write_text('<testsuites name="pytest"><testsuite name="x"/></testsuites>\n')
    snap = Snapshot(notes, other)
    for target in (notes, other):
        result = cli("check", checkpoint, *FAST, "--max-eigenvalue", 1e9, "--junit", target)
        refused(result.exit_code, result.stderr, "--junit", "not JUnit XML that sharpscope wrote")
        assert result.stdout == ""  # refused before the analysis
    snap.assert_unchanged()


def test_junit_replaces_its_own_previous_file(checkpoint, tmp_path):
    junit = tmp_path / "checks.xml"
    for _ in range(2):
        result = cli("check", checkpoint, *FAST, "--max-eigenvalue", 1e9, "--junit", junit)
        assert result.exit_code == 0, result.output
    assert 'name="sharpscope check"' in junit.read_text()


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_hf.VOCAB, (32, 7), generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.save(data, tmp_path / "tokens.pt")
    return tmp_path / "tokens.pt"


def finetune_bert(model: Path, tokens: Path, out: Path) -> object:
    return cli(
        *("finetune", model, "--data", tokens, "--val-data", tokens, "--out", out, "--steps", 1),
        *("--batch-size", 16, "--probe-size", 16, "--quiet", "--device", "cpu"),
    )


def test_a_tokenizer_file_linking_to_a_private_file_is_not_copied(tmp_path, tokens):
    model = tmp_path / "bert"
    tiny_hf.bert().save_pretrained(model)
    private = tmp_path / "id_rsa"
    private.write_text("PRIVATE KEY")
    (model / "tokenizer.json").symlink_to(private)
    snap = Snapshot(model, private)
    result = finetune_bert(model, tokens, tmp_path / "run")
    refused(result.exit_code, result.stderr, "tokenizer.json", "outside the model folder")
    assert not [p for p in tmp_path.rglob("run/**/*") if p.is_file() and "PRIVATE" in p.read_text()]
    snap.assert_unchanged()


def test_the_hugging_face_caches_links_into_blobs_are_copied(tmp_path, tokens):
    """The safe variant: a cache snapshot is made of links into the repository's blobs."""
    repo = tmp_path / "models--tiny--bert"
    model = repo / "snapshots" / "abc123"
    tiny_hf.bert().save_pretrained(model)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text('{"pad_token": "[PAD]"}\n')
    (model / "special_tokens_map.json").symlink_to(Path("../../blobs/f00d"))
    result = finetune_bert(model, tokens, tmp_path / "run")
    assert result.exit_code == 0, result.output
    copy = tmp_path / "run" / "step-000001" / "special_tokens_map.json"
    assert not copy.is_symlink() and copy.read_text() == '{"pad_token": "[PAD]"}\n'
