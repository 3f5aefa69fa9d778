"""``finetune --fsdp``: the model and SGD's momentum sharded over Gloo ranks by FSDP2, with
sharded checkpoints (torch.distributed.checkpoint), against one process holding the whole model,
in float64 on the tiny MLP; the rows' λ_max (finite differences on both sides) and critical
sharpness too, the tracker's warm start resumed from the shards.

The launches overlap where they do not depend on each other: 2 ranks for 8 steps in one go, and
2 ranks for 4 steps then resumed on 2 ranks (bit for bit) and, from a copy, on 3 ranks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_processes import assert_same, latest_step
from safetensors.torch import load_file
from test_distributed import finished, launch
from test_distributed_finetune import assert_close, weights
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.training import run as training_run
from sharpscope.training.metrics import read_rows

pytestmark = pytest.mark.integration  # torchrun
REL = 1e-10
"""One process against the sharded ranks: only the order of the sums differs."""
LOSSES = ("loss", "accuracy", "val_loss", "val_accuracy", "probe_loss", "probe_accuracy")
TRACKED = ("lambda_max", "alignment", "lambda_c", "lambda_c_low", "lambda_c_high")
"""The curvature figures compared to 1e-6: λ_max's products are finite differences."""
KILLER = '''
import os
import signal

import torch

import sharpscope.training.run as run

saving = run.save_sharded


def killed_mid_save(folder, model, optimizer, *more):
    """Rank 1 writes its shards of the checkpoint of step $SHARPSCOPE_TEST_KILL_AT, then dies."""
    saving(folder, model, optimizer, *more)
    at = os.environ.get("SHARPSCOPE_TEST_KILL_AT")
    if os.environ.get("RANK") == "1" and at and f".step-{int(at):06d}." in str(folder):
        os.kill(os.getpid(), signal.SIGKILL)


run.save_sharded = killed_mid_save


def data():
    inputs = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    return inputs, torch.arange(96) % 10
'''


def command(data: Path | str, steps: int, out: Path, *extra: object) -> list[str]:
    """A float64 SGD run with momentum and weight decay (so the optimizer has state, and a
    step of zero gradients would change it), tracking λ_max (3 products of finite differences)
    and the critical sharpness every 2 steps, saved every 4."""
    return [
        *("finetune", "--data", str(data), "--steps", str(steps), "--out", str(out)),
        *("--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "0.01", "--lr", "0.05"),
        *("--dtype", "float64", "--batch-size", "48", "--probe-size", "48", "--device", "cpu"),
        *("--track-every", "2", "--save-every", "4", "--track-iters", "3"),
        *("--backend", "finite-difference", "--track-measure", "both"),
        *map(str, extra),
    ]


def sharpscope(args: list[str], nproc: int, **env: str) -> Any:
    """``python -m sharpscope ARGS`` on ``nproc`` ranks, started (see :func:`finished`)."""
    return launch(["-m", "sharpscope", *args], nproc, **env)


@pytest.fixture(scope="module")
def runs(
    finetune_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The run folders: ``one`` process, ``straight`` (2 ranks, 8 steps, ``--keep 2``),
    ``two`` and ``three`` (2 ranks for 4 steps, resumed to 8 on 2 and on 3 ranks), and the
    straight run's stderr."""
    folder = tmp_path_factory.mktemp("fsdp-finetune")
    ckpt, data = str(finetune_files["checkpoint"]), finetune_files["data"]
    paths = {name: folder / name for name in ("one", "straight", "two", "three")}
    straight = sharpscope([*command(data, 8, paths["straight"], "--fsdp", "--keep", "2"), ckpt], 2)
    half = sharpscope([*command(data, 4, paths["two"], "--fsdp", "--quiet"), ckpt], 2)
    result = CliRunner().invoke(app, [*command(data, 8, paths["one"], "--quiet"), ckpt])
    assert result.exit_code == 0, result.output
    done = finished(half)
    assert done.returncode == 0, done.stderr
    shutil.copytree(paths["two"], paths["three"])
    resumed = [
        sharpscope(["finetune", "--resume", str(paths[name]), "--steps", "8", "--quiet"], n)
        for name, n in (("two", 2), ("three", 3))
    ]
    outcomes = [finished(p) for p in (straight, *resumed)]
    for outcome in outcomes:
        assert outcome.returncode == 0, outcome.stderr
    yield {**paths, "stderr": outcomes[0].stderr}


def losses(run: Path, keys: tuple[str, ...] = LOSSES) -> list[dict[str, Any]]:
    """The run's rows: step and the ``keys`` figures (the loss and accuracy ones)."""
    return [{k: r[k] for k in ("step", *keys)} for r in read_rows(run / "metrics.jsonl")]


def assert_losses_close(a: Path, b: Path, rel: float, keys: tuple[str, ...] = LOSSES) -> None:
    """The same steps, with the same ``keys`` figures (the losses and accuracies) to ``rel``
    relative."""
    one, two = losses(a, keys), losses(b, keys)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for x, y in zip(one, two, strict=True):
        for key in keys:
            assert (x[key] is None) == (y[key] is None), (x["step"], key)
            if x[key] is not None:
                assert abs(x[key] - y[key]) <= rel * abs(y[key]), (x["step"], key, x[key], y[key])


def test_two_sharded_ranks_equal_one_process(runs: dict[str, Any]):
    straight, one = runs["straight"], runs["one"]
    assert_close(weights(straight), weights(one), REL)
    assert_losses_close(straight, one, REL)
    assert [r["step"] for r in losses(straight)] == [0, 2, 4, 6, 8]
    rows = losses(straight, TRACKED)
    assert all(r["lambda_max"] > 0 and r["lambda_c"] is not None for r in rows), rows
    assert_losses_close(straight, one, 1e-6, TRACKED)
    # --keep 2: the last two checkpoints, each with its shards, and no staging folder left
    assert sorted(p.name for p in straight.iterdir() if "step-" in p.name) == [
        "step-000004",
        "step-000008",
    ]
    for step in ("step-000004", "step-000008"):
        shards = sorted(p.name for p in (straight / step / "sharded").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = torch.load(straight / "step-000008" / "trainer.pt", weights_only=True)
    assert "optimizer" not in state  # sharded, in sharded/
    assert state["tracker"]["top"] == state["tracker"]["next"] == "sharded"  # so the vectors
    # 1,210 float64 parameters: 4,840 bytes per rank, as much of momentum, and the tracker's
    # 3 Lanczos vectors and its copy of the weights
    assert (
        "plan: --fsdp over 2 ranks: per rank 4.84 kB of parameter shards, 4.84 kB of "
        "optimizer state and the tracker's vectors ≤ 19.4 kB (4 × 4.84 kB)" in runs["stderr"]
    ), runs["stderr"]
    assert "backend" not in runs["stderr"]  # named: nothing chosen


def test_a_sharded_checkpoint_resumes_bit_for_bit_on_two_ranks_and_on_three(
    runs: dict[str, Any],
):
    assert_same(weights(runs["two"]), weights(runs["straight"]))
    assert losses(runs["two"], (*LOSSES, *TRACKED)) == losses(runs["straight"], (*LOSSES, *TRACKED))
    assert_close(weights(runs["three"]), weights(runs["one"]), REL)
    assert_losses_close(runs["three"], runs["one"], REL)
    assert_losses_close(runs["three"], runs["one"], 1e-6, TRACKED)  # the warm start resharded


def test_analyze_reads_a_sharded_runs_weights(runs: dict[str, Any], finetune_files):
    weights_file = runs["straight"] / "step-000008" / "model.safetensors"
    args = ["analyze", str(weights_file), "--data", str(finetune_files["data"]), "--json"]
    result = CliRunner().invoke(app, [*args, "--top-k", "1", "--dtype", "float64", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["lambda_max"] > 0


def test_a_rank_killed_mid_save_leaves_the_last_checkpoint_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Rank 1 is SIGKILLed after writing its shards of step 2, before the checkpoint is renamed
    into place: step 0 stays the latest, whole; the resumed run equals one process's (from step
    0, whose shards hold no optimizer state yet: loading them must not make one)."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    data = f"{script}:data"
    start = tmp_path / "start.safetensors"
    _save_start(start)
    run, one = tmp_path / "run", tmp_path / "one"
    args = [*command(data, 6, run, "--fsdp", "--quiet", "--save-every", 2), str(start)]
    killed = finished(sharpscope([*args, "--dist-timeout", "20"], 2, SHARPSCOPE_TEST_KILL_AT="2"))
    assert killed.returncode != 0
    assert latest_step(run) == 0
    assert (run / "step-000000" / "sharded" / ".metadata").is_file()
    assert [p.name[:13] for p in run.glob(".step-*.tmp")] == [".step-000002."]  # the shards
    resumed = finished(sharpscope(["finetune", "--resume", str(run), "--data", data, "--quiet"], 2))
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.glob(".step-*.tmp"))  # the half-written checkpoint is gone
    monkeypatch.setattr(training_run, "save_sharded", training_run.save_sharded)  # put back after
    reference = [*command(data, 6, one, "--quiet", "--save-every", 2), str(start)]
    result = CliRunner().invoke(app, reference)
    assert result.exit_code == 0, result.output
    assert_close(weights(run), weights(one), REL)


STREAM_KILLER = KILLER.replace(
    "run.save_sharded = killed_mid_save",
    """import sharpscope.training.sharded_state as sharded_state

whole = sharded_state._whole
gathers = []


def killed_mid_stream(tensor):
    \"\"\"Rank 1 dies at its gather number $SHARPSCOPE_TEST_KILL_GATHER (from 1): mid-stream of
    model.safetensors, rank 0 having written its header and first tensors.\"\"\"
    gathers.append(tensor)
    at = int(os.environ["SHARPSCOPE_TEST_KILL_GATHER"])
    if os.environ.get("RANK") == "1" and len(gathers) == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return whole(tensor)


sharded_state._whole = killed_mid_stream""",
)


def test_a_rank_killed_mid_stream_leaves_no_model_file_and_the_last_checkpoint_intact(
    tmp_path: Path,
):
    """Rank 1 is SIGKILLed while rank 0 streams step 2's model.safetensors (the MLP's 4 tensors
    of step 0, then the 2nd of step 2): no step 2, and no model.safetensors but step 0's,
    whole; the run resumes from step 0 and removes the half-written checkpoint."""
    script = tmp_path / "killer.py"
    script.write_text(STREAM_KILLER, encoding="utf-8")
    data = f"{script}:data"
    start = tmp_path / "start.safetensors"
    _save_start(start)
    run = tmp_path / "run"
    args = [*command(data, 6, run, "--fsdp", "--quiet", "--save-every", 2), str(start)]
    killed = finished(
        sharpscope([*args, "--dist-timeout", "20"], 2, SHARPSCOPE_TEST_KILL_GATHER="6")
    )
    assert killed.returncode != 0
    assert latest_step(run) == 0
    assert [p.relative_to(run) for p in run.rglob("model.safetensors")] == [
        Path("step-000000/model.safetensors")
    ]
    assert len(load_file(str(run / "step-000000" / "model.safetensors"))) == 4
    assert [p.name[:13] for p in run.glob(".step-*.tmp")] == [".step-000002."]
    resumed = finished(
        sharpscope(
            ["finetune", "--resume", str(run), "--data", data, "--quiet"],
            2,
            SHARPSCOPE_TEST_KILL_GATHER="0",
        )
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.glob(".step-*.tmp")) and latest_step(run) == 6


def _save_start(path: Path) -> None:
    """The tiny MLP (64 -> 16 -> 10) of ``finetune_files``' kind, untrained."""
    from sharpscope.io.checkpoints import save_checkpoint
    from sharpscope.io.models import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (16,)})
    save_checkpoint(path, build_model(spec), spec)


def test_a_hugging_face_model_trains_sharded_per_block_into_save_pretrained_folders(
    tmp_path: Path,
):
    """The tiny BERT (its layers sharded as ``analyze --fsdp`` shards them) on 2 ranks equals one
    process, and its checkpoints are save_pretrained folders with the tokenizer, as one process
    writes, plus the shards (the whole weights are gathered before save_pretrained)."""
    pytest.importorskip("transformers")
    import tiny_hf

    files = tiny_hf.bert_run_inputs(tmp_path)
    ckpt, data = str(files["checkpoint"]), files["data"]
    args = ["--batch-size", "16", "--probe-size", "32", "--save-every", "2", "--track-every", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    sharded = sharpscope([*command(data, 4, two, "--fsdp", "--quiet"), *args, ckpt], 2)
    result = CliRunner().invoke(app, [*command(data, 4, one, "--quiet"), *args, ckpt])
    assert result.exit_code == 0, result.output
    done = finished(sharded)
    assert done.returncode == 0, done.stderr
    a, b = weights(two), weights(one)  # as a whole: the key biases stay ~1e-24, rounding
    error = sum(float((a[k] - b[k]).norm()) ** 2 for k in b) ** 0.5
    assert a.keys() == b.keys() and error <= REL * sum(float(t.norm()) ** 2 for t in b.values())
    assert sorted(p.name for p in (two / "step-000004").iterdir()) == sorted(
        [*(p.name for p in (one / "step-000004").iterdir()), "sharded"]
    )
    assert_losses_close(two, one, REL)


def eigen_sam(data: Path | str, steps: int, out: Path, *extra: object) -> list[str]:
    """:func:`command` with Eigen-SAM (its eigenvector refreshed every 2 steps by 3 products of
    finite differences) in place of SGD, without momentum: the base optimizer then has no state,
    and the checkpoint must keep Eigen-SAM's own."""
    args = ("--optimizer", "eigen-sam", "--eig-every", "2", "--eig-steps", "3", "--momentum", "0")
    return command(data, steps, out, *args, *extra)


@pytest.fixture(scope="module")
def sam_runs(
    finetune_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Path]]:
    """Eigen-SAM's run folders: ``one`` process, ``straight`` (2 ranks, 8 steps) and ``resumed``
    (2 ranks for 4 steps, then resumed to 8 on 2 ranks); ``asam``, 2 ranks of ASAM for 8 steps,
    and ``asam_one``, one process's."""
    folder = tmp_path_factory.mktemp("fsdp-eigen-sam")
    ckpt, data = str(finetune_files["checkpoint"]), finetune_files["data"]
    names = ("one", "straight", "resumed", "asam", "asam_one")
    paths = {name: folder / name for name in names}
    asam = ("--optimizer", "asam", "--rho", "0.5")
    started = [
        sharpscope([*eigen_sam(data, 8, paths["straight"], "--fsdp", "--quiet"), ckpt], 2),
        sharpscope([*eigen_sam(data, 4, paths["resumed"], "--fsdp", "--quiet"), ckpt], 2),
    ]
    for args in (
        eigen_sam(data, 8, paths["one"], "--quiet"),
        command(data, 8, paths["asam_one"], *asam, "--quiet"),
    ):
        result = CliRunner().invoke(app, [*args, ckpt])
        assert result.exit_code == 0, result.output
    for outcome in map(finished, started):
        assert outcome.returncode == 0, outcome.stderr
    later = [
        sharpscope(["finetune", "--resume", str(paths["resumed"]), "--steps", "8", "--quiet"], 2),
        sharpscope([*command(data, 8, paths["asam"], *asam, "--fsdp", "--quiet"), ckpt], 2),
    ]
    for outcome in map(finished, later):
        assert outcome.returncode == 0, outcome.stderr
    yield paths


def esam_rows(run: Path) -> list[tuple[Any, ...]]:
    """Each row's step and Eigen-SAM figures (eigenvalue, residual, alignment)."""
    keys = ("esam_eigenvalue", "esam_residual", "esam_alignment")
    return [(r["step"], *(r[k] for k in keys)) for r in read_rows(run / "metrics.jsonl")]


def test_eigen_sam_and_asam_on_two_sharded_ranks_equal_one_process(sam_runs: dict[str, Path]):
    straight, one = sam_runs["straight"], sam_runs["one"]
    assert_close(weights(straight), weights(one), 1e-6)
    assert_losses_close(straight, one, 1e-6)
    sharded, whole = esam_rows(straight), esam_rows(one)
    assert [r[0] for r in sharded] == [r[0] for r in whole] == [0, 2, 4, 6, 8]
    assert sharded[-1][1] is not None  # refreshed: the figures are compared, not two Nones
    for a, b in zip(sharded, whole, strict=True):
        for x, y in zip(a[1:], b[1:], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= 1e-6 * max(abs(y), 1e-3), (a, b)
    assert_close(weights(sam_runs["asam"]), weights(sam_runs["asam_one"]), 1e-6)
    assert_losses_close(sam_runs["asam"], sam_runs["asam_one"], 1e-6)


def test_eigen_sam_resumes_from_a_sharded_checkpoint_bit_for_bit(sam_runs: dict[str, Path]):
    """The eigenvector, the estimate and the momentum come back from the shards: the resumed
    run ends where the straight one does."""
    assert_same(weights(sam_runs["resumed"]), weights(sam_runs["straight"]))
    assert esam_rows(sam_runs["resumed"]) == esam_rows(sam_runs["straight"])
