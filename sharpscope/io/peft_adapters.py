"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) as
checkpoints: read without peft, and put on their base model by peft, offline, running no code.

peft is optional (``pip install "sharpscope[peft]"``) and imported only in :func:`build_adapter`.
The adapter is built from a ``LoraConfig`` made here from the folder's JSON (peft's own loaders
would import the modules its ``auto_mapping`` or ``megatron_core`` name) and given the weights
sharpscope read, strictly. Only plain LoRA is accepted: a setting that changes the adapter's
function (DoRA, biases, other initialisations, other PEFT types) is refused, untested.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.load_errors import corrupt, few, first_line
from sharpscope.io.optional import require_offline

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
PEFT_INSTALL = 'pip install "sharpscope[peft]"'
PLAIN_LORA = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "fan_in_fan_out",
        "init_lora_weights",
        "inference_mode",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "peft_version",
        "megatron_core",
    }
)
"""The settings of an adapter config that may differ from their defaults: plain LoRA, tested.
Any other set (``use_dora``, ``bias``, ``modules_to_save``, ``megatron_config``...) is refused."""
_INITS = (True, False, "gaussian")
"""The ``init_lora_weights`` of an adapter that does not change its base (PiSSA, OLoRA, LoftQ,
EVA and CorDA adapters are saved against a changed base)."""


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file()


def adapter_config(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json``, checked to be a plain LoRA adapter."""
    path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise corrupt(path, exc) from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object; save the adapter with save_pretrained")
    kind = data.get("peft_type")
    if kind != "LORA":
        raise InputError(
            f"{path} is a {kind!r} adapter; sharpscope reads only LoRA adapters (peft_type LORA)"
        )
    unusual = sorted(k for k, v in data.items() if k not in PLAIN_LORA and _set(k, v))
    if unusual or data.get("init_lora_weights", True) not in _INITS:
        named = few(unusual) if unusual else f"init_lora_weights {data['init_lora_weights']!r}"
        raise InputError(
            f"{path} sets {named}: sharpscope reads only plain LoRA adapters (no DoRA, biases, "
            "saved modules or base-changing initialisations); merge the adapter into its base "
            "(merge_and_unload, save_pretrained) and analyze that folder"
        )
    if not isinstance(data.get("r"), int) or not data.get("target_modules"):
        raise InputError(f"{path} has no rank `r` or `target_modules`; save it with peft")
    return data


def adapter_files(folder: Path, trust_pickle: bool) -> list[Path]:
    """The config and weight files of an adapter folder: its safetensors; a pickled
    ``adapter_model.bin`` only with ``trust_pickle``."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = folder / PICKLED_WEIGHTS
        if not pickled.is_file():
            raise InputError(
                f"adapter folder {folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save "
                "the adapter with save_pretrained"
            )
        if not trust_pickle:
            raise InputError(
                f"{pickled} is a pickle, which can run code as it loads: save the adapter as "
                f"{ADAPTER_WEIGHTS} (save_pretrained(safe_serialization=True)), or pass "
                "`trust_pickle` only for a file you trust"
            )
        weights = pickled
    return [folder / ADAPTER_CONFIG, weights]


def base_folder(folder: Path, config: Mapping[str, Any], base: Path | None) -> Path:
    """The base model of the adapter: ``base``, else its config's ``base_model_name_or_path``
    when that is a local folder."""
    if base is not None:
        if not base.exists():
            raise InputError(f"`base` {base} not found; give the base model's folder")
        return base
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and Path(named).expanduser().is_dir():
        return Path(named).expanduser()
    what = f"names the base {named!r}, which is not a local folder" if named else "names no base"
    raise InputError(
        f"{folder / ADAPTER_CONFIG} {what}; pass `base` (the base model's save_pretrained folder: "
        "nothing is downloaded)"
    )


def describe(folder: Path, config: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The adapter as the report states it: its folder, type, rank, target modules and base."""
    targets = config["target_modules"]
    return {
        "folder": str(folder),
        "peft_type": "LORA",
        "rank": config["r"],
        "alpha": config.get("lora_alpha", 8),
        "target_modules": [targets] if isinstance(targets, str) else sorted(targets),
        "base": str(base),
    }


def build_adapter(
    base_model: nn.Module,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    folder: Path,
    base: Path,
) -> nn.Module:
    """The PEFT model of the LoRA adapter ``config`` with the weights ``state`` (its file's
    names) on ``base_model``: the adapter's parameters trainable, the base's frozen."""
    peft = require_offline(
        "peft", f"{folder} is a PEFT adapter folder, and loading it", PEFT_INSTALL
    )
    known = set(peft.LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("auto_mapping",)}
    kwargs.update(init_lora_weights=True, inference_mode=False)
    base_model.name_or_path = str(base.resolve())  # peft's base_model_name_or_path: any cwd
    try:
        model = peft.get_peft_model(base_model, peft.LoraConfig(**kwargs))
        if {t.dtype for t in state.values()} == {torch.float64}:
            model.to(torch.float64)  # float64 adapter weights stay exact (the base widens)
        result = peft.set_peft_model_state_dict(model, dict(state))
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"peft cannot put the adapter {folder} on the base {base} ({first_line(exc)}); check "
            "that the adapter was trained on that base"
        ) from exc
    _check_weights(model, state, result, folder, base)
    return model


def _set(key: str, value: Any) -> bool:
    """Whether a setting outside :data:`PLAIN_LORA` is set (not its default)."""
    defaults = {"bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16}
    return value not in (None, False, {}, [], "", defaults.get(key))


def _check_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], result: Any, folder: Path, base: Path
) -> None:
    """Refuse adapter weights that peft did not use, or adapter parameters left without one."""
    unexpected = list(getattr(result, "unexpected_keys", ()))
    given = set(state)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n.replace(".default.", ".", 1) not in given]
    if unexpected or missing or not trainable:
        problems = [f"unused {few(unexpected)}"] if unexpected else []
        problems += [f"no weights for {few(missing)}"] if missing else []
        raise InputError(
            f"the adapter {folder} does not fit the base {base}: "
            f"{'; '.join(problems) or 'no LoRA layer was made'}; pass the `base` it was "
            "trained on"
        )
