"""Eigenvectors as safetensors, keyed by parameter name, written one parameter's part at a time
(so that vectors sharded over ranks are gathered a parameter at a time, never whole)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from sharpscope.curvature import ParamSpace
from sharpscope.io.atomic import atomic_path

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
"""safetensors' names of the dtypes eigenvectors are computed in."""


def save_eigenvectors(
    path: str | Path | None, eigenvalues: torch.Tensor, vectors: torch.Tensor, space: ParamSpace
) -> None:
    """Write eigenvector ``i`` (rows of ``vectors``) as tensors ``v{i+1}/{parameter name}``, with
    the eigenvalues and the parameter order in the metadata; atomically, streamed a parameter's
    part at a time. Of a model sharded by FSDP2 (``space``'s parameters DTensors), ``vectors`` are
    this rank's pieces and every rank calls it, ``path`` on rank 0 and None on the others: each
    parameter's part is gathered in turn (:func:`_parts`), and the file is the one a single
    process writes."""
    names = [f"v{i + 1}/{name}" for i in range(len(vectors)) for name in space.names]
    shapes = [tuple(shape) for _ in range(len(vectors)) for shape in space.shapes]
    parts = (part for vector in vectors for part in _parts(vector, space))
    if path is None:  # another rank's share of the gathers
        for _ in parts:
            pass
        return
    metadata = {
        "eigenvalues": json.dumps([float(e) for e in eigenvalues]),
        "parameters": json.dumps(list(space.names)),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        _write(out, names, shapes, vectors.dtype, parts, metadata)


def _parts(vector: torch.Tensor, space: ParamSpace) -> Iterator[torch.Tensor]:
    """Each parameter's part of the flat ``vector``, whole, in parameter order; of a sharded
    space, ``vector`` is this rank's pieces and each part is gathered from every rank."""
    if not any(isinstance(p, DTensor) for p in space.params):
        yield from space.split(vector)
        return
    local = [p.to_local() for p in space.params]
    pieces = vector.split([t.numel() for t in local])
    for p, t, piece in zip(space.params, local, pieces, strict=True):
        spread = DTensor.from_local(
            piece.reshape(t.shape), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )
        yield spread.full_tensor()


def _write(
    out: BinaryIO,
    names: list[str],
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    parts: Iterable[torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """A safetensors file of tensors ``names`` of ``shapes`` and ``dtype``, their data in that
    order from ``parts``: the header first (the offsets follow from the shapes), then each part's
    bytes as it comes."""
    header: dict[str, object] = {"__metadata__": metadata}
    start = 0
    for name, shape in zip(names, shapes, strict=True):
        end = start + torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [start, end]}
        start = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data aligned to 8 bytes, as safetensors writes it
    out.write(struct.pack("<Q", len(text)) + text)
    for part, shape in zip(parts, shapes, strict=True):
        if tuple(part.shape) != shape:
            raise ValueError(f"a part of shape {tuple(part.shape)} where {shape} was declared")
        data = part.detach().to("cpu", dtype).contiguous().reshape(-1)
        out.write(data.view(torch.uint8).numpy().tobytes())


def load_eigenvectors(path: str | Path) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Read :func:`save_eigenvectors`'s file: eigenvalues and per eigenvector ``{name: tensor}``."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    values = json.loads(metadata["eigenvalues"])
    names = json.loads(metadata["parameters"])
    return values, [{n: tensors[f"v{i + 1}/{n}"] for n in names} for i in range(len(values))]
