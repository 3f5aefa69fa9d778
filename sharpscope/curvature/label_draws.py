"""Random numbers of each sample's own, for labels drawn from a model's predictive distribution:
seeded by the sample's content, so the same sample draws the same label however the data is
batched, sharded or spread over ranks."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from sharpscope.batches import Draw
from sharpscope.structures import leaves


def sample_seeds(inputs: Any, targets: torch.Tensor, seed: int) -> list[int]:
    """One seed per sample of a batch, from ``seed`` and the bytes of its inputs and targets."""
    rows = [t.detach().cpu().contiguous() for _, t in leaves(inputs)] + [targets.detach().cpu()]
    count = int(targets.shape[0])
    flat = [r.reshape(count, -1).contiguous().view(torch.uint8) for r in rows]
    seeds = []
    for i in range(count):
        digest = hashlib.blake2b(str(seed).encode(), digest_size=8)
        for r in flat:
            digest.update(r[i].numpy().tobytes())
        seeds.append(int.from_bytes(digest.digest(), "little") >> 1)
    return seeds


def per_sample_draw(seeds: list[int], device: torch.device) -> Draw:
    """``draw(shape)``: uniforms of shape ``(len(seeds), *shape)``, row i from ``seeds[i]``'s
    generator (float64, on ``device``)."""

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        rows = [
            torch.rand(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds
        ]
        return torch.stack(rows).to(device)

    return draw
