"""The problem the 2-rank scripts of tests/distributed/test_sharded_sam.py and
test_sharded_tracking.py run: an MLP in a ModuleList of blocks or the tiny GPT-2, in float64, on
8 seeded samples of which each rank takes its half."""

from __future__ import annotations

from typing import Any

import tiny_hf
import torch
import torch.nn.functional as F
from torch import nn


class Blocks(nn.Module):
    """An MLP in a ModuleList of blocks: each is sharded on its own, 7 and 3 rows over 2 ranks
    split unevenly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, 7), nn.Tanh()) for a in (5, 7))
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position's logits against its own token."""
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


def data(name: str) -> tuple[Any, torch.Tensor, Any]:
    """The 8 samples' inputs, targets and loss of ``name`` (``mlp`` or ``gpt2``)."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        return (
            torch.randn(8, 5, generator=g, dtype=torch.float64),
            torch.arange(8) % 3,
            F.cross_entropy,
        )
    ids = torch.randint(0, tiny_hf.VOCAB, (8, 6), generator=g)
    return {"input_ids": ids}, ids, lm_loss


def build(name: str) -> nn.Module:
    """The model of ``name``, seeded, in float64."""
    return (Blocks() if name == "mlp" else tiny_hf.gpt2()).double()


def half(inputs: Any, targets: torch.Tensor, rank: int) -> tuple[Any, torch.Tensor]:
    """Rank ``rank``'s 4 of the 8 samples."""
    share = slice(4 * rank, 4 * rank + 4)
    if isinstance(inputs, dict):
        return {k: v[share] for k, v in inputs.items()}, targets[share]
    return inputs[share], targets[share]
