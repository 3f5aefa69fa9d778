"""SAM and Eigen-SAM under a real transformers.Trainer (tiny BERT from a config, CPU): the same
steps as the library's own loop, bf16 included, and bit-identical resume from a checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import tiny_hf
import torch

from sharpscope.optim import SAM, EigenSAM, micro_batch_closure

transformers = pytest.importorskip("transformers")
from sharpscope.integrations.hf_sam import SAMTrainer, model_loss  # noqa: E402

RHO, ALPHA, LR = 0.05, 0.3, 1e-2
MICRO, ACCUMULATE = 4, 2


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def samples(count: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_hf.VOCAB, (count, 7), generator=g)
    labels = torch.randint(0, 3, (count,), generator=g)
    mask = torch.ones(count, 7, dtype=torch.int64)
    mask[::3, 5:] = 0
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(count)
    ]


def factory(kind: str):
    def make(base: torch.optim.Optimizer, model: torch.nn.Module) -> SAM:
        if kind == "sam":
            return SAM(base, rho=RHO, model=model)
        return EigenSAM(base, RHO, ALPHA, model=model, loss_fn=model_loss, eig_every=2, eig_steps=3)

    return make


def arguments(out: Path, **extra: Any) -> Any:
    settings: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=6,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
        train_sampling_strategy="sequential",
    )
    return transformers.TrainingArguments(**{**settings, **extra})


def trained(kind: str, out: Path, model: torch.nn.Module, **extra: Any) -> SAMTrainer:
    resume = extra.pop("resume", None)
    trainer = SAMTrainer(
        model=model, args=arguments(out, **extra), train_dataset=samples(), sam=factory(kind)
    )
    # BERT's classification loss ignores num_items_in_batch, so the Trainer would add up the
    # micro-batches' means (its own loss normalisation, SAM or not); averaged, as in the loop:
    trainer.model_accepts_loss_kwargs = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def own_loop(kind: str, model: torch.nn.Module, steps: int, bf16: bool) -> SAM:
    """The library's loop: AdamW as the Trainer builds it (weight decay 0), micro-batches in
    order, Eigen-SAM refreshed on each step's micro-batches."""
    opt = factory(kind)(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0), model)
    data = samples()
    collate = transformers.default_data_collator
    model.train()

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(**batch).loss

    per_step = MICRO * ACCUMULATE
    for s in range(steps):
        start = (s * per_step) % len(data)
        window = [
            collate(data[start + i * MICRO : start + (i + 1) * MICRO]) for i in range(ACCUMULATE)
        ]
        if isinstance(opt, EigenSAM):
            opt.refresh_batches([(b, b["labels"]) for b in window])
        opt.step(micro_batch_closure(loss_of, window))
    return opt


@pytest.mark.parametrize(
    ("kind", "bf16"), [("sam", False), ("eigen-sam", False), ("eigen-sam", True)]
)
def test_trainer_steps_equal_the_library_loop(kind: str, bf16: bool, tmp_path: Path):
    dtype = torch.float32 if bf16 else torch.float64
    trainer = trained(kind, tmp_path, tiny_hf.bert().to(dtype), bf16=bf16)
    reference = tiny_hf.bert().to(dtype)
    opt = own_loop(kind, reference, 6, bf16)
    assert trainer.sam.global_step == opt.global_step == 6
    moved = (flat(reference) - flat(tiny_hf.bert().to(dtype))).abs().max()
    assert moved > 1e-3
    torch.testing.assert_close(flat(trainer.model), flat(reference), rtol=0, atol=1e-6)
    if kind == "eigen-sam":
        assert trainer.sam.estimate is not None and trainer.sam.estimate.step == 4
        assert trainer.sam.estimate.dtype == str(dtype).removeprefix("torch.")
        assert trainer.sam.estimate.eigenvalue == pytest.approx(opt.estimate.eigenvalue, rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_from_a_trainer_checkpoint_is_bit_identical(bf16: bool, tmp_path: Path):
    """Random data order, a refresh before and after the checkpoint: the resumed run's weights
    equal the uninterrupted run's exactly, and optimizer.pt carries Eigen-SAM's eigenvector."""
    common = dict(bf16=bf16, train_sampling_strategy="random", save_strategy="steps", save_steps=3)
    whole = trained("eigen-sam", tmp_path / "whole", tiny_hf.bert(), **common)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["sam"]["global_step"] == 3 and state["sam"]["estimate"]["step"] == 2
    assert set(state["sam"]["eigenvector"]) == {n for n, _ in whole.model.named_parameters()}
    resumed = trained(
        "eigen-sam", tmp_path / "resumed", tiny_hf.bert(), resume=str(checkpoint), **common
    )
    assert resumed.sam.estimate == whole.sam.estimate and resumed.sam.global_step == 6
    assert torch.equal(flat(resumed.model), flat(whole.model))


def test_fp16_is_refused(tmp_path: Path):
    args = arguments(tmp_path, fp16=True)
    with pytest.raises(ValueError, match="fp16 with SAM"):
        SAMTrainer(model=tiny_hf.bert(), args=args, train_dataset=samples(), sam=factory("sam"))
