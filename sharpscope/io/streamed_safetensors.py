"""A safetensors file written one tensor at a time: the header from the names, dtypes and shapes
alone, then each tensor's bytes as it comes, so that the writer never holds two at once.

The bytes are those ``safetensors.torch.save_file`` writes for the same tensors: an 8-byte
little-endian header length, the JSON header (``__metadata__`` first, then the tensors in the
file's order, padded with spaces to a multiple of 8), then the raw little-endian data in that
order. The file's order is safetensors' own: by dtype, widest first (:data:`DTYPES` lists them
narrowest first), then by name. safetensors writes the metadata's keys in a random order per
process; here they are sorted.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from sharpscope.errors import InputError
from sharpscope.io.atomic import write_atomic

DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
"""The dtypes safetensors stores, with their names, in the order of its ``Dtype`` enum (which
orders the file, widest first)."""
_RANK = {name: rank for rank, name in enumerate(DTYPES.values())}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file, described without its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> Entry:
        """The entry of ``tensor`` (its global shape, for a DTensor); an :class:`InputError`
        for a tensor safetensors cannot store."""
        if tensor.layout != torch.strided or tensor.dtype not in DTYPES:
            kind = tensor.dtype if tensor.layout == torch.strided else tensor.layout
            raise InputError(
                f"cannot save the model's {name!r}: it is a {kind}, and safetensors stores "
                "dense tensors of its dtypes only"
            )
        return cls(name, tensor.dtype, tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        """The size of the tensor's data in the file."""
        return prod(self.shape) * self.dtype.itemsize


def file_order(entries: Sequence[Entry]) -> list[Entry]:
    """``entries`` in the order safetensors stores them: widest dtype first, then by name."""
    return sorted(entries, key=lambda e: (-_RANK[DTYPES[e.dtype]], e.name))


def header(entries: Sequence[Entry], metadata: Mapping[str, str]) -> bytes:
    """The file's first bytes, up to its data, for ``entries`` in :func:`file_order`."""
    described: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for entry in entries:
        end = offset + entry.nbytes
        described[entry.name] = {
            "dtype": DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(described, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save_streamed(
    path: str | os.PathLike[str] | None,
    entries: Sequence[Entry],
    fetch: Callable[[Entry], torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Write ``entries`` to ``path`` atomically, calling ``fetch(entry)`` for each tensor in
    :func:`file_order` and dropping it once written. With ``path`` None nothing is written but
    ``fetch`` is still called in that order (a rank taking part in collective gathers)."""
    ordered = file_order(entries)
    if path is None:
        for entry in ordered:
            fetch(entry)
        return
    if sys.byteorder != "little":
        raise InputError("safetensors files are written on little-endian machines only")

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(header(ordered, metadata))
            for entry in ordered:
                f.write(_data(entry, fetch(entry)))

    write_atomic(path, write)


def _data(entry: Entry, tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor``, checked against its ``entry``."""
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise InputError(
            f"{entry.name!r} came as {tensor.dtype} {list(tensor.shape)}, but the header says "
            f"{entry.dtype} {list(entry.shape)}"
        )
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
