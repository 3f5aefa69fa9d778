"""A whole fine-tuning run in its folder: start or resume, train, record, checkpoint.

No printing: progress goes to the caller's callbacks, and the outcome comes back as data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharpscope import distributed
from sharpscope.analysis.fsdp import require_ranks, shard_model
from sharpscope.analysis.plan import BackendChoice, auto_backend, available_memory
from sharpscope.batches import LossFn, move_to
from sharpscope.curvature import HessianOperator, Objective
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import checkpoint_metadata, save_checkpoint
from sharpscope.io.data import DataBundle, batches, subset_indices
from sharpscope.io.models import ModelSpec
from sharpscope.structures import take
from sharpscope.training.divergence import DivergenceRule
from sharpscope.training.metrics import MetricsLog
from sharpscope.training.optimizers import build_optimizer, build_scheduler
from sharpscope.training.order import DataOrder
from sharpscope.training.run_config import RunConfig
from sharpscope.training.run_dir import MODEL, STEP_KEY, TRAINER, RunDir, step_dir_name
from sharpscope.training.selection import select_trained
from sharpscope.training.sharded_state import (
    SHARDED,
    RankShare,
    full_state,
    load_sharded,
    save_sharded,
    stream_full_state,
)
from sharpscope.training.state import load_trainer_state, seed_everything
from sharpscope.training.tracking import SharpnessTracker, Tracker
from sharpscope.training.trainer import FIELDS, Diverged, Hooks, Session, all_finite, run

Status = Literal["finished", "stopped", "diverged"]
TRACKER_KEY = "tracker"
"""The trainer state's entry for the tracker's warm-start vectors."""


@dataclass
class Inputs:
    """What a run trains: the model (on its device and dtype) and its spec, the loss, and the
    training and validation data (in memory, on the CPU)."""

    model: nn.Module
    spec: ModelSpec | None
    """None: a transformers model, checkpointed as save_pretrained folders."""
    loss_fn: LossFn
    train: DataBundle
    val: DataBundle | None
    device: torch.device
    dtype: torch.dtype
    tokenizer_from: Path | None = None
    """Without a spec: the folder whose tokenizer files the first checkpoint folder copies (each
    later one copies the checkpoint before it)."""


@dataclass
class Watch:
    """The caller's view of a run: ``started(step, total)`` once, ``progress(step, loss)`` after
    every step, ``record(row)`` for every row, ``should_stop()`` before every step, and
    ``chose(choice)`` when ``backend`` auto chooses (a new run, before training), and under
    ``fsdp`` ``sharded(share)`` once the model is sharded."""

    started: Callable[[int, int], None] = lambda step, total: None
    progress: Callable[[int, float], None] = lambda step, loss: None
    record: Callable[[dict[str, Any]], None] = lambda row: None
    should_stop: Callable[[], bool] = lambda: False
    chose: Callable[[BackendChoice], None] = lambda choice: None
    sharded: Callable[[RankShare], None] = lambda share: None


@dataclass
class Outcome:
    """How a run ended: its status, the step reached, its last checkpoint and every row."""

    status: Status
    step: int
    total_steps: int
    checkpoint: Path
    rows: list[dict[str, Any]]
    problem: str | None = None
    """What diverged, for status ``diverged``."""


def finetune(
    folder: RunDir, config: RunConfig, inputs: Inputs, resume_from: Path | None, watch: Watch
) -> Outcome:
    """Train ``inputs.model`` (only the parameters ``config.params`` and ``config.freeze``
    choose) as ``config`` says, in ``folder``; ``resume_from`` is the checkpoint
    folder whose weights the model holds (None: a new run from step 0).

    Under torch.distributed every rank calls this with the same inputs: the model trains in
    DistributedDataParallel on equal shares of each batch, rank 0 alone writes the folder, and
    the ranks agree on when to stop. With ``fsdp`` the model is sharded by FSDP2 instead, and
    every rank writes its shards of each checkpoint (:class:`Saver`)."""
    select_trained(inputs.model, config.params, config.freeze)
    if config.fsdp:
        require_ranks("finetune")
        shard_model(inputs.model)
    order = DataOrder(len(inputs.train), config.batch_size, config.seed)
    check_shares(order.batch_size, min(config.probe_size, len(inputs.train)))
    total = config.total_steps(order.steps_per_epoch)
    if config.backend == "auto" and config.auto_backend is None:
        choice = auto_choice(config, inputs, order.batch_size)
        config = replace(config, auto_backend=choice.backend)
        watch.chose(choice)
    optimizer, hook = build_optimizer(inputs.model, inputs.loss_fn, config, config.products_backend)
    if config.fsdp:
        watch.sharded(RankShare.of(inputs.model, config, tracker_vectors(config)))
    ddp = distributed.is_distributed() and not config.fsdp
    session = Session(
        inputs.model,
        inputs.loss_fn,
        inputs.train,
        optimizer,
        build_scheduler(optimizer, config.schedule, total),
        order,
        inputs.device,
        inputs.dtype,
        wrapped=DistributedDataParallel(inputs.model) if ddp else None,
        per_rank_sam=config.per_rank_sam,
        hook=hook,
        precision=config.precision,
        sharded=config.fsdp,
    )
    main = distributed.is_main()
    track = tracker(config, inputs)
    with distributed.together("starting the run"):
        if resume_from is not None:
            state = load_trainer_state(resume_from / TRAINER)
            session.load_state_dict(state)
            tracked = state.get(TRACKER_KEY) or {}
            if config.fsdp:  # the tracker's vectors marked as in the shards are loaded there
                vectors = {
                    k: track.sharpness.vector_template()
                    for k, v in tracked.items()
                    if isinstance(v, str)
                }
                more = {TRACKER_KEY: vectors} if vectors else None
                load_sharded(resume_from / SHARDED, inputs.model, optimizer, more)
                tracked = {**tracked, **vectors}
            track.sharpness.load_state_dict(tracked)
            if total < session.step:
                raise InputError(
                    f"the run is at step {session.step}, beyond the {total} steps asked; give "
                    "`steps` or `epochs` for at least as many steps"
                )
            if main:
                folder.discard_after(session.step)
        elif not all_finite(inputs.model):
            raise InputError("the starting checkpoint holds NaN or infinite weights")
        else:
            seed_everything(config.seed)
    if main:
        folder.write_config(config)
    saver = Saver(folder, session, inputs, config.keep, resume_from, track.sharpness)
    resume_step = None if resume_from is None else session.step
    logs = MetricsLog(folder.path, FIELDS, resume_step) if main else contextlib.nullcontext()
    with logs as log:
        first = log.rows[0]["probe_loss"] if log is not None and log.rows else None
        rule = DivergenceRule(distributed.main_value(first))

        def record(row: dict[str, Any]) -> None:
            if log is not None:
                log.append(row)
            watch.record(row)
            rule.check(row)  # every rank: the row's figures are all ranks' together

        hooks = Hooks(
            record=record,
            save=saver,
            progress=lambda loss: watch.progress(session.step, loss),
            step_started=track.sharpness.step_started,
            should_stop=lambda: distributed.any_rank(watch.should_stop()),
        )
        watch.started(session.step, total)
        status: Status = "finished"
        problem = None
        try:
            if resume_from is None:
                saver()
            if distributed.main_value(log is not None and not log.rows):
                record({**session.take_row(), **track(inputs.model)})
            if not run(session, total, track, config.track_every, config.save_every, hooks):
                status = "stopped"
        except Diverged as exc:
            status, problem = "diverged", str(exc)
    assert saver.path is not None
    rows = log.rows if log is not None else []
    return Outcome(status, session.step, total, saver.path, rows, problem)


def check_shares(batch_size: int, probe_size: int) -> None:
    """Under torch.distributed, refuse a batch that the ranks cannot share equally (the ranks'
    gradients are averaged with equal weights) and a probe batch smaller than the world."""
    size = distributed.world_size()
    if batch_size % size:
        raise distributed.RankError(
            f"`batch_size` {batch_size} is not a multiple of the {size} processes: each rank "
            f"takes an equal share of every batch; use a multiple of {size}"
        )
    if probe_size < size:
        raise distributed.RankError(
            f"the probe batch of {probe_size} sample(s) cannot be shared by {size} processes; "
            "use a larger `probe_size`"
        )


class Saver:
    """Writes the session's checkpoint into the run folder, once per step, and only with finite
    weights; ``path`` is the last checkpoint folder. Under torch.distributed every rank calls it
    and rank 0 writes (with every rank's RNG states and the tracker's warm start); the others
    wait until it has. Under ``fsdp`` every rank writes its shards too, the tracker's warm-start
    vectors among them."""

    def __init__(
        self,
        folder: RunDir,
        session: Session,
        inputs: Inputs,
        keep: int,
        path: Path | None,
        sharpness: SharpnessTracker,
    ) -> None:
        self.folder = folder
        self.session = session
        self.sharpness = sharpness
        self.inputs = inputs
        self.keep = keep
        self.path = path
        self.step = session.step if path is not None else -1

    def __call__(self) -> None:
        """Checkpoint the current step (nothing when it is already saved)."""
        step = self.session.step
        if step == self.step:
            return
        if not all_finite(self.session.model):
            raise Diverged(step, "the weights became non-finite")
        tracked = self.sharpness.state_dict()
        # a sharded model's tracker vectors go into the shards, marked so in trainer.pt
        vectors = {k: v for k, v in tracked.items() if isinstance(v, dict)}
        tracked = {**tracked, **dict.fromkeys(vectors, SHARDED)}
        state = {**self.session.state_dict(), TRACKER_KEY: tracked}
        main = distributed.is_main()
        with distributed.together(f"writing the checkpoint of step {step}"):
            if self.session.sharded:
                staged = distributed.main_value(self.folder.staging(step) if main else None)
                more = {TRACKER_KEY: vectors} if vectors else None
                save_sharded(staged / SHARDED, self.session.model, self.session.optimizer, more)
                weights = self._stream_model(staged if main else None)
                if main:
                    self.folder.save(
                        step, lambda f: self._write_sharded(f, staged, weights), state, self.keep
                    )
            elif main:
                self.folder.save(step, self._write_model, state, self.keep)
        self.path = self.folder.path / step_dir_name(step)
        self.step = step

    def _stream_model(self, staged: Path | None) -> dict[str, torch.Tensor] | None:
        """Every rank's part in writing a sharded model's whole weights: with a spec, streamed
        into ``staged`` (rank 0's; None on the others) one gathered tensor at a time (None
        returned); a save_pretrained folder's, gathered whole to rank 0 (returned), as
        transformers' ``save_pretrained`` chooses the names (tied weights, conversions) it
        writes."""
        model = self.session.model
        if self.inputs.spec is None:
            return full_state(model)
        metadata = checkpoint_metadata(self.inputs.spec, {STEP_KEY: str(self.session.step)})
        stream_full_state(None if staged is None else staged / MODEL, model, metadata)
        return None

    def _write_sharded(
        self, folder: Path, staged: Path, weights: dict[str, torch.Tensor] | None
    ) -> None:
        """A sharded checkpoint's files: the whole ``weights`` as :meth:`_write_model` writes
        them (None: the model file streamed into ``staged``), and the shards the ranks wrote in
        ``staged`` (all moved in; ``staged`` removed)."""
        if weights is None:
            os.rename(staged / MODEL, folder / MODEL)
        else:
            self._write_model(folder, weights)
        os.rename(staged / SHARDED, folder / SHARDED)
        shutil.rmtree(staged)

    def _write_model(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The model's files in a checkpoint folder (``weights`` when given, else the model's own
        state): model.safetensors with the spec, or a save_pretrained folder (config.json,
        model.safetensors, the tokenizer files, copied from the last checkpoint: the one a
        resumed run started from is removed once `keep` newer ones exist)."""
        inputs = self.inputs
        if inputs.spec is None:
            from sharpscope.io.transformers_models import save_pretrained_folder  # optional

            tokenizer = inputs.tokenizer_from if self.path is None else self.path
            save_pretrained_folder(folder, inputs.model, tokenizer, weights)
        else:
            metadata = {STEP_KEY: str(self.session.step)}
            save_checkpoint(folder / MODEL, inputs.model, inputs.spec, metadata, weights)


def tracker(config: RunConfig, inputs: Inputs) -> Tracker:
    """The tracker of a run: its probe batch is a fixed ``probe_size`` subset of the training
    data, chosen by the seed; validation on all of ``inputs.val``. Under torch.distributed each
    rank keeps its contiguous share of both, in batches of its share of ``batch_size``."""
    val = inputs.val
    held_out = _placed(config, inputs, val, torch.arange(len(val))) if val is not None else None
    sharpness = SharpnessTracker(
        Objective(inputs.model, inputs.loss_fn, _probe(config, inputs)),
        seed=config.seed,
        products=None,
        max_iter=config.track_iters,
        curvature=config.curvature,
        backend=config.products_backend,
        measure=config.track_measure,
    )
    return Tracker(sharpness, held_out)


def tracker_vectors(config: RunConfig) -> int:
    """The most parameter-sized vectors the run's tracker holds during a measurement: its
    Lanczos basis (``track_iters``) for λ_max, and a copy of the weights for the critical
    sharpness along the last update."""
    return config.track_iters * (config.track_measure != "critical") + (
        config.track_measure != "lambda_max"
    )


def auto_choice(config: RunConfig, inputs: Inputs, batch_size: int) -> BackendChoice:
    """``backend`` auto's choice for the run (:func:`~sharpscope.analysis.plan.auto_backend`),
    from the largest double-backward graph it builds: the tracker's, over the probe set, or with
    Eigen-SAM the refresh's, over one training batch of ``batch_size`` samples; under ``fsdp``
    finite differences, the only products of sharded gradients."""
    if config.fsdp:
        sharded = "`fsdp` shards the gradients, whose products are finite differences only"
        return BackendChoice("finite-difference", None, None, sharded)
    graphs = [_probe(config, inputs)]
    if config.optimizer == "eigen-sam":
        graphs.append(_placed(config, inputs, inputs.train, torch.arange(batch_size)))
    ops = [
        HessianOperator(Objective(inputs.model, inputs.loss_fn, batches), validate=False)
        for batches in graphs
    ]
    return auto_backend(ops, available_memory(inputs.device))


def _probe(config: RunConfig, inputs: Inputs) -> list[tuple[Any, Any]]:
    """The tracker's probe batches: a fixed ``probe_size`` subset of the training data, chosen
    by the seed."""
    train = inputs.train
    return _placed(
        config, inputs, train, subset_indices(len(train), config.probe_size, config.seed)
    )


def _placed(
    config: RunConfig, inputs: Inputs, bundle: DataBundle, index: torch.Tensor
) -> list[tuple[Any, Any]]:
    """The samples ``index`` of ``bundle``, this rank's contiguous share of them, in batches of
    its share of ``batch_size``, on the run's device and dtype."""
    mine = distributed.shard(len(index))
    picked = index[mine.start : mine.stop]
    part = replace(bundle, inputs=take(bundle.inputs, picked), targets=bundle.targets[picked])
    return [
        (move_to(x, inputs.device, inputs.dtype), move_to(y, inputs.device, inputs.dtype))
        for x, y in batches(part, config.batch_size // distributed.world_size())
    ]
