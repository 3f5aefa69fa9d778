"""The order in which a training run visits its samples: a seeded permutation per epoch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class DataOrder:
    """Minibatch indices into ``size`` samples: each epoch is a fresh permutation from one seeded
    generator, cut into ``size // batch_size`` batches (an incomplete last batch is dropped; a
    batch larger than the data takes all of it). The state is the generator's state, the current
    permutation and the position in it, so a restored order continues exactly."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"need samples and a positive batch size, got {size}, {batch_size}")
        self.size = size
        self.batch_size = min(batch_size, size)
        self.steps_per_epoch = size // self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.permutation = torch.randperm(size, generator=self.generator)

    def next_batch(self) -> torch.Tensor:
        """The sample indices of the next batch; a new epoch starts with a new permutation."""
        if self.position == self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self.permutation = torch.randperm(self.size, generator=self.generator)
        start = self.position * self.batch_size
        self.position += 1
        return self.permutation[start : start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs (tensors and ints: ``weights_only``-safe)."""
        return {
            "size": self.size,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "position": self.position,
            "permutation": self.permutation.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved order; the data size and batch size must be the same."""
        if (state["size"], state["batch_size"]) != (self.size, self.batch_size):
            raise ValueError(
                f"the saved data order is over {state['size']} samples in batches of "
                f"{state['batch_size']}, this one over {self.size} in batches of {self.batch_size}"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.permutation = state["permutation"].clone()
        self.generator.set_state(state["generator"])
