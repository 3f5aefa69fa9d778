"""A fine-tuning run's settings as a caller gives them (:class:`RunOptions`), a new run's
defaults, and the names it chooses among: torch-free, so that ``finetune --help`` and its option
errors never load torch (:mod:`sharpscope.training.plan` plans the run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "asam", "eigen-sam")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""The optimizer and schedule names; :class:`~sharpscope.training.run_config.RunConfig` checks
a run's, so the builders of :mod:`sharpscope.training.optimizers` take them as valid."""
DEFAULT_RHO: dict[str, float] = {"sgd": 0.0, "sam": 0.05, "asam": 0.5, "eigen-sam": 0.05}
"""ρ when none is given: SAM's and Eigen-SAM's usual 0.05, ASAM's 0.5 (about 10× larger)."""
PRECISIONS: tuple[str, ...] = ("float32", "bf16")
"""How the training passes compute: in the weights' dtype, or under bfloat16 autocast (weights,
gradients and the tracker's and Eigen-SAM's products stay float32)."""
DEFAULT_EPOCHS = 10
MARKER = ".sharpscope-run"
"""The file that marks a folder as a run's (:mod:`sharpscope.training.run_dir`)."""


@dataclass(frozen=True)
class RunOptions:
    """The settings a caller gives a run, each under its :class:`RunConfig` name; None is "not
    given": a new run takes :data:`DEFAULTS` (see :func:`new_run`), a resumed run its own."""

    data: str | None = None
    split: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    max_length: int | None = None
    val_data: str | None = None
    """None: the held-out split of ``data``, if it has one."""
    loss: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    rho: float | None = None
    alpha: float | None = None
    per_rank_sam: bool | None = None
    params: tuple[str, ...] | None = None
    """Globs of the parameters to train; None: all (:mod:`~sharpscope.training.selection`)."""
    freeze: tuple[str, ...] | None = None
    """Globs of the parameters not to train."""
    eig_every: int | None = None
    eig_steps: int | None = None
    schedule: str | None = None
    batch_size: int | None = None
    epochs: int | None = None
    steps: int | None = None
    track_every: int | None = None
    probe_size: int | None = None
    track_iters: int | None = None
    save_every: int | None = None
    keep: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    curvature: str | None = None
    precision: str | None = None

    def given(self) -> dict[str, Any]:
        """The settings given (not None), by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


DEFAULTS = RunOptions(
    split="train",
    text_field="text",
    label_field="label",
    loss="auto",
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0,
    alpha=0.2,
    per_rank_sam=False,
    eig_every=100,
    eig_steps=5,
    schedule="constant",
    batch_size=128,
    track_every=50,
    probe_size=256,
    track_iters=20,
    save_every=100,
    keep=3,
    seed=0,
    device="auto",
    dtype="float32",
    curvature="hessian",
    precision="float32",
)
"""A new run's settings where none is given. ``data`` has none; ``val_data`` None validates on
the held-out split of ``data``; ``rho`` is :data:`DEFAULT_RHO` of the optimizer; without
``steps`` or ``epochs`` a run lasts :data:`DEFAULT_EPOCHS` epochs."""
