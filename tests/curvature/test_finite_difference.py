"""The finite-difference backend: central differences of gradients against exact double backward
(and dense float64 Hessians), its error estimate, bit-identical weights after a solve, and a
flash-attention kernel, which double backward cannot differentiate twice.

CPU torch has no memory-efficient SDPA kernel, so only the flash kernel is tested here.
"""

from __future__ import annotations

import json

import pytest
import tiny_hf
import torch
import torch.nn.functional as F
from tiny_cli import FAST, make_checkpoint, refused
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos
from sharpscope.curvature.hvp import refined
from sharpscope.curvature.vectors import norm
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.models import ModelSpec, build_model


def _lm_loss(out, y):
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


def _class_loss(out, y):
    return F.cross_entropy(out.logits, y)


def _objective(name: str, dtype: torch.dtype) -> Objective:
    """A small model in ``dtype``, its loss and one batch: an MLP, the tiny BERT classifier
    (whose word embeddings hold a ``padding_idx`` row), the tiny GPT-2 or a tiny Llama."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_hf.VOCAB - 1, (4, 10), generator=g)
    if name == "llama":
        return Objective(tiny_hf.llama().to(dtype), _lm_loss, [({"input_ids": ids}, ids)])
    if name == "bert":
        labels = torch.randint(0, 3, (4,), generator=g)
        return Objective(tiny_hf.bert().to(dtype), _class_loss, [({"input_ids": ids}, labels)])
    if name == "gpt2":
        return Objective(tiny_hf.gpt2().to(dtype), _lm_loss, [({"input_ids": ids}, ids)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    x = torch.randn(32, 6, generator=g, dtype=dtype)
    return Objective(model, F.cross_entropy, [(x, torch.randint(0, 3, (32,), generator=g))])


def _vector(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return norm(a - b) / norm(b)


CASES = [
    *[(name, torch.float32, 1e-4) for name in ("mlp", "bert", "gpt2", "llama")],
    *[(name, torch.float64, 1e-7) for name in ("mlp", "bert", "gpt2")],
    # Llama's RMSNorm and rotary positions compute in float32 inside a float64 model, so its
    # gradients carry float32 rounding: the step grows to 32x its float64 size, 2e-5 off.
    ("llama", torch.float64, 1e-4),
]


@pytest.mark.parametrize(("name", "dtype", "rel"), CASES)
def test_products_match_double_backward(name, dtype, rel):
    objective = _objective(name, dtype)
    exact = HessianOperator(objective, cache_graph=False)
    fd = HessianOperator(objective, backend="finite-difference")
    for seed in range(3):
        v = _vector(exact.size, dtype, seed)
        error = _relative(fd @ v, exact @ v)
        assert error <= rel, (seed, error)
        if seed == 0:  # the estimate is of the first product
            assert error / 10 <= fd.fd_error <= 10 * error, (error, fd.fd_error)
    assert fd.n_products == 3 and fd.fd_scale is not None


def test_products_match_the_dense_float64_hessian(problem):
    op = HessianOperator(
        Objective(problem.model, problem.loss_fn, problem.split(20)), backend="finite-difference"
    )
    for seed in range(2):
        v = _vector(op.size, torch.float64, seed)
        assert _relative(op @ v, problem.hessian @ v) <= 1e-7


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_lanczos_agrees_and_weights_are_bit_identical(name):
    objective = _objective(name, torch.float64)
    before = [p.detach().clone() for p in objective.model.parameters()]
    grads = [torch.full_like(p, 7.0) for p in objective.model.parameters()]  # a caller's
    for p, g in zip(objective.model.parameters(), grads, strict=True):
        p.grad = g
    settings = SolveSettings(tol=1e-8, max_iter=200)
    fd = HessianOperator(objective, backend="finite-difference")
    got = lanczos(fd, 2, settings=settings).eigenvalues
    after = list(objective.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(p.grad is g and bool((g == 7).all()) for p, g in zip(after, grads, strict=True))
    want = lanczos(HessianOperator(objective), 2, settings=settings).eigenvalues
    for g, w in zip(got.tolist(), want.tolist(), strict=True):
        assert abs(g - w) <= 1e-5 * abs(w), (g, w)


class KernelAttention(nn.Module):
    """Self-attention on the SDPA kernel it is given (its own choice wins over the caller's)."""

    def __init__(self, kernel: SDPBackend) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kernel = kernel
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).split(8, -1))
        with sdpa_kernel(self.kernel):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).flatten(2).mean(1))


def test_flash_attention_kernel_is_accepted():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, 8, generator=g), torch.randint(0, 3, (6,), generator=g))]
    flash = Objective(KernelAttention(SDPBackend.FLASH_ATTENTION), F.cross_entropy, batches)
    with pytest.raises(InputError, match="no second derivative"):
        HessianOperator(flash) @ torch.ones(HessianOperator(flash).size)
    math = Objective(KernelAttention(SDPBackend.MATH), F.cross_entropy, batches)
    v = _vector(HessianOperator(math).size, torch.float32, 0)
    got = HessianOperator(flash, backend="finite-difference") @ v
    assert _relative(got, HessianOperator(math) @ v) <= 1e-4


def _top(result) -> float:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]["eigenvalues"]["values"][0]


def test_command_line_backend(tmp_path):
    """A smooth (tanh) MLP's λ_max agrees with double backward's; a ReLU MLP, whose gradient
    jumps at its kinks, is refused in one line (after the solve, by its estimate on v₁)."""
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (16,), "activation": "tanh"})
    smooth = tmp_path / "tanh.safetensors"
    save_checkpoint(smooth, build_model(spec), spec)
    args = ["analyze", str(smooth), *FAST, "--no-trace", "--json"]
    runner = CliRunner()
    fd = _top(runner.invoke(app, [*args, "--backend", "finite-difference"]))
    exact = _top(runner.invoke(app, args))
    assert abs(fd - exact) <= 1e-4 * abs(exact)
    relu = make_checkpoint(tmp_path)
    result = runner.invoke(app, ["analyze", str(relu), *FAST, "--backend", "finite-difference"])
    refused(result.exit_code, result.stderr, "--backend finite-difference", "not smooth", "ReLU")


@pytest.mark.parametrize("name", ["gpt2", "mlp"])
def test_a_step_too_large_for_v1_is_chosen_again_on_it(name):
    """A first vector of little curvature can make the step far too large for v₁ (GPT-2 small:
    about 2^10 times, docs/engine.md); ``refined`` chooses it again on v₁ and solves again."""
    objective = _objective(name, torch.float32)
    settings = SolveSettings(tol=1e-4, max_iter=200)
    want = float(lanczos(HessianOperator(objective), 1, settings=settings).eigenvalues[0])
    fd = HessianOperator(objective, backend="finite-difference")
    fd.matvec(_vector(fd.size, torch.float32, 0))  # chooses the step
    fd.fd_scale *= 2.0**8
    blind = float(lanczos(fd, 1, settings=settings).eigenvalues[0])
    assert abs(blind - want) > 1e-2 * abs(want), (blind, want)  # such a step is wrong
    before = fd.n_products
    got = refined(fd, lambda: lanczos(fd, 1, settings=settings), settings.tol)
    assert abs(float(got.eigenvalues[0]) - want) <= 1e-4 * abs(want), (got.eigenvalues, want)
    assert fd.fd_scale < 2.0**-4 * 2.0**8 and fd.n_products > before + got.n_products


@pytest.mark.parametrize(("name", "dtype"), [("mlp", torch.float64), ("gpt2", torch.float32)])
def test_the_lean_step_search_chooses_as_the_held_one(name, dtype):
    """The step search with one product's buffer (``lean``) chooses the step the search with
    two products held chooses, first and again on another vector, and the same product: its
    Richardson estimates differ by rounding only."""
    objective = _objective(name, dtype)
    held = HessianOperator(objective, backend="finite-difference", lean=False)
    lean = HessianOperator(objective, backend="finite-difference", lean=True)
    v = _vector(held.size, dtype, 0)
    want, got = held @ v, lean @ v
    assert (held.fd_lean, lean.fd_lean) == (False, True)
    assert lean.fd_scale == held.fd_scale
    assert _relative(got, want) <= 10 * torch.finfo(dtype).eps
    assert lean.fd_error == pytest.approx(held.fd_error, rel=1e-3)
    u = _vector(held.size, dtype, 5)
    u /= norm(u)
    for op in (held, lean):  # a target no step meets: the whole search runs on u
        op.refine_step(u, 1e-12)
    assert lean.fd_scale == held.fd_scale
    assert lean.fd_error == pytest.approx(held.fd_error, rel=1e-3)
