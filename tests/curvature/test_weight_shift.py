"""Weights moved in place and restored bit for bit without a copy of them: the coordinates that
subtraction misses (ties, a power of two crossed) are kept and put back."""

from __future__ import annotations

import pytest
import torch

from sharpscope.curvature import weight_shift
from sharpscope.curvature.weight_shift import moved


def _weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(300_000, generator=g, dtype=torch.float64) * 0.05).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _missed(w: torch.Tensor, d: torch.Tensor) -> int:
    """How many coordinates fl(fl(w + d) − d) does not bring back to w."""
    return int(((w + d) - d != w).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [5e-3, -5e-3, 1.0, 1e3])
def test_the_weights_come_back_bit_for_bit(dtype, scale, monkeypatch):
    monkeypatch.setattr(weight_shift, "SHIFT_SLAB", 1 << 16)  # several slabs per parameter
    w = _weights(dtype)
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    before = w.clone()
    with moved([w[:1000].view(10, 100), w[1000:]], [d[:1000].view(10, 100), d[1000:]], scale):
        assert torch.equal(w, before + d * scale)  # moved as one addition moves them
    assert torch.equal(_bits(w), _bits(before))
    assert _missed(before, d * scale) > 0  # subtraction alone would not have restored them


def test_a_finite_difference_step_keeps_a_few_percent_of_the_weights(monkeypatch):
    kept = []
    move = weight_shift._move

    def counted(w, part, scale):
        undo = move(w, part, scale)
        kept.append(w.numel() if undo[2] is None else int(undo[3].numel()))
        return undo

    monkeypatch.setattr(weight_shift, "_move", counted)
    w = _weights(torch.float32)
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    step = 6e-3 * float(w.norm()) / float(d.norm())  # cbrt(eps)·‖w‖/‖v‖, as the backend's
    with moved([w], [d], step):
        pass
    assert 0 < sum(kept) < 0.05 * w.numel()


def test_a_slab_missed_mostly_is_kept_whole_and_nan_weights_come_back():
    w = torch.tensor([1.0, float("nan"), 3.0, 1e-30], dtype=torch.float32)
    bits = _bits(w).clone()
    with moved([w], [torch.tensor([1e30, 1.0, 1e30, 1.0])]):
        assert w[0] == 1e30
    assert torch.equal(_bits(w), bits)


def test_an_error_inside_restores_the_weights():
    w = _weights(torch.float32)
    before = w.clone()
    with pytest.raises(RuntimeError, match="inside"), moved([w], [torch.ones_like(w)], 0.1):
        raise RuntimeError("inside")
    assert torch.equal(w, before)
