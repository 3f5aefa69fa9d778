"""Eigenvectors as safetensors, keyed by parameter name."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sharpscope.curvature import ParamSpace
from sharpscope.io.atomic import atomic_path


def save_eigenvectors(
    path: str | Path, eigenvalues: torch.Tensor, vectors: torch.Tensor, space: ParamSpace
) -> None:
    """Write eigenvector ``i`` (rows of ``vectors``) as tensors ``v{i+1}/{parameter name}``, with
    the eigenvalues and the parameter order in the metadata; atomically."""
    tensors = {
        f"v{i + 1}/{name}": part.detach().cpu().contiguous()
        for i, vector in enumerate(vectors)
        for name, part in space.unflatten(vector).items()
    }
    metadata = {
        "eigenvalues": json.dumps([float(e) for e in eigenvalues]),
        "parameters": json.dumps(list(space.names)),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_eigenvectors(path: str | Path) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Read :func:`save_eigenvectors`'s file: eigenvalues and per eigenvector ``{name: tensor}``."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    values = json.loads(metadata["eigenvalues"])
    names = json.loads(metadata["parameters"])
    return values, [{n: tensors[f"v{i + 1}/{n}"] for n in names} for i in range(len(values))]
