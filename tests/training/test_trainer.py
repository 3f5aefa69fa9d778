"""The fine-tuning library, in process: data order, trainer state, tracking, logs, run folders."""

from __future__ import annotations

import json
import random
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.curvature import Objective
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import load_model, save_checkpoint
from sharpscope.io.data import DataBundle
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.optim import EigenSAM
from sharpscope.settings import fallbacks
from sharpscope.training.metrics import CSV, JSONL, MetricsLog, read_rows
from sharpscope.training.optimizers import OptimizerSettings, build_optimizer, build_scheduler
from sharpscope.training.options import DEFAULT_EPOCHS
from sharpscope.training.order import DataOrder
from sharpscope.training.plan import RunOptions, new_run, resume_run
from sharpscope.training.run_config import RunConfig, resumed
from sharpscope.training.run_dir import LATEST, MARKER, MODEL, STEP_KEY, TRAINER, RunDir
from sharpscope.training.state import (
    capture_rng,
    load_trainer_state,
    restore_rng,
    save_trainer_state,
    seed_everything,
)
from sharpscope.training.tracking import SharpnessTracker, Tracker
from sharpscope.training.trainer import FIELDS, Diverged, Hooks, Session, run

CE = nn.functional.cross_entropy


def blobs(n: int = 96, seed: int = 0) -> DataBundle:
    """Three Gaussian classes in 6 dimensions."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    inputs = torch.randn(n, 6, generator=gen) + 2.0 * nn.functional.one_hot(targets, 6).float()
    return DataBundle(inputs, targets, 3, "blobs", "train")


def dropout_net() -> nn.Module:
    """A small MLP with dropout, so that training draws from torch's global generator."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3))


def session(
    model: nn.Module, name: str = "eigen-sam", total: int = 20, precision: str = "float32"
) -> Session:
    settings = OptimizerSettings(
        optimizer=name,
        **dict(lr=0.1, momentum=0.9, weight_decay=1e-4, rho=0.05, alpha=0.2),
        **dict(eig_every=4, eig_steps=3, seed=0),
    )
    optimizer, hook = build_optimizer(model, CE, settings)
    scheduler = build_scheduler(optimizer, "cosine", total)
    order = DataOrder(96, 16, seed=0)
    cpu = torch.device("cpu")
    return Session(
        model,
        CE,
        blobs(),
        optimizer,
        scheduler,
        order,
        cpu,
        torch.float32,
        hook=hook,
        precision=precision,
    )


def tracker(s: Session) -> Tracker:
    probe = [(s.data.inputs[:48], s.data.targets[:48])]
    return Tracker(
        SharpnessTracker(Objective(s.model, CE, probe), seed=0, products=None, max_iter=10), None
    )


def config(**changes: Any) -> RunConfig:
    base = dict(
        checkpoint="start.safetensors",
        checkpoint_sha256="ab",
        model='{"args": {}, "target": "mlp"}',
        data="digits",
        split="train",
        val_data=None,
        loss="cross-entropy",
        optimizer="sam",
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        rho=0.05,
        alpha=0.2,
        eig_every=100,
        eig_steps=5,
        schedule="constant",
        batch_size=32,
        seed=0,
        dtype="float32",
        probe_size=64,
        track_iters=10,
        steps=None,
        epochs=DEFAULT_EPOCHS,
        track_every=10,
        save_every=10,
        keep=2,
        device="cpu",
    )
    return RunConfig(**{**base, **changes})


def test_data_order_is_a_seeded_permutation_per_epoch_and_restores_mid_epoch():
    order = DataOrder(10, 3, seed=5)
    assert order.steps_per_epoch == 3  # the incomplete last batch is dropped
    first = torch.cat([order.next_batch() for _ in range(3)])
    assert len(set(first.tolist())) == 9
    state = order.state_dict()
    ahead = [order.next_batch() for _ in range(4)]
    again = DataOrder(10, 3, seed=5)
    again.load_state_dict(state)
    assert all(
        torch.equal(a, b)
        for a, b in zip(ahead, [again.next_batch() for _ in range(4)], strict=True)
    )
    assert again.epoch == 2
    assert not torch.equal(
        DataOrder(10, 3, seed=6).next_batch(), DataOrder(10, 3, seed=5).next_batch()
    )
    with pytest.raises(ValueError, match="batches of"):
        DataOrder(10, 2, seed=5).load_state_dict(state)


def test_trainer_state_is_weights_only_and_restores_every_generator(tmp_path: Path):
    seed_everything(3)
    path = tmp_path / "trainer.pt"
    save_trainer_state(path, {"rng": capture_rng(), "step": 7})
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    state = load_trainer_state(path)  # weights_only=True inside
    assert state["step"] == 7 and state["format"] == 1
    restore_rng(state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], again[0])
    assert np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]
    assert [p.name for p in tmp_path.iterdir()] == ["trainer.pt"]  # no temporary file left
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read the trainer state"):
        load_trainer_state(path)


def test_tracking_frequency_does_not_change_the_weights():
    """Tracking draws nothing from the training's generators (dropout here) and leaves the
    model's mode and gradients alone, so any --track-every trains the same weights."""
    finals = []
    for every in (1, 7, 50):
        seed_everything(0)
        s = session(dropout_net())
        rows: list[dict[str, Any]] = []
        assert run(s, 20, tracker(s), every, 100, Hooks(rows.append, lambda: None))
        assert rows[-1]["step"] == 20 and len(rows) == len(range(every, 21, every)) + (
            20 % every > 0
        )
        finals.append([p.detach().clone() for p in s.model.parameters()])
    assert isinstance(s.optimizer, EigenSAM) and s.optimizer.estimate is not None
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other, strict=True))


def test_session_state_round_trip_continues_bit_identically():
    seed_everything(0)
    straight = session(dropout_net())
    noop = Hooks(lambda row: None, lambda: None)
    run(straight, 20, tracker(straight), 5, 100, noop)

    seed_everything(0)
    first = session(dropout_net())
    run(first, 10, tracker(first), 5, 100, noop)
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    state = first.state_dict()
    torch.manual_seed(123)  # whatever happens in between is undone by the restore
    second = session(dropout_net())
    second.model.load_state_dict(weights)
    second.load_state_dict(state)
    assert second.step == 10 and second.optimizer.global_step == 10
    run(second, 20, tracker(second), 5, 100, noop)
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_sharded_session_leaves_the_optimizer_out_and_takes_its_rate_from_the_schedule():
    """Under ``fsdp`` the optimizer's state is in the checkpoint's shards, which hold none for
    SGD without momentum: the learning rate must come back from the (cosine) schedule."""
    noop = Hooks(lambda row: None, lambda: None)
    first = session(dropout_net(), "sgd")
    first.sharded = True
    run(first, 5, tracker(first), 5, 100, noop)
    state = first.state_dict()
    assert "optimizer" not in state
    second = session(dropout_net(), "sgd")
    second.sharded = True
    second.load_state_dict(state)
    rate = first.optimizer.param_groups[0]["lr"]
    assert second.optimizer.param_groups[0]["lr"] == rate < 0.1


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_a_non_finite_loss_stops_before_the_weights_move(name: str):
    s = session(dropout_net(), name)
    before = [p.detach().clone() for p in s.model.parameters()]
    s.loss_fn = lambda out, y: CE(out, y) * float("nan")
    with pytest.raises(Diverged, match="the loss became nan at step 1"):
        s.train_step()
    assert all(torch.equal(a, p) for a, p in zip(before, s.model.parameters(), strict=True))


def test_rows_hold_every_field_and_eigen_sam_figures():
    seed_everything(0)
    s = session(dropout_net(), total=8)
    rows: list[dict[str, Any]] = []
    run(s, 8, tracker(s), 4, 100, Hooks(rows.append, lambda: None))
    last = rows[-1]
    assert set(last) == set(FIELDS)
    assert last["esam_eigenvalue"] is not None and last["esam_alignment"] is not None
    assert 0 <= last["alignment"] <= 1 and last["lambda_max"] > 0
    assert last["lr"] == pytest.approx(0.0)  # cosine schedule at its end
    assert last["epoch"] == pytest.approx(8 / 6)


@pytest.mark.parametrize("name", ["sgd", "sam", "eigen-sam"])
def test_bf16_steps_autocast_the_passes_and_keep_float32_weights_and_products(name: str):
    """bf16 moves the weights differently from float32, but only by bfloat16's rounding; the
    weights, Eigen-SAM's refresh and the tracker stay float32; the rows say which is which."""
    runs = {}
    for precision in ("float32", "bf16"):
        seed_everything(0)
        s = session(dropout_net(), name, total=8, precision=precision)
        rows: list[dict[str, Any]] = []
        run(s, 8, tracker(s), 4, 100, Hooks(rows.append, lambda: None))
        runs[precision] = (torch.cat([p.detach().reshape(-1) for p in s.model.parameters()]), s)
        assert [r["precision"] for r in rows] == [precision] * 2
        assert {(r["curvature"], r["product_dtype"]) for r in rows} == {("hessian", "float32")}
        assert rows[1]["loss"] < rows[0]["loss"]
    (plain, _), (bf16, s) = runs["float32"], runs["bf16"]
    assert bf16.dtype == torch.float32 and not torch.equal(plain, bf16)
    assert (bf16 - plain).norm() < 0.01 * plain.norm()  # bfloat16 rounding (5e-4 here)
    if name == "eigen-sam":
        assert s.hook.estimate is not None and s.hook.estimate.dtype == "float32"


def test_metrics_log_resume_keeps_rows_up_to_the_checkpoint(tmp_path: Path):
    fields = ("step", "loss")
    with MetricsLog(tmp_path, fields, None) as log:
        for step in range(0, 60, 10):
            log.append({"step": step, "loss": float("nan") if step == 50 else step / 10})
    assert read_rows(tmp_path / JSONL)[-1] == {"step": 50, "loss": None}
    with (tmp_path / JSONL).open("a") as f:
        f.write('{"step": 60, "lo')  # a row cut short by a kill
    with MetricsLog(tmp_path, fields, 20) as log:
        assert [r["step"] for r in log.rows] == [0, 10, 20]
        log.append({"step": 30, "loss": 9.0})
    assert [r["step"] for r in read_rows(tmp_path / JSONL)] == [0, 10, 20, 30]
    csv_lines = (tmp_path / CSV).read_text().splitlines()
    assert csv_lines == ["step,loss", "0,0.0", "10,1.0", "20,2.0", "30,9.0"]


def test_tensorboard_is_written_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    made: list[Any] = []

    class Writer:
        def __init__(self, folder: str, purge_step: int | None) -> None:
            self.purge_step, self.scalars = purge_step, []
            made.append(self)

        def add_scalar(self, name: str, value: float, step: int) -> None:
            self.scalars.append((name, value, step))

        def flush(self) -> None: ...

        def close(self) -> None: ...

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with MetricsLog(tmp_path, ("step", "loss", "accuracy"), 40) as log:
        log.append({"step": 50, "loss": 0.5})
    assert made[0].purge_step == 41
    assert made[0].scalars == [("loss", 0.5, 50)]


def test_resume_keeps_fixed_settings_and_may_extend_the_run():
    stored = config()
    assert resumed(stored, {"lr": 0.1, "seed": 0}, "c.json") == stored
    longer = resumed(stored, {"steps": 500, "track_every": 5}, "c.json")
    assert (longer.steps, longer.epochs, longer.track_every) == (500, None, 5)
    assert resumed(longer, {"epochs": 3}, "c.json").total_steps(11) == 33
    with pytest.raises(InputError, match=r"`lr` 0.5 differs from the run's 0.1 \(c.json\)"):
        resumed(stored, {"lr": 0.5}, "c.json")
    with pytest.raises(InputError, match="`optimizer`"):
        resumed(stored, {"optimizer": "eigen-sam"}, "c.json")
    with pytest.raises(InputError, match="`checkpoint` is not the file the run started from"):
        resumed(stored, {"checkpoint_sha256": "cd"}, "c.json")
    assert RunConfig.from_json(stored.to_json(), "c.json") == stored


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "adam"}, "unknown `optimizer` 'adam'"),
        ({"schedule": "step"}, "unknown `schedule`"),
        ({"steps": 10}, "either `steps` or `epochs`, not both"),
        ({"epochs": None}, "either `steps` or `epochs`$"),
        ({"lr": 0.0}, "^`lr` must be positive"),
        ({"keep": 0}, "^`keep` must be positive"),
        ({"rho": -1.0}, "^`rho` must be at least 0"),
        ({"curvature": "gauss-newton"}, "unknown `curvature` 'gauss-newton'"),
        ({"precision": "fp16"}, "unknown `precision` 'fp16'; choose one of float32, bf16"),
        ({"precision": "bf16", "dtype": "float64"}, "use `dtype` float32 with it"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any], message: str):
    with pytest.raises(InputError, match=message):
        config(**changes)


def test_per_rank_sam_is_a_run_setting_that_older_configs_lack():
    stored = json.loads(config(per_rank_sam=True).to_json())
    assert RunConfig.from_json(json.dumps(stored), "c.json").per_rank_sam
    del stored["per_rank_sam"]
    assert not RunConfig.from_json(json.dumps(stored), "c.json").per_rank_sam
    with pytest.raises(
        InputError, match=r"`per_rank_sam` needs a SAM-style optimizer \(sam, asam or eigen-sam\)"
    ):
        config(optimizer="sgd", per_rank_sam=True)


def writer(model: nn.Module, spec: ModelSpec, step: int) -> Callable[[Path], None]:
    """What a run writes of its model into a checkpoint folder (training.run.Saver)."""
    return lambda folder: save_checkpoint(folder / MODEL, model, spec, {STEP_KEY: str(step)})


def test_run_dir_keeps_the_last_checkpoints_and_points_latest_at_whole_ones(tmp_path: Path):
    spec = ModelSpec("mlp", {"hidden": (4,)})
    model = build_model(spec)
    folder = RunDir(tmp_path / "run")
    folder.prepare_new()
    assert folder.latest() is None
    for step in (0, 10, 20, 30):
        folder.save(step, writer(model, spec, step), {"step": step}, keep=2)
    step, last = folder.latest()  # type: ignore[misc]
    assert (step, last.name) == (30, "step-000030")
    assert sorted(p.name for p in folder.path.glob("step-*")) == ["step-000020", "step-000030"]
    assert load_trainer_state(last / TRAINER)["step"] == 30
    _, checkpoint = load_model(last / MODEL)  # no spec given: it is in the metadata
    assert checkpoint.model_spec == spec and checkpoint.metadata["sharpscope.step"] == "30"
    stamp = (folder.path / MARKER).read_text()
    for name in ("step-000040", ".step-000050.x1y2.tmp", "step-000060", ".step-000070.a.tmp"):
        (folder.path / name).mkdir()
    # a checkpoint a kill left renamed but not pointed at, and one it left half-written
    (folder.path / "step-000040" / MODEL).write_bytes(b"partial")
    (folder.path / "step-000040" / MARKER).write_text(stamp)
    (folder.path / ".step-000050.x1y2.tmp" / MARKER).write_text(stamp)
    # folders named so that this run did not write (no stamp, or another run's) are kept
    (folder.path / "step-000060" / MARKER).write_text('{"run_id": "another"}')
    folder.discard_after(30)
    assert not (folder.path / "step-000040").exists()
    names = [".sharpscope-run", ".step-000070.a.tmp", "latest", "step-000020", "step-000030"]
    assert sorted(p.name for p in folder.path.iterdir()) == [*names, "step-000060"]
    json.loads((folder.path / LATEST).read_text())
    with pytest.raises(InputError, match="already holds a run"):
        folder.prepare_new()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"is not a sharpscope run .* pass `force`"):
        RunDir(tmp_path / "other").prepare_new()


def test_a_new_run_takes_the_defaults_and_a_resumed_one_its_own_settings(tmp_path: Path):
    start = tmp_path / "start.safetensors"
    spec = ModelSpec("mlp", {"hidden": (4,)})
    model = build_model(spec)
    plan = new_run(start, RunOptions(data="digits", optimizer="asam", lr=0.5), tmp_path / "run")
    assert plan.folder.path.is_dir() and plan.resume_from is None and plan.weights == start
    assert (plan.config.optimizer, plan.config.lr, plan.config.rho) == ("asam", 0.5, 0.5)
    assert (plan.config.steps, plan.config.epochs) == (None, DEFAULT_EPOCHS)
    assert plan.config.momentum == fallbacks(RunOptions)["momentum"] == 0.9
    assert plan.config.val_data is None
    config, _ = plan.loaded("ab", spec, pretrained=False)
    assert (config.checkpoint_sha256, config.model, config.layout) == (
        "ab",
        spec.to_json(),
        "safetensors",
    )
    plan.folder.write_config(config)
    plan.folder.save(0, writer(model, spec, 0), {"step": 0}, keep=2)

    again = resume_run(plan.folder.path, RunOptions(lr=0.5, steps=40, keep=1))
    assert again.config == replace(config, steps=40, epochs=None, keep=1)
    assert again.resume_from == plan.folder.path / "step-000000"
    assert again.loaded("cd", spec, False) == (again.config, spec)  # a resume keeps its start
    with pytest.raises(InputError, match=r"^`lr` 0.1 differs from the run's 0.5"):
        resume_run(plan.folder.path, RunOptions(lr=0.1))
    with pytest.raises(InputError, match=r"^`out` .* is not the run's folder"):
        resume_run(plan.folder.path, RunOptions(), out=tmp_path / "elsewhere")
    with pytest.raises(InputError, match=r"^`resume` .* does not exist$"):
        resume_run(tmp_path / "missing", RunOptions())
    with pytest.raises(InputError, match=r"^give a `checkpoint` and `data`"):
        new_run(start, RunOptions(), tmp_path / "other")
