"""Checkpoints: read weights or whole models in every common PyTorch format, write safetensors.

The format is told from the file's content, never its suffix: safetensors (an 8-byte header
length, then a JSON header), a ``torch.save`` zip or legacy pickle, a TorchScript archive, or a
``torch.export`` ``.pt2`` archive; a folder is a Hugging Face ``save_pretrained`` folder
(:mod:`sharpscope.io.pretrained`) or a PEFT LoRA adapter folder on its base model
(:mod:`sharpscope.io.peft_adapters`). Nothing is unpickled beyond tensors unless the caller trusts
the file (``trust_pickle``), and no code the file names or holds is imported or run unless the
caller trusts it (``trust_code``): a stored model spec may name only a built-in architecture,
and TorchScript archives load only then. Every failure raises
:class:`~sharpscope.errors.InputError` with a one-line message that names the file, the problem
and the fix. TorchScript and ``.pt2`` archives are loaded by :mod:`sharpscope.io.compiled`;
weights are fitted to a model by :mod:`sharpscope.io.state_dicts`, or given to transformers by
:mod:`sharpscope.io.transformers_models` (imported only then: transformers is optional).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.architectures import BUILTIN_MODELS
from sharpscope.io.atomic import write_atomic
from sharpscope.io.compiled import load_export, load_torchscript
from sharpscope.io.load_errors import corrupt, few, first_line, pickle_refusal, refused_global
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.io.peft_adapters import (
    adapter_config,
    adapter_files,
    base_folder,
    build_adapter,
    describe,
    is_adapter,
)
from sharpscope.io.pretrained import weight_files
from sharpscope.io.row_reads import (
    Rows,
    fill,
    materialise,
    meta_parameters,
    safetensors_placeholders,
)
from sharpscope.io.state_dicts import (
    WRAPPER_KEYS,
    as_state_dict,
    fit_prefix,
    fitting,
    in_dtype_of,
    load_weights,
    restore_prefix,
    savable_state,
    select_prefix,
)
from sharpscope.io.unpickler import refuse_unsafe_unpickler
from sharpscope.version import __version__

FORMATS: tuple[str, ...] = (
    "state_dict",
    "safetensors",
    "torchscript",
    "export",
    "module",
    "pretrained",
    "adapter",
)
SPEC_KEY = "sharpscope.model_spec"
VERSION_KEY = "sharpscope.version"
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2")

# torch.save's legacy (non-zip) files start with this magic number, pickled as a long.
_TORCH_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class Trust:
    """What the caller allows a file to do: be unpickled beyond tensors, run its code."""

    pickle: bool = False
    code: bool = False


@dataclass(frozen=True)
class Placement:
    """Where :func:`load_model` puts a model's parameters as it loads them (under ``fsdp``):
    the model, cast to ``dtype``, is sharded in place by ``shard`` (FSDP2's ``fully_shard``),
    then each rank's shards are made on ``device`` and read from the file alone."""

    shard: Callable[[nn.Module], nn.Module]
    device: torch.device
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A checkpoint as read: its weights (``state_dict``) or whole model (``module``), the model
    spec sharpscope stored in it, its other metadata (strings) and the sha256 of its bytes (of a
    ``pretrained`` folder's weight files; ``path`` is then the folder)."""

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    model_spec: ModelSpec | None = None
    """The spec stored in the file: untrusted (:func:`load_model` builds it only if it names a
    built-in architecture, or with ``trust_code``)."""
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    stripped_prefix: str = ""
    """Key prefix removed from every weight name (``module.`` of DataParallel, ``model.``)."""
    adapter: dict[str, Any] | None = None
    """Of a LoRA adapter put on its base by :func:`load_model`: its folder, rank, target modules
    and base (:func:`~sharpscope.io.peft_adapters.describe`)."""


def read_checkpoint(
    path: str | os.PathLike[str], trust_pickle: bool = False, trust_code: bool = False
) -> Checkpoint:
    """Read a checkpoint of any supported format; ``trust_pickle`` allows unpickling arbitrary
    Python objects such as a whole pickled model, ``trust_code`` running the code a compiled
    model holds (TorchScript; a .pt2 graph calling more than computations). Both can run any
    code: only for trusted files."""
    return _read(_existing(path), Trust(trust_pickle, trust_code), None)


def _read(source: Path, trust: Trust, rows: Rows | None) -> Checkpoint:
    """:func:`read_checkpoint`; with ``rows``, the weights of files of tensors are placeholders
    read through it (safetensors) or memory-mapped (a ``torch.save`` zip)."""
    if is_adapter(source):
        return _read_adapter(source, trust.pickle)
    if source.is_dir():
        return _read_folder(source, trust.pickle, rows)
    checkpoint = _READERS[detect_format(source)](source, trust, rows)
    return replace(checkpoint, sha256=file_sha256(source))


def load_model(
    path: str | os.PathLike[str],
    spec: ModelSpec | None = None,
    trust_pickle: bool = False,
    state_prefix: str | None = None,
    trust_code: bool = False,
    base: Path | None = None,
    placement: Placement | None = None,
) -> tuple[nn.Module, Checkpoint]:
    """The model a checkpoint holds: its own module (``spec`` is then ignored), or the model built
    from ``spec`` (else the file's stored spec, else a ``pretrained`` folder's config) with the
    file's weights loaded strictly, in their floating-point dtype (float32 at least for a
    folder). The weights are those whose names, less one key prefix, are the model's names
    (:func:`~sharpscope.io.state_dicts.fit_prefix`: a Lightning ``.ckpt`` of a module holding
    the network as ``self.net``), or those under ``state_prefix`` (a name as stored). A stored
    spec that names code rather than a built-in architecture is refused unless ``trust_code``
    (see :func:`read_checkpoint` for the formats it also allows). A PEFT LoRA adapter folder is
    put on its base model (``base``, else the local folder its config names), which loads as
    ``path`` would with the other arguments (:mod:`sharpscope.io.peft_adapters`).

    With a ``placement``, a checkpoint of tensors in files (safetensors files and folders,
    ``torch.save`` zip files) builds the model with its parameters on the meta device, shards it
    and reads each rank's rows of them only (:mod:`sharpscope.io.row_reads`): the model returned
    is sharded, on the placement's device and dtype. Weights that do not fit the model, and the
    formats holding a module or an adapter, load whole as without it (the module is returned
    whole, for the caller to shard)."""
    rows = None if placement is None else Rows()
    checkpoint = _read(_existing(path), Trust(trust_pickle, trust_code), rows)
    if checkpoint.format == "adapter":
        return _load_adapter(checkpoint, base, spec, trust_pickle, state_prefix, trust_code)
    if checkpoint.module is not None:
        return checkpoint.module, checkpoint
    if spec is None and checkpoint.format == "pretrained":
        from sharpscope.io.transformers_models import build_pretrained

        assert checkpoint.state_dict is not None
        stored = {checkpoint.stripped_prefix + k: v for k, v in checkpoint.state_dict.items()}
        if rows is None:
            return build_pretrained(checkpoint.path, stored), checkpoint
        model = build_pretrained(checkpoint.path, stored, empty=True)
        state, problems = fitting(model, stored)
        placed = _placed(model, state, problems, checkpoint, placement, rows)
        return placed or load_model(path, spec, trust_pickle, state_prefix, trust_code, base)
    chosen = spec or checkpoint.model_spec
    if chosen is None:
        raise InputError(
            f"{checkpoint.path} holds only weights; pass `model` pkg.module:factory, "
            f"`model` path/to/file.py:factory or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    if spec is None and not trust_code:
        _refuse_stored_code(checkpoint.path, chosen)
    assert checkpoint.state_dict is not None
    source = str(checkpoint.path)
    weights, stripped = checkpoint.state_dict, checkpoint.stripped_prefix
    if state_prefix is not None:
        weights = select_prefix({stripped + k: v for k, v in weights.items()}, state_prefix, source)
        stripped = state_prefix
    with meta_parameters() if rows is not None else contextlib.nullcontext():
        model = in_dtype_of(build_model(chosen), weights)
    state, fitted = fit_prefix(model, restore_prefix(model, weights, stripped), source, str(chosen))
    checkpoint = replace(checkpoint, state_dict=weights, stripped_prefix=stripped + fitted)
    if rows is None:
        load_weights(model, state, source, str(chosen))
        return model, checkpoint
    state, problems = fitting(model, state)
    placed = _placed(model, state, problems, checkpoint, placement, rows)
    return placed or load_model(path, spec, trust_pickle, state_prefix, trust_code, base)


def _placed(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    problems: list[str],
    checkpoint: Checkpoint,
    placement: Placement | None,
    rows: Rows,
) -> tuple[nn.Module, Checkpoint] | None:
    """The model built with its parameters on the meta device, cast, sharded and filled with
    this rank's rows of ``state`` read through ``rows`` (:class:`Placement`), and the checkpoint
    with its weights as meta tensors (shapes and dtypes: nothing of the file is held after);
    None when the weights do not fit it (``problems``: the whole load then says so, as without a
    placement)."""
    if problems:
        return None
    assert placement is not None and checkpoint.state_dict is not None
    model = placement.shard(model.to(dtype=placement.dtype))
    materialise(model, placement.device)
    fill(model, state, rows)
    held = {key: tensor.to("meta") for key, tensor in checkpoint.state_dict.items()}
    return model, replace(checkpoint, state_dict=held)


def _load_adapter(
    checkpoint: Checkpoint,
    base: Path | None,
    spec: ModelSpec | None,
    trust_pickle: bool,
    state_prefix: str | None,
    trust_code: bool,
) -> tuple[nn.Module, Checkpoint]:
    """The LoRA adapter ``checkpoint`` on its base model, and the checkpoint with the adapter's
    description (:func:`~sharpscope.io.peft_adapters.describe`) as its ``adapter``."""
    config = adapter_config(checkpoint.path)
    folder = base_folder(checkpoint.path, config, base)
    if is_adapter(folder):
        raise InputError(f"the base {folder} of {checkpoint.path} is itself an adapter folder")
    base_model, _ = load_model(folder, spec, trust_pickle, state_prefix, trust_code)
    assert checkpoint.state_dict is not None
    model = build_adapter(base_model, config, checkpoint.state_dict, checkpoint.path, folder)
    return model, replace(checkpoint, adapter=describe(checkpoint.path, config, folder))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: ModelSpec,
    metadata: dict[str, str] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the model's parameters and buffers (or ``state``, its whole state gathered from a
    sharded model) as safetensors, atomically, with ``spec`` in the metadata so that
    :func:`load_model` rebuilds the model without being told the spec."""
    tensors = savable_state(model, state)
    stored = checkpoint_metadata(spec, metadata)
    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=stored))
    except (KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise InputError(
            f"cannot save the model to {path} as safetensors ({type(exc).__name__}: "
            f"{first_line(exc)}); its state holds tensors safetensors cannot store"
        ) from exc


def checkpoint_metadata(spec: ModelSpec, metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The safetensors metadata of a checkpoint: ``metadata`` with the spec and the version."""
    return {**(metadata or {}), SPEC_KEY: spec.to_json(), VERSION_KEY: __version__}


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 :func:`read_checkpoint` reports: of a file's bytes, of a save_pretrained
    folder's weight files, or of an adapter folder's config and weights."""
    source = _existing(path)
    if is_adapter(source):
        return files_sha256(adapter_files(source, trust_pickle=True))  # read, not unpickled
    return files_sha256(_folder_files(source)) if source.is_dir() else file_sha256(source)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    return files_sha256([path])


def files_sha256(paths: Iterable[str | os.PathLike[str]]) -> str:
    """The hex sha256 of the files' bytes one after the other (of one file, its sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: str | os.PathLike[str]) -> str:
    """The container a file holds, from its bytes: ``"safetensors"``, ``"torch.save"`` (zip or
    legacy pickle), ``"torchscript"`` or ``"export"`` (a ``torch.export`` ``.pt2`` archive); of
    a folder, ``"pretrained"`` (a save_pretrained folder) or ``"adapter"`` (a PEFT adapter)."""
    file = _existing(path)
    if is_adapter(file):
        return "adapter"
    if file.is_dir():
        _folder_files(file)
        return "pretrained"
    try:
        with file.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {file}: {exc.strerror or exc}") from exc
    if not head:
        raise InputError(f"checkpoint {file} is empty (0 bytes); save or download it again")
    if head.startswith(b"PK\x03\x04"):
        return _zip_format(file)
    if _is_safetensors(head):
        return "safetensors"
    if head.startswith(b"\x80") and _TORCH_MAGIC in head:
        return "torch.save"
    if head.startswith(b"version https://git-lfs"):
        raise InputError(
            f"{file} is a Git LFS pointer, not the checkpoint itself; fetch it with git lfs pull"
        )
    raise InputError(
        f"{file} is not a checkpoint sharpscope reads: its bytes are neither safetensors, "
        "torch.save, TorchScript nor a torch.export .pt2 archive (truncated or corrupt?)"
    )


# --- files and formats ------------------------------------------------------------------------


def _refuse_stored_code(path: Path, stored: ModelSpec) -> None:
    """A spec read from a file builds only a built-in architecture: its target is checked
    before anything is imported (the file's author chose it, not the user)."""
    if stored.target not in BUILTIN_MODELS:
        raise InputError(
            f"{path} stores the model spec {stored.target!r}, which is not a built-in model "
            f"({', '.join(BUILTIN_MODELS)}): building it would import and run code the file "
            "names, so sharpscope refuses by default: pass `model` to give the spec yourself, or "
            "`trust_code` only for files you trust"
        )


def _existing(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"checkpoint {file} not found; check the path")
    return file


def _is_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER


def _zip_format(path: Path) -> str:
    names = _zip_names(path)
    tails = {name.split("/", 1)[-1] for name in names} | set(names)
    if "archive_format" in tails or "serialized_exported_program.json" in tails:
        return "export"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "torch.save"
    raise InputError(
        f"{path} is a zip archive but not a torch.save checkpoint, TorchScript archive or "
        "torch.export .pt2 program (no data.pkl, code/ or archive_format entry)"
    )


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise corrupt(path, exc) from exc


# --- save_pretrained folders (sharpscope.io.pretrained) ----------------------------------------


def _read_adapter(folder: Path, trust_pickle: bool) -> Checkpoint:
    """The weights of a PEFT adapter folder, as its file names them; the sha256 is of its config
    and weight files."""
    adapter_config(folder)  # a type sharpscope does not read is refused before its weights
    files = adapter_files(folder, trust_pickle)
    tensors = dict(_weights_in(files[1], trust_pickle))
    return Checkpoint(folder, "adapter", tensors, sha256=files_sha256(files))


def _read_folder(folder: Path, trust_pickle: bool, rows: Rows | None = None) -> Checkpoint:
    """All the weights of a save_pretrained folder, as one state dict (read lazily with
    ``rows``: :func:`_read`)."""
    files = _folder_files(folder)
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(_weights_in(file, trust_pickle, rows))
    state, prefix = as_state_dict(folder, tensors)
    return Checkpoint(
        folder, "pretrained", state, sha256=files_sha256(files), stripped_prefix=prefix
    )


def _folder_files(folder: Path) -> list[Path]:
    """The weight files of a save_pretrained folder; else an error naming the checkpoint files
    it holds, if any."""
    inside = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
    return weight_files(folder, f" (it holds {few(inside)}: pass that file)" if inside else "")


def _weights_in(file: Path, trust_pickle: bool, rows: Rows | None = None) -> Mapping[Any, Any]:
    """The ``{name: tensor}`` of one weight file of a folder, safetensors or ``torch.save``."""
    kind = detect_format(file)
    if kind == "safetensors":
        return _safetensors_content(file, rows)[1]
    obj = _torch_load(file, trust_pickle, rows is not None) if kind == "torch.save" else None
    if not isinstance(obj, Mapping):
        raise InputError(
            f"{file} holds a {type(obj).__name__}, not the state dict save_pretrained writes; "
            "write the model again with save_pretrained"
        )
    return obj


# --- safetensors --------------------------------------------------------------------------------


def _read_safetensors(path: Path, trust: Trust, rows: Rows | None) -> Checkpoint:
    del trust  # safetensors holds tensors only; its stored spec is load_model's to judge
    metadata, tensors = _safetensors_content(path, rows)
    state, prefix = as_state_dict(path, tensors)
    return Checkpoint(
        path,
        "safetensors",
        state_dict=state,
        model_spec=_stored_spec(path, metadata),
        metadata=metadata,
        stripped_prefix=prefix,
    )


def _safetensors_content(
    path: Path, rows: Rows | None = None
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors (placeholders of ``rows`` when given)."""
    try:
        if rows is not None:
            return safetensors_placeholders(path, rows)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise corrupt(path, exc) from exc
    return metadata, tensors


def _stored_spec(path: Path, metadata: Mapping[str, str]) -> ModelSpec | None:
    text = metadata.get(SPEC_KEY)
    if text is None:
        return None
    try:
        return ModelSpec.from_json(text)
    except InputError as exc:
        raise InputError(f"{path} carries a malformed {SPEC_KEY}: {exc}") from exc


# --- torch.save ---------------------------------------------------------------------------------


def _read_torch_save(path: Path, trust: Trust, rows: Rows | None) -> Checkpoint:
    obj = _torch_load(path, trust.pickle, rows is not None)
    if isinstance(obj, nn.Module):
        return Checkpoint(path, "module", module=obj)
    if not isinstance(obj, Mapping):
        raise InputError(
            f"{path} holds a {type(obj).__name__}, not a state dict or an nn.Module; save "
            "model.state_dict() or the model"
        )
    metadata = {
        key: str(value)
        for key, value in obj.items()
        if isinstance(key, str) and isinstance(value, (str, int, float, bool))
    }
    inner = next(
        (obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), obj
    )
    spec = _stored_spec(path, metadata)
    if isinstance(inner, nn.Module):
        return Checkpoint(path, "module", module=inner, model_spec=spec, metadata=metadata)
    state, prefix = as_state_dict(path, inner)
    return Checkpoint(
        path, "state_dict", state, model_spec=spec, metadata=metadata, stripped_prefix=prefix
    )


def _torch_load(path: Path, trust_pickle: bool, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; only with ``trust_pickle`` a full unpickling.
    With ``mmap``, the tensors of a zip file are memory-mapped, read as they are used."""
    refuse_unsafe_unpickler(path, trust_pickle)
    mmap = mmap and zipfile.is_zipfile(path)  # a legacy torch.save file cannot be mapped
    try:
        return _torch_load_file(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise pickle_refusal(path, refused_global(exc)) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise corrupt(path, exc) from exc
    try:
        return _torch_load_file(path, weights_only=False, mmap=mmap)
    except (AttributeError, ImportError) as exc:
        raise InputError(
            f"{path} pickles a class that cannot be imported here ({first_line(exc)}); make "
            "the module that defines the model importable (PYTHONPATH), or save its state_dict"
        ) from exc
    except Exception as exc:
        raise corrupt(path, exc) from exc


def _torch_load_file(path: Path, weights_only: bool, mmap: bool = False) -> Any:
    """``torch.load`` of an open file: given a path, torch picks the format by its suffix (a
    mapped file is opened by name, which torch then needs)."""
    if mmap:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=True)
    with path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


# --- TorchScript and torch.export (sharpscope.io.compiled) --------------------------------------


def _read_torchscript(path: Path, trust: Trust, rows: Rows | None) -> Checkpoint:
    del rows  # a module: read whole
    return Checkpoint(path, "torchscript", module=load_torchscript(path, trust.code))


def _read_export(path: Path, trust: Trust, rows: Rows | None) -> Checkpoint:
    del rows  # a module: read whole
    return Checkpoint(path, "export", module=load_export(path, trust.pickle, trust.code))


_READERS: dict[str, Callable[[Path, Trust, Rows | None], Checkpoint]] = {
    "safetensors": _read_safetensors,
    "torch.save": _read_torch_save,
    "torchscript": _read_torchscript,
    "export": _read_export,
}
