"""From command-line specs to a model on its device, batches of data and a loss."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope import distributed
from sharpscope.analysis.fsdp import is_sharded, reshard, shard_model
from sharpscope.batches import LossFn, move_to
from sharpscope.choices import DTYPE_NAMES
from sharpscope.errors import InputError, check_choice
from sharpscope.io.checkpoints import Checkpoint, Placement, load_model
from sharpscope.io.data import DataBundle, batches, check_targets, load_data
from sharpscope.io.load_spec import LoadSpec
from sharpscope.io.losses import BuiltinLoss, loss_name, resolve_loss
from sharpscope.io.models import ModelSpec, parse_model_args
from sharpscope.io.pretrained import tokenizer_files
from sharpscope.io.state_dicts import stored_dtype
from sharpscope.io.tokenizer import TextSpec
from sharpscope.io.user_code import one_line
from sharpscope.report.document import CheckpointInput, DataInput, Inputs, ModelInput
from sharpscope.structures import call_model, leaves, styled
from sharpscope.structures import input_style as resolve_style


@dataclass
class Loaded:
    """A model ready for analysis, its data as batches, the loss, and how they were specified."""

    model: nn.Module
    checkpoint: Checkpoint
    data: DataBundle
    batches: list[tuple[Any, Any]]
    loss_fn: Any
    device: torch.device
    dtype: torch.dtype
    description: Inputs
    """The report's ``inputs`` section: checkpoint, model, data, loss, dtype, device."""
    spec: ModelSpec | None
    """The model's spec: --model's, else the one the checkpoint stores (None if neither)."""
    text: TextSpec
    """How text data was tokenized (and other data of the run is to be)."""


def _probe(
    model: nn.Module,
    data: DataBundle,
    first: tuple[Any, Any],
    loss_fn: LossFn,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Run the model and the loss on one batch so that a data/model mismatch fails here, with a
    clear message; the only run of a batch at loading (commands tell their operators it ran:
    ``checked``)."""
    inputs, targets = first
    if isinstance(inputs, torch.Tensor):
        shape = f"inputs shaped {tuple(inputs.shape)}"
    else:
        shape = "input fields " + ", ".join(f"{k} {tuple(t.shape)}" for k, t in leaves(inputs))
    _check_positions(model, inputs, data.source)
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                outputs = call_model(model, move_to(inputs, device, dtype))
            finally:
                model.train(was_training)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        hint = " (or pass --input-style single)" if isinstance(inputs, Mapping) else ""
        raise InputError(
            f"the model cannot run on {shape} from --data {data.source}: "
            f"{one_line(exc)}; check that --data matches the model{hint}"
        ) from None
    if isinstance(loss_fn, BuiltinLoss) and loss_fn.per_sample:
        check_targets(data, outputs)
    with torch.no_grad():  # a user's loss is checked to return a scalar (io/losses.py)
        loss_fn(outputs, move_to(targets, device, dtype))


def _check_positions(model: nn.Module, inputs: Any, source: str) -> None:
    """Refuse token sequences longer than a Hugging Face model's position embeddings."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    if isinstance(inputs, tuple) and len(inputs) == 1:  # one mapping argument (`input_style`)
        inputs = inputs[0]
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if isinstance(limit, int) and limit > 0 and ids is not None and ids.shape[-1] > limit:
        raise InputError(
            f"--data {source} has sequences of {ids.shape[-1]} tokens but the model has "
            f"{limit} positions; truncate the sequences to at most {limit} tokens"
        )


def load_inputs(
    spec: LoadSpec, *, tokenizer: Path | None = None, shard: bool = False, fsdp: bool = False
) -> Loaded:
    """Load and check everything a command needs (:class:`LoadSpec`); every problem is an
    :class:`InputError`.

    ``samples`` of 0 means all of the split (``--samples 0``). Text data is tokenized with the
    tokenizer of the save_pretrained folder ``tokenizer`` (default: the checkpoint), if it is a
    folder. ``reduction`` is how the loss reduces a batch (a built-in loss reduces so);
    ``input_style`` how a mapping of input fields reaches the model
    (:func:`sharpscope.structures.input_style`: chosen from the model's ``forward`` for auto).

    With ``shard``, under torch.distributed, every rank loads and checks the same model and data,
    then keeps its contiguous block of the batches (:func:`sharpscope.distributed.shard`); a
    failure or a disagreement on any rank raises on all of them. With ``fsdp`` the model's
    parameters are sharded as they load, each rank reading its rows of them only (a checkpoint of
    tensors in files: :class:`~sharpscope.io.checkpoints.Placement`; others load whole, to be
    sharded by the command).
    """
    checkpoint, data, seed, batch_size, dtype = (
        spec.checkpoint,
        str(spec.data),
        spec.seed,
        spec.batch_size,
        spec.dtype,
    )
    if checkpoint is None:
        raise InputError("pass a `checkpoint`")
    samples = spec.samples or None
    with distributed.together("loading the model and data"):
        torch_device, torch_dtype = resolve_device(spec.device), resolve_dtype(dtype)
        given = (
            ModelSpec(spec.model, parse_model_args(spec.model_args or [])) if spec.model else None
        )
        if given is None and spec.model_args:
            raise InputError("--model-arg needs --model (the factory the arguments are for)")
        net, ckpt = load_model(
            checkpoint,
            given,
            trust_pickle=spec.trust_pickle,
            state_prefix=spec.state_prefix,
            trust_code=spec.trust_code,
            base=spec.base,
            placement=Placement(shard_model, torch_device, torch_dtype) if fsdp else None,
        )
        stored = stored_dtype(net.state_dict() if ckpt.state_dict is None else ckpt.state_dict)
        if not is_sharded(net):  # else placed as it loaded
            net = net.to(device=torch_device, dtype=torch_dtype)
        folder = tokenizer or _tokenizer_folder(checkpoint, ckpt)
        text = TextSpec(
            folder if folder.is_dir() else None, spec.text_field, spec.label_field, spec.max_length
        )
        bundle = load_data(data, split=spec.split, samples=samples, seed=seed, text=text)
        pieces = batches(bundle, batch_size)
        pieces = styled(pieces, resolve_style(net, pieces[0][0], spec.input_style))
        loss = loss_name(spec.loss, net)
        loss_fn = resolve_loss(loss, bundle.num_classes, spec.reduction)
        _probe(net, bundle, pieces[0], loss_fn, torch_device, torch_dtype)
        if is_sharded(net):
            reshard(net)
        used_spec = given or ckpt.model_spec
        fingerprint = data_fingerprint(bundle)
        description = Inputs(
            checkpoint=CheckpointInput(str(checkpoint), ckpt.sha256, ckpt.format, ckpt.adapter),
            model=ModelInput(None if used_spec is None else json.loads(used_spec.to_json())),
            data=DataInput(
                spec=data,
                source=bundle.source,
                split=bundle.split,
                num_samples=len(bundle.targets),
                batch_size=batch_size,
                seed=seed,
                fingerprint=fingerprint,
                split_size=bundle.split_size,
            ),
            loss=loss,
            dtype=dtype,
            weights_dtype=stored,
            device=str(torch_device),
        )
        loaded = Loaded(
            net,
            ckpt,
            bundle,
            pieces,
            loss_fn,
            torch_device,
            torch_dtype,
            description,
            used_spec,
            text,
        )
    if shard and distributed.is_distributed():
        check_world(loaded)
        loaded.batches = [pieces[i] for i in distributed.shard(len(pieces))]
    return loaded


def _tokenizer_folder(checkpoint: Path, ckpt: Checkpoint) -> Path:
    """The folder whose tokenizer tokenizes text data: the checkpoint's, or an adapter's base
    when the adapter folder holds no tokenizer."""
    if ckpt.adapter is None or tokenizer_files(checkpoint):
        return checkpoint
    return Path(ckpt.adapter["base"])


def data_fingerprint(bundle: DataBundle) -> str:
    """A short hash of the loaded inputs and targets (names, shapes, dtypes and values): the same
    data on every rank, and the same data as a baseline's."""
    return distributed.fingerprint([*leaves(bundle.inputs), ("targets", bundle.targets)])


def check_world(loaded: Loaded) -> None:
    """Raise on every rank unless all ranks loaded the same weights and the same data (for a
    command that shares the work out itself rather than by ``load_inputs``'s ``shard``); of a
    model sharded as it loaded, the same checkpoint bytes and spec (each rank holds its shards)."""
    model = loaded.model
    held = (
        f"{loaded.checkpoint.sha256} {loaded.spec}"
        if is_sharded(model)
        else distributed.model_fingerprint(model)
    )
    distributed.check_same("model (checkpoint and --model)", held)
    distributed.check_same(
        "data (--data, --split, --samples, --seed)", loaded.description.data.fingerprint
    )


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown --device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InputError(f"--device {spec}: only {count} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise InputError(f"unsupported --device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """``float32``, ``float64`` or ``bfloat16``."""
    check_choice("dtype", name, DTYPE_NAMES)
    return getattr(torch, name)
