"""Checkpoints: read weights or whole models in every common PyTorch format, write safetensors.

The format is told from the file's content, never its suffix: safetensors (an 8-byte header
length, then a JSON header), a ``torch.save`` zip or legacy pickle, a TorchScript archive, or a
``torch.export`` ``.pt2`` archive. Nothing is unpickled beyond tensors unless the caller trusts
the file (``trust_pickle``). Every failure raises :class:`~sharpscope.errors.InputError` with a
one-line message that names the file, the problem and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import re
import types
import warnings
import zipfile
from collections.abc import Callable, Mapping
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
from sharpscope.io.models import ModelSpec, build_model

FORMATS: tuple[str, ...] = ("state_dict", "safetensors", "torchscript", "export", "module")
SPEC_KEY = "sharpscope.model_spec"
VERSION_KEY = "sharpscope.version"
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
KEY_PREFIXES: tuple[str, ...] = ("module.", "model.")
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2")

# torch.save's legacy (non-zip) files start with this magic number, pickled as a long.
_TORCH_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_MAX_SAFETENSORS_HEADER = 100_000_000
_TRAINING_ARGS = frozenset({"training", "train"})
_SHOWN = 5
_UNKNOWN = object()


@dataclass
class Checkpoint:
    """A checkpoint as read: its weights (``state_dict``) or whole model (``module``), the model
    spec sharpscope stored in it, its other metadata (strings) and the sha256 of its bytes."""

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    model_spec: ModelSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    stripped_prefix: str = ""
    """Key prefix removed from every weight name (``module.`` of DataParallel, ``model.``)."""


def read_checkpoint(path: str | os.PathLike[str], trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint of any supported format; ``trust_pickle`` allows unpickling arbitrary
    Python objects such as a whole pickled model (it can run code: only for trusted files)."""
    file = _existing_file(path)
    checkpoint = _READERS[detect_format(file)](file, trust_pickle)
    return replace(checkpoint, sha256=file_sha256(file))


def load_model(
    path: str | os.PathLike[str], spec: ModelSpec | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, Checkpoint]:
    """The model a checkpoint holds: its own module (``spec`` is then ignored), or the model built
    from ``spec`` (else the file's stored spec) with the file's weights loaded strictly, in
    their floating-point dtype."""
    checkpoint = read_checkpoint(path, trust_pickle)
    if checkpoint.module is not None:
        return checkpoint.module, checkpoint
    chosen = spec or checkpoint.model_spec
    if chosen is None:
        raise InputError(
            f"{checkpoint.path} holds only weights; pass --model pkg.module:factory, "
            f"--model path/to/file.py:factory or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    assert checkpoint.state_dict is not None
    model = _in_dtype_of(build_model(chosen), checkpoint.state_dict)
    state = _restore_prefix(model, checkpoint.state_dict, checkpoint.stripped_prefix)
    load_weights(model, state, str(checkpoint.path), str(chosen))
    return model, checkpoint


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "the weights",
    model_name: str = "",
) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, after a check that names missing and
    unexpected keys and mismatched shapes; tied weights may be stored once."""
    state = _fill_tied(model, state_dict)
    problems = _mismatches(model, state)
    if problems:
        raise InputError(
            f"{source} does not fit the model {model_name or type(model).__name__}: "
            f"{'; '.join(problems)}; check that "
            "--model and --model-arg describe the architecture that wrote the checkpoint"
        )
    model.load_state_dict(state, strict=True)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: ModelSpec,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the model's parameters and buffers as safetensors, atomically, with ``spec`` in the
    metadata so that :func:`load_model` rebuilds the model without being told the spec."""
    from sharpscope import __version__

    tensors = _savable(model)
    stored = {**(metadata or {}), SPEC_KEY: spec.to_json(), VERSION_KEY: __version__}
    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=stored))
    except (KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise InputError(
            f"cannot save the model to {path} as safetensors ({type(exc).__name__}: "
            f"{_first_line(exc)}); its state holds tensors safetensors cannot store"
        ) from exc


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: str | os.PathLike[str]) -> str:
    """The container a file holds, from its bytes: ``"safetensors"``, ``"torch.save"`` (zip or
    legacy pickle), ``"torchscript"`` or ``"export"`` (a ``torch.export`` ``.pt2`` archive)."""
    file = _existing_file(path)
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


def _existing_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"checkpoint {file} not found; check the path")
    if file.is_dir():
        inside = sorted(p.name for p in file.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        hint = f" (it holds {', '.join(inside[:_SHOWN])})" if inside else ""
        raise InputError(
            f"checkpoint {file} is a directory, not a file; pass a checkpoint file{hint}"
        )
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
        raise _corrupt(path, exc) from exc


def _corrupt(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path} is truncated or corrupt ({_first_line(exc)}); save or download it again"
    )


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- safetensors --------------------------------------------------------------------------------


def _read_safetensors(path: Path, trust_pickle: bool) -> Checkpoint:
    del trust_pickle  # safetensors holds tensors only
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    state, prefix = _as_state_dict(path, tensors)
    return Checkpoint(
        path,
        "safetensors",
        state_dict=state,
        model_spec=_stored_spec(path, metadata),
        metadata=metadata,
        stripped_prefix=prefix,
    )


def _stored_spec(path: Path, metadata: Mapping[str, str]) -> ModelSpec | None:
    text = metadata.get(SPEC_KEY)
    if text is None:
        return None
    try:
        return ModelSpec.from_json(text)
    except InputError as exc:
        raise InputError(f"{path} carries a malformed {SPEC_KEY}: {exc}") from exc


# --- torch.save ---------------------------------------------------------------------------------


def _read_torch_save(path: Path, trust_pickle: bool) -> Checkpoint:
    obj = _torch_load(path, trust_pickle)
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
    state, prefix = _as_state_dict(path, inner)
    return Checkpoint(
        path, "state_dict", state, model_spec=spec, metadata=metadata, stripped_prefix=prefix
    )


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; only with ``trust_pickle`` a full unpickling."""
    try:
        return _torch_load_file(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise _pickle_refusal(path, _refused_global(exc)) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise _corrupt(path, exc) from exc
    try:
        return _torch_load_file(path, weights_only=False)
    except (AttributeError, ImportError) as exc:
        raise InputError(
            f"{path} pickles a class that cannot be imported here ({_first_line(exc)}); make "
            "the module that defines the model importable (PYTHONPATH), or save its state_dict"
        ) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _torch_load_file(path: Path, weights_only: bool) -> Any:
    """``torch.load`` of an open file: given a path, torch picks the format by its suffix."""
    with path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def _refused_global(exc: BaseException) -> str:
    """The class the weights-only unpickler refused, from its message."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return f"e.g. {found[1]}" if found else "beyond tensors and containers"


def _pickle_refusal(path: Path, what: str) -> InputError:
    return InputError(
        f"{path} holds arbitrary Python objects ({what}), not only weights; unpickling them can "
        "run any code, so sharpscope refuses by default: pass --trust-pickle (trust_pickle=True) "
        "only for files you trust, or re-save with torch.save(model.state_dict(), ...)"
    )


def _as_state_dict(path: Path, mapping: Mapping[Any, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Check that ``mapping`` is ``{name: tensor}``; strip a key prefix all names share."""
    if not mapping:
        raise InputError(f"{path} holds an empty state dict; it has no weights to load")
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, not a "
                "tensor; expected {name: tensor}, possibly under one of "
                f"{', '.join(WRAPPER_KEYS)}"
            )
    state = dict(mapping)
    prefix = ""
    while shared := _shared_prefix(state):
        state = {key[len(shared) :]: value for key, value in state.items()}
        prefix += shared
    return state, prefix


def _shared_prefix(state: Mapping[str, Any]) -> str:
    for prefix in KEY_PREFIXES:
        if all(key.startswith(prefix) and len(key) > len(prefix) for key in state):
            return prefix
    return ""


# --- TorchScript and torch.export ---------------------------------------------------------------


def _read_torchscript(path: Path, trust_pickle: bool) -> Checkpoint:
    del trust_pickle  # TorchScript runs its own interpreter, not pickled Python
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is what the file holds
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"{path} is a TorchScript archive that torch.jit.load cannot read "
            f"({_first_line(exc)}); save it again with torch.jit.save"
        ) from exc
    _refuse_training_graph(path, _jit_training_ops(module), "torch.jit.trace")
    return Checkpoint(path, "torchscript", module=module)


def _read_export(path: Path, trust_pickle: bool) -> Checkpoint:
    if not trust_pickle:
        _refuse_pickled_payloads(path)
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise InputError(
            f"{path}: torch.export.load cannot read this .pt2 archive ({_first_line(exc)}); "
            f"export and save it again with torch {torch.__version__} (torch.export.save)"
        ) from exc
    _refuse_training_graph(path, _fx_training_ops(module), "torch.export.export")
    _allow_mode_switch(module)
    module.register_forward_pre_hook(_shape_check(path, _input_shapes(program)), prepend=True)
    return Checkpoint(path, "export", module=module)


def _refuse_pickled_payloads(path: Path) -> None:
    """torch.export.load unpickles some payloads (``use_pickle`` weights, custom objects, sample
    inputs); refuse a file that needs it unless it is trusted."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            tail = name.split("/", 1)[-1]
            if tail.startswith(("data/weights/", "data/constants/")) and tail.endswith(".json"):
                _check_payload_config(path, tail, archive.read(name))
            elif name.endswith(".pt"):
                _check_weights_only(path, archive.read(name))


def _check_payload_config(path: Path, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError) as exc:
        raise _corrupt(path, exc) from exc
    constants = name.startswith("data/constants/")
    for key, payload in config.items():
        if not isinstance(payload, dict):
            raise _corrupt(path, ValueError(f"{name}: entry {key} is not an object"))
        pickled = payload.get("use_pickle") or (
            constants and not str(payload.get("path_name", "")).startswith("tensor_")
        )
        if pickled:
            raise _pickle_refusal(path, f"pickled {key}")


def _check_weights_only(path: Path, raw: bytes) -> None:
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _pickle_refusal(path, _refused_global(exc)) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _allow_mode_switch(module: nn.Module) -> None:
    """``ExportedProgram.module()`` makes ``train()``/``eval()`` raise; make them set the flags
    only, as the graph's behaviour was fixed at export (and checked to be eval-mode)."""
    module.train = types.MethodType(nn.Module.train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(nn.Module.eval, module)  # type: ignore[method-assign]


def _input_shapes(program: torch.export.ExportedProgram) -> list[tuple[int | None, ...] | None]:
    """The exported input shapes, ``None`` for a dynamic dimension (or a non-tensor input)."""
    users = set(program.graph_signature.user_inputs)
    shapes: list[tuple[int | None, ...] | None] = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            shapes.append(None if shape is None else tuple(_static(d) for d in shape))
    return shapes


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


def _shape_check(path: Path, shapes: list[tuple[int | None, ...] | None]) -> Callable[..., None]:
    """A forward pre-hook that explains inputs the program's static shapes reject."""

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        if len(args) != len(shapes):
            return
        for got, want in zip(args, shapes, strict=True):
            if isinstance(got, torch.Tensor) and want is not None and not _fits(got, want):
                shown = ", ".join("*" if d is None else str(d) for d in want)
                raise InputError(
                    f"{path} was exported for inputs of shape [{shown}], got "
                    f"{list(got.shape)}; export with dynamic_shapes (a torch.export.Dim for the "
                    "batch dimension) or use batches of exactly that shape"
                )

    return check


def _fits(tensor: torch.Tensor, shape: tuple[int | None, ...]) -> bool:
    return tensor.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(tensor.shape, shape, strict=True)
    )


def _refuse_training_graph(path: Path, ops: list[str], how: str) -> None:
    if ops:
        raise InputError(
            f"{path} was made by {how} in training mode ({', '.join(ops)} with training=True "
            "fixed in the graph), so eval mode cannot be restored; call model.eval() before "
            f"{how} and save it again"
        )


def _trains(schema: Any, value_at: Callable[[int, str], Any]) -> bool:
    """Whether an operator call is fixed in training mode: dropout on, or BatchNorm on batch
    statistics while it has running statistics (without them it uses the batch in any mode)."""
    if "batch_norm_with_update" in schema.name:
        return True
    values = {arg.name: value_at(i, arg.name) for i, arg in enumerate(schema.arguments)}
    if "running_mean" in values and values["running_mean"] is None:
        return False
    return any(values.get(name) is True for name in _TRAINING_ARGS)


def _fx_training_ops(module: nn.Module) -> list[str]:
    found: set[str] = set()
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            schema = getattr(node.target, "_schema", None)
            if node.op != "call_function" or schema is None:
                continue
            if _trains(schema, functools.partial(_fx_value, node)):
                found.add(schema.name)
    return sorted(found)


def _fx_value(node: torch.fx.Node, index: int, name: str) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, _UNKNOWN)


def _jit_training_ops(module: torch.jit.ScriptModule) -> list[str]:
    found: set[str] = set()
    for node in _jit_nodes(module.inlined_graph):
        text = node.schema()
        if text == "(no schema)":
            continue
        schema = torch._C.parse_schema(text)
        if _trains(schema, functools.partial(_jit_constant, node)):
            found.add(schema.name)
    return sorted(found)


def _jit_nodes(block: Any) -> Any:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _jit_nodes(sub)


def _jit_constant(node: Any, index: int, name: str) -> Any:
    """The value of a constant argument, else ``_UNKNOWN``."""
    del name  # JIT nodes pass every argument positionally
    if index >= node.inputsSize():
        return _UNKNOWN
    value = node.inputsAt(index)
    return value.toIValue() if value.node().kind() == "prim::Constant" else _UNKNOWN


_READERS: dict[str, Callable[[Path, bool], Checkpoint]] = {
    "safetensors": _read_safetensors,
    "torch.save": _read_torch_save,
    "torchscript": _read_torchscript,
    "export": _read_export,
}


# --- loading weights into a model and saving them -----------------------------------------------


def _in_dtype_of(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Convert the model to the one floating dtype of the stored weights, so that loading them
    loses no precision (a float64 checkpoint gives a float64 model)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return model.to(dtypes.pop()) if len(dtypes) == 1 else model


def _restore_prefix(
    model: nn.Module, state: dict[str, torch.Tensor], stripped: str
) -> dict[str, torch.Tensor]:
    """Put back the part of a stripped prefix that the model's own names start with (a model
    whose weights all live under ``model.``, say)."""
    names = list(model.state_dict())
    for start in range(len(stripped)):
        prefix = stripped[start:]
        if (start == 0 or stripped[start - 1] == ".") and all(n.startswith(prefix) for n in names):
            return {prefix + key: value for key, value in state.items()}
    return state


def _fill_tied(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a tied (shared) tensor stored under one of its names to its other names."""
    filled = dict(state)
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        stored = next((n for n in names if n in filled), None)
        for name in names if stored is not None else ():
            filled.setdefault(name, filled[stored])
    return filled


def _mismatches(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {list(state[k].shape)} in the file but {list(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_few(shapes)}")
    return problems


def _few(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _savable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as dense, contiguous CPU tensors that share no memory."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            kind = value.layout if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"cannot save the model's {name!r}: it is a {kind}, and safetensors stores "
                "dense tensors only"
            )
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors
