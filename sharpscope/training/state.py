"""Trainer state on disk (``trainer.pt``) and the random-number generators it must capture.

The file is written with ``torch.save`` to a temporary file and renamed into place, and read with
``torch.load(weights_only=True)``: it holds tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharpscope.errors import InputError
from sharpscope.io.atomic import write_atomic

FORMAT = 1
"""Version of the trainer-state layout; a file of another version is refused."""


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng() -> dict[str, Any]:
    """The states of torch's CPU and CUDA generators, numpy's global one and Python's ``random``,
    as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned (CUDA states only where as many GPUs exist)."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    internal = tuple(int(x) for x in p["internal"].tolist())
    random.setstate((p["version"], internal, p["gauss_next"]))


def save_trainer_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` (plus the format version) atomically with ``torch.save``."""
    document = {"format": FORMAT, **state}
    write_atomic(path, lambda tmp: torch.save(document, tmp))


def load_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a trainer state written by :func:`save_trainer_state` (``weights_only=True``)."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{file} is missing: the checkpoint is incomplete") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the trainer state {file}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(
            f"{file} is not a trainer state of format {FORMAT} (found {found!r}); it was written "
            "by another sharpscope version"
        )
    return state
