"""SAM and Eigen-SAM under a real transformers.Trainer (tiny BERT from a config, CPU): the same
steps as the library's own loop, bf16 and fp16 with a GradScaler included, and bit-identical
resume from a checkpoint."""

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

pytestmark = pytest.mark.integration  # real transformers.Trainer runs, end to end
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


def trained(
    kind: str,
    out: Path,
    model: torch.nn.Module,
    scaler: torch.amp.GradScaler | None = None,
    history: list | None = None,
    **extra: Any,
) -> SAMTrainer:
    """Train with ``SAMTrainer``; ``scaler`` runs fp16 as accelerate does on CUDA (see
    :func:`as_on_cuda`); ``history`` receives each step's (skipped, scale, weights)."""
    resume = extra.pop("resume", None)
    trainer = SAMTrainer(
        model=model, args=arguments(out, **extra), train_dataset=samples(), sam=factory(kind)
    )
    # BERT's classification loss ignores num_items_in_batch, so the Trainer would add up the
    # micro-batches' means (its own loss normalisation, SAM or not); averaged, as in the loop:
    trainer.model_accepts_loss_kwargs = False
    if scaler is not None:
        as_on_cuda(trainer, scaler)
    if history is not None:
        trainer.add_callback(Recorder(trainer, history))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def as_on_cuda(trainer: SAMTrainer, scaler: torch.amp.GradScaler) -> None:
    """Test only: give the Trainer's accelerator what it builds for fp16 on CUDA and not on CPU:
    the GradScaler (``prepare`` wraps the optimizer with it, ``backward`` scales with it) and
    ``native_amp`` (fp16 autocast around the model's forward, ``unscale_gradients`` before the
    gradient norm); CPU has fp16 autocast."""
    trainer.accelerator.scaler = scaler
    trainer.accelerator.native_amp = True


class Recorder(transformers.TrainerCallback):
    def __init__(self, trainer: SAMTrainer, history: list) -> None:
        self.trainer, self.history = trainer, history

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scaler = self.trainer.accelerator.scaler
        scale = None if scaler is None else scaler.get_scale()
        self.history.append((self.trainer.sam.skipped, scale, flat(self.trainer.model)))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def own_loop(
    kind: str,
    model: torch.nn.Module,
    steps: int,
    half: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    linear: bool = False,
    groups: list[list[str]] | None = None,
) -> tuple[SAM, list[tuple[bool, float | None, torch.Tensor]]]:
    """The library's loop: AdamW as the Trainer builds it (fused, weight decay 0; its param
    groups by name, if ``groups``, which order the flat vectors as the Trainer's), micro-batches in
    order, Eigen-SAM refreshed on each step's micro-batches, autocast to ``half``, a linear
    schedule (if ``linear``) stepped after each step not skipped. Returns the optimizer and each
    step's (skipped, scale, weights)."""
    named = dict(model.named_parameters())
    params = [{"params": [named[n] for n in group]} for group in groups or [list(named)]]
    base = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    opt = factory(kind)(base, model)
    schedule = transformers.get_linear_schedule_with_warmup(opt, 0, steps) if linear else None
    data = samples()
    collate = transformers.default_data_collator
    model.train()

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
            return model(**batch).loss

    per_step = MICRO * ACCUMULATE
    history = []
    for s in range(steps):
        start = (s * per_step) % len(data)
        window = [
            collate(data[start + i * MICRO : start + (i + 1) * MICRO]) for i in range(ACCUMULATE)
        ]
        if isinstance(opt, EigenSAM):
            opt.refresh_batches([(b, b["labels"]) for b in window])
        opt.step(micro_batch_closure(loss_of, window, scaler=scaler), scaler=scaler)
        if scaler is not None:
            scaler.update()
        if schedule is not None and not opt.skipped:
            schedule.step()
        history.append((opt.skipped, None if scaler is None else scaler.get_scale(), flat(model)))
    return opt, history


@pytest.mark.parametrize(
    ("kind", "bf16"), [("sam", False), ("eigen-sam", False), ("eigen-sam", True)]
)
def test_trainer_steps_equal_the_library_loop(kind: str, bf16: bool, tmp_path: Path):
    dtype = torch.float32 if bf16 else torch.float64
    trainer = trained(kind, tmp_path, tiny_hf.bert().to(dtype), bf16=bf16)
    reference = tiny_hf.bert().to(dtype)
    opt, _ = own_loop(kind, reference, 6, torch.bfloat16 if bf16 else None)
    assert trainer.sam.global_step == opt.global_step == 6
    moved = (flat(reference) - flat(tiny_hf.bert().to(dtype))).abs().max()
    assert moved > 1e-3
    torch.testing.assert_close(flat(trainer.model), flat(reference), rtol=0, atol=1e-6)
    if kind == "eigen-sam":
        assert trainer.sam.estimate is not None and trainer.sam.estimate.step == 4
        assert trainer.sam.estimate.dtype == str(dtype).removeprefix("torch.")
        assert trainer.sam.estimate.eigenvalue == pytest.approx(opt.estimate.eigenvalue, rel=1e-5)


def fp16_scaler(init_scale: float = 2.0**20) -> torch.amp.GradScaler:
    """By default a scale so large that the first step overflows in its pass at w (fp16)."""
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)


def poison(model: torch.nn.Module, at: set[int]) -> list[int]:
    """Make the logits infinite in the training forwards counted in ``at``; returns the count."""
    calls = [0]

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> Any:
        if not module.training:
            return None  # Eigen-SAM's refresh
        calls[0] += 1
        return output * float("inf") if calls[0] in at else None

    model.classifier.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("kind", ["sam", "eigen-sam"])
def test_fp16_with_a_grad_scaler_skips_overflows_as_the_library_loop(kind: str, tmp_path: Path):
    """fp16 as accelerate runs it on CUDA: steps 1 and 3 overflow in their pass at w (the scale),
    step 5 in its pass at w + ε (forward 15 poisoned). Those leave the weights bit-identical to
    before (not at w + ε), the scale backs off and the linear LR schedule does not move; every
    step, skipped or not, equals the library's loop ``step(closure, scaler=)`` bit for bit."""
    model, history = tiny_hf.bert(), []
    calls = poison(model, {15})
    trainer = trained(
        kind,
        tmp_path,
        model,
        scaler=fp16_scaler(),
        history=history,
        fp16=True,
        lr_scheduler_type="linear",
    )
    reference = tiny_hf.bert()
    reference_calls = poison(reference, {15})
    names = {p: n for n, p in trainer.model.named_parameters()}
    groups = [[names[p] for p in group["params"]] for group in trainer.sam.param_groups]
    opt, expected = own_loop(kind, reference, 6, torch.float16, fp16_scaler(), True, groups)
    skipped = [s for s, _, _ in history]
    assert skipped == [s for s, _, _ in expected] == [True, False, True, False, True, False]
    assert calls == reference_calls == [2 + 4 + 2 + 4 + 4 + 4]  # no pass at w + ε in 1 and 3
    assert [c for _, c, _ in history] == [c for _, c, _ in expected]
    assert [c for _, c, _ in history][::2] == [2.0**19, 2.0**18, 2.0**17]
    before = [flat(tiny_hf.bert())] + [w for _, _, w in history]
    for i in (0, 2, 4):
        assert torch.equal(before[i + 1], before[i])
    for (_, _, mine), (_, _, theirs) in zip(history, expected, strict=True):
        assert torch.equal(mine, theirs)
    assert trainer.sam.global_step == opt.global_step == 3
    assert set(trainer.lr_scheduler.get_last_lr()) == {LR / 2}  # 3 of 6 steps taken
    assert trainer.sam.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == LR / 2
    if kind == "eigen-sam":  # refreshed outside accelerate's fp16 autocast, as the loop's
        assert trainer.sam.estimate == opt.estimate and opt.estimate.dtype == "float32"


def test_fp16_on_cpu_warns_and_trains_in_float32(tmp_path: Path):
    """accelerate makes neither a GradScaler nor fp16 autocast for fp16=True on CPU: the run
    says so and equals the float32 run."""
    args = arguments(tmp_path, fp16=True, max_steps=2)
    trainer = SAMTrainer(
        model=tiny_hf.bert(), args=args, train_dataset=samples(), sam=factory("sam")
    )
    trainer.model_accepts_loss_kwargs = False  # as trained() sets it
    with pytest.warns(UserWarning, match="fp16=True on CPU: accelerate applies neither"):
        trainer.train()
    assert trainer.accelerator.scaler is None
    plain = trained("sam", tmp_path / "fp32", tiny_hf.bert(), max_steps=2)
    assert torch.equal(flat(trainer.model), flat(plain.model))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_from_a_trainer_checkpoint_is_bit_identical(precision: str, tmp_path: Path):
    """Random data order, a refresh before and after the checkpoint: the resumed run's weights
    equal the uninterrupted run's exactly, and optimizer.pt carries Eigen-SAM's eigenvector; with
    fp16 the checkpoint's scaler.pt (the Trainer saves and loads it) restores the scale."""
    common: dict[str, Any] = dict(
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        train_sampling_strategy="random",
        save_strategy="steps",
        save_steps=3,
    )
    scaler = (lambda: fp16_scaler(2.0**18)) if precision == "fp16" else lambda: None
    whole = trained("eigen-sam", tmp_path / "whole", tiny_hf.bert(), scaler(), **common)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["sam"]["global_step"] == 3 and state["sam"]["estimate"]["step"] == 2
    assert set(state["sam"]["eigenvector"]) == {n for n, _ in whole.model.named_parameters()}
    resumed = trained(
        "eigen-sam",
        tmp_path / "resumed",
        tiny_hf.bert(),
        scaler(),
        resume=str(checkpoint),
        **common,
    )
    assert resumed.sam.estimate == whole.sam.estimate
    assert torch.equal(flat(resumed.model), flat(whole.model))
    if precision == "fp16":  # 3 finite steps grew the scale, from which a later step overflows
        saved = torch.load(checkpoint / "scaler.pt", weights_only=True)
        assert saved["scale"] == 2.0**19
        assert resumed.accelerator.scaler.get_scale() == whole.accelerator.scaler.get_scale()
    assert resumed.sam.global_step == whole.sam.global_step == (5 if precision == "fp16" else 6)
