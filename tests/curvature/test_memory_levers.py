"""Memory levers of the Hessian's products: micro-batches (the same operator, one chunk's saved
activations), Hugging Face activation checkpointing (non-reentrant: double backward still exact,
fewer saved activations), and finite differences under the caller's attention kernel. Ground
truth: dense float64 Hessians by autograd double backward (tests/tiny_hf_truth.py)."""

from __future__ import annotations

import contextlib
import functools
import json

import pytest
import tiny_hf
import torch
from tiny_cli import FAST, make_checkpoint, refused
from tiny_hf_truth import hessian as dense_truth
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

from sharpscope.analysis.analyze import MICRO_BATCH_NOTE
from sharpscope.cli.app import app
from sharpscope.curvature import BACKENDS, HessianOperator, Objective, curvature_operator
from sharpscope.curvature.vectors import norm
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss

CAUSAL = resolve_loss("causal-lm")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return norm(a - b) / norm(b)


def _vector(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


AUTOGRAD = ("double-backward", "finite-difference")
"""The backends that run on autograd's graph (torch.func's forward-over-reverse does not run
under saved-tensor hooks: neither the memory meter's nor checkpointing's)."""
TOLERANCE = {"double-backward": 1e-12, "forward-over-reverse": 1e-12, "finite-difference": 1e-7}
"""Relative error to the dense float64 Hessian: rounding, or finite differences' own."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_give_the_dense_hessian_on_an_mlp(mlp, backend):
    """Batches of 20 (and a last one of 4) in chunks of 7: the same matrix, loss and gradient."""
    whole = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.split(20)), backend=backend)
    chunked = HessianOperator(whole.objective.replace(micro_batch=7), backend=backend)
    assert not chunked.cache_graph
    for seed in range(2):
        v = _vector(chunked.size, seed)
        assert _relative(chunked @ v, mlp.hessian @ v) <= TOLERANCE[backend]
    assert abs(chunked.loss() - whole.loss()) <= 1e-14 * abs(whole.loss())
    assert _relative(chunked.gradient(), whole.gradient()) <= 1e-13


def _gpt2_data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Six sequences of 8 tokens whose labels are partly -100 (unlabelled), so that chunks hold
    different counts of the terms the token loss averages, the last two none."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, tiny_hf.VOCAB - 1, (6, 8), generator=g)
    labels = ids.clone()
    for i in range(6):
        labels[i, 8 - 2 * (i % 3) :] = -100
    labels[4:] = -100
    return {"input_ids": ids}, labels


class TorchTokenMean:
    """A user's causal-LM loss: torch's mean over the labelled tokens, NaN where there is none."""

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1)
        )

    def count(self, targets: torch.Tensor) -> int:
        return int((targets[:, 1:] != -100).sum())


@pytest.mark.parametrize("loss", [CAUSAL, TorchTokenMean()])
@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_weigh_token_counts_on_gpt2(backend, loss):
    """Chunks of 4 and 2 sequences, the latter without a labelled token (skipped: its mean is
    NaN for torch's loss)."""
    inputs, labels = _gpt2_data()
    model = tiny_hf.gpt2().double()
    op = HessianOperator(Objective(model, loss, [(inputs, labels)], micro_batch=4), backend=backend)
    for seed in range(2):
        v = _vector(op.size, seed)
        assert _relative(op @ v, _truth("gpt2") @ v) <= TOLERANCE[backend]
    whole = HessianOperator(Objective(model, loss, [(inputs, labels)]))
    assert abs(op.loss() - whole.loss()) <= 1e-14 * whole.loss()


def test_micro_batch_is_refused_where_chunks_change_the_function(cnn):
    """BatchNorm on batch statistics normalises each chunk by its own statistics; the GGN and
    Fisher linearise whole batches."""
    ce = resolve_loss("cross-entropy")
    objective = Objective(cnn.model, ce, cnn.batches, micro_batch=8)
    with pytest.raises(InputError, match=r"`micro_batch`.*`batch_stats`"):
        HessianOperator(objective.replace(batch_stats=True))
    HessianOperator(objective)  # running statistics: a per-sample function
    for name in ("ggn", "fisher", "empirical-fisher"):
        with pytest.raises(InputError, match="`micro_batch` applies to the Hessian"):
            curvature_operator(name, objective)
    with pytest.raises(InputError, match="`micro_batch` must be at least 1"):
        objective.replace(micro_batch=0)


def _results(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def test_command_line_micro_batch(tmp_path):
    """The flag reaches the operator: the same λ_max, and the report's note of its price."""
    checkpoint = make_checkpoint(tmp_path)
    args = ["analyze", str(checkpoint), *FAST, "--no-trace", "--json"]
    runner = CliRunner()
    exact = _results(runner.invoke(app, args))
    chunked = _results(runner.invoke(app, [*args, "--micro-batch", "3"]))
    top = exact["eigenvalues"]["values"][0]
    assert abs(chunked["eigenvalues"]["values"][0] - top) <= 1e-5 * abs(top)
    assert MICRO_BATCH_NOTE in chunked["notes"] and MICRO_BATCH_NOTE not in exact["notes"]
    result = runner.invoke(app, ["analyze", str(checkpoint), *FAST, "--micro-batch", "0"])
    refused(result.exit_code, result.stderr, "--micro-batch", "at least 1")


class SavedBytes(contextlib.AbstractContextManager):
    """The peak bytes of the tensors autograd saves for backward that are alive at once (what a
    graph holds), measured with ``saved_tensors_hooks`` while inside."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> _Held:
        return _Held(t, self)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Held:
    def __init__(self, tensor: torch.Tensor, meter: SavedBytes) -> None:
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.untyped_storage().nbytes()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


def _product_peak(objective: Objective, backend: str) -> int:
    op = HessianOperator(objective, backend=backend, cache_graph=False)
    v = _vector(op.size, 0, op.dtype)
    op @ v  # the first finite-difference product chooses its step
    with SavedBytes() as meter:
        op @ v
    return meter.peak


def _lm_batch(n: int, t: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = torch.randint(0, tiny_hf.VOCAB - 1, (n, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}, ids


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_micro_batches_hold_one_chunks_activations(backend):
    """A product's peak saved activations on 16 sequences, whole and in chunks of 4."""
    objective = Objective(tiny_hf.gpt2(), CAUSAL, [_lm_batch(16, 12)])
    whole = _product_peak(objective, backend)
    chunked = _product_peak(objective.replace(micro_batch=4), backend)
    assert chunked < 0.4 * whole, (chunked, whole)


@functools.cache
def _truth(name: str) -> torch.Tensor:
    """The dense float64 Hessian of the tiny GPT-2 or BERT on :func:`_gpt2_data`."""
    inputs, labels = _gpt2_data()
    if name == "gpt2":
        return dense_truth(tiny_hf.gpt2(), "causal-lm", inputs, labels)
    return dense_truth(tiny_hf.bert(), "cross-entropy", inputs, labels[:, 0] % 3)


def _checkpointing_objective(name: str) -> tuple[Objective, torch.Tensor]:
    """The tiny GPT-2 or BERT in float64 on token data, checkpointed, and its dense Hessian."""
    inputs, labels = _gpt2_data()
    if name == "gpt2":
        objective = Objective(tiny_hf.gpt2().double(), CAUSAL, [(inputs, labels)])
    else:
        ce = resolve_loss("cross-entropy")
        objective = Objective(tiny_hf.bert().double(), ce, [(inputs, labels[:, 0] % 3)])
    return objective.replace(checkpointing=True), _truth(name)


def _checkpointing_state(model: nn.Module) -> list[tuple[str, object]]:
    return [
        ("config.use_cache", model.config.use_cache),
        *[
            (name, {k: v for k, v in vars(m).items() if "checkpointing" in k or k == "training"})
            for name, m in model.named_modules()
        ],
    ]


@pytest.mark.parametrize("backend", AUTOGRAD)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_checkpointing_keeps_the_dense_hessian(name, backend):
    objective, truth = _checkpointing_objective(name)
    model = objective.model.train()
    before = _checkpointing_state(model)
    op = HessianOperator(objective, backend=backend)
    for seed in range(2):
        v = _vector(op.size, seed)
        assert _relative(op @ v, truth @ v) <= TOLERANCE[backend]
    assert _checkpointing_state(model) == before


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_checkpointing_saves_activations(backend):
    """Checkpointing takes effect in the eval mode the operator runs the model in: fewer saved
    activations than without, on a 4-block GPT-2."""
    torch.manual_seed(0)
    model = tiny_hf.gpt2()
    config = model.config
    config.n_layer = 4
    model = type(model)(config)
    objective = Objective(model, CAUSAL, [_lm_batch(8, 12)])
    plain = _product_peak(objective, backend)
    checkpointed = _product_peak(objective.replace(checkpointing=True), backend)
    assert checkpointed < 0.8 * plain, (checkpointed, plain)


def test_checkpointing_is_refused_for_other_models_and_torch_func(mlp, tmp_path):
    objective, _ = _checkpointing_objective("gpt2")
    with pytest.raises(InputError, match="forward-over-reverse cannot run through checkpointed"):
        HessianOperator(objective, backend="forward-over-reverse")
    with pytest.raises(InputError, match="`gradient_checkpointing` needs a Hugging Face model"):
        HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches, checkpointing=True))
    checkpoint = make_checkpoint(tmp_path)
    result = CliRunner().invoke(
        app, ["analyze", str(checkpoint), *FAST, "--gradient-checkpointing"]
    )
    refused(result.exit_code, result.stderr, "--gradient-checkpointing", "Hugging Face")


def _kernels(op: HessianOperator, v: torch.Tensor) -> set[str]:
    """The SDPA kernels a product runs (the aten operators the profiler records)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        op @ v
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_finite_differences_run_under_the_callers_flash_kernel():
    """Double backward needs the math kernel and takes it whatever the caller asks; finite
    differences run under the caller's ``sdpa_kernel`` (flash here; CPU torch has no
    memory-efficient kernel) and match it to their tolerance."""
    objective = Objective(tiny_hf.gpt2(attn_implementation="sdpa"), CAUSAL, [_lm_batch(4, 10)])
    exact = HessianOperator(objective, cache_graph=False)
    fd = HessianOperator(objective, backend="finite-difference")
    v = _vector(exact.size, 0, torch.float32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = fd @ v
        assert any("flash" in k for k in _kernels(fd, v))
        want = exact @ v
        assert not any("flash" in k for k in _kernels(exact, v))
    assert _relative(got, want) <= 1e-4
