"""The fine-tuning loop: one optimizer step at a time, with the state a checkpoint must capture.

Pure logic: no printing and no files. The caller's hooks record rows, save checkpoints, show
progress and say when to stop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sharpscope import distributed
from sharpscope.batches import LossFn, correct_count, logits_of, move_to
from sharpscope.io.data import DataBundle
from sharpscope.optim.pieces import local
from sharpscope.structures import call_model, take
from sharpscope.training.optimizers import NoHook, StepHook
from sharpscope.training.order import DataOrder
from sharpscope.training.state import capture_rng, restore_rng

FIELDS: tuple[str, ...] = (
    "step",
    "epoch",
    "lr",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "probe_loss",
    "probe_accuracy",
    "lambda_max",
    "lambda_residual",
    "lambda_c",
    "lambda_c_low",
    "lambda_c_high",
    "lambda_c_direction",
    "alignment",
    "curvature",
    "product_dtype",
    "precision",
    "esam_eigenvalue",
    "esam_residual",
    "esam_alignment",
    "step_seconds",
    "track_seconds",
)
"""The columns of a run's metric rows (docs/finetune.md says what each means)."""


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite at ``step``."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step = step


@dataclass
class Window:
    """Training figures summed over the steps since the last recorded row."""

    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    counted: int = 0
    seconds: float = 0.0
    esam_alignment_sum: float = 0.0
    esam_alignments: int = 0

    def summary(self) -> dict[str, float | None]:
        """Mean minibatch loss, accuracy, seconds per step and Eigen-SAM alignment."""

        def mean(total: float, count: int) -> float | None:
            return total / count if count else None

        return {
            "loss": mean(self.loss_sum, self.steps),
            "accuracy": mean(self.correct, self.counted),
            "step_seconds": mean(self.seconds, self.steps),
            "esam_alignment": mean(self.esam_alignment_sum, self.esam_alignments),
        }


@dataclass
class Session:
    """A model in training with everything its next step depends on.

    Under torch.distributed, ``wrapped`` is the model in DistributedDataParallel (``model`` stays
    the plain module): then every rank takes its contiguous equal share of each batch, and the
    gradients, hence SAM's perturbation, are averaged over all ranks; with ``per_rank_sam`` the
    perturbation uses each rank's own gradient (m-sharpness). Recorded figures are global.
    """

    model: nn.Module
    loss_fn: LossFn
    data: DataBundle
    optimizer: Optimizer
    scheduler: LRScheduler
    order: DataOrder
    device: torch.device
    dtype: torch.dtype
    step: int = 0
    window: Window = field(default_factory=Window)
    wrapped: DistributedDataParallel | None = None
    per_rank_sam: bool = False
    hook: StepHook = field(default_factory=NoHook)
    """The optimizer's hook (:func:`~sharpscope.training.optimizers.build_optimizer` returns it)."""
    precision: str = "float32"
    """``bf16``: the forward passes (both of SAM's) run under bfloat16 autocast; the weights, their
    gradients and Eigen-SAM's refresh stay in ``dtype``."""
    sharded: bool = False
    """The model is sharded by FSDP2 (``fsdp``): it reduces the gradients itself, and the
    optimizer's state, sharded too, is saved apart from :meth:`state_dict`
    (:mod:`~sharpscope.training.sharded_state`)."""

    def train_step(self) -> float:
        """One optimizer step on the next minibatch; returns this rank's loss (at w, before the
        step). Raises :class:`Diverged`, before the weights move, when a loss is not finite."""
        self.model.train()
        index = self._share(self.order.next_batch())
        inputs = move_to(take(self.data.inputs, index), self.device, self.dtype)
        targets = move_to(self.data.targets[index], self.device, self.dtype)
        forward = self.model if self.wrapped is None else self.wrapped
        first: list[torch.Tensor | None] = []

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with self._synced(first_pass=not first):
                with self._autocast():
                    outputs = call_model(forward, inputs)
                    loss = self.loss_fn(outputs, targets)
                mean = distributed.sum_floats([float(loss.detach()) / distributed.world_size()])
                if not math.isfinite(mean[0]):
                    raise Diverged(self.step + 1, f"the loss became {mean[0]}")
                loss.backward()
            if not first:
                logits = logits_of(outputs)
                first.append(logits.detach() if logits is not None else None)
                # after the pass at w: a refresh sees the BatchNorm statistics that pass updated
                self.hook.refresh(inputs, targets)
            return loss

        start = time.perf_counter()
        loss = self.optimizer.step(closure)
        self.scheduler.step()
        value = float(loss.detach())
        self.step += 1
        self._accumulate(value, first[0], targets, time.perf_counter() - start)
        return value

    def _share(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of the batch ``index`` under torch.distributed, else all."""
        if not distributed.is_distributed():
            return index
        mine = distributed.shard(len(index))
        return index[mine.start : mine.stop]

    def _autocast(self) -> torch.autocast:
        """bfloat16 autocast on the model's device with ``precision`` bf16, else none."""
        bf16 = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _synced(self, first_pass: bool) -> contextlib.AbstractContextManager[None]:
        """No gradient averaging in SAM's first pass with ``per_rank_sam``, else as usual."""
        if self.per_rank_sam and first_pass and self.wrapped is not None:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _accumulate(
        self, loss: float, outputs: torch.Tensor | None, targets: torch.Tensor, seconds: float
    ) -> None:
        """Add this step's figures, summed over the ranks (one all-reduce when distributed)."""
        hits = correct_count(outputs, targets) or (0, 0)
        alignment = self.hook.alignment
        size = distributed.world_size()
        local = [loss / size, *hits, alignment / size if alignment is not None else 0.0]
        total = distributed.sum_floats(local)
        w = self.window
        w.steps += 1
        w.loss_sum += total[0]
        w.seconds += seconds
        w.correct += int(total[1])
        w.counted += int(total[2])
        if alignment is not None:
            w.esam_alignment_sum += total[3]
            w.esam_alignments += 1

    def take_row(self) -> dict[str, Any]:
        """This step's row without the tracked figures: step, epoch, the learning rate now, the
        window's means and Eigen-SAM's latest estimate; starts a new window."""
        estimate = self.hook.estimate
        row = {
            "step": self.step,
            "epoch": self.step / self.order.steps_per_epoch,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            **self.window.summary(),
            "precision": self.precision,
            "esam_eigenvalue": None if estimate is None else estimate.eigenvalue,
            "esam_residual": None if estimate is None else estimate.residual,
        }
        self.window = Window()
        return row

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights (and a sharded optimizer's state) that the next steps
        depend on, RNG states included."""
        ranks = distributed.is_distributed()
        return {
            "step": self.step,
            "epoch": self.order.epoch,
            **({} if self.sharded else {"optimizer": self.optimizer.state_dict()}),
            "scheduler": self.scheduler.state_dict(),
            "order": self.order.state_dict(),
            "rng": capture_rng(),
            **({"rank_rng": distributed.all_gather(capture_rng())} if ranks else {}),
            "window": asdict(self.window),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the weights, and a sharded optimizer's state, are
        loaded separately)."""
        if not self.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sharded:  # the rates too: a sharded part without state (SGD without momentum)
            for group, lr in zip(
                self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
            ):
                group["lr"] = lr
        self.order.load_state_dict(state["order"])
        restore_rng(_own_rng(state))
        self.window = Window(**state["window"])
        self.step = int(state["step"])


@dataclass
class Hooks:
    """What the loop calls: ``record(row)`` at tracking steps, ``save()`` at checkpoint steps
    (it may be called twice at one step), ``progress(loss)`` after each step,
    ``step_started(step, lr)`` before each step a row is recorded after, and ``should_stop()``
    before each step."""

    record: Callable[[dict[str, Any]], None]
    save: Callable[[], None]
    progress: Callable[[float], None] = lambda loss: None
    step_started: Callable[[int, float], None] = lambda step, lr: None
    should_stop: Callable[[], bool] = lambda: False


def run(
    session: Session,
    total_steps: int,
    track: Callable[[nn.Module], dict[str, Any]],
    track_every: int,
    save_every: int,
    hooks: Hooks,
) -> bool:
    """Train until ``total_steps``; record a row (the session's figures and ``track(model)``)
    every ``track_every`` steps and checkpoint every ``save_every`` steps, both also at the
    end. On a stop request, checkpoint and return False; return True when done."""

    def tracked(step: int) -> bool:
        return step == total_steps or step % track_every == 0

    while session.step < total_steps:
        if hooks.should_stop():
            hooks.save()
            return False
        if tracked(session.step + 1):
            hooks.step_started(session.step + 1, session.optimizer.param_groups[0]["lr"])
        hooks.progress(session.train_step())
        last = session.step == total_steps
        if tracked(session.step):
            hooks.record({**session.take_row(), **track(session.model)})
        if last or session.step % save_every == 0:
            hooks.save()
    return True


def _own_rng(state: dict[str, Any]) -> Any:
    """This rank's saved RNG states when the run was saved by as many ranks, else rank 0's."""
    per_rank = state.get("rank_rng")
    if per_rank is not None and len(per_rank) == distributed.world_size():
        return per_rank[distributed.rank()]
    return state["rng"]


def all_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite; of a model
    sharded by FSDP2, on every rank's shards (every rank calls it)."""
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    sharded = any(isinstance(t, DTensor) for t in state)
    finite = all(bool(torch.isfinite(local(t)).all()) for t in state)
    return not distributed.any_rank(not finite) if sharded else finite
