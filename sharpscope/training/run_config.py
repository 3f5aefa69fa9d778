"""A fine-tuning run's settings, declared once: :class:`RunConfig` (the run's ``config.json``),
:class:`RunOptions` (the same settings as a caller gives them, each None when not given), and
what a resume may change. ``finetune``'s options, config keys and flag names are generated from
these declarations (:mod:`sharpscope.cli.declarations`). Torch-free."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from sharpscope.choices import BACKEND_CHOICES, BACKENDS, CURVATURE_NAMES
from sharpscope.errors import InputError, check_choice
from sharpscope.io.load_spec import LOAD, RUN, LoadSpec
from sharpscope.settings import declared, like, optional_settings, setting
from sharpscope.training.options import (
    DEFAULT_EPOCHS,
    OPTIMIZE,
    PRECISIONS,
    SAVE,
    SCHEDULES,
    TRACK,
    OptimizerSettings,
    check_signs,
    stored,
)

LAYOUTS: tuple[str, ...] = ("safetensors", "pretrained")
"""How a run writes its model: ``model.safetensors`` with the model spec in its metadata, or a
Hugging Face save_pretrained folder (a run started from one without `model`)."""
TRACK_MEASURES: tuple[str, ...] = ("lambda_max", "critical", "both")
"""What a run's rows track: λ_max (Lanczos products), the critical sharpness (forward passes
only, :mod:`~sharpscope.analysis.critical_sharpness`), or both."""
CHANGEABLE: tuple[str, ...] = ("steps", "epochs", "track_every", "save_every", "keep", "device")
"""Settings a resumed run may change: how long it runs, how often it records and saves, where.
Every other setting changes the trained weights or the tracked figures, so it is fixed."""


@dataclass(frozen=True, kw_only=True)
class RunConfig(OptimizerSettings):
    """Everything that defines a fine-tuning run (``config.json`` in its folder): the optimizer's
    settings and the run's own, each declared with its help and flag, and what the run derives
    (the checkpoint, its hash, the model spec, the layout). A setting without a default is in
    every stored config (one without it is refused) and its fallback is a new run's; a setting
    added later defaults to what runs did before it, so that older configs still load.
    """

    checkpoint: str
    checkpoint_sha256: str
    model: str
    """The model spec as JSON."""
    layout: str = "safetensors"
    """The checkpoints' layout, one of :data:`LAYOUTS`."""
    data: str = like(LoadSpec, "data", default=MISSING)
    split: str = like(LoadSpec, "split", default=MISSING)
    text_field: str = like(LoadSpec, "text_field", default="text")
    label_field: str = like(LoadSpec, "label_field", default="label")
    max_length: int | None = like(LoadSpec, "max_length", default=None)
    """Text data: the text field(s), the label field and the longest sequence
    (:class:`~sharpscope.io.tokenizer.TextSpec`); absent from the configs of earlier versions."""
    val_data: str | None = stored(
        None,
        "Validation data spec (its held-out split if it has one, else all of it); default: the "
        "held-out split of --data.",
        LOAD,
        kind="data",
        code=True,
    )
    """None: the held-out split of ``data``, if it has one."""
    loss: str = like(LoadSpec, "loss", default=MISSING)
    per_rank_sam: bool = setting(
        False,
        help="Under torchrun: each rank perturbs with its own gradient (m-sharpness) instead of "
        "the averaged one.",
        panel=OPTIMIZE,
    )
    """Absent from the configs of earlier versions."""
    params: tuple[str, ...] | None = setting(
        None,
        help="Train only the parameters whose name matches this glob (repeatable or "
        "comma-separated, as for analyze), e.g. 'classifier.*'; default: all.",
        panel=OPTIMIZE,
    )
    """Globs of the parameters trained (:mod:`~sharpscope.training.selection`); None: all."""
    freeze: tuple[str, ...] | None = setting(
        None,
        help="Do not train the parameters whose name matches this glob (repeatable or "
        "comma-separated), e.g. 'bert.embeddings.*'.",
        panel=OPTIMIZE,
    )
    """Globs of parameters left as they are; None: none."""
    schedule: str = stored("constant", f"Learning-rate schedule: {', '.join(SCHEDULES)}.", OPTIMIZE)
    batch_size: int = like(LoadSpec, "batch_size", default=MISSING, common=True)
    epochs: int | None = stored(
        None, f"Passes over the data (default {DEFAULT_EPOCHS}); or --steps.", OPTIMIZE, common=True
    )
    steps: int | None = stored(None, "Total optimizer steps.", OPTIMIZE, common=True)
    """The total number of steps, or None when ``epochs`` gives it."""
    track_every: int = stored(
        50, "Record λ_max, alignment, loss and accuracy every N steps.", TRACK
    )
    probe_size: int = stored(256, "Samples in the fixed probe batch λ_max is measured on.", TRACK)
    track_iters: int = stored(
        20, "Most Lanczos products per λ_max measurement (1: one product, the cheapest).", TRACK
    )
    save_every: int = stored(
        100, "Write a checkpoint every N steps (and at the end or on a stop).", SAVE
    )
    keep: int = stored(3, "Keep the last N checkpoints.", SAVE)
    device: str = like(LoadSpec, "device", default=MISSING)
    dtype: str = like(LoadSpec, "dtype", default=MISSING)
    curvature: str = setting(
        "hessian",
        help=f"The matrix whose λ_max is tracked: {', '.join(CURVATURE_NAMES)} (see analyze).",
        panel=TRACK,
    )
    """The matrix whose λ_max the rows track (:data:`~sharpscope.curvature.CURVATURES`)."""
    track_measure: str = setting(
        "lambda_max",
        help="What rows track: lambda_max, critical (2/η_c along the last update: about 8 "
        "forward passes, no product; for the largest models) or both.",
        panel=TRACK,
    )
    """One of :data:`TRACK_MEASURES`; absent from the configs of earlier versions."""
    backend: str = setting(
        "double-backward",
        help=f"Hessian products of Eigen-SAM's refresh and the tracked λ_max: "
        f"{', '.join(BACKEND_CHOICES)}, as for analyze (finite-difference: a gradient's memory; "
        "auto: double-backward when its graph fits the free memory, chosen once per run).",
        panel=TRACK,
    )
    """How the Hessian's products are taken (:data:`~sharpscope.choices.BACKEND_CHOICES`);
    absent from the configs of earlier versions."""
    auto_backend: str | None = None
    """The backend ``auto`` chose when the run started (kept: a resumed run takes the same
    products); None when ``backend`` names one, or before the choice."""
    precision: str = setting(
        "float32",
        help=f"Training passes: {', '.join(PRECISIONS)} (bf16: bfloat16 autocast of float32 "
        "weights, whose gradients and λ_max products stay float32).",
        panel=OPTIMIZE,
    )
    """The training passes' precision, one of :data:`PRECISIONS`."""
    fsdp: bool = setting(
        False,
        help="Under torchrun: shard the parameters and optimizer state over the ranks with FSDP2 "
        "(per transformer block, then the root); checkpoints are sharded and resume on any number "
        "of ranks; λ_max and Eigen-SAM take --backend finite-difference. "
        "docs/finetune.md.",
        panel=RUN,
    )
    """Absent from the configs of earlier versions."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("params", "freeze"):
            globs = getattr(self, name)
            if globs is not None:  # a JSON list when read back
                object.__setattr__(self, name, tuple(globs))
                if not globs or not all(isinstance(g, str) and g for g in globs):
                    raise InputError(f"`{name}` must be one or more non-empty globs, got {globs}")
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("curvature", self.curvature, CURVATURE_NAMES)
        check_choice("track_measure", self.track_measure, TRACK_MEASURES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("backend", self.backend, BACKEND_CHOICES)
        if self.auto_backend is not None:
            check_choice("auto_backend", self.auto_backend, BACKENDS)
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
        if self.fsdp:
            self._check_sharded()
        positive = ("batch_size", "probe_size", "track_iters", "steps", "epochs", "track_every")
        check_signs(self, (*positive, "save_every", "keep"), ())

    def _check_sharded(self) -> None:
        """Refuse what does not run under ``fsdp``: Hessian products other than finite
        differences (λ_max's tracking and Eigen-SAM's refresh take them on sharded vectors), a
        tracked matrix other than the Hessian, and per-rank SAM perturbations; ``backend`` auto
        chooses finite differences."""
        products = self.track_measure != "critical" or self.optimizer == "eigen-sam"
        if products and self.backend not in ("finite-difference", "auto"):
            raise InputError(
                "`fsdp` takes the Hessian's products (the tracked λ_max, Eigen-SAM's refresh) by "
                f"finite differences of sharded gradients only, not `backend` {self.backend}: "
                "pass `backend` finite-difference (or `track_measure` critical)"
            )
        if self.track_measure != "critical" and self.curvature != "hessian":
            raise InputError(
                f"`fsdp` tracks the Hessian's λ_max only, not `curvature` {self.curvature}: its "
                "products are finite differences of sharded gradients"
            )
        if self.per_rank_sam:
            raise InputError(
                "`per_rank_sam` does not run under `fsdp`: FSDP2 reduces every gradient over the "
                "ranks; leave it out"
            )

    @property
    def products_backend(self) -> str:
        """The backend of the run's Hessian products: ``backend``, or what ``auto`` chose."""
        backend = self.auto_backend if self.backend == "auto" else self.backend
        assert backend is not None, "`backend` auto has not chosen yet"
        return backend

    def total_steps(self, steps_per_epoch: int) -> int:
        """The step the run ends at."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch  # type: ignore[operator]

    def loading(self) -> dict[str, Any]:
        """The settings it shares with :class:`~sharpscope.io.load_spec.LoadSpec` (the data, its
        batches, the loss, the device...), by name: how the run loads its inputs."""
        shared = {d.name for d in declared(LoadSpec)} & {d.name for d in declared(type(self))}
        return {name: getattr(self, name) for name in shared}

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


@optional_settings(RunConfig)
class RunOptions:
    """The settings a caller gives a run: :class:`RunConfig`'s declared settings, each None when
    not given; a new run takes each one's fallback
    (:func:`~sharpscope.training.plan.new_run`), a resumed run its own.

    Example:
        >>> RunOptions(optimizer="sam", lr=0.05).given()
        {'optimizer': 'sam', 'lr': 0.05}
    """

    def given(self) -> dict[str, Any]:
        """The settings given (not None), by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


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
