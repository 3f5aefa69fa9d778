"""A fine-tuning run's settings as a caller gives them (:class:`RunOptions`), a new run's
defaults, and the names it chooses among: torch-free, so that ``finetune --help`` and its option
errors never load torch (:mod:`sharpscope.training.plan` plans the run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sharpscope.choices import CURVATURE_NAMES
from sharpscope.io.load_spec import LOAD, LoadSpec
from sharpscope.settings import fallbacks, like, setting

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


OPTIMIZE = "Optimizer"
TRACK = "Tracking"
SAVE = "Checkpoints"


def _run(default: Any, help: str, panel: str, **option: Any) -> Any:
    """A run setting: None when not given (a resumed run keeps its own), ``default`` for a new
    run."""
    return setting(None, help=help, panel=panel, fallback=default, **option)


@dataclass(frozen=True)
class RunOptions:
    """The settings a caller gives a run, each under its :class:`RunConfig` name; None is "not
    given": a new run takes :data:`DEFAULTS` (see :func:`new_run`), a resumed run its own.

    Example:
        >>> RunOptions(optimizer="sam", lr=0.05).given()
        {'optimizer': 'sam', 'lr': 0.05}
    """

    data: str | None = like(LoadSpec, "data")
    split: str | None = like(LoadSpec, "split")
    text_field: str | None = like(LoadSpec, "text_field")
    label_field: str | None = like(LoadSpec, "label_field")
    max_length: int | None = like(LoadSpec, "max_length")
    val_data: str | None = setting(
        None,
        help="Validation data spec (its held-out split if it has one, else all of it); default: "
        "the held-out split of --data.",
        panel=LOAD,
        kind="data",
        code=True,
    )
    """None: the held-out split of ``data``, if it has one."""
    loss: str | None = like(LoadSpec, "loss")
    optimizer: str | None = _run("sgd", ", ".join(OPTIMIZERS), OPTIMIZE, common=True)
    lr: float | None = _run(0.01, "Base learning rate.", OPTIMIZE, common=True)
    momentum: float | None = _run(
        0.9, "SGD momentum, also under SAM, ASAM and Eigen-SAM.", OPTIMIZE
    )
    weight_decay: float | None = _run(0.0, "SGD weight decay.", OPTIMIZE)
    rho: float | None = setting(
        None,
        help=f"Perturbation radius ρ; default {DEFAULT_RHO['sam']} (sam, eigen-sam), "
        f"{DEFAULT_RHO['asam']} (asam).",
        common=True,
        panel=OPTIMIZE,
    )
    alpha: float | None = _run(0.2, "Eigen-SAM's α, the weight of the eigenvector part.", OPTIMIZE)
    per_rank_sam: bool | None = _run(
        False,
        "Under torchrun: each rank perturbs with its own gradient (m-sharpness) instead of the "
        "averaged one.",
        OPTIMIZE,
    )
    params: tuple[str, ...] | None = setting(
        None,
        help="Train only the parameters whose name matches this glob (repeatable or "
        "comma-separated, as for analyze), e.g. 'classifier.*'; default: all.",
        panel=OPTIMIZE,
    )
    """Globs of the parameters to train; None: all (:mod:`~sharpscope.training.selection`)."""
    freeze: tuple[str, ...] | None = setting(
        None,
        help="Do not train the parameters whose name matches this glob (repeatable or "
        "comma-separated), e.g. 'bert.embeddings.*'.",
        panel=OPTIMIZE,
    )
    """Globs of the parameters not to train."""
    eig_every: int | None = _run(100, "Eigen-SAM: refresh the eigenvector every k steps.", OPTIMIZE)
    eig_steps: int | None = _run(5, "Eigen-SAM: Hessian-vector products per refresh.", OPTIMIZE)
    schedule: str | None = _run(
        "constant", f"Learning-rate schedule: {', '.join(SCHEDULES)}.", OPTIMIZE
    )
    batch_size: int | None = like(LoadSpec, "batch_size", common=True)
    epochs: int | None = setting(
        None,
        help=f"Passes over the data (default {DEFAULT_EPOCHS}); or --steps.",
        common=True,
        panel=OPTIMIZE,
    )
    steps: int | None = setting(None, help="Total optimizer steps.", common=True, panel=OPTIMIZE)
    track_every: int | None = _run(
        50, "Record λ_max, alignment, loss and accuracy every N steps.", TRACK
    )
    probe_size: int | None = _run(
        256, "Samples in the fixed probe batch λ_max is measured on.", TRACK
    )
    track_iters: int | None = _run(
        20, "Most Lanczos products per λ_max measurement (1: one product, the cheapest).", TRACK
    )
    save_every: int | None = _run(
        100, "Write a checkpoint every N steps (and at the end or on a stop).", SAVE
    )
    keep: int | None = _run(3, "Keep the last N checkpoints.", SAVE)
    seed: int | None = like(LoadSpec, "seed")
    device: str | None = like(LoadSpec, "device")
    dtype: str | None = like(LoadSpec, "dtype")
    curvature: str | None = _run(
        "hessian",
        f"The matrix whose λ_max is tracked: {', '.join(CURVATURE_NAMES)} (see analyze).",
        TRACK,
    )
    precision: str | None = _run(
        "float32",
        f"Training passes: {', '.join(PRECISIONS)} (bf16: bfloat16 autocast of float32 weights, "
        "whose gradients and λ_max products stay float32).",
        OPTIMIZE,
    )

    def given(self) -> dict[str, Any]:
        """The settings given (not None), by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


DEFAULTS = RunOptions(**fallbacks(RunOptions))
"""A new run's settings where none is given (each setting's declared fallback). ``data`` has
none; ``val_data`` None validates on the held-out split of ``data``; ``rho`` is
:data:`DEFAULT_RHO` of the optimizer; without ``steps`` or ``epochs`` a run lasts
:data:`DEFAULT_EPOCHS` epochs."""
