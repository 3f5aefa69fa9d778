"""The sharpness callbacks in real ``transformers.Trainer`` and ``lightning.Trainer`` runs (CPU,
float64, no download): the λ_max logged at step N is ``sharpscope analyze``'s of the checkpoint
the trainer saved at step N, and the callback leaves the training bit-identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tiny_hf
import torch
from torch import nn
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.io.architectures import cnn

pytestmark = pytest.mark.integration  # real transformers and lightning Trainer runs, end to end
N = 3
"""Steps between measurements and checkpoints; the runs take 2N steps."""
EXACT = ["--samples", "0", "-k", "1", "--tol", "1e-10", "--no-trace", "--dtype", "float64"]
TIGHT = dict(tol=1e-10, products=None, max_iter=300)
"""Tracker settings as tight as analyze's, so both are exact to rounding."""


def analyzed_lambda_max(checkpoint: Path, data: Path, out: Path, *model: str) -> float:
    """``sharpscope analyze``'s λ_max of ``checkpoint`` on all of ``data``, in float64."""
    args = ["analyze", str(checkpoint), *model, "--data", str(data), *EXACT, "--quiet"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    return report["results"]["eigenvalues"]["values"][0]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * abs(b)


# Hugging Face Trainer ----------------------------------------------------------------------


transformers = pytest.importorskip("transformers")


class Tokens(torch.utils.data.Dataset):
    """48 random token sequences with 3-class labels, as dicts."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, tiny_hf.VOCAB, (48, 7), generator=g)
        self.mask = torch.ones(48, 7, dtype=torch.int64)
        self.mask[::3, 5:] = 0
        self.labels = torch.randint(0, 3, (48,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    def probe(self) -> dict[str, torch.Tensor]:
        """The first 16 samples as one collated batch."""
        return {
            "input_ids": self.ids[:16],
            "attention_mask": self.mask[:16],
            "labels": self.labels[:16],
        }


def hf_run(out: Path, track: bool, **options: Any) -> tuple[Any, Any]:
    """2N steps of SGD on the tiny BERT in float64 with a checkpoint every N steps (the tracker's
    ``options``: :data:`TIGHT` unless given)."""
    from sharpscope.integrations.hf_callback import SharpnessCallback

    data = Tokens()
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=2 * N,
        per_device_train_batch_size=8,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        save_steps=N,
        save_strategy="steps",
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=tiny_hf.bert().double(), args=args, train_dataset=data)
    callback = None
    if track:
        callback = SharpnessCallback(trainer, [data.probe()], every=N, **(options or TIGHT))
        trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def test_hf_trainer_logs_the_lambda_max_that_analyze_finds_in_its_checkpoint(tmp_path: Path):
    trainer, callback = hf_run(tmp_path / "tracked", track=True)
    logged = {
        row["step"]: row for row in trainer.state.log_history if "sharpness/lambda_max" in row
    }
    assert sorted(logged) == [N, 2 * N]
    row = logged[N]
    assert row["sharpness/lambda_max_converged"] == 1.0 and row["sharpness/n_products"] > 0
    assert row["sharpness/lambda_max_residual"] <= 1e-8 * abs(row["sharpness/lambda_max"])
    probe = Tokens().probe()
    torch.save(probe, tmp_path / "probe.pt")
    checkpoint = tmp_path / "tracked" / f"checkpoint-{N}"
    exact = analyzed_lambda_max(checkpoint, tmp_path / "probe.pt", tmp_path / "report")
    assert close(row["sharpness/lambda_max"], exact)
    assert callback.tracker.last.warm_start  # step 2N started from step N's vector

    plain, _ = hf_run(tmp_path / "plain", track=False)
    tracked = trainer.model.state_dict()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, tracked[name]), name


# Lightning ---------------------------------------------------------------------------------


lightning = pytest.importorskip("lightning")
SPEC = ["--model", "cnn", "--model-arg", "in_channels=1", "--model-arg", "num_classes=3"]
SPEC += ["--model-arg", "width=4"]


def images() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 1, 8, 8, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (48,), generator=g))


class Classifier(lightning.LightningModule):
    """sharpscope's benchmark CNN (BatchNorm, so eval mode matters), trained by SGD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = cnn(in_channels=1, num_classes=3, width=4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def lightning_run(out: Path, track: bool, **options: Any) -> tuple[Classifier, Any]:
    from sharpscope.integrations.lightning_callback import SharpnessCallback

    data = images()
    probe = [(data.tensors[0][:16], data.tensors[1][:16])]
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=out, every_n_train_steps=N, save_top_k=-1, save_weights_only=True
    )
    callbacks: list[Any] = [checkpoints]
    if track:
        tracking = SharpnessCallback(
            nn.functional.cross_entropy, probe, every=N, **(options or TIGHT)
        )
        callbacks.append(tracking)
    trainer = lightning.Trainer(
        max_steps=2 * N,
        accelerator="cpu",
        logger=lightning.pytorch.loggers.CSVLogger(out, name="logs"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    lightning.seed_everything(0, verbose=False)
    module = Classifier()
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    trainer.fit(module, loader)
    return module, trainer


def test_lightning_logs_the_lambda_max_that_analyze_finds_in_its_checkpoint(tmp_path: Path):
    module, trainer = lightning_run(tmp_path / "tracked", track=True)
    trainer.loggers[0].save()
    lines = (Path(trainer.loggers[0].log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    logged = {
        int(r["step"]): float(r["sharpness/lambda_max"]) for r in rows if r["sharpness/lambda_max"]
    }
    assert sorted(logged) == [N, 2 * N]
    data = images()
    torch.save({"x": data.tensors[0][:16], "y": data.tensors[1][:16]}, tmp_path / "probe.pt")
    (checkpoint,) = (tmp_path / "tracked").glob(f"*step={N}.ckpt")
    # analyze reads the .ckpt but not its module's "net." prefix: the same weights without it
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.save({k.removeprefix("net."): v for k, v in weights.items()}, tmp_path / "step.pt")
    exact = analyzed_lambda_max(
        tmp_path / "step.pt", tmp_path / "probe.pt", tmp_path / "report", *SPEC
    )
    assert close(logged[N], exact)

    plain, _ = lightning_run(tmp_path / "plain", track=False)
    tracked = module.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, tracked[name]), name


def test_the_callbacks_track_the_critical_sharpness_along_each_update(tmp_path: Path):
    """``measure="critical"``: both callbacks tell the tracker of the tracking step's start, so
    λ_c is measured along the step's own update, with no product."""
    trainer, callback = hf_run(tmp_path / "hf", track=True, measure="critical")
    rows = [row for row in trainer.state.log_history if "sharpness/lambda_c_low" in row]
    assert [row["step"] for row in rows] == [N, 2 * N]
    assert all(row["sharpness/n_products"] == 0 for row in rows)
    assert callback.tracker.last.lambda_c_direction == "update"
    _, trainer = lightning_run(tmp_path / "pl", track=True, measure="critical")
    (tracking,) = (c for c in trainer.callbacks if hasattr(c, "tracker"))
    last = tracking.tracker.last
    assert last.step == 2 * N and last.lambda_c_direction == "update" and last.lambda_c_low > 0
