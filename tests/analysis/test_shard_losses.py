"""Each shard's loss from one forward per batch (``shard_losses``) against the shards' own
operators, for tensor, dict and tuple outputs, outputs that cannot be cut (a loss the model
computed) and whole-batch shards; and how many forwards that costs."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharpscope.analysis.sampling import shard_losses, shard_operators
from sharpscope.curvature import HessianOperator, Objective
from sharpscope.structures import split_outputs

D = torch.float64
Pair = namedtuple("Pair", ["logits", "features"])


class Net(nn.Module):
    """An MLP whose outputs come as ``kind`` says: a tensor, an ordered dict with per-sample
    features, a named tuple, or a dict that also holds the batch's mean loss (a scalar)."""

    def __init__(self, kind: str, norm: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6) if norm else nn.Identity()
        self.head = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor):
        self.calls += 1
        features = torch.tanh(self.bn(self.fc(x)))
        logits = self.head(features)
        if self.kind == "tensor":
            return logits
        if self.kind == "dict":
            return OrderedDict(logits=logits, features=(features, [features]))
        if self.kind == "tuple":
            return Pair(logits, features)
        return {"logits": logits, "loss": logits.square().mean()}


def _loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits (checking the outputs kept their type), plus a feature term."""
    if isinstance(outputs, torch.Tensor):
        return F.cross_entropy(outputs, targets)
    if isinstance(outputs, Pair):
        return F.cross_entropy(outputs.logits, targets) + outputs.features.square().mean()
    assert type(outputs) in (OrderedDict, dict)
    extra = outputs["features"][1][0].square().mean() if "features" in outputs else 0.0
    return F.cross_entropy(outputs["logits"], targets) + extra


def _batches(sizes=(16, 16, 11)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(n, 4, generator=generator, dtype=D),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for n in sizes
    ]


@pytest.mark.parametrize("kind", ["tensor", "dict", "tuple", "scalar"])
@pytest.mark.parametrize(("shards", "batch_stats"), [(3, False), (8, False), (2, True), (5, True)])
def test_shard_losses_equal_the_shards_own_losses(kind, shards, batch_stats):
    torch.manual_seed(6)
    model = Net(kind, norm=batch_stats).to(D)
    op = HessianOperator(
        Objective(model, _loss, _batches(), batch_stats=batch_stats), cache_graph=False
    )
    delta = 0.1 * torch.randn(op.size, generator=torch.Generator().manual_seed(7), dtype=D)
    parts = shard_operators(op, shards)
    for shift in (None, delta):
        weights, losses = shard_losses(op, shards, shift)
        assert weights == pytest.approx([p.num_terms / op.num_terms for p in parts], abs=1e-15)
        assert losses == pytest.approx([p.loss(shift) for p in parts], abs=1e-12, rel=1e-12)
        assert sum(w * x for w, x in zip(weights, losses, strict=True)) == pytest.approx(
            op.loss(shift), rel=1e-12
        )
    assert len(parts) == (min(shards, 3) if batch_stats else shards)  # 3 whole batches


@pytest.mark.parametrize(
    ("kind", "forwards"), [("tensor", 3), ("dict", 3), ("scalar", 1 + 8 + 8 + 6)]
)
def test_one_forward_per_batch_when_the_outputs_cut_by_sample(kind, forwards):
    """Outputs holding the batch's loss cannot be cut: the first batch's forward is spent
    finding that out, then every chunk gets its own (16, 16 and 11 samples in chunks of 2)."""
    model = Net(kind).to(D)
    op = HessianOperator(Objective(model, _loss, _batches()), cache_graph=False)
    model.calls = 0  # the check of the first batch when the operator is built
    shard_losses(op, 8)
    assert model.calls == forwards


def test_split_outputs_keeps_types_and_refuses_what_is_not_per_sample():
    x = torch.arange(10.0).reshape(5, 2)
    cut = split_outputs(OrderedDict(a=x, b=(x, [x[:, 0]]), c=None), 5, 2)
    assert [type(c) for c in cut] == [OrderedDict] * 3
    assert [c["a"].shape[0] for c in cut] == [2, 2, 1]
    assert torch.equal(cut[2]["b"][1][0], x[4:, 0]) and cut[1]["c"] is None
    assert isinstance(split_outputs(Pair(x, x), 5, 3)[1], Pair)
    assert split_outputs({"logits": x, "loss": x.sum()}, 5, 2) is None  # a scalar
    assert split_outputs((x, x[:4]), 5, 2) is None  # not one entry per sample
    assert split_outputs({"text": "no tensor"}, 5, 2) is None
