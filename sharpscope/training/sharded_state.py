"""A ``finetune --fsdp`` checkpoint's sharded part: the model's and the optimizer's state as each
rank holds it under FSDP2, written by every rank with ``torch.distributed.checkpoint`` (DCP) and
read back on any number of ranks (DCP reshards), and the whole model gathered to rank 0.

DCP's own reader runs code from a stranger's folder: it unpickles ``.metadata`` and loads
non-tensor items with ``torch.load(weights_only=False)``. Here the metadata unpickler admits only
DCP's metadata classes, ``torch.Size``, dtypes and builtin containers; the items are read with
``weights_only=True``; every file the metadata names must lie in the folder.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from sharpscope import distributed
from sharpscope.errors import InputError
from sharpscope.io.streamed_safetensors import Entry, save_streamed
from sharpscope.optim.checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
from sharpscope.optim.pieces import local
from sharpscope.training.options import OptimizerSettings

SHARDED = "sharded"
"""The folder of a checkpoint that holds the sharded state."""
_METADATA = ".metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a layout by its name
    "builtins": frozenset({"dict", "list", "tuple", "set", "frozenset"}),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
}
"""The globals a DCP ``.metadata`` may name (module -> names), besides torch's dtypes; any other
is refused."""


def save_sharded(
    folder: Path, model: nn.Module, optimizer: Optimizer, more: dict[str, Any] | None = None
) -> None:
    """Write this rank's shards of ``model`` and of ``optimizer``'s state (a SAM wrapper's own
    too: :mod:`sharpscope.optim.checkpoint`), and of ``more`` (nested dicts of DTensors placed
    like the parameters, e.g. the tracker's vectors), into ``folder`` (every rank calls it, with
    the same folder). A base optimizer with no state yet (before the first step, or SGD without
    momentum) is left out rather than initialised: DCP would run a step of zero gradients to make
    one, which changes SGD's momentum under weight decay."""
    state: dict[str, Any] = {**(more or {}), "model": get_model_state_dict(model)}
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    if optimizer_state:
        state["optimizer"] = optimizer_state
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))


def load_sharded(
    folder: Path, model: nn.Module, optimizer: Optimizer, more: dict[str, Any] | None = None
) -> None:
    """Load what :func:`save_sharded` wrote (on any number of ranks) into the sharded ``model``
    and ``optimizer``, and into ``more`` (templates shaped as what was saved there, filled in
    place); raises :class:`InputError` for a folder that is not such a checkpoint."""
    reader = SafeReader(folder)
    stored = list(reader.read_metadata().state_dict_metadata)
    state: dict[str, Any] = {**(more or {}), "model": get_model_state_dict(model)}
    if any(key.startswith("optimizer.") for key in stored):  # a template that DCP fills
        with_base = any(key.startswith("optimizer.state.") for key in stored)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, with_base=with_base)
    try:
        dcp.load(state, storage_reader=reader, planner=SafePlanner())
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as exc:
        raise InputError(f"cannot read the sharded checkpoint {folder}: {exc}") from None
    set_model_state_dict(model, state["model"])
    if "optimizer" in state:  # else it stays without state, as before its first step
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def stream_full_state(path: Path | None, model: nn.Module, metadata: Mapping[str, str]) -> None:
    """Write the whole state of the sharded ``model`` as safetensors to ``path`` (on rank 0; None
    on the others), gathering one tensor at a time: every rank calls it. The bytes are those
    :func:`full_state` and :func:`~sharpscope.io.checkpoints.save_checkpoint` write."""
    state = model.state_dict()
    entries = [Entry.of(name, value) for name, value in state.items()]
    save_streamed(path, entries, lambda entry: _whole(state[entry.name]), metadata)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor (gathered on every rank); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of the sharded ``model`` on rank 0's CPU (every rank calls it; the
    other ranks get an empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


@dataclass(frozen=True)
class RankShare:
    """What one rank holds of a sharded run, before it trains: ``ranks``, bytes of rank 0's shards
    of the trained parameters, and of the optimizer's (SGD's momentum buffer, when on; a SAM-style
    optimizer's copy of the weights during a step; Eigen-SAM's eigenvector), and how many vectors
    of that size the tracker holds at most (its Lanczos basis, its copy of the weights)."""

    ranks: int
    parameter_bytes: int
    optimizer_bytes: int
    tracker_vectors: int

    @classmethod
    def of(cls, model: nn.Module, settings: OptimizerSettings, tracker_vectors: int) -> RankShare:
        """The share of the sharded ``model`` trained with ``settings`` (one rank's figures),
        tracked with ``tracker_vectors`` vectors of its trained parameters' size."""
        trained = [local(p) for p in model.parameters() if p.requires_grad]
        size = sum(t.numel() * t.element_size() for t in trained)
        sam_style = settings.optimizer != "sgd"
        slots = bool(settings.momentum) + sam_style + (settings.optimizer == "eigen-sam")
        return cls(distributed.world_size(), size, slots * size, tracker_vectors)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` naming only the globals in :data:`_ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and name not in _ALLOWED.get(module, frozenset()):
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a DCP checkpoint's metadata does not hold"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata unpickled by :class:`_MetadataUnpickler` and the data
    files it names checked to lie in the folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self.folder = folder

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        """The checkpoint's metadata, or :class:`InputError`."""
        file = self.folder / _METADATA
        try:
            with file.open("rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if not isinstance(metadata, dcp_metadata.Metadata):
                raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}")
            for info in (metadata.storage_data or {}).values():
                name = getattr(info, "relative_path", None)
                if not isinstance(name, str) or Path(name).name != name or name in ("", "..", "."):
                    raise pickle.UnpicklingError(f"it names the file {name!r} outside the folder")
        except FileNotFoundError:
            raise InputError(f"{file} is missing: the sharded checkpoint is incomplete") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise InputError(
                f"refusing the sharded checkpoint {self.folder}: its {_METADATA} is not DCP "
                f"metadata ({exc})"
            ) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Place the item read from ``value``, refusing anything but plain data."""
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
