"""Planning a fine-tuning run: the settings a caller gives, the defaults of a new run, the rules
of a resume, and the data a run validates on. Nothing is loaded or trained here."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sharpscope import distributed
from sharpscope.analysis.fsdp import require_ranks
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import checkpoint_sha256
from sharpscope.io.data import HELD_OUT, DataBundle, held_out_split, load_data, open_source
from sharpscope.io.models import ModelSpec
from sharpscope.io.tokenizer import TextSpec
from sharpscope.io.user_code import is_object_spec
from sharpscope.settings import declared, fallbacks
from sharpscope.training.options import DEFAULT_EPOCHS, DEFAULT_RHO
from sharpscope.training.run_config import RunConfig, RunOptions, resumed
from sharpscope.training.run_dir import CONFIG, RunDir, model_path


@dataclass(frozen=True)
class Plan:
    """A run ready to load: its folder, its settings, the weights to load, and the checkpoint
    folder a resumed run continues from (None for a new run)."""

    folder: RunDir
    config: RunConfig
    weights: Path
    resume_from: Path | None

    def loaded(
        self, sha256: str, spec: ModelSpec | None, pretrained: bool
    ) -> tuple[RunConfig, ModelSpec | None]:
        """The settings and model spec once :attr:`weights` are loaded (their ``sha256``, the
        spec given or read with them, and whether transformers built the model from a
        save_pretrained folder without one): a new run records them in its settings; a spec of
        None means checkpoints in the ``pretrained`` layout."""
        if spec is None and not pretrained:
            raise InputError(
                f"{self.weights} holds a whole model without a model spec, and finetune writes "
                "safetensors checkpoints that carry one: pass `model` (the factory that builds "
                "this architecture)"
            )
        if self.resume_from is not None:
            return self.config, spec
        model, layout = ("", "pretrained") if spec is None else (spec.to_json(), "safetensors")
        config = replace(self.config, checkpoint_sha256=sha256, model=model, layout=layout)
        return config, spec


def default_out() -> Path:
    """``runs/finetune-<date>-<time>``, at rank 0's clock on every rank (a collective)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return distributed.main_value(Path("runs") / f"finetune-{stamp}")


def new_run(checkpoint: Path | None, options: RunOptions, out: Path, force: bool = False) -> Plan:
    """A new run from ``checkpoint`` with ``options`` (each setting's fallback where not given:
    ``rho`` the optimizer's :data:`DEFAULT_RHO`, and :data:`DEFAULT_EPOCHS` without ``steps`` or
    ``epochs``), in the folder ``out``, which rank 0 prepares and marks as the run's: it must be
    new, empty, a run that never wrote a checkpoint, or with ``force`` a folder without any of the
    run's names (see :meth:`RunDir.prepare_new`); never the checkpoint's own folder."""
    if checkpoint is None or options.data is None:
        raise InputError(
            "give a `checkpoint` and `data` for a new run, or `resume` to continue one"
        )
    settings = {**fallbacks(type(options)), **options.given()}
    if options.steps is None and options.epochs is None:
        settings["epochs"] = DEFAULT_EPOCHS
    if options.rho is None:
        settings["rho"] = DEFAULT_RHO.get(settings["optimizer"], 0.0)
    full = type(options).full  # the stored settings these options give: RunConfig
    config = full(checkpoint=str(checkpoint), checkpoint_sha256="", model="", **settings)
    if checkpoint.is_dir() and out.resolve().is_relative_to(checkpoint.resolve()):
        raise InputError(
            f"`out` {out} is inside the `checkpoint` folder {checkpoint}, which the run would "
            "change: choose a folder outside it"
        )
    if config.fsdp:
        require_ranks("finetune")  # before the folder is made
    folder = RunDir(out)
    if distributed.is_main():
        folder.prepare_new(force)
    return Plan(folder, config, checkpoint, None)


def resume_run(
    resume: Path,
    options: RunOptions,
    *,
    out: Path | None = None,
    checkpoint: Path | None = None,
    model: ModelSpec | None = None,
    trust_code: bool = False,
) -> Plan:
    """Continue the run in the folder ``resume`` from its last checkpoint. The settings given
    (``options``, ``checkpoint`` by its hash, ``model``) must be the run's own, except those a
    resume may change (:data:`~sharpscope.training.run_config.CHANGEABLE`). Code that the run's
    settings name (a ``data``, ``val_data`` or ``loss`` function) is taken from its folder only
    when given again or with ``trust_code``; its stored model spec is judged when the weights
    load (:func:`~sharpscope.io.checkpoints.load_model`)."""
    if not resume.exists():
        raise InputError(f"`resume` {resume} does not exist")
    if out is not None and out.resolve() != resume.resolve():
        raise InputError(
            f"`out` {out} is not the run's folder {resume}: a resumed run stays in its folder"
        )
    given = options.given()
    if checkpoint is not None:
        if not checkpoint.exists():
            raise InputError(f"`checkpoint` {checkpoint} not found; check the path")
        given["checkpoint_sha256"] = checkpoint_sha256(checkpoint)
    if model is not None:
        given["model"] = model.to_json()
    folder = RunDir(resume)
    if distributed.is_main():
        folder.check_resumable("`resume`")
    config = resumed(folder.read_config(), given, str(resume / CONFIG))
    if not trust_code:
        _refuse_stored_code(config, given, resume / CONFIG)
    found = folder.latest()
    if found is None:
        raise InputError(
            f"`resume` {resume}: the run wrote no checkpoint yet; start it again without `resume`"
        )
    if config.fsdp:
        require_ranks("finetune")  # a sharded run resumes on several ranks
    return Plan(folder, config, model_path(found[1], config.layout), found[1])


def _refuse_stored_code(config: RunConfig, given: Mapping[str, Any], where: Path) -> None:
    """Refuse a run whose settings name code (``pkg.module:function``, ``file.py:function``) in
    a setting declared as code (the model spec is checked as it loads) that the caller did not
    give again: a file in the run folder chose it."""
    named = [
        f"`{name}` {value}"
        for name in (d.name for d in declared(type(config)) if d.option.code)
        if name not in given and isinstance(value := getattr(config, name), str)
        if is_object_spec(value)
    ]
    if named:
        raise InputError(
            f"{where} names code to run ({', '.join(named)}); code from a file runs only when "
            "you give it again on the command line or pass `trust_code` (only for a run folder "
            "you trust)"
        )


def validation_data(
    config: RunConfig, train: DataBundle, text: TextSpec | None = None
) -> DataBundle | None:
    """The data a run validates on: ``val_data`` (its held-out split, else all of it), else the
    held-out split of the training data ``train``, else None; text tokenized as ``text``."""
    if config.val_data is not None:
        splits = open_source(config.val_data, text).splits
        split = next((s for s in HELD_OUT if s in splits), "train")
        return load_data(config.val_data, split=split, text=text)
    split = held_out_split(train)
    return None if split is None else load_data(config.data, split=split, text=text)
