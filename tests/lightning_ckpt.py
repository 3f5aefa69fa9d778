"""Checkpoints saved by a real ``lightning.Trainer``, of a ``LightningModule`` that holds its
networks as attributes (``self.net``, ``self.ema``), for the tests that load them bare."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning
import torch
from torch import nn


class Holder(lightning.LightningModule):
    """Trains the first of its networks (attributes named as the keywords) by SGD."""

    def __init__(self, **networks: nn.Module) -> None:
        super().__init__()
        self.first = next(iter(networks))
        for name, network in networks.items():
            setattr(self, name, network)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(getattr(self, self.first)(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(getattr(self, self.first).parameters(), lr=0.1, momentum=0.9)


def lightning_checkpoint(
    path: Path, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], **networks: nn.Module
) -> Holder:
    """Fit a :class:`Holder` of ``networks`` for one step per batch, save the trainer's
    checkpoint at ``path`` and return the module (its networks as trained)."""
    module = Holder(**networks)
    trainer = lightning.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(list(batches), batch_size=None))
    trainer.save_checkpoint(path)
    return module
