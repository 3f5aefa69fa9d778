"""Hugging Face ``save_pretrained`` folders: ``config.json`` and the weight files beside it.

The weights are ``model.safetensors``, a sharded ``model.safetensors.index.json`` with its shards,
``pytorch_model.bin`` or a sharded ``pytorch_model.bin.index.json``, looked for in that order (as
transformers does). :mod:`sharpscope.io.checkpoints` reads them;
:mod:`sharpscope.io.transformers_models` builds the model and writes it back.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from sharpscope.errors import InputError
from sharpscope.io.load_errors import corrupt, few

CONFIG = "config.json"
WEIGHTS: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files of a folder, single or an index of shards, in the order they are preferred."""
INDEX_SUFFIX = ".index.json"
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece*",
    "*.tiktoken",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
)
"""Globs of the tokenizer and preprocessor files that a model written back takes along."""
CONTENTS = (
    "a checkpoint folder is a Hugging Face save_pretrained folder: config.json with "
    "model.safetensors, model.safetensors.index.json and its shards, or pytorch_model.bin"
)


def weight_files(folder: Path, hint: str = "") -> list[Path]:
    """The weight files of the save_pretrained folder ``folder`` (the shards of an index, in
    name order); an :class:`InputError` ending in ``hint`` for a folder that is not one."""
    if not (folder / CONFIG).is_file():
        raise InputError(f"checkpoint folder {folder} has no {CONFIG}; {CONTENTS}{hint}")
    for name in WEIGHTS:
        if (folder / name).is_file():
            return _shards(folder / name) if name.endswith(INDEX_SUFFIX) else [folder / name]
    raise InputError(
        f"checkpoint folder {folder} has {CONFIG} but no weights ({', '.join(WEIGHTS)}); "
        "write them with model.save_pretrained(folder)"
    )


def _shards(index: Path) -> list[Path]:
    """The shard files an index's ``weight_map`` names, checked to be plain names present."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise corrupt(index, exc) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    if not names or not all(isinstance(n, str) and Path(n).name == n for n in names):
        raise InputError(
            f"{index} has no weight_map from tensor names to shard files in its folder; "
            "write the model again with save_pretrained"
        )
    missing = sorted(n for n in names if not (index.parent / n).is_file())
    if missing:
        raise InputError(
            f"{index} names shards that are not in the folder: {few(missing)}; copy the whole "
            "folder"
        )
    return [index.parent / name for name in sorted(names)]


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that :data:`TOKENIZER_FILES` names, in name order (they are
    copied into outputs): a link to a file outside the folder is refused, except the Hugging Face
    cache's links from a snapshot folder into its repository's ``blobs``."""
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and any(fnmatch.fnmatchcase(p.name, g) for g in TOKENIZER_FILES)
    )
    for path in found:
        if path.is_symlink() and not _inside(path.resolve(), folder.resolve()):
            raise InputError(
                f"{path} is a link to {path.resolve()}, outside the model folder, and finetune "
                "copies the tokenizer files into its checkpoints: copy the file into the folder"
            )
    return found


def _inside(target: Path, folder: Path) -> bool:
    """Whether ``target`` is in ``folder``, or in the ``blobs`` of the Hugging Face cache
    repository whose snapshot ``folder`` is."""
    cache = folder.parent.parent / "blobs" if folder.parent.name == "snapshots" else None
    return target.is_relative_to(folder) or (cache is not None and target.parent == cache)
