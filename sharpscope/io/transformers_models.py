"""The model of a Hugging Face ``save_pretrained`` folder, built by transformers from its
``config.json`` and given the weights sharpscope read, from local files only; and written back
as such a folder.

transformers is optional (``pip install "sharpscope[hf]"``) and imported only here, when a
folder is loaded, with the Hugging Face libraries' offline switches set. Nothing is downloaded and
no code from the folder is run: the class is the config's ``architectures`` entry as transformers
itself defines it, else ``AutoModel``'s; no Hub kernel is loaded (``use_kernels=False``), and the
attention is torch's own whatever the config asks for (:func:`_torch_attention`).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.load_errors import few, first_line
from sharpscope.io.optional import require_offline
from sharpscope.io.pretrained import CONFIG, tokenizer_files
from sharpscope.io.row_reads import meta_parameters

TORCH_ATTENTION = ("sdpa", "eager")
"""The attention implementations a model is built with: torch's own, twice differentiable (the
curvature engine runs sdpa on its math kernel, :mod:`sharpscope.curvature.attention`)."""


def build_pretrained(
    folder: Path, state: Mapping[str, torch.Tensor], empty: bool = False
) -> nn.Module:
    """The model ``folder/config.json`` describes, holding ``state`` (all of its weights), in
    float32, or float64 when the weights are float64. With ``empty``, built from the config
    alone in eval mode, as loaded, with its parameters on the meta device and its buffers real
    (:func:`~sharpscope.io.row_reads.meta_parameters`): the caller fills them from ``state``."""
    transformers = _import_transformers(folder)
    with _quiet(transformers):
        config = _config(transformers, folder)
        _torch_attention(config, folder)
        model_class = _model_class(transformers, folder, config)
        try:
            if empty:
                with meta_parameters():
                    return model_class._from_config(config, dtype=_dtype(state)).eval()
            model, info = model_class.from_pretrained(
                None,
                config=config,
                state_dict=dict(state),
                dtype=_dtype(state),
                local_files_only=True,
                use_kernels=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported in the loading info, then refused
            )
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as exc:
            raise InputError(
                f"transformers cannot build {model_class.__name__} from {folder} "
                f"({first_line(exc)}); check that its {CONFIG} and weights belong together"
            ) from exc
    _check_loading(folder, model_class.__name__, info)
    return model


def save_pretrained_folder(
    folder: Path, model: Any, tokenizer_from: Path | None, state: Any = None
) -> None:
    """Write the transformers ``model`` (with ``state`` as its state dict when given: a sharded
    model's, gathered) into ``folder`` as save_pretrained does (config.json, model.safetensors),
    with copies of the tokenizer files of the folder ``tokenizer_from``."""
    with _quiet(_import_transformers(folder)):
        model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    for file in tokenizer_files(tokenizer_from) if tokenizer_from is not None else ():
        shutil.copy2(file, folder / file.name)


def _import_transformers(folder: Path) -> ModuleType:
    return require_offline(
        "transformers", f"{folder} is a Hugging Face save_pretrained folder, and loading it"
    )


def _config(transformers: ModuleType, folder: Path) -> Any:
    """``AutoConfig`` of the folder, from its own file, running none of its code."""
    try:
        return transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"transformers {transformers.__version__} cannot read {folder / CONFIG} "
            f"({first_line(exc)}); a model type it does not know needs a newer transformers"
        ) from exc


def _torch_attention(config: Any, folder: Path) -> None:
    """Build the model with torch's own attention (:data:`TORCH_ATTENTION`) whatever its config
    asks for: a Hub kernel (``org/repo``) would be downloaded and run, and flash or flex
    attention has no second derivative, which the Hessian needs. Every implementation computes
    the same function, so another one named is replaced by transformers' default (sdpa, else
    eager), saying so."""
    configs = [config, *(getattr(config, key, None) for key in config.sub_configs)]
    named = {getattr(c, "_attn_implementation", None) for c in configs if c is not None}
    others = sorted(str(name) for name in named - {None, *TORCH_ATTENTION})
    if others:
        warnings.warn(
            f"{folder / CONFIG} asks for the attention implementation {', '.join(others)}; "
            "sharpscope builds the model with torch's own attention instead (sdpa, else eager): "
            "the same function, with the second derivatives the Hessian needs, and nothing "
            "downloaded",
            UserWarning,
            stacklevel=4,
        )
        config._attn_implementation = None


def _model_class(transformers: ModuleType, folder: Path, config: Any) -> Any:
    """The config's first ``architectures`` class from transformers (a public name of the
    package that is a ``PreTrainedModel``: a model class, nothing else is looked up); without
    one, the class ``AutoModel`` picks for the config (saying so)."""
    names = getattr(config, "architectures", None) or []
    if not names:
        model_class = transformers.MODEL_MAPPING.get(type(config), None)
        if model_class is None:
            raise InputError(
                f"{folder / CONFIG} names no architectures and transformers has no AutoModel "
                f"for its model type; add the class to its architectures, or pass `model`"
            )
        warnings.warn(
            f"{folder / CONFIG} names no architectures: built {model_class.__name__}, "
            "transformers' AutoModel for it (the bare model, without a task head)",
            UserWarning,
            stacklevel=4,
        )
        return model_class
    name = names[0]
    public = isinstance(name, str) and name.isidentifier() and not name.startswith("_")
    model_class = getattr(transformers, name, None) if public else None
    base = transformers.PreTrainedModel
    if not isinstance(model_class, type) or not issubclass(model_class, base):
        raise InputError(
            f"{folder / CONFIG} names the architecture {name!r}, which transformers "
            f"{transformers.__version__} does not define (custom code is never run); upgrade "
            "transformers, or pass `model` to build it yourself"
        )
    return model_class


def _dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """float64 for float64 weights, else float32 (half-precision weights are widened)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return torch.float64 if dtypes == {torch.float64} else torch.float32


def _check_loading(folder: Path, name: str, info: Mapping[str, Any]) -> None:
    """Refuse a model whose weights did not all come from the folder, or came unused."""
    problems = [
        f"{what} {few(sorted(_described(k) for k in info.get(key) or ()))}"
        for key, what in (
            ("missing_keys", "missing keys"),
            ("unexpected_keys", "unexpected keys"),
            ("mismatched_keys", "shape mismatch:"),
        )
        if info.get(key)
    ]
    if problems:
        raise InputError(
            f"the weights in {folder} do not fit {name}, the class its {CONFIG} names: "
            f"{'; '.join(problems)}; save the model and its config together with save_pretrained"
        )


def _described(key: Any) -> str:
    """A key of the loading info; a mismatch ``(name, stored shape, model shape)`` in words."""
    if isinstance(key, tuple) and len(key) == 3:
        name, stored, wanted = key
        return f"{name} is {list(stored)} in the folder but {list(wanted)} in the model"
    return str(key)


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """transformers' progress bar and log lines off while the model loads, restored after."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if bars:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
