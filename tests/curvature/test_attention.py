"""Hessians through attention: both backends against dense float64 Hessians on tiny transformer
models, eager against SDPA attention, and one line for a kernel without a second derivative.

The truth is ``torch.autograd.functional.hessian`` (autograd double backward, row by row) under
torch's math attention kernel: ``torch.func.hessian`` is wrong through LayerNorm on torch 2.13
(5 % off and asymmetric on ``nn.TransformerEncoderLayer``, docs/engine.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ground_truth import EXACT_BACKENDS, dense_hessian
from torch import nn

from sharpscope.curvature import (
    HessianOperator,
    Objective,
    SolveSettings,
    lanczos_extremes,
)
from sharpscope.errors import InputError
from sharpscope.optim import EigenSAM
from sharpscope.training.tracking import SharpnessTracker, Tracker, evaluate

F64 = torch.float64
WIDTH, CLASSES = 8, 3


def _padding(x: torch.Tensor) -> torch.Tensor:
    """Positions whose features are all zero are padding."""
    return (x == 0).all(-1)


class Encoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (or a stack of ``layers``), mean-pooled, then a linear
    head; with ``masked``, all-zero positions are padding."""

    def __init__(self, masked: bool = False, layers: int = 0) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 8, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers) if layers else layer
        self.masked = masked
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = _padding(x) if self.masked else None
        return self.head(self.body(x, src_key_padding_mask=mask).mean(1))


class Causal(nn.Module):
    """Causal self-attention by ``F.scaled_dot_product_attention``, or written out (``eager``)."""

    def __init__(self, eager: bool = False) -> None:
        super().__init__()
        self.eager = eager
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        n = q.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(future, -math.inf)
        return scores.softmax(-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, 2, d // 2).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        out = self._attend(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.head(torch.tanh(self.proj(out)).mean(1))


class Multihead(nn.Module):
    """``nn.MultiheadAttention``; with ``weights`` it also returns the attention weights, which
    makes torch compute attention eagerly instead of by SDPA."""

    def __init__(self, weights: bool = False) -> None:
        super().__init__()
        self.weights = weights
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(x, x, x, key_padding_mask=_padding(x), need_weights=self.weights)
        return self.head(out.mean(1))


MODELS = {
    "encoder": lambda: Encoder(),
    "encoder-padding": lambda: Encoder(masked=True),
    "causal-sdpa": lambda: Causal(),
    "multihead": lambda: Multihead(),
}


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Six sequences of five positions; the last two positions of two sequences are padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, WIDTH, generator=gen, dtype=F64)
    x[0, -2:] = 0.0
    x[3, -1:] = 0.0
    return x, torch.randint(0, CLASSES, (6,), generator=gen)


def _built(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().double().eval()


@pytest.fixture(scope="module", params=list(MODELS))
def problem(request) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    model = _built(request.param)
    batch = _data()
    return model, batch, dense_hessian(model, F.cross_entropy, *batch)


def _random(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_eigenvalues(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    for g, e in zip(got.tolist(), expected.tolist(), strict=True):
        assert abs(g - e) <= rel * abs(e), (g, e)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_products_match_the_dense_hessian(problem, backend):
    model, batch, hessian = problem
    op = HessianOperator(Objective(model, F.cross_entropy, [batch]), backend=backend)
    for seed in range(3):
        v = _random(op.size, seed)
        torch.testing.assert_close(op.matvec(v), hessian @ v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_lanczos_extremes_match_the_dense_eigenvalues(problem, backend):
    model, batch, hessian = problem
    evals = torch.linalg.eigvalsh(hessian)
    op = HessianOperator(Objective(model, F.cross_entropy, [batch]), backend=backend)
    top, bottom = lanczos_extremes(
        op, 5, k_smallest=2, settings=SolveSettings(tol=1e-10, max_iter=op.size)
    )
    _assert_eigenvalues(top.eigenvalues, evals.flip(0)[:5], 1e-8)
    _assert_eigenvalues(bottom.eigenvalues, evals[:2], 1e-8)


TWINS = {
    "causal": lambda eager: Causal(eager=eager),
    "multihead": lambda eager: Multihead(weights=eager),
}


@pytest.mark.parametrize("name", list(TWINS))
def test_sdpa_and_eager_attention_give_the_same_eigenvalues(name):
    torch.manual_seed(0)
    sdpa = TWINS[name](False).double().eval()
    eager = TWINS[name](True).double().eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = _data()
    top, bottom = lanczos_extremes(
        HessianOperator(Objective(sdpa, F.cross_entropy, [batch])),
        5,
        k_smallest=2,
        settings=SolveSettings(tol=1e-10),
    )
    top_eager, bottom_eager = lanczos_extremes(
        HessianOperator(Objective(eager, F.cross_entropy, [batch])),
        5,
        k_smallest=2,
        settings=SolveSettings(tol=1e-10),
    )
    _assert_eigenvalues(top.eigenvalues, top_eager.eigenvalues, 1e-10)
    _assert_eigenvalues(bottom.eigenvalues, bottom_eager.eigenvalues, 1e-10)


def test_attention_settings_come_back_after_a_product():
    fastpath = torch.backends.mha.get_fastpath_enabled()
    flash = torch.backends.cuda.flash_sdp_enabled()
    op = HessianOperator(Objective(_built("encoder"), F.cross_entropy, [_data()]))
    op.matvec(_random(op.size, 0))
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert torch.backends.cuda.flash_sdp_enabled() == flash


def test_the_shifted_loss_is_the_differentiated_loss():
    """Without grad, eval-mode ``nn.TransformerEncoder`` would zero padded positions."""
    model, batch = Encoder(masked=True, layers=2).double().eval(), _data()
    op = HessianOperator(Objective(model, F.cross_entropy, [batch]))
    assert op.loss(torch.zeros(op.size, dtype=F64)) == pytest.approx(op.loss(), rel=1e-12)


def test_probe_metrics_see_the_differentiated_loss():
    """finetune's probe/validation metrics (and analyze's accuracy, in the same mode) run no-grad
    forwards: they too must not take the padded fast path, or they describe another function."""
    model, batch = Encoder(masked=True, layers=2).double().eval(), _data()
    op = HessianOperator(Objective(model, F.cross_entropy, [batch]))
    loss, _ = evaluate(model, F.cross_entropy, [batch])
    assert loss == pytest.approx(op.loss(), rel=1e-12)
    with torch.no_grad():
        fast = F.cross_entropy(model(batch[0]), batch[1]).item()  # a plain forward: fast path
    assert fast != pytest.approx(op.loss(), rel=1e-6)


class FlashAttention(nn.Module):
    """Self-attention by torch's CPU flash kernel, called directly: no second derivative and no
    forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).split(WIDTH, -1))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return self.head(out.squeeze(1).mean(1))


@torch.library.custom_op("sharpscope_test::square_backward", mutates_args=())
def _square_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return 2 * x * grad


@torch.library.custom_op("sharpscope_test::square", mutates_args=())
def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _save_input(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _square_grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    return _square_backward(ctx.saved_tensors[0], grad)


_square.register_autograd(_square_grad, setup_context=_save_input)


class CustomKernel(nn.Module):
    """A custom op whose backward is another custom op without autograd, like a fused kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_square(self.inner(x)).mean(1))


@pytest.mark.parametrize(
    ("model", "backend", "message"),
    [
        (
            FlashAttention(),
            "double-backward",
            "the model's `aten::_scaled_dot_product_flash_attention_for_cpu_backward` has no "
            "second derivative in torch; use an attention implementation built on torch's "
            "scaled_dot_product_attention, or eager attention",
        ),
        (
            FlashAttention(),
            "forward-over-reverse",
            "the model's `_scaled_dot_product_flash_attention_for_cpu` has no forward-mode "
            "derivative in torch; `backend` forward-over-reverse needs one; use `backend` "
            "double-backward",
        ),
        (
            CustomKernel(),
            "double-backward",
            "the model's `sharpscope_test.square_backward.default` has no second derivative in "
            "torch; write that layer in differentiable torch operations",
        ),
    ],
    ids=["flash-double-backward", "flash-forward-over-reverse", "custom-op"],
)
def test_a_kernel_without_the_derivative_is_one_input_error(model, backend, message):
    op = HessianOperator(Objective(model.double(), F.cross_entropy, [_data()]), backend=backend)
    with pytest.raises(InputError) as caught:
        op.matvec(_random(op.size, 0))
    assert str(caught.value) == message


def test_custom_function_under_forward_over_reverse_is_one_input_error():
    op = HessianOperator(
        Objective(CustomKernel().double(), F.cross_entropy, [_data()]),
        backend="forward-over-reverse",
    )
    with pytest.raises(InputError, match=r"^torch\.func cannot differentiate a custom") as caught:
        op.matvec(_random(op.size, 0))
    assert "\n" not in str(caught.value)
    assert str(caught.value).endswith("use `backend` double-backward")


def test_torch_funcs_zero_tensor_error_under_forward_over_reverse_is_one_input_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    op = HessianOperator(Objective(model, F.mse_loss, [batch]), backend="forward-over-reverse")
    with pytest.raises(InputError, match=r"^torch\.func cannot take the forward-over") as caught:
        op.matvec(_random(op.size, 0))
    assert "\n" not in str(caught.value)
    assert str(caught.value).endswith("use `backend` double-backward")


def test_eigen_sam_refresh_on_an_encoder_layer():
    model, batch = _built("encoder"), _data()
    opt = EigenSAM(
        torch.optim.SGD(model.parameters(), lr=0.01),
        model=model,
        loss_fn=F.cross_entropy,
        eig_every=1,
        eig_steps=60,
    )

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss.detach()

    opt.step(closure)  # step 0: plain SAM, through the default attention kernels
    estimate = opt.refresh(*batch)
    top = float(torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, *batch))[-1])
    assert estimate is not None
    assert abs(estimate.eigenvalue - top) <= estimate.residual + 1e-12 * abs(top)
    opt.step(closure)


def test_tracker_on_each_attention_model(problem):
    model, batch, hessian = problem
    tracker = Tracker(
        SharpnessTracker(Objective(model, F.cross_entropy, [batch]), products=None, max_iter=80),
        None,
    )
    figures = tracker(model)
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    assert abs(figures["lambda_max"] - top) <= figures["lambda_residual"] + 1e-12 * abs(top)
