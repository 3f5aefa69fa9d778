"""A ``torch.export`` ``.pt2`` archive read once, checked, and handed to torch as what was checked.

Python's ``zipfile`` and torch's own zip reader do not agree on every archive: of an entry name
stored twice, each may pick a different copy, so a check made with one reader says nothing about
what the other loads. The archive is therefore read into memory once, refused if it holds a name
twice or an entry that is encrypted, and its entries are written into a fresh archive in memory:
torch reads exactly the bytes the checks read. Unless the file is trusted (``trust_pickle``),
entries that torch would unpickle are refused.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import torch

from sharpscope.errors import InputError
from sharpscope.io.load_errors import corrupt, few, pickle_refusal, refused_global
from sharpscope.io.unpickler import refuse_unsafe_unpickler


def read_pt2(path: Path, trust_pickle: bool) -> io.BytesIO:
    """The archive's entries, checked, as a fresh zip archive in memory for
    ``torch.export.load``; unless ``trust_pickle``, refused if it holds pickled payloads."""
    try:
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
            _refuse_odd_entries(path, archive.infolist())
            entries = {info.filename: archive.read(info) for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise corrupt(path, exc) from exc
    if not trust_pickle:
        if any(name.endswith(".pt") for name in entries):
            refuse_unsafe_unpickler(path, trust_pickle)
        _refuse_pickled_payloads(path, entries)
    fresh = io.BytesIO()
    with zipfile.ZipFile(fresh, "w", zipfile.ZIP_STORED) as archive:
        for name in list(entries):  # each entry's bytes freed once written
            archive.writestr(zipfile.ZipInfo(name), entries.pop(name))
    fresh.seek(0)
    return fresh


def _refuse_odd_entries(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse names stored more than once and encrypted entries (torch.export.save writes
    neither)."""
    twice = sorted(name for name, count in Counter(i.filename for i in infos).items() if count > 1)
    if twice:
        raise InputError(
            f"{path} is not a .pt2 archive torch.export.save writes: it holds the entries "
            f"{few(twice)} more than once (a file crafted so that different zip readers see "
            "different contents); export and save the model again"
        )
    encrypted = sorted(i.filename for i in infos if i.flag_bits & 0x1)
    if encrypted:
        raise InputError(
            f"{path} is not a .pt2 archive torch.export.save writes: its entries "
            f"{few(encrypted)} are encrypted; export and save the model again"
        )


def _refuse_pickled_payloads(path: Path, entries: dict[str, bytes]) -> None:
    """torch.export.load unpickles some payloads (``use_pickle`` weights, custom objects, sample
    inputs); refuse an archive that needs it."""
    for name, data in entries.items():
        tail = name.split("/", 1)[-1]
        if tail.startswith(("data/weights/", "data/constants/")) and tail.endswith(".json"):
            _check_payload_config(path, tail, data)
        elif name.endswith(".pt"):
            _check_weights_only(path, data)


def _check_payload_config(path: Path, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError) as exc:
        raise corrupt(path, exc) from exc
    if not isinstance(config, dict):
        raise corrupt(path, ValueError(f"{name}: its config is not an object"))
    constants = name.startswith("data/constants/")
    for key, payload in config.items():
        if not isinstance(payload, dict):
            raise corrupt(path, ValueError(f"{name}: entry {key} is not an object"))
        pickled = payload.get("use_pickle") or (
            constants and not str(payload.get("path_name", "")).startswith("tensor_")
        )
        if pickled:
            raise pickle_refusal(path, f"pickled {key}")


def _check_weights_only(path: Path, raw: bytes) -> None:
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle_refusal(path, refused_global(exc)) from exc
    except Exception as exc:
        raise corrupt(path, exc) from exc
