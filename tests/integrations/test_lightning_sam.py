"""SAM and Eigen-SAM under a real lightning.Trainer (CPU): the same steps as the library's own
loop (float64, bf16-mixed, and fp16 autocast with a GradScaler, 2 micro-batches a step) and
bit-identical resume from a checkpoint; ``import sharpscope`` imports neither framework."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sharpscope.optim import SAM, EigenSAM, micro_batch_closure

lightning = pytest.importorskip("lightning")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from sharpscope.integrations.lightning_sam import SAMModuleMixin  # noqa: E402

pytestmark = pytest.mark.integration  # real lightning.Trainer runs, end to end
CE = nn.functional.cross_entropy
MICRO, ACCUMULATE = 8, 2


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def dataset(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (64,), generator=g)
    return list(zip(x, y, strict=True))


def make_optimizer(kind: str, net: nn.Module) -> SAM:
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if kind == "sam":
        return SAM(base, rho=0.1, model=net)
    return EigenSAM(base, 0.1, 0.5, model=net, loss_fn=CE, eig_every=3, eig_steps=4)


class Module(SAMModuleMixin, lightning.LightningModule):
    sam_accumulate = ACCUMULATE

    def __init__(self, kind: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = kind
        # built in its dtype: Lightning loads a checkpoint's weights before "64-true" casts the
        # module, so a float32-built module would round the float64 weights it resumes from
        self.net = network().to(dtype)

    def sam_loss(self, batch: Any) -> torch.Tensor:
        return CE(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.kind, self.net)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)}


def fit(
    kind: str,
    precision: str,
    epochs: int,
    ckpt: Path | None = None,
    save: Path | None = None,
    module: lightning.LightningModule | None = None,
):
    """Fit ``module`` (a new :class:`Module` by default); ``precision="16-mixed"`` is fp16
    autocast with a GradScaler made by :func:`scaler`, as Lightning's own flag is on CUDA (on CPU
    the flag would give bf16)."""
    dtype = torch.float64 if precision == "64-true" else torch.float32
    module = Module(kind, dtype) if module is None else module
    loader = torch.utils.data.DataLoader(dataset(dtype), batch_size=MICRO, shuffle=False)
    if precision == "16-mixed":
        setting: dict[str, Any] = {"plugins": [MixedPrecision(precision, "cpu", scaler=scaler())]}
    else:
        setting = {"precision": precision}
    trainer = lightning.Trainer(
        accelerator="cpu",
        **setting,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, trainer


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize(
    ("kind", "precision"),
    [("sam", "64-true"), ("eigen-sam", "64-true"), ("eigen-sam", "bf16-mixed")],
)
def test_lightning_steps_equal_the_library_loop(kind: str, precision: str):
    module, trainer = fit(kind, precision, epochs=2)
    assert trainer.global_step == 8
    dtype = torch.float64 if precision == "64-true" else torch.float32
    net = network().to(dtype)
    opt = make_optimizer(kind, net)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    data = dataset(dtype)
    batches = [
        (
            torch.stack([x for x, _ in data[i : i + MICRO]]),
            torch.stack([y for _, y in data[i : i + MICRO]]),
        )
        for i in range(0, len(data), MICRO)
    ]

    def loss_of(batch: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            return CE(net(batch[0]), batch[1])

    for _epoch in range(2):
        for s in range(0, len(batches), ACCUMULATE):
            window = batches[s : s + ACCUMULATE]
            if isinstance(opt, EigenSAM):
                opt.refresh_batches(window)
            opt.step(micro_batch_closure(loss_of, window))
            scheduler.step()
    sam = trainer.optimizers[0]
    assert sam.global_step == opt.global_step == 8
    assert (flat(net) - flat(network().to(dtype))).abs().max() > 1e-2
    torch.testing.assert_close(flat(module.net), flat(net), rtol=0, atol=1e-6)
    if kind == "eigen-sam":
        assert sam.estimate.step == 6 and sam.estimate.dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("precision", ["64-true", "bf16-mixed"])
def test_resume_from_a_lightning_checkpoint_is_bit_identical(precision: str, tmp_path: Path):
    whole, _ = fit("eigen-sam", precision, epochs=3)
    fit("eigen-sam", precision, epochs=1, save=tmp_path / "epoch1.ckpt")
    state = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["optimizer_states"][0]
    assert state["sam"]["global_step"] == 4 and state["sam"]["estimate"]["step"] == 3
    assert set(state["sam"]["eigenvector"]) == {n for n, _ in whole.net.named_parameters()}
    resumed, trainer = fit("eigen-sam", precision, epochs=3, ckpt=tmp_path / "epoch1.ckpt")
    assert trainer.optimizers[0].estimate == whole.trainer.optimizers[0].estimate
    assert torch.equal(flat(resumed.net), flat(whole.net))


def scaler() -> torch.amp.GradScaler:
    """A scale so large that the first two steps overflow in their pass at w (fp16 autocast)."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)


class Poisoned(Module):
    """:class:`Module` whose ``sam_loss`` is infinite in the calls listed in ``at``; it records
    (skipped, scale, weights) after every optimizer step."""

    def __init__(self, kind: str, at: set[int]) -> None:
        super().__init__(kind, torch.float32)
        self.at, self.calls, self.history = at, 0, []

    def sam_loss(self, batch: Any) -> torch.Tensor:
        self.calls += 1
        loss = super().sam_loss(batch)
        return loss * float("inf") if self.calls in self.at else loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = super().training_step(batch, batch_idx)
        if loss is not None:
            scale = self.trainer.precision_plugin.scaler.get_scale()
            self.history.append((self.trainer.optimizers[0].skipped, scale, flat(self.net)))
        return loss


@pytest.mark.parametrize("kind", ["sam", "eigen-sam"])
def test_fp16_with_a_grad_scaler_skips_overflows_as_the_library_loop(kind: str):
    """Steps 1-2 overflow in their pass at w (the huge scale), step 5 in its pass at w + ε
    (call 15, poisoned): those leave the weights bit-identical to before (not at w + ε), the scale
    backs off and the scheduler does not step; every step, skipped or not, equals the library's
    loop ``step(closure, scaler=)`` with the same scaler bit for bit."""
    module = Poisoned(kind, {15})
    _, trainer = fit(kind, "16-mixed", epochs=2, module=module)
    assert trainer.global_step == 8  # Lightning counts the skipped steps too
    net = network()
    opt = make_optimizer(kind, net)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    data = dataset(torch.float32)
    batches = [
        (
            torch.stack([x for x, _ in data[i : i + MICRO]]),
            torch.stack([y for _, y in data[i : i + MICRO]]),
        )
        for i in range(0, len(data), MICRO)
    ]
    reference = scaler()
    calls = []

    def loss_of(batch: Any) -> torch.Tensor:
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = CE(net(batch[0]), batch[1])
        return loss * float("inf") if len(calls) == 15 else loss

    history = []
    for _epoch in range(2):
        for s in range(0, len(batches), ACCUMULATE):
            window = batches[s : s + ACCUMULATE]
            if isinstance(opt, EigenSAM):
                opt.refresh_batches(window)
            opt.step(micro_batch_closure(loss_of, window, scaler=reference), scaler=reference)
            reference.update()
            if not opt.skipped:
                scheduler.step()
            history.append((opt.skipped, reference.get_scale(), flat(net)))
    skipped = [s for s, _, _ in module.history]
    assert skipped == [s for s, _, _ in history] == [True, True, False, False, True] + [False] * 3
    assert module.calls == len(calls) == 2 * 2 + 6 * 4  # steps 1-2 ran no pass at w + ε
    assert [c for _, c, _ in module.history] == [c for _, c, _ in history]
    assert [c for _, c, _ in history][:5] == [2.0**19, 2.0**18, 2.0**18, 2.0**18, 2.0**17]
    before = [flat(network())] + [w for _, _, w in module.history]
    for i in (0, 1, 4):
        assert torch.equal(before[i + 1], before[i])
    for (_, _, mine), (_, _, theirs) in zip(module.history, history, strict=True):
        assert torch.equal(mine, theirs)
    sam = trainer.optimizers[0]
    assert sam.global_step == opt.global_step == 5
    assert sam.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05
    if kind == "eigen-sam":
        assert sam.estimate == opt.estimate and sam.estimate.dtype == "float32"


def test_fp16_resume_restores_the_grad_scaler(tmp_path: Path):
    """The checkpoint holds the scaler's state (Lightning's precision plugin saves it) and the
    resumed run continues with it: bit-identical weights and the same scale."""
    whole, trainer = fit("eigen-sam", "16-mixed", epochs=3)
    _, first = fit("eigen-sam", "16-mixed", epochs=1, save=tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["MixedPrecision"]
    assert saved["scale"] == first.precision_plugin.scaler.get_scale() < 2.0**20
    resumed, again = fit("eigen-sam", "16-mixed", epochs=3, ckpt=tmp_path / "epoch1.ckpt")
    assert again.precision_plugin.scaler.get_scale() == trainer.precision_plugin.scaler.get_scale()
    assert torch.equal(flat(resumed.net), flat(whole.net))


def test_importing_sharpscope_imports_no_framework():
    code = (
        "import sys, sharpscope, sharpscope.optim, sharpscope.integrations; sharpscope.SAM; "
        "print(sorted(m for m in ('transformers', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
