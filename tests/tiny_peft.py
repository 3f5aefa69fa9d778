"""A tiny PEFT LoRA adapter on the tiny Llama-style base (:func:`tiny_hf.llama`), both written as
save_pretrained folders (no download), and causal-LM token data for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tiny_hf
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

RANK, TARGETS = 2, ["q_proj", "v_proj"]


def lora_model(dtype: torch.dtype = torch.float32, **options: Any):
    """The tiny Llama with a rank-2 LoRA on q_proj and v_proj (and LoraConfig ``options``), its B
    matrices random (non-zero, so that the adapter changes the function)."""
    config = LoraConfig(
        r=RANK, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, **options
    )
    torch.manual_seed(1)
    return get_peft_model(tiny_hf.llama(), config).to(dtype)


def write_adapter(root: Path, base_in_config: bool = True, **options: Any) -> tuple[Path, Path]:
    """Save the base and its adapter (:func:`lora_model` with ``options``) under ``root``:
    (adapter folder, base folder); the adapter config names the base when ``base_in_config``,
    else a Hub id."""
    base, adapter = root / "base", root / "adapter"
    tiny_hf.llama().save_pretrained(base)
    model = lora_model(**options)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(adapter)
    if not base_in_config:  # written after saving: peft's save would look the id up
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter, base


def write_tokens(path: Path, samples: int = 8, length: int = 6) -> Path:
    """Token ids for the causal LM (its labels are the inputs)."""
    generator = torch.Generator().manual_seed(0)
    save_file(
        {"input_ids": torch.randint(0, tiny_hf.VOCAB, (samples, length), generator=generator)},
        str(path),
    )
    return path
