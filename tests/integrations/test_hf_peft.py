"""The Trainer callback and the SAM Trainer on a PEFT LoRA model, as ``peft`` users run them: a
real ``transformers.Trainer`` over a ``PeftModel`` (tiny Llama-style base, CPU, float64, no
download). The callback's λ_max is the top eigenvalue of the dense Hessian over the adapter's
parameters; Eigen-SAM trains the adapter only; the Trainer's checkpoints load with
``PeftModel.from_pretrained``."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import tiny_lora  # noqa: E402

from sharpscope import EigenSAM  # noqa: E402
from sharpscope.integrations.hf_callback import SharpnessCallback  # noqa: E402
from sharpscope.integrations.hf_sam import SAMTrainer, model_loss  # noqa: E402

pytestmark = pytest.mark.integration  # real transformers.Trainer runs, end to end
N = 2
"""Steps between measurements and checkpoints; the runs take 2N steps."""
TIGHT = dict(tol=1e-10, products=None, max_iter=300)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def samples(count: int = 32) -> list[dict[str, torch.Tensor]]:
    """Token sequences labelled with themselves (the model shifts them for next-token loss)."""
    ids = tiny_lora.tokens(count, 8, seed=2)
    return [{"input_ids": i, "labels": i} for i in ids]


def arguments(out: Path, **extra: Any) -> Any:
    settings: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=2 * N,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_steps=N,
        save_strategy="steps",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=1000,
    )
    return transformers.TrainingArguments(**{**settings, **extra})


SETUPS = {
    "plain": ({}, {}),
    "checkpointing": ({"gradient_checkpointing": True}, {}),
    "reentrant-checkpointing": (
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        {},
    ),
    "modules-to-save": ({}, {"modules_to_save": ["lm_head"]}),  # a trainable copy of the head
}
"""Trainer arguments and LoRA options of the runs the tests check. Checkpointing is non-reentrant
by default (transformers 5, which names these arguments ``activation_checkpointing*`` and warns);
reentrant checkpointing differentiates only once, but the measurements run in eval mode, where
the layers do not checkpoint."""


def setup(name: str, out: Path) -> tuple[Any, Any]:
    """The Trainer arguments and a fresh LoRA model for the setup ``name``."""
    args, lora = SETUPS[name]
    return arguments(out, **args), tiny_lora.lora(torch.float64, **lora)


def checkpointed(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def train(trainer: Any, **options: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**options)


def top_eigenvalue(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """λ_max of the dense Hessian over the trainable parameters (the ground truth)."""
    return float(torch.linalg.eigvalsh(tiny_lora.dense_hessian(model, ids))[-1])


def adapter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", list(SETUPS))
def test_the_callback_logs_the_adapters_lambda_max(tmp_path: Path, name: str):
    args, model = setup(name, tmp_path)
    frozen = tiny_lora.frozen_state(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=samples())
    probe = tiny_lora.tokens(8, 8, seed=3)
    callback = SharpnessCallback(trainer, [{"input_ids": probe, "labels": probe}], N, **TIGHT)
    trainer.add_callback(callback)
    train(trainer)
    assert checkpointed(model) == args.gradient_checkpointing
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert callback.tracker.state_dict()["top"].numel() == adapter  # v₁ over the adapter only
    logged = {r["step"]: r for r in trainer.state.log_history if "sharpness/lambda_max" in r}
    assert sorted(logged) == [N, 2 * N]
    assert logged[2 * N]["sharpness/lambda_max"] == pytest.approx(
        top_eigenvalue(trainer.model, probe), rel=1e-8
    )
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_the_callback_measures_outside_the_trainers_bf16_autocast(tmp_path: Path):
    """accelerate runs the model's forward in bf16 autocast under ``bf16=True``; the callback's
    products must not (they were 2e-3 off, and never converged, before it unpatched forward)."""
    model = tiny_lora.lora(torch.float32)
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path, bf16=True), train_dataset=samples()
    )
    probe = tiny_lora.tokens(8, 8, seed=3)
    callback = SharpnessCallback(trainer, [{"input_ids": probe, "labels": probe}], N, **TIGHT)
    trainer.add_callback(callback)
    train(trainer)
    assert callable(model.__dict__.get("forward"))  # accelerate's autocast forward is in place
    logged = [r for r in trainer.state.log_history if "sharpness/lambda_max" in r][-1]
    exact = top_eigenvalue(copy.deepcopy(model).double(), probe)
    assert logged["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-5)


def eigen_sam(base: torch.optim.Optimizer, model: torch.nn.Module) -> EigenSAM:
    return EigenSAM(base, rho=0.05, alpha=0.5, model=model, loss_fn=model_loss, eig_every=N)


def sam_trained(name: str, out: Path, **options: Any) -> SAMTrainer:
    """2N steps of Eigen-SAM (SGD base) on the LoRA model of setup ``name``."""
    args, model = setup(name, out)
    trainer = SAMTrainer(model=model, args=args, train_dataset=samples(), sam=eigen_sam)
    train(trainer, **options)
    assert checkpointed(model) == args.gradient_checkpointing
    return trainer


@pytest.mark.parametrize("name", list(SETUPS))
def test_eigen_sam_trains_the_adapter_that_peft_loads(tmp_path: Path, name: str):
    trainer = sam_trained(name, tmp_path / "run")
    model, sam = trainer.model, trainer.sam
    assert sam.global_step == 2 * N and sam.estimate is not None and sam.estimate.step == N
    assert sorted(sam.eigenvector) == sorted(adapter_names(model))
    untrained = setup(name, tmp_path)[1]
    assert torch.equal(  # the frozen base is untouched
        torch.cat([p.reshape(-1) for p in tiny_lora.frozen_state(model).values()]),
        torch.cat([p.reshape(-1) for p in tiny_lora.frozen_state(untrained).values()]),
    )
    trained = dict(model.named_parameters())
    assert all(
        not torch.equal(trained[n], p) for n, p in untrained.named_parameters() if p.requires_grad
    )

    saved = tmp_path / "run" / f"checkpoint-{2 * N}"
    assert (saved / "adapter_config.json").is_file()
    loaded = peft.PeftModel.from_pretrained(tiny_lora.base(torch.float64), saved)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_resuming_the_eigen_sam_run_is_bit_identical(tmp_path: Path):
    whole = sam_trained("plain", tmp_path / "whole")
    middle = tmp_path / "whole" / f"checkpoint-{N}"
    resumed = sam_trained("plain", tmp_path / "again", resume_from_checkpoint=str(middle))
    assert resumed.sam.global_step == 2 * N
    again = dict(resumed.model.named_parameters())
    for name, p in whole.model.named_parameters():
        assert torch.equal(p, again[name]), name


def test_the_docs_peft_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """docs/integrations.md's PEFT example, as written: its trained model (still carrying
    accelerate's bf16 forward) and its reloaded adapter analyze to the same λ_max, which the
    callback logged at the last step."""
    docs = Path(__file__).parents[2] / "docs" / "integrations.md"
    section = docs.read_text().split("## LoRA adapters (PEFT) in memory", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {"__name__": "docs_example"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(docs), "exec"), names)  # the docs' own code
    assert "_original_forward" in names["model"].__dict__  # accelerate's autocast forward
    assert names["trained"] == pytest.approx(names["reloaded"], rel=1e-6)
    assert len(names["logged"]) == 2
    assert names["logged"][-1] == pytest.approx(names["trained"], rel=1e-3)
