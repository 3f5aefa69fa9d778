"""A fine-tuning run's settings, stored in its folder, and what a resume may change."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from sharpscope.choices import CURVATURE_NAMES
from sharpscope.errors import InputError, check_choice, check_finite_fields
from sharpscope.training.optimizers import OptimizerSettings
from sharpscope.training.options import OPTIMIZERS, PRECISIONS, SCHEDULES

LAYOUTS: tuple[str, ...] = ("safetensors", "pretrained")
"""How a run writes its model: ``model.safetensors`` with the model spec in its metadata, or a
Hugging Face save_pretrained folder (a run started from one without `model`)."""
CHANGEABLE: tuple[str, ...] = ("steps", "epochs", "track_every", "save_every", "keep", "device")
"""Settings a resumed run may change: how long it runs, how often it records and saves, where.
Every other setting changes the trained weights or the tracked figures, so it is fixed."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a fine-tuning run (``config.json`` in its folder)."""

    checkpoint: str
    checkpoint_sha256: str
    model: str
    """The model spec as JSON."""
    data: str
    split: str
    val_data: str | None
    loss: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    rho: float
    alpha: float
    eig_every: int
    eig_steps: int
    schedule: str
    batch_size: int
    seed: int
    dtype: str
    probe_size: int
    track_iters: int
    steps: int | None
    """The total number of steps, or None when ``epochs`` gives it."""
    epochs: int | None
    track_every: int
    save_every: int
    keep: int
    device: str
    per_rank_sam: bool = False
    """Under torch.distributed: each rank perturbs with its own gradient (m-sharpness); absent
    from the configs of earlier versions."""
    text_field: str = "text"
    """Text data: the text field(s), the label field and the longest sequence
    (:class:`~sharpscope.io.tokenizer.TextSpec`); absent from the configs of earlier versions."""
    label_field: str = "label"
    max_length: int | None = None
    params: tuple[str, ...] | None = None
    """Globs of the parameters trained (:mod:`~sharpscope.training.selection`); None: all."""
    freeze: tuple[str, ...] | None = None
    """Globs of parameters left as they are; None: none."""
    layout: str = "safetensors"
    """The checkpoints' layout, one of :data:`LAYOUTS`."""
    curvature: str = "hessian"
    """The matrix whose λ_max the rows track (:data:`~sharpscope.curvature.CURVATURES`)."""
    precision: str = "float32"
    """The training passes' precision, one of :data:`PRECISIONS`."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        for name in ("params", "freeze"):
            globs = getattr(self, name)
            if globs is not None:  # a JSON list when read back
                object.__setattr__(self, name, tuple(globs))
                if not globs or not all(isinstance(g, str) and g for g in globs):
                    raise InputError(f"`{name}` must be one or more non-empty globs, got {globs}")
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("curvature", self.curvature, CURVATURE_NAMES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.precision == "bf16" and self.dtype != "float32":
            raise InputError(
                f"`precision` bf16 autocasts float32 weights, and leaves {self.dtype} ones as "
                "they are; use `dtype` float32 with it"
            )
        if self.per_rank_sam and self.optimizer == "sgd":
            raise InputError("`per_rank_sam` needs a SAM-style optimizer (sam, asam or eigen-sam)")
        if (self.steps is None) == (self.epochs is None):
            both = ", not both" if self.steps is not None else ""
            raise InputError(f"give either `steps` or `epochs`{both}")
        positive = ("lr", "eig_every", "eig_steps", "batch_size", "probe_size", "track_iters")
        positive += ("steps", "epochs", "track_every", "save_every", "keep")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"`{name}` must be positive, got {value}")
        for name in ("momentum", "weight_decay", "rho", "alpha"):
            if not getattr(self, name) >= 0:
                raise InputError(f"`{name}` must be at least 0, got {getattr(self, name)}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """The step the run ends at."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch  # type: ignore[operator]

    def optimizer_settings(self) -> OptimizerSettings:
        """The optimizer's part of the settings."""
        return OptimizerSettings(
            name=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            rho=self.rho,
            alpha=self.alpha,
            eig_every=self.eig_every,
            eig_steps=self.eig_steps,
            seed=self.seed,
        )

    def to_json(self) -> str:
        """The settings as an indented JSON object."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> RunConfig:
        """Parse :meth:`to_json`'s output; ``where`` names the file in errors."""
        try:
            data = json.loads(text)
            names = {f.name for f in fields(cls)}
            required = {f.name for f in fields(cls) if f.default is MISSING}
            if not isinstance(data, dict) or not required <= set(data) <= names:
                raise ValueError("its keys are not a run's settings")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"{where} is not a sharpscope fine-tuning config ({exc}); it was written by "
                "another version or edited"
            ) from None


def resumed(stored: RunConfig, given: Mapping[str, Any], where: str) -> RunConfig:
    """``stored`` with the settings given again on the command line: a changed fixed setting is
    an :class:`InputError`; ``steps``/``epochs`` replace each other."""
    for name, value in given.items():
        if name not in CHANGEABLE and value != getattr(stored, name):
            if name == "checkpoint_sha256":
                change = "`checkpoint` is not the file the run started from"
            else:
                own = _shown(getattr(stored, name))
                change = f"`{name}` {_shown(value)} differs from the run's {own}"
            changeable = ", ".join(f"`{n}`" for n in CHANGEABLE)
            raise InputError(
                f"{change} ({where}); a resumed run keeps its settings (only {changeable} may "
                "change): to change them, start a new run from one of its checkpoints"
            )
    changes = {name: value for name, value in given.items() if name in CHANGEABLE}
    if "steps" in changes and "epochs" not in changes:
        changes["epochs"] = None
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None
    return replace(stored, **changes)


def _shown(value: Any) -> str:
    """A setting as typed: globs comma-separated; None as not given."""
    if value is None:
        return "(not given)"
    return ",".join(value) if isinstance(value, tuple) else str(value)
