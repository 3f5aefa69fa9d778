"""Weights read a block of rows at a time, for a model whose parameters are sharded as it loads
(``fsdp``): a file's tensors as meta placeholders (shape and dtype, no data) or memory-mapped, a
model built with its parameters on the meta device and its buffers real, and each rank's shards
filled with the rows it holds, read from the file alone.

A sharded parameter is a DTensor placed ``Shard(0)`` on a 1-D mesh (FSDP2's ``fully_shard``):
rank r holds rows ``[r·c, (r+1)·c)`` of its n, with c = ⌈n / ranks⌉ (``torch.chunk``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from sharpscope.io.load_errors import corrupt

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtypes read a block of rows at a time (others are read whole)."""

Read = Callable[[slice | None], torch.Tensor]
"""Reads a stored tensor: the block of rows ``slice``, or all of it for None."""


class Rows:
    """Where the tensors of a lazily read state dict come from: a meta placeholder is read
    through the reader it was made with, any other tensor (memory-mapped) sliced."""

    def __init__(self) -> None:
        self._readers: dict[int, tuple[torch.Tensor, Read]] = {}

    def placeholder(self, shape: tuple[int, ...], dtype: torch.dtype, read: Read) -> torch.Tensor:
        """A meta tensor standing for a stored one, read later by ``read``."""
        tensor = torch.empty(shape, dtype=dtype, device="meta")
        self._readers[id(tensor)] = (tensor, read)  # held: the id stays this tensor's
        return tensor

    def read(self, stored: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """The block of ``rows`` of ``stored`` (all of it for None), as the file holds it."""
        if stored.is_meta:
            return self._readers[id(stored)][1](rows)
        return stored if rows is None else stored[rows]


def safetensors_placeholders(
    path: Path, rows: Rows
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and its tensors as placeholders of ``rows``, whose rows are
    read from the file with plain reads at the offsets its header gives (not mapped: the pages
    read are not held by the process); a dtype not in :data:`SAFETENSORS_DTYPES` is read whole
    now. ``safe_open`` checks the header first."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        pieces = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118
        odd = {
            k: handle.get_tensor(k)
            for k, p in pieces.items()
            if p.get_dtype() not in SAFETENSORS_DTYPES
        }
    data, offsets = _offsets(path)
    tensors = {}
    for key, piece in pieces.items():
        if key in odd:
            tensors[key] = odd[key]
            continue
        shape, dtype = tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()]
        read = _reader(path, data + offsets[key], shape, dtype)
        tensors[key] = rows.placeholder(shape, dtype, read)
    return metadata, tensors


def _offsets(path: Path) -> tuple[int, dict[str, int]]:
    """Where a safetensors file's data starts, and each tensor's first byte from there."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return 8 + size, {
        key: int(entry["data_offsets"][0]) for key, entry in header.items() if key != "__metadata__"
    }


def _reader(path: Path, start: int, shape: tuple[int, ...], dtype: torch.dtype) -> Read:
    """Reads the rows of the tensor stored from byte ``start`` of ``path`` (row-major)."""
    row = dtype.itemsize * math.prod(shape[1:])

    def read(block: slice | None) -> torch.Tensor:
        first, stop = (0, shape[0] if shape else 1) if block is None else (block.start, block.stop)
        out = torch.empty((stop - first) * row, dtype=torch.uint8)
        with path.open("rb") as f:
            f.seek(start + first * row)
            got = f.readinto(memoryview(out.numpy()))
        if got != out.numel():
            raise corrupt(path, EOFError(f"{got} of {out.numel()} bytes of a tensor"))
        return out.view(dtype).reshape(shape if block is None else (stop - first, *shape[1:]))

    return read


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (each made, then moved: one
    at a time in memory) and keep their buffers real, so that a rotary ``inv_freq`` computed at
    construction keeps its values (accelerate's ``init_empty_weights(include_buffers=False)``)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        held = module._parameters.get(name)
        if type(held) is nn.Parameter and not held.is_meta:
            module._parameters[name] = nn.Parameter(held.to("meta"), held.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialise(model: nn.Module, device: torch.device) -> None:
    """Give the model's meta parameters (this rank's shards of sharded ones) uninitialised
    memory on ``device``, a tied one shared still; its buffers keep their values, moved there."""
    params = [
        (m, name, p) for m in model.modules() for name, p in m._parameters.items() if p is not None
    ]
    buffers = [
        (m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None
    ]
    model.to_empty(device=device)  # a parameter moved off the meta device is a new one
    made: dict[int, nn.Parameter] = {}
    for module, name, param in params:
        module._parameters[name] = made.setdefault(id(param), module._parameters[name])
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.to(device)


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """The part of ``tensor`` this rank holds and the block of rows of the whole it is (None: the
    whole tensor, not sharded)."""
    if not isinstance(tensor, DTensor):
        return tensor, None
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"a sharded parameter placed {tensor.placements}, not [Shard(0)]")
    local = tensor.to_local()
    mesh = tensor.device_mesh
    size = -(-tensor.shape[0] // mesh.size())  # torch.chunk's
    start = min(mesh.get_local_rank() * size, tensor.shape[0])
    return local, slice(start, start + local.shape[0])


def fill(model: nn.Module, state: Mapping[str, torch.Tensor], rows: Rows) -> None:
    """Copy the weights ``state`` names (checked to fit the model) into its parameters, only this
    rank's rows of a sharded one, and into its buffers that ``state`` holds (a non-persistent
    buffer keeps its value)."""
    named = [*model.named_parameters(), *model.named_buffers()]  # a tied tensor once
    with torch.no_grad():
        for name, tensor in named:
            if name in state:
                local, block = local_rows(tensor)
                local.copy_(rows.read(state[name], block))
