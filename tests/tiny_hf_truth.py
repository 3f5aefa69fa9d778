"""Dense float64 Hessians of tests/tiny_hf.py's models on tiny token data.

The truth is ``torch.autograd.functional.hessian`` (autograd double backward, row by row) under
torch's math attention kernel; never ``torch.func``, whose second derivatives are wrong through
BERT on this torch (test_transformers.py's ``test_forward_over_reverse_is_refused_where_wrong``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import ground_truth
import tiny_hf
import torch

from sharpscope.io.losses import resolve_loss

N, L = 12, 7


def token_data(seed: int = 1) -> dict[str, torch.Tensor]:
    """``N`` sequences of ``L`` token ids, the last 0-2 positions padded, and 3-class labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tiny_hf.VOCAB, (N, L), generator=g)
    mask = torch.ones(N, L, dtype=torch.int64)
    for i in range(N):
        mask[i, L - i % 3 :] = 0
    labels = torch.randint(0, 3, (N,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dense(model: torch.nn.Module, loss: str, inputs: dict[str, Any], targets: torch.Tensor):
    """Eigenvalues (ascending) of the float64 Hessian of ``loss`` over all the data as one batch."""
    return torch.linalg.eigvalsh(hessian(model, loss, inputs, targets))


def hessian(
    model: torch.nn.Module, loss: str, inputs: dict[str, Any], targets: torch.Tensor
) -> torch.Tensor:
    """The float64 Hessian of ``loss`` over all the data as one batch, in flat-vector order."""
    model = model.double().eval()
    hessian = ground_truth.dense_hessian(model, resolve_loss(loss), inputs, targets)
    assert torch.allclose(hessian, hessian.T, atol=1e-12)
    return hessian


@cache
def bert_truth() -> torch.Tensor:
    data = token_data()
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    return dense(tiny_hf.bert(), "cross-entropy", inputs, data["labels"])
