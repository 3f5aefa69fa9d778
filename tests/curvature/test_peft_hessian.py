"""The Hessian of a PEFT LoRA model in memory: by default over the adapter's trainable parameters
only, equal to a dense float64 Hessian by autograd double backward, and the same from all three
backends; SAM, ASAM and Eigen-SAM step the adapter and leave the frozen base bit-identical."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
import tiny_lora
from peft import PeftModel

from sharpscope import ASAM, SAM, EigenSAM
from sharpscope.curvature import (
    HessianOperator,
    Objective,
    SolveSettings,
    lanczos,
)
from sharpscope.curvature.vectors import norm
from sharpscope.errors import InputError

_loss = tiny_lora.next_token_loss


@pytest.fixture(scope="module")
def peft64():
    """The float64 LoRA model, one batch, and the dense Hessian over its trainable parameters."""
    model = tiny_lora.lora(torch.float64)
    ids = tiny_lora.tokens()
    batch = ({"input_ids": ids}, ids)
    dense = tiny_lora.dense_hessian(model, ids)
    return model, batch, dense


def test_the_default_parameters_are_the_adapters(peft64):
    model, batch, dense = peft64
    op = HessianOperator(Objective(model, _loss, [batch]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert op.space.names == tuple(trainable)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert op.size == dense.shape[0] < sum(p.numel() for p in model.parameters())


def test_adapter_eigenvalues_equal_the_dense_hessians(peft64):
    model, batch, dense = peft64
    evals = torch.linalg.eigvalsh(dense)
    op = HessianOperator(Objective(model, _loss, [batch]))
    result = lanczos(op, k=3, settings=SolveSettings(tol=1e-12, max_iter=op.size))
    for got, expected in zip(result.eigenvalues.tolist(), evals.flip(0)[:3].tolist(), strict=True):
        assert abs(got - expected) <= 1e-8 * abs(expected), (got, expected)


@pytest.mark.parametrize("backend", ["double-backward", "forward-over-reverse"])
def test_products_equal_the_dense_hessians(peft64, backend):
    model, batch, dense = peft64
    op = HessianOperator(Objective(model, _loss, [batch]), backend=backend)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=0, atol=1e-12)


def test_finite_differences_agree_to_their_tolerance(peft64):
    model, batch, dense = peft64
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    op = HessianOperator(Objective(model, _loss, [batch]), backend="finite-difference")
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert norm(op.matvec(v) - dense @ v) <= 1e-7 * norm(dense @ v)
    top = lanczos(op, k=1, settings=SolveSettings(tol=1e-9, max_iter=op.size))
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    assert abs(float(top.eigenvalues[0]) - expected) <= 1e-7 * abs(expected)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def _optimizer(kind: str, model: torch.nn.Module) -> SAM:
    base = torch.optim.SGD(model.parameters(), lr=0.1)  # frozen ones too, as users often pass
    if kind == "sam":
        return SAM(base, rho=0.05, model=model)
    if kind == "asam":
        return ASAM(base, rho=0.5, model=model)
    return EigenSAM(base, rho=0.05, alpha=0.5, model=model, loss_fn=_loss, eig_every=1)


@pytest.mark.parametrize("kind", ["sam", "asam", "eigen-sam"])
def test_sam_steps_the_adapter_and_leaves_the_base_bit_identical(kind):
    model = tiny_lora.lora(torch.float64)
    frozen = tiny_lora.frozen_state(model)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = tiny_lora.tokens()
    optimizer = _optimizer(kind, model)

    def closure() -> torch.Tensor:
        loss = _loss(model(input_ids=ids), ids)
        loss.backward()
        return loss

    for _ in range(3):
        if isinstance(optimizer, EigenSAM):
            optimizer.refresh({"input_ids": ids}, ids)
        optimizer.step(closure)
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, adapter[name]), name
    if isinstance(optimizer, EigenSAM):
        assert sorted(optimizer.eigenvector) == sorted(adapter)
        assert optimizer.estimate is not None and optimizer.estimate.dtype == "float64"


def test_a_saved_adapter_reloaded_trainable_has_the_same_eigenvalues(peft64, tmp_path):
    model, batch, dense = peft64
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_lora.base(torch.float64), tmp_path)
    with pytest.raises(InputError, match="load it with `is_trainable=True`"):
        Objective(frozen, _loss, [batch])
    loaded = PeftModel.from_pretrained(tiny_lora.base(torch.float64), tmp_path, is_trainable=True)
    op = HessianOperator(Objective(loaded, _loss, [batch]))
    top = lanczos(op, k=1, settings=SolveSettings(tol=1e-12, max_iter=op.size))
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    assert abs(float(top.eigenvalues[0]) - expected) <= 1e-8 * abs(expected)
