"""Folders: CIFAR-10/100 in the python-pickle layout, and image folders with a folder per class."""

from __future__ import annotations

import re
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sharpscope.errors import InputError
from sharpscope.io.cifar_pickle import load_cifar_pickle
from sharpscope.io.data_sources import (
    ALL,
    SPLIT_ORDER,
    Source,
    Table,
    named_splits,
    single_split,
)
from sharpscope.io.user_code import one_line

CIFAR_DIRS = ("cifar-10-batches-py", "cifar-100-python")
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
GRAY_MODES = frozenset({"1", "L", "LA"})


def folder_source(path: Path, name: str) -> Source:
    """A CIFAR folder (or the folder holding an extracted CIFAR archive), else an image folder."""
    for root in (path, *(path / d for d in CIFAR_DIRS)):
        if (root / "test_batch").is_file() or _cifar10_train_files(root):
            return _cifar_source(root, name, 10)
        if (root / "train").is_file() or (root / "test").is_file():
            return _cifar_source(root, name, 100)
    return _image_source(path, name)


# --- CIFAR ---------------------------------------------------------------------------------------


def _cifar10_train_files(root: Path) -> list[Path]:
    files = [p for p in root.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)]
    return sorted(files, key=lambda p: int(p.name.rpartition("_")[2]))


def _cifar_source(root: Path, name: str, kind: int) -> Source:
    if kind == 10:
        files = {"train": _cifar10_train_files(root), "test": [root / "test_batch"]}
        labels, meta, names = "labels", root / "batches.meta", "label_names"
    else:
        files = {"train": [root / "train"], "test": [root / "test"]}
        labels, meta, names = "fine_labels", root / "meta", "fine_label_names"
    num_classes = len(load_cifar_pickle(meta).get(names, range(kind))) if meta.is_file() else kind
    present = {s: fs for s, fs in files.items() if fs and all(f.is_file() for f in fs)}
    tables = {s: partial(_cifar_table, fs, labels, num_classes) for s, fs in present.items()}
    return named_splits(f"CIFAR-{kind} {name}", tables)


def _cifar_table(files: list[Path], labels_key: str, num_classes: int) -> Table:
    parts = [_cifar_arrays(f, labels_key) for f in files]
    x = torch.cat([p[0] for p in parts]).view(-1, 3, 32, 32)
    y = torch.cat([p[1] for p in parts])
    return Table(len(y), partial(_scaled_pair, x, y), num_classes)


def _scaled_pair(x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    return x[idx].float().div_(255), y[idx]


def _cifar_arrays(path: Path, labels_key: str) -> tuple[Tensor, Tensor]:
    batch = load_cifar_pickle(path)
    data, labels = batch.get("data"), _labels(batch.get(labels_key))
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not ok or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
        raise InputError(
            f"{path} is not a CIFAR batch: expected 'data' (N x 3072 uint8) and {labels_key!r} "
            f"(N labels); found keys {', '.join(batch)}"
        )
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _labels(value: Any) -> np.ndarray | None:
    """A CIFAR file's labels (a list of ints, or an integer array) as a 1-D int64 array; None
    for anything else."""
    try:
        labels = np.asarray(value, dtype=np.int64) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None
    return labels if labels is not None and labels.ndim == 1 else None


# --- image folders -------------------------------------------------------------------------------


def _image_source(root: Path, name: str) -> Source:
    splits = _split_dirs(root)
    trees = splits or {ALL: root}
    classes = sorted(set(chain.from_iterable(_subdirs(d) for d in trees.values())))
    if not classes:
        raise InputError(
            f"{name} is neither a CIFAR folder nor an image folder: lay images out as "
            f"{name}/<class>/<image>.png (or {name}/train/<class>/..., {name}/test/<class>/...)"
        )
    files = {s: _image_files(d, classes) for s, d in trees.items()}
    mode = _scan(list(chain.from_iterable(files.values())), name)
    tables = {s: partial(_image_table, f, mode, len(classes)) for s, f in files.items()}
    label = f"image folder {name}"
    if splits:
        return named_splits(label, tables)
    return single_split(label, tables[ALL], ", or lay it out as train/<class>/ and test/<class>/")


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path) -> dict[str, Path]:
    """``{split: folder}`` when ``root`` holds train/, test/, ... of class folders, else empty."""
    names = _subdirs(root)
    if any(n in SPLIT_ORDER and _subdirs(root / n) for n in names):
        return {n: root / n for n in names}
    return {}


def _image_files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image, class index) for every image under ``folder/<class>/``, in sorted order."""
    files = []
    for label, cls in enumerate(classes):
        found = (folder / cls).rglob("*") if (folder / cls).is_dir() else ()
        images = [
            p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        ]
        files += [(p, label) for p in sorted(images)]
    return files


def _scan(files: list[tuple[Path, int]], name: str) -> str:
    """``"L"`` when every image is grayscale, else ``"RGB"``; refuses images of different sizes."""
    first: tuple[Path, tuple[int, int]] | None = None
    gray = True
    for path, _ in files:
        mode, size = _header(path)
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise InputError(
                f"images in {name} differ in size: {first[0]} is {_wxh(first[1])} but {path} is "
                f"{_wxh(size)}; resize them to one size"
            )
        gray = gray and mode in GRAY_MODES
    return "L" if gray else "RGB"


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except Exception as exc:
        raise _bad_image(path, exc) from exc


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _bad_image(path: Path, exc: Exception) -> InputError:
    return InputError(f"cannot read image {path} ({one_line(exc)}); remove or replace it")


def _image_table(files: list[tuple[Path, int]], mode: str, num_classes: int) -> Table:
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)

    def take(idx: Tensor) -> tuple[Tensor, Tensor]:
        return torch.stack([_pixels(files[i][0], mode) for i in idx.tolist()]), labels[idx]

    return Table(len(files), take, num_classes)


def _pixels(path: Path, mode: str) -> Tensor:
    """One image as a (C, H, W) float32 tensor in [0, 1]."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert(mode), dtype=np.uint8)
    except Exception as exc:
        raise _bad_image(path, exc) from exc
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255)
